"""PyTorch versions of the models in specs.MODEL_LAYERS (Keras builds the same widths)."""

from __future__ import annotations

import torch.nn as nn

from .specs import layers_of


def build_mlp(model: str) -> nn.Sequential:
    """Dense layers with ReLU between them; the last layer emits logits."""
    widths = layers_of(model)
    layers: list[nn.Module] = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])  # no ReLU after the logits
