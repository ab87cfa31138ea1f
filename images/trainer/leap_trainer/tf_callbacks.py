"""Keras callbacks that connect `model.fit` to Leap's metrics and checkpoints.

With steps_per_execution = k, Keras calls on_train_batch_end once per k steps, so these
callbacks cost nothing per step. Step counts come from the optimizer's iteration counter
(the steps actually applied), read only when reporting or saving.
"""

from __future__ import annotations

import contextlib
import time

import keras

from leap_trainer.tf_checkpoint import PhaseCheckpoints


class PhaseClock:
    """Steps and timing of one training phase, shared by the callbacks and the summary.

    Throughput is measured from the end of the first batch group (tf.function tracing
    excluded) to the end of fit, in global samples (all workers). Metrics count this worker's
    own samples (`worker_batch` per step), so summing the ranks in Prometheus gives the job's.
    """

    def __init__(self, *, global_batch: int, worker_batch: int):
        self.global_batch = global_batch
        self.worker_batch = worker_batch
        self.steps = 0               # optimizer iterations at the last read
        self.begin_step: int | None = None   # when this phase's first fit began
        self.begin_time = 0.0
        self.warm_step: int | None = None    # after its first batch group
        self.warm_time = 0.0
        self.end_time = 0.0

    def steady_samples_per_second(self) -> float:
        """Global samples/s after warm-up; from the start when the phase was a single batch group."""
        for step, start in ((self.warm_step, self.warm_time), (self.begin_step, self.begin_time)):
            if step is not None and self.steps > step and self.end_time > start:
                return (self.steps - step) * self.global_batch / (self.end_time - start)
        return 0.0


def optimizer_steps(model: keras.Model) -> int:
    return int(model.optimizer.iterations.numpy())


class MetricsReporter(keras.callbacks.Callback):
    """Feeds leap_trainer.metrics.TrainingMetrics from fit(): at most every `interval` seconds
    (and at each epoch end), with the steps, samples and time accumulated since the last report.

    Step times: Keras calls on_train_batch_end once per steps_per_execution group, with the index
    of the group's last step, so each group's steps are recorded at the group's mean time (one
    clock read per group, no device sync). The step counter is read only to report."""

    def __init__(self, metrics, clock: PhaseClock, *, interval: float = 1.0, memory_device: str | None = None):
        super().__init__()
        self.metrics = metrics
        self.clock = clock
        self.interval = interval
        self.memory_device = memory_device  # "GPU:0" / "TPU:0": report its memory in use; None on CPU
        self._last_time = 0.0
        self._last_steps = 0
        self._group_end = 0.0          # when the last batch group ended
        self._last_batch = -1          # index of the last step of the last group, within the epoch
        self._step_seconds: list[float] = []

    def on_train_begin(self, logs=None):
        self.clock.steps = optimizer_steps(self.model)
        self._last_steps = self.clock.steps
        self._last_time = self._group_end = time.perf_counter()
        self._step_seconds = []
        self._saved_seconds = self.metrics.seconds["checkpoint"]
        if self.clock.begin_step is None:
            self.clock.begin_step, self.clock.begin_time = self.clock.steps, self._last_time

    def on_epoch_begin(self, epoch, logs=None):
        self.metrics.set_epoch(epoch + 1)
        self._last_batch = -1

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        group = batch - self._last_batch
        if group > 0:
            self._step_seconds += [(now - self._group_end) / group] * group
        self._last_batch, self._group_end = batch, now
        saved = self.metrics.seconds["checkpoint"]
        if saved > self._saved_seconds:
            # A checkpoint save ran since the last group (CheckpointSaver follows this callback): not training.
            self._last_time += saved - self._saved_seconds
            self._saved_seconds = saved
        if self.clock.warm_step is None:
            # Start-up (for the goodput account) ends once tracing and compilation are done.
            self.metrics.training_started()
            # The first batch group includes tracing and compilation: start the throughput clock after it.
            self.clock.steps = optimizer_steps(self.model)
            self.clock.warm_step, self.clock.warm_time = self.clock.steps, now
            self._last_steps, self._last_time = self.clock.steps, now
            self._step_seconds = []   # tracing, not a step: the metrics never saw this group
        elif now - self._last_time >= self.interval:
            self.clock.steps = optimizer_steps(self.model)
            self._report(now, logs)

    def on_epoch_end(self, epoch, logs=None):
        self.clock.steps = optimizer_steps(self.model)
        self._report(time.perf_counter(), logs)

    def on_train_end(self, logs=None):
        self.clock.steps = optimizer_steps(self.model)
        self.clock.end_time = time.perf_counter()
        self._report(self.clock.end_time, logs)

    def _report(self, now: float, logs) -> None:
        steps = self.clock.steps - self._last_steps
        if steps <= 0:
            return
        loss = float(logs["loss"]) if logs and "loss" in logs else None
        self.metrics.report(
            steps=steps, samples=steps * self.clock.worker_batch, seconds=now - self._last_time, loss=loss,
            step_seconds=self._step_seconds,
        )
        self._step_seconds = []
        self._last_steps, self._last_time = self.clock.steps, now
        if self.memory_device:
            self._report_memory()

    def _report_memory(self) -> None:
        import tensorflow as tf

        try:
            self.metrics.set_memory(tf.config.experimental.get_memory_info(self.memory_device)["current"])
        except (ValueError, KeyError, tf.errors.OpError):
            self.memory_device = None  # this device does not report memory: stop asking


class CheckpointSaver(keras.callbacks.Callback):
    """Saves the phase about every `every_steps` optimizer steps and at every epoch end (with
    every_steps 0: neither; the phase's final save is the only one, as on PyTorch).

    Keras' batch index (the last step of each batch group, within the epoch) tells when a save
    is due, so the step counter is read only when saving. Only the chief worker writes.
    """

    def __init__(self, checkpoints: PhaseCheckpoints, *, every_steps: int, steps_per_epoch: int, is_chief: bool,
                 metrics=None):
        super().__init__()
        self.checkpoints = checkpoints
        self.metrics = metrics     # TrainingMetrics: the saves' wall time counts as "checkpoint"
        self.every_steps = max(0, int(every_steps or 0))
        self.steps_per_epoch = steps_per_epoch
        self.is_chief = is_chief
        self._epoch_start = 0
        self._last_saved = 0

    def on_train_begin(self, logs=None):
        self._last_saved = optimizer_steps(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = optimizer_steps(self.model)

    def on_train_batch_end(self, batch, logs=None):
        if self.every_steps and self._epoch_start + batch + 1 - self._last_saved >= self.every_steps:
            self._save(optimizer_steps(self.model))

    def on_epoch_end(self, epoch, logs=None):
        if not self.every_steps:
            return   # --checkpoint-every 0: only at the end of the phase, as on PyTorch
        steps = optimizer_steps(self.model)
        if steps != self._last_saved:
            self._save(steps)

    def _save(self, steps: int) -> None:
        if self.is_chief:
            # timed(): counted for the goodput account, and announced as a pause (not a stall).
            with self.metrics.timed("checkpoint") if self.metrics is not None else contextlib.nullcontext():
                self.checkpoints.save(self.model, step=steps, epoch=steps // self.steps_per_epoch)
        self._last_saved = steps
