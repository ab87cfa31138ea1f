"""`bench/operator_scale.py --real`: the same scale run against the real control plane.

Real here: kube-apiserver (with etcd), the Job controller, the scheduler and the garbage
collector (tests/controlplane.py), Leap installed from manifests/install.yaml, the operator as
its ServiceAccount. The pod runner (tests/podrunner.py) stands in for the kubelet on one big
CPU node; every run is the `mnist-cpu` shape (one pod), so the scheduler is never the limit.

Measured from outside the operator:
- create -> Job and Service: from the return of the run's POST to the later of the Job's and
  the Service's ADDED events on this process's own watches;
- pods finished -> Succeeded: from the pod runner's report of the last worker's exit to the
  run's `phase: Succeeded` on the watch (this includes the real Job controller's own work);
- the operator's requests and writes per run and per phase change: from the API server's audit
  log (every request of the operator's ServiceAccount, by verb and resource);
- the operator's peak RSS.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import yaml

from controlplane import ControlPlane, Rest
from conftest import TEST_NAMESPACE_LABEL, Kubectl, purge_test_namespaces
from emulator import OperatorProcess, wait_for
from podrunner import PodRunner, node

from leap_operator import names
from leap_trainer.devices import cpu_model

ROOT = Path(__file__).resolve().parents[1]
NAMESPACES = [f"scale-{i}" for i in range(5)]
OPERATOR_USER = "system:serviceaccount:leap-system:leap-operator"
WRITES = {"create", "update", "patch", "delete", "deletecollection"}


class Watcher:
    """Watches Jobs, Services and TrainingRuns of the benchmark's namespaces; stamps first sightings."""

    def __init__(self, rest: Rest):
        self.rest = rest
        self.seen: dict[tuple[str, str], float] = {}          # (kind, run) -> first ADDED
        self.succeeded: dict[str, float] = {}
        self.phase_changes: collections.Counter = collections.Counter()
        self._phases: dict[str, str] = {}
        self.stopped = threading.Event()

    def start(self) -> "Watcher":
        for path, kind in (("/apis/batch/v1/jobs", "job"), ("/api/v1/services", "service"),
                           (f"/apis/{names.API_VERSION}/{names.PLURAL}", "run")):
            threading.Thread(target=self._watch, args=(path, kind), daemon=True).start()
        return self

    def _watch(self, path: str, kind: str) -> None:
        version = self.rest.ok("GET", path + "?limit=1")["metadata"]["resourceVersion"]
        while not self.stopped.is_set():
            try:
                for type_, obj in self.rest.watch(path, version, timeout=60):
                    now = time.time()
                    meta = obj.get("metadata") or {}
                    version = meta.get("resourceVersion") or version
                    if meta.get("namespace") not in NAMESPACES:
                        continue
                    run = (meta.get("labels") or {}).get(names.LABEL_RUN) if kind != "run" else meta.get("name")
                    if type_ == "ADDED" and kind != "run":
                        self.seen.setdefault((kind, run), now)
                    if kind == "run":
                        phase = (obj.get("status") or {}).get("phase")
                        if phase and self._phases.get(run) != phase:
                            self._phases[run] = phase
                            self.phase_changes[run] += 1
                            if phase == "Succeeded":
                                self.succeeded.setdefault(run, now)
            except Exception:
                if self.stopped.is_set():
                    return
                time.sleep(0.2)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def run_real(args, paced, peak_rss_mb) -> dict:
    plane = ControlPlane().up()
    rest, kubectl = plane.rest(), Kubectl(plane.kubeconfig)
    tmp = Path(tempfile.mkdtemp(prefix="leap-scale-real-"))
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "manifests" / "install.yaml"))
    kubectl("wait", "--for=condition=Established", "crd/trainingruns.leap.dev", "--timeout=60s")
    kubectl("-n", "leap-system", "scale", "deployment/leap-operator", "--replicas=0")
    purge_test_namespaces(rest)
    wait_for(lambda: not any(rest.get(f"/api/v1/namespaces/{ns}") for ns in NAMESPACES), 300, 1.0,
             "the namespaces of an earlier run gone")
    for ns in NAMESPACES:
        rest.ok("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                               "metadata": {"name": ns, "labels": {TEST_NAMESPACE_LABEL: "true"}}})
    wait_for(lambda: all(rest.get(f"/api/v1/namespaces/{ns}/serviceaccounts/default") for ns in NAMESPACES), 60)
    big = node("scale-cpu", cpu="100000", memory="100Ti")
    big["status"]["capacity"]["pods"] = big["status"]["allocatable"]["pods"] = str(args.runs + 100)
    runner = PodRunner(rest, tmp / "pods", nodes=[big]).start()
    shape = yaml.safe_load((ROOT / "manifests" / "examples" / "mnist-cpu.yaml").read_text())
    token = kubectl("-n", "leap-system", "create", "token", "leap-operator", "--duration=4h").stdout.strip()
    sa_kubeconfig = plane.write_kubeconfig(tmp / "operator.kubeconfig", token=token, user=OPERATOR_USER)
    watcher = Watcher(rest).start()
    created: dict[str, float] = {}
    finished: dict[str, float] = {}
    operator = OperatorProcess(None, tmp, [], "--progress-interval", "5", kubeconfig=sa_kubeconfig,
                               verbose=bool(os.environ.get("LEAP_BENCH_VERBOSE")))
    with operator:
        operator.wait_ready()
        since = time.time()
        started = time.monotonic()
        runs: list[tuple[str, str]] = []
        for i in paced(args.runs, args.rate):
            run = copy.deepcopy(shape)
            name, ns = f"scale-{i:05d}", NAMESPACES[i % len(NAMESPACES)]
            run["metadata"] = {"name": name, "namespace": ns}
            rest.ok("POST", f"/apis/{names.API_VERSION}/namespaces/{ns}/{names.PLURAL}", run)
            created[name] = time.time()
            runs.append((ns, name))
        wait_for(lambda: sum(1 for _, n in runs if watcher._phases.get(n) == "Running") >= args.runs,
                 args.timeout, 0.5, f"all {args.runs} runs Running")
        live_rss = peak_rss_mb(operator.proc.pid)
        for i in paced(args.runs, args.rate):
            ns, name = runs[i]
            for (pod_ns, pod_name), record in list(runner.pods.items()):
                if pod_ns == ns and pod_name.startswith(f"{name}-a1-"):
                    runner.finish(ns, pod_name, 0)
            finished[name] = time.time()
        wait_for(lambda: len([n for _, n in runs if n in watcher.succeeded]) >= args.runs, args.timeout, 0.5,
                 f"all {args.runs} runs Succeeded")
        time.sleep(3.0)  # the audit log is flushed in 1 s batches
        elapsed = time.monotonic() - started
        rss = peak_rss_mb(operator.proc.pid)
    watcher.stopped.set()
    runner.stop()
    audit = [e for e in plane.audited(since) if (e.get("user") or {}).get("username") == OPERATOR_USER]

    per_run_requests: collections.Counter = collections.Counter()
    per_run_writes: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    shared = events_created = 0
    run_names = {name for _, name in runs}
    for event in audit:
        ref = event.get("objectRef") or {}
        if ref.get("resource") == "events" and event.get("verb") == "create":
            events_created += 1  # POSTed to the collection: the audit line names no object; one per transition
            continue
        name = ref.get("name") or ""
        run = next((r for r in (name, name.rsplit("-a", 1)[0], name.split(".")[0]) if r in run_names), None)
        if run is None:
            shared += 1  # watches, lists, discovery: shared by all runs
            continue
        per_run_requests[run] += 1
        if event.get("verb") in WRITES:
            per_run_writes[run] += 1
            kinds[f"{event['verb']} {ref.get('resource')}{'/' + ref['subresource'] if ref.get('subresource') else ''}"] += 1
    names_ = [n for _, n in runs]
    for n in names_:  # Events are spread evenly: the operator posts one per phase change of each run
        per_run_writes[n] += events_created / len(names_)
        per_run_requests[n] += events_created / len(names_)
    kinds["create events"] = events_created
    create_ms = [1000 * (max(watcher.seen[("job", n)], watcher.seen[("service", n)]) - created[n]) for n in names_
                 if ("job", n) in watcher.seen and ("service", n) in watcher.seen]
    done_ms = [1000 * (watcher.succeeded[n] - finished[n]) for n in names_ if n in watcher.succeeded and n in finished]
    changes = [watcher.phase_changes[n] for n in names_]
    per_change = [per_run_writes[n] / c for n, c in zip(names_, changes) if c]
    purge_test_namespaces(rest)
    return {
        "target": "real control plane (kube-apiserver, Job controller, scheduler; pod runner for the kubelet)",
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "runs": len(runs), "rate_per_second": args.rate, "wall_seconds": round(elapsed, 1),
        "create_to_children_ms": {"p50": round(percentile(create_ms, 50), 1), "p99": round(percentile(create_ms, 99), 1),
                                  "max": round(max(create_ms), 1), "n": len(create_ms)},
        "pods_finished_to_succeeded_ms": {"p50": round(percentile(done_ms, 50), 1),
                                          "p99": round(percentile(done_ms, 99), 1), "n": len(done_ms)},
        "requests_per_run": round(statistics.mean(per_run_requests[n] for n in names_), 2),
        "shared_requests": shared,
        "writes_per_run": round(statistics.mean(per_run_writes[n] for n in names_), 2),
        "phase_changes_per_run": round(statistics.mean(changes), 2),
        "writes_per_phase_change": {"mean": round(statistics.mean(per_change), 2), "max": round(max(per_change), 2)},
        "writes_by_kind_per_run": {k: round(v / len(runs), 2) for k, v in sorted(kinds.items())},
        "peak_rss_mb": round(rss, 1), "peak_rss_mb_at_all_live": round(live_rss, 1),
    }


def report(f: dict) -> str:
    c, d, wpc = f["create_to_children_ms"], f["pods_finished_to_succeeded_ms"], f["writes_per_phase_change"]
    rows = [
        ("create -> Job and Service, p50 / p99 (ms)", f"{c['p50']} / {c['p99']}"),
        ("pods finished -> Succeeded, p50 / p99 (ms)", f"{d['p50']} / {d['p99']}"),
        ("operator API requests per run (+ shared)", f"{f['requests_per_run']} (+{f['shared_requests']})"),
        ("operator writes per run / phase changes per run", f"{f['writes_per_run']} / {f['phase_changes_per_run']}"),
        ("writes per phase change, mean / max", f"{wpc['mean']} / {wpc['max']}"),
        ("operator peak RSS (MB)", f"{f['peak_rss_mb']}"),
    ]
    lines = [f"{f['runs']} runs at {f['rate_per_second']:g}/s against the {f['target']}", f"on {f['machine']}, "
             f"{f['wall_seconds']} s", "", "| Figure | Measured |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    lines += ["", "Writes per run by kind (audit log): " + ", ".join(f"{k} {v}" for k, v in f["writes_by_kind_per_run"].items())]
    return "\n".join(lines)
