"""Leap's reporting SDK: throughput, FLOP/s, MFU and progress for any training program.

    import leap_trainer.sdk as leap
    leap.watch(model, optimizer, total_steps=epochs * len(loader))   # PyTorch: that is all
    callbacks=[leap.KerasCallback(batch_size=64)]                    # Keras
    callbacks=[leap.TransformersCallback()]                          # Hugging Face Trainer
    leap.report(step=step, samples=len(batch), total_steps=total)    # anything else

It exports the same leap_train_* series as leap-train (contract.py) on the port the operator and
`leap run` give each process (LEAP_METRICS_PORT + LOCAL_RANK), labelled with the run, namespace
and rank from their env, so a `command:` TrainingRun gets the `kubectl get` columns, status.progress,
dashboards and alerts of a built-in one. Outside Leap (no LEAP_METRICS_PORT) it serves nothing and
costs almost nothing.

This module imports only the standard library, prometheus_client and leap_trainer's light modules:
`pip install leap-trainer` needs no ML framework. The framework adapters live in sdk_torch,
sdk_keras and sdk_transformers and import their framework when first used.

Cost: a training step costs a few list appends and a clock read (on CUDA an event record,
no sync). Steps are folded into windows of about REPORT_SECONDS (metrics.py says why not per step);
a window closes only at steps the device has finished (CUDA events queried without blocking), and
a device loss is copied to the host asynchronously and read one window later.

Unknown stays unknown: without total steps there is no progress or ETA, without FLOPs per sample
no FLOP/s or MFU, on a device without a known peak no MFU. The series are absent, never 0.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from . import contract as c
from .metrics import PortInUse, TrainingMetrics

REPORT_SECONDS = 0.5     # as the built-in loops: < 1% of step time, fresh enough for dashboards
SUMMARY_SOURCE = "leap_trainer.sdk"


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name) or ""
    try:
        return int(raw) if raw.strip() else default
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer; set it to a whole "
                         f"number or unset it") from None


def settings_from_env(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The process's identity and metrics port from the env the operator and `leap run` set."""
    base_port = _int(env, c.ENV_METRICS_PORT, 0)
    local_rank = _int(env, c.ENV_LOCAL_RANK, 0)
    return {
        "run": env.get(c.ENV_RUN) or "local",
        "namespace": env.get(c.ENV_NAMESPACE) or "default",
        "rank": _int(env, c.ENV_RANK, 0),
        "local_rank": local_rank,
        "world_size": max(1, _int(env, c.ENV_WORLD_SIZE, 1)),
        "port": base_port + local_rank if base_port else None,   # local rank r serves on port + r
        "framework": env.get(c.ENV_FRAMEWORK) or None,
        "accelerator": env.get(c.ENV_ACCELERATOR) or None,
        "attempt": _int(env, c.ENV_ATTEMPT, 1),
        "summary_path": env.get(c.ENV_SUMMARY) or None,
    }


class HostClock:
    """Step marks from the host clock: every mark is final at once (CPU training, or host-timed loops)."""

    def mark(self) -> float:
        return time.perf_counter()

    def ready(self, mark: Any) -> bool:
        return True

    def seconds(self, start: Any, end: Any) -> float:
        return end - start

    def loss(self, values: list, wait: bool = False) -> float | None:
        """The mean of a window's losses (numbers, or CPU tensors); None while unknown."""
        numbers = [float(v) for v in values if v is not None]
        return sum(numbers) / len(numbers) if numbers else None

    def synchronize(self) -> None:
        pass


def _detached(loss: Any) -> Any:
    """A torch tensor's value without its graph (kept for a window, the graph would be too); else as given."""
    detach = getattr(loss, "detach", None)
    return detach() if callable(detach) else loss


