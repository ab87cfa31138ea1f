"""Generate the TrainingRun CustomResourceDefinition from the pydantic models in api.py.

pydantic writes JSON Schema (2020-12 flavoured: $defs/$ref, anyOf-with-null for optional fields,
const, numeric exclusiveMinimum); Kubernetes wants a *structural* OpenAPI v3 schema (every node
typed, no $ref, no null branches, exclusiveMinimum as a boolean). to_structural() bridges the two.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

import yaml

from leap_operator import api, names

CRD_NAME = f"{names.PLURAL}.{names.GROUP}"

# Keys pydantic emits that have no place in a CRD schema.
_DROP = {"title", "$defs"}


def _resolve(node: Any, defs: dict) -> Any:
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        target.update(extra)  # a field's description/default wins over the model's
        return _resolve(target, defs)
    return {k: _resolve(v, defs) for k, v in node.items() if k not in _DROP}


def _structural(node: Any) -> Any:
    """Rewrite one resolved pydantic schema node into Kubernetes' structural dialect."""
    if isinstance(node, list):
        return [_structural(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    # Optional[X]: anyOf [X, {type: null}] -> X (absence is how Kubernetes says "null").
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) == 1:
            merged = dict(branches[0])
            merged.update({k: v for k, v in node.items() if k != "anyOf"})
            node = merged
    if node.get("default", 0) is None:
        del node["default"]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, edge in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node[edge] = node.pop(bound)
            node[bound] = True
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]  # structural schemas forbid it next to properties
    if "properties" in node:
        node.setdefault("type", "object")
    if "prefixItems" in node:
        raise ValueError("tuples have no structural schema")
    out = {}
    for key, value in node.items():
        if key in ("properties",):
            out[key] = {k: _structural(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _structural(value)
        else:
            out[key] = value
    if "required" in out and not out["required"]:
        del out["required"]
    return out


def to_structural(model) -> dict:
    raw = model.model_json_schema(mode="validation", ref_template="#/$defs/{model}")
    defs = raw.get("$defs", {})
    return _structural(_resolve(raw, defs))


def _root_rules() -> list[dict]:
    """Transition rules guarded by status: they need the whole object.

    Why at the root: a rule on spec cannot see status, but "immutable while running" depends on
    status.phase. With the status subresource, the API server copies the stored status into every
    update of the main resource before validating, so `oldSelf.status` here is the operator's last
    word, not something the user can forge in the same request. The run's shape may change only
    before the operator has set a phase, or while Suspended (the operator renders the new shape on
    resume); run policy (suspend, backoffLimit, deadlines, TTL) may always change.
    """
    editable = " || ".join(f"oldSelf.status.phase == '{p}'" for p in api.EDITABLE_PHASES)
    unlocked = f"!has(oldSelf.status) || !has(oldSelf.status.phase) || {editable}"
    transition = []
    for path in ("framework", "image", "workload", "command", "args", "accelerator", "workers",
                 "procsPerWorker", "resources", "env", "checkpoint", "metrics", "scheduling.queueName"):
        parent, _, leaf = ("spec." + path).rpartition(".")
        new, old = f"self.{parent}", f"oldSelf.{parent}"
        same = (f"(has({new}.{leaf}) == has({old}.{leaf}) && "
                f"(!has({new}.{leaf}) || {new}.{leaf} == {old}.{leaf}))")
        if "." in path:  # scheduling itself may be absent
            outer = path.split(".")[0]
            same = (f"(has(self.spec.{outer}) ? has(self.spec.{outer}.{leaf}) : false) == "
                    f"(has(oldSelf.spec.{outer}) ? has(oldSelf.spec.{outer}.{leaf}) : false) && "
                    f"(!has(self.spec.{outer}) || !has(self.spec.{outer}.{leaf}) || {new}.{leaf} == {old}.{leaf})")
        transition.append(api.rule(
            f"{unlocked} || {same}",
            f"spec.{path} cannot change once the run has started (status.phase is set); "
            f"suspend it first (spec.runPolicy.suspend: true) or create a new TrainingRun",
            field_path=f".spec.{path}", reason="FieldValueForbidden"))
    return transition


def _printer_columns() -> list[dict]:
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Framework", "type": "string", "jsonPath": ".spec.framework"},
        {"name": "Accelerator", "type": "string", "jsonPath": ".spec.accelerator.type"},
        {"name": "Workers", "type": "integer", "jsonPath": ".status.workers.desired",
         "description": "Pods of the run (spec.workers or derived from the TPU slice)."},
        {"name": "Progress", "type": "number", "jsonPath": ".status.progress.percent",
         "description": "Percent of planned optimizer steps done."},
        {"name": "Throughput", "type": "number", "jsonPath": ".status.progress.samplesPerSecond",
         "description": "Training samples per second, all workers."},
        {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
        {"name": "Reason", "type": "string", "jsonPath": ".status.reason",
         "description": "Why the run is in its phase: e.g. Unschedulable, Preempted, Stalled (steps stopped while Running)."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Attempt", "type": "integer", "jsonPath": ".status.attempt", "priority": 1},
        {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "priority": 1},
        {"name": "FLOPS", "type": "number", "jsonPath": ".status.progress.flopsPerSecond", "priority": 1},
    ]


@lru_cache(maxsize=1)
def _schema() -> dict:
    return {
        "type": "object",
        "description": "TrainingRun: accelerated training on Kubernetes (PyTorch or TensorFlow on CPU, NVIDIA GPU or Google TPU).",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            # Only metadata.name may be constrained here. Run names become Service names
            # (DNS-1035 labels) and prefix Job names and pod hostnames.
            "metadata": {"type": "object", "properties": {"name": {
                "type": "string", "maxLength": api.MAX_RUN_NAME, "pattern": api.DNS1035_LABEL}}},
            "spec": to_structural(api.TrainingRunSpec),
            "status": to_structural(api.TrainingRunStatus),
        },
        "x-kubernetes-validations": _root_rules(),
    }


def openapi_schema() -> dict:
    """The CRD's openAPIV3Schema (a fresh copy)."""
    return copy.deepcopy(_schema())


def crd_manifest() -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {names.LABEL_PART_OF: "leap"}},
        "spec": {
            "group": names.GROUP,
            "names": {"kind": names.KIND, "listKind": f"{names.KIND}List", "plural": names.PLURAL,
                      "singular": names.SINGULAR, "shortNames": list(names.SHORT_NAMES),
                      "categories": list(names.CATEGORIES)},
            "scope": "Namespaced",
            "versions": [{
                "name": names.VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": _printer_columns(),
                "schema": {"openAPIV3Schema": openapi_schema()},
            }],
        },
    }


HEADER = "# Generated by `leap crd` from operator/leap_operator/api.py. Do not edit: run `make crd`.\n"


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(crd_manifest(), sort_keys=False, width=120)
