"""Installing Leap for real: Helm (helm-python-sdk, Helm's own Go SDK) into a real kube-apiserver.

`kubectl apply --server-side -f manifests/install.yaml` is exercised by the `cluster` fixture
(tests/conftest.py) that every real-tier operator test runs on. Here: a Helm release in
namespace-scoped mode, whose operator runs with the release's ServiceAccount token, so the real
RBAC authorizer decides what it may do, and an uninstall that leaves nothing behind.
"""

from __future__ import annotations

import copy
import json
import shutil
import uuid

import helm_python as helm
import pytest
import yaml

from conftest import Kubectl
from controlplane import ROOT
from emulator import OperatorProcess, wait_for
from leap_operator import names, render

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CHART = ROOT / "helm" / "leap-operator"


def can_i(kubectl: Kubectl, sa: str, verb: str, resource: str, namespace: str) -> bool:
    result = kubectl("auth", "can-i", verb, resource, "-n", namespace, f"--as={sa}", check=False)
    return result.stdout.strip() == "yes"


def test_helm_install_namespace_scoped_operator_works_under_its_rbac_and_uninstalls_clean(cluster, tmp_path):
    suffix = uuid.uuid4().hex[:5]
    release, release_ns = f"leap-{suffix}", f"leap-helm-{suffix}"
    team = cluster.namespace("team")
    other = cluster.namespace("other")
    config = helm.Config(kubeconfig_path=str(cluster.plane.kubeconfig), namespace=release_ns)
    values = {"watch": {"allNamespaces": False, "namespaces": [team]}, "replicaCount": 1}
    installed = config.install(CHART, release, values, namespace=release_ns, create_namespace=True, timeout=120)
    assert installed["status"] == "deployed", installed["status"]
    assert f"The operator serves TrainingRuns in: {team}" in installed["notes"]
    assert f"kubectl delete trainingruns --all -n {team}" in installed["notes"]  # the uninstall order
    fullname = f"{release}-leap-operator"
    sa = f"system:serviceaccount:{release_ns}:{fullname}"
    deployment = cluster.kubectl.json("-n", release_ns, "get", "deployment", fullname)
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == fullname

    # The real authorizer: the release's RBAC reaches the watched namespace and nothing else.
    assert can_i(cluster.kubectl, sa, "create", "jobs.batch", team)
    assert can_i(cluster.kubectl, sa, "patch", "trainingruns.leap.dev/status", team)
    assert not can_i(cluster.kubectl, sa, "create", "jobs.batch", other)
    assert not can_i(cluster.kubectl, sa, "get", "secrets", team)

    # Its operator, logged in as that ServiceAccount, runs a TrainingRun in the namespace it serves.
    token = cluster.kubectl("-n", release_ns, "create", "token", fullname, "--duration=1h").stdout.strip()
    kubeconfig = cluster.plane.write_kubeconfig(tmp_path / "helm-operator.kubeconfig", token=token, user=sa)
    cluster.operator.stop()  # one operator at a time acts on `team` (the session one is cluster-wide)
    try:
        with OperatorProcess(None, tmp_path, [team], kubeconfig=kubeconfig) as scoped:
            scoped.wait_ready()
            run = {"apiVersion": names.API_VERSION, "kind": names.KIND,
                   "metadata": {"name": "scoped", "namespace": team},
                   "spec": {"framework": "pytorch", "workload": {"epochs": 1}, "accelerator": {"type": "cpu"}}}
            cluster.rest.ok("POST", f"/apis/{names.API_VERSION}/namespaces/{team}/{names.PLURAL}", copy.deepcopy(run))
            wait_for(lambda: cluster.rest.get(f"/apis/batch/v1/namespaces/{team}/jobs/{render.job_name('scoped', 1)}"),
                     60, message="the Job created under the release's RBAC")
            wait_for(lambda: (cluster.run(team, "scoped") or {}).get("status", {}).get("phase"), 30,
                     message="status written under the release's RBAC")
            assert "Forbidden" not in scoped.output() and "403" not in scoped.output(), scoped.output()[-3000:]
            # kopf lists and watches namespaces in this mode (and only warns when it may not).
            assert "Not enough permissions" not in scoped.output(), scoped.output()[-3000:]
            # Uninstall in the documented order (docs/install.md, "Uninstall"): the runs first, while
            # the operator still runs to remove their children and finalizers; it finishes.
            cluster.kubectl("delete", "trainingruns", "--all", "-n", team, "--timeout=60s")
            assert cluster.run(team, "scoped") is None
            wait_for(lambda: not cluster.rest.ok("GET", f"/apis/batch/v1/namespaces/{team}/jobs")["items"], 60,
                     message="the run's Job gone with it")
    finally:
        old = cluster.operator
        cluster.operator = OperatorProcess(None, old.tmp, [], kubeconfig=old.kubeconfig).start().wait_ready()

    config.uninstall(release, timeout=120)
    left = cluster.kubectl("get", "clusterrole,clusterrolebinding,role,rolebinding,serviceaccount,deployment,configmap,service",
                           "-A", "-l", f"app.kubernetes.io/instance={release}", "-o", "name").stdout.split()
    assert left == [], left


