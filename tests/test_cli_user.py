"""The `leap` CLI as a new user meets it (issue 14): no lost or mixed runs, no tracebacks, YAML read
as kubectl reads it, configuration errors that are not retried, and things findable without
reading the source. Every test asserts what the user sees: the message, the exit code, the files
left on disk and the processes left running.

Workers run small custom commands (spec.command) or fail in leap-train's argument parsing, so no
test here trains a model.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from leap_operator import cli, status
from leap_operator.local.overrides import apply_overrides
from leap_operator.render import CONTAINER, render_children
from leap_operator.validation import defaulted, validate_run
from leap_trainer import contract
from leap_trainer.contract import EXIT_CONFIG, EXIT_FAILED, EXIT_INVALID
from test_local_run import (EXAMPLES, LEAP, PRINT_ENV, ROOT, kill_run, leap, processes_of_run, run_on_a_terminal, start_leap,
                            unique_name, wait_for, worker_envs, write_run)

LEAP_TRAIN = str(Path(sys.executable).with_name("leap-train")) if Path(sys.executable).with_name("leap-train").exists() \
    else None

RUN = """\
apiVersion: leap.dev/v1alpha1
kind: TrainingRun
metadata:
  name: demo
spec:
  framework: pytorch
  workload:
    kind: classifier
    learningRate: 1e-3
  workers: 1
