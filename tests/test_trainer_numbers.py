"""The numbers leap-train reports, checked against independent counts: FLOPs against torch's
FlopCounterMode on real training steps, peaks and precisions for described devices, step-time
histograms, counters after a resume, CPU threads from a cgroup quota, the run's fingerprint.

In-process and small: the whole file runs in seconds.
"""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from leap_trainer import contract
from leap_trainer import devices as dev
from leap_trainer.flops import forward_flops_per_sample, training_flops_per_sample
from leap_trainer.metrics import STEP_SECONDS_BUCKETS, TrainingMetrics
from leap_trainer.orchestrator import (SUMMARY_KEYS, Phase, RunDirectory, build_summary, changed_fields,
                                       fingerprint)
from leap_trainer.specs import MODEL_LAYERS, layers_of
from leap_trainer.torch_models import build_mlp
from leap_trainer.sdk import Reporter
from leap_trainer.torch_train import DeviceData, cross_entropy, distillation_loss, fit, make_optimizer, predict_logits

BATCH = 32


def one_step_flops(model_name: str, loss_fn=cross_entropy) -> float:
    """FlopCounterMode's count of one real training step of leap-train's loop (fit), per sample."""
    torch.manual_seed(0)
    model = build_mlp(model_name)
    x = torch.randn(BATCH, 784)
    y = torch.randint(0, 10, (BATCH,))
    data = DeviceData(x, y, x[:0], y[:0])   # no test split: the evaluation after the epoch costs nothing
    with FlopCounterMode(display=False) as counter:
        result = fit(model, make_optimizer(model, 1e-3), None, data, batch_size=BATCH, epochs=1, loss_fn=loss_fn)
    assert result.end_step == 1
    return counter.get_total_flops() / BATCH


@pytest.mark.parametrize("model", sorted(MODEL_LAYERS))
def test_classifier_flops_per_sample_match_torch_flop_counter(model):
    counted = one_step_flops(model)
    assert training_flops_per_sample(layers_of(model)) == pytest.approx(counted, rel=0.02)


def test_the_first_layer_computes_no_input_gradient():
    # The figures: 6 x weights said 609,792 (mlp) and 3,210,240 (mlp-large).
    assert training_flops_per_sample(layers_of("mlp")) == 409_088
    assert training_flops_per_sample(layers_of("mlp-large")) == 2_407_424


@pytest.mark.parametrize("teacher", sorted(MODEL_LAYERS))
@pytest.mark.parametrize("student", sorted(MODEL_LAYERS))
def test_distillation_flops_match_torch_flop_counter_per_phase(student, teacher):
    """Distillation's phases as the run does them: the teacher trains (a classifier step of the
    teacher), its soft targets are computed once (forward passes, reported as teacher_logits_flops),
    and the student trains on them with the KD loss (no teacher work inside the step)."""
    assert training_flops_per_sample(layers_of(teacher)) == pytest.approx(one_step_flops(teacher), rel=0.02)
    teacher_model = build_mlp(teacher)
    x = torch.randn(BATCH, 784)
    with FlopCounterMode(display=False) as counter:
        logits = predict_logits(teacher_model, x)
    assert forward_flops_per_sample(layers_of(teacher)) == pytest.approx(counter.get_total_flops() / BATCH, rel=0.02)
    soft_targets = torch.softmax(logits / 4.0, dim=1)
    distilled = one_step_flops(student, distillation_loss(soft_targets, temperature=4.0, alpha=0.7))
    assert training_flops_per_sample(layers_of(student)) == pytest.approx(distilled, rel=0.02)


def test_keras_models_have_the_dense_layers_the_count_assumes():
    """Keras builds the same widths, so the same count (checked against FlopCounterMode above) applies."""
    from leap_trainer.keras_train import build, model_flops_per_sample

    for name, layers in MODEL_LAYERS.items():
        kernels = [tuple(w.shape) for w in build(name).weights if len(w.shape) == 2]
        assert kernels == list(zip(layers[:-1], layers[1:]))
        assert model_flops_per_sample(name) == training_flops_per_sample(layers)


