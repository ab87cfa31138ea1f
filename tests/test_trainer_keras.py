"""The TensorFlow/Keras path of leap-train: real training through the real CLI.

Each training test runs `leap-train --framework tensorflow ...` in a subprocess (as a pod
does) and reads its JSON summary; the strategy choice is a pure function, tested as a table.
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

from leap_trainer import contract
from leap_trainer.orchestrator import SUMMARY_KEYS
from leap_trainer.tf_checkpoint import STATE_FILE, PhaseCheckpoints
from leap_trainer.tf_strategy import (
    DEFAULT,
    MIRRORED,
    MULTI_WORKER,
    TPU,
    TPU_LOAD_LIBRARY,
    StrategyConfigError,
    choose_strategy,
    keep_libtpu_unloaded_without_tpu,
)

LEAP_TRAIN = str(Path(sys.executable).parent / "leap-train")


def leap_train_env(**extra: str) -> dict[str, str]:
    """The test process' environment without anything that would change the strategy."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LEAP_", "TPU_", "TF_CONFIG")) and k not in ("TPU_NAME",)}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(extra)
    return env


def train(tmp_path: Path, *flags: str, env: dict[str, str] | None = None, name: str = "summary",
          timeout: int = 240) -> dict:
    summary = tmp_path / f"{name}.json"
    command = [LEAP_TRAIN, "--framework", "tensorflow", *flags, "--summary", str(summary)]
    result = subprocess.run(command, env=env or leap_train_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-4000:]}"
    return json.loads(summary.read_text())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- strategy selection -----------------------------------------------------------------------------

TWO_WORKERS = json.dumps({"cluster": {"worker": ["w0:2222", "w1:2222"]}, "task": {"type": "worker", "index": 1}})
ONE_WORKER = json.dumps({"cluster": {"worker": ["w0:2222"]}, "task": {"type": "worker", "index": 0}})


@pytest.mark.parametrize(
    ("env", "gpus", "tpu_devices", "kind"),
    [
        ({}, 0, False, DEFAULT),
        ({}, 1, False, DEFAULT),
        ({}, 4, False, MIRRORED),
        ({}, 0, True, TPU),                                                    # /dev/accel0 on a TPU VM
        ({contract.ENV_TPU_WORKER_ID: "0", contract.ENV_TPU_WORKER_HOSTNAMES: "t0"}, 0, False, TPU),  # GKE TPU pod
        ({contract.ENV_ACCELERATOR: "google-tpu"}, 0, False, TPU),
        ({"TPU_NAME": "my-tpu"}, 0, False, TPU),                               # remote TPU by name
        ({contract.ENV_TF_CONFIG: TWO_WORKERS}, 0, False, MULTI_WORKER),
        ({contract.ENV_TF_CONFIG: TWO_WORKERS}, 8, False, MULTI_WORKER),       # multi-worker beats multi-GPU
        ({contract.ENV_TF_CONFIG: ONE_WORKER}, 2, False, MIRRORED),            # one worker is not multi-worker
        ({contract.ENV_TF_CONFIG: TWO_WORKERS, contract.ENV_ACCELERATOR: "google-tpu"}, 0, False, TPU),
        ({contract.ENV_WORKER_HOSTS: "a:2222,b:2222", contract.ENV_WORKER_INDEX: "1"}, 0, False, MULTI_WORKER),
        ({contract.ENV_WORKER_HOSTS: "a:2222", contract.ENV_WORKER_INDEX: "0"}, 0, False, DEFAULT),
        ({contract.ENV_ACCELERATOR: "nvidia-gpu"}, 2, False, MIRRORED),
    ],
)
def test_strategy_is_chosen_from_the_environment(env, gpus, tpu_devices, kind):
    assert choose_strategy(env, gpu_count=gpus, tpu_devices=tpu_devices).kind == kind


