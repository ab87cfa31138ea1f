"""Goodput on a real control plane: a built-in run restarted once, as the operator accounts for it.

A real leap-train process runs behind each pod (the pod runner stands in for the kubelet; it cannot
show image pulls, volume attach or a real node's start-up, so scheduling and start-up here are the
local process's), its checkpoints on a claim shared across attempts. After its first checkpoint,
rank 0's process is killed (SIGKILL, as an OOM kill would): the gang restarts and resumes from the
checkpoint. What a user sees afterwards is asserted: status.goodput (`kubectl get -o json`), the
operator's per-run gauges on its /metrics, and that `leap run` accounts for the same parts.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from emulator import free_port, wait_for
from leap_operator import names, render
from leap_operator.goodput import PARTS
from test_local_run import leap
from test_real_operator import create, example, pods_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CHECKPOINT_EVERY = 3000   # ~4 s of steps on this machine's CPU: room to kill between two checkpoints
STEPS_PER_EPOCH = 1000    # 64,000 synthetic samples / batch 64
EPOCHS = 6                # 6,000 steps: one checkpoint mid-run, one at the end


def _time(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _gauges(text: str, namespace: str, run: str) -> dict[str, float]:
    """The run's goodput gauges on the operator's /metrics: {"ratio": r, part: seconds}."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("namespace") != namespace or sample.labels.get("run") != run:
                continue
            if sample.name == names.OM_GOODPUT_RATIO:
                found["ratio"] = sample.value
            elif sample.name == names.OM_GOODPUT_SECONDS:
                found[sample.labels["part"]] = sample.value
    return found


def test_a_run_restarted_once_accounts_for_its_lost_work_and_restore_in_status_and_gauges(cluster, tmp_path):
    ns = cluster.namespace("goodput")
    cluster.runner.run_for_real(lambda pod: pod["metadata"]["namespace"] == ns)
    claim = cluster.checkpoint_claim(ns)
    run = example("mnist-cpu", ns, metrics={"port": free_port()}, runPolicy={"backoffLimit": 2},
                  checkpoint={"claimName": claim, "everySteps": CHECKPOINT_EVERY})
    run["spec"]["workload"].update(dataset="synthetic", samples=64 * STEPS_PER_EPOCH, epochs=EPOCHS)
    name = run["metadata"]["name"]
    latest = cluster.runner.workdir / ns / "pvc" / claim / "latest.pt"
    began = time.time()
    create(cluster, run)

    def goodput() -> dict:
        return ((cluster.run(ns, name) or {}).get("status") or {}).get("goodput") or {}

    # The operator has scraped a step past the checkpoint: those steps will be redone.
    wait_for(lambda: latest.exists(), 180, 0.1, "the first checkpoint on the claim")
    checkpointed = latest.stat().st_mtime
    first_pod = pods_of(cluster, ns, render.job_name(name, 1))[0]["metadata"]["name"]
    seen = wait_for(lambda: (lambda a: a if a and (a[0].get("steps") or 0) > CHECKPOINT_EVERY else None)(
        goodput().get("attempts")), 60, 0.05, "status.goodput with a step of attempt 1 past its checkpoint")
    assert seen[0]["steps"] < EPOCHS * STEPS_PER_EPOCH, "attempt 1 ended before it could be killed"
    os.killpg(cluster.runner.pods[(ns, first_pod)].process.pid, signal.SIGKILL)
    killed = time.time()
    wait_for(lambda: cluster.phase(ns, name) in ("Succeeded", "Failed"), 300, 0.5, "the run finished")
    finished = time.time()

    obj = cluster.kubectl.json("-n", ns, "get", "ltr", name)
    status = obj["status"]
    assert status["phase"] == "Succeeded" and status["restarts"] == 1, status
    record = status["goodput"]
    print("status.goodput:", json.dumps(record))   # for a post-mortem
    parts = {part: record[f"{part}Seconds"] for part in PARTS}   # every part known: the trainer reported
    wall = record["wallSeconds"]

    # Independent measures: the run's creation and completion timestamps (whole seconds), the test's
    # own clock around it, the trainer's summary of attempt 2, the checkpoint file's time.
    created, completed = _time(obj["metadata"]["creationTimestamp"]), _time(status["completionTime"])
    assert completed - created - 1.0 <= wall <= completed - created + 1.0, (wall, created, completed)
    assert wall <= finished - began + 1.0
    assert sum(parts.values()) == pytest.approx(wall, abs=0.01)
    assert all(0 <= value <= wall for value in parts.values()), parts
    assert record["ratio"] == pytest.approx(parts["productive"] / wall, abs=1e-4)

    second_pod = pods_of(cluster, ns, render.job_name(name, 2))[0]["metadata"]["name"]
    summary = json.loads((cluster.runner.workdir / ns / second_pod / "summary.json").read_text())
    first, second = record["attempts"]
    assert (first["attempt"], second["attempt"], second["succeeded"]) == (1, 2, True)
    assert second["resumedStep"] == summary["resumed_from_step"] == CHECKPOINT_EVERY
    assert first["steps"] > summary["resumed_from_step"]   # attempt 1 was seen past the step resumed from
    # Redone steps ran after the checkpoint was written and before the kill; they are priced at the
    # attempt's mean step time, so a little slack for steps faster than the mean.
    assert 0 < parts["lost"] <= 1.25 * (killed - checkpointed), (parts["lost"], killed - checkpointed)
    assert 0 < parts["restore"] <= summary["wall_seconds"]
    # Between attempts: from the failure's sight to attempt 2's Job (created within a second of its stamp).
    second_job = cluster.rest.ok("GET", f"/apis/batch/v1/namespaces/{ns}/jobs/{render.job_name(name, 2)}")
    assert 0 < parts["restarting"] <= _time(second_job["metadata"]["creationTimestamp"]) + 1.0 - killed
    assert parts["startup"] > 0 and parts["checkpoint"] > 0 and parts["evaluation"] > 0
    assert parts["productive"] > 0 and parts["scheduling"] > 0

    # The operator's gauges carry the same account (set on the reconcile after the status write).
    gauges = wait_for(lambda: (lambda g: g if g.get("ratio") == record["ratio"] else None)(
        _gauges(cluster.operator.metrics(), ns, name)), 30, 0.3, "the goodput gauges of the finished run")
    assert gauges == pytest.approx({"ratio": record["ratio"], **parts}), gauges

    # `leap run` accounts for the same parts (a short run without restarts: the shape, not the numbers).
    local = yaml.safe_load(yaml.safe_dump(run))
    local["metadata"] = {"name": f"{name}-local-{ns[-6:]}"}
    del local["spec"]["checkpoint"], local["spec"]["metrics"]
    local["spec"]["workload"].update(samples=64 * 100, epochs=1)
    manifest = tmp_path / "local.yaml"
    manifest.write_text(yaml.safe_dump(local))
    done = leap("run", str(manifest), "--output", "json", "--workdir", str(tmp_path / "local"), timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    local_record = json.loads(done.stdout)["goodput"]
    shape = {key for key in record if key.endswith("Seconds") or key == "ratio"} - {"stalledClosedSeconds"}
    assert {key for key in local_record if key.endswith("Seconds") or key == "ratio"} == shape
    assert shape == {"wallSeconds", "ratio", *(f"{part}Seconds" for part in PARTS)}
