"""The Keras twins of Leap's PyTorch models, and the distillation model.

Layer sizes come from leap_trainer.specs.MODEL_LAYERS, shared with the PyTorch path, so
`--model mlp` is the same 784-128-10 network (ReLU between dense layers, logits out) in both.
"""

from __future__ import annotations

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


class Distiller(keras.Model):
    """Trains `student` against a frozen `teacher`:

        loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(labels, student)

    T^2 keeps the soft-target gradients on the same scale as the hard-label ones (Hinton et al.).
    Only compute_loss is overridden, so Keras' own train_step does gradients, distribution
    (the Loss objects scale by the replica count) and metrics; predictions are the student's.
    """

    def __init__(self, student: keras.Model, teacher: keras.Model, temperature: float, alpha: float, **kwargs):
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--alpha must be between 0 and 1, got {alpha}")
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.soft_loss = keras.losses.KLDivergence()
        self.hard_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def call(self, inputs, training=False):
        return self.student(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        teacher_logits = self.teacher(x, training=False)
        t = self.temperature
        soft = self.soft_loss(keras.ops.softmax(teacher_logits / t), keras.ops.softmax(y_pred / t))
        hard = self.hard_loss(y, y_pred)
        return self.alpha * (t * t) * soft + (1.0 - self.alpha) * hard
