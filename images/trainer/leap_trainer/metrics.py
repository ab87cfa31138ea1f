"""Prometheus metrics of one training process (one rank).

The training loop calls report() with values it accumulated over a window (every N steps
or on a timer), never once per step: the issue measured ~2 µs per Counter+Gauge+Histogram
update, 2.6% of a step at 10k steps/s. Here an update is a few float assignments, and all
metric objects are built only when Prometheus scrapes (a custom collector), so the cost
of metrics is paid by the scrape thread, not the training loop.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
import time
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from . import contract as c


_IMPORTED = time.monotonic()   # the fallback origin of process_age_seconds()


def process_age_seconds() -> float:
    """Seconds since this process started: the kernel's start time (Linux: /proc/self/stat's
    starttime, on the boot-time clock, 10 ms ticks), else since this module was imported."""
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")   # field 22 of stat(5), counted after the name
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic() - _IMPORTED


class PortInUse(Exception):
    """The metrics port is taken (by another process, or another local rank's port + r)."""

    def __init__(self, port: int, error: OSError):
        super().__init__(f"port {port}: {error.strerror or error}")
        self.port = port


# Step time buckets, 20 us (a small model on a GPU) to 60 s (a slow multi-host step).
STEP_SECONDS_BUCKETS = (0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                        0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class TrainingMetrics:
    """Counters count this process's work since it started (0 after a resume, as Prometheus
    counters do on a restart); progress, ETA and total steps are the run's (resumed steps included)."""

    def __init__(self, *, run: str, namespace: str, rank: int, framework: str, accelerator: str,
                 port: int | None, flops_per_sample: float | None, peak_flops: float | None,
                 total_steps: int | None, initial_step: int = 0, address: str = "0.0.0.0"):
        self.labels = {"run": run, "namespace": namespace, "rank": str(rank),
                       "framework": framework, "accelerator": accelerator}
        self.port = port
        self.address = address
        # None = unknown (a program that reports through leap_trainer.sdk may not know them):
        # then FLOP/s and MFU, or progress, ETA and total steps, are absent, never 0.
        self.flops_per_sample = flops_per_sample
        self.peak_flops = peak_flops      # of all the devices this process drives
        self.total_steps = total_steps    # the run's planned steps
        self.initial_step = initial_step  # the run's steps done before this process started
        self.steps = 0                    # optimizer steps this process took
        self.samples = 0.0                # samples this process trained on
        self.samples_per_second = 0.0
        self.compute_seconds: float | None = None   # own work, waits for other ranks excluded; None: unmeasured
        self.loss: float | None = None
        self.accuracy: float | None = None
        self.epoch = 0
        self.memory_bytes: float | None = None
        self.eta_seconds: float | None = None
        self.resumed_step = initial_step  # the run's step this process started at (finish() moves initial_step)
        # Wall seconds by activity (contract.TIME_ACTIVITIES): the goodput account's raw facts.
        self.seconds = {activity: 0.0 for activity in c.TIME_ACTIVITIES}
        self._training_started = False
        self.activity = c.ACTIVITY_STARTUP   # what it does now (contract.M_ACTIVITY)
        self._pauses = 0                     # timed() blocks open
        self._bucket_counts = [0] * (len(STEP_SECONDS_BUCKETS) + 1)   # last one is +Inf
        self._step_seconds_sum = 0.0
        self._lock = threading.Lock()      # report() and collect() from different threads
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._server = None

    @property
    def run_step(self) -> int:
        """The run's step: resumed steps plus this process's."""
        return self.initial_step + self.steps

    # --- called by the training loop ------------------------------------------------------
    def start_server(self) -> None:
        """Serve /metrics on the port (if any). A port in use raises PortInUse, naming the port."""
        if self.port:
            try:
                self._server, _ = start_http_server(self.port, addr=self.address, registry=self.registry)
            except OSError as error:
                raise PortInUse(self.port, error) from None

    def report(self, *, steps: int, samples: int, seconds: float, loss: float | None = None,
               step_seconds: Sequence[float] | None = None, compute_seconds: float | None = None) -> None:
        """Fold in a window of `steps` optimizer steps that took `seconds` in all.

        step_seconds: each step's own time, for the histogram; without it every step of the
        window is counted at the window's mean (only where no finer timing exists).
        compute_seconds: the window's own work of this rank (collective_wait.py); None: unmeasured.
        """
        if steps <= 0:
            return
        mean_step = seconds / steps
        with self._lock:
            self.seconds[c.ACTIVITY_TRAIN] += max(seconds, 0.0)
            if not self._pauses:
                self.activity = c.ACTIVITY_TRAIN   # steps were just taken
            self.steps += steps
            self.samples += samples
            if seconds > 0:
                self.samples_per_second = samples / seconds
                if self.total_steps is not None:
                    remaining = max(self.total_steps - self.run_step, 0)
                    self.eta_seconds = remaining * mean_step
            if loss is not None:
                self.loss = float(loss)
            if compute_seconds is not None:
                self.compute_seconds = (self.compute_seconds or 0.0) + compute_seconds
            if step_seconds is not None and len(step_seconds) == steps:
                for one in step_seconds:
                    self._bucket_counts[bisect.bisect_left(STEP_SECONDS_BUCKETS, one)] += 1
                self._step_seconds_sum += float(sum(step_seconds))
            else:
                self._bucket_counts[bisect.bisect_left(STEP_SECONDS_BUCKETS, mean_step)] += steps
                self._step_seconds_sum += seconds

    # --- where the time went (the goodput account) ----------------------------------------
    def add_time(self, activity: str, seconds: float) -> None:
        """Count `seconds` of wall time as `activity` (one of contract.TIME_ACTIVITIES: "restore",
        "checkpoint", "evaluate"; "train" is counted by report(), "startup" by training_started()).
        A float add: cheap enough for any loop."""
        if activity not in self.seconds:
            raise ValueError(f"unknown activity {activity!r}; one of {', '.join(c.TIME_ACTIVITIES)}")
        with self._lock:
            self.seconds[activity] += max(float(seconds), 0.0)

    @contextlib.contextmanager
    def timed(self, activity: str) -> Iterator[None]:
        """`with metrics.timed("checkpoint"): save(...)` counts the block's wall time as `activity`,
        and says so on leap_train_activity while it lasts: a pause announced, not a stall."""
        if activity not in self.seconds:
            raise ValueError(f"unknown activity {activity!r}; one of {', '.join(c.TIME_ACTIVITIES)}")
        began = time.perf_counter()
        with self._lock:
            previous, self.activity = self.activity, activity
            self._pauses += 1
        try:
            yield
        finally:
            self.add_time(activity, time.perf_counter() - began)
            with self._lock:
                self._pauses -= 1
                self.activity = previous

    def training_started(self) -> None:
        """The first training step is about to run: the time since the process started that no
        other activity counted (imports, data loading, model building, process-group set-up) is
        start-up. Later calls (a later phase's loop) change nothing."""
        with self._lock:
            if not self._pauses:
                self.activity = c.ACTIVITY_TRAIN
            if self._training_started:
                return
            self._training_started = True
            counted = sum(v for k, v in self.seconds.items() if k != c.ACTIVITY_STARTUP)
            self.seconds[c.ACTIVITY_STARTUP] = max(process_age_seconds() - counted, 0.0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_accuracy(self, accuracy: float) -> None:
        self.accuracy = float(accuracy)

    def set_memory(self, memory_bytes: float) -> None:
        self.memory_bytes = float(memory_bytes)

    def finish(self) -> None:
        """The run is done: progress 1, nothing left to wait for."""
        with self._lock:
            if self.total_steps is None:
                return   # no plan to have finished
            self.initial_step = max(self.initial_step, self.total_steps - self.steps)
            self.eta_seconds = 0.0

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # --- called by prometheus_client on scrape --------------------------------------------
    @property
    def flops_per_second(self) -> float | None:
        if self.flops_per_sample is None:
            return None
        return self.samples_per_second * self.flops_per_sample

    def describe(self):
        return []

    def collect(self):
        names = list(self.labels)
        values = list(self.labels.values())
        help_of = {name: text for name, (_, text) in c.TRAIN_METRICS.items()}

        def gauge(name, value):
            family = GaugeMetricFamily(name, help_of[name], labels=names)
            family.add_metric(values, value)
            return family

        def counter(name, value):
            family = CounterMetricFamily(name, help_of[name], labels=names)
            family.add_metric(values, value)
            return family

        with self._lock:
            yield counter(c.M_SAMPLES, self.samples)
            yield counter(c.M_STEPS, self.steps)
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, STEP_SECONDS_BUCKETS), "+Inf"), self._bucket_counts):
                cumulative += count
                buckets.append((bound, cumulative))
            histogram = HistogramMetricFamily(c.M_STEP_SECONDS, help_of[c.M_STEP_SECONDS], labels=names)
            histogram.add_metric(values, buckets, self._step_seconds_sum)
            yield histogram
            if self.compute_seconds is not None:
                yield counter(c.M_COMPUTE_SECONDS, self.compute_seconds)
            yield gauge(c.M_SAMPLES_PER_SECOND, self.samples_per_second)
            flops_per_second = self.flops_per_second
            if flops_per_second is not None:
                yield gauge(c.M_FLOPS_PER_SECOND, flops_per_second)
                if self.peak_flops:
                    yield gauge(c.M_MFU, flops_per_second / self.peak_flops)
            if self.loss is not None:
                yield gauge(c.M_LOSS, self.loss)
            if self.accuracy is not None:
                yield gauge(c.M_ACCURACY, self.accuracy)
            if self.total_steps:
                yield gauge(c.M_PROGRESS, min(self.run_step / self.total_steps, 1.0))
                if self.eta_seconds is not None:
                    yield gauge(c.M_ETA, self.eta_seconds)
                yield gauge(c.M_TOTAL_STEPS, self.total_steps)
            if self.epoch:
                yield gauge(c.M_EPOCH, self.epoch)
            if self.memory_bytes is not None:
                yield gauge(c.M_ACCEL_MEMORY, self.memory_bytes)
            time_family = CounterMetricFamily(c.M_TIME, help_of[c.M_TIME], labels=[*names, c.TIME_LABEL])
            for activity, seconds in self.seconds.items():
                if activity == c.ACTIVITY_STARTUP and not self._training_started:
                    continue   # still starting: how long start-up takes is not known yet
                time_family.add_metric([*values, activity], seconds)
            yield time_family
            activity = GaugeMetricFamily(c.M_ACTIVITY, help_of[c.M_ACTIVITY], labels=[*names, c.TIME_LABEL])
            for one in c.TIME_ACTIVITIES:
                activity.add_metric([*values, one], 1.0 if one == self.activity else 0.0)
            yield activity
            yield gauge(c.M_RESUMED_STEP, self.resumed_step)
