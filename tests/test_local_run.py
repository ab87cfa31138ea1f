"""`leap run`: the parts a user meets before and around training, with real processes.

Workers here run small custom commands (spec.command), so these tests need no ML framework and
stay fast; tests/test_local_run_training.py runs the real trainer. Helpers shared with it live
at the top of this module.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import yaml

from leap_trainer.contract import EXIT_CONFIG, EXIT_FAILED, EXIT_INVALID

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "manifests" / "examples"
# The installed console script, as a user runs it (python -m when this Python has none beside it).
LEAP = ([str(Path(sys.executable).with_name("leap"))] if Path(sys.executable).with_name("leap").exists()
        else [sys.executable, "-m", "leap_operator.cli"])


def unique_name(prefix: str) -> str:
    # Unique per test run: other sessions on this machine may run the same examples.
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def leap(*args: str, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(LEAP + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs)


def start_leap(*args: str) -> subprocess.Popen:
    return subprocess.Popen(LEAP + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def processes_of_run(run_name: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment has LEAP_RUN=<run_name>:
    workers and anything they started, wherever they were reparented to."""
    marker = f"LEAP_RUN={run_name}".encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker not in (entry / "environ").read_bytes():
                continue
            status = (entry / "status").read_text()
            if "\nState:\tZ" in status:  # a zombie has already exited
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found.append((int(entry.name), cmdline))
    return found


def kill_run(run_name: str) -> None:
    """Cleanup for a failing test: no process of the run may outlive it."""
    for pid, _ in processes_of_run(run_name):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"leap run exited ({proc.returncode}) before {what}\n{out}\n{err}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")



def write_run(tmp_path: Path, name: str, script: str, *, workers: int = 1, backoff_limit: int = 0,
              env: list[dict] | None = None, **spec) -> Path:
    """A TrainingRun whose workers run `python -c script` (a custom command, as a user's image would)."""
    doc = {"apiVersion": "leap.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": name},
           "spec": {"framework": "pytorch", "command": [sys.executable, "-c"], "args": [textwrap.dedent(script)],
                    "workers": workers, "runPolicy": {"backoffLimit": backoff_limit}, **spec}}
    if env:
        doc["spec"]["env"] = env
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


PRINT_ENV = """
    import json, os
    print(json.dumps(dict(os.environ)))
"""


def worker_envs(workdir: Path, attempt: int = 1) -> list[dict]:
    logs = sorted((workdir / f"attempt-{attempt}").glob("worker-*.log"))
    return [json.loads(log.read_text().strip().splitlines()[-1]) for log in logs]


# --- validation before anything starts ------------------------------------------------------------

def test_invalid_file_gets_the_same_field_errors_as_leap_validate_and_nothing_starts(tmp_path):
    doc = yaml.safe_load((EXAMPLES / "mnist-cpu.yaml").read_text())
    doc["spec"]["workers"] = 0
    doc["spec"]["workload"]["batchsize"] = 64
    doc["spec"]["accelerator"]["type"] = "gpu"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    workdir = tmp_path / "run"

    validate = leap("validate", str(bad))
    ran = leap("run", str(bad), "--workdir", str(workdir))

    problems = [line.strip() for line in validate.stdout.splitlines() if line.startswith("  ")]
    assert len(problems) == 3, validate.stdout
    assert any(p.startswith("spec.workers:") for p in problems)
    assert any(p.startswith("spec.workload.batchsize:") for p in problems)
    assert any(p.startswith("spec.accelerator.type:") for p in problems)
    for problem in problems:
        assert problem in ran.stderr
    assert validate.returncode == ran.returncode == EXIT_INVALID  # invalid: 2, failed: 1
    assert "nothing was started" in ran.stderr
    assert not workdir.exists()


def test_set_overrides_reach_the_workers_and_bad_paths_are_named(tmp_path):
    name = unique_name("set")
    path = write_run(tmp_path, name, PRINT_ENV, env=[{"name": "GREETING", "value": "hello"}])
    workdir = tmp_path / "run"

    done = leap("run", str(path), "--workdir", str(workdir), "--set", "spec.workers=3",
                "--set", "spec.env[0].value=bonjour", "--set", "spec.env[1]={name: RENDEZVOUS, value: '$(MASTER_ADDR):$(MASTER_PORT)'}")
    assert done.returncode == 0, done.stderr
    envs = worker_envs(workdir)
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    assert {e["WORLD_SIZE"] for e in envs} == {"3"}
    assert {e["GREETING"] for e in envs} == {"bonjour"}
    # $(VAR) references see the local rendezvous address, as the kubelet would expand them.
    assert {e["RENDEZVOUS"] for e in envs} == {f"127.0.0.1:{envs[0]['MASTER_PORT']}"}

    into_scalar = leap("run", str(path), "--workdir", str(workdir), "--set", "spec.workers.count=2")
    assert into_scalar.returncode == EXIT_INVALID
    assert "--set spec.workers.count=2: spec.workers is" in into_scalar.stderr
    typo = leap("run", str(path), "--workdir", str(workdir), "--set", "spec.workerz=2")
    assert typo.returncode == EXIT_INVALID
    assert "spec.workerz: unknown field; remove it (did you mean workers?) (from --set spec.workerz=2)" in typo.stderr
    no_value = leap("run", str(path), "--set", "spec.workers")
    assert no_value.returncode == EXIT_INVALID
    assert "--set spec.workers: expected PATH=VALUE" in no_value.stderr


