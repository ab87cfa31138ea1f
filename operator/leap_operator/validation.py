"""validate_run(obj): everything the API server would reject, and what it cannot know, offline.

Three layers, in the order a user meets them on `kubectl apply`:
1. the CRD's openAPIV3Schema (structural defaults applied first, as the API server does), checked
   with jsonschema; unknown fields are errors (kubectl's strict field validation);
2. every CEL `x-kubernetes-validations` rule of the CRD, evaluated for real (transition rules
   only when an old object is given);
3. semantic checks CEL cannot express: a default image exists, quantities make sense, ports do
   not collide.
Each Problem names the field path and says how to fix it.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Iterable, Mapping

import jsonschema

from leap_operator import api, cel, crd, names
from leap_operator.config import OperatorConfig
from leap_trainer import contract


@dataclass(frozen=True, order=True)
class Problem:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class InvalidRun(Exception):
    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


# --- structural defaulting -------------------------------------------------------------------

def apply_defaults(value: Any, schema: dict) -> Any:
    """Return a copy with schema defaults filled in, like the API server's structural defaulting:
    a default applies where a field is absent and its parent object exists; defaults nest."""
    value = copy.deepcopy(value)
    _default_in_place(value, schema)
    return value


def _default_in_place(value: Any, schema: dict) -> None:
    if isinstance(value, dict) and schema.get("type") == "object":
        for key, sub in (schema.get("properties") or {}).items():
            if key in value and value[key] is None and not sub.get("nullable"):
                del value[key]  # the API server prunes nulls of non-nullable fields, then defaults
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _default_in_place(value[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for item in value.values():
                _default_in_place(item, extra)
    elif isinstance(value, list) and schema.get("type") == "array":
        for item in value:
            _default_in_place(item, schema.get("items") or {})


@lru_cache(maxsize=1)
def _crd_schema() -> dict:
    """The CRD's schema, built once and only read here (defaults are deep-copied out of it).
    The operator defaults and validates on every reconcile: a fresh copy each time was its
    largest single cost at 1,000 runs (bench/operator_scale.py)."""
    return crd.openapi_schema()


def defaulted(obj: dict) -> dict:
    """The object as the API server would store it (defaults applied); a plain-dict copy."""
    return apply_defaults(plain(obj), _crd_schema())


# --- layer 1: the OpenAPI schema as jsonschema --------------------------------------------------

def to_jsonschema(node: Any) -> Any:
    """Translate the CRD's OpenAPI v3 schema to Draft 4 JSON Schema (boolean exclusiveMinimum),
    closing objects so unknown fields are reported and opening int-or-string fields."""
    if isinstance(node, list):
        return [to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_jsonschema(v) if k in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not")
           else ({pk: to_jsonschema(pv) for pk, pv in v.items()} if k == "properties" else v)
           for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "default"}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _open_metadata(schema: dict) -> dict:
    # metadata's schema only constrains name; labels, annotations, ... are the API server's.
    schema["properties"]["metadata"]["additionalProperties"] = True
    return schema


@lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft4Validator:
    schema = _open_metadata(to_jsonschema(crd.openapi_schema()))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


# Patterns users meet, said in words.
_PATTERN_HINTS = {
    api.TOPOLOGY: "a TPU topology such as 2x4, 4x4 or 2x2x2",
    api.LABEL_VALUE: "a label value: up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
    api.DNS1123_SUBDOMAIN: "a lowercase DNS name: letters, digits, '-' and '.', starting and ending with a letter or digit",
    api.QUANTITY: "a Kubernetes quantity such as 500m, 2, 1.5 or 16Gi",
    api.ENV_NAME: "an environment variable name: letters, digits, '_', '-', '.', not starting with a digit",
    api.DATASET: "digits, synthetic or an absolute path to a .npz file in the pod",
    api.IMAGE: "an image reference without spaces, such as ghcr.io/org/trainer:1.0",
    api.LABEL_KEY: "a label key such as example.com/pool",
    api.DNS1035_LABEL: "a DNS-1035 label: lowercase letters, digits and '-', starting with a letter and ending with a letter or digit",
}


def _path(parts: Iterable) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _schema_problems(obj: dict) -> list[Problem]:
    problems = []
    for error in _validator().iter_errors(obj):
        problems.extend(_describe(error))
    return problems


def _describe(error: jsonschema.ValidationError) -> list[Problem]:
    where = _path(error.absolute_path)
    kind, value, schema = error.validator, error.instance, error.schema
    if kind == "required":
        missing = re.findall(r"'([^']+)' is a required property", error.message)
        name = missing[0] if missing else "?"
        sub = (schema.get("properties") or {}).get(name, {})
        hint = f" (one of: {', '.join(map(str, sub['enum']))})" if "enum" in sub else ""
        return [Problem(_path([*error.absolute_path, name]), f"is required; set it{hint}")]
    if kind == "additionalProperties":
        known = list((schema.get("properties") or {}).keys())
        out = []
        in_resources = list(error.absolute_path)[-2:-1] == ["resources"]
        for extra in sorted(set(value) - set(known)):
            close = difflib.get_close_matches(extra, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known fields: {', '.join(known)})"
            if in_resources and not close:
                hint = f" (resources take {', '.join(known)}; set GPUs and TPUs with spec.accelerator)"
            out.append(Problem(_path([*error.absolute_path, extra]), f"unknown field; remove it{hint}"))
        return out
    if kind == "enum":
        return [Problem(where, f"must be one of {', '.join(map(str, schema['enum']))} (got {value!r})")]
    if kind == "type":
        return [Problem(where, f"must be of type {schema['type']} (got {type(value).__name__} {value!r})")]
    if kind == "anyOf" and schema.get("anyOf") == [{"type": "integer"}, {"type": "string"}]:
        return [Problem(where, f"must be an integer or a string (got {value!r})")]
    if kind in ("minimum", "maximum"):
        strict = schema.get("exclusiveMinimum" if kind == "minimum" else "exclusiveMaximum")
        op = {"minimum": ">", "maximum": "<"}[kind] + ("" if strict else "=")
        return [Problem(where, f"must be {op} {schema[kind]} (got {value!r})")]
    if kind == "pattern":
        hint = _PATTERN_HINTS.get(schema["pattern"], f"a string matching {schema['pattern']}")
        return [Problem(where, f"must be {hint} (got {value!r})")]
    if kind in ("maxLength", "minLength"):
        word = "at most" if kind == "maxLength" else "at least"
        return [Problem(where, f"must be {word} {schema[kind]} characters long (got {len(value)})")]
    if kind in ("maxItems", "minItems", "maxProperties", "minProperties"):
        word = "at most" if kind.startswith("max") else "at least"
        return [Problem(where, f"must have {word} {schema[kind]} entries (got {len(value)})")]
    return [Problem(where, error.message)]


# --- layer 2: CEL ------------------------------------------------------------------------------

def _list_map_problems(schema: dict, value: Any, path: str = "") -> list[Problem]:
    """x-kubernetes-list-type: map means unique keys; the API server rejects duplicates."""
    out: list[Problem] = []
    if isinstance(value, list) and schema.get("x-kubernetes-list-type") == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        seen: dict[tuple, int] = {}
        for index, item in enumerate(value):
            key = tuple(item.get(k) for k in keys) if isinstance(item, dict) else (item,)
            if key in seen:
                out.append(Problem(f"{path}[{index}].{keys[0]}",
                                   f"duplicate {keys[0]} {key[0]!r} (also at index {seen[key]}); entries must be unique"))
            seen.setdefault(key, index)
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                out += _list_map_problems(sub, value[key], f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += _list_map_problems(schema.get("items") or {}, item, f"{path}[{index}]")
    return out


def _cel_problems(obj: dict, old: dict | None, schema_failed: bool) -> list[Problem]:
    out = []
    for field, message, evaluation_error in cel.check(_crd_schema(), obj, old):
        if evaluation_error and schema_failed:
            continue  # the schema problem already explains it
        out.append(Problem(field, message))
    return out


# --- layer 3: semantics --------------------------------------------------------------------------

_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
           "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
           "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def parse_quantity(text: Any) -> Decimal:
    """A Kubernetes quantity as a number ('500m' -> 0.5, '2Gi' -> 2147483648)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return Decimal(str(text))
    match = re.fullmatch(r"([+-]?[0-9.]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE]?)", str(text).strip())
    if not match:
        raise ValueError(f"not a quantity: {text!r}")
    number, suffix = match.groups()
    try:
        base = Decimal(number)
    except InvalidOperation as exc:
        raise ValueError(f"not a quantity: {text!r}") from exc
    if suffix[:1] in ("e", "E"):
        return base * (Decimal(10) ** int(suffix[1:]))
    return base * Decimal(_SUFFIX[suffix])


