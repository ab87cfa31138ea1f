"""Straggler detection: each rank's own compute time, its throughput, and the alert on it.

In synchronous DDP every rank waits for the slowest in the gradient all-reduce, so samples/s are
equal on every rank and a straggler is invisible in them. leap-train exports
leap_train_compute_seconds_total: step time minus the time the rank waited in the all-reduce
(leap_trainer/collective_wait.py); the alert LeapTrainingStragglerRank compares each rank's
samples / compute seconds with the run's median rank.

Unit level: leap_trainer.torch_train.fit on real gloo process groups, in child processes, where
one rank does extra work of a known length (a sleep in its loss) and the other ranks must wait
for it. Real level: a real 3-rank leap-train run (gloo, CPU) with one rank slowed from outside
(SIGSTOP/SIGCONT on a duty cycle), scraped by the real Prometheus. promtool: the alert's cases in
manifests/monitoring/leap-alerts.test.yaml, which fail when the alert is broken.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from leap_trainer import contract

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prometheus_server import PrometheusServer, free_port  # noqa: E402
from test_monitoring import RULES, alerts, load_generator  # noqa: E402

pytestmark = pytest.mark.slow

# One rank of a DDP (or plain, world size 1 without --ddp) run of fit() with metrics, as a child
# process: the rank sleeps `sleep` seconds per step inside its loss (its own work, before
# backward), and prints the metrics' step time sum and compute seconds as JSON.
WORKER = r"""
import json, os, sys, time
import torch, torch.distributed as dist
from leap_trainer.data import load_dataset
from leap_trainer.metrics import TrainingMetrics
from leap_trainer.torch_models import build_mlp
from leap_trainer.torch_train import DeviceData, cross_entropy, fit, make_optimizer

rank, world, sleep, ddp = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "ddp"
torch.set_num_threads(1)
torch.manual_seed(0)
if ddp:
    dist.init_process_group("gloo", rank=rank, world_size=world)
model = build_mlp("mlp")
optimizer = make_optimizer(model, 1e-3)
if ddp:
    model = torch.nn.parallel.DistributedDataParallel(model)
data = DeviceData.from_dataset(load_dataset("synthetic", samples=6400, seed=0), torch.device("cpu"))
metrics = TrainingMetrics(run="t", namespace="t", rank=rank, framework="pytorch", accelerator="cpu", port=None,
                          flops_per_sample=1.0, peak_flops=None, total_steps=10**6)

def loss_fn(logits, targets, indices):
    if sleep:
        time.sleep(sleep)
    return cross_entropy(logits, targets, indices)

started = time.perf_counter()
fit(model, optimizer, None, data, batch_size=64, epochs=2, rank=rank, world_size=world, metrics=metrics,
    loss_fn=loss_fn, report_seconds=0.2)
wall = time.perf_counter() - started
if ddp:
    dist.destroy_process_group()
print(json.dumps({"steps": metrics.steps, "step_seconds": metrics._step_seconds_sum,
                  "compute_seconds": metrics.compute_seconds, "wall": wall}))
"""


def run_ranks(world: int, sleeps: dict[int, float], *, ddp: bool = True) -> list[dict]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(rank), str(world), str(sleeps.get(rank, 0.0)),
                               "ddp" if ddp else "plain"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(world)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


def test_single_process_compute_time_is_its_step_time():
    """No other rank to wait for: compute seconds are the step times, with DDP's hook in the path
    (a world of one, whose all-reduce returns at once) and without DDP (nothing subtracted)."""
    (plain,) = run_ranks(1, {}, ddp=False)
    assert plain["steps"] == 2 * 6400 // 64
    assert plain["compute_seconds"] == pytest.approx(plain["step_seconds"], rel=1e-9)
    (alone,) = run_ranks(1, {}, ddp=True)
    assert alone["steps"] == 2 * 6400 // 64
    # The hook ran: a world of one still goes through gloo's all-reduce, whose own latency (a hand-off
    # to gloo's thread and back, 0.1-0.3 ms here) is all it subtracts; nobody is waited for.
    waited = alone["step_seconds"] - alone["compute_seconds"]
    assert 0 < waited < 0.001 * alone["steps"], waited
    assert alone["compute_seconds"] <= alone["wall"]


def test_the_rank_that_works_longer_has_the_compute_time_and_the_others_the_wait():
    """Rank 1 sleeps 20 ms a step in its own loss: every rank's steps take as long (the all-reduce
    waits for rank 1), but only rank 1's compute time carries the 20 ms; rank 0 waited them."""
    sleep = 0.02
    fast, slow = run_ranks(2, {1: sleep})
    steps = fast["steps"]
    assert steps == slow["steps"] == 2 * (6400 // 2) // 64
    extra = steps * sleep   # the slow rank's extra work: the independent measure
    # Step times are equal: samples/s cannot tell the ranks apart.
    assert fast["step_seconds"] == pytest.approx(slow["step_seconds"], rel=0.1)
    # Both ranks wait for the transfer itself; the fast rank also waits out the slow rank's extra work.
    waited = {name: r["step_seconds"] - r["compute_seconds"] for name, r in (("fast", fast), ("slow", slow))}
    assert 0.85 * extra <= waited["fast"] - waited["slow"] <= 1.2 * extra, (waited, extra)
    # The slow rank's compute time carries its extra work, the fast rank's does not.
    assert 0.85 * extra <= slow["compute_seconds"] - fast["compute_seconds"] <= 1.2 * extra
    assert fast["compute_seconds"] < 0.5 * extra
    for rank in (fast, slow):
        assert 0 < rank["compute_seconds"] <= rank["step_seconds"] <= rank["wall"]


# --- the alert's promtool cases are not vacuous ------------------------------------------------------

PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: `make system-deps` installs it")
@pytest.mark.parametrize("broken, replacement, why", [
    ("< 0.8\n", "< 0.4\n", "a looser threshold (0.4x) misses the straggler at 0.45x"),
    ("\n        / sum by (namespace, run, rank) (rate(leap_train_compute_seconds_total[5m]))", "",
     "samples/s alone cannot see a straggler in a synchronous run"),
    ("\n      and on (namespace, run, rank)\n      sum by (namespace, run, rank) (leap_train_samples_total offset 10m)",
     "", "without 10 minutes of history, a slow warm-up fires"),
], ids=["threshold", "no-compute-seconds", "no-history"])
def test_promtool_cases_catch_a_broken_straggler_alert(tmp_path, broken, replacement, why):
    rules = RULES.read_text()
    assert broken in rules, broken
    (tmp_path / RULES.name).write_text(rules.replace(broken, replacement))
    shutil.copy(RULES.with_name("leap-alerts.test.yaml"), tmp_path / "leap-alerts.test.yaml")
    out = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "leap-alerts.test.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0, why
    assert "LeapTrainingStragglerRank" in out.stdout + out.stderr, out.stdout


# --- the real thing: a 3-rank leap-train run, one rank slowed from outside, the real Prometheus -----

needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None,
                                      reason="prometheus missing: `make system-deps` installs it")