# --- the pod's env, locally ----------------------------------------------------------------------

def test_each_worker_gets_its_pod_env_with_local_addresses_ports_and_run_directory(tmp_path):
    name = unique_name("env")
    path = write_run(tmp_path, name, PRINT_ENV, workers=2)
    workdir = tmp_path / "run"
    done = leap("run", str(path), "--workdir", str(workdir))
    assert done.returncode == 0, done.stderr
    w0, w1 = worker_envs(workdir)
    for index, env in enumerate((w0, w1)):
        assert env["LEAP_RUN"] == name and env["LEAP_ATTEMPT"] == "1"
        assert env["LEAP_WORKER_INDEX"] == env["NODE_RANK"] == env["RANK"] == str(index)  # the downward API's index
        assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == "127.0.0.1"
        assert env["LEAP_CHECKPOINT_DIR"] == str(workdir / "checkpoints")
        assert env["LEAP_SUMMARY_PATH"] == str(workdir / "attempt-1" / f"worker-{index}.summary.json")
        assert env["CUDA_VISIBLE_DEVICES"] == ""  # a cpu run sees no GPU, as its pod would not
    assert w0["MASTER_PORT"] == w1["MASTER_PORT"]
    assert w0["LEAP_WORKER_HOSTS"] == w1["LEAP_WORKER_HOSTS"]
    assert w0["LEAP_WORKER_HOSTS"].split(",")[0] == f"127.0.0.1:{w0['MASTER_PORT']}"
    assert w0["LEAP_METRICS_PORT"] != w1["LEAP_METRICS_PORT"]  # two "pods" on one host


def test_tpu_run_explains_it_needs_a_tpu_host_unless_allowed_on_cpu(tmp_path):
    refused = leap("run", str(EXAMPLES / "keras-tpu.yaml"), "--workdir", str(tmp_path / "refused"))
    assert refused.returncode == EXIT_INVALID
    assert "not a TPU host" in refused.stderr and "--allow-cpu" in refused.stderr
    assert not (tmp_path / "refused").exists()

    # Allowed: the run's own pods, on CPU. A custom command shows what the workers were given.
    allowed = leap("run", str(EXAMPLES / "keras-tpu.yaml"), "--allow-cpu", "--workdir", str(tmp_path / "cpu"),
                   "--set", "spec.workload=null", "--set", f"spec.command=[{sys.executable}, -c]",
                   "--set", f"spec.args={json.dumps([textwrap.dedent(PRINT_ENV)])}")
    assert allowed.returncode == 0, allowed.stderr
    assert "no TPU on this machine: running on CPU (--allow-cpu)" in allowed.stdout
    (env,) = worker_envs(tmp_path / "cpu")
    assert env["LEAP_ACCELERATOR"] == "cpu"
    # Without a TPU the workers must not be told they are on a TPU host.
    assert "TPU_WORKER_ID" not in env and "TPU_WORKER_HOSTNAMES" not in env


# --- restarts and stopping -----------------------------------------------------------------------

def test_a_failing_worker_restarts_the_gang_until_backoff_limit_then_fails_with_its_log(tmp_path):
    name = unique_name("crash")
    script = """
        import os, sys, time
        if os.environ["RANK"] == "1":
            print("worker 1 gives up: disk on fire", flush=True)
            sys.exit(3)
        time.sleep(60)  # worker 0 would wait for its peer forever: leap run must stop it
    """
    path = write_run(tmp_path, name, script, workers=2, backoff_limit=2)
    done = leap("run", str(path), "--workdir", str(tmp_path / "run"), "--backoff", "0.2", "--grace-period", "2")
    assert done.returncode == 1
    for attempt in (1, 2, 3):
        assert f"attempt {attempt}: worker 1 exited with code 3" in done.stdout
        assert (tmp_path / "run" / f"attempt-{attempt}" / "worker-1.log").exists()
    assert "attempt 4" not in done.stdout
    assert "disk on fire" in done.stdout  # the tail of the failed worker's log
    assert "runPolicy.backoffLimit (2) restarts used up after 3 attempts" in done.stderr
    assert processes_of_run(name) == []


