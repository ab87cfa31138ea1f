"""Evaluate a CRD schema's `x-kubernetes-validations` the way the API server does, offline.

Uses the real CEL implementation from `common-expression-language` (plus its cel-go style
string/list extensions, which Kubernetes also enables: split, join, ...). Values are typed by the
schema first (a `number` written as `4` is a double to Kubernetes' CEL, so it must be here too).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterator

import cel
from cel import stdlib


@lru_cache(maxsize=512)
def _compile(expr: str):
    return cel.compile(expr)


def is_transition_rule(rule: dict) -> bool:
    return "oldSelf" in _compile(rule["rule"]).variables()


def typed(value: Any, schema: dict) -> Any:
    """Coerce a decoded YAML/JSON value to the CEL types the schema implies."""
    if value is None:
        return None
    kind = schema.get("type")
    if kind == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind == "object" and isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        out = {}
        for key, item in value.items():
            sub = props.get(key) or (extra if isinstance(extra, dict) else {})
            out[key] = typed(item, sub)
        return out
    if kind == "array" and isinstance(value, list):
        return [typed(item, schema.get("items") or {}) for item in value]
    return value


@lru_cache(maxsize=1)
def _context() -> "cel.Context":
    # Registering the extension functions costs more than evaluating a rule: do it once and
    # only swap the variables per evaluation (validation runs on one thread).
    ctx = cel.Context()
    stdlib.add_stdlib_to_context(ctx)
    return ctx


def evaluate(expr: str, variables: dict) -> Any:
    ctx = _context()
    ctx.update({"self": None, "oldSelf": None, **variables})  # no value leaks from the last rule
    return _compile(expr).execute(ctx)


def _join(path: str, field_path: str) -> str:
    return (path + field_path) if path else field_path.lstrip(".")


def check(schema: dict, value: Any, old: Any = None, path: str = "") -> Iterator[tuple[str, str, bool]]:
    """Yield (field, message, is_error_of_evaluation) for every rule that does not hold.

    Transition rules (those reading oldSelf) run only when an old value exists, as on an update.
    Old values are correlated through object properties and map values (not list items, which
    Kubernetes only correlates for list-type=map/set; no transition rule here lives under a list).
    """
    if value is None:
        return
    for rule in schema.get("x-kubernetes-validations") or []:
        transition = is_transition_rule(rule)
        if transition and old is None:
            continue
        variables = {"self": typed(value, schema)}
        if transition:
            variables["oldSelf"] = typed(old, schema)
        field = _join(path, rule.get("fieldPath", ""))
        try:
            ok = evaluate(rule["rule"], variables)
        except Exception as exc:  # a rule that cannot run on this value (wrong types, missing keys)
            yield field or "<root>", f"rule `{rule['rule'][:120]}` could not be evaluated: {exc}", True
            continue
        if ok is True:
            continue
        message = rule.get("message", f"failed rule: {rule['rule']}")
        if rule.get("messageExpression"):
            try:
                message = str(evaluate(rule["messageExpression"], variables))
            except Exception:
                pass  # like the API server: fall back to the static message
        yield field or "<root>", message, False
    kind = schema.get("type")
    if kind == "object" and isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key in value:
                old_item = old.get(key) if isinstance(old, dict) else None
                yield from check(sub, value[key], old_item, _join(path, "." + key))
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                old_item = old.get(key) if isinstance(old, dict) else None
                yield from check(extra, item, old_item, _join(path, "." + str(key)))
    elif kind == "array" and isinstance(value, list):
        for index, item in enumerate(value):
            yield from check(schema.get("items") or {}, item, None, f"{path}[{index}]")