# --- peaks and precision -----------------------------------------------------------------------------

T = 1e12


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA L4", "bf16", 121 * T),
    ("NVIDIA L40", "bf16", 181 * T),          # not an L4
    ("NVIDIA L40S", "bf16", 362 * T),         # not an L4 or an L40
    ("NVIDIA H100 80GB HBM3", "bf16", 989 * T),
    ("NVIDIA H100 PCIe", "bf16", 756 * T),
    ("NVIDIA H100 NVL", "tf32", 418 * T),
    ("NVIDIA H200", "bf16", 989 * T),
    ("NVIDIA H200 NVL", "bf16", 835 * T),     # not the SXM part
    ("NVIDIA GH200 480GB", "bf16", 989 * T),
    ("NVIDIA H800", "bf16", 989 * T),
    ("NVIDIA H20", "bf16", 148 * T),          # not an H200
    ("NVIDIA B200", "bf16", 2250 * T),
    ("NVIDIA B200", "tf32", None),            # unknown, not guessed
    ("NVIDIA GB200", "bf16", 2500 * T),       # not a B200
    ("NVIDIA A100-SXM4-80GB", "tf32", 156 * T),
    ("NVIDIA A100 80GB PCIe", "bf16", 312 * T),
    ("NVIDIA A10", "bf16", 125 * T),
    ("NVIDIA A10G", "bf16", 70 * T),          # not an A10
    ("Tesla V100-SXM2-16GB", "fp32", 15.7 * T),
    ("Tesla T4", "bf16", None),               # no native bf16
    ("NVIDIA RTX 6000 Ada Generation", "bf16", None),
    ("CPU (AMD EPYC 7B13, 2 threads)", "fp32", None),
    ("TPU v4-8", "bf16", 275 * T),
    ("TPU v5litepod-16", "bf16", 197 * T),
    ("TPU tpu-v5-lite-podslice", "bf16", 197 * T),   # the GKE node label, as the operator renders it
    ("TPU v5p-8", "bf16", 459 * T),
    ("TPU tpu-v6e-slice", "bf16", 918 * T),
    ("TPU tpu7x-8", "bf16", 2307 * T / 2),    # one chip is two devices
    ("TPU v3-8", "bf16", None),
    ("TPU (type unknown)", "bf16", None),
])
def test_peak_flops_match_device_names_exactly(name, precision, peak):
    assert dev.peak_flops(name, precision) == (pytest.approx(peak) if peak else None)


def test_bf16_only_where_the_gpu_does_it_natively():
    assert dev.cuda_precision((8, 0), "pytorch") == "bf16"
    assert dev.cuda_precision((9, 0), "pytorch") == "bf16"
    assert dev.cuda_precision((7, 5), "pytorch") == "fp32"    # T4
    assert dev.cuda_precision((7, 0), "pytorch") == "fp32"    # V100
    assert dev.cuda_precision((8, 6), "tensorflow") == "tf32"  # TensorFlow's default on Ampere+
    assert dev.cuda_precision((7, 0), "tensorflow") == "fp32"


def test_pytorch_on_a_v100_trains_fp32_and_divides_by_the_fp32_peak(monkeypatch):
    from leap_trainer import torch_run

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    accelerator = torch_run.describe(torch.device("cuda", 0))
    assert (accelerator.precision, accelerator.devices) == ("fp32", 1)
    assert accelerator.peak == pytest.approx(15.7 * T)


def scrape(metrics: TrainingMetrics) -> dict[str, float]:
    out = {}
    for family in metrics.collect():
        for sample in family.samples:
            key = sample.name + (f"{{le={sample.labels['le']}}}" if "le" in sample.labels else "")
            out[key] = sample.value
    return out


