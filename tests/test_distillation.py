"""Distillation must beat the same student trained alone, in both frameworks, through the real CLI.

A small budget of bench/distillation.py: fixed seeds, the shipped digits, the default recipe
(teacher, temperature, alpha, learning rate) with fewer epochs. The previous recipe lost about
half a point here, so the test fails if distillation stops helping. Full measurement (8 seeds,
10 epochs, confidence intervals): bench/RESULTS.md, section "Distillation".
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import distillation  # noqa: E402

SEEDS = [0, 1, 2]
BUDGET = ["--epochs", "EPOCHS"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.mark.parametrize("framework", ["pytorch", "tensorflow"])
def test_distilled_student_beats_the_student_alone_at_the_default_recipe(framework):
    results, gain = distillation.measure(framework, SEEDS, BUDGET, threads=1)
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
