"""Worker processes and the gang-restart policy, as the operator applies it in a cluster.

Every worker starts in its own session (so its own process group): stopping a worker signals
the whole group, so processes it started (DDP local ranks, data loaders) stop with it. An
attempt ends when all workers succeed, one fails (the others are stopped: a gang cannot lose a
member), the run's deadline passes, or the user interrupts. A failed attempt is followed by a
new one after an exponential backoff, up to runPolicy.backoffLimit restarts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from leap_operator.local.plan import WorkerPlan
from leap_trainer.contract import EXIT_CONFIG, EXIT_FAILED, EXIT_OK

POLL_SECONDS = 0.1


class WorkerStartError(Exception):
    pass


class StopFlag:
    """Set from signal handlers: the signal that asked us to stop; a second one means hurry."""

    def __init__(self):
        self.signum: int | None = None
        self.hurry = False

    def __call__(self, signum, _frame=None):
        if self.signum is not None:
            self.hurry = True
        self.signum = self.signum or signum

    def install(self, signals=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)) -> dict:
        return {s: signal.signal(s, self) for s in signals}

    @staticmethod
    def restore(previous: dict) -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Worker:
    def __init__(self, plan: WorkerPlan, proc: subprocess.Popen):
        self.plan, self.proc = plan, proc

    @property
    def index(self) -> int:
        return self.plan.index

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def group_alive(self) -> bool:
        """Is any process of this worker's group left (the leader reaped first: zombies count)?"""
        self.poll()
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


# Even if `leap run` itself is SIGKILLed (no chance to stop anyone), its workers must not live on:
# each worker asks Linux for SIGKILL when its parent dies, then execs the real command (same pid).
# A tiny exec'ing launcher instead of preexec_fn, which is unsafe while the display's thread runs.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "    pass  # not Linux\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)  # the parent died before prctl took effect\n"
    "os.execv(sys.argv[2], sys.argv[3:])\n"
)


def _launcher(program: str, argv: list[str]) -> list[str]:
    """The command line that runs `program` (a resolved path) with `argv` (argv[0] as given)."""
    if not sys.platform.startswith("linux"):
        return [program, *argv[1:]]
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), program, *argv]


def start_worker(plan: WorkerPlan) -> Worker:
    program = shutil.which(plan.argv[0], path=plan.env.get("PATH"))
    if program is None:
        raise WorkerStartError(f"{plan.label}: cannot start {plan.argv[0]!r} (not found, or not executable); "
                               "for spec.command, install that program here or give its full path")
    plan.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(plan.log_path, "ab") as log:
        proc = subprocess.Popen(_launcher(program, plan.argv), env=plan.env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    plan.pid_path.write_text(f"{proc.pid}\n")
    return Worker(plan, proc)


def stop_workers(workers: list[Worker], grace_seconds: float, stop: StopFlag | None = None) -> None:
    """SIGTERM every worker's process group, SIGKILL what is left after the grace period (at
    once on a second Ctrl-C), and reap the workers. Safe on workers that already exited."""
    for worker in workers:
        if worker.group_alive():
            worker.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while any(w.group_alive() for w in workers) and time.monotonic() < deadline and not (stop and stop.hurry):
        time.sleep(POLL_SECONDS)
    for worker in workers:
        if worker.group_alive():
            worker.signal_group(signal.SIGKILL)
    for worker in workers:
        try:
            worker.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # unkillable (D state): nothing more we can do
            pass
        worker.plan.pid_path.unlink(missing_ok=True)
    # SIGKILLed grandchildren are reaped by init; wait until the kernel has removed them.
    deadline = time.monotonic() + 5
    while any(w.group_alive() for w in workers) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)


@dataclass
class AttemptResult:
    succeeded: bool = False
    failed_worker: Worker | None = None
    exit_code: int | None = None
    deadline_exceeded: bool = False
    interrupted_by: int | None = None


def watch(workers: list[Worker], stop: StopFlag, on_tick: Callable[[], None], deadline: float | None) -> AttemptResult:
    first_seen: dict[int, int] = {}  # worker index -> poll round its exit was first seen
    rounds = 0
    while True:
        if stop.signum is not None:
            return AttemptResult(interrupted_by=stop.signum)
        rounds += 1
        codes = {w.index: w.poll() for w in workers}
        for index, code in codes.items():
            if code is not None:
                first_seen.setdefault(index, rounds)
        failures = [w for w in workers if codes[w.index] not in (None, 0)]
        if failures:
            # Several can be seen at once (the others notice the lost peer): the cause is the
            # first to exit, and among equals one killed by a signal rather than one that erred.
            cause = min(failures, key=lambda w: (first_seen[w.index], codes[w.index] >= 0, w.index))
            return AttemptResult(failed_worker=cause, exit_code=codes[cause.index])
        if all(code == 0 for code in codes.values()):
            return AttemptResult(succeeded=True)
        if deadline is not None and time.monotonic() > deadline:
            return AttemptResult(deadline_exceeded=True)
        on_tick()
        time.sleep(POLL_SECONDS)