def worker_metrics(accelerator: dev.Accelerator, flops_per_sample: float) -> TrainingMetrics:
    return TrainingMetrics(run="r", namespace="n", rank=0, framework="tensorflow", accelerator="nvidia-gpu",
                           port=None, flops_per_sample=flops_per_sample, peak_flops=accelerator.peak,
                           total_steps=100)


@pytest.mark.parametrize("gpu, capability, precision, per_device", [
    ("NVIDIA A100-SXM4-80GB", (8, 0), "tf32", 156 * T),
    ("Tesla V100-SXM2-16GB", (7, 0), "fp32", 15.7 * T),
])
def test_keras_mfu_of_a_multi_gpu_worker_uses_all_its_devices_at_the_precision_used(gpu, capability, precision,
                                                                                     per_device):
    from leap_trainer.keras_train import describe_device
    from leap_trainer.tf_strategy import MIRRORED, StrategyPlan

    details = [{"device_name": gpu, "compute_capability": capability}] * 8
    accelerator = describe_device(StrategyPlan(MIRRORED, "8 GPUs", gpus=8), 8, gpu_details=details, env={})
    assert (accelerator.name, accelerator.precision, accelerator.devices) == (gpu, precision, 8)
    flops = training_flops_per_sample(layers_of("mlp"))
    metrics = worker_metrics(accelerator, flops)
    metrics.report(steps=100, samples=100 * 512, seconds=0.5)
    achieved = 100 * 512 / 0.5 * flops
    assert scrape(metrics)[contract.M_MFU] == pytest.approx(achieved / (8 * per_device))
    # The summary: the same achieved FLOP/s over the same 8 devices.
    args = SimpleNamespace(workload="classifier", dataset="digits", epochs=1, batch_size=64, lr=1e-3,
                           temperature=4.0, alpha=0.7)
    phase = Phase("classifier", "mlp", 100, 0, 0.9, 100 * 512 / 0.5, flops)
    summary = build_summary(args=args, framework="tensorflow", phases=[phase], device=gpu, precision=precision,
                            devices_per_process=8, world_size=8, peak_per_device=per_device, wall_seconds=1.0)
    assert summary["mfu"] == pytest.approx(achieved / (8 * per_device))


def test_keras_mfu_on_tpu7x_counts_two_devices_per_chip():
    from leap_trainer.keras_train import describe_device
    from leap_trainer.tf_strategy import TPU, StrategyPlan

    # One host of 4 TPU7x chips: 8 TensorFlow devices, 8 replicas.
    accelerator = describe_device(StrategyPlan(TPU, "tpu", tpu="local"), 8, gpu_details=[],
                                  env={"TPU_ACCELERATOR_TYPE": "tpu7x-8"})
    assert (accelerator.precision, accelerator.devices) == ("bf16", 8)
    assert accelerator.peak == pytest.approx(4 * 2307 * T)
    unknown = describe_device(StrategyPlan(TPU, "tpu", tpu="local"), 4, gpu_details=[], env={})
    assert unknown.peak is None   # no type from GKE or the operator: MFU unknown, not guessed
    from_operator = describe_device(StrategyPlan(TPU, "tpu", tpu="local"), 4, gpu_details=[],
                                    env={contract.ENV_TPU_TYPE: "tpu-v5-lite-podslice"})
    assert from_operator.peak == pytest.approx(4 * 197 * T)


# --- step times, counters, threads ---------------------------------------------------------------------

def test_histogram_records_each_step_not_the_window_mean():
    metrics = worker_metrics(dev.Accelerator("cpu", "fp32"), 1.0)
    steps = [60e-6] * 999 + [0.44]
    metrics.report(steps=1000, samples=64_000, seconds=sum(steps), step_seconds=steps)
    buckets = scrape(metrics)
    name = contract.M_STEP_SECONDS
    assert STEP_SECONDS_BUCKETS[0] == 20e-6 and STEP_SECONDS_BUCKETS[-1] == 60.0
    assert buckets[f"{name}_bucket{{le=5e-05}}"] == 0
    assert buckets[f"{name}_bucket{{le=0.0001}}"] == 999
    assert buckets[f"{name}_bucket{{le=0.25}}"] == 999
    assert buckets[f"{name}_bucket{{le=0.5}}"] == 1000
    assert buckets[f"{name}_sum"] == pytest.approx(sum(steps))


