"""Knowledge distillation's framework-free part: the soft targets the student learns from.

The recipe (constants in specs.py, reasons and measurements in docs/trainer.md):
1. the teacher trains for TEACHER_EPOCH_FACTOR x the student's epochs on training images shifted
   at random by up to TEACHER_SHIFT_PIXELS (each framework shifts on its device, see
   torch_train.random_shift and tf_models.RandomShift);
2. the frozen teacher's soft targets are computed once, here: its softmax at temperature T,
   averaged over every shift of each training image by up to SOFT_TARGET_SHIFT_PIXELS. A teacher
   that has fitted its training images is nearly certain on them; averaged over the shifted
   views its outputs keep the similarities between classes that the student is meant to learn;
3. the student trains on the unshifted images, in the same order and for the same steps as the
   student trained alone, with alpha * T^2 * KL(targets || student_T) + (1 - alpha) * CE.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .specs import IMAGE_SIDE, SOFT_TARGET_SHIFT_PIXELS


def background(x: np.ndarray) -> float:
    """The value a shift fills uncovered pixels with: the darkest pixel (the digits' background)."""
    return float(x.min()) if x.size else 0.0


def shift_images(x: np.ndarray, dy: int, dx: int, fill: float) -> np.ndarray:
    """Flattened IMAGE_SIDE x IMAGE_SIDE images moved dy rows down and dx columns right."""
    side = IMAGE_SIDE
    images = x.reshape(len(x), side, side)
    out = np.full_like(images, fill)
    out[:, max(dy, 0):side + min(dy, 0), max(dx, 0):side + min(dx, 0)] = \
        images[:, max(-dy, 0):side + min(-dy, 0), max(-dx, 0):side + min(-dx, 0)]
    return out.reshape(len(x), side * side)


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def soft_target_shift(width: int, pixels: int = SOFT_TARGET_SHIFT_PIXELS) -> int:
    """The shift the soft targets average over for inputs `width` wide: none unless they are images."""
    return pixels if width == IMAGE_SIDE * IMAGE_SIDE else 0


def soft_target_views(width: int, pixels: int = SOFT_TARGET_SHIFT_PIXELS) -> int:
    """Teacher forward passes per training sample for the soft targets (9 for 28 x 28 images)."""
    return (2 * soft_target_shift(width, pixels) + 1) ** 2


def soft_targets(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, temperature: float,
                 pixels: int = SOFT_TARGET_SHIFT_PIXELS) -> np.ndarray:
    """The teacher's softmax(logits / T) averaged over the (2 * pixels + 1)^2 shifts of each image.

    `predict` maps a float32 batch of flattened images to logits (the frozen teacher, eval mode).
    Inputs that are not IMAGE_SIDE^2 wide (no image to shift) get the plain softened outputs.
    """
    pixels = soft_target_shift(x.shape[1], pixels)
    fill = background(x)
    total = np.zeros((len(x), 0), dtype=np.float64)
    views = 0
    for dy in range(-pixels, pixels + 1):
        for dx in range(-pixels, pixels + 1):
            view = shift_images(x, dy, dx, fill) if pixels else x
            probabilities = softmax(np.asarray(predict(view)), temperature)
            total = probabilities if views == 0 else total + probabilities
            views += 1
    return (total / views).astype(np.float32)