def test_tf_config_is_built_from_leap_worker_env():
    plan = choose_strategy({contract.ENV_WORKER_HOSTS: "run-0.svc:2222, run-1.svc:2222,run-2.svc:2222",
                            contract.ENV_WORKER_INDEX: "2"})
    assert plan.kind == MULTI_WORKER and plan.tf_config_from_leap
    assert plan.tf_config == {"cluster": {"worker": ["run-0.svc:2222", "run-1.svc:2222", "run-2.svc:2222"]},
                              "task": {"type": "worker", "index": 2}}
    assert plan.workers == 3 and plan.worker_index == 2 and not plan.is_chief
    # An explicit TF_CONFIG wins over the Leap variables and is not rewritten.
    explicit = choose_strategy({contract.ENV_TF_CONFIG: TWO_WORKERS, contract.ENV_WORKER_HOSTS: "a:1,b:1,c:1",
                                contract.ENV_WORKER_INDEX: "0"})
    assert explicit.workers == 2 and not explicit.tf_config_from_leap and explicit.worker_index == 1


def test_tpu_resolver_target_and_host_rank():
    assert choose_strategy({contract.ENV_ACCELERATOR: "google-tpu"}).tpu == "local"  # TPU VM / GKE: attached
    assert choose_strategy({"TPU_NAME": "my-tpu"}).tpu is None                     # resolver reads TPU_NAME
    host = choose_strategy({contract.ENV_TPU_WORKER_ID: "0", contract.ENV_TPU_WORKER_HOSTNAMES: "t0"})
    assert (host.kind, host.workers, host.worker_index, host.is_chief) == (TPU, 1, 0, True)


def test_a_multi_host_tpu_slice_is_refused_by_the_trainer_too():
    # TPUStrategy drives one host: on every host of a multi-host slice it would train its own model.
    # The CRD refuses such runs; leap-train refuses them as well when started there by other means.
    for worker_id in ("0", "1"):
        with pytest.raises(StrategyConfigError) as error:
            choose_strategy({contract.ENV_TPU_WORKER_ID: worker_id, contract.ENV_TPU_WORKER_HOSTNAMES: "t0,t1"})
        assert contract.TF_MULTI_HOST_TPU_UNSUPPORTED in str(error.value)
        assert contract.ENV_TPU_WORKER_HOSTNAMES in str(error.value) and "single-host" in str(error.value)


def test_libtpu_stays_unloaded_only_where_there_is_no_tpu():
    """The tf-tpu image's TensorFlow loads libtpu on import unless TPU_LOAD_LIBRARY=0, and without a
    TPU that load hangs on the GCE metadata server: leap-train sets it only when no TPU is expected."""
    cpu_env: dict[str, str] = {}
    keep_libtpu_unloaded_without_tpu(cpu_env, tpu_devices=False)
    assert cpu_env == {TPU_LOAD_LIBRARY: "0"}
    tpu_env = {contract.ENV_ACCELERATOR: "google-tpu"}
    keep_libtpu_unloaded_without_tpu(tpu_env, tpu_devices=False)
    assert TPU_LOAD_LIBRARY not in tpu_env
    attached: dict[str, str] = {}
    keep_libtpu_unloaded_without_tpu(attached, tpu_devices=True)  # /dev/accel0 on a TPU VM
    assert attached == {}
    explicit = {TPU_LOAD_LIBRARY: "1"}
    keep_libtpu_unloaded_without_tpu(explicit, tpu_devices=False)
    assert explicit == {TPU_LOAD_LIBRARY: "1"}


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({contract.ENV_TF_CONFIG: "{not json"}, [contract.ENV_TF_CONFIG, "JSON"]),
        ({contract.ENV_WORKER_HOSTS: "a:2222,b:2222"}, [contract.ENV_WORKER_INDEX, "0..1"]),
        ({contract.ENV_WORKER_HOSTS: "a:2222,b:2222", contract.ENV_WORKER_INDEX: "2"}, [contract.ENV_WORKER_INDEX, "0..1"]),
        ({contract.ENV_WORKER_HOSTS: "a:2222,b:2222", contract.ENV_WORKER_INDEX: "x"}, [contract.ENV_WORKER_INDEX]),
        ({contract.ENV_WORKER_HOSTS: "a,b", contract.ENV_WORKER_INDEX: "0"}, [contract.ENV_WORKER_HOSTS, "host:port"]),
        ({contract.ENV_TPU_WORKER_ID: "first"}, [contract.ENV_TPU_WORKER_ID]),
    ],
)
def test_inconsistent_cluster_env_names_the_variable(env, names):
    with pytest.raises(StrategyConfigError) as error:
        choose_strategy(env)
    for name in names:
        assert name in str(error.value)