def test_reporter_on_the_host_clock_times_every_step_as_fit_uses_it():
    """The SDK's Reporter, which leap-train's loops report through: each step's own time in the
    histogram (the first step is the warm-up window), a pause (evaluation, a checkpoint write) in
    no step and no train window, but in the goodput account's activity."""
    metrics = worker_metrics(dev.Accelerator("cpu", "fp32"), 1.0)
    reporter = Reporter(metrics=metrics, report_seconds=60.0)
    reporter.begin()
    for pause in (0.001, 0.001, 0.03, 0.001):
        time.sleep(pause)
        reporter.step(64)
    with reporter.paused(contract.ACTIVITY_EVALUATE):
        time.sleep(0.05)
    time.sleep(0.001)
    reporter.step(64)
    reporter.flush()
    values = scrape(metrics)
    name = contract.M_STEP_SECONDS
    assert values[f"{name}_count"] == 5 == values[contract.M_STEPS] and values[contract.M_SAMPLES] == 320
    assert values[f"{name}_bucket{{le=0.025}}"] == 4 and values[f"{name}_bucket{{le=0.05}}"] == 5
    assert 0.033 < values[f"{name}_sum"] < 0.049             # the 0.05 s pause is in no step
    assert values[f"{name}_sum"] == pytest.approx(metrics.seconds[contract.ACTIVITY_TRAIN])
    assert metrics.seconds[contract.ACTIVITY_EVALUATE] >= 0.05
    assert reporter.steady_samples == 256 and reporter.steady_seconds < metrics.seconds[contract.ACTIVITY_TRAIN]


def test_reporter_on_cuda_closes_windows_at_finished_events_without_a_sync_per_step(monkeypatch):
    """The CUDA clock's bookkeeping with a stand-in for torch.cuda.Event (no GPU here; a stand-in
    cannot show real device timing): an event per step, a window closed only at the steps whose
    events have completed (queried, not waited for), one sync only when waited, events reused."""
    from leap_trainer.sdk_torch import CudaClock

    created, syncs = [], []

    class Event:
        def __init__(self, enable_timing=False):
            created.append(self)
            self.done = False

        def record(self):
            self.at, self.done = time.perf_counter(), False
            recorded.append(self)

        def query(self):
            return self.done

        def elapsed_time(self, end):
            return (end.at - self.at) * 1e3   # milliseconds, as CUDA reports

    recorded: list = []
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 12345)
    metrics = worker_metrics(dev.Accelerator("cpu", "fp32"), 1.0)
    reporter = Reporter(metrics=metrics, report_seconds=0.0)
    reporter.describe(clock=CudaClock(torch.device("cuda", 0)))
    reporter.begin()
    for pause in (0.001, 0.02, 0.001):
        time.sleep(pause)
        reporter.step(64)
    assert syncs == [] and metrics.steps == 0                # the device has finished nothing yet
    for event in recorded[:3]:                               # the start and the first two steps finish
        event.done = True
    reporter.step(64)
    assert syncs == [] and metrics.steps == 1                # the warm-up window: the first step alone
    reporter.flush(wait=False)
    assert syncs == [] and metrics.steps == 2                # the second finished step; the rest are not
    assert scrape(metrics)[f"{contract.M_STEP_SECONDS}_bucket{{le=0.01}}"] == 1
    assert metrics.memory_bytes == 12345
    for event in recorded:
        event.done = True
    reporter.flush()                                          # waited: one sync, every step closed
    assert len(syncs) == 1 and metrics.steps == 4
    made = len(created)
    reporter.step(64)
    assert len(created) == made                               # a spent event recorded again, none made


