"""The TrainingRun API: the CRD generated from api.py is current, structural, valid Kubernetes,
its CEL rules compile, its printer columns point at real fields, and the TPU facts hold."""

from __future__ import annotations

from pathlib import Path

import cel
import jsonschema
import kubernetes_validate
import pydantic
import pytest
import yaml

from leap_operator import api, cli, crd, names
from leap_operator.cel import check as cel_check
from leap_operator.config import ENV_VARS, OperatorConfig
from leap_operator.validation import validate_run

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = ROOT / "manifests/crd/leap.dev_trainingruns.yaml"
EXAMPLES = sorted(ROOT.glob("manifests/examples/*.yaml"))


def test_checked_in_crd_is_current(capsys):
    assert cli.main(["crd"]) == 0
    printed = capsys.readouterr().out
    assert printed == crd.crd_yaml()
    assert CHECKED_IN.read_text() == printed, (
        f"{CHECKED_IN.relative_to(ROOT)} is stale: api.py changed. Run `make crd` and commit the result.")


def test_crd_is_a_valid_kubernetes_object():
    kubernetes_validate.validate(crd.crd_manifest(), "1.31.0", strict=True)
    spec = crd.crd_manifest()["spec"]
    assert spec["names"]["shortNames"] == ["ltr"] and spec["scope"] == "Namespaced"
    assert spec["versions"][0]["subresources"] == {"status": {}}


# Short names of built-in kinds and of CRDs found on many clusters (Tekton, Argo, Kubeflow, Kueue,
# cert-manager, Knative, Istio, Prometheus Operator, Flux, KEDA, Velero, Crossplane, Cluster API,
# Karpenter, Volcano). Two resources with one short name make `kubectl get NAME` ambiguous.
WELL_KNOWN_SHORT_NAMES = {
    "tr", "t", "pr", "p", "ct", "tkn", "ctr",                              # Tekton (TaskRun, Task, PipelineRun, ...)
    "wf", "wftmpl", "cwf", "cwft", "wfeb", "wfts", "ro", "ar", "at",        # Argo Workflows, Rollouts
    "pyj", "tfjob", "pytorchjob", "mpijob", "tj", "tjob", "js", "exp",      # Kubeflow, JobSet
    "wl", "lq", "cq", "rf",                                                 # Kueue
    "cert", "certs", "cr", "crs", "iss", "ciss",                            # cert-manager
    "ksvc", "kservice", "rt", "route", "cfg", "config", "rev", "kpa",       # Knative
    "vs", "gw", "dr", "se", "pa", "ap",                                     # Istio
    "prom", "smon", "pmon", "amgr", "promrule", "probe",                    # Prometheus Operator
    "hr", "ks", "gitrepo", "kustomization",                                 # Flux
    "so", "sj", "ta", "cta",                                                # KEDA
    "vsc", "vsclass", "bsl", "vsl",                                         # snapshots, Velero
    "np", "nc", "vcjob", "vj", "pg", "q",                                   # Karpenter, Volcano
    "cl", "kcp", "md", "ms", "mp",                                          # Cluster API
    "po", "svc", "deploy", "ds", "sts", "rs", "cj", "job", "ev", "ns", "no", "pv", "pvc", "sa",
    "cm", "ep", "ing", "netpol", "pdb", "hpa", "pc", "sc", "crd", "crds", "csr", "quota", "limits",
}


def test_short_name_and_categories_collide_with_nothing_well_known():
    names_ = crd.crd_manifest()["spec"]["names"]
    assert not set(names_["shortNames"]) & WELL_KNOWN_SHORT_NAMES, names_["shortNames"]
    assert "tr" not in names_["shortNames"]  # Tekton's TaskRun
    assert names_["plural"] == "trainingruns" and names_["singular"] == "trainingrun"
    # `kubectl get leap`; not in `all`, so `kubectl delete all --all` leaves training runs alone.
    assert names_["categories"] == ["leap"]