class Events(Protocol):
    def attempt_started(self, attempt: int, workers: list[Worker]) -> None: ...
    def attempt_failed(self, attempt: int, message: str, log_tail: str, retry_in: float | None) -> None: ...
    def tick(self, workers: list[Worker]) -> None: ...
    def stopping(self, workers: list[Worker], grace_seconds: float) -> None: ...


@dataclass
class Outcome:
    succeeded: bool
    attempts: int
    reason: str                    # Succeeded | BackoffLimitExceeded | ConfigError | DeadlineExceeded | Interrupted | StartFailed
    message: str
    exit_code: int                 # of `leap run`
    last_workers: list[Worker] | None = None
    # Per attempt, wall-clock times (time.time()): created (spawning began), running (all workers
    # spawned), ended (its end was seen): the goodput account's timeline (goodput.py).
    timeline: list[dict] = field(default_factory=list)


def log_tail(path, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def backoff_seconds(restart: int, base: float, cap: float = 60.0) -> float:
    """1st restart after base, then 2x, 4x, ... (the operator's policy, with a local base)."""
    return min(cap, base * 2 ** (restart - 1))


def supervise(plans_for: Callable[[int], list[WorkerPlan]], *, backoff_limit: int, stop: StopFlag, events: Events,
              grace_seconds: float = 10.0, backoff_base: float = 1.0, deadline_seconds: int | None = None) -> Outcome:
    """Run attempts until one succeeds, backoff_limit restarts are used up, the deadline passes
    or `stop` is set. plans_for(attempt) renders that attempt's workers."""
    started = time.monotonic()
    deadline = started + deadline_seconds if deadline_seconds else None
    attempt = 0
    timeline: list[dict] = []
    while True:
        attempt += 1
        workers: list[Worker] = []
        timeline.append({"attempt": attempt, "created": time.time()})
        try:
            for plan in plans_for(attempt):
                workers.append(start_worker(plan))
        except WorkerStartError as exc:
            stop_workers(workers, grace_seconds, stop)
            timeline[-1]["ended"] = time.time()
            return Outcome(False, attempt, "StartFailed", str(exc), EXIT_FAILED, workers, timeline)
        timeline[-1]["running"] = time.time()
        try:
            events.attempt_started(attempt, workers)
            result = watch(workers, stop, lambda: events.tick(workers), deadline)
            timeline[-1]["ended"] = time.time()
            events.tick(workers)  # the last numbers before the processes go away
        except BaseException:
            stop_workers(workers, 0)  # whatever went wrong here, leave no worker behind
            raise
        if result.interrupted_by is not None and any(w.group_alive() for w in workers):
            events.stopping(workers, grace_seconds)
        stop_workers(workers, 0 if result.succeeded else grace_seconds, stop)
        if result.succeeded:
            return Outcome(True, attempt, "Succeeded", f"all workers succeeded in attempt {attempt}", EXIT_OK, workers, timeline)
        if result.interrupted_by is not None:
            name = signal.Signals(result.interrupted_by).name
            return Outcome(False, attempt, "Interrupted", f"stopped by {name}; all workers stopped",
                           128 + result.interrupted_by, workers, timeline)
        if result.deadline_exceeded:
            return Outcome(False, attempt, "DeadlineExceeded",
                           f"runPolicy.activeDeadlineSeconds ({deadline_seconds}s) passed; all workers stopped", EXIT_FAILED,
                           workers, timeline)
        failed = result.failed_worker
        message = f"attempt {attempt}: {failed.plan.label} {describe_exit(result.exit_code)}"
        tail = log_tail(failed.plan.log_path)
        if result.exit_code == EXIT_CONFIG:
            # leap-train refused its configuration: the same configuration fails the same way again.
            events.attempt_failed(attempt, message, tail, None)
            last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
            return Outcome(False, attempt, "ConfigError",
                           f"{failed.plan.label} refused its configuration (exit code {EXIT_CONFIG}), so it is not "
                           f"retried: {last.strip()} (log: {failed.plan.log_path})", EXIT_FAILED, workers, timeline)
        if attempt > backoff_limit:
            events.attempt_failed(attempt, message, tail, None)
            return Outcome(False, attempt, "BackoffLimitExceeded",
                           f"{message}; runPolicy.backoffLimit ({backoff_limit}) restarts used up after {attempt} "
                           f"attempt{'s' if attempt > 1 else ''} (log: {failed.plan.log_path})", EXIT_FAILED, workers, timeline)
        wait = backoff_seconds(attempt, backoff_base)
        events.attempt_failed(attempt, message, tail, wait)
        until = time.monotonic() + wait
        while time.monotonic() < until and stop.signum is None:
            time.sleep(POLL_SECONDS)
        if stop.signum is not None:
            name = signal.Signals(stop.signum).name
            return Outcome(False, attempt, "Interrupted", f"stopped by {name} before attempt {attempt + 1}",
                           128 + stop.signum, workers, timeline)
