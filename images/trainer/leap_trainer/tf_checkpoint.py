"""Checkpoints for the Keras path: weights + optimizer state + step/epoch, resumable.

Layout under the run's checkpoint directory (a volume in the cluster):

    <dir>/keras/<phase>/ckpt-00000500.weights.h5   Keras weights file; includes the optimizer
                                                   variables and its iteration counter
    <dir>/keras/<phase>/state.json                 {"step": 500, "epoch": 8, "done": false, ...}

Weights go to a temporary file that is renamed into place, and state.json is written last and
atomically (rename), so a pod killed mid-save leaves the previous checkpoint as the latest one.
The file state.json names is never written again (saving the same step only updates state.json)
nor pruned. The two newest weight files are kept.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "state.json"
KEEP = 2


@dataclass
class CheckpointState:
    step: int            # optimizer steps applied when saved
    epoch: int           # completed epochs when saved
    done: bool           # the phase finished: resume skips its training
    weights: str         # file name of the weights, relative to the phase directory
    saved_at: float      # unix time


class PhaseCheckpoints:
    """Checkpoints of one training phase (classifier, teacher, distilled student...)."""

    def __init__(self, directory: str | os.PathLike, phase: str):
        self.directory = Path(directory) / "keras" / phase

    def latest(self) -> CheckpointState | None:
        path = self.directory / STATE_FILE
        if not path.exists():
            return None
        try:
            state = CheckpointState(**json.loads(path.read_text()))
        except (ValueError, TypeError) as error:
            raise RuntimeError(
                f"checkpoint state {path} is unreadable ({error}); delete it to start this phase afresh"
            ) from None
        if not (self.directory / state.weights).exists():
            raise RuntimeError(f"{path} names {state.weights}, which is missing; delete {path} to start afresh")
        return state

    def save(self, model, *, step: int, epoch: int, done: bool = False) -> CheckpointState:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"ckpt-{step:08d}.weights.h5"
        if name != self._pointed_name():
            temporary = self.directory / f".tmp-{name}"   # Keras wants the .weights.h5 ending
            model.save_weights(str(temporary))
            os.replace(temporary, self.directory / name)
        # else: this step's weights are what state.json already names: never rewrite them.
        state = CheckpointState(step=step, epoch=epoch, done=done, weights=name, saved_at=time.time())
        temporary_state = self.directory / f".{STATE_FILE}.tmp"
        temporary_state.write_text(json.dumps(asdict(state)))
        os.replace(temporary_state, self.directory / STATE_FILE)
        self._prune(keep_name=name)
        return state

    def _pointed_name(self) -> str | None:
        try:
            return json.loads((self.directory / STATE_FILE).read_text()).get("weights")
        except (OSError, ValueError, AttributeError):
            return None

    def restore(self, model) -> CheckpointState | None:
        """Load the latest checkpoint into `model` (built and compiled); None when there is none."""
        state = self.latest()
        if state is None:
            return None
        # Keras loads optimizer variables only if they exist: build them first.
        model.optimizer.build(model.trainable_variables)
        model.load_weights(str(self.directory / state.weights))
        return state

    def _prune(self, keep_name: str) -> None:
        weights = sorted(self.directory.glob("ckpt-*.weights.h5"))
        for old in weights[:-KEEP]:
            if old.name != keep_name:
                old.unlink(missing_ok=True)
