"""compute_status and progress parsing: pure functions, no cluster."""

from __future__ import annotations

import datetime as dt

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from leap_operator import progress, status
from leap_operator.status import compute_status, get_condition
from leap_operator.validation import Problem, defaulted
from leap_trainer import contract

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def make_run(status_: dict | None = None, **policy) -> dict:
    run = {"apiVersion": "leap.dev/v1alpha1", "kind": "TrainingRun",
           "metadata": {"name": "r", "namespace": "ns", "uid": "u1", "generation": 1},
           "spec": {"framework": "pytorch", "workload": {"kind": "classifier"}, "workers": 2,
                    "accelerator": {"type": "nvidia-gpu", "count": 2}, "runPolicy": policy}}
    run = defaulted(run)
    run["status"] = status_ or {}
    return run


def job(attempt=1, **job_status) -> dict:
    conds = job_status.pop("conditions", [])
    return {"metadata": {"name": f"r-a{attempt}"}, "spec": {"completions": 2},
            "status": {**job_status, "conditions": conds}}


def pod(index: int, phase: str, attempt=1, reason=None) -> dict:
    return {"metadata": {"name": f"r-a{attempt}-{index}", "labels": {"leap.dev/attempt": str(attempt)},
                         "annotations": {contract.JOB_COMPLETION_INDEX_ANNOTATION: str(index)}},
            "status": {"phase": phase, **({"reason": reason} if reason else {})}}


def step(run: dict, j, pods, now, **kw) -> status.Decision:
    """One reconcile: compute, then store the status as the operator would."""
    d = compute_status(run, j, pods, now, **kw)
    run["status"] = d.status
    return d


def cond(d: status.Decision, type_: str) -> dict:
    return get_condition(d.status["conditions"], type_)


def test_new_run_asks_for_its_job_and_is_pending():
    d = compute_status(make_run(), None, [], T0)
    assert d.action == "create"
    assert d.status["phase"] == "Pending" and d.status["attempt"] == 1
    assert cond(d, "Valid")["status"] == "True"
    assert cond(d, "Created")["status"] == "False"
    assert d.status["workers"] == {"desired": 2, "active": 0, "succeeded": 0, "failed": 0}


def test_lifecycle_running_then_succeeded_keeps_transition_times():
    run = make_run()
    step(run, None, [], T0)
    d = step(run, job(active=2, ready=2), [pod(0, "Running"), pod(1, "Running")], T0 + dt.timedelta(seconds=5))
    assert d.status["phase"] == "Running" and d.action == "none"
    assert cond(d, "Running")["status"] == "True"
    assert d.status["startTime"] == "2026-01-01T12:00:05Z"
    assert d.status["workers"]["active"] == 2 and d.status["workers"]["ready"] == 2
    assert [e[1] for e in d.events] == ["WorkersActive"]
    running_since = cond(d, "Running")["lastTransitionTime"]
    # Same observation later: no change, no event, transition time kept.
    d = step(run, job(active=2, ready=2), [], T0 + dt.timedelta(seconds=60))
    assert cond(d, "Running")["lastTransitionTime"] == running_since and d.events == []
    d = step(run, job(succeeded=2, conditions=[{"type": "Complete", "status": "True"}]), [],
             T0 + dt.timedelta(seconds=90))
    assert d.status["phase"] == "Succeeded"
    assert cond(d, "Succeeded")["status"] == "True" and cond(d, "Running")["status"] == "False"
    assert d.status["completionTime"] == "2026-01-01T12:01:30Z"
    assert d.events[0][0] == "Normal"