"""


def leap_in(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`leap` run from another directory (where ./runs is); a relative PYTHONPATH made absolute."""
    env = dict(os.environ)
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(str((ROOT / p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    return subprocess.run(LEAP + list(args), capture_output=True, text=True, timeout=60, cwd=cwd, env=env)


def no_traceback(*outputs: str) -> None:
    for text in outputs:
        assert "Traceback" not in text, text


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


# --- YAML as kubectl reads it -----------------------------------------------------------------------

def test_yaml_1_2_numbers_in_files_and_through_set(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(RUN)
    assert cli.main(["validate", str(path)]) == 0, capsys.readouterr()
    assert cli.main(["render", str(path)]) == 0
    job = list(yaml.safe_load_all(capsys.readouterr().out))[1]
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--lr") + 1] == "0.001"

    doc = yaml.safe_load(RUN.replace("1e-3", "0.1"))
    changed, _ = apply_overrides(doc, ["spec.workload.learningRate=5e-4"])
    assert changed["spec"]["workload"]["learningRate"] == 0.0005
    assert validate_run(changed) == []


def test_render_output_reads_back_the_same_under_yaml_1_2(tmp_path, capsys):
    from leap_operator.yamlio import load_all
    doc = load_all(RUN, "RUN")[0]
    doc["spec"]["env"] = [{"name": "SCALE", "value": "1e3"}, {"name": "MODE", "value": "0o17"}]
    path = tmp_path / "env.yaml"
    path.write_text(json.dumps(doc))  # (PyYAML would write 1e3 unquoted: a number to kubectl)
    assert cli.main(["render", str(path)]) == 0
    text = capsys.readouterr().out
    env = {e["name"]: e.get("value") for e in load_all(text, "rendered")[1]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SCALE"] == "1e3" and env["MODE"] == "0o17"  # strings, as kubectl will read them


def test_duplicate_keys_are_refused_naming_the_key_and_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(RUN.replace("  workers: 1\n", "  workers: 1\n  workers: 3\n"))
    for command in (["validate"], ["render"], ["run", "--workdir", str(tmp_path / "run")]):
        done = leap(*command[:1], str(path), *command[1:])
        assert done.returncode == EXIT_INVALID, done.stderr
        assert f"{path}: key 'spec.workers' is given twice (lines 10 and 11)" in done.stderr
        no_traceback(done.stdout, done.stderr)
    assert not (tmp_path / "run").exists()


def test_validate_reports_every_file_and_binary_input_gets_one_line(tmp_path):
    good, bad, binary = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "model.pt"
    good.write_text(RUN)
    bad.write_text(RUN.replace("workers: 1", "workers: 0").replace("name: demo", "name: other"))
    binary.write_bytes(b"PK\x03\x04\x89\xff\x00binary")
    missing = tmp_path / "missing.yaml"
    done = leap("validate", str(good), str(bad), str(missing), str(binary))
    assert done.returncode == EXIT_INVALID
    assert f"{good} TrainingRun/demo: OK" in done.stdout
    assert f"{bad} TrainingRun/other: INVALID (1 problem)" in done.stdout
    assert f"error: {missing}: cannot read: No such file or directory" in done.stderr
    assert f"error: {binary}: not a text file (byte 0x89 at offset 4 is not UTF-8)" in done.stderr
    no_traceback(done.stdout, done.stderr)

    for command in (["render", str(binary)], ["run", str(binary), "--workdir", str(tmp_path / "run")]):
        refused = leap(*command)
        assert refused.returncode == EXIT_INVALID
        assert "not a text file" in one_error_line(refused.stderr)
        no_traceback(refused.stdout, refused.stderr)


def test_output_json_of_validate_and_render(tmp_path):
    good, bad = tmp_path / "a.yaml", tmp_path / "b.yaml"
    good.write_text(RUN)
    bad.write_text(RUN.replace("workers: 1", "workers: 0"))
    checked = leap("validate", "-o", "json", str(good), str(bad))
    assert checked.returncode == EXIT_INVALID
    results = json.loads(checked.stdout)
    assert [(r["file"], r["valid"]) for r in results] == [(str(good), True), (str(bad), False)]
    assert results[1]["problems"][0]["field"] == "spec.workers"
    rendered = leap("render", "-o", "json", str(good))
    assert rendered.returncode == 0
    assert [o["kind"] for o in json.loads(rendered.stdout)["items"]] == ["Service", "Job"]


# --- configuration errors are not retried ------------------------------------------------------------

def test_validate_catches_a_batch_larger_than_the_shipped_dataset(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text(RUN.replace("learningRate: 1e-3", "batchSize: 3000").replace("workers: 1", "workers: 2"))
    assert cli.main(["validate", str(path)]) == EXIT_INVALID
    out = capsys.readouterr().out
    assert ("spec.workload.batchSize: 3000 per process x 2 processes is more than the 4000 training samples "
            "of dataset digits allow (each process takes 2000); lower spec.workload.batchSize to at most 2000") in out


def test_digits_size_in_the_contract_is_the_shipped_datasets():
    from leap_trainer.data import load_dataset
    assert load_dataset("digits").train_size == contract.DIGITS_TRAIN_SAMPLES


@pytest.mark.skipif(LEAP_TRAIN is None, reason="leap-train is not installed beside this Python")
def test_leap_train_exits_with_the_config_code_naming_spec_fields_in_a_training_run():
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAP_")}
    alone = subprocess.run([LEAP_TRAIN, "--dataset", "/nonexistent/x.npz"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert alone.returncode == EXIT_CONFIG
    assert one_error_line(alone.stderr).startswith(contract.CONFIG_ERROR_PREFIX + "--dataset: file '/nonexistent/x.npz'")
    in_run = subprocess.run([LEAP_TRAIN, "--dataset", "/nonexistent/x.npz", "--epochs", "0"],
                            env={**env, contract.ENV_RUN: "demo"}, capture_output=True, text=True, timeout=60)
    assert in_run.returncode == EXIT_CONFIG
    line = one_error_line(in_run.stderr)
    assert line.startswith(contract.CONFIG_ERROR_PREFIX + "spec.workload.")
    assert "--" not in line and "usage:" not in in_run.stderr


@pytest.mark.skipif(LEAP_TRAIN is None, reason="leap-train is not installed beside this Python")
@pytest.mark.parametrize("framework", ["pytorch", "tensorflow"])
def test_an_unusable_npz_dataset_is_a_configuration_error_naming_what_is_wrong(tmp_path, framework):
    """A file that is no .npz, or holds images of the wrong size or labels out of range: retrying
    cannot help, so leap-train exits with the config code and one line saying what to fix."""
    import numpy as np

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip archive at all")
    small = tmp_path / "small-images.npz"
    rng = np.random.default_rng(0)
    np.savez(small, images=rng.integers(0, 255, (50, 8, 8), dtype=np.uint8), labels=rng.integers(0, 10, 50))
    labels = tmp_path / "bad-labels.npz"
    np.savez(labels, images=rng.integers(0, 255, (50, 28, 28), dtype=np.uint8), labels=np.arange(50))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAP_")}
    for path, says in ((garbage, "is not a readable .npz file"), (small, "64 features per sample"),
                       (labels, "labels must be classes 0 to 9")):
        done = subprocess.run([LEAP_TRAIN, "--framework", framework, "--dataset", str(path), "--epochs", "1"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == EXIT_CONFIG, (path, done.returncode, done.stderr[-2000:])
        line = one_error_line("\n".join(l for l in done.stderr.splitlines() if l.startswith(contract.CONFIG_ERROR_PREFIX)))
        assert says in line and str(path) in line, line
        assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_leap_run_fails_at_once_on_a_configuration_error(tmp_path):
    name = unique_name("cfg")
    try:
        done = leap("run", str(EXAMPLES / "mnist-cpu.yaml"), "--workdir", str(tmp_path / "run"),
                    "--set", f"metadata.name={name}", "--set", "spec.workload.dataset=/nonexistent/data.npz",
                    "--backoff", "0.1")
    finally:
        kill_run(name)
    assert done.returncode == EXIT_FAILED
    assert "attempt 2" not in done.stdout and "restarting" not in done.stdout  # backoffLimit 3, yet no retry
    assert (f"{name} failed (ConfigError): worker 0 refused its configuration (exit code {EXIT_CONFIG}), "
            "so it is not retried: leap-train: configuration error: spec.workload.dataset:") in done.stderr
    assert "usage:" not in done.stdout + done.stderr
    no_traceback(done.stdout, done.stderr)
    assert json.loads((tmp_path / "run" / "status.json").read_text())["reason"] == "ConfigError"


def test_the_job_fails_for_good_on_the_config_exit_code_and_the_status_says_why():
    run = yaml.safe_load((EXAMPLES / "ddp-cpu.yaml").read_text())
    _, job = render_children(run)
    assert job["spec"]["podFailurePolicy"] == {"rules": [{"action": "FailJob", "onExitCodes": {
        "containerName": CONTAINER, "operator": "In", "values": [EXIT_CONFIG]}}]}
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == CONTAINER and container["terminationMessagePolicy"] == "FallbackToLogsOnError"

    run = {**defaulted(run), "status": {"attempt": 1, "phase": "Running"}}
    assert run["spec"]["runPolicy"]["backoffLimit"] == 3
    line = f"{contract.CONFIG_ERROR_PREFIX}spec.workload.dataset: file '/data/x.npz' does not exist here"
    failed_job = {"metadata": {"name": "ddp-cpu-a1"}, "spec": {"completions": 2}, "status": {
        "failed": 1, "active": 0, "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                                                  "message": "Container trainer for pod ns/ddp-cpu-a1-1 failed"}]}}
    pod = {"metadata": {"name": "ddp-cpu-a1-1", "annotations": {contract.JOB_COMPLETION_INDEX_ANNOTATION: "1"}},
           "status": {"phase": "Failed", "containerStatuses": [{"name": CONTAINER, "state": {"terminated": {
               "exitCode": EXIT_CONFIG, "message": "loading\n" + line + "\n"}}}]}}
    decision = status.compute_status(run, failed_job, [pod], dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    assert decision.status["phase"] == "Failed" and decision.action == "none"
    assert decision.status["reason"] == status.R_CONFIG and decision.status["restarts"] == 0
    assert decision.status["message"] == (f"attempt 1 failed and is not restarted: pod ddp-cpu-a1-1 refused its "
                                          f"configuration (exit code {EXIT_CONFIG}): {line}; fix the spec and "
                                          "create the run again")

    # The pod may be seen failed before the Job controller applies the rule: no restart either;
    # the other worker, still running, is stopped.
    running_job = {**failed_job, "status": {"active": 1, "failed": 0, "conditions": []}}
    early = status.compute_status(run, running_job, [pod], dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    assert (early.status["phase"], early.status["reason"], early.action) == ("Failed", status.R_CONFIG, "stop")


# --- run directories: one owner, checkpoints kept ----------------------------------------------------

CHECKPOINTING = """
    import os, pathlib, time
    ckpt = pathlib.Path(os.environ["LEAP_CHECKPOINT_DIR"]) / "latest.txt"
    print("found a checkpoint" if ckpt.exists() else "no checkpoint", flush=True)
    ckpt.write_text("step 7")
    time.sleep(float(os.environ.get("SLEEP", "0")))
"""


def test_a_second_leap_run_of_the_same_directory_is_refused_naming_the_first(tmp_path):
    name = unique_name("lock")
    path = write_run(tmp_path, name, "import time; print('ready', flush=True); time.sleep(120)")
    workdir = tmp_path / "run"
    first = start_leap("run", str(path), "--workdir", str(workdir))
    try:
        wait_for(lambda: len(processes_of_run(name)) == 1, 60, "the first run's worker", first)
        second = leap("run", str(path), "--workdir", str(workdir), "--fresh")
        assert second.returncode == EXIT_INVALID
        line = one_error_line(second.stderr)
        assert re.search(rf"{workdir} is in use by another `leap run` \(pid {first.pid}, since "
                         r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\); wait for it to finish", line), line
        assert (workdir / "attempt-1" / "worker-0.log").exists()  # the first run's log is untouched
        assert len(processes_of_run(name)) == 1                    # and its worker still runs
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=60)
        assert "stopping 1 worker: waiting up to 10s for them to exit" in out
        assert first.returncode == 130
    finally:
        first.kill()
        kill_run(name)
    assert processes_of_run(name) == []


def test_checkpoints_are_never_deleted_without_fresh_and_the_start_says_which(tmp_path):
    path = write_run(tmp_path, unique_name("ckpt"), CHECKPOINTING)
    workdir = tmp_path / "run"
    checkpoint = workdir / "checkpoints" / "latest.txt"
    first = leap("run", str(path), "--workdir", str(workdir))
    assert first.returncode == 0, first.stderr
    assert "starting fresh" in first.stdout and checkpoint.exists()

    again = leap("run", str(path), "--workdir", str(workdir))
    assert again.returncode == EXIT_INVALID
    assert again.stderr.splitlines() == [
        f"error: {workdir / 'checkpoints'} holds checkpoints of an earlier run; say which you want:",
        f"  leap run {path} --workdir {workdir} --resume    # continue",
        f"  leap run {path} --workdir {workdir} --fresh     # delete them and start over"]
    assert checkpoint.read_text() == "step 7"

    resumed = leap("run", str(path), "--workdir", str(workdir), "--resume")
    assert resumed.returncode == 0
    assert f"resuming from the latest checkpoint (checkpoints in {workdir / 'checkpoints'})" in resumed.stdout
    assert "found a checkpoint" in (workdir / "attempt-1" / "worker-0.log").read_text()

    fresh = leap("run", str(path), "--workdir", str(workdir), "--fresh")
    assert fresh.returncode == 0
    assert "starting fresh (earlier checkpoints deleted: --fresh)" in fresh.stdout
    assert "no checkpoint" in (workdir / "attempt-1" / "worker-0.log").read_text()


def test_the_step_of_a_pytorch_checkpoint_is_read_without_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from leap_operator.local.rundir import RunDir, checkpoint_step
    run_dir = RunDir(tmp_path)
    run_dir.checkpoints.mkdir()
    torch.save({"model": {"w": torch.zeros(3)}, "step": 120, "rng": {"torch": torch.get_rng_state()}},
               run_dir.checkpoints / "latest.pt")
    assert checkpoint_step(run_dir) == 120
    (run_dir.checkpoints / "latest.pt").write_bytes(b"not a zip")
    assert checkpoint_step(run_dir) is None


@pytest.mark.parametrize("where", ["/proc/nope", "file/sub"])
def test_a_workdir_that_cannot_be_created_is_one_line(tmp_path, where):
    (tmp_path / "file").write_text("a regular file")
    workdir = where if where.startswith("/") else str(tmp_path / where)
    path = write_run(tmp_path, unique_name("wd"), PRINT_ENV)
    done = leap("run", str(path), "--workdir", workdir)
    assert done.returncode == EXIT_INVALID
    assert f"error: cannot create the run directory {workdir}:" in one_error_line(done.stderr)
    assert "pass --workdir a directory you can write to" in done.stderr
    no_traceback(done.stdout, done.stderr)


# --- finding things ------------------------------------------------------------------------------------

def free_port_block(size: int) -> int:
    for start in range(21000, 31000, 97):
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("0.0.0.0", start))
                b.bind(("0.0.0.0", start + size - 1))
            except OSError:
                continue
            return start
    raise AssertionError("no free ports")


def test_metrics_use_the_spec_port_plus_local_rank_and_every_url_is_printed(tmp_path):
    port = free_port_block(2)
    path = write_run(tmp_path, unique_name("ports"), PRINT_ENV, workers=2, metrics={"port": port})
    done = leap("run", str(path), "--workdir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert [e["LEAP_METRICS_PORT"] for e in worker_envs(tmp_path / "run")] == [str(port), str(port + 1)]
    assert f"metrics: worker 0: http://127.0.0.1:{port}/metrics\n" in done.stdout
    assert f"metrics: worker 1: http://127.0.0.1:{port + 1}/metrics\n" in done.stdout

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", port))
        taken.listen()
        moved = leap("run", str(path), "--workdir", str(tmp_path / "moved"))
    assert moved.returncode == 0, moved.stderr
    env0 = worker_envs(tmp_path / "moved")[0]
    assert env0["LEAP_METRICS_PORT"] != str(port)
    assert (f"metrics: worker 0: http://127.0.0.1:{env0['LEAP_METRICS_PORT']}/metrics "
            f"(spec.metrics.port {port} + 0 = {port} was taken)") in moved.stdout


def test_version_runs_logs_stream_json_and_a_core_warning(tmp_path):
    version = leap("--version")
    assert version.returncode == 0 and re.fullmatch(r"leap \d+\.\d+\.\d+\S*\n", version.stdout)

    name = unique_name("find")
    workers = (os.cpu_count() or 1) + 1
    path = write_run(tmp_path, name, "import os; print('hello from', os.environ['LEAP_WORKER_INDEX'])", workers=workers)
    runs = tmp_path / "runs"
    done = leap("run", str(path), "--workdir", str(runs / name), "--stream", "-o", "json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # stdout is the JSON only
    assert (result["run"], result["phase"], result["exitCode"]) == (name, "Succeeded", 0)
    assert result["runDirectory"] == str(runs / name)
    assert f"warning: {workers} training processes on {os.cpu_count()} CPU core" in done.stderr
    for index in range(workers):
        assert f"[worker {index}] hello from {index}\n" in done.stderr

    listed = leap("runs", str(runs))
    assert listed.returncode == 0
    header, row = listed.stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "ATTEMPT", "PROGRESS", "STARTED", "RUN", "DIRECTORY"]
    assert row.split()[:3] == [name, "Succeeded", "1/1"] and row.endswith(str(runs / name))
    assert json.loads(leap("runs", "-o", "json", str(runs)).stdout)[0]["phase"] == "Succeeded"

    logs = leap_in(tmp_path, "logs", name, "--worker", "1")
    assert logs.returncode == 0 and logs.stdout == "hello from 1\n"
    no_worker = leap("logs", "--workdir", str(runs / name), "--worker", str(workers))
    assert no_worker.returncode == EXIT_INVALID
    assert f"has no worker {workers}; its workers are 0, 1" in one_error_line(no_worker.stderr)
    unknown = leap_in(tmp_path, "logs", "nope")
    assert unknown.returncode == EXIT_INVALID and "`leap runs` lists the runs" in one_error_line(unknown.stderr)


def test_logs_follow_a_live_run_and_runs_shows_a_killed_one_as_lost(tmp_path):
    name = unique_name("follow")
    path = write_run(tmp_path, name, """
        import time
        for i in range(3):
            print("tick", i, flush=True)
            time.sleep(0.5)
        time.sleep(float(__import__("os").environ.get("HOLD", "0")))
    """)
    workdir = tmp_path / "run"
    proc = start_leap("run", str(path), "--workdir", str(workdir))
    try:
        wait_for(lambda: (workdir / "attempt-1" / "worker-0.log").exists(), 60, "the worker's log", proc)
        follow = leap("logs", "--workdir", str(workdir), "--follow", timeout=60)
        assert follow.stdout == "tick 0\ntick 1\ntick 2\n"  # everything, and it ended with the run
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        kill_run(name)

    held = start_leap("run", str(path), "--workdir", str(tmp_path / "killed"),
                      "--set", "spec.env=[{name: HOLD, value: '60'}]")
    try:
        wait_for(lambda: len(processes_of_run(name)) == 1, 60, "the worker", held)
        running = json.loads(leap("runs", "-o", "json", str(tmp_path / "killed")).stdout)[0]
        assert running["phase"] == "Running" and running["active"] is True
        held.kill()
        held.wait(timeout=10)
        lost = json.loads(leap("runs", "-o", "json", str(tmp_path / "killed")).stdout)[0]
        assert lost["phase"] == "Lost" and "--resume" in lost["message"]
    finally:
        held.kill()
        kill_run(name)


def test_a_closed_output_pipe_does_not_stop_training(tmp_path):
    name = unique_name("pipe")
    path = write_run(tmp_path, name, """
        import os, pathlib, time
        time.sleep(2)
        pathlib.Path(os.environ["LEAP_CHECKPOINT_DIR"], "finished").write_text("yes")
    """)
    workdir = tmp_path / "run"
    proc = subprocess.Popen(LEAP + ["run", str(path), "--workdir", str(workdir)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()  # `leap run ... | head -1`
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 0, err
    finally:
        proc.kill()
        kill_run(name)
    assert (workdir / "checkpoints" / "finished").read_text() == "yes"
    assert "the output pipe closed; training goes on" in err
    no_traceback(err)


def test_the_live_table_fits_80_columns_and_starts_without_attempt_0(tmp_path):
    path = write_run(tmp_path, unique_name("narrow"), "import time; time.sleep(2)", workers=2)
    code, screen = run_on_a_terminal(["run", str(path), "--workdir", str(tmp_path / "run")], 80)
    assert code == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    table_lines = [line for line in re.split(r"[\r\n]+", text) if "running" in line or "samples/s" in line]
    assert table_lines and all(len(line) <= 80 for line in table_lines), table_lines
    assert "attempt 0/" not in text and "attempt 1/1" in text


def test_the_distillation_phase_is_shown_from_the_trainers_log(tmp_path):
    from io import StringIO
    from types import SimpleNamespace

    from rich.console import Console

    from leap_operator.local.display import PlainDisplay, RunInfo, distillation_phase
    from leap_operator.local.scrape import ProgressMonitor

    torch_log = ("leap-train: metrics on :9400/metrics (rank 0)\n"
                 "leap-train: teacher: mlp-large, 31 steps of 128 x 1 on CPU (AMD EPYC, 2 threads)\n"
                 "leap-train: epoch 1/1: step 31, loss 0.3685, test accuracy 0.8660\n")
    assert distillation_phase("") is None
    assert distillation_phase(torch_log) == "teacher (1/3)"
    assert distillation_phase(torch_log + "leap-train: student-alone: mlp, 31 steps of 128 x 1\n") == "student alone (2/3)"
    assert distillation_phase(torch_log + "leap-train: student-distilled: mlp, 31 steps\n") == "distilled student (3/3)"
    assert distillation_phase("leap-train: teacher loaded from /c/teacher.pt\n") == "student alone (2/3)"
    keras = "[leap-train tensorflow] strategy default: one device; 1 replica(s)\n"
    assert distillation_phase(keras) is None
    assert distillation_phase(keras + "[leap-train tensorflow] teacher: 31 steps, test accuracy 0.8600, 900 samples/s\n") \
        == "student alone (2/3)"
    assert distillation_phase("[leap-train tensorflow] student-alone: 31 steps, test accuracy 0.8\n") \
        == "distilled student (3/3)"
    assert distillation_phase("[leap-train tensorflow] student-distilled: 31 steps, test accuracy 0.9\n") \
        == "distilled student (3/3)"   # the phase names of both frameworks (orchestrator.DISTILLATION_PHASES)

    log = tmp_path / "worker-0.log"
    log.write_text(torch_log)
    worker = SimpleNamespace(index=0, plan=SimpleNamespace(log_path=log), poll=lambda: None)
    text = StringIO()
    info = RunInfo(name="d", framework="pytorch", workers=1, procs_per_worker=1, device="cpu", epochs=1,
                   max_attempts=1, distillation=True)
    display = PlainDisplay(Console(file=text, width=200), info, ProgressMonitor())
    display.workers = [worker]
    display.after_poll({})
    log.write_text(torch_log + "leap-train: student-alone: mlp, 31 steps of 128 x 1\n")
    display._phase_checked = 0.0  # (checked at most twice a second)
    display.after_poll({})
    display._phase_checked = 0.0
    display.after_poll({})
    assert text.getvalue().splitlines() == ["distillation: training the teacher (1/3)",
                                            "distillation: training the student alone (2/3)"]


# --- leap operator: one line, not a traceback -------------------------------------------------------

def operator(env_changes: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env.update(env_changes)
    return subprocess.run(LEAP + ["operator", "--standalone", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": server}}], "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    return path


def test_operator_without_credentials_or_api_server_says_so_in_one_line(tmp_path):
    nothing = operator({"HOME": str(tmp_path)})
    assert nothing.returncode == EXIT_INVALID
    assert one_error_line(nothing.stderr).startswith("leap operator: error: no Kubernetes credentials:")

    missing = operator({"KUBECONFIG": str(tmp_path / "nope.yaml")})
    assert missing.returncode == EXIT_INVALID
    assert one_error_line(missing.stderr) == (
        f"leap operator: error: KUBECONFIG names {tmp_path / 'nope.yaml'}, which does not exist; point KUBECONFIG "
        "at a kubeconfig file (the one kubectl uses) or unset it")

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]  # bound, never listening: connections are refused
        started = time.monotonic()
        unreachable = operator({"KUBECONFIG": str(kubeconfig(tmp_path / "kc", f"http://127.0.0.1:{dead}"))})
    assert unreachable.returncode == EXIT_FAILED and time.monotonic() - started < 30
    assert one_error_line(unreachable.stderr).startswith(
        f"leap operator: error: cannot reach the Kubernetes API server at http://127.0.0.1:{dead} (")

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = operator({"KUBECONFIG": str(tmp_path / "kc")}, "--metrics-port", str(port))
    assert busy.returncode == EXIT_INVALID
    assert one_error_line(busy.stderr) == (
        f"leap operator: error: cannot serve on port {port} (--metrics-port): the port is in use by another "
        "program; choose another with --metrics-port PORT, or --metrics-port 0 to turn it off")
    no_traceback(nothing.stderr, missing.stderr, unreachable.stderr, busy.stderr)


def test_operator_fails_a_run_for_good_on_a_config_error_and_liveness_follows_the_api_server(tmp_path):
    # One operator for both: starting one costs seconds.
    from emulator import Emulator, OperatorProcess, Proxy
    from emulator import wait_for as poll
    from test_operator import gpu_run, phase

    def healthz(op: OperatorProcess) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{op.liveness_port}/healthz", timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return 0

    ns, name = "live", "bad-data"
    with Emulator() as k8s:
        k8s.create_namespace(ns)
        proxy = Proxy(k8s).up()
        op = OperatorProcess(k8s, tmp_path, [ns], server=proxy.url, verbose=False).start()
        try:
            op.wait_ready()
            # A worker exits with the config code: the Job controller applies the FailJob rule.
            k8s.create_run(gpu_run(name, ns, runPolicy={"backoffLimit": 3}))
            job = poll(lambda: k8s.get("batch/v1/jobs", ns, f"{name}-a1"), message="attempt 1's Job")
            assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [EXIT_CONFIG]
            pods = k8s.start_pods(job, "Running")
            line = f"{contract.CONFIG_ERROR_PREFIX}spec.workload.dataset: file '/data/x.npz' does not exist here"
            k8s.patch("v1/pods", ns, pods[0]["metadata"]["name"], {"status": {"phase": "Failed", "containerStatuses": [
                {"name": CONTAINER, "state": {"terminated": {"exitCode": EXIT_CONFIG, "message": line + "\n"}}}]}},
                "status")
            k8s.set_job_status(ns, f"{name}-a1", {"active": 0, "failed": 1, "conditions": [
                {"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                 "message": "Container trainer for pod live/bad-data-a1-0 failed with exit code 78"}]})
            poll(lambda: phase(k8s, ns, name) == "Failed", message="the run Failed")
            run = k8s.run(ns, name)
            assert run["status"]["reason"] == "ConfigError" and run["status"]["restarts"] == 0
            assert line in run["status"]["message"]
            time.sleep(1)  # a restart would have created attempt 2's Job by now (backoff 0.2s)
            assert k8s.get("batch/v1/jobs", ns, f"{name}-a2") is None

            proxy.down()
            poll(lambda: healthz(op) == 500, 40, 0.5, "/healthz to fail while the API server is away")
            proxy.up()
            poll(lambda: healthz(op) == 200, 40, 0.5, "/healthz to recover with the API server")
            assert "the Kubernetes API server is unreachable" in op.output()
            no_traceback(op.output())
        finally:
            proxy.down()
            op.stop()