# --- upgrade, names, two releases -----------------------------------------------------------------

def _crd_in_group(group: str, *, short: str, progress_type: str) -> dict:
    """The chart's TrainingRun CRD moved to a test-only API group, so a test can install, change and
    upgrade it without touching the CRD the rest of the session runs on."""
    crd = yaml.safe_load((CHART / "crds" / "leap.dev_trainingruns.yaml").read_text())
    crd["metadata"]["name"] = f"{crd['spec']['names']['plural']}.{group}"
    crd["spec"]["group"] = group
    crd["spec"]["names"]["shortNames"] = [short]
    for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
        if column["name"] == "Progress":
            column["type"] = progress_type
    return crd


def test_crd_upgrade_under_helm_needs_force_conflicts_as_documented(cluster, tmp_path):
    """docs/install.md, "Upgrade": Helm installs crds/ on first install only; applying the new CRD
    server-side conflicts with Helm's field ownership unless --force-conflicts; then helm upgrade."""
    suffix = uuid.uuid4().hex[:5]
    group, release, release_ns = f"u{suffix}.leap.dev", f"crd-{suffix}", f"leap-crd-{suffix}"
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "crds" / "kopf.dev_peerings.yaml").unlink()  # cluster-wide, shared with the session
    old = _crd_in_group(group, short=f"old{suffix}", progress_type="string")  # as 0.1.0 shipped it
    (chart / "crds" / "leap.dev_trainingruns.yaml").write_text(yaml.safe_dump(old))
    config = helm.Config(kubeconfig_path=str(cluster.plane.kubeconfig), namespace=release_ns)
    values = {"watch": {"allNamespaces": False}, "dashboards": {"enabled": False}}
    try:
        assert config.install(chart, release, values, namespace=release_ns, create_namespace=True,
                              timeout=120)["status"] == "deployed"
        crd_name = old["metadata"]["name"]
        assert cluster.kubectl.json("get", "crd", crd_name)["spec"]["names"]["shortNames"] == [f"old{suffix}"]

        # The new release's CRD (new short name, numeric Progress), in the chart's crds/ directory.
        new = _crd_in_group(group, short=f"new{suffix}", progress_type="number")
        (chart / "crds" / "leap.dev_trainingruns.yaml").write_text(yaml.safe_dump(new))
        crds_dir = str(chart / "crds")
        plain = cluster.kubectl("apply", "--server-side", "-f", crds_dir, check=False)
        assert plain.returncode != 0 and "conflict" in plain.stderr.lower(), (plain.stdout, plain.stderr)
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", crds_dir)  # the documented command
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd_name}", "--timeout=60s")

        upgraded = config.upgrade(chart, release, values, namespace=release_ns, timeout=120)
        assert upgraded["status"] == "deployed", upgraded["status"]
        crd = cluster.kubectl.json("get", "crd", crd_name)["spec"]
        assert crd["names"]["shortNames"] == [f"new{suffix}"]  # helm upgrade left the new CRD alone
        columns = {c["name"]: c["type"] for c in crd["versions"][0]["additionalPrinterColumns"]}
        assert columns["Progress"] == "number"
        assert cluster.kubectl("-n", release_ns, "get", f"new{suffix}").returncode == 0
    finally:
        config.uninstall(release, timeout=120, ignore_not_found=True)
        cluster.kubectl("delete", "crd", f"trainingruns.{group}", "--ignore-not-found", "--timeout=60s", check=False)
        cluster.kubectl("delete", "namespace", release_ns, "--wait=false", "--ignore-not-found", check=False)


def test_short_name_and_category_work_beside_tekton(cluster):
    """`tr` is Tekton's TaskRun: with Tekton installed too, `kubectl get ltr` and `kubectl get leap`
    still name TrainingRuns, and `kubectl get trainingruns` always does."""
    tekton = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
              "metadata": {"name": "taskruns.tekton.dev"},
              "spec": {"group": "tekton.dev", "scope": "Namespaced",
                       "names": {"kind": "TaskRun", "plural": "taskruns", "singular": "taskrun",
                                 "shortNames": ["tr", "trs"], "categories": ["tekton", "tekton-pipelines"]},
                       "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                           "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}
    ns = cluster.namespace("names")
    cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(tekton))
    try:
        cluster.kubectl("wait", "--for=condition=Established", "crd/taskruns.tekton.dev", "--timeout=60s")
        run = {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": "named", "namespace": ns},
               "spec": {"framework": "pytorch", "workload": {"epochs": 1}, "accelerator": {"type": "cpu"},
                        "runPolicy": {"suspend": True}}}
        cluster.rest.ok("POST", f"/apis/{names.API_VERSION}/namespaces/{ns}/{names.PLURAL}", run)
        resources = cluster.kubectl("api-resources", "--categories=leap", "-o", "name").stdout.split()
        assert resources == ["trainingruns.leap.dev"], resources
        for name in ("ltr", "leap", "trainingruns", "trainingrun"):
            out = cluster.kubectl("-n", ns, "get", name, "-o", "name").stdout.split()
            assert out == ["trainingrun.leap.dev/named"], (name, out)
        # `all` does not take training runs along (kubectl delete all --all is routine clean-up).
        assert "trainingrun" not in cluster.kubectl("-n", ns, "get", "all", "-o", "name").stdout
    finally:
        cluster.kubectl("delete", "crd", "taskruns.tekton.dev", "--ignore-not-found", check=False)


