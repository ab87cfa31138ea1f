"""Keras callbacks that connect `model.fit` to Leap's checkpoints. (Metrics: the reporting SDK's
KerasCallback, the one users' programs add, fed into the phase's Reporter; see keras_train.)

With steps_per_execution = k, Keras calls on_train_batch_end once per k steps, so these
callbacks cost nothing per step. Step counts come from the optimizer's iteration counter
(the steps actually applied), read only when saving.
"""

from __future__ import annotations

import contextlib

import keras

from leap_trainer import contract

from leap_trainer.tf_checkpoint import PhaseCheckpoints


def optimizer_steps(model: keras.Model) -> int:
    return int(model.optimizer.iterations.numpy())


class CheckpointSaver(keras.callbacks.Callback):
    """Saves the phase about every `every_steps` optimizer steps and at every epoch end (with
    every_steps 0: neither; the phase's final save is the only one, as on PyTorch).

    Keras' batch index (the last step of each batch group, within the epoch) tells when a save
    is due, so the step counter is read only when saving. Only the chief worker writes.
    """

    def __init__(self, checkpoints: PhaseCheckpoints, *, every_steps: int, steps_per_epoch: int, is_chief: bool,
                 reporter=None):
        super().__init__()
        self.checkpoints = checkpoints
        # The phase's leap_trainer.sdk.Reporter: a save pauses its windows (a save is not training) and
        # counts as "checkpoint" time. Placed after the KerasCallback, which has counted the group by then.
        self.reporter = reporter
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
            # Out of the training windows; timed as "checkpoint" (goodput), announced as a pause (not a stall).
            paused = self.reporter.paused(contract.ACTIVITY_CHECKPOINT) if self.reporter else contextlib.nullcontext()
            with paused:
                self.checkpoints.save(self.model, step=steps, epoch=steps // self.steps_per_epoch)
        self._last_saved = steps
