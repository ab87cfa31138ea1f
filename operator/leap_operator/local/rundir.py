"""The local run directory: what a cluster keeps in PVCs, pod logs and status, kept on disk.

    <run dir>/.leap-run                  marker: this directory belongs to `leap run`
    <run dir>/checkpoints/               LEAP_CHECKPOINT_DIR of every worker (like a shared PVC)
    <run dir>/attempt-<a>/worker-<i>.log     stdout and stderr of worker i in attempt a
    <run dir>/attempt-<a>/worker-<i>.pid     its process id (also its process group id) while it runs
    <run dir>/attempt-<a>/worker-<i>.summary.json   LEAP_SUMMARY_PATH of worker i
    <run dir>/summary.json               the final summary, with the local facts (attempts, ...)
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

MARKER = ".leap-run"


class RunDirError(Exception):
    pass


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

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


def prepare(path: Path, run_name: str, *, resume: bool) -> RunDir:
    """Create the run directory. A fresh run clears what an earlier `leap run` left there (the
    cluster starts a new TrainingRun with empty checkpoints too); --resume keeps its checkpoints.
    A non-empty directory `leap run` did not create is never touched."""
    path = path.resolve()
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} is a file; pass --workdir a directory")
    marker = path / MARKER
    if path.is_dir() and any(path.iterdir()) and not marker.exists():
        raise RunDirError(f"{path} is not empty and was not made by `leap run`; "
                          "pass --workdir a new or empty directory")
    run_dir = RunDir(path)
    if path.is_dir():
        for child in path.iterdir():
            if child.name == MARKER or (resume and child.name == "checkpoints"):
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"run": run_name, "started": time.time()}) + "\n")
    return run_dir


def has_checkpoint(run_dir: RunDir) -> bool:
    return any(run_dir.checkpoints.iterdir()) if run_dir.checkpoints.is_dir() else False
