"""`leap crd`: print the TrainingRun CRD (what manifests/crd/ and the Helm chart ship)."""

from __future__ import annotations

import argparse
import sys

from leap_operator import crd


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml", help="output format (default yaml)")


def run(args: argparse.Namespace) -> int:
    if args.output == "json":
        import json
        sys.stdout.write(json.dumps(crd.crd_manifest(), indent=2) + "\n")
    else:
        sys.stdout.write(crd.crd_yaml())
    return 0
