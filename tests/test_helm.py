"""The Helm chart helm/leap-operator, rendered by Helm's real engine (helm-python-sdk).

What a platform team would notice: the chart lints clean; every object it renders is valid
Kubernetes (1.29 and 1.33, strict); RBAC grants what the operator does and nothing broad;
namespace-scoped mode stays inside its namespaces; the Deployment passes Pod Security
"restricted"; bad values are refused by the schema; trainer images set in values reach the
operator's config; monitoring objects select what the operator really creates; and the
generated copies (CRDs, alert rules, dashboards, manifests/install.yaml) are fresh.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from leap_operator import config as opconfig
from leap_operator import names
from leap_operator.render import render_children

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "leap-operator"
K8S_VERSIONS = ["1.29.0", "1.33.0"]
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}  # Prometheus Operator CRDs
NS_SCOPED = {"watch": {"allNamespaces": False, "namespaces": ["team-a", "team-b"]}}
MONITORING = {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
              "prometheusRule": {"enabled": True}}
HA = {"replicaCount": 2, "peering": {"enabled": True}}


def _load_generator():
    """helm/generate.py (run as a script by people; loaded by path here)."""
    if "leap_helm_generate" not in sys.modules:
        spec = importlib.util.spec_from_file_location("leap_helm_generate", ROOT / "helm" / "generate.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["leap_helm_generate"]


generate = _load_generator()


def render(values: dict | None = None, namespace: str = "leap-system") -> tuple[list[dict], list[dict]]:
    return generate.render_chart(values or {}, name="leap", namespace=namespace)


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def workload(objects: list[dict]) -> dict:
    """The operator's Deployment (standalone) or StatefulSet (peering, HA)."""
    found = by_kind(objects, "Deployment") + by_kind(objects, "StatefulSet")
    assert len(found) == 1, [o["kind"] for o in found]
    return found[0]


def container(objects: list[dict]) -> dict:
    return workload(objects)["spec"]["template"]["spec"]["containers"][0]


def expanded_args(objects: list[dict], pod_index: int = 1) -> list[str]:
    """The container args as the kubelet passes them: $(VAR) expanded from the env."""
    import re
    env = {e["name"]: e for e in container(objects)["env"]}

    def value(match):
        var = env[match.group(1)]
        if "value" in var:
            return var["value"]
        path = var["valueFrom"]["fieldRef"]["fieldPath"]
        return {"metadata.labels['apps.kubernetes.io/pod-index']": str(pod_index),
                "metadata.name": f"leap-operator-{pod_index}"}[path]
    return [re.sub(r"\$\(([A-Z_]+)\)", value, arg) for arg in container(objects)["args"]]


def env_of(objects: list[dict]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(objects)["env"]}


def rules_of(role: dict) -> set[tuple[str, str, str]]:
    return {(group, res, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for res in rule["resources"] for verb in rule["verbs"]}


def validate_all(crds: list[dict], objects: list[dict], version: str) -> None:
    shipped = {c["spec"]["names"]["kind"]: c for c in crds}
    for obj in crds + objects:
        kind = obj["kind"]
        if kind in MONITORING_KINDS:
            continue
        if kind in shipped:  # custom objects (kopf peerings): against the CRD the chart ships
            schema = shipped[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            jsonschema.validate(obj, schema)
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind}/{obj['metadata']['name']} invalid for Kubernetes {version}: {exc.message} "
                        f"at {list(exc.path)}")


# --- lint and validity ------------------------------------------------------------------------

@pytest.mark.parametrize("values", [{}, NS_SCOPED, MONITORING, HA], ids=["defaults", "namespaced", "monitoring", "ha"])
def test_chart_lints_clean(values):
    report = helm.lint(str(CHART), values, strict=True, kube_version="v1.29.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("values", [{}, NS_SCOPED, MONITORING, {**HA, **NS_SCOPED}],
                         ids=["defaults", "namespaced", "monitoring", "ha-namespaced"])
