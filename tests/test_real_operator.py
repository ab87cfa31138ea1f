"""End to end on a real control plane: the operator as its ServiceAccount, the real Job controller,
scheduler and garbage collector, and the pod runner standing in for the kubelet.

What a user would see is asserted: `kubectl get trainingruns` columns, phases, conditions, Events, and
objects present or gone. What the pod runner cannot show (images, volumes, real hosts and their
network, container restarts) is listed in tests/podrunner.py.
"""

from __future__ import annotations

import copy
import re
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import Cluster
from emulator import OperatorProcess, free_port, wait_for
from leap_operator import names, render
from leap_operator.status import get_condition

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EXAMPLES = Path(__file__).resolve().parents[1] / "manifests" / "examples"
RUNS = f"/apis/{names.API_VERSION}/namespaces/{{ns}}/{names.PLURAL}"


def example(name: str, namespace: str, **spec) -> dict:
    run = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    run["metadata"]["namespace"] = namespace
    for key, value in spec.items():
        run["spec"][key] = copy.deepcopy(value)
    return run


def create(cluster: Cluster, run: dict) -> dict:
    return cluster.rest.ok("POST", RUNS.format(ns=run["metadata"]["namespace"]), run)


def get_tr(cluster: Cluster, ns: str, name: str, wide: bool = False) -> dict[str, str]:
    """`kubectl get trainingrun NAME` as a user reads it: column header -> cell."""
    out = cluster.kubectl("-n", ns, "get", "trainingrun", name, *(["-o", "wide"] if wide else [])).stdout
    header, row = out.splitlines()[:2]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    cells = [row[a:b].strip() for a, b in zip(starts, starts[1:] + [len(row) + 1])]
    return dict(zip(header.split(), cells))


def condition(cluster: Cluster, ns: str, name: str, type_: str) -> dict:
    return get_condition(((cluster.run(ns, name) or {}).get("status") or {}).get("conditions"), type_) or {}


def jobs(cluster: Cluster, ns: str) -> list[dict]:
    return cluster.rest.ok("GET", f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]


def pods_of(cluster: Cluster, ns: str, job: str) -> list[dict]:
    return cluster.pods(ns, f"job-name={job}")


def running_pods(cluster: Cluster, ns: str, job: str, count: int) -> list[dict]:
    return wait_for(lambda: (lambda ps: ps if len(ps) == count and all(
        p["status"].get("phase") == "Running" for p in ps) else None)(pods_of(cluster, ns, job)),
        90, message=f"{count} running pods of {job}")


def _number(cell: str) -> float:
    try:
        return float(cell)
    except ValueError:  # empty or <none>: not reported yet
        return 0.0


class PhaseRecorder:
    """Every phase the run shows, in order, polled as `kubectl get -w` would show them."""

    def __init__(self, cluster: Cluster, ns: str, name: str):
        self.cluster, self.ns, self.name = cluster, ns, name
        self.phases: list[str] = []
        self.rows: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            run = self.cluster.run(self.ns, self.name) or {}
            phase = (run.get("status") or {}).get("phase")
            if phase and (not self.phases or self.phases[-1] != phase):
                self.phases.append(phase)
            time.sleep(0.1)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join()
        last = (self.cluster.run(self.ns, self.name) or {}).get("status", {}).get("phase")
        if last and (not self.phases or self.phases[-1] != last):  # a change since the last poll
            self.phases.append(last)
        return self.phases


def test_cpu_run_trains_for_real_and_kubectl_get_shows_its_progress(cluster):
    """A real leap-train process behind the pod: the operator scrapes its /metrics at the pod IP."""
    ns = cluster.namespace("cpu-run", labels={"pod-security.kubernetes.io/enforce": "restricted"})
    cluster.runner.run_for_real(lambda pod: pod["metadata"]["namespace"] == ns)
    run = example("mnist-cpu", ns, metrics={"port": free_port()})
    # Long enough (several seconds) for the operator's scrapes to see it mid-way.
    run["spec"]["workload"].update(dataset="synthetic", samples=200_000, epochs=3)
    recorder = PhaseRecorder(cluster, ns, "mnist-cpu")
    create(cluster, run)
    try:
        seen = wait_for(lambda: (lambda row: row if _number(row["PROGRESS"]) and _number(row["THROUGHPUT"]) else None)(
            get_tr(cluster, ns, "mnist-cpu")), 180, 0.3, "PROGRESS and THROUGHPUT above 0 while Running")
        assert seen["PHASE"] == "Running" and seen["FRAMEWORK"] == "pytorch" and seen["ACCELERATOR"] == "cpu"
        assert seen["WORKERS"] == "1" and 0 < float(seen["PROGRESS"]) <= 100 and float(seen["THROUGHPUT"]) > 0
        assert seen["ETA"], seen
        wait_for(lambda: cluster.phase(ns, "mnist-cpu") == "Succeeded", 240, 0.5, "Succeeded")
    finally:
        phases = recorder.stop()
    # Pending may pass unseen: its status is written with the Job in hand, and the pod can be
    # running by then. Nothing else may appear, nor in another order.
    assert phases in (["Pending", "Running", "Succeeded"], ["Running", "Succeeded"]), phases
    final = get_tr(cluster, ns, "mnist-cpu", wide=True)
    assert final["PHASE"] == "Succeeded" and final["ATTEMPT"] == "1" and final["RESTARTS"] == "0"
    assert float(final["FLOPS"]) > 0
    pod = pods_of(cluster, ns, render.job_name("mnist-cpu", 1))[0]
    assert pod["spec"]["nodeName"] == "cpu-0"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    reasons = [e["reason"] for e in cluster.events(ns, "mnist-cpu")]
    assert "JobCompleted" in reasons, reasons