def _semantic_problems(run: dict, config: OperatorConfig) -> list[Problem]:
    spec = run.get("spec") or {}
    acc = spec.get("accelerator") or {}
    framework, acc_type = spec.get("framework"), acc.get("type", "cpu")
    out: list[Problem] = []

    if not spec.get("image") and config.default_image(framework, acc_type) is None:
        out.append(Problem("spec.image", f"Leap has no default image for {framework} on {acc_type}; "
                                         "set spec.image to an image that can run it"
                                         + (" (or use framework: tensorflow)" if acc_type == "google-tpu" else "")))

    resources = spec.get("resources") or {}
    parsed: dict[str, dict[str, Decimal]] = {}
    for section in ("requests", "limits"):
        for name, raw in (resources.get(section) or {}).items():
            try:
                quantity = parse_quantity(raw)
            except ValueError:
                out.append(Problem(f"spec.resources.{section}.{name}", f"{raw!r} is not a quantity; write e.g. 500m, 2 or 16Gi"))
                continue
            if quantity <= 0:
                out.append(Problem(f"spec.resources.{section}.{name}", f"must be positive (got {raw!r})"))
            parsed.setdefault(section, {})[name] = quantity
    for name, request in parsed.get("requests", {}).items():
        limit = parsed.get("limits", {}).get(name)
        if limit is not None and request > limit:
            out.append(Problem(f"spec.resources.requests.{name}",
                               f"request {resources['requests'][name]} exceeds limit {resources['limits'][name]}; "
                               "raise spec.resources.limits or lower the request"))

    procs = api.resolved_procs_per_worker(spec)
    if acc_type == "nvidia-gpu" and procs > int(acc.get("count") or 1):
        out.append(Problem("spec.procsPerWorker", f"{procs} processes would share {acc.get('count') or 1} GPU(s); "
                                                  "NCCL needs one GPU per process: lower procsPerWorker or raise accelerator.count"))

    port = (spec.get("metrics") or {}).get("port", contract.DEFAULT_METRICS_PORT)
    if isinstance(port, int):
        used = range(port, port + procs)
        for other, what in ((contract.DEFAULT_MASTER_PORT, "the PyTorch rendezvous port"),
                            (contract.DEFAULT_TF_PORT, "the TensorFlow worker port")):
            if other in used:
                out.append(Problem("spec.metrics.port", f"ports {used.start}-{used.stop - 1} (one per local process) "
                                                        f"include {other}, {what}; pick another metrics port"))

    for key in ((spec.get("scheduling") or {}).get("nodeSelector") or {}):
        # Checked here, not in CEL: map keys have no length bound, so a CEL regex over them
        # would blow the API server's rule cost budget.
        prefix, _, label = key.rpartition("/")
        if not re.fullmatch(api.LABEL_KEY, key) or len(prefix) > 253 or len(label) > 63:
            out.append(Problem("spec.scheduling.nodeSelector",
                               f"{key!r} is not a label key; use a key such as cloud.google.com/gke-nodepool"))

    workload = spec.get("workload") or {}
    out += _batch_problems(spec, workload)
    if workload.get("kind") == "distillation" and not workload.get("distillation"):
        teacher = api.Distillation().teacher
        if teacher == workload.get("model"):
            out.append(Problem("spec.workload.distillation.teacher",
                               f"the default teacher is {teacher}, the same as workload.model; "
                               "set workload.distillation.teacher to a different model or use model: mlp"))
    return out


