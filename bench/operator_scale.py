"""Scale benchmark: the real operator (`leap operator`, kopf) against kmock's Kubernetes emulator.

It creates N TrainingRuns (default 1,000; shapes taken from manifests/examples: CPU, multi-node
GPU, distillation and single-host TPU) at a steady rate, plays the Job controller
(each Job goes active as soon as it exists), and once all N runs are live completes their Jobs
at the same rate. Everything is measured on the emulator's side, from the requests it answers:

- create -> children: from the answer to the run's POST to the answers to the operator's POSTs
  of its Job and its Service (the later of the two);
- Job complete -> Succeeded: from the answer to the PATCH that completes the Job to the answer
  to the operator's status PATCH that says `phase: Succeeded`;
- the operator's API requests and writes per run over its life (watches and lists shared by
  all runs are counted apart), and writes per phase change;
- the operator's peak RSS (VmHWM from /proc).

With --real it runs against the real control plane instead (bench/scale_real.py says what is
measured there, and how).

Usage: .venv/bin/python bench/operator_scale.py [--runs 1000] [--rate 20] [--json FILE] [--real]
"""

from __future__ import annotations

import argparse
import collections
import copy
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the emulator wiring is shared with the test suite
sys.path.insert(0, str(ROOT / "bench"))

from emulator import Emulator, OperatorProcess, method_of, wait_for  # noqa: E402

from leap_operator import names  # noqa: E402
from leap_trainer.devices import cpu_model  # noqa: E402

SHAPES = ["mnist-cpu", "ddp-multinode-gpu", "distillation-gpu", "keras-tpu"]
NAMESPACES = [f"bench-{i}" for i in range(10)]
DRIVER_AGENT = "Python-urllib"  # the benchmark's own requests (Emulator.request uses urllib)
WRITES = {"POST", "PATCH", "PUT", "DELETE"}
JOB_NAME = re.compile(r"^(?P<run>.+)-a(?P<attempt>\d+)$")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