def test_gpu_run_is_scheduled_onto_the_gpu_node(cluster):
    ns = cluster.namespace("gpu-run")
    create(cluster, example("mnist-gpu", ns))
    job = render.job_name("mnist-gpu", 1)
    pod = running_pods(cluster, ns, job, 1)[0]
    assert pod["spec"]["nodeName"] == "gpu-0"
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    wait_for(lambda: get_tr(cluster, ns, "mnist-gpu")["PHASE"] == "Running", 60, message="Running")
    cluster.runner.finish(ns, pod["metadata"]["name"], 0)
    wait_for(lambda: cluster.phase(ns, "mnist-gpu") == "Succeeded", 60, message="Succeeded")


def test_multi_host_tpu_run_puts_one_pod_on_each_host_of_the_slice(cluster):
    """A user's own program (PyTorch/XLA or JAX) on a v5e 4x4 slice: four hosts, one pod each."""
    ns = cluster.namespace("tpu-run")
    run = {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": "xla-4x4", "namespace": ns},
           "spec": {"framework": "pytorch", "image": "registry.example/team/xla-train:1",
                    "command": ["python", "train.py"],
                    "accelerator": {"type": "google-tpu", "tpu": {"type": "tpu-v5-lite-podslice", "topology": "4x4"}}}}
    create(cluster, run)
    pods = running_pods(cluster, ns, render.job_name("xla-4x4", 1), 4)
    hosts = sorted(p["spec"]["nodeName"] for p in pods)
    pool = hosts[0].rsplit("-", 1)[0]  # tpu-v5e-a, or another slice a test added before this one
    assert hosts == [f"{pool}-{i}" for i in range(4)], hosts
    for pod in pods:  # done: the slice is free for the next test
        cluster.runner.finish(ns, pod["metadata"]["name"], 0)
    wait_for(lambda: cluster.phase(ns, "xla-4x4") == "Succeeded", 60, message="Succeeded")


def test_run_whose_gpu_product_matches_no_node_stays_pending_and_says_why(cluster):
    ns = cluster.namespace("no-node")
    run = example("mnist-gpu", ns)
    run["spec"]["accelerator"]["product"] = "NVIDIA-B200"
    create(cluster, run)
    cond = wait_for(lambda: (lambda c: c if c.get("reason") == "Unschedulable" else None)(
        condition(cluster, ns, "mnist-gpu", "Scheduled")), 60, message="Scheduled=False Unschedulable")
    assert cond["status"] == "False"
    assert "node(s) didn't match Pod's node affinity/selector" in cond["message"], cond
    row = get_tr(cluster, ns, "mnist-gpu", wide=True)
    assert row["PHASE"] == "Pending" and row["REASON"] == "Unschedulable", row
    time.sleep(2)  # and it stays so: not Running, not failed
    assert cluster.phase(ns, "mnist-gpu") == "Pending"
    assert not (cluster.run(ns, "mnist-gpu")["status"].get("startTime"))


def test_pod_failure_restarts_the_gang_then_the_run_succeeds(cluster):
    ns = cluster.namespace("restart")
    run = example("ddp-cpu", ns, workers=2, runPolicy={"backoffLimit": 2})
    create(cluster, run)
    name = run["metadata"]["name"]
    first = running_pods(cluster, ns, render.job_name(name, 1), 2)
    wait_for(lambda: cluster.phase(ns, name) == "Running", 60, message="Running")
    cluster.runner.finish(ns, first[1]["metadata"]["name"], 1)
    second = running_pods(cluster, ns, render.job_name(name, 2), 2)
    row = get_tr(cluster, ns, name, wide=True)
    assert row["ATTEMPT"] == "2" and row["RESTARTS"] == "1", row
    assert not any(j["metadata"]["name"] == render.job_name(name, 1) and not j["metadata"].get("deletionTimestamp")
                   for j in jobs(cluster, ns))
    warnings = [e for e in cluster.events(ns, name) if e["type"] == "Warning"]
    assert any("attempt 1 failed" in e["message"] for e in warnings), warnings
    for pod in second:
        cluster.runner.finish(ns, pod["metadata"]["name"], 0)
    wait_for(lambda: cluster.phase(ns, name) == "Succeeded", 60, message="Succeeded")
    assert get_tr(cluster, ns, name, wide=True)["RESTARTS"] == "1"