def _batch_problems(spec: dict, workload: dict) -> list[Problem]:
    """A batch larger than a shipped dataset's share per process: leap-train would refuse it."""
    dataset, batch, samples = workload.get("dataset"), workload.get("batchSize"), workload.get("samples")
    if not isinstance(batch, int):
        return []
    if dataset == "digits":
        train = min(samples or contract.DIGITS_TRAIN_SAMPLES, contract.DIGITS_TRAIN_SAMPLES)
    elif dataset == "synthetic" and samples:
        train = samples
    else:
        return []  # a user's .npz: only the trainer can know its size
    world = api.resolved_workers(spec) * api.resolved_procs_per_worker(spec)
    if batch <= train // world:
        return []
    processes = f" per process x {world} processes" if world > 1 else ""
    if train // world < 1:
        fix = f"use fewer processes (spec.workers x spec.procsPerWorker at most {train})"
    else:
        fix = f"lower spec.workload.batchSize to at most {train // world}"
    return [Problem("spec.workload.batchSize",
                    f"{batch}{processes} is more than the {train} training samples of dataset {dataset} allow "
                    f"(each process takes {train // world}); {fix}")]


# --- entry points ----------------------------------------------------------------------------------

def _envelope_problems(obj: Any) -> list[Problem]:
    if not isinstance(obj, dict):
        return [Problem("<root>", f"a TrainingRun must be a mapping (got {type(obj).__name__})")]
    out = []
    if obj.get("apiVersion") != names.API_VERSION:
        out.append(Problem("apiVersion", f"must be {names.API_VERSION} (got {obj.get('apiVersion')!r})"))
    if obj.get("kind") != names.KIND:
        out.append(Problem("kind", f"must be {names.KIND} (got {obj.get('kind')!r})"))
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta.get("name"):
        out.append(Problem("metadata.name", "is required; name the run (lowercase letters, digits and '-')"))
    return out


