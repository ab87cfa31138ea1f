"""`leap render FILE`: print, as YAML, exactly the objects the operator would create for a run.

Exit status: 0 rendered, 2 (EXIT_INVALID) a file unreadable or a run invalid (nothing printed).

Default images come from the same settings as the operator's: the LEAP_IMAGE_* environment
variables (which the Helm chart's trainer.* values set on the operator), or --image-registry and
--image-tag here.
"""

from __future__ import annotations

import argparse
import os
import sys

from leap_operator.cmd_validate import LoadError, describe, is_leap_document, load_file
from leap_operator.config import ENV_IMAGE_REGISTRY, ENV_IMAGE_TAG, OperatorConfig
from leap_operator.render import render_children
from leap_operator.validation import validate_run
from leap_operator.yamlio import dump_all
from leap_trainer.contract import EXIT_INVALID, EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="TrainingRun YAML files (multi-document ok; - for stdin)")
    parser.add_argument("--attempt", type=int, default=1, help="attempt number to render (default 1)")
    parser.add_argument("-n", "--namespace", help="namespace for runs that do not set metadata.namespace")
    parser.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml",
                        help="yaml (default: documents, ready for kubectl apply -f -) or json (a List)")
    parser.add_argument("--image-registry", metavar="REGISTRY",
                        help=f"registry/organisation of the default training images, as the chart's trainer.registry "
                             f"(default: ${ENV_IMAGE_REGISTRY} or ghcr.io/leap-dev)")
    parser.add_argument("--image-tag", metavar="TAG",
                        help=f"tag of the default training images, as the chart's trainer.tag "
                             f"(default: ${ENV_IMAGE_TAG} or Leap's version)")


def run(args: argparse.Namespace) -> int:
    if args.attempt < 1:
        print("error: --attempt must be >= 1", file=sys.stderr)
        return EXIT_INVALID
    documents, unreadable = [], False
    for path in args.files:  # every file is reported, not just the first bad one
        try:
            documents += load_file(path)
        except LoadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            unreadable = True
    if unreadable:
        return EXIT_INVALID
    environ = dict(os.environ)
    if args.image_registry:
        environ[ENV_IMAGE_REGISTRY] = args.image_registry
    if args.image_tag:
        environ[ENV_IMAGE_TAG] = args.image_tag
    config = OperatorConfig.from_env(environ)
    objects, failed = [], False
    documents = [(where, doc) for where, doc in documents if is_leap_document(doc)]
    if not documents:
        print(f"error: no TrainingRun found in {', '.join(args.files)}", file=sys.stderr)
        return EXIT_INVALID
    for where, doc in documents:
        problems = validate_run(doc, config=config)
        if problems:
            failed = True
            print(f"{where} {describe(doc)}: INVALID ({len(problems)} problem{'s' if len(problems) > 1 else ''})", file=sys.stderr)
            for problem in problems:
                print(f"  {problem.field}: {problem.message}", file=sys.stderr)
            continue
        if args.namespace and not doc["metadata"].get("namespace"):
            doc = {**doc, "metadata": {**doc["metadata"], "namespace": args.namespace}}
        objects += render_children(doc, attempt=args.attempt, config=config)
    if failed:
        return EXIT_INVALID
    if args.output == "json":
        import json
        sys.stdout.write(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2) + "\n")
    else:
        sys.stdout.write(dump_all(objects))
    return EXIT_OK