def test_failed_attempt_restarts_with_exponential_backoff_then_backoff_limit():
    run = make_run(backoffLimit=2)
    step(run, job(active=2, ready=2), [], T0)
    d = step(run, job(active=1), [pod(0, "Running"), pod(1, "Failed", reason="Error")], T0, backoff_base=1.0)
    assert d.action == "restart" and d.status["phase"] == "Restarting"
    assert d.status["attempt"] == 2 and d.status["restarts"] == 1
    assert d.requeue_after == pytest.approx(1.0)
    assert d.events[0][0] == "Warning"
    # Before the backoff has passed: wait; after: create attempt 2.
    d = step(run, None, [], T0, backoff_base=1.0)
    assert d.action == "none" and 0 < d.requeue_after <= 1.0
    d = step(run, None, [], T0 + dt.timedelta(seconds=2), backoff_base=1.0)
    assert d.action == "create" and d.status["attempt"] == 2
    # Attempt 2 fails through the Job's own condition: restart 2 waits twice as long.
    d = step(run, job(2, failed=1, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]),
             [], T0 + dt.timedelta(seconds=3), backoff_base=1.0)
    assert d.action == "restart" and d.status["attempt"] == 3 and d.requeue_after == pytest.approx(2.0)
    d = step(run, job(3, failed=1), [], T0 + dt.timedelta(seconds=9), backoff_base=1.0)
    assert d.status["phase"] == "Failed" and d.status["reason"] == "BackoffLimitExceeded"
    assert d.status["attempt"] == 3 and d.action == "none"
    assert cond(d, "Failed")["status"] == "True"


