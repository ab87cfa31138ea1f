"""`leap runs [DIR...]`: the local runs `leap run` made, with phase, progress and run directory.

A run directory is any directory with the `.leap-run` marker; by default the ones under ./runs
(where `leap run` puts them unless --workdir says otherwise). A run whose status says Running
but whose directory lock is free lost its `leap run` (killed): it shows as Lost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from leap_operator.api import format_duration
from leap_operator.local.rundir import MARKER, RunDir, in_use
from leap_trainer.contract import EXIT_INVALID, EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="*", metavar="DIR",
                        help="run directories, or directories holding them (default: ./runs)")
    parser.add_argument("-o", "--output", choices=["text", "json"], default="text", help="text (default) or json")


def find_run_dirs(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if (path / MARKER).exists():
            found.append(path.resolve())
        elif path.is_dir():
            found += sorted(child.resolve() for child in path.iterdir() if (child / MARKER).exists())
    return found


def run_info(path: Path) -> dict:
    """What `leap runs` shows of one run directory."""
    run_dir = RunDir(path)
    try:
        info = json.loads(run_dir.status.read_text())
    except (OSError, ValueError):
        try:
            marker = json.loads((path / MARKER).read_text())
        except (OSError, ValueError):
            marker = {}
        info = {"run": marker.get("run") or path.name, "phase": "Unknown", "started": marker.get("started")}
    info["runDirectory"] = str(path)
    live = in_use(path)
    if info.get("phase") in ("Starting", "Running") and not live:
        info["phase"] = "Lost"
        info["message"] = "its `leap run` was killed; the same command with --resume continues from the checkpoints"
    info["active"] = live
    return info


def _progress(info: dict) -> str:
    p = info.get("progress") or {}
    if p.get("step") is None:
        return "-"
    text = f"{int(p['step'])}/{int(p['totalSteps'])}" if p.get("totalSteps") else f"{int(p['step'])}"
    return text + (f" ({p['percent']:.0f}%)" if p.get("percent") is not None else "")


def _age(info: dict) -> str:
    started = info.get("started")
    return format_duration(time.time() - started) + " ago" if isinstance(started, (int, float)) else "-"


def run(args: argparse.Namespace) -> int:
    paths = [Path(d) for d in args.dirs] or [Path("runs")]
    missing = [str(p) for p in paths if not p.exists()]
    if args.dirs and missing:
        print(f"error: {', '.join(missing)}: no such directory; give run directories or the folder holding them",
              file=sys.stderr)
        return EXIT_INVALID
    infos = [run_info(path) for path in find_run_dirs(paths)]
    if args.output == "json":
        print(json.dumps(infos, indent=2))
        return EXIT_OK
    if not infos:
        where = ", ".join(str(p) for p in paths)
        print(f"no local runs in {where} (`leap run FILE` makes one; `leap runs DIR` looks elsewhere)")
        return EXIT_OK
    rows = [("NAME", "PHASE", "ATTEMPT", "PROGRESS", "STARTED", "RUN DIRECTORY")]
    for info in infos:
        attempt = f"{info['attempt']}/{info['maxAttempts']}" if info.get("attempt") else "-"
        rows.append((str(info.get("run")), str(info.get("phase")), attempt, _progress(info), _age(info),
                     info["runDirectory"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return EXIT_OK
