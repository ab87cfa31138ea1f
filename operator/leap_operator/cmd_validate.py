"""`leap validate FILE...`: schema, CEL rules and semantic checks, offline.

Every file is reported, each document on its own line. Exit status (leap_trainer.contract):
0 all valid, 2 (EXIT_INVALID) any file unreadable or any run invalid.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Iterator

from leap_operator import names
from leap_operator.validation import validate_run
from leap_operator.yamlio import YAMLLoadError, load_all
from leap_trainer.contract import EXIT_INVALID, EXIT_OK


class LoadError(Exception):
    pass


def read_text(path: str) -> str:
    """The file's text ('-' is stdin); LoadError (one line: what, why, what to do) otherwise."""
    name = "<stdin>" if path == "-" else path
    try:
        data = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    except OSError as exc:
        raise LoadError(f"{name}: cannot read: {exc.strerror or exc}; give the path of a TrainingRun YAML file") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LoadError(f"{name}: not a text file (byte 0x{data[exc.start]:02x} at offset {exc.start} is not UTF-8); "
                        "give a TrainingRun YAML file saved as UTF-8") from None


def load_file(path: str) -> list[tuple[str, object]]:
    """(where, document) for every non-empty YAML document of one file."""
    name = "<stdin>" if path == "-" else path
    text = read_text(path)
    try:
        docs = load_all(text, name)
    except YAMLLoadError as exc:
        raise LoadError(str(exc)) from None
    return [((f"{name}#{index + 1}" if len(docs) > 1 else name), doc)
            for index, doc in enumerate(d for d in docs if d is not None)]


def load_documents(paths: list[str]) -> Iterator[tuple[str, dict]]:
    """(where, document) for every non-empty YAML document in the files ('-' is stdin)."""
    for path in paths:
        yield from load_file(path)


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
    parser.add_argument("-o", "--output", choices=["text", "json"], default="text",
                        help="text (default) or json: one object per document, with its problems")


def run(args: argparse.Namespace) -> int:
    as_json = args.output == "json"
    results: list[dict] = []
    try:
        old_runs = {_key(doc): doc for _, doc in load_file(args.old)} if args.old else {}
    except LoadError as exc:
        if as_json:
            print(json.dumps([{"file": args.old, "valid": False, "error": f"--old {exc}"}], indent=2))
        else:
            print(f"error: --old {exc}", file=sys.stderr)
        return EXIT_INVALID
    failed = False
    found = False
    for path in args.files:
        try:
            documents = load_file(path)
        except LoadError as exc:
            failed = True
            results.append({"file": path, "valid": False, "error": str(exc)})
            if not as_json:
                print(f"error: {exc}", file=sys.stderr)
            continue
        for where, doc in documents:
            if not is_leap_document(doc):
                results.append({"file": path, "document": where, "resource": describe(doc), "skipped": True})
                if not as_json:
                    print(f"{where} {describe(doc)}: skipped (not a {names.KIND})")
                continue
            found = True
            problems = validate_run(doc, old=old_runs.get(_key(doc)))
            label = f"{where} {describe(doc)}"
            results.append({"file": path, "document": where, "resource": describe(doc), "valid": not problems,
                            "problems": [{"field": p.field, "message": p.message} for p in problems]})
            if problems:
                failed = True
                if not as_json:
                    print(f"{label}: INVALID ({len(problems)} problem{'s' if len(problems) > 1 else ''})")
                    for problem in problems:
                        print(f"  {problem.field}: {problem.message}")
            elif not as_json:
                print(f"{label}: OK")
    if not found and not failed:
        failed = True
        message = f"no {names.KIND} found in {', '.join(args.files)}"
        results.append({"valid": False, "error": message})
        if not as_json:
            print(f"error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps(results, indent=2))
    return EXIT_INVALID if failed else EXIT_OK
