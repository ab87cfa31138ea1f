"""The reporting SDK (leap_trainer.sdk): a user's own training program reports like a built-in run.

The program is tests/user_programs/train_cnn.py (its own convnet, DataLoader and loop); its
instrumented copy train_cnn_leap.py differs by at most 3 lines. It runs as a `command:`
TrainingRun under `leap run` (1 process, scraped by a real Prometheus; 2 DDP processes over gloo)
and on the real control plane (tests/test_real_operator.py's tier: `kubectl get` columns and
status.progress, scraped by the operator from the pod runner's process). Every number is checked
against an independent measure: FLOPs per sample against torch's FlopCounterMode on the same model
and a count by hand, steps against the program's own count, samples/s against steps x batch over the
window. The Keras and Hugging Face callbacks train tiny models built here (no downloads).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from leap_operator.progress import progress_from_metrics_text
from leap_trainer import contract as c
from prometheus_server import PrometheusServer, free_port
from test_local_run import kill_run, leap, unique_name

PROGRAMS = Path(__file__).resolve().parent / "user_programs"
ORIGINAL, INSTRUMENTED = PROGRAMS / "train_cnn.py", PROGRAMS / "train_cnn_leap.py"
BATCH = 32
# The convnet's training FLOPs per sample, by hand (2 per multiply-add; forward, weight gradient,
# and input gradient except for the first layer, whose input is the data):
# conv 1->8, 3x3 on 16x16: 2*8*256*9 = 36,864 forward, once more for its weight gradient;
# linear 2048->64 and 64->10: 6 per weight.
CNN_FLOPS_PER_SAMPLE = 2 * 36_864 + 6 * (2048 * 64) + 6 * (64 * 10)


def user_model():
    spec = importlib.util.spec_from_file_location("user_train_cnn", ORIGINAL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_model()


def flop_counter_per_sample() -> float:
    """torch's own count of one training step of the user's model, outside the SDK."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = user_model()
    images, labels = torch.randn(BATCH, 1, 16, 16), torch.randint(0, 10, (BATCH,))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops() / BATCH


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            return response.read().decode()
    except OSError:
        return None


def value(text: str, name: str) -> float:
    """One series' value from a /metrics page (unrounded, unlike status.progress)."""
    return float(re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))


def flops_per_sample_of(text: str) -> float:
    """The FLOPs per sample a page implies: FLOP/s over samples/s."""
    return value(text, c.M_FLOPS_PER_SECOND) / value(text, c.M_SAMPLES_PER_SECOND)


def command_run(tmp_path: Path, name: str, *, port: int, workers: int = 1, epochs: int, samples: int) -> Path:
    doc = {"apiVersion": "leap.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": name},
           "spec": {"framework": "pytorch", "command": [sys.executable, str(INSTRUMENTED)],
                    "args": ["--epochs", str(epochs), "--samples", str(samples), "--batch-size", str(BATCH)],
                    "workers": workers, "metrics": {"port": port}, "runPolicy": {"backoffLimit": 0},
                    # One thread per process: this machine's cores are shared (torch's spinning
                    # threads slow down many times over on a loaded machine).
                    "env": [{"name": "OMP_NUM_THREADS", "value": "1"}]}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def trained_steps(log: str) -> int:
    return int(re.search(r"^trained (\d+) steps in ", log, re.M).group(1))


def loop_seconds(log: str) -> float:
    """The program's own wall time of its training loop, as it prints it."""
    return float(re.search(r"^trained \d+ steps in (\S+) s$", log, re.M).group(1))


# --- the program ----------------------------------------------------------------------------------

