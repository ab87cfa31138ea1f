"""FLOPs of one training step, counted from the model: the unit of Leap's FLOP/s and MFU.

Convention: model FLOPs as in PaLM's MFU and torchtitan, no recomputation, matmuls only.
A dense layer with an n_in x n_out weight does, per sample:

- forward: 2 * n_in * n_out (one multiply and one add per weight);
- backward, weight gradient: 2 * n_in * n_out;
- backward, input gradient: 2 * n_in * n_out, but only where something before the layer needs
  it. The first layer's input is the data, which needs no gradient, so the first layer does no
  input-gradient matmul. For the 784-128-10 MLP that layer holds 99% of the weights: the
  "6 x weights" rule of thumb overstates its training FLOPs by 1.49x.

Biases, activations, softmax and the loss are element-wise and not counted (as torch's
FlopCounterMode, which counts matmuls, does not). tests/test_trainer_numbers.py checks every
built-in model and workload against FlopCounterMode on a real training step.

Distillation: the teacher is frozen once trained, so both frameworks compute its soft targets
once for the whole training set before the student trains (leap_trainer.distill: its softened
outputs averaged over the 9 shifts of each image by up to 1 pixel, so 9 forward passes per
training sample). Those forward passes (teacher_logits_flops, all views counted) are outside the
timed training loop, so they are not part of the student phase's FLOPs per sample, FLOP/s or MFU;
the summary reports them separately. The teacher's own training is counted in the teacher phase:
it trains on randomly shifted images, and a shift is a gather (no FLOPs), so its FLOPs per sample
are a classifier's.
"""

from __future__ import annotations

from collections.abc import Sequence


def _dense(layers: Sequence[int]) -> list[int]:
    return [n_in * n_out for n_in, n_out in zip(layers[:-1], layers[1:])]


def forward_flops_per_sample(layers: Sequence[int]) -> int:
    """One forward pass (e.g. the teacher's logits in distillation)."""
    return 2 * sum(_dense(layers))


def training_flops_per_sample(layers: Sequence[int]) -> int:
    """Forward + backward of one training step, per sample: 6 per weight, minus the first layer's input gradient."""
    weights = _dense(layers)
    return 6 * sum(weights) - 2 * weights[0]
