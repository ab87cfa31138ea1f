"""Progress of local workers, read from their Prometheus endpoints the way the operator reads pods.

Each worker's local ranks serve /metrics on consecutive ports; its row shows rank 0's step,
loss and ETA with throughput summed over its ranks. The operator's own parser
(leap_operator.progress) turns the text into numbers, so `leap run` and `kubectl get` agree.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from leap_operator.local.podenv import LOCALHOST

SUMMED = ("samplesPerSecond", "flopsPerSecond")


def fetch_metrics(port: int, timeout: float = 0.5) -> str | None:
    """The /metrics text, or None while the worker is not serving (yet, or any more)."""
    try:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=timeout) as response:
            return response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None


def worker_progress(ports: list[int]) -> dict | None:
    ranks, counters = [], None
    for port in ports:
        text = fetch_metrics(port)
        if text:
            from leap_operator.goodput import counters_from_metrics_text
            from leap_operator.progress import progress_from_metrics_text  # the operator's parser
            ranks.append(progress_from_metrics_text(text))
            if len(ranks) == 1:
                counters = counters_from_metrics_text(text)
    if not ranks:
        return None
    out = dict(ranks[0])
    if counters is not None:
        out["goodput"] = counters   # the local rank 0's counters: the goodput account's facts
    for key in SUMMED:
        values = [r.get(key) for r in ranks if r.get(key) is not None]
        if values:
            out[key] = sum(values)
    return out


class ProgressMonitor:
    """Last known progress per worker index, refreshed at most every `interval` seconds. A
    worker that stopped serving keeps its last numbers (the display shows where it stopped)."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.latest: dict[int, dict] = {}
        self._last = 0.0

    def reset(self) -> None:
        self.latest.clear()
        self._last = 0.0

    def poll(self, workers, force: bool = False) -> dict[int, dict]:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            for worker in workers:
                if worker.poll() is None:
                    progress = worker_progress(worker.plan.metrics_ports)
                    if progress is not None:
                        self.latest[worker.index] = progress
        return self.latest
