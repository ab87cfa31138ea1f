"""The PyTorch path of leap-train: real training, real DDP (gloo), real kills, through the real CLI.

Each run is a `leap-train` subprocess, as in a pod; results come from its JSON summary and
its live /metrics endpoints. Sizes are small so the file runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from leap_trainer import contract
from leap_trainer.orchestrator import SUMMARY_KEYS
from leap_trainer.torch_train import epoch_order

REPO = Path(__file__).resolve().parents[1]
LEAP_TRAIN = str(Path(sys.executable).parent / "leap-train")
pytestmark = pytest.mark.slow


def clean_env(**extra: str) -> dict[str, str]:
    """This process' environment minus anything that changes the process layout or defaults."""
    layout = {contract.ENV_RANK, contract.ENV_LOCAL_RANK, contract.ENV_WORLD_SIZE, contract.ENV_NODE_RANK,
              contract.ENV_NNODES, contract.ENV_NPROC_PER_NODE, contract.ENV_MASTER_ADDR, contract.ENV_MASTER_PORT}
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAP_") and k not in layout}
    env.update(extra)
    return env


def run_cli(*flags: str, env: dict[str, str] | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([LEAP_TRAIN, *flags], env=env or clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def train(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> dict:
    summary = tmp_path / "summary.json"
    result = run_cli(*flags, "--summary", str(summary), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(summary.read_text())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_pair() -> int:
    """A port p with p + 1 also free: local rank r serves metrics on p + r."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None


def metric_value(text: str, name: str) -> float | None:
    match = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_quick_start_classifier_reaches_90_percent_on_digits(tmp_path):
    # The README quick start: whatever manifests/examples/mnist-cpu.yaml asks for must reach 90%.
    workload = yaml.safe_load((REPO / "manifests/examples/mnist-cpu.yaml").read_text())["spec"]["workload"]
    summary = train(tmp_path, "--framework", "pytorch", "--workload", "classifier", "--model", workload["model"],
                    "--dataset", workload["dataset"], "--epochs", str(workload["epochs"]),
                    "--batch-size", str(workload["batchSize"]), "--lr", str(workload["learningRate"]),
                    "--checkpoint-dir", str(tmp_path / "ckpt"))
    assert summary["test_accuracy"] >= 0.90
    assert summary["steps"] == (4000 // workload["batchSize"]) * workload["epochs"]
    assert summary["framework"] == "pytorch" and summary["world_size"] == 1
    assert summary["samples_per_second"] > 0 and summary["flops_per_second"] > 0
    assert summary["mfu"] is None  # a CPU has no peak in the table: absent, not invented
    assert summary["resumed_from_step"] == 0
    assert set(summary) == set(SUMMARY_KEYS)  # the one schema of both frameworks
    assert summary["flops_per_sample"] == 409_088  # FlopCounterMode's count (tests/test_trainer_numbers.py)
    assert summary["flops_per_second"] == pytest.approx(summary["samples_per_second"] * 409_088)
    # The final model is a usable state_dict of the 784-128-10 MLP.
    state = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    assert state["0.weight"].shape == (128, 784) and state["2.weight"].shape == (10, 128)

    # Run again, finished: it says so and leaves the summary as it was (no 0 samples/s over it).
    written = (tmp_path / "summary.json").read_bytes()
    again = run_cli("--framework", "pytorch", "--workload", "classifier", "--model", workload["model"],
                    "--dataset", workload["dataset"], "--epochs", str(workload["epochs"]),
                    "--batch-size", str(workload["batchSize"]), "--lr", str(workload["learningRate"]),
                    "--checkpoint-dir", str(tmp_path / "ckpt"), "--summary", str(tmp_path / "summary.json"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete" in again.stdout and "--start-over" in again.stdout
    assert (tmp_path / "summary.json").read_bytes() == written


def test_a_users_npz_dataset_trains_with_its_own_train_test_split(tmp_path):
    # A user's own data, in the documented x_train/y_train/x_test/y_test form: here the shipped
    # digits (stored sorted by class), shuffled and re-split by hand into 3,000 training and
    # 2,000 test images of 28x28 uint8.
    import numpy as np
    shipped = np.load(REPO / "images/trainer/leap_trainer/data/digits.npz")
    order = np.random.default_rng(7).permutation(len(shipped["labels"]))
    images, labels = shipped["images"][order].reshape(-1, 28, 28), shipped["labels"][order]
    data = tmp_path / "my-digits.npz"
    np.savez(data, x_train=images[:3000], y_train=labels[:3000], x_test=images[3000:], y_test=labels[3000:])
    summary = train(tmp_path, "--framework", "pytorch", "--workload", "classifier", "--model", "mlp",
                    "--dataset", str(data), "--epochs", "5", "--batch-size", "64", "--lr", "0.001")
    assert summary["dataset"] == str(data)
    assert summary["steps"] == (3000 // 64) * 5  # the user's 3,000 training images, not the shipped split
    assert summary["test_accuracy"] >= 0.85 and summary["wall_seconds"] > 0


def test_distillation_reports_teacher_student_and_student_alone(tmp_path):
    ckpt = tmp_path / "ckpt"
    summary = train(tmp_path, "--workload", "distillation", "--model", "mlp", "--teacher", "mlp-large",
                    "--dataset", "digits", "--epochs", "3", "--batch-size", "64", "--lr", "0.001",
                    "--temperature", "4", "--alpha", "0.7", "--checkpoint-dir", str(ckpt))
    assert summary["workload"] == "distillation"
    for key in ("test_accuracy", "teacher_accuracy", "student_alone_accuracy"):
        assert 0.8 <= summary[key] <= 1.0, (key, summary[key])
    assert summary["teacher_epochs"] == 9  # 3x the student's by default
    assert summary["distillation_gain"] == pytest.approx(summary["test_accuracy"] - summary["student_alone_accuracy"])
    assert (ckpt / "teacher.pt").exists()
    assert set(summary) == set(SUMMARY_KEYS)
    assert set(summary["phases"]) == {"teacher", "student-alone", "student-distilled"}
    assert summary["phases"]["teacher"]["flops_per_sample"] == 2_407_424  # mlp-large trains
    assert summary["flops_per_sample"] == 409_088                        # the student, on precomputed soft targets
    # The soft targets: one teacher forward pass per shifted view (9) of each of the 4,000 training images.
    assert summary["teacher_logits_flops"] == 9 * 2 * (784 * 512 + 512 * 256 + 256 * 10) * 4000
    # A restart after a kill (run.json not marked complete), configured like a pod (the directory from
    # LEAP_CHECKPOINT_DIR), reuses the trained teacher instead of training it again, and the summary
    # defaults to <checkpoint dir>/summary.json.
    record = json.loads((ckpt / "run.json").read_text())
    (ckpt / "run.json").write_text(json.dumps({**record, "complete": False}))
    same = ["--workload", "distillation", "--epochs", "3", "--lr", "0.001", "--alpha", "0.7"]   # the first run's settings
    rerun = run_cli(*same, env=clean_env(**{contract.ENV_CHECKPOINT_DIR: str(ckpt)}))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "teacher loaded" in rerun.stdout
    assert json.loads((ckpt / "summary.json").read_text())["teacher_accuracy"] == summary["teacher_accuracy"]
    # The same directory with other distillation settings is refused, naming each changed flag.
    changed = run_cli(*same[:-2], "--alpha", "0.5", "--temperature", "2",
                      env=clean_env(**{contract.ENV_CHECKPOINT_DIR: str(ckpt)}))
    assert changed.returncode == contract.EXIT_CONFIG
    refusals = [line for line in changed.stderr.splitlines() if line.startswith("leap-train:")]
    assert len(refusals) == 1 and refusals[0].startswith(contract.CONFIG_ERROR_PREFIX), changed.stderr
    assert "--alpha: checkpoint 0.7, now 0.5" in changed.stderr and "--temperature" in changed.stderr
    assert "--lr" not in changed.stderr   # only the changed flags are named
    assert "--start-over" in changed.stderr and "Traceback" not in changed.stderr


def test_two_process_ddp_trains_with_world_size_2_and_both_ranks_export_metrics(tmp_path):
    port = free_port_pair()
    summary_path = tmp_path / "summary.json"
    env = clean_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), LEAP_RUN="ddp-test")
    process = subprocess.Popen(
        [LEAP_TRAIN, "--dataset", "synthetic", "--samples", "40000", "--epochs", "3", "--batch-size", "64",
         "--metrics-port", str(port), "--summary", str(summary_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen: dict[int, str] = {}
        deadline = time.monotonic() + 120
        while len(seen) < 2 and process.poll() is None and time.monotonic() < deadline:
            for rank, rank_port in enumerate((port, port + 1)):
                text = scrape(rank_port)
                if text and (metric_value(text, contract.M_STEPS) or 0) > 0:
                    seen[rank] = text
            time.sleep(0.2)
        output, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    assert sorted(seen) == [0, 1], f"ranks seen training: {sorted(seen)}\n{output[-3000:]}"
    for rank, text in seen.items():
        assert f'rank="{rank}"' in text and 'run="ddp-test"' in text
        assert metric_value(text, contract.M_SAMPLES_PER_SECOND) > 0
        assert metric_value(text, contract.M_TOTAL_STEPS) == (40000 // 2 // 64) * 3
        # Every step this rank took is one observation of its own time in the histogram.
        assert metric_value(text, contract.M_STEP_SECONDS + "_count") == metric_value(text, contract.M_STEPS)
    summary = json.loads(summary_path.read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 128
    assert summary["steps"] == (40000 // 2 // 64) * 3  # each rank trains half the data per epoch
    assert summary["test_accuracy"] > 0.5  # synthetic data is learnable: well above 10% chance


def test_global_batch_size_gives_two_processes_the_steps_of_one(tmp_path):
    flags = ["--dataset", "synthetic", "--samples", "8000", "--epochs", "1", "--global-batch-size", "128"]
    one = train(tmp_path, *flags)
    two = train(tmp_path, *flags, env=clean_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port())))
    assert (one["world_size"], one["batch_size"], one["global_batch_size"]) == (1, 128, 128)
    assert (two["world_size"], two["batch_size"], two["global_batch_size"]) == (2, 64, 128)
    assert one["steps"] == two["steps"] == 8000 // 128


def test_launcher_stops_the_other_process_and_fails_when_one_process_fails(tmp_path):
    port = free_port_pair()
    with socket.socket() as blocker:  # local rank 1's metrics port is taken: that rank fails at start
        blocker.bind(("0.0.0.0", port + 1))
        blocker.listen()
        result = run_cli("--dataset", "synthetic", "--samples", "20000", "--epochs", "50", "--metrics-port", str(port),
                         "--summary", str(tmp_path / "summary.json"),
                         env=clean_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port())), timeout=120)
    assert result.returncode != 0
    assert "--metrics-port" in result.stderr and "stopping the others" in result.stderr
    assert not (tmp_path / "summary.json").exists()


def test_ranks_get_disjoint_shards_that_cover_the_data_and_reshuffle_each_epoch():
    size, world = 1000, 4
    order = epoch_order(size, seed=7, epoch=0, device=torch.device("cpu"))
    shards = [set(order[r * 250:(r + 1) * 250].tolist()) for r in range(world)]
    assert set().union(*shards) == set(range(size)) and sum(map(len, shards)) == size
    assert torch.equal(order, epoch_order(size, seed=7, epoch=0, device=torch.device("cpu")))  # every rank agrees
    assert not torch.equal(order, epoch_order(size, seed=7, epoch=1, device=torch.device("cpu")))


def test_killed_mid_run_resumes_from_the_saved_step(tmp_path):
    ckpt = tmp_path / "ckpt"
    flags = ["--dataset", "synthetic", "--samples", "60000", "--epochs", "3", "--batch-size", "64",
             "--checkpoint-dir", str(ckpt), "--checkpoint-every", "50"]
    total = (60000 // 64) * 3
    process = subprocess.Popen([LEAP_TRAIN, *flags], env=clean_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (ckpt / "latest.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed: make it longer"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    saved_step = torch.load(ckpt / "latest.pt", weights_only=False)["step"]
    assert 0 < saved_step < total
    assert not (ckpt / "summary.json").exists()

    rerun = run_cli(*flags)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((ckpt / "summary.json").read_text())
    assert summary["resumed_from_step"] >= saved_step
    assert summary["steps"] == total
    assert summary["test_accuracy"] > 0.5

    # A checkpoint directory of another run is refused, not silently mixed in.
    other = run_cli(*flags[:-4], "--model", "mlp-large", "--checkpoint-dir", str(ckpt))
    assert other.returncode != 0 and "--checkpoint-dir" in other.stderr
    assert "--model: checkpoint 'mlp', now 'mlp-large'" in other.stderr and "Traceback" not in other.stderr


def test_metrics_port_in_use_is_one_clear_line(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("0.0.0.0", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = run_cli("--dataset", "synthetic", "--samples", "2000", "--epochs", "1", "--metrics-port", str(port),
                         timeout=120)
    assert result.returncode == contract.EXIT_CONFIG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port}" in lines[0] and "--metrics-port" in lines[0], result.stderr


@pytest.mark.parametrize("flags, named", [
    (["--model", "resnet9000"], "--model"),
    (["--epochs", "-1"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "fast"], "--lr"),
    (["--dataset", "/nonexistent/data.npz"], "--dataset"),
    (["--workload", "distillation", "--alpha", "2"], "--alpha"),
])
def test_bad_flags_fail_naming_the_flag(flags, named):
    result = run_cli(*flags, timeout=60)
    assert result.returncode != 0
    assert named in result.stderr, result.stderr


def test_malformed_env_default_is_named():
    result = run_cli(env=clean_env(**{contract.ENV_METRICS_PORT: "ninety-four"}), timeout=60)
    assert result.returncode != 0
    assert contract.ENV_METRICS_PORT in result.stderr and "--metrics-port" in result.stderr


def test_too_large_batch_for_the_data_is_explained():
    result = run_cli("--dataset", "synthetic", "--samples", "100", "--batch-size", "512", timeout=120)
    assert result.returncode != 0
    assert "--batch-size" in result.stderr


def test_docs_metrics_reference_lists_every_training_metric():
    text = (REPO / "docs/trainer.md").read_text()
    reference = text[text.index("## Metrics reference"):]
    for name, (kind, _) in contract.TRAIN_METRICS.items():
        row = next((line for line in reference.splitlines() if f"`{name}`" in line), None)
        assert row is not None, f"{name} missing from docs/trainer.md"
        assert kind in row