def test_the_instrumented_program_differs_from_the_users_by_at_most_3_lines():
    diff = [line for line in difflib.unified_diff(ORIGINAL.read_text().splitlines(),
                                                  INSTRUMENTED.read_text().splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert len(diff) <= 3 and all(line.startswith("+") for line in diff), diff
    assert any("leap.watch(model, optimizer" in line for line in diff), diff


def test_docs_example_is_the_tested_program_and_its_trainingrun_is_valid():
    from leap_operator.validation import validate_run

    doc = (Path(__file__).resolve().parents[1] / "docs" / "sdk.md").read_text()
    python = re.findall(r"```python\n(.*?)```", doc, re.S)
    example = max(python, key=len)
    added = [line for line in example.splitlines() if "# added" in line]
    assert len(added) == 3, added
    code = [re.sub(r"\s+# added.*$", "", line) for line in example.splitlines()]
    program = INSTRUMENTED.read_text().split('"""', 2)[2].strip().splitlines()
    assert code == program
    runs = [d for block in re.findall(r"```yaml\n(.*?)```", doc, re.S) for d in yaml.safe_load_all(block)]
    assert runs and all(validate_run(run) == [] for run in runs)


def test_the_flop_count_by_hand_is_torchs():
    assert flop_counter_per_sample() == CNN_FLOPS_PER_SAMPLE == 864_000


# --- the SDK alone, in this process -------------------------------------------------------------------

def test_report_without_total_steps_leaves_progress_and_flops_unknown_not_zero():
    """report() from any loop: counted steps and samples; no total steps and no FLOPs per sample
    given, so progress, ETA, total steps, FLOP/s and MFU are absent from /metrics."""
    from leap_trainer.sdk import Reporter

    port = free_port()
    reporter = Reporter(run="plain", namespace="ns", rank=0, port=port, report_seconds=0.0)
    reporter.start_server()
    try:
        began = time.perf_counter()
        for _ in range(5):
            time.sleep(0.01)
            reporter.step(16, loss=0.5)
        reporter.flush()
        elapsed = time.perf_counter() - began
        text = scrape(port)
    finally:
        reporter.close()
    names = {line.split("{")[0] for line in text.splitlines() if line.startswith("leap_")}
    assert {c.M_STEPS, c.M_SAMPLES, c.M_SAMPLES_PER_SECOND, c.M_LOSS} <= names
    assert not names & {c.M_PROGRESS, c.M_ETA, c.M_TOTAL_STEPS, c.M_FLOPS_PER_SECOND, c.M_MFU, c.M_EPOCH}, names
    progress = progress_from_metrics_text(text)
    assert progress["step"] == 5 and "percent" not in progress and "etaSeconds" not in progress
    # The last window (steps 2-5: the first step is the warm-up window) against the wall clock.
    assert 16 * 4 / elapsed < progress["samplesPerSecond"] < 16 * 4 / 0.035


def test_report_counts_steps_given_as_the_runs_step_and_resumes(tmp_path):
    from leap_trainer import sdk

    sdk._reset_for_tests()
    port = free_port()
    env = {c.ENV_METRICS_PORT: str(port), c.ENV_RUN: "resumed", c.ENV_SUMMARY: str(tmp_path / "summary.json")}
    with pytest.MonkeyPatch.context() as patch:
        for key, setting in env.items():
            patch.setenv(key, setting)
        try:
            sdk.configure(initial_step=100)
            for step in range(110, 200, 10):   # every 10 steps of 8 samples
                sdk.report(step=step, samples=80, total_steps=200, epoch=2)
            sdk.reporter().flush()
            text = scrape(port)
            progress = progress_from_metrics_text(text)
        finally:
            sdk.finish()
            sdk._reset_for_tests()
    assert progress["totalSteps"] == 200 and progress["step"] == 190 and progress["percent"] == 95.0
    assert progress["epoch"] == 2 and progress["etaSeconds"] >= 0
    assert value(text, c.M_RESUMED_STEP) == 100
    train_seconds = float(re.search(rf'^{c.M_TIME}{{.*activity="train".*}} (\S+)$', text, re.M).group(1))
    assert 0 < train_seconds < 60 and f'{c.M_TIME}{{' in text and 'activity="startup"' in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 190 and summary["resumed_from_step"] == 100 and summary["samples"] == 720


def test_a_paused_block_is_no_step_counts_as_its_activity_and_is_a_pause_to_hang_detection(tmp_path):
    """`with leap.paused("checkpoint")` in a user's loop: while it runs, the page announces the pause
    (the operator's hang detection reads it so, and does not call it a stall); after it, its time
    is checkpoint time in the goodput counters, and no step's time."""
    from leap_operator import progress, stall
    from leap_trainer import sdk

    sdk._reset_for_tests()
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(c.ENV_METRICS_PORT, str(port))
        patch.setenv(c.ENV_SUMMARY, str(tmp_path / "summary.json"))
        try:
            for step in range(1, 21):
                sdk.report(step=step, samples=8, total_steps=40)
            with sdk.paused("checkpoint"):
                during = scrape(port)
                time.sleep(0.3)
            for step in range(21, 41):
                sdk.report(step=step, samples=8, total_steps=40)
            sdk.reporter().flush()
            after = scrape(port)
            with pytest.raises(ValueError, match="must be one of"):
                sdk.paused("lunch")
        finally:
            sdk.finish()
            sdk._reset_for_tests()
    seen = stall.observe(progress.parse_samples(during), 20)
    assert seen.activity == "checkpoint" and seen.activity in c.PAUSE_ACTIVITIES
    assert stall.observe(progress.parse_samples(after), 40).activity == "train"

    def seconds(activity: str) -> float:
        return float(re.search(rf'^{c.M_TIME}{{.*activity="{activity}".*}} (\S+)$', after, re.M).group(1))
    assert 0.3 <= seconds("checkpoint") < 5
    step_sum = value(after, c.M_STEP_SECONDS + "_sum")
    assert step_sum < 0.3, "the pause is in no step's time"


# --- leap run -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(420)
def test_user_program_under_leap_run_reports_every_series_to_a_real_prometheus(tmp_path):
    name = unique_name("sdk-run")
    port = free_port()
    epochs, samples = 2, 16_384          # 512 steps per epoch of 32: a few seconds on one core
    total = epochs * samples // BATCH
    run_file = command_run(tmp_path, name, port=port, epochs=epochs, samples=samples)
    with PrometheusServer(targets=[f"127.0.0.1:{port}"], scrape_interval="1s") as prom:
        time.sleep(6)   # Prometheus's first scrape of a new target comes ~6 s after start
        try:
            done = leap("run", str(run_file), "--workdir", str(tmp_path / "run"), timeout=300)
        finally:
            kill_run(name)
        assert done.returncode == 0, done.stdout + done.stderr
        log = (tmp_path / "run" / "attempt-1" / "worker-0.log").read_text()

        def one(expr: str) -> float:
            result = prom.query(expr)
            assert len(result) == 1, (expr, result)
            return float(result[0]["value"][1])

        window = "[5m]"
        labels = f'{{run="{name}",namespace="default",rank="0",framework="pytorch",accelerator="cpu"}}'
        steps_seen = one(f"max_over_time({c.M_STEPS}{labels}{window})")
        samples_seen = one(f"max_over_time({c.M_SAMPLES}{labels}{window})")
        rate = one(f"max_over_time({c.M_SAMPLES_PER_SECOND}{labels}{window})")
        flops = one(f"max_over_time(({c.M_FLOPS_PER_SECOND}{labels} / {c.M_SAMPLES_PER_SECOND}{labels})[5m:1s])")
        total_steps = one(f"max_over_time({c.M_TOTAL_STEPS}{labels}{window})")
        progress = one(f"max_over_time({c.M_PROGRESS}{labels}{window})")
        eta = one(f"min_over_time({c.M_ETA}{labels}{window})")
        loss = one(f"min_over_time({c.M_LOSS}{labels}{window})")
        assert not prom.query(f"{c.M_MFU}{labels}")   # a CPU has no known peak: MFU absent, not 0
    steps = trained_steps(log)
    assert steps == total
    assert 0 < steps_seen <= steps and samples_seen == steps_seen * BATCH
    # A ratio of two scraped floats: equal to the counted FLOPs up to float rounding.
    assert flops == pytest.approx(flop_counter_per_sample(), rel=1e-12) and flop_counter_per_sample() == CNN_FLOPS_PER_SAMPLE
    assert total_steps == total and 0 < progress <= 1 and progress == pytest.approx(steps_seen / total, abs=0.05)
    assert eta >= 0 and 0 < loss < 3
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == steps and summary["samples"] == steps * BATCH
    assert summary["flops_per_sample"] == CNN_FLOPS_PER_SAMPLE and summary["world_size"] == 1
    # The summary's throughput against the wall clock of the program's own loop: no slower than all
    # its samples over the loop, and not much faster (it leaves out only the warm-up step, which runs
    # under the FLOP counter, and nothing else in this loop).
    loop_rate = steps * BATCH / loop_seconds(log)
    assert 0.9 * loop_rate <= summary["samples_per_second"] < 5 * loop_rate, (summary["samples_per_second"], loop_rate)
    assert summary["samples_per_second"] > steps * BATCH / summary["wall_seconds"] and rate > 0
    # What `leap run` shows: live progress lines and the summary table.
    assert re.search(rf"worker 0: step \d+/{total} \(\d+%\)", done.stdout), done.stdout
    assert f"│ steps" in done.stdout and "samples/s" in done.stdout and "FLOP/s" in done.stdout, done.stdout
    assert "no test accuracy reported" in done.stdout, done.stdout


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_user_program_with_two_ddp_processes_reports_each_rank(tmp_path):
    name = unique_name("sdk-ddp")
    port = free_port()
    epochs, samples = 2, 8_192           # per rank: 128 steps per epoch of 32
    total = epochs * samples // 2 // BATCH
    run_file = command_run(tmp_path, name, port=port, workers=2, epochs=epochs, samples=samples)
    seen: dict[str, dict] = {}
    import subprocess
    from test_local_run import start_leap

    proc = start_leap("run", str(run_file), "--workdir", str(tmp_path / "run"))
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            for rank, worker_port in (("0", port), ("1", port + 1)):   # worker i: port + i x 1 process
                text = scrape(worker_port)
                if text and f'rank="{rank}"' in text:
                    progress = progress_from_metrics_text(text)
                    if progress.get("samplesPerSecond"):
                        seen[rank] = {**progress, "flopsPerSample": flops_per_sample_of(text)}
            time.sleep(0.2)
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    finally:
        kill_run(name)
    assert proc.returncode == 0, out + err
    assert set(seen) == {"0", "1"}, seen
    for progress in seen.values():
        assert progress["totalSteps"] == total and 0 < progress["step"] <= total
        assert progress["flopsPerSample"] == pytest.approx(CNN_FLOPS_PER_SAMPLE)
    for worker in (0, 1):
        log = (tmp_path / "run" / "attempt-1" / f"worker-{worker}.log").read_text()
        assert trained_steps(log) == total, log[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == total and summary["samples"] == total * BATCH


# --- Keras and Hugging Face -----------------------------------------------------------------------------
# Each in its own process (TensorFlow and torch crash when loaded into one), as a user's program.

def run_program(tmp_path: Path, program: str, *args: str, name: str) -> tuple[dict, dict]:
    """Run tests/user_programs/<program> with Leap's env; (what it wrote, the SDK's summary)."""
    import os
    import subprocess

    port = free_port()
    env = {**os.environ, c.ENV_METRICS_PORT: str(port), c.ENV_RUN: name,
           c.ENV_SUMMARY: str(tmp_path / "summary.json"), "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "seen.json"
    done = subprocess.run([sys.executable, str(PROGRAMS / program), str(out), *args], env=env,
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), json.loads((tmp_path / "summary.json").read_text())


@pytest.mark.slow
def test_keras_callback_reports_fits_steps_samples_loss_and_progress(tmp_path):
    flops = 6 * (20 * 32 + 32 * 2) - 2 * 20 * 32
    seen, summary = run_program(tmp_path, "keras_fit.py", str(flops), name="keras-user")
    assert seen["iterations"] == 96                 # 3 epochs x 2048 / 64, in groups of 4 steps
    last = progress_from_metrics_text(seen["pages"][-1])
    assert last["totalSteps"] == 96 and last["step"] == 96 and last["percent"] == 100.0 and last["epoch"] == 3
    assert flops_per_sample_of(seen["pages"][-1]) == pytest.approx(flops)
    assert value(seen["pages"][-1], c.M_SAMPLES) == 96 * 64
    assert 0 < last["loss"] < 1 and last["loss"] == pytest.approx(seen["loss"][-1], rel=0.5)
    first = progress_from_metrics_text(seen["pages"][0])
    assert first["step"] == 32 and first["percent"] == pytest.approx(33.3, abs=0.1)
    assert 'framework="tensorflow"' in seen["pages"][-1] and 'run="keras-user"' in seen["pages"][-1]
    assert summary["steps"] == 96 and summary["samples"] == 96 * 64 and summary["framework"] == "tensorflow"


LOCAL_DEVICES = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from leap_trainer.sdk_keras import local_devices
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
print(local_devices(tf.distribute.get_strategy()), local_devices(mirrored), mirrored.num_replicas_in_sync)
"""


def test_keras_peak_counts_this_workers_devices():
    """The Keras callback's MFU divides by the peak of the devices this process trains on: two local
    replicas count two, no strategy one. (Under MultiWorkerMirroredStrategy num_replicas_in_sync also
    counts other workers' replicas, which this process's samples/s do not include: the reason for
    local_devices(); a two-worker GPU run to show it needs GPUs this suite does not have.)"""
    done = subprocess.run([sys.executable, "-c", LOCAL_DEVICES], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "2", "2"], done.stdout


@pytest.mark.slow
def test_transformers_callback_counts_steps_samples_and_flops_of_a_tiny_model(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    seen, summary = run_program(tmp_path, "hf_trainer.py", str(tmp_path / "out"), name="hf-user")
    steps = seen["steps"]
    assert steps == 2 * 96 // 8                    # 2 epochs of 96 rows, 4 per batch x 2 accumulated
    page = seen["pages"][-1]
    last = progress_from_metrics_text(page)
    assert last["totalSteps"] == steps and last["step"] == steps and last["percent"] == 100.0
    assert value(page, c.M_SAMPLES) == 2 * 96
    assert flops_per_sample_of(page) == pytest.approx(seen["flops_per_sample"])
    assert 0 < last["loss"] < 10 and 'framework="pytorch"' in page
    assert progress_from_metrics_text(seen["pages"][0])["step"] == steps // 2   # mid-run, at the first epoch's end
    assert summary["steps"] == steps and summary["flops_per_sample"] == pytest.approx(seen["flops_per_sample"])


# --- the light package ----------------------------------------------------------------------------------

LIGHT_PROGRAM = """
import sys, time
import leap_trainer.sdk as leap
for step in range(1, 41):
    time.sleep(0.005)
    leap.report(step=step, samples=16, total_steps=100, loss=1.0 / step)
leap.reporter().flush()
print("reported", flush=True)
sys.stdin.readline()     # stay up until the test has scraped /metrics
"""


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_light_package_installs_without_any_ml_framework_and_reports(tmp_path):
    """`pip install ./images/trainer` into a fresh venv: prometheus-client and nothing heavier; a
    plain program there reports with leap.report() and its /metrics has the leap_train_* series."""
    import shutil
    import subprocess

    from test_images import fresh_venv, pip_env, run

    source = tmp_path / "src"   # a copy: building in place would leave build/ and egg-info in the checkout
    shutil.copytree(Path(__file__).resolve().parents[1] / "images" / "trainer", source,
                    ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    bin_dir = fresh_venv(tmp_path / "venv")
    python = str(bin_dir / "python")
    run([python, "-m", "pip", "install", "-q", str(source)])
    installed = {line.split("==")[0].split(" @ ")[0].lower().replace("_", "-")
                 for line in run([python, "-m", "pip", "freeze"]).stdout.splitlines()}
    assert {"leap-trainer", "prometheus-client"} <= installed, installed
    assert not installed & {"torch", "tensorflow", "tensorflow-cpu", "keras", "numpy", "transformers"}, installed
    port = free_port()
    env = pip_env(**{c.ENV_METRICS_PORT: str(port), c.ENV_RUN: "light", c.ENV_NAMESPACE: "team-a", c.ENV_RANK: "0"})
    proc = subprocess.Popen([python, "-c", LIGHT_PROGRAM], env=env, cwd=tmp_path, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "reported", proc.stderr.read() if proc.poll() is not None else ""
        text = scrape(port)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        proc.kill()
    assert 'run="light"' in text and 'namespace="team-a"' in text
    progress = progress_from_metrics_text(text)
    assert progress["step"] == 40 and progress["totalSteps"] == 100 and progress["percent"] == 40.0
    assert value(text, c.M_SAMPLES) == 40 * 16 and value(text, c.M_LOSS) < 0.1
    assert c.M_FLOPS_PER_SECOND not in text   # no FLOPs per sample given: FLOP/s unknown, absent


# --- the real control plane --------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_user_program_as_a_command_run_shows_progress_in_kubectl_get(cluster):
    """The operator scrapes rank 0 of a `command:` run (the user's program, run for real by the pod
    runner with its pod's env) into status.progress, which `kubectl get ltr` shows."""
    from emulator import wait_for as wait
    from test_real_operator import PhaseRecorder, _number, create, get_tr

    ns = cluster.namespace("sdk-run", labels={"pod-security.kubernetes.io/enforce": "restricted"})
    cluster.runner.run_for_real(lambda pod: pod["metadata"]["namespace"] == ns)
    epochs, samples = 2, 32_768            # 1,024 steps per epoch: long enough for several scrapes
    total = epochs * samples // BATCH
    run = {"apiVersion": "leap.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": "user-cnn", "namespace": ns},
           "spec": {"framework": "pytorch", "image": "registry.example/team/cnn:1",
                    "command": [sys.executable, str(INSTRUMENTED)],
                    "args": ["--epochs", str(epochs), "--samples", str(samples), "--batch-size", str(BATCH)],
                    "metrics": {"port": free_port()}, "env": [{"name": "OMP_NUM_THREADS", "value": "1"}]}}
    recorder = PhaseRecorder(cluster, ns, "user-cnn")
    create(cluster, run)
    try:
        seen = wait(lambda: (lambda row: row if _number(row["PROGRESS"]) > 0 and _number(row["THROUGHPUT"]) > 0
                             and row["ETA"] not in ("", "<none>") and row["PHASE"] == "Running" else None)(
            get_tr(cluster, ns, "user-cnn")), 240, 0.3, "PROGRESS, THROUGHPUT and ETA while Running")
        progress = cluster.run(ns, "user-cnn")["status"]["progress"]
        wait(lambda: cluster.phase(ns, "user-cnn") == "Succeeded", 300, 0.5, "Succeeded")
    finally:
        phases = recorder.stop()
    assert phases[-1] == "Succeeded", phases
    assert 0 < float(seen["PROGRESS"]) <= 100 and float(seen["THROUGHPUT"]) > 0 and seen["ETA"], seen
    assert progress["totalSteps"] == total and 0 < progress["step"] <= total
    assert progress["flopsPerSecond"] / progress["samplesPerSecond"] == pytest.approx(CNN_FLOPS_PER_SAMPLE, rel=1e-3)
    assert progress["etaSeconds"] >= 0 and progress["loss"] > 0
    log = next((cluster.runner.workdir / ns).glob("user-cnn-a1-0-*/container.log")).read_text()
    assert trained_steps(log) == total
