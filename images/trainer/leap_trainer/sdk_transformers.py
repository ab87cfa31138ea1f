"""The Hugging Face side of leap_trainer.sdk: `Trainer(..., callbacks=[leap.TransformersCallback()])`.

Steps are the Trainer's optimizer steps (on_step_end), samples come from the model's inputs (a
forward pre-hook, as leap.watch counts them: the last, smaller batch of an epoch counts as it is),
and FLOPs per sample are counted by torch's FlopCounterMode over the first optimizer step (forward
and backward of every micro-batch of it), unless given. Total steps: the Trainer's max_steps. The
loss is the Trainer's logged loss (every logging_steps).
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from .sdk import reporter
from .sdk_torch import FlopCount, batch_size, clock_for, describe_device, peak_flops, precision_of


class TransformersCallback(TrainerCallback):
    def __init__(self, *, total_steps: int | None = None, flops_per_sample: float | None = None):
        self.total_steps = total_steps
        self.flops_per_sample = flops_per_sample
        self.reporter = None
        self.counter: FlopCount | None = None
        self._samples = 0
        self._hook = None

    def _count(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self._samples += batch_size(args, kwargs) or 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        r = self.reporter = reporter()
        parameter = next(model.parameters()) if model is not None else None
        if parameter is not None:
            device = parameter.device
            name = describe_device(device)
            precision = "bf16" if args.bf16 else "fp16" if args.fp16 else precision_of(device, parameter.dtype)
            r.describe(framework="pytorch", accelerator="nvidia-gpu" if device.type == "cuda" else device.type,
                       device=name, peak_flops=peak_flops(name, precision) if device.type == "cuda" else None,
                       clock=clock_for(device))
            self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        r.set_flops_per_sample(self.flops_per_sample)
        if r.metrics.steps == 0:
            r.set_initial_step(state.global_step)
        r.set_total_steps(self.total_steps or state.max_steps or None)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.reporter.metrics.set_epoch(int(state.epoch or 0) + 1)

    def on_step_begin(self, args, state, control, **kwargs):
        self.reporter.begin()
        if self.flops_per_sample is None and self.counter is None:
            self.counter = FlopCount()
            self.counter.start()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.counter is not None and self.counter.active:
            flops = self.counter.stop()
            if flops and self._samples:
                self.flops_per_sample = flops / self._samples
                self.reporter.set_flops_per_sample(self.flops_per_sample)

    def on_step_end(self, args, state, control, **kwargs):
        samples, self._samples = self._samples, 0
        self.reporter.step(samples)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and isinstance(logs.get("loss"), (int, float)):
            self.reporter.set_loss(float(logs["loss"]))

    def on_epoch_end(self, args, state, control, **kwargs):
        self.reporter.flush(wait=False)   # the epoch's last steps show at once (finished ones, on a GPU)

    def on_train_end(self, args, state, control, **kwargs):
        if self.counter is not None and self.counter.active:
            self.counter.stop()
        if self._hook is not None:
            self._hook.remove()
        self.reporter.flush()
