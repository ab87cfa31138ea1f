"""Hangs on the real control plane: a real leap-train process that stops stepping mid-run.

The pod runner runs the trainer as a real local process; the test stops it with SIGSTOP (a
worker that hangs: it neither steps nor answers its metrics endpoint, while its pod runs) and
resumes it with SIGCONT. What a user sees is asserted: the Stalled condition, `kubectl get`'s
Reason, Events, the operator's scraped metric, and with action Restart a new attempt that resumes
from the checkpoint claim and succeeds. In the restart test the hung worker is rank 1 of two: rank 0
still answers its metrics endpoint but waits in the real gloo all-reduce, which is how a hang
travels through a collective. What the pod runner cannot show: a real kubelet's grace period on
deleting a stopped container (it sends SIGTERM, then SIGKILL after 10 s), and two real hosts.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time

import pytest

from conftest import Cluster
from emulator import free_port, wait_for
from leap_operator import names, render
from leap_operator.goodput import PARTS
from test_real_operator import condition, create, example, get_tr, pods_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NAME = "mnist-cpu"
MIN_SECONDS = 6  # the threshold's floor; 10 x a ~1 ms mean step is far less


def status(cluster: Cluster, ns: str) -> dict:
    return (cluster.run(ns, NAME) or {}).get("status") or {}


def training_run(ns: str, **spec) -> dict:
    run = example(NAME, ns, metrics={"port": free_port()}, **spec)
    # Long enough (tens of seconds here) to be stopped mid-run, after its first checkpoints.
    run["spec"]["workload"].update(dataset="synthetic", samples=200_000, epochs=4)
    return run


def stop_worker_at(cluster: Cluster, ns: str, attempt: int, step: int, index: int = 0) -> tuple[int, int, dt.datetime]:
    """SIGSTOP worker `index`'s real process group once status.progress.step >= step: (pid, step seen, when)."""
    job = render.job_name(NAME, attempt)
    seen = wait_for(lambda: (status(cluster, ns).get("progress") or {}).get("step", 0) >= step
                    and status(cluster, ns)["progress"]["step"], 240, 0.05, f"step {step} of attempt {attempt}")
    pod = next(p for p in pods_of(cluster, ns, job)
               if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == str(index))
    process = cluster.runner.pods[(ns, pod["metadata"]["name"])].process
    assert process is not None and process.poll() is None, "the trainer runs as a real process"
    os.killpg(process.pid, signal.SIGSTOP)
    return process.pid, seen, dt.datetime.now(dt.timezone.utc)


def stalled_series(cluster: Cluster, ns: str) -> list[str]:
    return [line for line in cluster.operator.metrics().splitlines()
            if line.startswith(names.OM_RUN_STALLED + "{") and f'namespace="{ns}"' in line]


def test_a_hung_worker_is_reported_stalled_and_cleared_when_it_steps_again(cluster):
    ns = cluster.namespace("stall-report")
    cluster.runner.run_for_real(lambda pod: pod["metadata"]["namespace"] == ns)
    create(cluster, training_run(ns, runPolicy={"stallDetection": {"minSeconds": MIN_SECONDS}}))
    pid, _, stopped = stop_worker_at(cluster, ns, 1, 200)
    try:
        stalled = wait_for(lambda: (lambda c: c if c.get("status") == "True" else None)(
            condition(cluster, ns, NAME, "Stalled")), 60, 0.2, "Stalled=True")
        detected = dt.datetime.now(dt.timezone.utc)
        st = status(cluster, ns)
        last = st["progress"]["step"]  # the last step the operator saw before the worker stopped
        assert stalled["reason"] == "NoProgress"
        assert f"attempt 1 took no optimizer step since step {last} at " in stalled["message"], stalled
        assert f"threshold {MIN_SECONDS}s: the floor minSeconds" in stalled["message"], stalled
        since = dt.datetime.fromisoformat(stalled["message"].split(" at ")[1].split(" ")[0].replace("Z", "+00:00"))
        assert stopped - dt.timedelta(seconds=3) <= since <= stopped + dt.timedelta(seconds=1), (since, stopped)
        assert (detected - stopped).total_seconds() >= MIN_SECONDS - 1  # not before the threshold
        print(f"stalled at step {last}: detected {(detected - stopped).total_seconds():.1f}s after SIGSTOP "
              f"(threshold {MIN_SECONDS}s)")
        assert st["phase"] == "Running" and st["reason"] == "Stalled" and st["restarts"] == 0
        row = get_tr(cluster, ns, NAME)   # the default columns say it, no -o wide needed
        assert row["PHASE"] == "Running" and row["REASON"] == "Stalled", row
        assert get_tr(cluster, ns, NAME, wide=True)["RESTARTS"] == "0"
        warnings = wait_for(lambda: [e for e in cluster.events(ns, NAME)
                                     if e["type"] == "Warning" and e["reason"] == "Stalled"], 30, message="a Warning Event")
        assert len(warnings) == 1 and f"since step {last}" in warnings[0]["message"], warnings
        series = wait_for(lambda: stalled_series(cluster, ns), 10, 0.2, "the operator's stalled gauge")
        assert len(series) == 1 and f'run="{NAME}"' in series[0], series
        assert abs(float(series[0].split()[-1]) - since.timestamp()) < 1.0, (series, since)  # since, to the second
        time.sleep(3)  # action Report: it stays so, no restart
        st = status(cluster, ns)
        assert st["phase"] == "Running" and st["attempt"] == 1 and st["reason"] == "Stalled"
    finally:
        os.killpg(pid, signal.SIGCONT)
    cleared = wait_for(lambda: (lambda c: c if c.get("status") == "False" else None)(
        condition(cluster, ns, NAME, "Stalled")), 60, 0.2, "Stalled=False")
    assert cleared["reason"] == "ProgressResumed", cleared
    assert wait_for(lambda: get_tr(cluster, ns, NAME, wide=True)["REASON"] != "Stalled", 10, 0.2,
                    "the Reason back") and cluster.phase(ns, NAME) in ("Running", "Succeeded")
    wait_for(lambda: [e for e in cluster.events(ns, NAME) if e["type"] == "Normal" and e["reason"] == "ProgressResumed"],
             30, message="a Normal Event")
    wait_for(lambda: not stalled_series(cluster, ns), 10, 0.2, "the gauge's series gone")
    wait_for(lambda: cluster.phase(ns, NAME) == "Succeeded", 240, 0.5, "Succeeded")
    st = status(cluster, ns)
    assert st["attempt"] == 1 and st["restarts"] == 0