def test_two_releases_of_one_name_in_two_namespaces_install_and_uninstall_side_by_side(cluster):
    """Helm release names are unique per namespace only: the cluster-scoped RBAC carries the namespace."""
    suffix = uuid.uuid4().hex[:5]
    namespaces = [f"leap-two-{suffix}-{i}" for i in (1, 2)]
    configs = {}
    try:
        for ns in namespaces:
            configs[ns] = helm.Config(kubeconfig_path=str(cluster.plane.kubeconfig), namespace=ns)
            installed = configs[ns].install(CHART, "leap-operator", {"watch": {"allNamespaces": False},
                                                                     "dashboards": {"enabled": False}},
                                            namespace=ns, create_namespace=True, timeout=120)
            assert installed["status"] == "deployed", installed
        for ns in namespaces:
            role = cluster.kubectl.json("get", "clusterrole", f"leap-operator-{ns}")
            assert role["metadata"]["annotations"]["meta.helm.sh/release-namespace"] == ns
            binding = cluster.kubectl.json("get", "clusterrolebinding", f"leap-operator-{ns}")
            assert binding["subjects"][0]["namespace"] == ns
            assert can_i(cluster.kubectl, f"system:serviceaccount:{ns}:leap-operator", "create", "jobs.batch", ns)
    finally:
        for ns, config in configs.items():
            config.uninstall("leap-operator", timeout=120, ignore_not_found=True)
            cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
    left = cluster.kubectl("get", "clusterrole,clusterrolebinding", "-o", "name").stdout.split()
    assert not [name for name in left if suffix in name], left


def test_kubectl_delete_install_yaml_after_the_runs_finishes(tmp_path):
    """docs/install.md, "With kubectl": runs first, then `kubectl delete -f manifests/install.yaml`,
    which removes the CRDs and the operator's namespace and finishes. On a control plane of its
    own: the rest of the session runs on the install this test removes."""
    from conftest import INSTALL, OPERATOR_NAMESPACE, OPERATOR_SA, require_tools
    from controlplane import ControlPlane

    require_tools()
    plane = ControlPlane(tmp_path / "control-plane").up()
    operator = None
    try:
        kubectl = Kubectl(plane.kubeconfig)
        kubectl("apply", "--server-side", "-f", str(INSTALL))
        kubectl("wait", "--for=condition=Established", "crd/trainingruns.leap.dev", "--timeout=60s")
        kubectl("-n", OPERATOR_NAMESPACE, "scale", "deployment/leap-operator", "--replicas=0")
        token = kubectl("-n", OPERATOR_NAMESPACE, "create", "token", OPERATOR_SA, "--duration=1h").stdout.strip()
        kubeconfig = plane.write_kubeconfig(tmp_path / "operator.kubeconfig", token=token,
                                            user=f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}")
        operator = OperatorProcess(None, tmp_path, [], kubeconfig=kubeconfig).start().wait_ready()
        rest = plane.rest()
        kubectl("create", "namespace", "team")
        run = {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": "left", "namespace": "team"},
               "spec": {"framework": "pytorch", "workload": {"epochs": 1}, "accelerator": {"type": "cpu"}}}
        rest.ok("POST", f"/apis/{names.API_VERSION}/namespaces/team/{names.PLURAL}", run)
        wait_for(lambda: rest.get(f"/apis/batch/v1/namespaces/team/jobs/{render.job_name('left', 1)}"), 60,
                 message="the run's Job")
        assert names.GROUP + "/finalizer" in rest.get(
            f"/apis/{names.API_VERSION}/namespaces/team/{names.PLURAL}/left")["metadata"]["finalizers"]

        kubectl("delete", "trainingruns", "--all", "-A", "--timeout=60s")
        # What Leap decides: with the runs gone, the TrainingRun CRD and the operator's namespace go
        # at once. (kopf's peering CRDs, which hold nothing here, were once seen to stay Terminating
        # for minutes in this test under load: the API server's CRD cleanup backing off; not waited on.)
        kubectl("delete", "-f", str(INSTALL), "--wait=false")
        wait_for(lambda: kubectl("get", "crd", "trainingruns.leap.dev", check=False).returncode != 0, 60,
                 message="the TrainingRun CRD gone")
        wait_for(lambda: kubectl("get", "namespace", OPERATOR_NAMESPACE, check=False).returncode != 0, 60,
                 message=f"namespace {OPERATOR_NAMESPACE} gone")
        assert not rest.ok("GET", "/apis/batch/v1/namespaces/team/jobs")["items"]
    finally:
        if operator is not None:
            operator.stop()
        plane.down()
