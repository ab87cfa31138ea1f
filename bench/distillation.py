"""Does distillation help at the shipped defaults? Distilled student minus the same student trained alone.

Each run is the real CLI, `leap-train --workload distillation --seed S` plus any extra flags, so what
is measured is what a user gets. One run trains the teacher, the student alone and the distilled
student (same initial weights, data order and steps) and reports all three in its JSON summary.
Per framework: a per-seed table, the mean gain, its 95% confidence interval (Student's t over seeds)
and the wall time.

    .venv/bin/python bench/distillation.py                      # PyTorch and Keras, seeds 0-7
    .venv/bin/python bench/distillation.py --frameworks pytorch --seeds 5 -- --epochs 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (no SciPy in the image).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


@dataclass
class SeedResult:
    seed: int
    teacher: float
    alone: float
    distilled: float
    wall_seconds: float

    @property
    def gain(self) -> float:
        return self.distilled - self.alone


@dataclass
class Gain:
    mean: float
    low: float
    high: float
    wins: int
    n: int


def confidence_interval(gains: list[float]) -> Gain:
    """Mean and 95% interval of the mean (t distribution, n - 1 degrees of freedom)."""
    n = len(gains)
    mean = statistics.fmean(gains)
    if n < 2:
        return Gain(mean, -math.inf, math.inf, sum(g > 0 for g in gains), n)
    half = T_975[min(n - 1, len(T_975)) - 1] * statistics.stdev(gains) / math.sqrt(n)
    return Gain(mean, mean - half, mean + half, sum(g > 0 for g in gains), n)


def leap_train() -> list[str]:
    found = Path(sys.executable).parent / "leap-train"
    return [str(found)] if found.exists() else [sys.executable, "-m", "leap_trainer.cli"]


def run_seed(framework: str, seed: int, extra: list[str], workdir: Path, threads: int | None = None) -> SeedResult:
    summary = workdir / f"{framework}-{seed}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAP_")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if threads:  # on a shared machine, fewer threads than cores avoids spinning on contended cores
        env.update(OMP_NUM_THREADS=str(threads), TF_NUM_INTRAOP_THREADS=str(threads), TF_NUM_INTEROP_THREADS=str(threads))
    started = time.perf_counter()
    result = subprocess.run([*leap_train(), "--framework", framework, "--workload", "distillation",
                             "--seed", str(seed), "--summary", str(summary), *extra],
                            env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"leap-train failed ({framework}, seed {seed}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    data = json.loads(summary.read_text())
    return SeedResult(seed, data["teacher_accuracy"], data["student_alone_accuracy"], data["test_accuracy"], wall)


def measure(framework: str, seeds: list[int], extra: list[str] | None = None, threads: int | None = None,
            log=lambda line: None) -> tuple[list[SeedResult], Gain]:
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for seed in seeds:
            results.append(run_seed(framework, seed, list(extra or []), Path(tmp), threads))
            r = results[-1]
            log(f"{framework} seed {seed}: teacher {r.teacher:.3f} alone {r.alone:.3f} "
                f"distilled {r.distilled:.3f} gain {100 * r.gain:+.1f} ({r.wall_seconds:.0f} s)")
    return results, confidence_interval([r.gain for r in results])


def table(framework: str, results: list[SeedResult], gain: Gain) -> str:
    lines = [f"{framework}:", "",
             "| Seed | Teacher | Student alone | Distilled | Gain (points) | Wall s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.seed} | {100 * r.teacher:.1f}% | {100 * r.alone:.1f}% | {100 * r.distilled:.1f}% | "
                     f"{100 * r.gain:+.1f} | {r.wall_seconds:.0f} |")
    mean = lambda attr: 100 * statistics.fmean(getattr(r, attr) for r in results)  # noqa: E731
    lines.append(f"| mean | {mean('teacher'):.2f}% | {mean('alone'):.2f}% | {mean('distilled'):.2f}% | "
                 f"**{100 * gain.mean:+.2f}** | {sum(r.wall_seconds for r in results):.0f} (total) |")
    lines += ["", f"Gain {100 * gain.mean:+.2f} points, 95% CI [{100 * gain.low:+.2f}, {100 * gain.high:+.2f}], "
                  f"distilled better in {gain.wins} of {gain.n} seeds."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frameworks", default="pytorch,tensorflow")
    parser.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: the frameworks' own)")
    args = parser.parse_args(argv)
    print(f"leap-train --workload distillation {' '.join(extra)} (defaults otherwise), threads {args.threads or 'default'}; "
          f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    reports = []
    for framework in args.frameworks.split(","):
        results, gain = measure(framework, list(range(args.seeds)), extra, args.threads,
                                log=lambda line: print(line, flush=True))
        reports.append(table(framework, results, gain))
    print(f"load average at end: {os.getloadavg()[0]:.2f}\n")
    print("\n\n".join(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
