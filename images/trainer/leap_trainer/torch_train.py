"""The PyTorch training loop: one readable function, fast by construction.

Why it is faster than the textbook DataLoader loop:
- the whole dataset lives on the device as two tensors; a batch is an index_select of a
  shuffled index tensor (no DataLoader, no per-sample Python, no host->device copies);
- Adam runs fused (one kernel over all parameters; supported on CPU and CUDA);
- bf16 autocast on CUDA; fp32 on CPU, where bf16 matmuls are not faster;
- no per-step host sync: the loss is summed on the device and read once per reporting
  window (every ~0.5 s), which is also when Prometheus metrics are updated.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .collective_wait import CollectiveWait
from .orchestrator import lr_factor
from .specs import IMAGE_SIDE

REPORT_SECONDS = 0.5     # metrics window: cheap enough to be < 1% of step time, fresh enough for dashboards


@dataclass
class DeviceData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @classmethod
    def from_dataset(cls, dataset, device: torch.device) -> "DeviceData":
        def put(array):
            return torch.from_numpy(array).to(device)
        return cls(put(dataset.x_train), put(dataset.y_train), put(dataset.x_test), put(dataset.y_test))


@dataclass
class FitResult:
    start_step: int              # the step this call began at (> 0 after a resume)
    end_step: int
    samples: int                 # samples this rank trained on in this call
    train_seconds: float         # time in the training loop (evaluation excluded)
    accuracy: float | None       # test accuracy after the last epoch
    loss: float | None
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (epoch, seconds since start, accuracy)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds > 0 else 0.0


# --- building blocks ---------------------------------------------------------------------------

def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam with fused kernels (one kernel over all parameters; they exist on CPU and CUDA)."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def make_schedule(optimizer: torch.optim.Optimizer, total_steps: int, kind: str = "cosine"):
    """Warmup + cosine (Leap's default, orchestrator.lr_factor), or constant (the article's, for same-math comparisons)."""
    if kind == "constant":
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps))


def steps_per_epoch(train_size: int, batch_size: int, world_size: int) -> int:
    return (train_size // world_size) // batch_size


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, _indices: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets)


def distillation_loss(soft_targets: torch.Tensor, temperature: float, alpha: float):
    """KD loss (Hinton et al.): alpha * T^2 * KL(targets || student_T) + (1 - alpha) * CE.

    F.kl_div(log q, p) is KL(p || q) = sum p * (log p - log q): here p is the target (the teacher's
    softened distribution) and q the student's, as in Hinton et al. and Keras' KLDivergence.

    `soft_targets` are the frozen teacher's probabilities at temperature T for the whole train set
    (leap_trainer.distill.soft_targets), gathered per batch by the same indices as the inputs.
    T^2 keeps the soft term's gradients on the scale of the hard term's.
    """
    targets_t = soft_targets.float()

    def loss(logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        kl = F.kl_div(F.log_softmax(logits / temperature, dim=1), targets_t.index_select(0, indices),
                      reduction="batchmean")
        return alpha * temperature ** 2 * kl + (1 - alpha) * F.cross_entropy(logits, targets)

    return loss


def random_shift(x: torch.Tensor, pixels: int, fill: float, side: int = IMAGE_SIDE) -> torch.Tensor:
    """Each flattened side x side image moved by its own random offset in [-pixels, pixels]^2
    (uncovered pixels get `fill`): one gather on the device, no per-image Python."""
    n = x.shape[0]
    padded = F.pad(x.view(n, side, side), (pixels, pixels, pixels, pixels), value=fill)
    offsets = torch.randint(0, 2 * pixels + 1, (2, n), device=x.device)
    span = torch.arange(side, device=x.device)
    rows = span[None, :, None] + offsets[0][:, None, None]
    cols = span[None, None, :] + offsets[1][:, None, None]
    index = (rows * (side + 2 * pixels) + cols).view(n, -1)
    return padded.view(n, -1).gather(1, index)


class ShiftedInputs(torch.nn.Module):
    """Trains `net` on randomly shifted images (the distillation teacher); evaluates it unshifted."""

    def __init__(self, net: torch.nn.Module, pixels: int, fill: float):
        super().__init__()
        self.net, self.pixels, self.fill = net, pixels, fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.pixels > 0 and x.shape[1] == IMAGE_SIDE * IMAGE_SIDE:
            x = random_shift(x, self.pixels, self.fill)
        return self.net(x)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, autocast_dtype=None) -> float:
    model = unwrap(model)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for start in range(0, len(x), 8192):
        with _autocast(x.device, autocast_dtype):
            logits = model(x[start:start + 8192])
        correct += (logits.argmax(dim=1) == y[start:start + 8192]).sum()
    model.train(was_training)
    return correct.item() / max(len(y), 1)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model = unwrap(model)
    model.eval()
    return torch.cat([model(x[start:start + 8192]).float() for start in range(0, len(x), 8192)])


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def epoch_order(size: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The same permutation on every rank (shared seed), different every epoch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator).to(device)


class StepTimer:
    """Each step's wall time without a per-step host sync.

    CPU: the clock at the end of every step. CUDA: an event recorded on the stream at the end of
    every step (asynchronous, no sync); the events are read once, when the reporting window closes
    and the loop waits for the device anyway. Times are the stream's, so idle gaps between
    kernels (a launch-bound step) are part of a step, as they are of its wall time.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list = []
        self._spare: list = []

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = self._spare.pop() if self._spare else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        """Begin a window (after anything that is not training: evaluation, checkpoint writes)."""
        self._spare.extend(m for m in self._marks if not isinstance(m, float))
        self._marks = [self._mark()]

    def step(self) -> None:
        self._marks.append(self._mark())

    def read(self) -> list[float]:
        """The window's step times in seconds; starts the next window at the last step's end."""
        marks = self._marks
        if self.cuda:
            marks[-1].synchronize()
            times = [start.elapsed_time(end) / 1e3 for start, end in zip(marks, marks[1:])]
            self._spare.extend(marks[:-1])
        else:
            times = [end - start for start, end in zip(marks, marks[1:])]
        self._marks = marks[-1:]
        return times


