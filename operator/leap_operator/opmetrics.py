"""The operator's own metrics on /metrics (prometheus_client, a registry of its own).

Names come from leap_operator.names: reconciles by result, reconcile latency, runs by phase,
gang restarts, Kubernetes API errors by verb and resource, stalled runs (hang detection); plus
the process collector (RSS, CPU, open files) so the operator's footprint is visible next to its work.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import PlatformCollector, ProcessCollector

from leap_operator import api, names

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

RECONCILES = Counter(names.OM_RECONCILES.removesuffix("_total"), "Reconciliations of TrainingRuns by result.",
                     ["result"], registry=REGISTRY)
RECONCILE_SECONDS = Histogram(names.OM_RECONCILE_SECONDS, "Wall time of one reconciliation of a TrainingRun.",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                              registry=REGISTRY)
RUNS = Gauge(names.OM_RUNS, "TrainingRuns seen by this operator, by phase.", ["phase"], registry=REGISTRY)
RESTARTS = Counter(names.OM_RESTARTS.removesuffix("_total"), "Gang restarts (new attempts) of TrainingRuns.",
                   registry=REGISTRY)
API_ERRORS = Counter(names.OM_API_ERRORS.removesuffix("_total"),
                     "Failed Kubernetes API requests (errors and retries), by verb and resource.",
                     ["verb", "resource"], registry=REGISTRY)

GOODPUT_RATIO = Gauge(names.OM_GOODPUT_RATIO, "Goodput of a TrainingRun: productive training seconds over its "
                      "wall seconds (status.goodput.ratio); absent while unknown.", ["namespace", "run"],
                      registry=REGISTRY)
GOODPUT_SECONDS = Gauge(names.OM_GOODPUT_SECONDS, "Where a TrainingRun's wall time went, by part (status.goodput); "
                        "the parts add up to its wall time; parts still unknown are absent.",
                        ["namespace", "run", "part"], registry=REGISTRY)
RUN_STALLED = Gauge(names.OM_RUN_STALLED,
                    "Unix time of the last optimizer step of a TrainingRun the operator calls Stalled "
                    "(condition Stalled=True while Running); present only while it is stalled.",
                    ["namespace", "run"], registry=REGISTRY)

_phases: dict[tuple[str, str], str] = {}
_goodput: dict[tuple[str, str], set[str]] = {}   # run -> parts it has series for
_stalled: set[tuple[str, str]] = set()
_lock = threading.Lock()
for _phase in api.PHASES:
    RUNS.labels(_phase).set(0)


def set_phase(key: tuple[str, str], phase: str | None) -> None:
    """Record a run's phase (None: the run is gone) and update the runs-by-phase gauge."""
    with _lock:
        before = _phases.pop(key, None) if phase is None else _phases.get(key)
        if before == phase:
            return
        if phase is not None:
            _phases[key] = phase
            RUNS.labels(phase).inc()
        if before is not None:
            RUNS.labels(before).dec()


def set_stalled(key: tuple[str, str], since: float | None) -> None:
    """A run is stalled since the Unix time `since` (None: it is not; its series goes away, so
    the gauge has a series per stalled run only)."""
    with _lock:
        if since is not None:
            RUN_STALLED.labels(*key).set(since)
            _stalled.add(key)
        elif key in _stalled:
            _stalled.discard(key)
            RUN_STALLED.remove(*key)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics on a background thread."""
    start_http_server(port, addr=addr, registry=REGISTRY)


def set_goodput(key: tuple[str, str], record: dict | None) -> None:
    """A run's goodput gauges from its status.goodput (None: the run is gone, its series go too)."""
    from leap_operator.goodput import PARTS

    namespace, run = key
    with _lock:
        shown = _goodput.pop(key, set())
        now = set()
        if record is not None:
            if record.get("ratio") is not None:
                GOODPUT_RATIO.labels(namespace, run).set(record["ratio"])
                now.add("ratio")
            for part in PARTS:
                value = record.get(f"{part}Seconds")
                if value is not None:
                    GOODPUT_SECONDS.labels(namespace, run, part).set(value)
                    now.add(part)
            _goodput[key] = now
        for gone in shown - now:
            if gone == "ratio":
                GOODPUT_RATIO.remove(namespace, run)
            else:
                GOODPUT_SECONDS.remove(namespace, run, gone)