def test_fit_reports_one_histogram_observation_per_step():
    torch.manual_seed(0)
    model = build_mlp("mlp")
    x, y = torch.randn(640, 784), torch.randint(0, 10, (640,))
    metrics = worker_metrics(dev.Accelerator("cpu", "fp32"), 1.0)
    fit(model, make_optimizer(model, 1e-3), None, DeviceData(x, y, x[:64], y[:64]), batch_size=64, epochs=2,
        metrics=metrics)
    values = scrape(metrics)
    assert values[f"{contract.M_STEP_SECONDS}_count"] == 20 == values[contract.M_STEPS]


def test_fit_leaves_checkpoint_writes_out_of_step_times_and_train_time():
    """leap-train's loop pauses its Reporter around a checkpoint write: 4 writes of 0.1 s are in no
    step of the histogram, not in train seconds, nor in the summary's throughput (FitResult)."""
    torch.manual_seed(0)
    model = build_mlp("mlp")
    x, y = torch.randn(1280, 784), torch.randint(0, 10, (1280,))
    metrics = worker_metrics(dev.Accelerator("cpu", "fp32"), 1.0)
    saves = []

    def save(step, epoch):
        with metrics.timed(contract.ACTIVITY_CHECKPOINT):
            time.sleep(0.1)
        saves.append(step)

    began = time.perf_counter()
    result = fit(model, make_optimizer(model, 1e-3), None, DeviceData(x, y, x[:64], y[:64]), batch_size=64,
                 epochs=1, metrics=metrics, checkpoint_every=5, save_checkpoint=save)
    wall = time.perf_counter() - began
    values = scrape(metrics)
    name = contract.M_STEP_SECONDS
    assert saves == [5, 10, 15, 20] and values[f"{name}_count"] == 20 == values[contract.M_STEPS]
    assert values[f"{name}_bucket{{le=0.1}}"] == 20                       # no step holds a 0.1 s write
    train = metrics.seconds[contract.ACTIVITY_TRAIN]
    assert values[f"{name}_sum"] == pytest.approx(train) and train < wall - 0.4
    assert metrics.seconds[contract.ACTIVITY_CHECKPOINT] >= 0.4 and values[contract.M_COMPUTE_SECONDS] == train
    assert result.samples == 19 * 64 and 0 < result.train_seconds < train   # the first step: warm-up


def test_counters_count_this_process_and_progress_the_run_after_a_resume():
    metrics = TrainingMetrics(run="r", namespace="n", rank=0, framework="pytorch", accelerator="cpu", port=None,
                              flops_per_sample=1.0, peak_flops=None, total_steps=1240, initial_step=620)
    metrics.report(steps=10, samples=640, seconds=0.1, step_seconds=[0.01] * 10)
    values = scrape(metrics)
    assert values[contract.M_STEPS] == 10 and values[contract.M_SAMPLES] == 640
    assert values[contract.M_PROGRESS] == pytest.approx(630 / 1240)
    assert values[contract.M_ETA] == pytest.approx((1240 - 630) * 0.01)
    metrics.finish()
    assert scrape(metrics)[contract.M_PROGRESS] == 1.0


def test_operator_progress_shows_the_runs_step_after_a_resume():
    from leap_operator.progress import progress_from_metrics_text

    metrics = TrainingMetrics(run="r", namespace="n", rank=0, framework="pytorch", accelerator="cpu", port=None,
                              flops_per_sample=1.0, peak_flops=None, total_steps=1240, initial_step=620)
    metrics.report(steps=10, samples=640, seconds=0.1)
    from prometheus_client import generate_latest

    progress = progress_from_metrics_text(generate_latest(metrics.registry).decode())
    assert progress["step"] == 630 and progress["totalSteps"] == 1240


