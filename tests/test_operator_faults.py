"""The operator under faults: API errors, a dropped network, crashes, node loss, deletes mid-flight,
malformed objects and two replicas. The real operator (`leap operator`, kopf) runs against kmock's
Kubernetes emulator, which answers chosen requests with errors or delays; each test ends by
asserting the final state of every object involved (the run, its Jobs, its Service, its Events).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from emulator import Emulator, OperatorProcess, Proxy, shared_operator, wait_for
from leap_operator import names
from leap_operator.status import get_condition
from leap_trainer import contract
from test_operator import condition, gpu_run, phase

pytestmark = pytest.mark.timeout(240)

RUNS = f"{names.API_VERSION}/{names.PLURAL}"
SHARED_NAMESPACES = ["api-errors", "node-loss", "deleting", "malformed"]
OWN_NAMESPACES = ["netsplit", "crash", "ha"]


@pytest.fixture(scope="module")
def k8s():
    with Emulator() as emulator:
        for ns in SHARED_NAMESPACES + OWN_NAMESPACES:
            emulator.create_namespace(ns)
        yield emulator


@pytest.fixture(scope="module")
def operator(k8s, tmp_path_factory):
    yield from shared_operator(k8s, tmp_path_factory.mktemp("op"), SHARED_NAMESPACES)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def run_job_and_complete(k8s: Emulator, ns: str, job: dict) -> None:
    """Play the Job controller: the pods start, then every worker succeeds."""
    name, workers = job["metadata"]["name"], job["spec"]["completions"]
    k8s.start_pods(job, "Running")
    k8s.set_job_status(ns, name, {"active": workers, "ready": workers})
    wait_for(lambda: phase(k8s, ns, job["metadata"]["labels"][names.LABEL_RUN]) == "Running", message="Running")
    k8s.set_job_status(ns, name, {"active": 0, "ready": 0, "succeeded": workers, "conditions": [
        {"type": "Complete", "status": "True", "reason": "CompletionsReached"}]})


def assert_succeeded_once(k8s: Emulator, ns: str, name: str, attempt: int = 1) -> dict:
    """The run Succeeded on `attempt`, with exactly one Job (that attempt's) and one Service."""
    run = wait_for(lambda: phase(k8s, ns, name) == "Succeeded" and k8s.run(ns, name), message=f"{name} Succeeded")
    assert run["status"]["attempt"] == attempt and run["status"]["restarts"] == attempt - 1
    assert condition(run, "Succeeded")["status"] == "True" and condition(run, "Running")["status"] == "False"
    assert [j["metadata"]["name"] for j in k8s.jobs(ns, name)] == [f"{name}-a{attempt}"]
    assert [s["metadata"]["name"] for s in k8s.list("v1/services", ns)
            if s["metadata"]["labels"].get(names.LABEL_RUN) == name] == [name]
    return run


def test_api_errors_on_creates_and_status_patches_are_retried_without_duplicates(k8s, operator):
    ns, name = "api-errors", "flaky-api"
    base = f"/apis/{names.API_VERSION}/namespaces/{ns}/{names.PLURAL}/{name}/status"
    # kmock stores a created object before answering, so a 503 on the Job's POST is a lost
    # response: the retry meets 409 AlreadyExists and must adopt the Job, not make a second one.
    k8s.call(lambda km: km[f"post /apis/batch/v1/namespaces/{ns}/jobs"][:1] << 503)
    k8s.call(lambda km: km[f"post /api/v1/namespaces/{ns}/services"][:1] << 409)
    k8s.call(lambda km: km[f"patch {base}"][:2] << 409)   # the first two status writes conflict,
    k8s.call(lambda km: km[f"patch {base}"][2:4] << 500)  # the next two meet a broken API server
    before = operator.metrics()

    k8s.create_run(gpu_run(name, ns))
    job = wait_for(lambda: k8s.get("batch/v1/jobs", ns, f"{name}-a1"), message="the Job")
    wait_for(lambda: phase(k8s, ns, name) == "Pending", message="Pending despite 4 failed status writes")
    run_job_and_complete(k8s, ns, job)
    run = assert_succeeded_once(k8s, ns, name)

    assert k8s.writes("POST", f"/namespaces/{ns}/jobs") == 2      # the lost answer and the retry
    assert k8s.writes("POST", f"/namespaces/{ns}/services") == 1  # 409 -> adopted, no second POST
    assert run["status"]["jobName"] == f"{name}-a1" and run["status"]["workers"]["succeeded"] == 2
    after = operator.metrics()
    for verb, resource, failures in (("post", "jobs", 2), ("post", "services", 1), ("patch", names.PLURAL, 4)):
        assert metric(after, names.OM_API_ERRORS, verb=verb, resource=resource) - \
            metric(before, names.OM_API_ERRORS, verb=verb, resource=resource) >= failures, (verb, resource)
    reasons = [e["reason"] for e in k8s.events(ns, name)]
    assert reasons.count("JobCompleted") == 1 and "ReconcileError" not in reasons


def test_watch_streams_dropped_mid_run_miss_no_transition(k8s, tmp_path):
    """The network between operator and API server goes down while the run is Running; its Job
    completes and a new run is created during the outage. Once the network is back, kopf
    re-lists and re-watches, and both transitions are caught up."""
    ns = "netsplit"
    proxy = Proxy(k8s).up()
    op = OperatorProcess(k8s, tmp_path, [ns], server=proxy.url).start()
    try:
        op.wait_ready()
        k8s.create_run(gpu_run("steady", ns))
        job = wait_for(lambda: k8s.get("batch/v1/jobs", ns, "steady-a1"), message="the Job")
        k8s.start_pods(job, "Running")
        k8s.set_job_status(ns, "steady-a1", {"active": 2, "ready": 2})
        wait_for(lambda: phase(k8s, ns, "steady") == "Running", message="Running")

        proxy.down()
        k8s.set_job_status(ns, "steady-a1", {"active": 0, "ready": 0, "succeeded": 2, "conditions": [
            {"type": "Complete", "status": "True", "reason": "CompletionsReached"}]})
        k8s.create_run(gpu_run("latecomer", ns))
        time.sleep(3.0)  # kopf's watches and our writes fail and back off meanwhile
        assert phase(k8s, ns, "steady") == "Running" and k8s.jobs(ns, "latecomer") == []
        assert op.proc.poll() is None, "an unreachable API server must not kill the operator"
        proxy.up()

        assert_succeeded_once(k8s, ns, "steady")
        latecomer = wait_for(lambda: k8s.get("batch/v1/jobs", ns, "latecomer-a1"), timeout=60,
                             message="the run created during the outage gets its Job")
        run_job_and_complete(k8s, ns, latecomer)
        assert_succeeded_once(k8s, ns, "latecomer")
        reasons = [e["reason"] for e in k8s.events(ns, "steady")]
        assert reasons.count("JobCompleted") == 1
    finally:
        assert op.stop() == 0, op.output()[-3000:]
        proxy.down()


def test_operator_killed_between_job_create_and_status_patch_adopts_the_job(k8s, tmp_path):
    ns, name = "crash", "crashy"
    status_path = f"/apis/{names.API_VERSION}/namespaces/{ns}/{names.PLURAL}/{name}/status"
    outage = threading.Event()
    outage.set()
    k8s.refuse("PATCH", status_path, 503, while_set=outage)  # every status write fails, nothing is stored

    first = OperatorProcess(k8s, tmp_path, [ns]).start()
    try:
        first.wait_ready()
        k8s.create_run(gpu_run(name, ns))
        wait_for(lambda: k8s.get("batch/v1/jobs", ns, f"{name}-a1"), message="the Job")
        wait_for(lambda: len(k8s.requests("PATCH", status_path)) >= 2, message="status writes being refused")
    finally:
        assert first.stop(kill=True) != 0  # killed with the Job created and no status written
    outage.clear()
    # No status persisted: what the crash left is a Job that the run's status knows nothing of.
    assert (k8s.run(ns, name).get("status") or {}).get("jobName") is None
    assert k8s.writes("POST", f"/namespaces/{ns}/jobs") == 1

    with OperatorProcess(k8s, tmp_path, [ns]) as second:
        second.wait_ready()
        run = wait_for(lambda: (k8s.run(ns, name).get("status") or {}).get("jobName") and k8s.run(ns, name),
                       message="status catches up with the adopted Job")
        assert run["status"]["phase"] == "Pending" and run["status"]["attempt"] == 1
        assert condition(run, "Created")["status"] == "True"
        job = k8s.get("batch/v1/jobs", ns, f"{name}-a1")
        run_job_and_complete(k8s, ns, job)
        assert_succeeded_once(k8s, ns, name)
        assert k8s.writes("POST", f"/namespaces/{ns}/jobs") == 1, "the restarted operator must not create a Job"
        assert k8s.writes("POST", f"/namespaces/{ns}/services") <= 2  # a repeated create is adopted (409)


def test_node_loss_fails_the_attempt_and_the_gang_restarts(k8s, operator):
    ns, name = "node-loss", "lost-node"
    k8s.create_run(gpu_run(name, ns, runPolicy={"backoffLimit": 2}))
    job1 = wait_for(lambda: k8s.get("batch/v1/jobs", ns, f"{name}-a1"), message="attempt 1's Job")
    pods = k8s.start_pods(job1, "Running")
    k8s.set_job_status(ns, f"{name}-a1", {"active": 2, "ready": 2})
    wait_for(lambda: phase(k8s, ns, name) == "Running", message="Running")

    # The node of worker 1 is lost: the pod garbage collector marks its pod as a disruption and
    # deletes it; the Job controller counts one failed pod. Worker 0 is still running.
    lost = pods[1]["metadata"]["name"]
    k8s.patch("v1/pods", ns, lost, {"status": {"phase": "Failed", "conditions": [
        {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC",
         "message": "PodGC: node no longer exists"}]}}, "status")
    k8s.set_job_status(ns, f"{name}-a1", {"active": 1, "ready": 1, "failed": 1})

    job2 = wait_for(lambda: k8s.get("batch/v1/jobs", ns, f"{name}-a2"), message="attempt 2's Job (gang restart)")
    wait_for(lambda: k8s.get("batch/v1/jobs", ns, f"{name}-a1") is None,
             message="attempt 1's Job deleted with its surviving worker")
    env = {e["name"]: e.get("value") for e in job2["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[contract.ENV_ATTEMPT] == "2"
    run = k8s.run(ns, name)
    assert run["status"]["attempt"] == 2 and run["status"]["restarts"] == 1
    assert condition(run, "Restarting")["lastTransitionTime"]

    run_job_and_complete(k8s, ns, job2)
    run = assert_succeeded_once(k8s, ns, name, attempt=2)
    assert condition(run, "Restarting")["status"] == "False"
    warnings = [e for e in k8s.events(ns, name) if e["type"] == "Warning"]
    assert [e["reason"] for e in warnings] == ["WorkerFailed"]
    assert f"pod {lost} failed (DeletionByPodGC)" in warnings[0]["message"]  # the user is told why


def test_run_deleted_mid_reconcile_cleans_up_without_an_error_loop(k8s, operator):
    ns, name = "deleting", "doomed"

    async def slow_api_server() -> object:
        await asyncio.sleep(1.5)
        return NotImplemented  # then answer as usual

    k8s.call(lambda km: km[f"post /apis/batch/v1/namespaces/{ns}/jobs"][:1] << slow_api_server)
    k8s.create_run(gpu_run(name, ns))
    wait_for(lambda: k8s.requests("POST", f"/namespaces/{ns}/jobs"), message="the Job being created")
    errors_before = metric(operator.metrics(), names.OM_RECONCILES, result="error")
    k8s.delete(RUNS, ns, name)  # while the operator waits for the answer to its POST

    wait_for(lambda: k8s.run(ns, name) is None, message="the run gone (finalizer released)")
    wait_for(lambda: k8s.jobs(ns, name) == [] and k8s.get("v1/services", ns, name) is None,
             message="its Job and Service deleted")
    time.sleep(2.0)  # an error loop would show in this window
    assert metric(operator.metrics(), names.OM_RECONCILES, result="error") == errors_before
    assert k8s.jobs(ns, name) == [] and k8s.get("v1/services", ns, name) is None

    # The operator carries on: the next run in the namespace reconciles normally.
    k8s.create_run(gpu_run("survivor", ns))
    job = wait_for(lambda: k8s.get("batch/v1/jobs", ns, "survivor-a1"), message="the next run's Job")
    run_job_and_complete(k8s, ns, job)
    assert_succeeded_once(k8s, ns, "survivor")


MALFORMED = {
    # name: (what an older CRD version or a bypassed webhook let in, the field the message names)
    "spec-not-a-map": ("train please", "spec"),
    "workers-a-string": ({"framework": "pytorch", "workers": "two", "workload": {"kind": "classifier"},
                          "accelerator": {"type": "cpu"}}, "spec.workers"),
    "unknown-framework": ({"framework": "jax", "workload": {"kind": "classifier"}, "accelerator": {"type": "cpu"}},
                          "spec.framework"),
    "accelerator-a-list": ({"framework": "pytorch", "workload": {"kind": "classifier"}, "accelerator": ["gpu"]},
                           "spec.accelerator"),
    "negative-epochs": ({"framework": "pytorch", "workload": {"kind": "classifier", "epochs": -1},
                         "accelerator": {"type": "cpu"}}, "spec.workload.epochs"),
    "tpu-on-a-gpu": ({"framework": "tensorflow", "workload": {"kind": "classifier"},
                      "accelerator": {"type": "nvidia-gpu", "tpu": {"type": "tpu-v5-lite-podslice", "topology": "2x2"}}},
                     "spec.accelerator.tpu"),
}


def test_malformed_objects_get_valid_false_and_an_event_while_others_reconcile(k8s, operator):
    ns = "malformed"
    for name, (spec, _) in MALFORMED.items():
        k8s.create_run({"apiVersion": names.API_VERSION, "kind": names.KIND,
                        "metadata": {"name": name, "namespace": ns}, "spec": spec})
    k8s.create_run({"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": "no-spec", "namespace": ns}})
    k8s.create_run(gpu_run("well-formed", ns))

    job = wait_for(lambda: k8s.get("batch/v1/jobs", ns, "well-formed-a1"), message="the valid run's Job")
    expected = {**{name: field for name, (_, field) in MALFORMED.items()}, "no-spec": "spec"}
    for name, field in expected.items():
        run = wait_for(lambda: phase(k8s, ns, name) == "Failed" and k8s.run(ns, name), message=f"{name} Failed")
        valid = get_condition(run["status"]["conditions"], "Valid")
        assert valid["status"] == "False" and valid["reason"] == "InvalidSpec", name
        assert field in valid["message"], (name, valid["message"])
        assert run["status"]["reason"] == "InvalidSpec"
        events = wait_for(lambda: [e for e in k8s.events(ns, name) if e["reason"] == "InvalidSpec"],
                          message=f"{name}'s Event")
        assert events[0]["type"] == "Warning" and field in events[0]["message"]
        assert k8s.jobs(ns, name) == [] and k8s.get("v1/services", ns, name) is None
    run_job_and_complete(k8s, ns, job)
    assert_succeeded_once(k8s, ns, "well-formed")
    assert operator.proc.poll() is None
    assert metric(operator.metrics(), names.OM_RECONCILES, result="error") == 0


def test_two_replicas_only_the_leader_acts_and_the_standby_takes_over(k8s, tmp_path):
    ns = "ha"
    k8s.create("kopf.dev/v1/kopfpeerings", {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                                            "metadata": {"name": "leap", "namespace": ns}, "status": {}})
    ha = ("--peering", "leap", "--peering-lifetime", "10")
    def peers() -> list[int]:
        status = k8s.get("kopf.dev/v1/kopfpeerings", ns, "leap").get("status") or {}
        return sorted(peer["priority"] for peer in status.values() if peer)

    leader = OperatorProcess(k8s, tmp_path, [ns], *ha, "--priority", "100").start()
    standby = OperatorProcess(k8s, tmp_path, [ns], *ha, "--priority", "50")
    try:
        leader.wait_ready()
        wait_for(lambda: peers() == [100], message="the leader in the peering object")
        standby.start()  # it finds a live peer of higher priority and stands by from the start
        standby.wait_ready()
        wait_for(lambda: peers() == [50, 100], message="both replicas in the peering object")
        k8s.create_run(gpu_run("ha-run", ns))
        job = wait_for(lambda: k8s.get("batch/v1/jobs", ns, "ha-run-a1"), message="the Job")
        k8s.start_pods(job, "Running")
        k8s.set_job_status(ns, "ha-run-a1", {"active": 2, "ready": 2})
        wait_for(lambda: phase(k8s, ns, "ha-run") == "Running", message="Running")
        assert metric(leader.metrics(), names.OM_RECONCILES, result="success") > 0
        assert metric(standby.metrics(), names.OM_RECONCILES, result="success") == 0, "the standby must not act"

        assert leader.stop(kill=True) != 0  # the leader dies without saying goodbye
        k8s.set_job_status(ns, "ha-run-a1", {"active": 0, "ready": 0, "succeeded": 2, "conditions": [
            {"type": "Complete", "status": "True", "reason": "CompletionsReached"}]})
        wait_for(lambda: phase(k8s, ns, "ha-run") == "Succeeded", timeout=60,
                 message="the standby takes over once the leader's peering entry expires")
        assert_succeeded_once(k8s, ns, "ha-run")
        assert metric(standby.metrics(), names.OM_RECONCILES, result="success") > 0
        assert k8s.writes("POST", f"/namespaces/{ns}/jobs") == 1
        assert standby.proc.poll() is None
    finally:
        leader.stop(kill=True)
        assert standby.stop() == 0, standby.output()[-3000:]
