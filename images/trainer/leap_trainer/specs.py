"""The built-in models, described framework-free so PyTorch and Keras build the same thing."""

from __future__ import annotations

# name -> layer widths, input first. Hidden layers use ReLU; the last layer emits logits.
MODEL_LAYERS: dict[str, tuple[int, ...]] = {
    "mlp": (784, 128, 10),              # the article's classifier (and the distillation student)
    "mlp-large": (784, 512, 256, 10),   # the distillation teacher
}


# Peak learning rate of Adam, the same default for every workload and framework. 1e-3 left the
# 784-128-10 MLP short of fitting its 4,000 training digits in 10 epochs under warmup + cosine
# (97.8% training accuracy), which also made distillation lose; 3e-3 fits them (99.9%).
DEFAULT_LR = 3e-3
DEFAULT_EPOCHS = 10      # the CLI's and the API's default; distillation needs the student to fit its data
WARMUP_FRACTION = 0.05   # warmup + cosine schedules: linear warmup over the first 5% of steps

# Knowledge distillation's recipe: one definition for both frameworks, the CLI and the API's defaults.
# Measured on the shipped digits in bench/RESULTS.md ("Distillation"); docs/trainer.md explains it.
DISTILLATION_TEACHER = "mlp-large"
DISTILLATION_TEMPERATURE = 4.0
DISTILLATION_ALPHA = 0.9            # weight of the soft (KL) term; 1 - alpha weighs cross-entropy
TEACHER_EPOCH_FACTOR = 3            # the teacher trains 3x the student's epochs (a teacher must be clearly better)
TEACHER_SHIFT_PIXELS = 2            # the teacher trains on images shifted by up to 2 pixels each way
SOFT_TARGET_SHIFT_PIXELS = 1        # soft targets: the teacher's softened outputs averaged over the
                                    # (2 * 1 + 1)^2 = 9 shifts of each training image by up to 1 pixel
IMAGE_SIDE = 28                     # inputs are 28 x 28 images, flattened (the shift needs the shape)


def layers_of(model: str) -> tuple[int, ...]:
    try:
        return MODEL_LAYERS[model]
    except KeyError:
        raise ValueError(f"unknown model {model!r}: use one of {', '.join(MODEL_LAYERS)}") from None


def teacher_epochs(student_epochs: int, requested: int | None = None) -> int:
    """Epochs the distillation teacher trains: as requested, else TEACHER_EPOCH_FACTOR x the student's."""
    return requested or TEACHER_EPOCH_FACTOR * student_epochs