# --- real training ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_keras_classifier_reaches_90_percent_on_shipped_digits(tmp_path: Path):
    summary = train(tmp_path, "--workload", "classifier", "--model", "mlp", "--dataset", "digits",
                    "--epochs", "10", "--batch-size", "64", "--lr", "0.001",
                    "--checkpoint-dir", str(tmp_path / "ckpt"))
    assert summary["test_accuracy"] >= 0.90, summary
    assert summary["framework"] == "tensorflow" and summary["world_size"] == 1
    assert summary["steps"] == 10 * (4000 // 64)
    assert summary["samples_per_second"] > 0 and summary["flops_per_second"] > 0
    assert summary["device"] and summary["resumed_from_step"] == 0
    assert (tmp_path / "ckpt" / "keras" / "final.keras").is_file()
    assert set(summary) == set(SUMMARY_KEYS)  # the one schema of both frameworks
    assert summary["flops_per_sample"] == 409_088 and summary["precision"] == "fp32" and summary["mfu"] is None

    # Run again, finished: it says so and leaves the summary as it was.
    written = (tmp_path / "summary.json").read_bytes()
    command = [LEAP_TRAIN, "--framework", "tensorflow", "--workload", "classifier", "--model", "mlp",
               "--dataset", "digits", "--epochs", "10", "--batch-size", "64", "--lr", "0.001",
               "--checkpoint-dir", str(tmp_path / "ckpt"), "--summary", str(tmp_path / "summary.json")]
    again = subprocess.run(command, env=leap_train_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete" in again.stderr
    assert (tmp_path / "summary.json").read_bytes() == written


@pytest.mark.slow
def test_keras_batch_larger_than_the_dataset_is_refused_naming_the_flag(tmp_path: Path):
    command = [LEAP_TRAIN, "--framework", "tensorflow", "--workload", "classifier", "--model", "mlp",
               "--dataset", "digits", "--epochs", "1", "--batch-size", "4096", "--lr", "0.001"]
    result = subprocess.run(command, env=leap_train_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--batch-size 4096" in result.stderr and "4000 training samples" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_keras_run_resumes_mid_epoch_exactly(tmp_path: Path):
    """A restarted worker continues from the newest checkpoint (what the operator's gang restart
    relies on), mid-epoch included, with exactly the batches the interrupted epoch had not trained:
    the resumed run ends with bitwise the weights and optimizer state of the uninterrupted one."""
    import h5py
    import numpy as np

    checkpoints = tmp_path / "ckpt"
    flags = ["--workload", "classifier", "--model", "mlp", "--dataset", "digits", "--batch-size", "32",
             "--lr", "0.001", "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "40", "--epochs", "2"]
    steps_per_epoch = 4000 // 32  # 125; Keras reports every 50 steps, so saves land at 50, 100, 125, 175, ...
    first = train(tmp_path, *flags, name="first")
    assert first["steps"] == 2 * steps_per_epoch and first["resumed_from_step"] == 0
    phase = checkpoints / "keras" / "classifier"
    assert (phase / "ckpt-00000225.weights.h5").is_file(), sorted(p.name for p in phase.iterdir())
    uninterrupted = tmp_path / "uninterrupted.weights.h5"
    uninterrupted.write_bytes((phase / "ckpt-00000250.weights.h5").read_bytes())

    # Make step 225 (epoch 2, 100 of its 125 steps done) the latest and the run unfinished, as if
    # the pod had been killed right after saving it; then restart with the same flags.
    state = json.loads((phase / "state.json").read_text())
    state.update(step=225, epoch=1, done=False, weights="ckpt-00000225.weights.h5")
    (phase / "state.json").write_text(json.dumps(state))
    record = json.loads((checkpoints / "run.json").read_text())
    (checkpoints / "run.json").write_text(json.dumps({**record, "complete": False}))
    second = train(tmp_path, *flags, name="second")
    assert second["resumed_from_step"] == 225
    assert second["steps"] == 2 * steps_per_epoch  # the 25 missing steps of epoch 2, no more
    with h5py.File(uninterrupted) as expected, h5py.File(phase / "ckpt-00000250.weights.h5") as resumed:
        names: list[str] = []
        expected.visit(lambda name: names.append(name) if isinstance(expected[name], h5py.Dataset) else None)
        assert any(name.startswith("optimizer") for name in names)
        for name in names:
            assert np.array_equal(expected[name][()], resumed[name][()]), name
    assert second["test_accuracy"] == first["test_accuracy"]

    # Other settings in the same directory are refused, naming the flag; --start-over trains afresh.
    command = [LEAP_TRAIN, "--framework", "tensorflow", *flags[:-2], "--epochs", "3"]
    refused = subprocess.run(command, env=leap_train_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode == contract.EXIT_CONFIG and "--epochs: checkpoint 2, now 3" in refused.stderr, \
        refused.stderr[-2000:]
    assert f"{contract.CONFIG_ERROR_PREFIX}--checkpoint-dir" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_keras_final_save_never_rewrites_the_file_state_json_names(tmp_path: Path):
    class FakeModel:
        def __init__(self):
            self.written: list[str] = []

        def save_weights(self, path):
            self.written.append(Path(path).name)
            Path(path).write_text(f"weights {len(self.written)}")

    model = FakeModel()
    checkpoints = PhaseCheckpoints(tmp_path, "classifier")
    checkpoints.save(model, step=125, epoch=1)
    named = checkpoints.directory / "ckpt-00000125.weights.h5"
    assert named.read_text() == "weights 1" and model.written == [".tmp-ckpt-00000125.weights.h5"]
    # The final save of the same step only marks the phase done: the named file is not opened again.
    state = checkpoints.save(model, step=125, epoch=1, done=True)
    assert state.done and len(model.written) == 1 and named.read_text() == "weights 1"
    assert json.loads((checkpoints.directory / STATE_FILE).read_text())["weights"] == named.name
    checkpoints.save(model, step=250, epoch=2, done=True)
    assert model.written[-1] == ".tmp-ckpt-00000250.weights.h5" and not list(checkpoints.directory.glob(".tmp-*"))


@pytest.mark.slow
def test_keras_metrics_port_in_use_is_one_clear_line(tmp_path: Path):
    with socket.socket() as blocker:
        blocker.bind(("0.0.0.0", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        command = [LEAP_TRAIN, "--framework", "tensorflow", "--dataset", "digits", "--epochs", "1",
                   "--metrics-port", str(port)]
        result = subprocess.run(command, env=leap_train_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == contract.EXIT_CONFIG
    errors = [line for line in result.stderr.splitlines() if line.startswith("leap-train:")]
    assert len(errors) == 1 and f"port {port}" in errors[0] and "--metrics-port" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_keras_distillation_reports_both_student_accuracies(tmp_path: Path):
    summary = train(tmp_path, "--workload", "distillation", "--model", "mlp", "--teacher", "mlp-large",
                    "--dataset", "digits", "--epochs", "2", "--batch-size", "128", "--lr", "0.002",
                    "--temperature", "4", "--alpha", "0.7")
    for key in ("test_accuracy", "student_alone_accuracy", "teacher_accuracy"):
        # Three real trainings on 10 classes: each well above chance (0.1).
        assert 0.5 < summary[key] <= 1.0, (key, summary)
    # "steps" are the distilled student's (as on the PyTorch path); the student alone trained as many.
    assert summary["steps"] == 2 * (4000 // 128)
    assert set(summary) == set(SUMMARY_KEYS)
    assert set(summary["phases"]) == {"teacher", "student-alone", "student-distilled"}
    assert summary["phases"]["teacher"]["flops_per_sample"] == 2_407_424 and summary["flops_per_sample"] == 409_088
    assert summary["temperature"] == 4 and summary["alpha"] == 0.7
    assert summary["teacher_epochs"] == 6  # 3x the student's by default
    assert summary["distillation_gain"] == pytest.approx(summary["test_accuracy"] - summary["student_alone_accuracy"])


@pytest.mark.slow
def test_keras_metrics_endpoint_serves_tensorflow_series(tmp_path: Path):
    port = free_port()
    command = [LEAP_TRAIN, "--framework", "tensorflow", "--workload", "classifier", "--model", "mlp",
               "--dataset", "synthetic", "--samples", "20000", "--epochs", "200", "--batch-size", "64",
               "--lr", "0.001", "--metrics-port", str(port)]
    process = subprocess.Popen(command, env=leap_train_env(**{contract.ENV_RUN: "keras-metrics"}),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        samples = 0.0
        deadline = time.monotonic() + 120
        text = ""
        while time.monotonic() < deadline and samples <= 0:
            assert process.poll() is None, process.stderr.read()[-3000:]
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                time.sleep(0.5)
                continue
            match = re.search(rf'^{contract.M_SAMPLES}{{([^}}]*)}} (\S+)$', text, re.M)
            if match and 'framework="tensorflow"' in match.group(1):
                samples = float(match.group(2))
            else:
                time.sleep(0.5)
        assert samples > 0, text[-3000:]
        for name in (contract.M_STEPS, contract.M_SAMPLES_PER_SECOND, contract.M_FLOPS_PER_SECOND,
                     contract.M_PROGRESS, contract.M_LOSS):
            assert re.search(rf'^{name}{{[^}}]*framework="tensorflow"[^}}]*}} ', text, re.M), name
        assert 'run="keras-metrics"' in text
        # Every step is in the step-time histogram (each of a 50-step group at the group's mean).
        count = re.search(rf'^{contract.M_STEP_SECONDS}_count{{[^}}]*}} (\S+)$', text, re.M)
        steps = re.search(rf'^{contract.M_STEPS}{{[^}}]*}} (\S+)$', text, re.M)
        assert count and steps and float(count.group(1)) == float(steps.group(1)) > 0
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_keras_two_workers_train_with_multi_worker_mirrored_strategy(tmp_path: Path):
    """Two leap-train processes on localhost, wired only by LEAP_WORKER_HOSTS/INDEX as the
    operator renders them: one all-reduced model, world size 2, only worker 0 writes."""
    hosts = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    processes = []
    for index in range(2):
        env = leap_train_env(**{contract.ENV_WORKER_HOSTS: hosts, contract.ENV_WORKER_INDEX: str(index)})
        command = [LEAP_TRAIN, "--framework", "tensorflow", "--workload", "classifier", "--model", "mlp",
                   "--dataset", "digits", "--epochs", "3", "--batch-size", "64", "--lr", "0.002",
                   "--checkpoint-dir", str(tmp_path / f"ckpt{index}"), "--summary", str(tmp_path / f"w{index}.json")]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        errors = [process.communicate(timeout=180)[1] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, error in zip(processes, errors):
        assert process.returncode == 0, error[-4000:]
    summary = json.loads((tmp_path / "w0.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == MULTI_WORKER
    # Global batch 128 over 4000 samples; each worker took its half of every global batch.
    assert summary["global_batch_size"] == 128 and summary["steps"] == 3 * (4000 // 128)
    assert summary["test_accuracy"] > 0.8
    assert not (tmp_path / "w1.json").exists() and not (tmp_path / "ckpt1").exists()
    assert (tmp_path / "ckpt0" / "keras" / "classifier" / "state.json").exists()
