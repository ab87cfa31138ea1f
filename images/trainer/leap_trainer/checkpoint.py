"""Checkpoints of the PyTorch path: written atomically, read back on start.

The operator's gang restart and `leap run` kill workers at arbitrary moments, so a file is
written to a temporary name in the same directory and then os.replace()d: a reader sees the
old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

LATEST = "latest.pt"        # model, optimizer, scheduler, step, epoch, RNG: what resume needs
FINAL_MODEL = "model.pt"    # the trained model's state_dict, written at the end
TEACHER = "teacher.pt"      # distillation: the trained teacher, reused on restart


def save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: Path) -> dict | None:
    """The checkpoint at path, or None when there is none."""
    if not path.exists():
        return None
    # weights_only=False: the file holds RNG state and plain Python values we wrote ourselves.
    return torch.load(path, map_location="cpu", weights_only=False)


def training_state(*, model, optimizer, scheduler, step: int, epoch: int) -> dict:
    """What resume needs. The run's config fingerprint lives in D/run.json (orchestrator.py)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": step,
        "epoch": epoch,
        "rng": {"torch": torch.get_rng_state()},
    }