def plain(value: Any) -> Any:
    """Plain dicts and lists from any Mapping/Sequence (kopf hands over Body objects)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def validate_run(obj: dict, old: dict | None = None, config: OperatorConfig | None = None) -> list[Problem]:
    """All problems with a TrainingRun (empty list: valid). `old` enables transition rules."""
    obj, old = plain(obj), plain(old) if old is not None else None
    envelope = _envelope_problems(obj)
    if envelope and (not isinstance(obj, dict) or any(p.field == "metadata.name" for p in envelope)):
        return sorted(envelope)
    run = defaulted(obj)
    old_run = defaulted(old) if old else None
    schema_problems = _schema_problems(run)
    problems = envelope + schema_problems
    problems += _list_map_problems(_crd_schema(), run)
    problems += _cel_problems(run, old_run, bool(schema_problems))
    if not problems:  # semantics assume the shape the schema and CEL guarantee
        problems += _semantic_problems(run, config or OperatorConfig.from_env())
    return sorted(set(problems), key=lambda p: (p.field, p.message))


def check_run(obj: dict, old: dict | None = None, config: OperatorConfig | None = None) -> dict:
    """The defaulted run, or InvalidRun with every problem."""
    problems = validate_run(obj, old, config)
    if problems:
        raise InvalidRun(problems)
    return defaulted(obj)
