"""The Keras side of leap_trainer.sdk: `callbacks=[leap.KerasCallback(batch_size=64)]`.

Keras calls on_train_batch_end once per steps_per_execution group, with the index of the group's
last step, so a group counts its steps at the group's mean time, and the callback costs nothing per
step. Keras does not tell callbacks the batch size: it is given (samples per step of this process).
The loss is Keras' running loss, read once per reporting window. FLOPs per sample are known only
when given (no FLOP counter here): without them FLOP/s and MFU are absent. The time between two
fit() calls (one per epoch, say) is the loop's own: it counts in the next fit's first step group.

leap-train's Keras workloads use this callback too, with a Reporter of their own (`reporter=`:
its metrics already know the run's plan, resumed steps and peak, which the callback then leaves
as they are).
"""

from __future__ import annotations

import keras

from .devices import cpu_model, cuda_precision, peak_flops
from .sdk import HostClock, Reporter, reporter


def _device() -> tuple[str, str, float | None]:
    """(accelerator label, device name, peak FLOP/s of one device) of this process's first GPU, else the CPU."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "cpu", f"CPU ({cpu_model()})", None
    details = tf.config.experimental.get_device_details(gpus[0])
    name = details.get("device_name", "GPU")
    dtype = keras.mixed_precision.global_policy().compute_dtype
    precision = {"bfloat16": "bf16", "float16": "fp16"}.get(
        dtype, cuda_precision(details.get("compute_capability", (0, 0)), "tensorflow"))
    return "nvidia-gpu", name, peak_flops(name, precision)


def local_devices(strategy) -> int:
    """Devices this process trains on: its worker's, not the run's. num_replicas_in_sync counts every
    worker's replicas under MultiWorkerMirroredStrategy, while this process's samples/s (and so its
    FLOP/s) are its own: a peak of all workers would make its MFU too low by the number of workers."""
    try:
        return max(1, len(strategy.extended.worker_devices))
    except (RuntimeError, AttributeError, NotImplementedError):   # the default strategy: one device
        return 1


class KerasClock(HostClock):
    """The host clock (Keras runs steps in groups; a group's end is on the host) and the memory in use
    on `device` ("GPU:0", "TPU:0"), read once per window; None on CPU or where TF does not say."""

    def __init__(self, device: str | None):
        self.device = device

    def memory(self) -> float | None:
        if self.device is None:
            return None
        import tensorflow as tf

        try:
            return float(tf.config.experimental.get_memory_info(self.device)["current"])
        except (ValueError, KeyError, tf.errors.OpError):
            self.device = None   # this device does not report memory: stop asking
            return None


class KerasCallback(keras.callbacks.Callback):
    """Reports model.fit's steps, samples (batch_size per step), loss and epoch to Leap.

    total_steps: the run's planned optimizer steps; by default fit's epochs x steps per epoch when
    Keras knows them (a dataset of unknown length: unknown, so no progress or ETA).
    memory_device: the device whose memory in use is reported (default: the first GPU, if any).
    reporter: the Reporter to feed (default: the process's); one given is configured by its owner,
    so total steps come only from `total_steps` and the resumed step is left as it is.
    """

    def __init__(self, batch_size: int, *, total_steps: int | None = None, flops_per_sample: float | None = None,
                 memory_device: str | None = None, reporter: Reporter | None = None):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"KerasCallback(batch_size={batch_size!r}): give the samples of one training step "
                             f"of this process (fit's batch_size), a positive whole number")
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.flops_per_sample = flops_per_sample
        self.memory_device = memory_device
        self.reporter = reporter
        self._owned = reporter is None        # the process's reporter: this callback configures it
        self._fits = 0
        self._last_batch = -1
        self._loss = None

    def on_train_begin(self, logs=None):
        if self.reporter is None:
            self.reporter = reporter()
        r = self.reporter
        accelerator, device, peak = _device()
        memory_device = self.memory_device or ("GPU:0" if accelerator == "nvidia-gpu" else None)
        r.describe(framework="tensorflow", accelerator=accelerator, device=device,
                   peak_flops=peak * local_devices(self.model.distribute_strategy) if peak else None,
                   clock=None if self._fits else KerasClock(memory_device))
        r.set_flops_per_sample(self.flops_per_sample)
        if self._owned and r.metrics.steps == 0:
            r.set_initial_step(int(self.model.optimizer.iterations.numpy()))
        steps, epochs = self.params.get("steps"), self.params.get("epochs")
        r.set_total_steps(self.total_steps or (steps * epochs if self._owned and steps and epochs else None))
        r.loss_source = lambda: self._loss
        r.begin()
        self._fits += 1

    def on_epoch_begin(self, epoch, logs=None):
        self.reporter.metrics.set_epoch(epoch + 1)
        self._last_batch = -1

    def on_train_batch_end(self, batch, logs=None):
        group = batch - self._last_batch
        self._last_batch = batch
        if logs and "loss" in logs:
            self._loss = logs["loss"]       # a tensor: read only when a window closes
        if group > 0:
            self.reporter.step(group * self.batch_size, steps=group)

    def on_epoch_end(self, epoch, logs=None):
        self.reporter.flush(wait=False)   # the epoch's last steps show at once, as leap-train's do

    def on_train_end(self, logs=None):
        self.reporter.flush()
