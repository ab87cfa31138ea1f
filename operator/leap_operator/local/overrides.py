"""`--set PATH=VALUE` overrides on a TrainingRun document, before validation.

PATH is dotted (spec.workload.epochs), with [N] for list items (spec.env[0].value) and '\\.' for
a dot inside a key (spec.scheduling.nodeSelector.cloud\\.google\\.com/gke-nodepool). VALUE is
parsed as YAML 1.2 (as kubectl reads files), so `2` and `1e-3` are numbers, `true` a boolean and `{cpu: "2"}` a mapping. Missing
mappings along the path are created; a path that runs into a scalar is an error naming it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from leap_operator.yamlio import YAMLLoadError, load_one


class OverrideError(ValueError):
    pass


@dataclass(frozen=True)
class Override:
    raw: str             # as the user typed it, for error messages
    path: tuple          # keys (str) and list indices (int)
    value: Any

    @property
    def dotted(self) -> str:
        return format_path(self.path)


_SEGMENT = re.compile(r"((?:[^.\[\]\\]|\\.)+)?((?:\[\d+\])*)")


def format_path(path: tuple) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part.replace(".", "\\.")
            out += f".{key}" if out else key
    return out


def parse_path(text: str, raw: str) -> tuple:
    """'spec.env[0].value' -> ('spec', 'env', 0, 'value')."""
    parts: list = []
    # Split on dots that are not escaped.
    for segment in re.split(r"(?<!\\)\.", text):
        match = _SEGMENT.fullmatch(segment)
        if not segment or not match or not match.group(1):
            raise OverrideError(f"--set {raw}: {text!r} is not a field path; "
                                "write dotted names with [N] for list items, e.g. spec.workload.epochs or spec.env[0].value")
        parts.append(match.group(1).replace("\\.", "."))
        parts += [int(i) for i in re.findall(r"\[(\d+)\]", match.group(2))]
    return tuple(parts)


def parse_override(raw: str) -> Override:
    path_text, sep, value_text = raw.partition("=")
    if not sep:
        raise OverrideError(f"--set {raw}: expected PATH=VALUE, e.g. --set spec.workers=2")
    try:
        value = load_one(value_text, "value") if value_text.strip() else ""
    except YAMLLoadError as exc:
        problem = re.sub(r"^value(:\d+)?: (not valid YAML: )?", "", str(exc))
        raise OverrideError(f"--set {raw}: the value is not valid YAML ({problem}); quote it, e.g. --set '{path_text}=\"...\"'") from exc
    return Override(raw=raw, path=parse_path(path_text.strip(), raw), value=value)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def apply_override(doc: dict, override: Override) -> dict:
    """A copy of doc with the override applied."""
    doc = copy.deepcopy(doc)
    node: Any = doc
    path = override.path
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        here = format_path(path[:depth]) or "the document"
        if isinstance(part, int):
            if not isinstance(node, list):
                raise OverrideError(f"--set {override.raw}: {here} is {_kind(node)} ({node!r}), not a list; "
                                    f"drop [{part}] from the path")
            if part > len(node):
                raise OverrideError(f"--set {override.raw}: {here} has {len(node)} item(s); "
                                    f"use an index up to {len(node)} ({len(node)} appends)")
            if part == len(node):
                node.append(None if last else ({} if isinstance(path[depth + 1], str) else []))
        else:
            if not isinstance(node, dict):
                raise OverrideError(f"--set {override.raw}: {here} is {_kind(node)} ({node!r}), not a mapping, "
                                    f"so it has no field {part!r}; set {here} itself")
            if not last and not isinstance(node.get(part), (dict, list)):
                if node.get(part) is not None:
                    raise OverrideError(f"--set {override.raw}: {format_path(path[:depth + 1])} is "
                                        f"{_kind(node[part])} ({node[part]!r}), not a mapping; set it directly")
                node[part] = {} if isinstance(path[depth + 1], str) else []
        if last:
            node[part] = copy.deepcopy(override.value)
        else:
            node = node[part]
    return doc


def apply_overrides(doc: Any, raws: list[str]) -> tuple[dict, list[Override]]:
    if not raws:
        return doc, []
    if not isinstance(doc, dict):
        raise OverrideError(f"--set {raws[0]}: the file's document is not a mapping, so it has no fields to set")
    overrides = [parse_override(raw) for raw in raws]
    for override in overrides:
        doc = apply_override(doc, override)
    return doc, overrides


def origin_of(field: str, overrides: list[Override]) -> Override | None:
    """The override that set `field` (or a parent/child of it), so errors can point at --set."""
    for override in reversed(overrides):
        dotted = override.dotted
        if field == dotted or field.startswith(dotted + ".") or field.startswith(dotted + "["):
            return override
    return None
