"""Time a rank spends blocked in DDP's gradient all-reduce, waiting for the other ranks.

In synchronous data parallelism every rank waits for the slowest in the all-reduce, so every
rank's samples/s are equal and a straggler is invisible in them. What differs is each rank's own
work: its step time minus the time it sat in the all-reduce after its own backward was done.

A DDP communication hook sees that moment: DDP calls the hook for a bucket once the bucket's
gradients are computed, buckets in order, and the bucket flagged `is_last()` is the last one of the
step, so its call is when this rank's own backward is over. The hook runs DDP's default all-reduce
(same result as no hook) and marks each bucket's all-reduce done in the future's callback. The wait
of a step is then from the last bucket ready to the last all-reduce done: waiting for the others
plus the transfer itself (a slow rank arrives last and waits only for the transfer).

CPU: the marks are clock readings (the hook runs on the thread doing backward; the callbacks on
the process group's thread when the all-reduce completes). CUDA: the marks are events recorded on
the stream (the callback's stream waits on the collective), read once per reporting window like
torch_train.StepTimer's, so there is no host sync per step.

Not excluded: other collectives inside the step (DDP's buffer broadcast in forward, for models
with buffers such as BatchNorm; Leap's models have none).
"""

from __future__ import annotations

import threading
import time

import torch


class CollectiveWait:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._lock = threading.Lock()      # callbacks complete on the process group's thread
        self._steps: list[tuple[object, list]] = []   # (last bucket ready, [each bucket's all-reduce done])
        self._done: list = []              # done marks of the step whose buckets are being reduced

    @classmethod
    def attach(cls, model: torch.nn.Module, device: torch.device) -> "CollectiveWait | None":
        """Register on the DDP module inside `model` (under torch.compile too); None without DDP."""
        from torch.nn.parallel import DistributedDataParallel

        ddp = getattr(model, "_orig_mod", model)
        if not isinstance(ddp, DistributedDataParallel):
            return None
        waits = cls(device)
        ddp.register_comm_hook(ddp.process_group, waits.hook)
        return waits

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        # This device's current stream in the calling thread (the callback's: one that waits on the
        # collective), named explicitly: hooks and callbacks run on threads of their own.
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def hook(self, process_group, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ready = self._mark() if bucket.is_last() else None   # this rank's own backward is over
        done_marks = self._done
        future = allreduce_hook(process_group, bucket)

        def done(reduced):
            mark = self._mark()
            with self._lock:
                done_marks.append(mark)
            return reduced.value()

        chained = future.then(done)
        if ready is not None:
            with self._lock:
                self._steps.append((ready, done_marks))
                self._done = []
        return chained

    def read(self) -> float:
        """Seconds waited in the steps since the last read (their backward calls have returned)."""
        with self._lock:
            steps, self._steps = self._steps, []
        total = 0.0
        for ready, done_marks in steps:
            if not done_marks:
                continue
            if self.cuda:
                ready.synchronize()
                for mark in done_marks:
                    mark.synchronize()
                total += max(0.0, max(ready.elapsed_time(mark) for mark in done_marks) / 1e3)
            else:
                total += max(0.0, max(done_marks) - ready)
        return total
