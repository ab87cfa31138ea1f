"""The run's JSON summary (read by tests, benchmarks and `leap run`) and its one-line echo."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_summary(path: str | None, summary: dict[str, Any]) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, target)


def distillation_summary(*, teacher: str, teacher_accuracy: float, student_alone_accuracy: float,
                         distilled_accuracy: float, temperature: float, alpha: float, teacher_epochs: int) -> dict:
    """The keys a distillation run adds to the summary (both frameworks); `test_accuracy` is the
    distilled student's, and `distillation_gain` what distillation added over the same student
    trained alone (same initial weights, data order and steps)."""
    return {"teacher": teacher, "teacher_accuracy": teacher_accuracy, "teacher_epochs": teacher_epochs,
            "student_alone_accuracy": student_alone_accuracy, "distillation_gain": round(distilled_accuracy - student_alone_accuracy, 6),
            "temperature": temperature, "alpha": alpha}


def human_line(summary: dict[str, Any]) -> str:
    parts = [f"test accuracy {summary['test_accuracy'] * 100:.1f}%"]
    if summary.get("student_alone_accuracy") is not None:
        parts.append(f"student alone {summary['student_alone_accuracy'] * 100:.1f}%, "
                     f"teacher {summary['teacher_accuracy'] * 100:.1f}%")
        if summary.get("distillation_gain") is not None:
            parts.append(f"distillation gain {summary['distillation_gain'] * 100:+.1f} points")
    parts.append(f"{summary['samples_per_second']:,.0f} samples/s")
    parts.append(f"{summary['flops_per_second'] / 1e9:,.2f} GFLOP/s")
    parts.append(f"MFU {summary['mfu'] * 100:.1f}% ({summary['precision']})" if summary.get("mfu") is not None
                 else "MFU unknown (no peak for this device)")
    parts.append(f"{summary['steps']} steps of {summary['global_batch_size']} samples "
                 f"({summary['batch_size']} x {summary['world_size']}) in {summary['wall_seconds']:.1f} s")
    parts.append(f"{summary['world_size']} process(es) on {summary['device']}")
    if summary.get("resumed_from_step"):
        parts.append(f"resumed from step {summary['resumed_from_step']}")
    return " | ".join(parts)
