"""End to end: the real operator (`leap operator`, kopf) against kmock's Kubernetes emulator.

The emulator stands in for the API server only; the test plays the Job controller and kubelet
(it sets Job and Pod status) and a training process (a real leap_trainer metrics endpoint).
"""

from __future__ import annotations

import copy
import time

import pytest

from emulator import Emulator, OperatorProcess, free_port, shared_operator, wait_for
from leap_operator import names, render
from leap_operator.status import get_condition
from leap_trainer import contract
from leap_trainer.metrics import TrainingMetrics

pytestmark = pytest.mark.timeout(180)

SHARED_NAMESPACES = ["life", "fail", "bad", "policy", "deadline"]


def gpu_run(name: str, namespace: str, **spec) -> dict:
    run = {"apiVersion": names.API_VERSION, "kind": names.KIND,
           "metadata": {"name": name, "namespace": namespace},
           "spec": {"framework": "pytorch", "workers": 2,
                    "workload": {"kind": "classifier", "model": "mlp", "epochs": 2},
                    "accelerator": {"type": "nvidia-gpu", "count": 2}}}
    run["spec"].update(copy.deepcopy(spec))
    return run


@pytest.fixture(scope="module")
def k8s():
    with Emulator() as emulator:
        for ns in SHARED_NAMESPACES + ["restart"]:
            emulator.create_namespace(ns)
        yield emulator


@pytest.fixture(scope="module")
def operator(k8s, tmp_path_factory):
    yield from shared_operator(k8s, tmp_path_factory.mktemp("op"), SHARED_NAMESPACES)


def phase(k8s: Emulator, ns: str, name: str) -> str | None:
    return ((k8s.run(ns, name) or {}).get("status") or {}).get("phase")


def condition(run: dict, type_: str) -> dict:
    return get_condition((run.get("status") or {}).get("conditions"), type_) or {}


