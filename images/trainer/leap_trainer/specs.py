"""The built-in models, described framework-free so PyTorch and Keras build the same thing."""

from __future__ import annotations

# name -> layer widths, input first. Hidden layers use ReLU; the last layer emits logits.
MODEL_LAYERS: dict[str, tuple[int, ...]] = {
    "mlp": (784, 128, 10),              # the article's classifier (and the distillation student)
    "mlp-large": (784, 512, 256, 10),   # the distillation teacher
}


def layers_of(model: str) -> tuple[int, ...]:
    try:
        return MODEL_LAYERS[model]
    except KeyError:
        raise ValueError(f"unknown model {model!r}: use one of {', '.join(MODEL_LAYERS)}") from None