RUN, NAMESPACE, WORLD, SLOWED = "straggler", "ml-team", 3, 2
STOP_SECONDS, RUN_SECONDS = 0.06, 0.04   # the slowed rank is stopped 60% of the time
SLOWED_FOR = 30                          # seconds of slowed training before the instant queried


class DutyCycle(threading.Thread):
    """SIGSTOP/SIGCONT a process on a duty cycle: a rank slowed from outside (as a throttled CPU, a
    shared device, a noisy neighbour would), without changing its program. Counts the stopped time."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stopped_seconds = pid, 0.0
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                os.kill(self.pid, signal.SIGSTOP)
                began = time.perf_counter()
                time.sleep(STOP_SECONDS)
                os.kill(self.pid, signal.SIGCONT)
                self.stopped_seconds += time.perf_counter() - began
                time.sleep(RUN_SECONDS)
        except ProcessLookupError:
            pass
        finally:
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


@dataclass
class Slowed:
    prom: object
    at: float                      # the instant queried, while the run was live and slowed
    started: float                 # wall clock when leap-train was started
    stopped_seconds: float         # the slowed rank's stopped time up to `at`
    log: str = ""
    ranks: list[str] = field(default_factory=lambda: [str(r) for r in range(WORLD)])


def child_pids(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                pids.append(int(entry.name))
    return pids


def rank_of(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def free_ports(count: int) -> int:
    """A port p with p + 1 .. p + count - 1 free too: local rank r serves metrics on p + r."""
    for _ in range(50):
        port = free_port()
        try:
            for offset in range(1, count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no {count} consecutive free ports")


@pytest.fixture(scope="module")
def slowed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straggler")
    port = free_ports(WORLD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAP_") and k not in
           {"RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "NNODES"}}
    env.update({contract.ENV_RUN: RUN, contract.ENV_NAMESPACE: NAMESPACE, contract.ENV_NPROC_PER_NODE: str(WORLD),
                contract.ENV_MASTER_ADDR: "127.0.0.1", contract.ENV_MASTER_PORT: str(free_port()),
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    cmd = [str(Path(sys.executable).with_name("leap-train")), "--framework", "pytorch", "--workload", "classifier",
           "--model", "mlp", "--dataset", "synthetic", "--samples", "30000", "--epochs", "200", "--batch-size", "64",
           "--metrics-port", str(port), "--summary", str(tmp / "summary.json")]
    log_path = tmp / "leap-train.log"
    log = open(log_path, "wb")
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)   # cwd: a relative PYTHONPATH holds
    cycle = None
    try:
        with PrometheusServer(targets=[f"127.0.0.1:{port + r}" for r in range(WORLD)], scrape_interval="1s",
                              rule_files=[RULES]) as prom:
            def need(expr: str, count: int = 1, timeout: float = 120) -> None:
                deadline = time.monotonic() + timeout
                while len(prom.query(expr)) < count:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"{expr!r}: fewer than {count} series; leap-train "
                                    f"({proc.poll()}):\n{log_path.read_text()[-3000:]}")
                    time.sleep(0.5)
            need(f"{contract.M_STEPS} > 0", WORLD)          # every rank is training
            pids = {rank_of(pid): pid for pid in child_pids(proc.pid)}
            assert set(pids) == set(range(WORLD)), pids
            cycle = DutyCycle(pids[SLOWED])
            cycle.start()
            time.sleep(SLOWED_FOR)
            need(f"rate({contract.M_SAMPLES}[10s]) > 0", WORLD)   # still live
            at = time.time()
            yield Slowed(prom=prom, at=at, started=started, stopped_seconds=cycle.stopped_seconds)
    finally:
        if cycle is not None:
            cycle.halt.set()
            cycle.join(timeout=5)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def per_rank(live: Slowed, expr: str) -> dict[str, float]:
    result = live.prom.query(expr, at=live.at)
    return {s["metric"]["rank"]: float(s["value"][1]) for s in result}


@needs_prometheus
def test_samples_per_second_are_equal_but_the_slowed_ranks_own_pace_is_below_the_median(slowed):
    window = "20s"
    samples = per_rank(slowed, f"rate({contract.M_SAMPLES}[{window}])")
    assert sorted(samples) == slowed.ranks
    # Synchronous DDP: every rank waits for the slowed one, so samples/s cannot tell them apart.
    assert max(samples.values()) <= 1.05 * min(samples.values()), samples
    own = per_rank(slowed, load_generator().own_pace(window))
    median = sorted(own.values())[1]
    assert own[str(SLOWED)] < 0.8 * median, own
    assert all(own[r] >= 0.8 * median for r in slowed.ranks if r != str(SLOWED)), own
    print(f"samples/s {samples}; own pace {own}")


@needs_prometheus
def test_the_alert_expression_selects_exactly_the_slowed_rank(slowed):
    """The rule's expression as generated, evaluated by the real Prometheus; only the rank's
    required history (10 minutes) is cut to this run's scale, and `for:` is promtool's to test."""
    expr = alerts()["LeapTrainingStragglerRank"]["expr"]
    assert expr.count("offset 10m") == 1
    result = slowed.prom.query(expr.replace("offset 10m", "offset 20s"), at=slowed.at)
    assert [s["metric"]["rank"] for s in result] == [str(SLOWED)], result
    assert {k: v for k, v in result[0]["metric"].items()} == {"namespace": NAMESPACE, "run": RUN,
                                                              "rank": str(SLOWED)}
    assert 0 < float(result[0]["value"][1]) < 0.8
    # Without compute seconds (samples/s alone, the fallback) nobody would be selected.
    samples_only = re.sub(r"\n\s*/ sum by \(namespace, run, rank\) \(rate\(leap_train_compute_seconds_total\[5m\]\)\)",
                          "", expr).replace("offset 10m", "offset 20s")
    assert contract.M_COMPUTE_SECONDS not in samples_only
    assert slowed.prom.query(samples_only, at=slowed.at) == []


@needs_prometheus
def test_the_dashboard_shows_the_slowed_rank_as_the_slowest_against_the_median(slowed):
    panel = next(p for p in load_generator().TRAINING.panels if p.title == "Slowest rank vs median")
    subs = {"$namespace": NAMESPACE, "$run": RUN, "$__rate_interval": "20s"}
    (slowest_q, _), (median_q, _) = panel.queries
    for var, value in subs.items():
        slowest_q, median_q = slowest_q.replace(var, value), median_q.replace(var, value)
    slowest = slowed.prom.query(slowest_q, at=slowed.at)
    median = slowed.prom.query(median_q, at=slowed.at)
    assert [s["metric"]["rank"] for s in slowest] == [str(SLOWED)]
    assert len(median) == 1 and "rank" not in median[0]["metric"]
    assert float(slowest[0]["value"][1]) < 0.8 * float(median[0]["value"][1])


@needs_prometheus
def test_compute_seconds_are_bounded_by_the_wall_clock_and_the_wait_matches_the_stops(slowed):
    compute = per_rank(slowed, contract.M_COMPUTE_SECONDS)
    steps = per_rank(slowed, f"{contract.M_STEP_SECONDS}_sum")
    wall = slowed.at - slowed.started
    for rank in slowed.ranks:
        assert 0 < compute[rank] <= steps[rank] <= wall, (rank, compute, steps, wall)
    # Against the test's own clock of the stops: every second the slowed rank is stopped, the others
    # sit in the all-reduce waiting for it; and the slowed rank's extra compute time is some of its
    # stopped time (the stops that fell in its own work; those in its all-reduce are waits).
    waited = {rank: steps[rank] - compute[rank] for rank in slowed.ranks}
    print(f"compute {compute}; step sums {steps}; waited {waited}; wall {wall:.1f}; stopped {slowed.stopped_seconds:.1f}")
    others = [rank for rank in slowed.ranks if rank != str(SLOWED)]
    for rank in others:
        assert waited[rank] >= 0.7 * slowed.stopped_seconds, (rank, waited, slowed.stopped_seconds)
    extra = compute[str(SLOWED)] - max(compute[rank] for rank in others)
    assert 0 < extra <= slowed.stopped_seconds, (extra, slowed.stopped_seconds)
