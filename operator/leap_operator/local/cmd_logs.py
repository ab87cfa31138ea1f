"""`leap logs NAME [--worker N] [--attempt A] [--follow]`: a local run's worker output.

NAME is the run's name (its directory runs/NAME) or a run directory; --workdir names the
directory of a run started with --workdir. --follow prints new output as it comes, moves on to
the next attempt when the gang restarts, and ends when the run does.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from leap_operator.local.rundir import MARKER, RunDir, in_use
from leap_trainer.contract import EXIT_INVALID, EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", nargs="?",
                        help="the run's name (runs/NAME) or its run directory")
    parser.add_argument("--workdir", type=Path, metavar="DIR", help="the run directory (as given to leap run)")
    parser.add_argument("-w", "--worker", type=int, default=0, metavar="N", help="which worker (default 0)")
    parser.add_argument("-a", "--attempt", type=int, metavar="A", help="which attempt (default: the latest)")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the run ends")


class LogsError(Exception):
    pass


def _run_dir(args: argparse.Namespace) -> Path:
    if args.workdir is None and not args.name:
        raise LogsError("say which run: leap logs NAME (`leap runs` lists them), or --workdir DIR")
    candidates = [args.workdir] if args.workdir is not None else [Path(args.name), Path("runs") / args.name]
    for path in candidates:
        if (path / MARKER).exists():
            return path.resolve()
    where = args.workdir or Path("runs") / args.name
    raise LogsError(f"no local run at {where}; `leap runs` lists the runs under ./runs, "
                    "and --workdir DIR names a run directory elsewhere")


def _attempts(path: Path) -> list[int]:
    found = [int(m.group(1)) for p in path.glob("attempt-*") if (m := re.fullmatch(r"attempt-(\d+)", p.name))]
    return sorted(found)


def _log(path: Path, args: argparse.Namespace) -> tuple[int, Path]:
    attempts = _attempts(path)
    if not attempts:
        raise LogsError(f"{path} has no worker logs yet (the run has not started a worker)")
    attempt = args.attempt if args.attempt is not None else attempts[-1]
    if attempt not in attempts:
        raise LogsError(f"{path} has no attempt {attempt}; it has attempt{'s' if len(attempts) > 1 else ''} "
                        f"{', '.join(map(str, attempts))}")
    log = RunDir(path).log(attempt, args.worker)
    if not log.exists():
        workers = sorted(int(m.group(1)) for p in RunDir(path).attempt(attempt).glob("worker-*.log")
                         if (m := re.fullmatch(r"worker-(\d+)\.log", p.name)))
        raise LogsError(f"attempt {attempt} of {path.name} has no worker {args.worker}; its workers are "
                        f"{', '.join(map(str, workers)) or 'none yet'} (--worker N)")
    return attempt, log


def _copy(log: Path, offset: int) -> int:
    with open(log, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    if data:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return offset + len(data)


def run(args: argparse.Namespace) -> int:
    try:
        path = _run_dir(args)
        attempt, log = _log(path, args)
    except LogsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        offset = _copy(log, 0)
        while args.follow:
            running = in_use(path)
            offset = _copy(log, offset)
            newer = [a for a in _attempts(path) if a > attempt]
            if newer and args.attempt is None and RunDir(path).log(newer[0], args.worker).exists():
                attempt, log, offset = newer[0], RunDir(path).log(newer[0], args.worker), 0
                print(f"--- attempt {attempt} ---", flush=True)
                continue
            if not running:
                _copy(log, offset)
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    return EXIT_OK