def env_of(job: dict) -> dict:
    return {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_gpu_run_lifecycle_progress_and_operator_metrics(k8s, operator):
    ns = "life"
    metrics_port = free_port()
    trainer = TrainingMetrics(run="llm", namespace=ns, rank=0, framework="pytorch", accelerator="nvidia-gpu",
                              port=metrics_port, flops_per_sample=1000.0, peak_flops=None, total_steps=1000,
                              address="127.0.0.1")
    trainer.start_server()
    try:
        created = k8s.create_run(gpu_run("llm", ns, metrics={"port": metrics_port}))

        # Service + Job for attempt 1, as `leap render` would print them.
        job = wait_for(lambda: k8s.get("batch/v1/jobs", ns, render.job_name("llm", 1)), message="Job llm-a1")
        service = wait_for(lambda: k8s.get("v1/services", ns, render.service_name("llm")), message="Service")
        assert service["spec"]["clusterIP"] == "None"
        assert job["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
        assert job["spec"]["completionMode"] == "Indexed"
        env = env_of(job)
        assert env[contract.ENV_WORLD_SIZE] == "4" and env[contract.ENV_NNODES] == "2"
        assert env[contract.ENV_NPROC_PER_NODE] == "2" and env[contract.ENV_ATTEMPT] == "1"
        assert env[contract.ENV_MASTER_ADDR].startswith("llm-a1-0.llm.life.svc")
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
        wait_for(lambda: phase(k8s, ns, "llm") == "Pending", message="phase Pending")

        # The Job controller starts the pods; rank 0 serves real metrics on 127.0.0.1.
        # (The Job controller counts its pods active as it creates them, before they run.)
        k8s.set_job_status(ns, job["metadata"]["name"], {"active": 2, "ready": 2})
        k8s.start_pods(job, "Running", pod_ip="127.0.0.1")
        run = wait_for(lambda: phase(k8s, ns, "llm") == "Running" and k8s.run(ns, "llm"), message="Running")
        assert condition(run, "Running")["status"] == "True", run["status"]
        assert run["status"]["workers"]["active"] == 2 and run["status"]["workers"]["desired"] == 2
        assert run["status"]["startTime"] and run["status"]["attempt"] == 1

        trainer.report(steps=250, samples=250 * 64, seconds=5.0, loss=0.5)
        trainer.set_epoch(1)
        prog = wait_for(lambda: ((k8s.run(ns, "llm")["status"].get("progress") or {}).get("step") == 250)
                        and k8s.run(ns, "llm")["status"]["progress"], message="progress from rank 0")
        assert prog["totalSteps"] == 1000 and prog["percent"] == 25.0
        assert prog["samplesPerSecond"] == pytest.approx(3200 * 4)  # rank 0's rate x WORLD_SIZE
        assert prog["flopsPerSecond"] == pytest.approx(3200 * 4 * 1000.0)
        assert prog["loss"] == pytest.approx(0.5) and prog["epoch"] == 1
        assert prog["etaSeconds"] == pytest.approx(15.0) and prog["eta"] == "15s"
        trainer.report(steps=750, samples=750 * 64, seconds=15.0, loss=0.25)
        wait_for(lambda: k8s.run(ns, "llm")["status"]["progress"]["step"] == 1000, message="progress 100%")

        # The Job completes: Succeeded, with its conditions and times.
        k8s.set_job_status(ns, job["metadata"]["name"], {
            "active": 0, "ready": 0, "succeeded": 2,
            "conditions": [{"type": "Complete", "status": "True", "reason": "CompletionsReached"}]})
        run = wait_for(lambda: phase(k8s, ns, "llm") == "Succeeded" and k8s.run(ns, "llm"), message="Succeeded")
        st = run["status"]
        assert condition(run, "Succeeded")["status"] == "True" and condition(run, "Running")["status"] == "False"
        assert condition(run, "Valid")["status"] == "True" and condition(run, "Created")["status"] == "True"
        assert st["completionTime"] >= st["startTime"] and st["workers"]["succeeded"] == 2
        assert st["progress"]["percent"] == 100.0
        # One Event per transition, and nothing else: Pending (Job created), Running, Succeeded.
        events = wait_for(lambda: len(k8s.events(ns, "llm")) >= 3 and k8s.events(ns, "llm"))
        time.sleep(0.5)  # a duplicate would arrive meanwhile
        assert sorted(e["reason"] for e in k8s.events(ns, "llm")) == ["JobCompleted", "JobCreated", "WorkersActive"]
        assert all(e["type"] == "Normal" for e in events)
        assert [j["metadata"]["name"] for j in k8s.jobs(ns, "llm")] == ["llm-a1"]

        metrics = wait_for(lambda: 'leap_operator_runs{phase="Succeeded"} 1.0' in operator.metrics()
                           and operator.metrics(), message="operator metrics")
        assert 'leap_operator_reconciles_total{result="success"}' in metrics
        assert "leap_operator_reconcile_seconds_bucket" in metrics
    finally:
        trainer.close()


def test_failed_attempt_restarts_as_new_job_then_fails_past_backoff_limit(k8s, operator):
    ns = "fail"
    k8s.create_run(gpu_run("flaky", ns, runPolicy={"backoffLimit": 1}))
    job1 = wait_for(lambda: k8s.get("batch/v1/jobs", ns, "flaky-a1"), message="Job flaky-a1")
    pods = k8s.start_pods(job1, "Running")
    k8s.set_job_status(ns, "flaky-a1", {"active": 2})
    wait_for(lambda: phase(k8s, ns, "flaky") == "Running", message="Running")

    # Worker 1 is evicted: the whole gang restarts as attempt 2 (a new Job, the old one deleted).
    k8s.patch("v1/pods", ns, pods[1]["metadata"]["name"], {"status": {"phase": "Failed", "reason": "Evicted"}},
              "status")
    job2 = wait_for(lambda: k8s.get("batch/v1/jobs", ns, "flaky-a2"), message="Job flaky-a2")
    assert env_of(job2)[contract.ENV_ATTEMPT] == "2"
    assert job2["metadata"]["labels"][names.LABEL_ATTEMPT] == "2"
    wait_for(lambda: k8s.get("batch/v1/jobs", ns, "flaky-a1") is None, message="attempt 1's Job deleted")
    run = k8s.run(ns, "flaky")
    assert run["status"]["attempt"] == 2 and run["status"]["restarts"] == 1
    assert condition(run, "Restarting")["lastTransitionTime"]

    # Attempt 2 fails too: backoffLimit 1 is used up -> Failed, no attempt 3.
    k8s.start_pods(job2, "Running")
    k8s.set_job_status(ns, "flaky-a2", {"active": 2})
    wait_for(lambda: phase(k8s, ns, "flaky") == "Running", message="attempt 2 Running")
    k8s.set_job_status(ns, "flaky-a2", {"active": 0, "failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]})
    run = wait_for(lambda: phase(k8s, ns, "flaky") == "Failed" and k8s.run(ns, "flaky"), message="Failed")
    assert run["status"]["reason"] == "BackoffLimitExceeded" and run["status"]["attempt"] == 2
    assert condition(run, "Failed")["status"] == "True" and run["status"]["completionTime"]
    assert [j["metadata"]["name"] for j in k8s.jobs(ns, "flaky")] == ["flaky-a2"]  # kept for its logs
    warnings = [e for e in k8s.events(ns, "flaky") if e["type"] == "Warning"]
    assert {e["reason"] for e in warnings} >= {"Evicted", "BackoffLimitExceeded"}
    assert "leap_operator_restarts_total 1.0" in operator.metrics()


def test_invalid_run_gets_valid_false_and_an_event_while_others_reconcile(k8s, operator):
    ns = "bad"
    bad = gpu_run("bad", ns, workers=0)                         # the schema says minimum 1
    bad["spec"]["accelerator"] = {"type": "nvidia-gpu", "tpu": {"type": "tpu-v5-lite-podslice", "topology": "2x2"}}
    k8s.create_run(bad)
    k8s.create_run(gpu_run("good", ns))
    run = wait_for(lambda: phase(k8s, ns, "bad") == "Failed" and k8s.run(ns, "bad"), message="invalid -> Failed")
    valid = condition(run, "Valid")
    assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
    assert "spec.workers" in valid["message"]
    event = wait_for(lambda: [e for e in k8s.events(ns, "bad") if e["reason"] == "InvalidSpec"], message="event")
    assert event[0]["type"] == "Warning" and "spec.workers" in event[0]["message"]
    assert wait_for(lambda: k8s.get("batch/v1/jobs", ns, "good-a1"), message="the valid run's Job")
    assert k8s.jobs(ns, "bad") == [] and k8s.get("v1/services", ns, "bad") is None


def test_operator_restart_adopts_the_job_and_catches_up(k8s, tmp_path):
    ns = "restart"
    first = OperatorProcess(k8s, tmp_path, [ns]).start()
    try:
        first.wait_ready()
        k8s.create_run(gpu_run("durable", ns))
        assert k8s.writes("POST", f"/namespaces/{ns}/jobs") == 0
        job = wait_for(lambda: k8s.get("batch/v1/jobs", ns, "durable-a1"), message="Job durable-a1")
        k8s.start_pods(job, "Running")
        k8s.set_job_status(ns, "durable-a1", {"active": 2})
        wait_for(lambda: phase(k8s, ns, "durable") == "Running", message="Running")
    finally:
        assert first.stop(kill=True) != 0  # killed, no goodbye

    # While no operator runs, the training finishes.
    k8s.set_job_status(ns, "durable-a1", {"active": 0, "succeeded": 2, "conditions": [
        {"type": "Complete", "status": "True"}]})
    posts_before = k8s.writes("POST", f"/namespaces/{ns}/jobs")
    assert posts_before == 1

    with OperatorProcess(k8s, tmp_path, [ns]) as second:
        second.wait_ready()
        run = wait_for(lambda: phase(k8s, ns, "durable") == "Succeeded" and k8s.run(ns, "durable"),
                       message="status catches up after the restart")
        assert run["status"]["attempt"] == 1 and run["status"]["restarts"] == 0
        assert [j["metadata"]["name"] for j in k8s.jobs(ns, "durable")] == ["durable-a1"]
        posts_after = k8s.writes("POST", f"/namespaces/{ns}/jobs")
        assert posts_after == posts_before, "the restarted operator must not create any Job"


def test_suspend_resume_then_ttl_deletes_the_run_and_its_children(k8s, operator):
    ns = "policy"
    k8s.create_run(gpu_run("pausable", ns, runPolicy={"ttlSecondsAfterFinished": 1}))
    job = wait_for(lambda: k8s.get("batch/v1/jobs", ns, "pausable-a1"), message="Job pausable-a1")
    k8s.set_job_status(ns, "pausable-a1", {"active": 2, "ready": 2})
    wait_for(lambda: phase(k8s, ns, "pausable") == "Running", message="Running")

    # Suspend: the Job is suspended (its controller then removes the pods); the run says so.
    k8s.patch(f"{names.API_VERSION}/{names.PLURAL}", ns, "pausable",
              {"metadata": {"generation": 2}, "spec": {"runPolicy": {"suspend": True}}})
    wait_for(lambda: k8s.get("batch/v1/jobs", ns, "pausable-a1")["spec"].get("suspend") is True, message="Job suspended")
    k8s.set_job_status(ns, "pausable-a1", {"active": 0})
    # The run is Suspended as soon as its Job is; its worker count follows the pods going away.
    run = wait_for(lambda: phase(k8s, ns, "pausable") == "Suspended"
                   and k8s.run(ns, "pausable")["status"]["workers"]["active"] == 0 and k8s.run(ns, "pausable"),
                   message="Suspended with no active workers")
    assert condition(run, "Suspended")["status"] == "True"

    # Resume: the same Job (same attempt) runs again.
    k8s.patch(f"{names.API_VERSION}/{names.PLURAL}", ns, "pausable",
              {"metadata": {"generation": 3}, "spec": {"runPolicy": {"suspend": False}}})
    wait_for(lambda: k8s.get("batch/v1/jobs", ns, "pausable-a1")["spec"].get("suspend") is False, message="Job resumed")
    k8s.set_job_status(ns, "pausable-a1", {"active": 2, "ready": 2})
    run = wait_for(lambda: phase(k8s, ns, "pausable") == "Running" and k8s.run(ns, "pausable"), message="Running again")
    assert condition(run, "Suspended")["status"] == "False" and run["status"]["attempt"] == 1

    # Success, then ttlSecondsAfterFinished: the run goes, and its Job and Service with it.
    k8s.set_job_status(ns, "pausable-a1", {"active": 0, "succeeded": 2,
                                           "conditions": [{"type": "Complete", "status": "True"}]})
    wait_for(lambda: phase(k8s, ns, "pausable") == "Succeeded", message="Succeeded")
    wait_for(lambda: k8s.run(ns, "pausable") is None, timeout=30, message="the run deleted by its TTL")
    wait_for(lambda: k8s.jobs(ns, "pausable") == [] and k8s.get("v1/services", ns, "pausable") is None,
             message="children deleted")
    assert job["metadata"]["name"] == "pausable-a1"


def test_active_deadline_fails_the_run_and_removes_its_job(k8s, operator):
    ns = "deadline"
    k8s.create_run(gpu_run("slow", ns, runPolicy={"activeDeadlineSeconds": 1}))
    job = wait_for(lambda: k8s.get("batch/v1/jobs", ns, "slow-a1"), message="Job slow-a1")
    assert "activeDeadlineSeconds" not in job["spec"]  # the operator keeps the one deadline
    k8s.set_job_status(ns, "slow-a1", {"active": 2, "ready": 2})
    run = wait_for(lambda: phase(k8s, ns, "slow") == "Failed" and k8s.run(ns, "slow"), timeout=30,
                   message="Failed by the deadline")
    assert run["status"]["reason"] == "DeadlineExceeded" and run["status"]["restarts"] == 0
    assert condition(run, "Failed")["reason"] == "DeadlineExceeded"
    wait_for(lambda: k8s.jobs(ns, "slow") == [], message="the Job deleted: no pods keep their GPUs")