def test_every_rendered_object_is_valid_kubernetes(values, version):
    crds, objects = render(values)
    assert {c["metadata"]["name"] for c in crds} == {
        "trainingruns.leap.dev", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    validate_all(crds, objects, version)


def test_standard_labels_on_every_object():
    _, objects = render(MONITORING)
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                    "app.kubernetes.io/managed-by", "helm.sh/chart"):
            assert key in labels, f"{obj['kind']}/{obj['metadata']['name']} lacks label {key}"
        assert labels["app.kubernetes.io/instance"] == "leap"


def test_notes_render_with_next_steps():
    with helm.Chart.load(str(CHART)) as chart:
        notes = chart.render({**MONITORING}, name="leap", namespace="ml-ops")["leap-operator/templates/NOTES.txt"]
    assert "kubectl -n ml-ops rollout status deployment/leap-leap-operator" in notes
    assert "kubectl get trainingruns" in notes
    assert "LeapOperatorDown" in notes
    with helm.Chart.load(str(CHART)) as chart:
        notes = chart.render(HA, name="leap", namespace="ml-ops")["leap-operator/templates/NOTES.txt"]
    assert "rollout status statefulset/leap-leap-operator" in notes


# --- RBAC -----------------------------------------------------------------------------------

# Exactly what the operator and kopf call: tests/test_real_rbac.py checks these against the API
# server's audit log of a real operator's requests (and 403s) over a run's whole lifecycle.
OPERATOR_NEEDS = {
    ("leap.dev", "trainingruns", "list"), ("leap.dev", "trainingruns", "watch"),
    ("leap.dev", "trainingruns", "patch"),  # kopf's finalizer and annotations
    ("leap.dev", "trainingruns", "delete"),  # runPolicy.ttlSecondsAfterFinished
    ("leap.dev", "trainingruns/status", "patch"), ("leap.dev", "trainingruns/finalizers", "update"),
    ("batch", "jobs", "get"), ("batch", "jobs", "list"), ("batch", "jobs", "watch"),
    ("batch", "jobs", "create"), ("batch", "jobs", "patch"), ("batch", "jobs", "delete"),
    ("", "services", "get"), ("", "services", "create"), ("", "services", "delete"),
    ("", "pods", "list"), ("", "pods", "watch"),
    ("", "events", "create"),
    ("", "events", "list"),  # the Job controller's FailedCreate Events, when a Job cannot create its pods
    ("kueue.x-k8s.io", "workloads", "list"), ("kueue.x-k8s.io", "workloads", "patch"),  # suspending a queued run
}
KOPF_DISCOVERY = {("apiextensions.k8s.io", "customresourcedefinitions", "list"),
                  ("apiextensions.k8s.io", "customresourcedefinitions", "watch")}
# Only in namespace-scoped mode: kopf's namespace observer lists and watches namespaces.
KOPF_NAMESPACES = {("", "namespaces", "list"), ("", "namespaces", "watch")}


