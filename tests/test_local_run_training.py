"""`leap run` with the real trainer: the README's quick start, DDP with a killed worker, Ctrl-C.

Each test starts the real CLI in a subprocess, which starts real `leap-train` processes (PyTorch
on CPU, DDP over gloo); kills are real signals.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from leap_trainer.contract import EXIT_INVALID
from test_local_run import EXAMPLES, kill_run, leap, processes_of_run, start_leap, unique_name, wait_for

pytestmark = pytest.mark.slow


def test_quick_start_trains_mnist_cpu_to_90_percent_and_prints_the_accuracy(tmp_path):
    name = unique_name("quickstart")
    try:
        done = leap("run", str(EXAMPLES / "mnist-cpu.yaml"), "--workdir", str(tmp_path / "run"),
                    "--set", f"metadata.name={name}")
    finally:
        kill_run(name)
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"succeeded: test accuracy (\d+\.\d+)%", done.stdout)
    assert match, done.stdout
    assert float(match.group(1)) >= 90.0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.90
    assert summary["world_size"] == 1 and summary["attempts"] == 1
    assert "throughput" in done.stdout and "FLOP/s" in done.stdout and "wall time" in done.stdout


def test_ddp_run_survives_a_killed_worker_by_resuming_from_its_checkpoint(tmp_path):
    name = unique_name("ddp-kill")
    workdir = tmp_path / "run"
    # 30 epochs: long enough that the kill lands mid-run; checkpoints every 50 steps.
    proc = start_leap("run", str(EXAMPLES / "ddp-cpu.yaml"), "--workdir", str(workdir),
                      "--set", f"metadata.name={name}", "--set", "spec.workload.epochs=30",
                      "--set", "spec.checkpoint.everySteps=50")
    try:
        wait_for(lambda: (workdir / "checkpoints" / "latest.pt").exists(), 180, "the first checkpoint", proc)
        victim = int((workdir / "attempt-1" / "worker-1.pid").read_text())
        assert "leap-train" in Path(f"/proc/{victim}/cmdline").read_text()
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
        kill_run(name)
    assert proc.returncode == 0, out + err
    assert "attempt 1: worker 1 was killed by SIGKILL" in out
    assert "attempt 2/4: started" in out
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["world_size"] == 2          # DDP across the two local workers
    assert summary["attempts"] == 2
    assert summary["resumed_from_step"] > 0    # attempt 2 continued from attempt 1's checkpoint
    assert summary["steps"] == 1860            # and still did the whole run: 30 x ceil(4000 / 64)
    assert summary["test_accuracy"] >= 0.90
    assert re.search(r"worker 1: step \d+/1860", out)  # live progress, scraped from worker 1's metrics


def test_ctrl_c_stops_training_leaves_no_process_and_resume_continues(tmp_path):
    name = unique_name("ctrlc-train")
    workdir = tmp_path / "run"
    args = ["run", str(EXAMPLES / "mnist-cpu.yaml"), "--workdir", str(workdir),
            "--set", f"metadata.name={name}", "--set", "spec.checkpoint.everySteps=20"]
    proc = start_leap(*args)
    try:
        wait_for(lambda: (workdir / "checkpoints" / "latest.pt").exists(), 180, "the first checkpoint", proc)
        trainers = [cmd for _, cmd in processes_of_run(name) if "leap-train" in cmd]
        assert trainers, "no leap-train process while training"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, out + err
        assert processes_of_run(name) == []
        assert "stopped by SIGINT" in err and "--resume" in err
        assert "stopping 1 worker: waiting up to 10s" in out  # said while Ctrl-C waits for the worker

        # The same command again would mix or lose the checkpoints: refused, with both choices.
        again = leap(*args)
        assert again.returncode == EXIT_INVALID and (workdir / "checkpoints" / "latest.pt").exists()
        step = int(re.search(r"holds checkpoints of an earlier run \(step (\d+)\)", again.stderr).group(1))
        assert step >= 20 and " --resume    # continue from step" in again.stderr and " --fresh " in again.stderr

        resumed = leap(*args, "--resume")
    finally:
        proc.kill()
        kill_run(name)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from step {step} (checkpoints in {workdir / 'checkpoints'})" in resumed.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["resumed_from_step"] == step
    assert summary["test_accuracy"] >= 0.90


def test_two_tensorflow_workers_train_together_with_multi_worker_mirrored_strategy(tmp_path):
    # The same 2-worker example with the framework switched: each local worker gets the cluster
    # (LEAP_WORKER_HOSTS on local ports, its index) and Keras trains under MultiWorkerMirroredStrategy.
    name = unique_name("tf-ddp")
    try:
        done = leap("run", str(EXAMPLES / "ddp-cpu.yaml"), "--workdir", str(tmp_path / "run"),
                    "--set", f"metadata.name={name}", "--set", "spec.framework=tensorflow",
                    "--set", "spec.workload.epochs=2")
    finally:
        kill_run(name)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["framework"] == "tensorflow" and summary["strategy"] == "multi-worker"
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 64
    assert summary["test_accuracy"] >= 0.85
    for worker in (0, 1):
        log = (tmp_path / "run" / "attempt-1" / f"worker-{worker}.log").read_text()
        assert "strategy multi-worker: 2 workers" in log, log[-2000:]


def test_a_gpu_run_on_a_machine_without_one_says_so_in_one_line_and_trains_on_cpu(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the run would use it")
    name = unique_name("gpu-here")
    try:
        done = leap("run", str(EXAMPLES / "mnist-gpu.yaml"), "--workdir", str(tmp_path / "run"),
                    "--set", f"metadata.name={name}", "--set", "spec.workload.epochs=1")
    finally:
        kill_run(name)
    assert done.returncode == 0, done.stdout + done.stderr
    notes = [line for line in done.stdout.splitlines() if line.startswith("note:")]
    assert notes == ["note: no NVIDIA GPU usable here: running on CPU (gloo instead of NCCL)"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["device"].startswith("CPU") and summary["steps"] > 0


def test_goodput_of_a_run_restarted_once_shows_the_lost_work_and_the_restore_and_adds_up(tmp_path):
    # One worker of the larger MLP, checkpoints every 3,000 steps (5 s or more apart: 1.8 ms a step on
    # an idle core); it is killed 1.5 s after its first checkpoint, well before the second, and the
    # next attempt resumes from the first. Independent measures: the wall clock around `leap run`
    # and the checkpoint file's time.
    import time

    from leap_operator.goodput import PARTS

    name = unique_name("goodput")
    workdir = tmp_path / "run"
    began = time.time()
    proc = start_leap("run", str(EXAMPLES / "mnist-cpu.yaml"), "--workdir", str(workdir),
                      "--set", f"metadata.name={name}", "--set", "spec.workload.dataset=synthetic",
                      "--set", "spec.workload.samples=200000", "--set", "spec.workload.epochs=3",
                      "--set", "spec.workload.model=mlp-large", "--set", "spec.checkpoint.everySteps=3000")
    try:
        wait_for(lambda: (workdir / "checkpoints" / "latest.pt").exists(), 180, "the first checkpoint", proc)
        first_checkpoint = (workdir / "checkpoints" / "latest.pt").stat().st_mtime
        time.sleep(1.5)   # a scrape or two (every 1 s) after the checkpoint: steps that will be redone
        os.kill(int((workdir / "attempt-1" / "worker-0.pid").read_text()), signal.SIGKILL)
        killed = time.time()
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        kill_run(name)
    wall_clock = time.time() - began
    assert proc.returncode == 0, out + err
    summary = json.loads((workdir / "summary.json").read_text())
    record = summary["goodput"]
    assert summary["attempts"] == 2 and summary["resumed_from_step"] > 0
    parts = {part: record[f"{part}Seconds"] for part in PARTS}
    assert sum(parts.values()) == pytest.approx(record["wallSeconds"], abs=0.01)
    assert 0 < record["wallSeconds"] <= wall_clock
    assert all(value >= 0 for value in parts.values())
    assert summary["resumed_from_step"] == 3000, summary   # the first checkpoint: killed before the second
    # Redone steps were taken after the checkpoint and before the kill; they are priced at the
    # attempt's latest pace (between its last two scrapes), an estimate: 25% leeway for a pace that
    # changes on a busy machine.
    assert 0 < parts["lost"] <= 1.25 * (killed - first_checkpoint)
    assert parts["restore"] > 0 and parts["restarting"] > 0 and parts["startup"] > 0
    assert parts["checkpoint"] > 0 and parts["productive"] > 0
    assert record["ratio"] == pytest.approx(parts["productive"] / record["wallSeconds"], abs=1e-3)
    line = next(line for line in out.splitlines() if line.startswith("goodput "))
    assert line.startswith(f"goodput {100 * record['ratio']:.1f}% of {record['wallSeconds']:.1f}s: ")
    assert f"lost {parts['lost']:.1f}s" in line and f"restore {parts['restore']:.1f}s" in line