def test_a_gang_whose_pods_wait_is_pending_not_running():
    """Job.status.active counts Pending pods: a gang waiting for nodes has not started."""
    run = make_run(activeDeadlineSeconds=60)
    step(run, None, [], T0)
    d = step(run, job(active=2, ready=1), [pod(0, "Running"), pod(1, "Pending")], T0)
    assert d.status["phase"] == "Pending" and d.status["reason"] == "PodsStarting"
    assert "startTime" not in d.status and d.status["message"].startswith("1/2 worker pods running")
    waiting = pod(1, "Pending")
    waiting["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]
    d = step(run, job(active=2), [pod(0, "Running"), waiting], T0 + dt.timedelta(seconds=120))
    assert d.status["phase"] == "Pending" and d.status["reason"] == "Unschedulable"
    assert cond(d, "Scheduled")["status"] == "False"
    assert cond(d, "Scheduled")["message"] == "pod r-a1-1: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    assert d.status["phase"] != "Failed"  # the deadline counts from the first start only
    both = [pod(0, "Running"), pod(1, "Running")]
    for p in both:
        p["spec"] = {"nodeName": "n1"}
    d = step(run, job(active=2, ready=2), both, T0 + dt.timedelta(seconds=130))
    assert d.status["phase"] == "Running" and d.status["startTime"] == "2026-01-01T12:02:10Z"
    assert cond(d, "Scheduled")["status"] == "True"


def test_pods_the_job_cannot_create_are_a_condition_with_the_controllers_message():
    run = make_run()
    step(run, None, [], T0)
    message = 'Error creating: pods "r-a1-0-" is forbidden: no PriorityClass with name gold was found'
    d = step(run, job(active=0), [], T0, pods_not_created=message)
    assert d.status["phase"] == "Pending" and d.status["reason"] == "FailedCreate"
    assert cond(d, "PodsCreated")["status"] == "False" and cond(d, "PodsCreated")["message"] == message
    assert d.requeue_after == status.FAILED_CREATE_RECHECK  # Events wake nobody: look again
    d = step(run, job(active=2, ready=2), [pod(0, "Running"), pod(1, "Running")], T0, pods_not_created=None)
    assert d.status["phase"] == "Running" and cond(d, "PodsCreated")["status"] == "True"


def test_a_refused_child_fails_the_run_only_when_the_refusal_is_final():
    run = make_run()
    step(run, None, [], T0)
    d = status.refused(run, "Job", "r-a1", 422, 'admission webhook "policy" denied the request', T0)
    assert d.status["phase"] == "Failed" and d.status["reason"] == "Rejected" and d.events[0][0] == "Warning"
    run = make_run()
    step(run, None, [], T0)
    d = status.refused(run, "Job", "r-a1", 403, "exceeded quota: jobs", T0)
    assert d.status["phase"] == "Pending" and d.status["reason"] == "CreateRefused"
    assert cond(d, "Created")["status"] == "False" and "exceeded quota" in cond(d, "Created")["message"]
    d = status.refused(run, "Service", "r", 409, "", T0)
    assert d.status["reason"] == "NameTaken" and "is not this run's" in d.status["message"]


def test_evicted_pod_counts_as_failed_attempt():
    run = make_run(backoffLimit=0)
    evicted = pod(1, "Failed", reason="Evicted")
    d = step(run, job(active=1), [pod(0, "Running"), evicted], T0)
    assert d.status["phase"] == "Failed" and d.status["reason"] == "BackoffLimitExceeded"
    assert d.action == "stop"  # worker 0 still holds its GPUs: the Job goes
    assert "Evicted" in d.status["message"]


def test_deadline_exceeded_fails_and_stops():
    run = make_run(activeDeadlineSeconds=60)
    step(run, job(active=2, ready=2), [], T0)
    d = step(run, job(active=2, ready=2), [], T0 + dt.timedelta(seconds=30))
    assert d.status["phase"] == "Running" and d.requeue_after == pytest.approx(30)
    d = step(run, job(active=2, ready=2), [], T0 + dt.timedelta(seconds=61))
    assert d.status["phase"] == "Failed" and d.status["reason"] == "DeadlineExceeded" and d.action == "stop"


@pytest.mark.parametrize("condition_type", ["FailureTarget", "Failed"])
def test_a_job_deadline_fails_the_run_without_a_restart(condition_type):
    """Kubernetes >= 1.31 marks FailureTarget first: it is the deadline, not a worker failure."""
    run = make_run(activeDeadlineSeconds=600)
    step(run, job(active=2, ready=2), [pod(0, "Running"), pod(1, "Running")], T0)
    d = step(run, job(active=2, conditions=[{"type": condition_type, "status": "True", "reason": "DeadlineExceeded"}]),
             [pod(0, "Running"), pod(1, "Running")], T0 + dt.timedelta(seconds=5))
    assert d.status["phase"] == "Failed" and d.status["reason"] == "DeadlineExceeded"
    assert d.status["restarts"] == 0 and d.status["attempt"] == 1 and d.action in ("stop", "none")


def test_preemption_by_suspension_is_not_a_failure_and_waits_for_readmission():
    """Kueue preempts by suspending the Job; the kubelet moves the deleted pods to Failed."""
    run = make_run(backoffLimit=1)
    run["spec"]["scheduling"] = {"queueName": "team-a"}
    step(run, job(active=2, ready=2), [pod(0, "Running"), pod(1, "Running")], T0)
    preempted = job(active=0, failed=2)
    preempted["spec"]["suspend"] = True
    d = step(run, preempted, [pod(0, "Failed", reason="Error"), pod(1, "Failed", reason="Error")],
             T0 + dt.timedelta(seconds=30))
    assert d.status["phase"] == "Pending" and d.status["reason"] == "Preempted", d.status
    assert d.status["restarts"] == 0 and d.status["attempt"] == 1 and d.action == "none"
    readmitted = job(active=2, ready=2)
    d = step(run, readmitted, [pod(0, "Running"), pod(1, "Running")], T0 + dt.timedelta(seconds=60))
    assert d.status["phase"] == "Running" and d.status["restarts"] == 0


def test_ttl_after_finished_deletes_the_run():
    run = make_run(ttlSecondsAfterFinished=30)
    step(run, job(succeeded=2, conditions=[{"type": "Complete", "status": "True"}]), [], T0)
    d = step(run, job(succeeded=2), [], T0 + dt.timedelta(seconds=10))
    assert d.action == "none" and d.requeue_after == pytest.approx(20)
    d = step(run, job(succeeded=2), [], T0 + dt.timedelta(seconds=31))
    assert d.action == "delete-run"


def test_suspend_and_resume():
    run = make_run(suspend=True)
    d = step(run, job(active=2, ready=2), [], T0)
    assert d.status["phase"] == "Suspended" and d.action == "suspend"
    assert cond(d, "Suspended")["status"] == "True"
    run["spec"]["runPolicy"]["suspend"] = False
    suspended_job = job(active=0)
    suspended_job["spec"]["suspend"] = True
    d = step(run, suspended_job, [], T0)
    assert d.action == "resume" and cond(d, "Suspended")["status"] == "False"


def test_resume_after_an_edit_replaces_the_job_as_a_new_attempt_not_a_restart():
    run = make_run()
    suspended_job = job(active=0)
    suspended_job["spec"]["suspend"] = True
    step(run, suspended_job, [], T0)  # resumed, but the Job was rendered before the edit
    run["status"]["phase"] = "Suspended"
    d = step(run, suspended_job, [], T0, job_outdated=True)
    assert d.action == "replace" and d.status["attempt"] == 2 and d.status["restarts"] == 0
    assert d.status["reason"] == "Reshaped" and "jobName" not in d.status
    d = step(run, None, [], T0)
    assert d.action == "create" and d.status["attempt"] == 2


def test_invalid_run_is_failed_with_valid_false_and_no_action():
    d = compute_status(make_run(), None, [], T0, problems=[Problem("spec.workers", "must be >= 1")])
    assert d.action == "none" and d.status["phase"] == "Failed" and d.status["reason"] == "InvalidSpec"
    valid = cond(d, "Valid")
    assert valid["status"] == "False" and "spec.workers" in valid["message"]
    assert d.events[0][0] == "Warning"


def test_status_patch_only_changes():
    assert status.status_patch({"phase": "Running", "progress": {"step": 1}}, {"phase": "Running"}) is None
    assert status.status_patch({"phase": "Pending"}, {"phase": "Running"}) == {"phase": "Running"}
    # Maps are merged by a merge patch: keys that went away are deleted explicitly.
    assert status.status_patch({"workers": {"active": 2, "ready": 2}}, {"workers": {"active": 0}}) == {
        "workers": {"active": 0, "ready": None}}


def metrics_text(rank: str = "0", **values) -> str:
    registry = CollectorRegistry()
    labels = dict(run="r", namespace="ns", rank=rank, framework="pytorch", accelerator="nvidia-gpu")
    for name, value in values.items():
        if name.endswith("_total"):
            Counter(name.removesuffix("_total"), "h", list(labels), registry=registry).labels(**labels).inc(value)
        else:
            Gauge(name, "h", list(labels), registry=registry).labels(**labels).set(value)
    return generate_latest(registry).decode()


def test_progress_from_metrics_text_reads_every_field():
    text = metrics_text(**{contract.M_STEPS: 250, contract.M_TOTAL_STEPS: 1000, contract.M_PROGRESS: 0.25,
                           contract.M_SAMPLES_PER_SECOND: 1234.5, contract.M_ETA: 75, contract.M_LOSS: 0.42,
                           contract.M_FLOPS_PER_SECOND: 2.5e9, contract.M_EPOCH: 2, contract.M_ACCURACY: 0.9})
    p = progress.progress_from_metrics_text(text)
    assert p == {"step": 250, "totalSteps": 1000, "percent": 25.0, "samplesPerSecond": 1234.5,
                 "etaSeconds": 75.0, "loss": 0.42, "flopsPerSecond": 2.5e9, "epoch": 2, "accuracy": 0.9}
    run = progress.run_progress(p, world_size=4)
    assert run["samplesPerSecond"] == 4938.0 and run["flopsPerSecond"] == 1e10 and run["eta"] == "1m15s"
    assert run["step"] == 250


def test_progress_without_ratio_derives_percent_and_skips_absent_metrics():
    p = progress.progress_from_metrics_text(metrics_text(**{contract.M_STEPS: 30, contract.M_TOTAL_STEPS: 120}))
    assert p == {"step": 30, "totalSteps": 120, "percent": 25.0}
    assert progress.progress_from_metrics_text("") == {}


def test_progress_prefers_lowest_rank_and_rejects_garbage():
    text = metrics_text("1", **{contract.M_STEPS: 7}) + metrics_text("0", **{contract.M_STEPS: 9}).split("\n", 2)[2]
    assert progress.progress_from_metrics_text(text)["step"] == 9
    with pytest.raises(ValueError):
        progress.progress_from_metrics_text("leap_train_loss{rank=0 1\n")


@pytest.mark.parametrize("spec", ["garbage", {"runPolicy": "x", "workers": "many"}, None])
def test_malformed_objects_become_invalid_runs_not_crashes(spec):
    from leap_operator.validation import validate_run
    run = {"apiVersion": "leap.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": "x"}, "spec": spec}
    problems = validate_run(run)
    assert problems
    d = compute_status(run, None, [], T0, problems=problems)
    assert d.status["phase"] == "Failed" and cond(d, "Valid")["status"] == "False" and d.action == "none"
