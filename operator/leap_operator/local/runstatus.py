"""<run dir>/status.json: what `leap runs` lists (phase, attempt, progress), kept by `leap run`.

Written atomically (a reader sees the old file or the new one) when the run starts, at each
attempt, every few seconds while it trains, and when it ends. A "Running" status whose
directory lock is free belongs to a `leap run` that was killed: `leap runs` shows it as Lost.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from leap_operator.local.rundir import RunDir


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # the status is a convenience: never fail a run over it


class StatusWriter:
    def __init__(self, run_dir: RunDir, *, name: str, file: str, workers: int, max_attempts: int,
                 every: float = 2.0):
        self.run_dir, self.every = run_dir, every
        self.data = {"run": name, "phase": "Starting", "reason": "", "message": "", "pid": os.getpid(),
                     "file": str(Path(file).resolve()) if file != "-" else "-", "workers": workers,
                     "attempt": 0, "maxAttempts": max_attempts, "started": time.time(), "finished": None,
                     "progress": None, "runDirectory": str(run_dir.path)}
        self._last = 0.0
        self.write()

    def write(self) -> None:
        self._last = time.monotonic()
        write_json(self.run_dir.status, self.data)

    def attempt(self, attempt: int) -> None:
        self.data.update(phase="Running", attempt=attempt)
        self.write()

    def progress(self, progress: dict | None) -> None:
        if progress:
            keys = ("step", "totalSteps", "percent", "epoch", "loss", "samplesPerSecond", "etaSeconds")
            self.data["progress"] = {k: progress.get(k) for k in keys if progress.get(k) is not None}
        if time.monotonic() - self._last >= self.every:
            self.write()

    def finish(self, phase: str, reason: str, message: str) -> None:
        self.data.update(phase=phase, reason=reason, message=message, finished=time.time())
        self.write()