def test_cluster_wide_rbac_grants_what_the_operator_does_and_no_more():
    _, objects = render(HA)
    role = one(objects, "ClusterRole")
    granted = rules_of(role)
    peering = {("kopf.dev", "clusterkopfpeerings", verb) for verb in ("get", "list", "watch", "patch")}
    assert granted == OPERATOR_NEEDS | KOPF_DISCOVERY | peering
    assert rules_of(one(render()[1], "ClusterRole")) == OPERATOR_NEEDS | KOPF_DISCOVERY
    # Least privilege: no wildcards, no secrets, pods only read.
    assert not any("*" in part for triple in granted for part in triple), role["rules"]
    assert not any(res == "secrets" for _, res, _ in granted)
    assert {v for _, res, v in granted if res == "pods"} == {"list", "watch"}
    assert not any(v == "update" and res != "trainingruns/finalizers" for _, res, v in granted)
    binding = one(objects, "ClusterRoleBinding")
    sa = one(objects, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": "leap-system"}]
    assert workload(objects)["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_namespace_scoped_mode_stays_in_its_namespaces():
    _, objects = render({**NS_SCOPED, **HA})
    roles = {r["metadata"]["namespace"]: r for r in by_kind(objects, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(objects, "RoleBinding")}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    for role in roles.values():
        assert OPERATOR_NEEDS | {("kopf.dev", "kopfpeerings", "patch")} <= rules_of(role)
        assert {r for r in rules_of(role) if r[0] != "kopf.dev"} == OPERATOR_NEEDS
    # Cluster-wide: only what kopf needs to discover CRDs and namespaces.
    assert rules_of(one(objects, "ClusterRole")) == KOPF_DISCOVERY | KOPF_NAMESPACES
    args = container(objects)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--all-namespaces" not in args
    peerings = by_kind(objects, "KopfPeering")
    assert {p["metadata"]["namespace"] for p in peerings} == {"team-a", "team-b"}
    assert f"--peering={peerings[0]['metadata']['name']}" in args
    assert not by_kind(objects, "ClusterKopfPeering")


CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering", "Namespace"}


def test_two_releases_of_one_name_in_two_namespaces_share_no_cluster_scoped_object():
    """Helm release names are unique per namespace only: `leap-operator` in team-a and in team-b
    must not overwrite each other's ClusterRole, ClusterRoleBinding or ClusterKopfPeering."""
    seen = {}
    for namespace in ("team-a", "team-b"):
        for values in ({}, {**NS_SCOPED, **HA}, HA):
            _, objects = generate.render_chart(values, name="leap-operator", namespace=namespace)
            for obj in objects:
                if obj["kind"] in CLUSTER_SCOPED - {"Namespace"}:
                    key = (obj["kind"], obj["metadata"]["name"])
                    assert seen.setdefault(key, namespace) == namespace, f"{key} rendered by both releases"
            binding = one(objects, "ClusterRoleBinding")
            assert binding["roleRef"]["name"] == one(objects, "ClusterRole")["metadata"]["name"]
            assert binding["subjects"][0]["namespace"] == namespace
    assert ("ClusterRole", "leap-operator-team-a") in seen


def test_namespace_scoped_mode_defaults_to_the_release_namespace():
    _, objects = render({"watch": {"allNamespaces": False}}, namespace="ml")
    assert [r["metadata"]["namespace"] for r in by_kind(objects, "Role")] == ["ml"]
    assert "--namespace=ml" in container(objects)["args"]


# --- Deployment -------------------------------------------------------------------------------

def test_deployment_is_pod_security_restricted_and_probed():
    _, objects = render()
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert one(objects, "Deployment")["spec"]["strategy"]["type"] == "Recreate"  # never two operators at once
    c = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    assert all("hostPath" not in v for v in pod.get("volumes", []))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] == "liveness"
    assert f"--liveness-port={ports['liveness']}" in c["args"]
    assert f"--metrics-port={ports['metrics']}" in c["args"]
    assert "--all-namespaces" in c["args"] and "--standalone" in c["args"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert c["image"] == "ghcr.io/leap-dev/leap-operator:0.1.0"


def test_operator_args_parse_with_leap_operator():
    import argparse
    from leap_operator import cmd_operator
    for values in ({}, NS_SCOPED, HA, {**NS_SCOPED, **HA}):
        _, objects = render(values)
        parser = argparse.ArgumentParser()
        cmd_operator.add_arguments(parser)
        args = parser.parse_args(expanded_args(objects))  # SystemExit on a flag `leap operator` lacks
        ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
        assert (args.metrics_port, args.liveness_port) == (ports["metrics"], ports["liveness"])
        assert args.all_namespaces == values.get("watch", {}).get("allNamespaces", True)
        assert args.namespace == [f"{ns}" for ns in values.get("watch", {}).get("namespaces", [])]
        assert (args.peering is None) == (not values.get("peering", {}).get("enabled", False))


def test_ha_replicas_get_distinct_peering_priorities():
    """kopf pauses every replica when two peers share a priority: each replica's priority is its
    StatefulSet pod index, so exactly one (the highest index alive) acts."""
    import argparse
    from leap_operator import cmd_operator
    _, objects = render(HA)
    sts = one(objects, "StatefulSet")
    assert sts["spec"]["replicas"] == 2 and not by_kind(objects, "Deployment")
    # The governing Service of a StatefulSet is headless.
    governing = {s["metadata"]["name"]: s for s in by_kind(objects, "Service")}[sts["spec"]["serviceName"]]
    assert governing["spec"]["clusterIP"] == "None"
    assert governing["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert not [s for s in by_kind(render()[1], "Service") if s["spec"].get("clusterIP") == "None"]
    parser = argparse.ArgumentParser()
    cmd_operator.add_arguments(parser)
    priorities = {parser.parse_args(expanded_args(objects, pod_index=i)).priority for i in range(2)}
    assert priorities == {0, 1}
    peering = one(objects, "ClusterKopfPeering")
    assert f"--peering={peering['metadata']['name']}" in container(objects)["args"]
    env = {e["name"]: e for e in container(objects)["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # kopf's peer identity
    with pytest.raises(helm.HelmError, match="peering"):
        render({"replicaCount": 3})


def test_trainer_images_in_values_reach_the_operator_config():
    values = {"trainer": {"registry": "registry.example.com/ml", "tag": "2024.1", "pullPolicy": "Always",
                          "images": {"torchGpu": "registry.example.com/ml/torch:cu12", "tfTpu": "tpu:v5e",
                                     "torchCpu": "torch-cpu:1", "tfCpu": "tf-cpu:1"},
                          "defaultCpuRequest": "4", "defaultMemoryRequest": "16Gi", "shmSize": "32Gi",
                          "checkpointMountPath": "/ckpt", "clusterDomain": "corp.local"}}
    _, objects = render(values)
    env = env_of(objects)
    assert set(opconfig.ENV_VARS) <= set(env), set(opconfig.ENV_VARS) - set(env)
    cfg = opconfig.OperatorConfig.from_env(env)
    assert cfg.default_image("pytorch", "nvidia-gpu") == "registry.example.com/ml/torch:cu12"
    assert cfg.default_image("tensorflow", "google-tpu") == "tpu:v5e"
    assert cfg.default_image("pytorch", "cpu") == "torch-cpu:1"
    assert cfg.default_image("tensorflow", "cpu") == "tf-cpu:1"
    assert cfg.image_pull_policy == "Always"
    assert (cfg.default_cpu_request, cfg.default_memory_request, cfg.shm_size) == ("4", "16Gi", "32Gi")
    assert (cfg.checkpoint_mount_path, cfg.cluster_domain) == ("/ckpt", "corp.local")


def test_registry_values_reach_the_operator_image_and_the_training_pods():
    """docs/install.md: build and push the images to your registry, then point the chart at it."""
    values = {"image": {"repository": "registry.example.com/ml/leap-operator", "tag": "1.2.3"},
              "trainer": {"registry": "registry.example.com/ml", "tag": "1.2.3"}}
    _, objects = render(values)
    assert container(objects)["image"] == "registry.example.com/ml/leap-operator:1.2.3"
    cfg = opconfig.OperatorConfig.from_env(env_of(objects))  # what the operator reads
    images = set()
    for example in ("mnist-cpu", "mnist-gpu", "keras-tpu"):
        run = yaml.safe_load((ROOT / "manifests" / "examples" / f"{example}.yaml").read_text())
        job = [o for o in render_children(run, 1, cfg) if o["kind"] == "Job"][0]
        images |= {c["image"] for c in job["spec"]["template"]["spec"]["containers"]}
    assert images == {"registry.example.com/ml/leap-torch-gpu:1.2.3", "registry.example.com/ml/leap-tf-tpu:1.2.3"}


def test_default_trainer_env_matches_the_operators_own_defaults():
    _, objects = render()
    assert opconfig.OperatorConfig.from_env(env_of(objects)) == opconfig.OperatorConfig()
    # registry and tag alone move every default image
    _, objects = render({"trainer": {"registry": "mirror.local/leap", "tag": "x1"}})
    cfg = opconfig.OperatorConfig.from_env(env_of(objects))
    assert cfg.default_image("pytorch", "nvidia-gpu") == "mirror.local/leap/leap-torch-gpu:x1"
    assert cfg.default_image("tensorflow", "google-tpu") == "mirror.local/leap/leap-tf-tpu:x1"


# --- values schema ----------------------------------------------------------------------------

@pytest.mark.parametrize("values, where", [
    ({"replicaCount": 0}, "/replicaCount"),
    ({"replicaCount": "two"}, "/replicaCount"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"watch": {"namespaces": ["Team_A"]}}, "/watch/namespaces/0"),
    ({"operator": {"metricsPort": 70000}}, "/operator/metricsPort"),
    ({"trainer": {"defaultMemoryRequest": "lots"}}, "/trainer/defaultMemoryRequest"),
    ({"serviceMonitor": {"interval": "often"}}, "/serviceMonitor/interval"),
    ({"replicas": 2}, "replicas"),  # a typo of replicaCount
])
def test_bad_values_fail_with_schema_errors(values, where):
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmValuesError) as err:
            chart.render(values, name="leap", namespace="leap-system")
        assert where in str(err.value)
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(values)


def test_default_values_satisfy_the_schema():
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(chart.values)


# --- monitoring objects -----------------------------------------------------------------------

def test_monitoring_objects_are_off_by_default_and_dashboards_on():
    _, objects = render()
    assert not {o["kind"] for o in objects} & MONITORING_KINDS
    dashboards = [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["labels"].get("grafana_dashboard") == "1"]
    titles = {json.loads(next(iter(cm["data"].values())))["title"] for cm in dashboards}
    assert titles == {"Leap / Training runs", "Leap / Operator"}


def test_service_monitor_selects_the_operator_metrics_service():
    _, objects = render(MONITORING)
    sm = one(objects, "ServiceMonitor")
    svc = one(objects, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    # The Service reaches the operator pods' metrics port.
    pod_labels = workload(objects)["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container(objects)["ports"]}
    # The alerts look for job="leap-operator": the ServiceMonitor's jobLabel yields it.
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == generate.OPERATOR_JOB


def test_pod_monitor_selects_the_training_pods_the_operator_renders():
    import re
    _, objects = render(MONITORING)
    pm = one(objects, "PodMonitor")
    example = yaml.safe_load((ROOT / "manifests" / "examples" / "ddp-cpu.yaml").read_text())
    example["spec"]["procsPerWorker"] = 3  # local ranks serve on ports named metrics, metrics-1, metrics-2
    job = next(o for o in render_children(example) if o["kind"] == "Job")
    pod = job["spec"]["template"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    keep = next(r for r in pm["spec"]["podMetricsEndpoints"][0]["relabelings"] if r["action"] == "keep")
    port_names = [p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])]
    kept = [n for n in port_names if re.fullmatch(keep["regex"], n)]
    assert "metrics" in kept and all(n.startswith("metrics") for n in kept)
    assert len(kept) == 3


def test_prometheus_rule_carries_the_checked_rules_file():
    _, objects = render(MONITORING)
    rule = one(objects, "PrometheusRule")
    checked = yaml.safe_load(generate.RULES_FILE.read_text())
    assert rule["spec"] == checked
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"LeapTrainingRunFailed", "LeapTrainingProgressStalled", "LeapTrainingThroughputDropped",
            "LeapOperatorDown"} <= alerts


# --- generated files --------------------------------------------------------------------------

def test_generated_files_are_fresh():
    stale = [str(p.relative_to(ROOT)) for p in generate.stale()]
    assert not stale, f"stale generated files {stale}: run `python helm/generate.py`"


def test_chart_crd_is_the_api_crd():
    from leap_operator import crd
    with helm.Chart.load(str(CHART)) as chart:
        shipped = [doc for entry in chart.crds for doc in yaml.safe_load_all(entry["data"]) if doc]
    assert crd.crd_manifest() in shipped
    checked_in = yaml.safe_load((ROOT / "manifests" / "crd" / "leap.dev_trainingruns.yaml").read_text())
    assert checked_in == crd.crd_manifest()


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_install_yaml_is_valid_and_ordered(version):
    docs = [d for d in yaml.safe_load_all(generate.INSTALL_FILE.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert kinds[0] == "Namespace" and docs[0]["metadata"]["name"] == generate.INSTALL_NAMESPACE
    assert docs[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    last_crd = max(i for i, k in enumerate(kinds) if k == "CustomResourceDefinition")
    assert all(k == "CustomResourceDefinition" for k in kinds[1:last_crd + 1])
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment"} <= set(kinds)
    assert not set(kinds) & MONITORING_KINDS  # plain clusters have no Prometheus Operator CRDs
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    validate_all(crds, [d for d in docs if d["kind"] != "CustomResourceDefinition"], version)
    assert any(d["metadata"]["name"] == f"{names.PLURAL}.{names.GROUP}" for d in crds)
