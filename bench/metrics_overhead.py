"""What Prometheus metrics cost leap-train's loop: the same run with and without them.

    .venv/bin/python bench/metrics_overhead.py [--repeats 5]

Three variants of torch_train.fit on one epoch of 60,000 synthetic samples at batch 64
(the smallest, most step-bound setting), interleaved, medians:
- no metrics object (fit still times its steps through the SDK's Reporter, as it always does:
  what is left out is the TrainingMetrics update and its /metrics);
- leap-train's way: TrainingMetrics updated once per ~0.5 s window with accumulated values, and
  every step's time taken for the step-time histogram (a clock read per step on CPU, a CUDA event);
- the naive way: a report every step (report_seconds=0), which also reads the loss every step.
The target is at most 1% for leap-train's way. On a shared machine the end-to-end figures
are noisy, so the cost of one window's metric update (with its steps' times) is also timed alone
and expressed against the window: a bound that noise cannot hide.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from leap_trainer.data import load_dataset
from leap_trainer.flops import training_flops_per_sample
from leap_trainer.metrics import TrainingMetrics
from leap_trainer.specs import layers_of
from leap_trainer.torch_models import build_mlp
from leap_trainer.torch_run import device_name
from leap_trainer.torch_train import REPORT_SECONDS, DeviceData, fit, make_optimizer


def run(data: DeviceData, *, metrics: bool, report_seconds: float) -> float:
    torch.manual_seed(0)
    model = build_mlp("mlp").to(data.x_train.device)
    sink = TrainingMetrics(run="bench", namespace="bench", rank=0, framework="pytorch", accelerator="cpu",
                           port=None, flops_per_sample=training_flops_per_sample(layers_of("mlp")),
                           peak_flops=None, total_steps=len(data.x_train) // 64) if metrics else None
    result = fit(model, make_optimizer(model, 1e-3), None, data, batch_size=64, epochs=1,
                 metrics=sink, report_seconds=report_seconds)
    return result.train_seconds / (result.end_step - result.start_step)


def update_cost_seconds(steps_per_window: int, calls: int = 2_000) -> float:
    """Seconds per window update (report with every step's time + set_epoch), what fit() does once per window."""
    sink = TrainingMetrics(run="bench", namespace="bench", rank=0, framework="pytorch", accelerator="cpu",
                           port=None, flops_per_sample=1.0, peak_flops=None, total_steps=10**9)
    step_seconds = [REPORT_SECONDS / steps_per_window] * steps_per_window
    start = time.perf_counter()
    for _ in range(calls):
        sink.set_epoch(1)
        sink.report(steps=steps_per_window, samples=64 * steps_per_window, seconds=REPORT_SECONDS, loss=0.3,
                    step_seconds=step_seconds)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = DeviceData.from_dataset(load_dataset("synthetic", samples=60_000), device)
    variants = {"none": dict(metrics=False, report_seconds=REPORT_SECONDS),
                "windowed (leap-train)": dict(metrics=True, report_seconds=REPORT_SECONDS),
                "every step (naive)": dict(metrics=True, report_seconds=0.0)}
    run(data, metrics=True, report_seconds=REPORT_SECONDS)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, kwargs in variants.items():
            times[name].append(run(data, **kwargs))
    base = statistics.median(times["none"])
    print(f"device: {device_name(device)}; batch 64, 937 steps per run, {args.repeats} repeats, medians")
    for name, samples in times.items():
        step = statistics.median(samples)
        print(f"{name:>22}: {step * 1e6:8.1f} us/step  overhead {100 * (step / base - 1):+6.2f}%")
    windowed_steps = REPORT_SECONDS / base
    cost = update_cost_seconds(max(1, round(windowed_steps)))
    print(f"one window update costs {cost * 1e6:.2f} us; at {base * 1e6:.0f} us/step a 0.5 s window holds "
          f"{windowed_steps:,.0f} steps: {100 * cost / REPORT_SECONDS:.5f}% of training time "
          f"(a report every step would cost more: see the 'every step' row)")


if __name__ == "__main__":
    main()
