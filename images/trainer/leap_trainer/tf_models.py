"""The Keras twins of Leap's PyTorch models, and the distillation model.

Layer sizes come from leap_trainer.specs.MODEL_LAYERS, shared with the PyTorch path, so
`--model mlp` is the same 784-128-10 network (ReLU between dense layers, logits out) in both.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras


def build_mlp(layers: Sequence[int], name: str = "mlp") -> keras.Model:
    """Dense layers of the given widths: layers[0] inputs ... layers[-1] logits."""
    inputs = keras.Input(shape=(layers[0],), name="pixels")
    hidden = inputs
    for index, width in enumerate(layers[1:-1]):
        hidden = keras.layers.Dense(width, activation="relu", name=f"hidden{index}")(hidden)
    logits = keras.layers.Dense(layers[-1], name="logits")(hidden)
    return keras.Model(inputs, logits, name=name)


@keras.saving.register_keras_serializable(package="leap")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """peak x orchestrator.lr_factor(step): linear warmup, then cosine decay to zero, as on PyTorch."""

    def __init__(self, peak: float, total_steps: int):
        self.peak = float(peak)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        from leap_trainer.orchestrator import WARMUP_FRACTION

        ops = keras.ops
        step = ops.cast(step, "float32")
        warmup = float(max(1, int(self.total_steps * WARMUP_FRACTION)))
        rising = (step + 1.0) / warmup
        progress = ops.minimum((step - warmup) / float(max(self.total_steps - warmup, 1)), 1.0)
        falling = 0.5 * (1.0 + ops.cos(math.pi * progress))
        return self.peak * ops.where(step < warmup, rising, falling)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps}


class Distiller(keras.Model):
    """Trains `student` against a frozen teacher's logits, computed once for the training set:

        loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(labels, student)

    T^2 keeps the soft-target gradients on the same scale as the hard-label ones (Hinton et al.).
    Training inputs are (pixels, teacher logits); evaluation and prediction take pixels alone.
    Only compute_loss is overridden, so Keras' own train_step does gradients, distribution
    (the Loss objects scale by the replica count) and metrics; predictions are the student's.
    """

    def __init__(self, student: keras.Model, temperature: float, alpha: float, **kwargs):
        super().__init__(**kwargs)
        self.student = student
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.soft_loss = keras.losses.KLDivergence()
        self.hard_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def call(self, inputs, training=False):
        if isinstance(inputs, (tuple, list)):
            inputs = inputs[0]
        return self.student(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        hard = self.hard_loss(y, y_pred)
        if not isinstance(x, (tuple, list)):
            return hard   # evaluation: no teacher logits
        t = self.temperature
        teacher = keras.ops.cast(x[1], "float32")
        student = keras.ops.cast(y_pred, "float32")
        soft = self.soft_loss(keras.ops.softmax(teacher / t), keras.ops.softmax(student / t))
        return self.alpha * (t * t) * soft + (1.0 - self.alpha) * hard
