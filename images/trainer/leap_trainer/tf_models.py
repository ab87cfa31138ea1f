"""The Keras twins of Leap's PyTorch models, and the distillation model.

Layer sizes come from leap_trainer.specs.MODEL_LAYERS, shared with the PyTorch path, so
`--model mlp` is the same 784-128-10 network (ReLU between dense layers, logits out) in both.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras

from leap_trainer.specs import IMAGE_SIDE


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
        from leap_trainer.specs import WARMUP_FRACTION

        ops = keras.ops
        step = ops.cast(step, "float32")
        warmup = float(max(1, int(self.total_steps * WARMUP_FRACTION)))
        rising = (step + 1.0) / warmup
        progress = ops.minimum((step - warmup) / float(max(self.total_steps - warmup, 1)), 1.0)
        falling = 0.5 * (1.0 + ops.cos(math.pi * progress))
        return self.peak * ops.where(step < warmup, rising, falling)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps}


class RandomShift(keras.layers.Layer):
    """While training, moves each flattened side x side image by its own random offset of up to
    `pixels` rows and columns (uncovered pixels get `fill`); at inference it passes inputs through.
    Gathers with keras.ops, so it runs inside the compiled step (XLA on TPUs)."""

    def __init__(self, pixels: int, fill: float, side: int = IMAGE_SIDE, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.pixels, self.fill, self.side = int(pixels), float(fill), int(side)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        if not training or self.pixels == 0 or inputs.shape[-1] != self.side * self.side:
            return inputs
        ops, p, side = keras.ops, self.pixels, self.side
        width = side + 2 * p
        images = ops.reshape(inputs, (-1, side, side))
        padded = ops.reshape(ops.pad(images, ((0, 0), (p, p), (p, p)), constant_values=self.fill), (-1, width * width))
        offsets = keras.random.randint((ops.shape(inputs)[0], 2), 0, 2 * p + 1, seed=self.seed_generator)
        span = ops.arange(side)
        rows = span[None, :, None] + offsets[:, 0:1, None]
        cols = span[None, None, :] + offsets[:, 1:2, None]
        index = ops.reshape(rows * width + cols, (-1, side * side))
        return ops.cast(ops.take_along_axis(padded, index, axis=1), inputs.dtype)


def resume_random_shifts(model: keras.Model, steps: int) -> None:
    """Put every RandomShift of `model` where `steps` training steps leave it. Its SeedGenerator's
    state ([seed, draws], one draw per training step) is not in the weights file, so without this a
    resumed teacher would draw the first steps' shifts again instead of the ones an uninterrupted
    run draws next."""
    import numpy as np

    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, RandomShift):
            state = layer.seed_generator.state
            seed = int(np.asarray(state.value)[0])
            state.assign(np.array([seed, steps], dtype=state.dtype))


def build_shifted(net: keras.Model, pixels: int, fill: float, seed: int | None = None) -> keras.Model:
    """`net` trained on randomly shifted inputs (the distillation teacher); plain at inference."""
    inputs = keras.Input(shape=net.input_shape[1:], name="pixels")
    return keras.Model(inputs, net(RandomShift(pixels, fill, seed=seed, name="shift")(inputs)), name=f"{net.name}_shifted")


class Distiller(keras.Model):
    """Trains `student` on labels and the frozen teacher's soft targets:

        loss = alpha * T^2 * KL(targets || softmax(student / T)) + (1 - alpha) * CE(labels, student)

    The targets (leap_trainer.distill.soft_targets: the teacher's softmax at T, averaged over
    shifted views of each image) are computed once and arrive with the labels, y = (labels, targets),
    in the same order as the student trained alone sees its batches. T^2 keeps the soft-target
    gradients on the scale of the hard-label ones (Hinton et al.). Only compute_loss and
    compute_metrics are overridden, so Keras' own train_step does gradients, distribution (the Loss
    objects scale by the replica count) and metrics; evaluation (y = labels) uses cross-entropy.
    keras.distillation.Distiller is not used: it runs the teacher on each batch, so it cannot
    learn from targets averaged over views.
    """

    def __init__(self, student: keras.Model, temperature: float, alpha: float, **kwargs):
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--alpha must be between 0 and 1, got {alpha}")
        self.student = student
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.soft_loss = keras.losses.KLDivergence()
        self.hard_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def call(self, inputs, training=False):
        return self.student(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if not isinstance(y, (tuple, list)):
            return self.hard_loss(y, y_pred)
        labels, targets = y
        t = self.temperature
        soft = self.soft_loss(targets, keras.ops.softmax(keras.ops.cast(y_pred, "float32") / t))
        hard = self.hard_loss(labels, y_pred)
        return self.alpha * (t * t) * soft + (1.0 - self.alpha) * hard

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        labels = y[0] if isinstance(y, (tuple, list)) else y
        return super().compute_metrics(x, labels, y_pred, sample_weight)