def test_progress_column_is_a_number():
    columns = {c["name"]: c for c in crd.crd_manifest()["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Progress"]["type"] == "number"
    assert columns["Progress"]["jsonPath"] == ".status.progress.percent"


def _nodes(schema: dict, path: str = ""):
    yield path, schema
    for key, sub in (schema.get("properties") or {}).items():
        yield from _nodes(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from _nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _nodes(schema["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural():
    """The rules Kubernetes enforces on CRD schemas (apiextensions 'structural schema')."""
    schema = crd.openapi_schema()
    for path, node in _nodes(schema):
        assert "$ref" not in node and "nullable" not in node, path
        if node.get("x-kubernetes-int-or-string"):
            assert node.get("anyOf", [{"type": "integer"}, {"type": "string"}]) == [{"type": "integer"}, {"type": "string"}], path
            assert "type" not in node, path
            continue
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, f"{path} has no type"
        assert "anyOf" not in node and "oneOf" not in node, path
        assert not ("properties" in node and "additionalProperties" in node), path
        if node["type"] == "array":
            assert "items" in node, path
    metadata = schema["properties"]["metadata"]
    assert set(metadata.get("properties", {})) <= {"name", "generateName"}


def test_schema_defaults_are_valid_for_their_fields():
    from leap_operator.validation import to_jsonschema
    for path, node in _nodes(crd.openapi_schema()):
        if "default" in node:
            jsonschema.Draft4Validator(to_jsonschema(node)).validate(node["default"])


def _rules():
    for path, node in _nodes(crd.openapi_schema()):
        for rule in node.get("x-kubernetes-validations") or []:
            yield path, node, rule


def test_every_cel_rule_compiles_and_points_at_a_real_field():
    rules = list(_rules())
    assert len(rules) >= 20
    for path, node, rule in rules:
        cel.compile(rule["rule"])
        if "messageExpression" in rule:
            cel.compile(rule["messageExpression"])
        assert rule["message"] and len(rule["message"]) > 20, path
        if "fieldPath" in rule:
            target = node
            for part in rule["fieldPath"].strip(".").split("."):
                target = target["properties"][part]


def test_transition_rules_exist_for_the_runs_shape():
    transition = [r for _, _, r in _rules() if "oldSelf" in r["rule"]]
    locked = {r["fieldPath"] for r in transition}
    assert {".spec.framework", ".spec.accelerator", ".spec.workers", ".spec.image", ".spec.workload"} <= locked
    assert not any("runPolicy" in f for f in locked)  # suspend, deadlines and TTL may always change


def _get(schema: dict, json_path: str) -> dict:
    node = schema
    for part in json_path.strip(".").split("."):
        node = node["properties"][part]
    return node


def test_printer_columns_point_at_schema_fields():
    version = crd.crd_manifest()["spec"]["versions"][0]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")] == [
        "Phase", "Framework", "Accelerator", "Workers", "Progress", "Throughput", "ETA", "Reason", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    for column in columns.values():
        if column["jsonPath"] != ".metadata.creationTimestamp":
            _get(schema, column["jsonPath"])


@pytest.mark.parametrize("tpu_type, topology, chips, hosts, per_host", [
    ("tpu-v5-lite-podslice", "1x1", 1, 1, 1),
    ("tpu-v5-lite-podslice", "2x4", 8, 1, 8),     # ct5lp-hightpu-8t: one VM
    ("tpu-v5-lite-podslice", "4x4", 16, 4, 4),    # multi-host: 4 VMs x 4 chips
    ("tpu-v6e-slice", "8x8", 64, 16, 4),
    ("tpu-v4-podslice", "2x2x1", 4, 1, 4),
    ("tpu-v4-podslice", "2x2x2", 8, 2, 4),
    ("tpu-v5p-slice", "2x4x4", 32, 8, 4),
])
def test_tpu_slice_facts(tpu_type, topology, chips, hosts, per_host):
    assert api.tpu_slice(tpu_type, topology) == {"chips": chips, "hosts": hosts, "chipsPerHost": per_host}


def test_cel_worker_rule_agrees_with_tpu_slice_for_every_known_topology():
    schema = crd.openapi_schema()["properties"]["spec"]
    for tpu_type, facts in api.TPU_TYPES.items():
        for topology in facts["topologies"]:
            hosts = api.tpu_slice(tpu_type, topology)["hosts"]
            # pytorch: a user's own program (JAX, PyTorch/XLA) may use multi-host slices; TensorFlow may not.
            spec = {"framework": "pytorch", "workload": {}, "workers": hosts,
                    "accelerator": {"type": "google-tpu", "tpu": {"type": tpu_type, "topology": topology}}}
            assert list(cel_check(schema, spec, path="spec")) == [], (tpu_type, topology)
            spec["workers"] = hosts + 1
            assert [f for f, _, _ in cel_check(schema, spec, path="spec")] == ["spec.workers"]
            del spec["workers"]
            assert api.resolved_workers(spec) == hosts


def test_tensorflow_is_refused_exactly_on_multi_host_tpu_slices():
    schema = crd.openapi_schema()["properties"]["spec"]
    single = []
    for tpu_type, facts in api.TPU_TYPES.items():
        for topology in facts["topologies"]:
            spec = {"framework": "tensorflow", "workload": {},
                    "accelerator": {"type": "google-tpu", "tpu": {"type": tpu_type, "topology": topology}}}
            problems = list(cel_check(schema, spec, path="spec"))
            if api.tpu_slice(tpu_type, topology)["hosts"] == 1:
                assert problems == [], (tpu_type, topology, problems)
                single.append(f"{tpu_type} {topology}")
            else:
                assert [(f, m) for f, m, _ in problems] == [("spec.accelerator.tpu.topology", api.TF_MULTI_HOST_TPU_MESSAGE)]
    assert single == ["tpu-v5-lite-podslice 1x1", "tpu-v5-lite-podslice 2x2", "tpu-v5-lite-podslice 2x4",
                      "tpu-v6e-slice 1x1", "tpu-v6e-slice 2x2", "tpu-v6e-slice 2x4",
                      "tpu-v4-podslice 2x2x1", "tpu-v5p-slice 2x2x1"]


def test_resolved_procs_per_worker():
    assert api.resolved_procs_per_worker({"framework": "pytorch", "accelerator": {"type": "nvidia-gpu", "count": 8}}) == 8
    assert api.resolved_procs_per_worker({"framework": "pytorch", "accelerator": {"type": "cpu"}}) == 1
    assert api.resolved_procs_per_worker({"framework": "tensorflow", "accelerator": {"type": "nvidia-gpu", "count": 4}}) == 1
    assert api.resolved_procs_per_worker({"framework": "pytorch", "procsPerWorker": 3, "accelerator": {"type": "cpu"}}) == 3


def test_checked_in_crd_offers_exactly_the_trainers_models():
    from leap_trainer.specs import MODEL_LAYERS
    schema = yaml.safe_load(CHECKED_IN.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    workload = schema["properties"]["spec"]["properties"]["workload"]["properties"]
    assert workload["model"]["enum"] == list(MODEL_LAYERS)
    assert workload["distillation"]["properties"]["teacher"]["enum"] == list(MODEL_LAYERS)


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_parse_with_the_pydantic_models(example):
    run = api.TrainingRun.model_validate(yaml.safe_load(example.read_text()))
    assert run.spec.framework in api.FRAMEWORKS


def test_models_and_crd_reject_the_same_typo():
    bad = {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": "x"},
           "spec": {"framework": "pytorch", "workload": {"epochz": 3}}}
    with pytest.raises(pydantic.ValidationError):
        api.TrainingRun.model_validate(bad)
    assert [p.field for p in validate_run(bad)] == ["spec.workload.epochz"]


def test_format_duration_for_the_eta_column():
    assert api.format_duration(3727) == "1h2m7s"
    assert api.format_duration(200) == "3m20s"
    assert api.format_duration(4.4) == "4s"
    assert api.format_duration(None) == ""


def test_every_operator_config_env_var_is_read():
    base = OperatorConfig.from_env({})
    assert base == OperatorConfig()
    assert len(set(ENV_VARS)) == len(ENV_VARS)
    for name in ENV_VARS:
        changed = OperatorConfig.from_env({name: "example.com/x:1" if "IMAGE_" in name and "TAG" not in name
                                           and "REGISTRY" not in name and "POLICY" not in name else "Always"})
        assert changed != base, f"{name} is not read by OperatorConfig.from_env"


def test_docs_describe_every_spec_field():
    docs = (ROOT / "docs/api.md").read_text()
    spec = crd.openapi_schema()["properties"]["spec"]
    missing = []
    for path, node in _nodes(spec):
        path = path.strip(".")
        if not path or any(part in path for part in ("env", "tolerations", "[]", "{}")):
            continue
        if path.startswith("resources."):
            path = "resources.requests"
        if f"`{path}`" not in docs and f"`{path}` /" not in docs:
            missing.append(path)
    assert not missing, f"docs/api.md does not describe: {missing}"


# What Kubernetes 1.31's CEL environment offers (CEL standard library plus the strings and lists
# extensions it enables). common-expression-language's optional Python stdlib has more; a rule
# using one of those would pass here and fail on a real API server.
K8S_CEL_FUNCTIONS = {
    "!_", "-_", "@in", "@not_strictly_false", "_!=_", "_%_", "_&&_", "_*_", "_+_", "_-_", "_/_", "_<=_", "_<_",
    "_==_", "_>=_", "_>_", "_?_:_", "_[_]", "_||_", "size", "string", "int", "uint", "double", "type", "bool",
    "matches", "startsWith", "endsWith", "contains", "duration", "timestamp",
    "charAt", "indexOf", "lastIndexOf", "lowerAscii", "upperAscii", "replace", "split", "substring", "trim", "join",
    "isSorted", "sum", "min", "max",
}


def test_cel_rules_use_only_functions_kubernetes_offers():
    used = set()
    for _, _, rule in _rules():
        for expr in (rule["rule"], rule.get("messageExpression")):
            if expr:
                used |= set(cel.compile(expr).functions())
    assert used <= K8S_CEL_FUNCTIONS, f"not available in Kubernetes CEL: {used - K8S_CEL_FUNCTIONS}"


def test_everything_cel_reads_in_spec_is_bounded():
    """The API server estimates each rule's worst-case cost from maxLength/maxItems/maxProperties
    and refuses the CRD when a rule over unbounded data could exceed its budget."""
    unbounded = []
    for path, node in _nodes(crd.openapi_schema()["properties"]["spec"], "spec"):
        kind = node.get("type")
        if (kind == "string" or node.get("x-kubernetes-int-or-string")) and "maxLength" not in node and "enum" not in node:
            unbounded.append(path)
        if kind == "array" and "maxItems" not in node:
            unbounded.append(path)
        if kind == "object" and "additionalProperties" in node and "maxProperties" not in node:
            unbounded.append(path)
    assert not unbounded
