"""`leap validate FILE...`: schema, CEL rules and semantic checks, offline. Exit 1 on any problem."""

from __future__ import annotations

import argparse
import sys
from typing import Iterator

import yaml

from leap_operator import names
from leap_operator.validation import validate_run


class LoadError(Exception):
    pass


def load_documents(paths: list[str]) -> Iterator[tuple[str, dict]]:
    """(where, document) for every non-empty YAML document in the files ('-' is stdin)."""
    for path in paths:
        try:
            text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
        except OSError as exc:
            raise LoadError(f"{path}: cannot read: {exc.strerror}") from exc
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise LoadError(f"{path}: not valid YAML: {exc}") from exc
        name = "<stdin>" if path == "-" else path
        for index, doc in enumerate(d for d in docs if d is not None):
            yield (f"{name}#{index + 1}" if len(docs) > 1 else name), doc


def is_leap_document(doc) -> bool:
    """TrainingRuns, and anything that tries to be one; other kinds in the same file are skipped."""
    if not isinstance(doc, dict):
        return True
    return doc.get("kind") == names.KIND or str(doc.get("apiVersion", "")).startswith(names.GROUP + "/")


def describe(doc) -> str:
    if not isinstance(doc, dict):
        return "(not a mapping)"
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    return f"{doc.get('kind') or '?'}/{name or '?'}"


def _key(doc) -> tuple:
    meta = doc.get("metadata") if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict) else {}
    return meta.get("namespace") or "default", meta.get("name")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="TrainingRun YAML files (multi-document ok; - for stdin)")
    parser.add_argument("--old", metavar="FILE",
                        help="the stored version of the run(s): also check the update rules (fields that cannot change once started)")


def run(args: argparse.Namespace) -> int:
    try:
        old_runs = {_key(doc): doc for _, doc in load_documents([args.old])} if args.old else {}
        documents = list(load_documents(args.files))
    except LoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not any(is_leap_document(doc) for _, doc in documents):
        print(f"error: no {names.KIND} found in {', '.join(args.files)}", file=sys.stderr)
        return 1
    failed = False
    for where, doc in documents:
        if not is_leap_document(doc):
            print(f"{where} {describe(doc)}: skipped (not a {names.KIND})")
            continue
        problems = validate_run(doc, old=old_runs.get(_key(doc)))
        label = f"{where} {describe(doc)}"
        if problems:
            failed = True
            print(f"{label}: INVALID ({len(problems)} problem{'s' if len(problems) > 1 else ''})")
            for problem in problems:
                print(f"  {problem.field}: {problem.message}")
        else:
            print(f"{label}: OK")
    return 1 if failed else 0
