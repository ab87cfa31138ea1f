"""The local run directory: what a cluster keeps in PVCs, pod logs and status, kept on disk.

    <run dir>/.leap-run                  marker: this directory belongs to `leap run`
    <run dir>/.leap-run.lock             locked by the `leap run` using it (pid, start time inside)
    <run dir>/status.json                phase, attempt, progress: what `leap runs` lists
    <run dir>/checkpoints/               LEAP_CHECKPOINT_DIR of every worker (like a shared PVC)
    <run dir>/attempt-<a>/worker-<i>.log     stdout and stderr of worker i in attempt a
    <run dir>/attempt-<a>/worker-<i>.pid     its process id (also its process group id) while it runs
    <run dir>/attempt-<a>/worker-<i>.summary.json   LEAP_SUMMARY_PATH of worker i
    <run dir>/summary.json               the final summary, with the local facts (attempts, ...)
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pickle
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

MARKER = ".leap-run"
LOCK = ".leap-run.lock"   # flock held by the `leap run` that owns the directory; pid and start inside
STATUS = "status.json"    # phase, attempt and progress, for `leap runs`


class RunDirError(Exception):
    pass


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def status(self) -> Path:
        return self.path / STATUS

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    def attempt(self, attempt: int) -> Path:
        return self.path / f"attempt-{attempt}"

    def log(self, attempt: int, index: int) -> Path:
        return self.attempt(attempt) / f"worker-{index}.log"

    def pid_file(self, attempt: int, index: int) -> Path:
        return self.attempt(attempt) / f"worker-{index}.pid"

    def worker_summary(self, attempt: int, index: int) -> Path:
        return self.attempt(attempt) / f"worker-{index}.summary.json"


class CheckpointsExist(RunDirError):
    """Checkpoints of an earlier run are there and neither --resume nor --fresh was given."""

    def __init__(self, run_dir: "RunDir", step: int | None):
        self.run_dir, self.step = run_dir, step
        super().__init__(f"{run_dir.checkpoints} holds checkpoints of an earlier run"
                         + (f" (step {step})" if step is not None else ""))


def _held_by(lock_path: Path) -> tuple[int | None, str]:
    """(pid, "pid N, since TIME") of the `leap run` holding the lock, as far as its file says."""
    try:
        info = json.loads(lock_path.read_text() or "{}")
        pid = int(info["pid"])
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        return pid, f"pid {pid}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return None, "pid unknown"


_HELD: dict[Path, int] = {}  # run directory -> fd of its lock, held until this process exits


def lock(path: Path, run_name: str) -> None:
    """Own the run directory: one `leap run` at a time (an flock, gone with the process)."""
    lock_path = path / LOCK
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid, holder = _held_by(lock_path)
        stop = f"Ctrl-C there, or kill {pid}" if pid else "Ctrl-C there"
        raise RunDirError(f"{path} is in use by another `leap run` ({holder}); wait for it to finish, "
                          f"stop it ({stop}), or pass --workdir another directory") from None
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps({"run": run_name, "pid": os.getpid(), "started": time.time()}) + "\n").encode())
    _HELD[path] = fd


def unlock(path: Path) -> None:
    fd = _HELD.pop(path.resolve(), None)
    if fd is not None:
        os.close(fd)


def in_use(path: Path) -> bool:
    """Does a live `leap run` own this directory?"""
    if path.resolve() in _HELD:
        return True
    try:
        fd = os.open(path / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def prepare(path: Path, run_name: str, *, resume: bool, fresh: bool = False) -> RunDir:
    """Create and lock the run directory. Checkpoints are kept unless `fresh` (the explicit
    --fresh); an earlier run's checkpoints without --resume or --fresh is refused
    (CheckpointsExist). Logs, pid files and summaries of an earlier run are cleared. A non-empty
    directory `leap run` did not create is never touched."""
    path = path.resolve()
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} is a file; pass --workdir a directory")
    marker = path / MARKER
    try:
        if path.is_dir() and any(path.iterdir()) and not marker.exists():
            raise RunDirError(f"{path} is not empty and was not made by `leap run`; "
                              "pass --workdir a new or empty directory")
        path.mkdir(parents=True, exist_ok=True)
        lock(path, run_name)
    except OSError as exc:
        raise RunDirError(f"cannot create the run directory {path}: {exc.strerror or exc}; "
                          "pass --workdir a directory you can write to") from None
    run_dir = RunDir(path)
    try:
        if has_checkpoint(run_dir) and not (resume or fresh):
            raise CheckpointsExist(run_dir, checkpoint_step(run_dir))
        for child in path.iterdir():
            if child.name in (MARKER, LOCK) or (child.name == "checkpoints" and not fresh):
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"run": run_name, "started": time.time()}) + "\n")
    except BaseException:
        unlock(path)
        raise
    return run_dir


def has_checkpoint(run_dir: RunDir) -> bool:
    return any(run_dir.checkpoints.iterdir()) if run_dir.checkpoints.is_dir() else False


class _Stub:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __setstate__(self, state):
        pass


class _NoTorch(pickle.Unpickler):
    """Reads the plain values of a torch.save() pickle (the step) without torch: tensors and
    torch classes become stubs."""

    def find_class(self, module, name):
        if module.split(".")[0] in ("builtins", "collections") and name in ("OrderedDict", "dict", "list", "set",
                                                                            "tuple", "int", "float", "str"):
            return super().find_class(module, name)
        return _Stub

    def persistent_load(self, pid):
        return None


def checkpoint_step(run_dir: RunDir) -> int | None:
    """The step the latest checkpoint was saved at (PyTorch latest.pt or Keras state.json), if known."""
    torch_latest = run_dir.checkpoints / "latest.pt"
    try:
        if torch_latest.exists():
            with zipfile.ZipFile(torch_latest) as archive:
                pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
                state = _NoTorch(io.BytesIO(archive.read(pkl))).load()
            return int(state["step"])
        steps = [int(json.loads(p.read_text())["step"]) for p in run_dir.checkpoints.glob("keras/*/state.json")]
        return max(steps) if steps else None
    except Exception:  # an unreadable checkpoint is the trainer's to report; here it only means "unknown"
        return None