class Probe:
    """Sees every request the emulator answers (on the emulator's loop) and keeps the figures."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.run_created: dict[str, float] = {}
        self.children: dict[str, dict[str, float]] = collections.defaultdict(dict)
        self.job_completed: dict[str, float] = {}
        self.succeeded: dict[str, float] = {}
        self.running: set[str] = set()
        self.phase_changes: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[str] = collections.Counter()   # per run
        self.writes: collections.Counter[str] = collections.Counter()     # per run
        self.write_kinds: collections.Counter[str] = collections.Counter()
        self.shared_requests = 0
        self.new_jobs: "collections.deque[dict]" = collections.deque()
        self.jobs_ready = threading.Event()

    def __call__(self, request, response, now: float) -> None:
        status = getattr(response, "status", 200)
        method = method_of(request)
        agent = (request.headers or {}).get("User-Agent", "")
        path = request.url.path
        data = request.data if isinstance(request.data, dict) else {}
        plural = getattr(request.resource, "plural", None)
        run = self._run_of(plural, request.name, data)
        with self.lock:
            if agent.startswith(DRIVER_AGENT):
                if status < 300 and method == "POST" and plural == names.PLURAL:
                    self.run_created[run] = now
                elif status < 300 and method == "PATCH" and plural == "jobs" and _completes(data):
                    self.job_completed.setdefault(run, now)
                return
            if run is None:
                self.shared_requests += 1
                return
            self.requests[run] += 1
            if method in WRITES:
                self.writes[run] += 1
                self.write_kinds[f"{method} {plural}{'/status' if path.endswith('/status') else ''}"] += 1
            if status >= 300:
                return
            if method == "POST" and plural in ("jobs", "services"):
                self.children[run].setdefault(plural, now)
                if plural == "jobs":
                    self.new_jobs.append(data)
                    self.jobs_ready.set()
            if method == "PATCH" and plural == names.PLURAL and path.endswith("/status"):
                phase = (data.get("status") or {}).get("phase")
                if phase:
                    self.phase_changes[run] += 1
                    if phase == "Running":
                        self.running.add(run)
                    elif phase == "Succeeded":
                        self.succeeded.setdefault(run, now)

    @staticmethod
    def _run_of(plural: str | None, name: str | None, data: dict) -> str | None:
        meta = data.get("metadata") or {}
        if plural == names.PLURAL:
            return name or meta.get("name")
        if plural == "jobs":
            match = JOB_NAME.match(name or meta.get("name") or "")
            return match["run"] if match else None
        if plural == "services":
            return name or meta.get("name")
        if plural == "events":
            return (data.get("involvedObject") or {}).get("name") if data else None
        return None


def _completes(data: dict) -> bool:
    return any(c.get("type") == "Complete" for c in (data.get("status") or {}).get("conditions") or [])


def load_shapes() -> list[dict]:
    shapes = []
    for shape in SHAPES:
        run = yaml.safe_load((ROOT / "manifests" / "examples" / f"{shape}.yaml").read_text())
        run["spec"].pop("checkpoint", None)  # no PVCs in the emulator; the shape is what matters
        shapes.append(run)
    return shapes


def workers_of(job: dict) -> int:
    return int((job.get("spec") or {}).get("completions") or 1)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class JobController(threading.Thread):
    """Marks each new Job active as soon as it exists, as the Job controller and kubelet would."""

    def __init__(self, k8s: Emulator, probe: Probe):
        super().__init__(daemon=True, name="job-controller")
        self.k8s, self.probe, self.stopped = k8s, probe, threading.Event()
        self.jobs: dict[str, dict] = {}

    def run(self) -> None:
        while not self.stopped.is_set():
            self.probe.jobs_ready.wait(0.1)
            self.probe.jobs_ready.clear()
            while self.probe.new_jobs:
                job = self.probe.new_jobs.popleft()
                meta = job["metadata"]
                self.jobs[meta["name"]] = job
                self.k8s.set_job_status(meta["namespace"], meta["name"],
                                        {"active": workers_of(job), "ready": workers_of(job)})


def paced(count: int, rate: float):
    """Yield 0..count-1 at a steady `rate` per second (catching up, never bursting ahead)."""
    start = time.monotonic()
    for i in range(count):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield i


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0, help="runs created (then completed) per second")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--real", action="store_true",
                        help="target the real control plane (tests/controlplane.py) instead of the emulator")
    args = parser.parse_args(argv)
    if args.real:
        import scale_real
        figures = scale_real.run_real(args, paced, peak_rss_mb)
        print(scale_real.report(figures))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
        return 0

    shapes = load_shapes()
    probe = Probe()
    tmp = Path(tempfile.mkdtemp(prefix="leap-scale-"))
    with Emulator() as k8s:
        for ns in NAMESPACES:
            k8s.create_namespace(ns)
        k8s.kmock.observer = probe
        # Cluster-wide, like a default install; progress scrapes at the default interval.
        operator = OperatorProcess(k8s, tmp, [], "--progress-interval", "5", verbose=bool(os.environ.get("LEAP_BENCH_VERBOSE")))
        with operator:
            operator.wait_ready()
            controller = JobController(k8s, probe)
            controller.start()
            started = time.monotonic()

            # 1. Create the runs at a steady rate; each Job goes active when it appears.
            runs: list[tuple[str, str]] = []
            for i in paced(args.runs, args.rate):
                run = copy.deepcopy(shapes[i % len(shapes)])
                name = f"{run['metadata']['name']}-{i:04d}"
                ns = NAMESPACES[i % len(NAMESPACES)]
                run["metadata"] = {"name": name, "namespace": ns}
                k8s.create_run(run)
                runs.append((ns, name))
            wait_for(lambda: len(probe.running) >= args.runs, args.timeout, 0.2,
                     f"all {args.runs} runs Running")
            live_rss = peak_rss_mb(operator.proc.pid)

            # 2. At N live runs, complete their Jobs at the same rate.
            for i in paced(args.runs, args.rate):
                ns, name = runs[i]
                job = controller.jobs[f"{name}-a1"]
                k8s.set_job_status(ns, f"{name}-a1", {
                    "active": 0, "ready": 0, "succeeded": workers_of(job),
                    "conditions": [{"type": "Complete", "status": "True", "reason": "CompletionsReached"}]})
            wait_for(lambda: len(probe.succeeded) >= args.runs, args.timeout, 0.2, f"all {args.runs} runs Succeeded")
            time.sleep(2.0)  # let trailing Events and writes land before counting
            elapsed = time.monotonic() - started
            rss = peak_rss_mb(operator.proc.pid)
            metrics = operator.metrics()
            controller.stopped.set()
        k8s.kmock.observer = None

    figures = summarise(probe, [name for _, name in runs], rss, live_rss, elapsed, args, metrics)
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def summarise(probe: Probe, runs: list[str], rss: float, live_rss: float, elapsed: float,
              args: argparse.Namespace, metrics: str) -> dict:
    create_ms = [1000 * (max(probe.children[r].values()) - probe.run_created[r]) for r in runs
                 if len(probe.children[r]) == 2 and r in probe.run_created]
    last = runs[-max(1, len(runs) // 10):]  # the last tenth: created with ~N live runs
    create_last_ms = [1000 * (max(probe.children[r].values()) - probe.run_created[r]) for r in last
                      if len(probe.children[r]) == 2 and r in probe.run_created]
    done_ms = [1000 * (probe.succeeded[r] - probe.job_completed[r]) for r in runs
               if r in probe.succeeded and r in probe.job_completed]
    writes = [probe.writes[r] for r in runs]
    changes = [probe.phase_changes[r] for r in runs]
    per_change = [w / c for w, c in zip(writes, changes) if c]
    errors = sum(float(v) for v in re.findall(r'^leap_operator_reconciles_total\{result="error"\} (\S+)$',
                                              metrics, re.M))
    return {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "runs": len(runs), "rate_per_second": args.rate, "wall_seconds": round(elapsed, 1),
        "create_to_children_ms": {"p50": round(percentile(create_ms, 50), 1), "p99": round(percentile(create_ms, 99), 1),
                                  "max": round(max(create_ms), 1), "n": len(create_ms)},
        "create_to_children_last_tenth_ms": {"p50": round(percentile(create_last_ms, 50), 1),
                                             "p99": round(percentile(create_last_ms, 99), 1)},
        "complete_to_succeeded_ms": {"p50": round(percentile(done_ms, 50), 1), "p99": round(percentile(done_ms, 99), 1),
                                     "max": round(max(done_ms), 1), "n": len(done_ms)},
        "requests_per_run": round(statistics.mean(probe.requests[r] for r in runs), 2),
        "shared_requests": probe.shared_requests,
        "writes_per_run": round(statistics.mean(writes), 2),
        "phase_changes_per_run": round(statistics.mean(changes), 2),
        "writes_per_phase_change": {"mean": round(statistics.mean(per_change), 2), "max": round(max(per_change), 2)},
        "writes_by_kind_per_run": {k: round(v / len(runs), 2) for k, v in sorted(probe.write_kinds.items())},
        "peak_rss_mb": round(rss, 1), "peak_rss_mb_at_all_live": round(live_rss, 1),
        "reconcile_errors": errors,
    }


def report(f: dict) -> str:
    c, cl, d = f["create_to_children_ms"], f["create_to_children_last_tenth_ms"], f["complete_to_succeeded_ms"]
    wpc = f["writes_per_phase_change"]
    rows = [
        ("create -> Job and Service, p50 / p99 (ms)", f"{c['p50']} / {c['p99']}", "p99 <= 100"),
        ("  the last tenth, at ~N live runs, p50 / p99 (ms)", f"{cl['p50']} / {cl['p99']}", "p99 <= 100"),
        ("Job complete -> Succeeded, p50 / p99 (ms)", f"{d['p50']} / {d['p99']}", ""),
        ("operator API requests per run (+ shared watches/lists)", f"{f['requests_per_run']} (+{f['shared_requests']})", ""),
        ("operator writes per run / phase changes per run", f"{f['writes_per_run']} / {f['phase_changes_per_run']}", ""),
        ("writes per phase change, mean / max", f"{wpc['mean']} / {wpc['max']}", "<= 3"),
        ("operator peak RSS (MB)", f"{f['peak_rss_mb']}", "<= 200"),
        ("reconcile errors", f"{f['reconcile_errors']:g}", "0"),
    ]
    lines = [f"{f['runs']} runs at {f['rate_per_second']:g}/s on {f['machine']}, {f['wall_seconds']} s", "",
             "| Figure | Measured | Target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {t} |" for a, b, t in rows]
    lines += ["", "Writes per run by kind: " + ", ".join(f"{k} {v}" for k, v in f["writes_by_kind_per_run"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    gc.set_threshold(50_000, 20, 100)  # the emulator's own collections would add to the latencies
    sys.exit(main())