class Reporter:
    """One process's reporter: counts steps and samples, folds them into windows for TrainingMetrics,
    and writes a summary for `leap run` at the end.

    step() is called once per optimizer step (by an adapter, by report(), or by leap-train's own
    loops); everything else happens when a window closes, at most every `report_seconds`.

    leap-train reports through this class too: its loops give `metrics` (one TrainingMetrics per
    process, served on --metrics-port and shared by the run's phases; then the identity and plan
    arguments are ignored: the metrics have them) and make a Reporter per training phase, which
    pauses around evaluation and checkpoint writes (paused()) and subtracts DDP's all-reduce waits
    from the compute seconds (wait_seconds).
    """

    def __init__(self, *, run: str = "local", namespace: str = "default", rank: int = 0, local_rank: int = 0,
                 world_size: int = 1, port: int | None = None, framework: str | None = None,
                 accelerator: str | None = None, attempt: int = 1, summary_path: str | None = None,
                 total_steps: int | None = None, flops_per_sample: float | None = None,
                 peak_flops: float | None = None, initial_step: int = 0,
                 report_seconds: float = REPORT_SECONDS, address: str = "0.0.0.0",
                 metrics: TrainingMetrics | None = None):
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.attempt, self.summary_path = attempt, summary_path
        self.report_seconds = report_seconds
        self.framework_given = framework is not None
        self.metrics = metrics if metrics is not None else TrainingMetrics(
            run=run, namespace=namespace, rank=rank, framework=framework or "unknown",
            accelerator=accelerator or "unknown", port=port, flops_per_sample=flops_per_sample,
            peak_flops=peak_flops, total_steps=total_steps, initial_step=initial_step, address=address)
        self.device: str | None = None          # the device name, for the summary
        self.clock: Any = HostClock()
        self.started = time.perf_counter()
        self._lock = threading.Lock()
        self._start_mark: Any = None            # the end of the last closed window (or the first step's start)
        self._window_host_start = 0.0
        self._marks: list = []                  # end of each pending step
        self._samples: list[float] = []         # samples of each pending step
        self._losses: list = []                 # losses given for pending steps
        self._warm = False                      # the first (warm-up) window has closed
        self._steady_samples = 0.0              # after the warm-up window: the summary's throughput
        self._steady_seconds = 0.0
        self.last_loss: float | None = None
        # Where a window's loss comes from when no step gave one (Keras: its running loss, read once a window).
        self.loss_source: Any = None
        # Seconds this rank waited for the others in the next n closed steps (collective_wait.py):
        # then a window's compute seconds are its step times less those waits. None: unmeasured.
        self.wait_seconds: Callable[[int], float] | None = None
        self.closed = False

    # --- configuration (adapters, or the user through configure()) -----------------------------
    def describe(self, *, framework: str | None = None, accelerator: str | None = None,
                 device: str | None = None, peak_flops: float | None = None, clock: Any = None) -> None:
        """What an adapter knows: the env's labels and a peak already known win; the peak makes MFU known."""
        labels = self.metrics.labels
        if framework and labels["framework"] == "unknown":
            labels["framework"] = framework
        if accelerator and labels["accelerator"] == "unknown":
            labels["accelerator"] = accelerator
        if device:
            self.device = device
        if peak_flops and not self.metrics.peak_flops:
            self.metrics.peak_flops = peak_flops
        if clock is not None and not self._marks:
            self.clock = clock
            self._start_mark = None

    def set_total_steps(self, total_steps: int | None) -> None:
        if total_steps is not None:
            if int(total_steps) <= 0:
                raise ValueError(f"total_steps must be a positive number of optimizer steps, not {total_steps!r}; "
                                 f"leave it out when unknown")
            self.metrics.total_steps = int(total_steps)

    def set_initial_step(self, step: int) -> None:
        """The run's steps done before this process started (a resumed program)."""
        self.metrics.initial_step = self.metrics.resumed_step = max(0, int(step))

    def set_flops_per_sample(self, flops: float | None) -> None:
        if flops:
            self.metrics.flops_per_sample = float(flops)

    @property
    def steady_samples(self) -> float:
        """Samples of the closed windows after the warm-up window (the summary's throughput's)."""
        return self._steady_samples

    @property
    def steady_seconds(self) -> float:
        """Seconds of those windows: training time, pauses (evaluation, checkpoint writes) excluded."""
        return self._steady_seconds

    def throughput(self) -> float | None:
        """This process's samples/s after the warm-up window; with only the warm-up window closed, its
        rate; None before any window closed."""
        if self._steady_seconds > 0:
            return self._steady_samples / self._steady_seconds
        return self.metrics.samples_per_second or None

    @property
    def total_steps(self) -> int | None:
        return self.metrics.total_steps

    @property
    def run_step(self) -> int:
        """The run's step as reported so far (closed windows), resumed steps included."""
        return self.metrics.run_step

    # --- steps ------------------------------------------------------------------------------------
    def start_server(self) -> None:
        """Serve /metrics; a port in use is said in one line on stderr, and training goes on."""
        try:
            self.metrics.start_server()
        except PortInUse as error:
            print(f"leap_trainer.sdk: cannot serve metrics on port {error.port}: {error}; this process "
                  f"reports nothing (set {c.ENV_METRICS_PORT} to a free port, or unset it)", file=sys.stderr)
            self.metrics.port = None

    def begin(self) -> None:
        """Training starts now (the first step's start), unless it already did."""
        if self._start_mark is None:
            self.metrics.training_started()   # the goodput account: start-up ends at the first step
            self._start_mark = self.clock.mark()
            self._window_host_start = time.perf_counter()

    def step(self, samples: float, loss: Any = None, steps: int = 1) -> None:
        """`steps` optimizer steps just ended, on `samples` samples in all; `loss` may be a device tensor."""
        if self.closed or steps <= 0:
            return
        self.begin()
        with self._lock:
            if steps == 1:
                self._marks.append(self.clock.mark())
                self._samples.append(samples)
            else:   # a group of steps (Keras steps_per_execution, report(step=...)): timed at its mean
                mark = self.clock.mark()
                self._marks.extend([mark] * steps)
                self._samples.extend([samples / steps] * steps)
            if loss is not None:
                self._losses.append(_detached(loss))
            due = not self._warm or time.perf_counter() - self._window_host_start >= self.report_seconds
        if due:
            self.flush(wait=False)

    def set_loss(self, loss: Any) -> None:
        """A loss outside of step() (e.g. a trainer's logged running loss)."""
        with self._lock:
            self._losses.append(_detached(loss))

    def flush(self, wait: bool = True) -> None:
        """Close the window at the last step the device has finished (all of them with wait=True)."""
        with self._lock:
            while self._close_window(wait) and wait and self._marks:
                pass   # the warm-up window closed alone: close the rest too

    def pause(self) -> None:
        """Training stops for a while (evaluation, a checkpoint write, the gap between two Keras fit()
        calls): every step so far is reported now, and the time until resume() is no step's."""
        self.flush(wait=True)

    def resume(self) -> None:
        """Training goes on after pause(): the next step is timed from now (nothing to do before begin())."""
        with self._lock:
            if self._start_mark is not None and not self._marks:
                self._start_mark = self.clock.mark()
                self._window_host_start = time.perf_counter()

    @contextlib.contextmanager
    def paused(self, activity: str | None = None) -> Iterator[None]:
        """`with reporter.paused("evaluate"): ...`: the block is out of the training windows, and its wall
        time counts as `activity` in the goodput account (None: the block counts its own)."""
        self.pause()
        try:
            with self.metrics.timed(activity) if activity else contextlib.nullcontext():
                yield
        finally:
            self.resume()

    def _close_window(self, wait: bool) -> bool:
        """Close one window (the caller holds the lock); False when no step was ready."""
        if not self._marks or self._start_mark is None:
            return False
        if wait:
            self.clock.synchronize()
        ready = self._ready_count()
        if ready == 0:
            return False
        if not self._warm:   # the warm-up window: the first step (or group) alone
            ready = next((i for i, mark in enumerate(self._marks) if mark is not self._marks[0]), ready)
        marks = self._marks[:ready]
        times = self._step_times(marks)
        seconds = self.clock.seconds(self._start_mark, marks[-1])
        samples = sum(self._samples[:ready])
        losses, self._losses = self._losses, []
        previous_start, self._start_mark = self._start_mark, marks[-1]
        del self._marks[:ready], self._samples[:ready]
        self._window_host_start = time.perf_counter()
        if not losses and self.loss_source is not None:
            losses = [self.loss_source()]
        loss = self.clock.loss(losses, wait=wait)
        if loss is not None:
            self.last_loss = loss
        compute = sum(times) - self.wait_seconds(ready) if self.wait_seconds is not None else None
        self.metrics.report(steps=ready, samples=int(round(samples)), seconds=seconds, loss=loss,
                            step_seconds=times, compute_seconds=compute)
        if self._warm:
            self._steady_samples += samples
            self._steady_seconds += seconds
        self._warm = True
        memory = getattr(self.clock, "memory", None)
        if memory is not None:
            used = memory()
            if used is not None:
                self.metrics.set_memory(used)
        release = getattr(self.clock, "release", None)
        if release is not None:   # spent marks back to the clock (CUDA: events reused, not re-created)
            release([previous_start, *marks[:-1]])
        return True

    def _step_times(self, marks: list) -> list[float]:
        """Each step's seconds; a group of steps sharing one mark (reported together) at its mean."""
        times: list[float] = []
        start, group = self._start_mark, 0
        for i, mark in enumerate(marks):
            group += 1
            if i + 1 == len(marks) or marks[i + 1] is not mark:
                times += [self.clock.seconds(start, mark) / group] * group
                start, group = mark, 0
        return times

    def _ready_count(self) -> int:
        """How many pending steps the device has finished: marks finish in order, so bisect."""
        marks = self._marks
        if self.clock.ready(marks[-1]):
            return len(marks)
        low, high = 0, len(marks) - 1          # marks[high] is not ready
        while low < high:
            middle = (low + high) // 2
            if self.clock.ready(marks[middle]):
                low = middle + 1
            else:
                high = middle
        return low

    # --- the end ----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The run as this process saw it, in the keys of leap-train's summary that apply."""
        m = self.metrics
        per_process = self.throughput()
        global_rate = per_process * self.world_size if per_process else None
        flops = global_rate * m.flops_per_sample if global_rate and m.flops_per_sample else None
        peak = m.peak_flops * self.world_size if m.peak_flops else None
        return {
            "source": SUMMARY_SOURCE, "framework": m.labels["framework"], "run": m.labels["run"],
            "attempt": self.attempt, "steps": m.run_step, "total_steps": m.total_steps,
            "resumed_from_step": m.initial_step, "samples": m.samples, "world_size": self.world_size,
            "samples_per_second": global_rate, "flops_per_sample": m.flops_per_sample,
            "flops_per_second": flops, "mfu": flops / peak if flops and peak else None,
            "final_loss": self.last_loss, "device": self.device, "test_accuracy": m.accuracy,
            "wall_seconds": time.perf_counter() - self.started,
        }

    def close(self) -> None:
        """The last window, the summary (rank 0, where LEAP_SUMMARY_PATH says), the server."""
        if self.closed:
            return
        try:
            self.flush(wait=True)
        finally:
            self.closed = True
        if self.rank == 0 and self.summary_path and self.metrics.steps:
            path = Path(self.summary_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.tmp")
            temporary.write_text(json.dumps(self.summary(), indent=2) + "\n")
            os.replace(temporary, path)
        self.metrics.close()


# --- the process's reporter ---------------------------------------------------------------------------

_reporter: Reporter | None = None
_reporter_lock = threading.Lock()


def reporter() -> Reporter:
    """This process's reporter, built from the env at first use (its /metrics server started)."""
    global _reporter
    with _reporter_lock:
        if _reporter is None:
            _reporter = Reporter(**settings_from_env())
            _reporter.start_server()
            atexit.register(_reporter.close)
        return _reporter


def configure(*, total_steps: int | None = None, flops_per_sample: float | None = None,
              initial_step: int | None = None) -> Reporter:
    """What the program knows and the SDK cannot see: planned steps, FLOPs per sample, resumed steps."""
    current = reporter()
    current.set_total_steps(total_steps)
    current.set_flops_per_sample(flops_per_sample)
    if initial_step is not None:
        current.set_initial_step(initial_step)
    return current


def report(*, step: int | None = None, samples: float, total_steps: int | None = None,
           loss: float | None = None, epoch: int | None = None) -> None:
    """Any training loop: call it after each optimizer step (or every k steps).

    step: the run's optimizer steps done so far (resumed steps included); the steps since the last
    call are counted. Without it, each call counts one step. samples: samples trained since the last
    call. total_steps: the run's planned steps (progress and ETA; unknown when never given).
    """
    current = reporter()
    current.set_total_steps(total_steps)
    if epoch is not None:
        current.metrics.set_epoch(int(epoch))
    with current._lock:
        counted = current.run_step + len(current._marks)
    steps = 1 if step is None else int(step) - counted
    if steps <= 0:
        return   # no new step (a repeated call, or a step below the resumed one)
    current.step(samples, loss=loss, steps=steps)


def set_epoch(epoch: int) -> None:
    reporter().metrics.set_epoch(int(epoch))


def set_accuracy(accuracy: float) -> None:
    """An evaluation's accuracy (leap_train_accuracy; the summary's test accuracy)."""
    reporter().metrics.set_accuracy(float(accuracy))


def record_loss(loss: Any) -> None:
    """This step's loss (a float, or a tensor kept on its device and read once per window)."""
    reporter().set_loss(loss)


def paused(activity: str = c.ACTIVITY_EVALUATE):
    """`with leap.paused("checkpoint"): save(...)`: the block is no training step (not in throughput),
    its time counts as `activity` (evaluate, checkpoint or restore) in the goodput account, and hang
    detection sees an announced pause, not a hang. See Reporter.paused()."""
    if activity not in c.PAUSE_ACTIVITIES:
        raise ValueError(f"paused({activity!r}): the activity must be one of {', '.join(c.PAUSE_ACTIVITIES)}")
    return reporter().paused(activity)


def finish() -> None:
    """Report the last window and write the summary now (otherwise done when the process exits)."""
    if _reporter is not None:
        _reporter.close()


def watch(model: Any, optimizer: Any, *, total_steps: int | None = None, flops_per_sample: float | None = None,
          samples_per_step: int | None = None) -> Any:
    """PyTorch: every optimizer step counts a step, samples come from the model's input batch, FLOPs
    per sample are counted by torch's FlopCounterMode on the first step (unless given). Returns the watch."""
    from .sdk_torch import TorchWatch

    return TorchWatch(reporter(), model, optimizer, total_steps=total_steps, flops_per_sample=flops_per_sample,
                      samples_per_step=samples_per_step)


def __getattr__(name: str):
    """The framework callbacks, imported (with their framework) only when asked for."""
    if name == "KerasCallback":
        from .sdk_keras import KerasCallback

        return KerasCallback
    if name == "TransformersCallback":
        from .sdk_transformers import TransformersCallback

        return TransformersCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _reset_for_tests() -> None:
    """Forget the process's reporter (tests build several in one process)."""
    global _reporter
    with _reporter_lock:
        if _reporter is not None:
            _reporter.close()
            atexit.unregister(_reporter.close)
        _reporter = None