def test_ctrl_c_stops_every_worker_and_what_they_started(tmp_path):
    name = unique_name("ctrlc")
    # Each worker starts a grandchild, as DDP launchers and data loaders do.
    script = """
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        print("ready", flush=True)
        time.sleep(300)
    """
    path = write_run(tmp_path, name, script, workers=2)
    workdir = tmp_path / "run"
    proc = start_leap("run", str(path), "--workdir", str(workdir))
    try:
        wait_for(lambda: len(processes_of_run(name)) == 4, 60, "2 workers and their 2 children", proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "stopped by SIGINT" in err
        assert processes_of_run(name) == []
        assert not list(workdir.glob("attempt-1/*.pid"))
    finally:
        proc.kill()
        kill_run(name)


def test_a_missing_program_fails_clearly_before_training(tmp_path):
    path = write_run(tmp_path, unique_name("nocmd"), "", command=["no-such-trainer-xyz"])
    done = leap("run", str(path), "--workdir", str(tmp_path / "run"))
    assert done.returncode == 1
    assert "cannot start 'no-such-trainer-xyz'" in done.stderr


def test_workers_do_not_outlive_a_killed_leap_run(tmp_path):
    # SIGKILL gives leap run no chance to stop anyone: the workers must go by themselves.
    name = unique_name("orphan")
    path = write_run(tmp_path, name, "import time; print('ready', flush=True); time.sleep(300)", workers=2)
    proc = start_leap("run", str(path), "--workdir", str(tmp_path / "run"))
    try:
        wait_for(lambda: len(processes_of_run(name)) == 2, 60, "2 workers", proc)
        proc.kill()
        proc.wait(timeout=10)
        wait_for(lambda: processes_of_run(name) == [], 10, "the workers to exit with their parent")
    finally:
        kill_run(name)


def test_secret_env_needs_the_shell_to_provide_it(tmp_path):
    name = unique_name("secret")
    token = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    path = write_run(tmp_path, name, PRINT_ENV, env=[token])
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}

    missing = leap("run", str(path), "--workdir", str(tmp_path / "missing"), env=env)
    assert missing.returncode == EXIT_INVALID
    assert "env HF_TOKEN: comes from Secret 'hf' key 'token'" in missing.stderr
    assert "export HF_TOKEN=" in missing.stderr
    assert not (tmp_path / "missing").exists()

    given = leap("run", str(path), "--workdir", str(tmp_path / "given"), env={**env, "HF_TOKEN": "s3cret"})
    assert given.returncode == 0, given.stderr
    assert worker_envs(tmp_path / "given")[0]["HF_TOKEN"] == "s3cret"


def test_a_directory_leap_run_did_not_make_is_never_cleared(tmp_path):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    path = write_run(tmp_path, unique_name("dir"), PRINT_ENV)
    done = leap("run", str(path), "--workdir", str(precious))
    assert done.returncode == EXIT_INVALID
    assert "is not empty and was not made by `leap run`" in done.stderr
    assert [p.name for p in precious.iterdir()] == ["chapter1.tex"]


def run_on_a_terminal(argv: list[str], columns: int) -> tuple[int, str]:
    """Run `leap ARGV` on a pseudo-terminal COLUMNS wide: (exit code, everything it drew)."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(LEAP + argv, cwd=ROOT, stdin=terminal, stdout=terminal, stderr=terminal,
                            env={**os.environ, "COLUMNS": str(columns)})
    os.close(terminal)
    screen = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: leap run exited
            break
        if not chunk:
            break
        screen += chunk
    os.close(controller)
    return proc.wait(timeout=60), screen.decode(errors="replace")


def test_on_a_terminal_progress_is_a_live_table(tmp_path):
    path = write_run(tmp_path, unique_name("tty"), "import time; time.sleep(2)", workers=2)
    code, text = run_on_a_terminal(["run", str(path), "--workdir", str(tmp_path / "run")], 120)
    assert code == 0
    assert "\x1b[" in text  # redrawn in place with terminal control sequences
    assert "attempt 1/1" in text and "samples/s" in text and "ETA" in text  # the table's title and header
    assert "done" in text  # each worker's state


def test_active_deadline_stops_the_run(tmp_path):
    name = unique_name("deadline")
    path = write_run(tmp_path, name, "import time; time.sleep(120)", workers=2,
                     backoff_limit=3)
    done = leap("run", str(path), "--workdir", str(tmp_path / "run"), "--set", "spec.runPolicy.activeDeadlineSeconds=1")
    assert done.returncode == 1
    assert "failed (DeadlineExceeded): runPolicy.activeDeadlineSeconds (1s) passed" in done.stderr
    assert "attempt 2" not in done.stdout  # a deadline is final: no restart
    assert processes_of_run(name) == []