def _children(cluster: Cluster, ns: str, name: str) -> dict:
    return {"jobs": [j["metadata"]["name"] for j in jobs(cluster, ns)],
            "pods": [p["metadata"]["name"] for p in cluster.pods(ns)],
            "service": cluster.rest.get(f"/api/v1/namespaces/{ns}/services/{render.service_name(name)}") is not None}


def test_deleting_a_run_removes_its_children(cluster):
    ns = cluster.namespace("delete")
    create(cluster, example("ddp-cpu", ns, workers=2))
    running_pods(cluster, ns, render.job_name("ddp-cpu", 1), 2)
    cluster.kubectl("-n", ns, "delete", "trainingrun", "ddp-cpu", "--wait=true", "--timeout=60s")
    wait_for(lambda: _children(cluster, ns, "ddp-cpu") == {"jobs": [], "pods": [], "service": False}, 60,
             message="no Job, pod or Service left")


def test_a_run_deleted_while_no_operator_runs_is_cleaned_up_by_the_garbage_collector(cluster):
    """The children carry the run as controller owner: the real GC removes them on its own."""
    ns = cluster.namespace("gc")
    create(cluster, example("ddp-cpu", ns, workers=2))
    running_pods(cluster, ns, render.job_name("ddp-cpu", 1), 2)
    assert cluster.operator.stop() == 0
    try:
        cluster.kubectl("-n", ns, "delete", "trainingrun", "ddp-cpu", "--wait=false")
        # With the operator gone for good (uninstalled), an admin drops its finalizer.
        cluster.kubectl("-n", ns, "patch", "trainingrun", "ddp-cpu", "--type=merge",
                        "-p", '{"metadata":{"finalizers":null}}', check=False)  # gone already if it had none
        wait_for(lambda: cluster.run(ns, "ddp-cpu") is None, 30, message="the run gone")
        wait_for(lambda: _children(cluster, ns, "ddp-cpu") == {"jobs": [], "pods": [], "service": False}, 90,
                 message="the GC removed the Job, its pods and the Service")
    finally:
        old = cluster.operator
        cluster.operator = OperatorProcess(None, old.tmp, [], kubeconfig=old.kubeconfig).start().wait_ready()


def test_ttl_after_finished_deletes_the_run_and_its_children(cluster):
    ns = cluster.namespace("ttl")
    create(cluster, example("mnist-gpu", ns, runPolicy={"ttlSecondsAfterFinished": 2}))
    pod = running_pods(cluster, ns, render.job_name("mnist-gpu", 1), 1)[0]
    cluster.runner.finish(ns, pod["metadata"]["name"], 0)
    wait_for(lambda: cluster.phase(ns, "mnist-gpu") == "Succeeded", 60, message="Succeeded")
    wait_for(lambda: cluster.run(ns, "mnist-gpu") is None, 60, message="the run deleted by its TTL")
    wait_for(lambda: _children(cluster, ns, "mnist-gpu") == {"jobs": [], "pods": [], "service": False}, 60,
             message="its children gone")


def test_the_operator_watches_only_leap_pods_and_jobs_filtered_by_the_api_server(cluster):
    """Server-side label selectors (kopf settings.watching.label_selectors): the API server's
    audit log shows every list and watch of pods and Jobs by the operator carrying leap.dev/run."""
    ns = cluster.namespace("unrelated")
    for i in range(20):  # pods of someone else's: no node, no Leap label
        cluster.rest.ok("POST", f"/api/v1/namespaces/{ns}/pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"web-{i}", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": "nginx"}], "nodeSelector": {"no": "such-node"}}})
    user = "system:serviceaccount:leap-system:leap-operator"
    since = time.time()  # a fresh operator: its lists and watches are all after this
    old = cluster.operator
    old.stop()
    cluster.operator = OperatorProcess(None, old.tmp, [], kubeconfig=old.kubeconfig).start().wait_ready()
    reads = wait_for(lambda: [e for e in cluster.plane.audited(since)
                              if (e.get("user") or {}).get("username") == user and e.get("verb") in ("list", "watch")
                              and (e.get("objectRef") or {}).get("resource") in ("pods", "jobs")], 30,
                     message="the operator's pod and Job watches in the audit log")
    unfiltered = [e["requestURI"] for e in reads if "labelSelector=leap.dev/run" not in e["requestURI"].replace("%2F", "/")]
    assert not unfiltered, unfiltered