@pytest.mark.parametrize("files, processes, expected", [
    ({"cpu.max": "150000 100000\n"}, 1, 2),            # 1.5 CPUs: 2 threads
    ({"cpu.max": "100000 100000\n"}, 1, 1),
    ({"cpu.max": "400000 100000\n"}, 2, 2),            # 4 CPUs shared by 2 local processes
    ({"cpu.cfs_quota_us": "50000\n", "cpu.cfs_period_us": "100000\n"}, 1, 1),   # cgroup v1
])
def test_cpu_threads_follow_the_cgroup_quota(tmp_path, monkeypatch, files, processes, expected):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    paths = dict(v2=str(tmp_path / "cpu.max"), v1_quota=str(tmp_path / "cpu.cfs_quota_us"),
                 v1_period=str(tmp_path / "cpu.cfs_period_us"))
    assert dev.cpu_threads(processes, **paths) == expected


def test_cpu_threads_without_a_quota_use_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    paths = dict(v2=str(tmp_path / "cpu.max"), v1_quota=str(tmp_path / "none"), v1_period=str(tmp_path / "none"))
    assert dev.cpu_threads(1, **paths) == 8 and dev.cpu_threads(2, **paths) == 4


# --- the run's fingerprint and the one summary schema -------------------------------------------------

def distillation_args(**changes):
    base = dict(framework="pytorch", workload="distillation", model="mlp", dataset="digits", samples=None,
                epochs=3, batch_size=64, lr=1e-3, seed=0, teacher="mlp-large", teacher_epochs=None, temperature=4.0,
                alpha=0.7)
    return SimpleNamespace(**{**base, **changes})


def test_every_setting_that_changes_training_is_in_the_fingerprint():
    base = fingerprint(distillation_args(), world_size=1)
    for field, value in [("lr", 0.01), ("epochs", 4), ("batch_size", 32), ("alpha", 0.5), ("temperature", 2.0),
                         ("teacher", "mlp"), ("seed", 1), ("samples", 100), ("model", "mlp-large"),
                         ("dataset", "synthetic"), ("teacher_epochs", 5)]:
        assert changed_fields(base, fingerprint(distillation_args(**{field: value}), world_size=1)) == [field]
    assert changed_fields(base, fingerprint(distillation_args(), world_size=2)) == ["world_size"]


def test_a_changed_run_is_refused_naming_each_field_and_the_way_out(tmp_path, capsys):
    directory = RunDirectory(tmp_path)
    assert directory.begin(fingerprint=fingerprint(distillation_args(), 1), start_over=False) == "new"
    assert directory.begin(fingerprint=fingerprint(distillation_args(), 1), start_over=False) == "resume"
    with pytest.raises(SystemExit) as stopped:
        directory.begin(fingerprint=fingerprint(distillation_args(alpha=0.5, temperature=2.0), 1), start_over=False)
    assert stopped.value.code == contract.EXIT_CONFIG   # a configuration error (cli.py): not retried, fails the Job
    message = capsys.readouterr().err
    assert message.startswith(contract.CONFIG_ERROR_PREFIX) and message.count("\n") == 1
    assert "--alpha: checkpoint 0.7, now 0.5" in message and "--temperature: checkpoint 4.0, now 2.0" in message
    assert "--checkpoint-dir" in message and "--start-over" in message and "\n" == message[-1] == message[-1:]
    directory.complete()
    assert directory.begin(fingerprint=fingerprint(distillation_args(), 1), start_over=False) == "complete"
    (tmp_path / "latest.pt").write_text("old")
    (tmp_path / "notes.txt").write_text("the user's")
    assert directory.begin(fingerprint=fingerprint(distillation_args(alpha=0.5), 1), start_over=True) == "new"
    assert not (tmp_path / "latest.pt").exists() and (tmp_path / "notes.txt").exists()
    assert json.loads((tmp_path / "run.json").read_text())["fingerprint"]["alpha"] == 0.5


