"""Installing Leap for real: Helm (helm-python-sdk, Helm's own Go SDK) into a real kube-apiserver.

`kubectl apply --server-side -f manifests/install.yaml` is exercised by the `cluster` fixture
(tests/conftest.py) that every real-tier operator test runs on. Here: a Helm release in
namespace-scoped mode, whose operator runs with the release's ServiceAccount token, so the real
RBAC authorizer decides what it may do, and an uninstall that leaves nothing behind.
"""

from __future__ import annotations

import copy
import uuid

import helm_python as helm
import pytest

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
            cluster.kubectl("-n", team, "delete", "trainingrun", "scoped", "--timeout=60s")
    finally:
        old = cluster.operator
        cluster.operator = OperatorProcess(None, old.tmp, [], kubeconfig=old.kubeconfig).start().wait_ready()

    config.uninstall(release, timeout=120)
    left = cluster.kubectl("get", "clusterrole,clusterrolebinding,role,rolebinding,serviceaccount,deployment,configmap,service",
                           "-A", "-l", f"app.kubernetes.io/instance={release}", "-o", "name").stdout.split()
    assert left == [], left