def test_a_worker_hung_in_a_collective_with_action_restart_resumes_from_its_checkpoint_and_succeeds(cluster):
    ns = cluster.namespace("stall-restart")
    cluster.runner.run_for_real(lambda pod: pod["metadata"]["namespace"] == ns)
    claim = cluster.checkpoint_claim(ns)
    run = training_run(ns, workers=2, checkpoint={"claimName": claim, "everySteps": 100},
                       runPolicy={"backoffLimit": 2, "stallDetection": {"action": "Restart", "minSeconds": MIN_SECONDS}})
    run["spec"]["workload"]["epochs"] = 2   # two ranks share the samples; gloo makes each step slower
    create(cluster, run)
    _, seen, stopped = stop_worker_at(cluster, ns, 1, 300, index=1)
    restarted = wait_for(lambda: status(cluster, ns).get("restarts") == 1 and status(cluster, ns), 90, 0.2,
                         "a restart")
    restarts_at = dt.datetime.now(dt.timezone.utc)
    assert restarted["attempt"] == 2 and restarted["reason"] in ("Stalled", "WorkersActive", "PodsStarting",
                                                                  "JobCreated"), restarted
    warnings = [e for e in cluster.events(ns, NAME) if e["type"] == "Warning" and e["reason"] == "Stalled"]
    assert len(warnings) == 1 and "attempt 1 failed (no optimizer step since step" in warnings[0]["message"], warnings
    assert "restart 1/2 as attempt 2" in warnings[0]["message"], warnings
    wait_for(lambda: cluster.phase(ns, NAME) == "Succeeded", 300, 0.5, "Succeeded")
    st = status(cluster, ns)
    assert st["restarts"] == 1 and st["attempt"] == 2, st
    assert condition(cluster, ns, NAME, "Stalled")["reason"] == "Restarted"
    row = get_tr(cluster, ns, NAME, wide=True)
    assert row["PHASE"] == "Succeeded" and row["ATTEMPT"] == "2" and row["RESTARTS"] == "1", row
    # The new attempt resumed from the claim's checkpoint (saved every 100 steps before the hang).
    pod = pods_of(cluster, ns, render.job_name(NAME, 2))[0]["metadata"]["name"]
    summary = json.loads((cluster.runner.workdir / ns / pod / "summary.json").read_text())
    assert summary["resumed_from_step"] >= 300 and summary["resumed_from_step"] % 100 == 0, summary
    assert summary["resumed_from_step"] < summary["steps"] and summary["world_size"] == 2, summary
    # Goodput: the hang, from the last step to the restart, is stalled time (the threshold included).
    goodput = st["goodput"]
    assert MIN_SECONDS - 1 <= goodput["stalledSeconds"] <= (restarts_at - stopped).total_seconds() + 3, goodput
    assert sum(goodput[f"{part}Seconds"] for part in PARTS) == pytest.approx(goodput["wallSeconds"], abs=0.01)
    print(f"stopped at step >= {seen}; restarted {(restarts_at - stopped).total_seconds():.1f}s after SIGSTOP; attempt 2 resumed "
          f"from step {summary['resumed_from_step']} of {summary['steps']}")
