"""Distillation must beat the same student trained alone, in both frameworks, through the real CLI.

A small budget of bench/distillation.py: two fixed seeds instead of eight, on the shipped digits at
the defaults (what `leap-train --workload distillation` does without flags; fewer epochs would
not do: at 5 the student cannot fit its data and distillation loses, see docs/trainer.md). The
previous recipe lost about half a point here, so the test fails if distillation stops helping.
Full measurement (8 seeds, confidence intervals): bench/RESULTS.md, section "Distillation".
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import distillation  # noqa: E402

SEEDS = [0, 1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.mark.parametrize("framework", ["pytorch", "tensorflow"])
def test_distilled_student_beats_the_student_alone_at_the_default_recipe(framework):
    results, gain = distillation.measure(framework, SEEDS, threads=1)
    table = distillation.table(framework, results, gain)
    for r in results:
        assert r.teacher > r.alone, table  # the teacher is clearly the better model
    assert gain.wins == len(SEEDS), table
    assert gain.mean >= 0.005, table  # at least half a point on 1,000 test images


def test_confidence_interval_of_the_gain():
    gain = distillation.confidence_interval([0.01, 0.012, 0.008, 0.009, 0.011])
    assert gain.mean == pytest.approx(0.01)
    # stdev 0.00158, t(4) = 2.776: half-width 0.00196
    assert (gain.low, gain.high) == (pytest.approx(0.00804, abs=1e-5), pytest.approx(0.01196, abs=1e-5))
    assert gain.wins == 5 and gain.n == 5
    assert distillation.confidence_interval([0.01, -0.01]).low < 0


def test_shifts_move_the_image_and_fill_with_the_background():
    import numpy as np

    from leap_trainer.distill import shift_images
    image = np.zeros((1, 28, 28), dtype=np.float32) - 0.5
    image[0, 10, 20] = 3.0
    moved = shift_images(image.reshape(1, -1), 1, -2, fill=-0.5).reshape(28, 28)
    assert moved[11, 18] == 3.0 and (moved == 3.0).sum() == 1 and moved.min() == -0.5


def test_soft_targets_average_the_teachers_softened_outputs_over_the_nine_shifts():
    import numpy as np

    from leap_trainer.distill import shift_images, soft_targets, softmax
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 784)).astype(np.float32)
    weights = rng.standard_normal((784, 10)).astype(np.float32)
    seen = []

    def predict(batch):
        seen.append(batch)
        return batch @ weights

    targets = soft_targets(predict, x, temperature=4.0)
    assert len(seen) == 9 and targets.shape == (5, 10)
    assert np.allclose(targets.sum(axis=1), 1.0, atol=1e-5)
    fill = float(x.min())
    expected = np.mean([softmax(shift_images(x, dy, dx, fill) @ weights, 4.0)
                        for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    assert np.allclose(targets, expected, atol=1e-6)
    # Inputs that are not 28 x 28 images are not shifted: one view, the plain softened outputs.
    flat = rng.standard_normal((3, 20)).astype(np.float32)
    assert np.allclose(soft_targets(lambda b: b[:, :10], flat, 2.0), softmax(flat[:, :10], 2.0), atol=1e-6)


def test_torch_random_shift_is_a_shift_of_each_image():
    import numpy as np
    import torch

    from leap_trainer.distill import shift_images
    from leap_trainer.torch_train import random_shift
    torch.manual_seed(0)
    x = torch.randn(16, 784)
    shifted = random_shift(x, 2, fill=-9.0).numpy()
    for row, image in zip(shifted, x.numpy()):
        candidates = [shift_images(image[None], dy, dx, -9.0)[0] for dy in range(-2, 3) for dx in range(-2, 3)]
        assert any(np.array_equal(row, c) for c in candidates)


def test_keras_random_shift_is_a_shift_of_each_image_in_training_only():
    import numpy as np

    from leap_trainer.distill import shift_images
    from leap_trainer.tf_models import RandomShift
    x = np.random.default_rng(1).standard_normal((16, 784)).astype(np.float32)
    layer = RandomShift(2, fill=-9.0, seed=3)
    shifted = np.asarray(layer(x, training=True))
    for row, image in zip(shifted, x):
        candidates = [shift_images(image[None], dy, dx, -9.0)[0] for dy in range(-2, 3) for dx in range(-2, 3)]
        assert any(np.array_equal(row, c) for c in candidates)
    assert not np.array_equal(shifted, x)
    assert np.array_equal(np.asarray(layer(x, training=False)), x)


def test_leap_run_summary_shows_the_three_accuracies_and_the_gain():
    from rich.console import Console

    from leap_operator.local.display import summary_table
    summary = {"test_accuracy": 0.956, "student_alone_accuracy": 0.947, "teacher_accuracy": 0.976,
               "distillation_gain": 0.009, "steps": 620, "world_size": 1, "device": "cpu"}
    console = Console(record=True, width=100)
    console.print(summary_table(summary, attempts=1, total_seconds=12.0))
    text = console.export_text()
    for expected in ("95.60%", "student alone accuracy", "94.70%", "teacher accuracy", "97.60%",
                     "distillation gain", "+0.9 points"):
        assert expected in text, text


def test_a_resumed_keras_teacher_draws_the_shifts_an_uninterrupted_one_would():
    """The shift layer's random state is not in the weights file: resume puts it back by step count."""
    import numpy as np

    from leap_trainer.tf_models import RandomShift, resume_random_shifts
    from leap_trainer.tf_models import build_mlp, build_shifted
    x = np.random.default_rng(2).standard_normal((8, 784)).astype(np.float32)
    uninterrupted = build_shifted(build_mlp((784, 16, 10)), 2, fill=-9.0, seed=5)
    shift = next(layer for layer in uninterrupted._flatten_layers() if isinstance(layer, RandomShift))
    draws = [np.asarray(shift(x, training=True)) for _ in range(4)]
    resumed = build_shifted(build_mlp((784, 16, 10)), 2, fill=-9.0, seed=5)
    resume_random_shifts(resumed, 3)   # 3 steps were trained before the restart
    again = next(layer for layer in resumed._flatten_layers() if isinstance(layer, RandomShift))
    assert np.array_equal(np.asarray(again(x, training=True)), draws[3])
    assert not np.array_equal(draws[3], draws[0])