# --- the loop ----------------------------------------------------------------------------------

def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, data: DeviceData, *,
        batch_size: int, epochs: int, rank: int = 0, world_size: int = 1, seed: int = 0,
        start_step: int = 0, loss_fn: Callable = cross_entropy, autocast_dtype=None,
        metrics=None, report_seconds: float = REPORT_SECONDS,
        checkpoint_every: int = 0, save_checkpoint: Callable[[int, int], None] | None = None,
        target_accuracy: float | None = None, log: Callable[[str], None] | None = None) -> FitResult:
    """Train `model` (plain, DDP or compiled) from `start_step` to `epochs` epochs.

    Each rank trains on its own contiguous slice of the epoch's shared permutation, so the
    ranks' shards are disjoint and together cover the data. Resuming at step s skips exactly
    the batches already trained in s's epoch. Stops early once `target_accuracy` is reached
    (used by the time-to-accuracy benchmark).
    """
    device = data.x_train.device
    shard_size = len(data.x_train) // world_size
    per_epoch = shard_size // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} x {world_size} process(es) exceeds the "
                         f"{len(data.x_train)} training samples")
    step = start_step
    samples = 0
    train_seconds = 0.0
    accuracy = last_loss = None
    history: list[tuple[int, float, float]] = []
    loss_sum = torch.zeros((), device=device)   # summed on the device: no host sync per step
    window_steps = 0
    timer = StepTimer(device) if metrics is not None else None   # step times feed the metrics' histogram
    waits = CollectiveWait.attach(model, device) if metrics is not None else None   # straggler signal
    started = window_start = time.perf_counter()

    def flush(warmup: bool = False) -> None:
        """Close the reporting window: the only place the loop waits for the device.

        A warm-up window (the first step: torch.compile, lazy init, allocator) goes to the
        metrics as it happened but is left out of the throughput this function returns.
        """
        nonlocal window_steps, window_start, train_seconds, last_loss, samples
        if window_steps == 0:
            return
        last_loss = (loss_sum / window_steps).item()
        now = time.perf_counter()
        seconds = now - window_start
        if not warmup:
            train_seconds += seconds
            samples += window_steps * batch_size
        step_seconds = timer.read() if timer is not None else None
        if metrics is not None:
            compute = sum(step_seconds) - (waits.read() if waits is not None else 0.0)
            metrics.report(steps=window_steps, samples=window_steps * batch_size, seconds=seconds, loss=last_loss,
                           step_seconds=step_seconds, compute_seconds=compute)
            if device.type == "cuda":
                metrics.set_memory(torch.cuda.memory_allocated(device))
        loss_sum.zero_()
        window_steps = 0
        window_start = time.perf_counter()

    def restart_window() -> None:
        """After evaluation or a checkpoint write: neither is training time."""
        nonlocal window_start
        window_start = time.perf_counter()
        if timer is not None:
            timer.start()

    model.train()
    if metrics is not None:
        metrics.training_started()
    if timer is not None:
        timer.start()
    for epoch in range(step // per_epoch, epochs):
        if metrics is not None:
            metrics.set_epoch(epoch + 1)
        shard = epoch_order(len(data.x_train), seed, epoch, device)[rank * shard_size:(rank + 1) * shard_size]
        for i in range(step - epoch * per_epoch, per_epoch):
            indices = shard[i * batch_size:(i + 1) * batch_size]
            inputs = data.x_train.index_select(0, indices)
            targets = data.y_train.index_select(0, indices)
            with _autocast(device, autocast_dtype):
                logits = model(inputs)
            loss = loss_fn(logits.float(), targets, indices)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            loss_sum += loss.detach()
            if timer is not None:
                timer.step()
            step += 1
            window_steps += 1
            if save_checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
                flush()
                save_checkpoint(step, epoch)
                restart_window()
            elif step == start_step + 1:
                flush(warmup=True)
            elif time.perf_counter() - window_start >= report_seconds:
                flush()
        flush()
        with metrics.timed("evaluate") if metrics is not None else contextlib.nullcontext():
            accuracy = evaluate(model, data.x_test, data.y_test, autocast_dtype)
        history.append((epoch + 1, time.perf_counter() - started, accuracy))
        if metrics is not None:
            metrics.set_accuracy(accuracy)
        if log is not None:
            loss_text = f"{last_loss:.4f}" if last_loss is not None else "-"
            log(f"epoch {epoch + 1}/{epochs}: step {step}, loss {loss_text}, test accuracy {accuracy:.4f}")
        restart_window()
        if target_accuracy is not None and accuracy >= target_accuracy:
            break
    if accuracy is None:  # resumed after the last step: nothing to train, still report accuracy
        accuracy = evaluate(model, data.x_test, data.y_test, autocast_dtype)
    return FitResult(start_step, step, samples, train_seconds, accuracy, last_loss, history)