def test_summary_schema_table_in_the_docs_is_the_code_s():
    import re

    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "trainer.md")).read()
    section = text[text.index("## Summary"):text.index("## Metrics reference")]
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (.*) \|$", section, flags=re.M))
    assert rows == SUMMARY_KEYS


def test_more_processes_than_gpus_is_refused_at_start_up(capsys):
    from leap_trainer.torch_run import check_gpus_per_process

    check_gpus_per_process(2, 2)
    check_gpus_per_process(4, 0)   # CPU: processes share cores
    with pytest.raises(SystemExit):
        check_gpus_per_process(2, 1)
    message = capsys.readouterr().err
    assert "NPROC_PER_NODE=2" in message and "1 GPU" in message and "procsPerWorker" in message


def test_global_batch_size_is_split_evenly_over_the_processes(capsys):
    from leap_trainer.orchestrator import resolve_batch_size

    assert resolve_batch_size(SimpleNamespace(batch_size=64, global_batch_size=128), 2) == 64
    assert resolve_batch_size(SimpleNamespace(batch_size=64, global_batch_size=128), 1) == 128
    assert resolve_batch_size(SimpleNamespace(batch_size=32, global_batch_size=None), 4) == 32
    with pytest.raises(SystemExit):
        resolve_batch_size(SimpleNamespace(batch_size=64, global_batch_size=128), 3)
    message = capsys.readouterr().err
    assert "--global-batch-size 128" in message and "multiple of 3" in message


def test_one_workload_flow_drives_either_backend():
    """orchestrator.train_workload is the only place the phases' order and the distillation recipe
    live: a recording backend sees the teacher trained 3x the epochs on shifted images, soft targets
    averaged over 9 shifted views of each training image, then both students for --epochs."""
    import numpy as np

    from leap_trainer.orchestrator import train_workload

    class Recorder:
        train_size = 40

        def __init__(self):
            self.calls, self.phases, self.targets, self.views = [], [], None, 0
            self.x_train = np.random.default_rng(0).standard_normal((40, 784)).astype(np.float32)

        def train(self, phase, model_name, *, epochs, shift_pixels=0, soft_targets=None):
            self.calls.append((phase, model_name, epochs, shift_pixels, soft_targets is not None))
            if soft_targets is not None:
                self.targets = soft_targets
            accuracy = {"teacher": 0.95, "student-distilled": 0.93}.get(phase, 0.9)
            self.phases.append(Phase(phase, model_name, 10, 0, accuracy, 1.0, 1.0))
            return f"{phase}-model"

        def teacher_predictor(self, teacher):
            self.calls.append(("predictor of", teacher, None, None, None))

            def predict(x):
                self.views += 1
                return x[:, :10]

            return predict

        def save_final(self, model):
            self.calls.append(("final", model, None, None, None))

    backend = Recorder()
    facts = train_workload(backend, distillation_args())
    assert backend.calls == [("teacher", "mlp-large", 9, 2, False), ("predictor of", "teacher-model", None, None, None),
                             ("student-alone", "mlp", 3, 0, False), ("student-distilled", "mlp", 3, 0, True),
                             ("final", "student-distilled-model", None, None, None)]
    assert backend.views == 9 and backend.targets.shape == (40, 10)
    assert np.allclose(backend.targets.sum(axis=1), 1.0, atol=1e-5)
    assert facts["teacher_accuracy"] == 0.95 and facts["teacher_epochs"] == 9
    assert facts["distillation_gain"] == pytest.approx(0.03)
    assert facts["teacher_logits_flops"] == 9 * 40 * 2 * 535_040   # every shifted view is a forward pass
    assert train_workload(Recorder(), distillation_args(teacher_epochs=4))["teacher_epochs"] == 4
    classifier = Recorder()
    assert train_workload(classifier, distillation_args(workload="classifier")) is None
    assert classifier.calls == [("classifier", "mlp", 3, 0, False), ("final", "classifier-model", None, None, None)]
