"""`leap`: the command-line entry point. Each subcommand lives in its own module and is
imported only when used, so `leap validate` does not pay for kopf or torch."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from leap_trainer import contract

# subcommand -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "crd": ("leap_operator.cmd_crd", "print the TrainingRun CustomResourceDefinition as YAML"),
    "validate": ("leap_operator.cmd_validate", "check TrainingRun files: schema, CEL rules and semantics"),
    "render": ("leap_operator.cmd_render", "print the objects the operator would create for a TrainingRun"),
    "operator": ("leap_operator.cmd_operator", "run the operator (kopf)"),
    "run": ("leap_operator.local.cmd_run", "run a TrainingRun on this machine, no cluster needed"),
    "runs": ("leap_operator.local.cmd_runs", "list the local runs of `leap run`: phase, progress, run directory"),
    "logs": ("leap_operator.local.cmd_logs", "print (or --follow) a local run's worker output"),
}


def version() -> str:
    try:
        from importlib.metadata import version as installed
        return installed("leap")
    except Exception:  # not installed (a source checkout on PYTHONPATH)
        from leap_operator import __version__
        return __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="leap", description="Leap: accelerated training on Kubernetes.",
        epilog=f"exit status: {contract.EXIT_OK} ok, {contract.EXIT_FAILED} a run failed, {contract.EXIT_INVALID} "
               "invalid input (nothing was started), 130 interrupted (Ctrl-C)")
    parser.add_argument("--version", action="version", version=f"leap {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((arg for arg in argv if arg in SUBCOMMANDS), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module_name).add_arguments(sub_parser)
    args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C in a command that does not handle it itself: no traceback
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `leap validate ... | head`: the reader has what it wanted
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
