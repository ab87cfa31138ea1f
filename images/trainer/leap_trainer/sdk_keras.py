"""The Keras side of leap_trainer.sdk: `callbacks=[leap.KerasCallback(batch_size=64)]`.

Keras calls on_train_batch_end once per steps_per_execution group, with the index of the group's
last step, so a group counts its steps at the group's mean time, and the callback costs nothing per
step. Keras does not tell callbacks the batch size: it is given (samples per step of this process).
The loss is Keras' running loss, read once per reporting window. FLOPs per sample are known only
when given (no FLOP counter here): without them FLOP/s and MFU are absent.
"""

from __future__ import annotations

import keras

from .devices import cpu_model, cuda_precision, peak_flops
from .sdk import reporter


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


class KerasCallback(keras.callbacks.Callback):
    """Reports model.fit's steps, samples (batch_size per step), loss and epoch to Leap.

    total_steps: the run's planned optimizer steps; by default fit's epochs x steps per epoch when
    Keras knows them (a dataset of unknown length: unknown, so no progress or ETA).
    """

    def __init__(self, batch_size: int, *, total_steps: int | None = None, flops_per_sample: float | None = None):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"KerasCallback(batch_size={batch_size!r}): give the samples of one training step "
                             f"of this process (fit's batch_size), a positive whole number")
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.flops_per_sample = flops_per_sample
        self.reporter = None
        self._last_batch = -1
        self._loss = None

    def on_train_begin(self, logs=None):
        r = self.reporter = reporter()
        accelerator, device, peak = _device()
        r.describe(framework="tensorflow", accelerator=accelerator, device=device,
                   peak_flops=peak * max(1, self.model.distribute_strategy.num_replicas_in_sync) if peak else None)
        r.set_flops_per_sample(self.flops_per_sample)
        if r.metrics.steps == 0:
            r.set_initial_step(int(self.model.optimizer.iterations.numpy()))
        steps, epochs = self.params.get("steps"), self.params.get("epochs")
        r.set_total_steps(self.total_steps or (steps * epochs if steps and epochs else None))
        r.loss_source = lambda: self._loss
        r.begin()

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
