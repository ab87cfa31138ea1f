"""The PyTorch side of leap_trainer.sdk: `leap.watch(model, optimizer)` and the CUDA clock.

Hooks, not a wrapper, so the user's objects stay what they were (DDP, compiled, checkpointed):
- a forward pre-hook on the model counts the samples of each training forward from the first
  tensor's leading dimension (shape metadata: no sync); several forwards before one optimizer step
  (gradient accumulation) add up. Forwards in eval mode or without grad are not training;
- the first training forward enters torch's FlopCounterMode and the optimizer's step pre-hook leaves
  it: the first step's forward and backward FLOPs over its samples are the FLOPs per sample (unless
  given). That step is the warm-up window, left out of the summary's throughput;
- the optimizer's step post-hook counts a step (a GradScaler step skipped for inf/NaN gradients is
  not one: the scaler does not call step()).
"""

from __future__ import annotations

from typing import Any

import torch

from .devices import cpu_model, peak_flops
from .sdk import Reporter


def batch_size(args: tuple, kwargs: dict) -> int | None:
    """The leading dimension of the first tensor among a forward's inputs (dicts and lists searched)."""
    stack: list[Any] = [*args, *kwargs.values()]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor):
            if item.dim() > 0:
                return int(item.shape[0])
        elif isinstance(item, dict):
            stack[:0] = list(item.values())
        elif isinstance(item, (list, tuple)):
            stack[:0] = list(item)
        elif hasattr(item, "keys") and hasattr(item, "__getitem__"):   # BatchEncoding and friends
            stack[:0] = [item[key] for key in item.keys()]
    return None


class CudaClock:
    """Step marks as CUDA events recorded on the current stream (asynchronous); a mark is ready when
    its event has completed (query() does not block); device times between marks. Losses of a window
    are summed on the device and copied to pinned host memory asynchronously; the value is read at a
    later window once that copy's event has completed, so the loss gauge lags one window."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pending: list[tuple[torch.Tensor, torch.cuda.Event, int]] = []

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ready(self, mark: torch.cuda.Event) -> bool:
        return mark.query()

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end) / 1e3

    def loss(self, values: list) -> float | None:
        tensors = [v.detach().float().reshape(()) for v in values if isinstance(v, torch.Tensor)]
        numbers = [float(v) for v in values if v is not None and not isinstance(v, torch.Tensor)]
        if tensors:
            total = torch.stack(tensors).sum().to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending.append((total, done, len(tensors)))
        value = None
        while self._pending and self._pending[0][1].query():
            total, _, count = self._pending.pop(0)
            value = float(total) / count
        if numbers:
            value = sum(numbers) / len(numbers)
        return value

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def memory(self) -> float | None:
        return float(torch.cuda.memory_allocated(self.device))   # the allocator's count: no sync


def clock_for(device: torch.device) -> Any:
    from .sdk import HostClock

    return CudaClock(device) if device.type == "cuda" else HostClock()


def precision_of(device: torch.device, dtype: torch.dtype) -> str:
    """The matmul precision of a forward: autocast's dtype, else the parameters' (fp32 in TF32 when allowed)."""
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_model()}, {torch.get_num_threads()} threads)"


class FlopCount:
    """torch's FlopCounterMode entered and left by hooks: FLOPs of one training step (forward + backward)."""

    def __init__(self):
        from torch.utils.flop_counter import FlopCounterMode

        self.mode = FlopCounterMode(display=False)
        self.active = False

    def start(self) -> None:
        self.mode.__enter__()
        self.active = True

    def stop(self) -> int:
        self.mode.__exit__(None, None, None)
        self.active = False
        return int(self.mode.get_total_flops())


class TorchWatch:
    """Hooks on one model and its optimizer feeding the process's Reporter (see the module docstring)."""

    def __init__(self, reporter: Reporter, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 total_steps: int | None = None, flops_per_sample: float | None = None,
                 samples_per_step: int | None = None):
        self.reporter = reporter
        self.model = model
        self.optimizer = getattr(optimizer, "optimizer", optimizer)   # accelerate/other wrappers: the real one
        self.samples_per_step = samples_per_step
        self.flops_per_sample = flops_per_sample
        self.counter: FlopCount | None = None
        self._samples = 0              # samples of training forwards since the last step
        self._described = False
        reporter.set_total_steps(total_steps)
        reporter.set_flops_per_sample(flops_per_sample)
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.optimizer.register_step_pre_hook(self._before_step),
            self.optimizer.register_step_post_hook(self._after_step),
        ]

    def _describe(self) -> None:
        """On the first training forward: where it runs and at what precision (for the MFU's peak)."""
        self._described = True
        parameter = next(self.model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        precision = precision_of(device, parameter.dtype if parameter is not None else torch.float32)
        name = describe_device(device)
        self.reporter.describe(
            framework="pytorch", accelerator="nvidia-gpu" if device.type == "cuda" else device.type,
            device=name, peak_flops=peak_flops(name, precision) if device.type == "cuda" else None,
            clock=clock_for(device))

    def _before_forward(self, module, args, kwargs):
        if not (module.training and torch.is_grad_enabled()):
            return None
        if not self._described:
            self._describe()
        self.reporter.begin()
        self._samples += batch_size(args, kwargs) or 0
        if self.flops_per_sample is None and self.counter is None:
            self.counter = FlopCount()
            self.counter.start()
        return None

    def _before_step(self, optimizer, args, kwargs):
        if self.counter is not None and self.counter.active:
            flops = self.counter.stop()
            samples = self.samples_per_step or self._samples
            if flops and samples:
                self.flops_per_sample = flops / samples
                self.reporter.set_flops_per_sample(self.flops_per_sample)
        return None

    def _after_step(self, optimizer, args, kwargs):
        samples = self.samples_per_step or self._samples
        self._samples = 0
        self.reporter.step(samples)

    def record_loss(self, loss: Any) -> None:
        self.reporter.set_loss(loss)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self.counter is not None and self.counter.active:
            self.counter.stop()
