"""FLOPs of training, counted from the model: the article's own unit of compute.

Convention (as in Kaplan et al. and MFU in the PaLM paper): a dense layer with an
n_in x n_out weight does 2*n_in*n_out FLOPs forward per sample (one multiply, one add)
and twice that backward, so training costs 6 FLOPs per weight per sample. Biases,
activations and the loss are a rounding error and are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence


def dense_weights(layers: Sequence[int]) -> int:
    return sum(n_in * n_out for n_in, n_out in zip(layers[:-1], layers[1:]))


def training_flops_per_sample(layers: Sequence[int]) -> float:
    return 6.0 * dense_weights(layers)


def forward_flops_per_sample(layers: Sequence[int]) -> float:
    """A frozen teacher in distillation only runs forward."""
    return 2.0 * dense_weights(layers)
