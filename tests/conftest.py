"""Fixtures of the real control-plane tier (tests/test_real_*.py).

`control_plane`: etcd, kube-apiserver, kube-controller-manager and kube-scheduler built from Go
modules (tests/controlplane.py), one per test session. A control plane already started by
`make control-plane` is reused and left running.

`cluster`: Leap installed for real with `kubectl apply --server-side -f manifests/install.yaml`,
test Nodes and the pod runner (tests/podrunner.py), and the real operator process logged in as
the install's ServiceAccount with a token from the TokenRequest API, so the API server's RBAC
decides what it may do.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane import ROOT, ControlPlane, Rest
from emulator import OperatorProcess, wait_for
from podrunner import PodRunner

INSTALL = ROOT / "manifests" / "install.yaml"
TEST_NAMESPACE_LABEL = "leap.dev/test-namespace"
OPERATOR_NAMESPACE, OPERATOR_SA = "leap-system", "leap-operator"


@dataclass
class Kubectl:
    kubeconfig: Path

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["kubectl", f"--kubeconfig={self.kubeconfig}", *args], input=input,
                                capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def json(self, *args: str) -> dict:
        return json.loads(self(*args, "-o", "json").stdout)


@dataclass
class Cluster:
    plane: ControlPlane
    rest: Rest
    kubectl: Kubectl
    runner: PodRunner
    operator: OperatorProcess

    def namespace(self, prefix: str, labels: dict | None = None) -> str:
        """A fresh namespace for one test (names stay unique when a control plane is reused)."""
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        labels = {TEST_NAMESPACE_LABEL: "true", **(labels or {})}
        self.rest.ok("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                     "metadata": {"name": name, "labels": labels}})
        # Pods need the namespace's default ServiceAccount (the serviceaccount controller makes it).
        wait_for(lambda: self.rest.get(f"/api/v1/namespaces/{name}/serviceaccounts/default"), 30,
                 message=f"the default ServiceAccount of {name}")
        return name

    def checkpoint_claim(self, namespace: str, name: str = "checkpoints") -> str:
        """A bound ReadWriteMany PersistentVolumeClaim for spec.checkpoint.claimName: a hostPath
        PersistentVolume pre-bound to it (the real PV controller binds the pair; no provisioner
        runs here). The pod runner gives every pod mounting the claim one shared directory."""
        volume = f"{namespace}-{name}"
        self.rest.ok("POST", "/api/v1/persistentvolumes", {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": volume, "labels": {TEST_NAMESPACE_LABEL: "true"}},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                     "persistentVolumeReclaimPolicy": "Delete", "hostPath": {"path": f"/tmp/{volume}"},
                     "claimRef": {"namespace": namespace, "name": name}}})
        self.rest.ok("POST", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims", {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": volume,
                     "resources": {"requests": {"storage": "1Gi"}}}})
        wait_for(lambda: (self.rest.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}")
                          or {}).get("status", {}).get("phase") == "Bound", 60, message=f"claim {name} bound")
        return name

    def run(self, namespace: str, name: str) -> dict | None:
        return self.rest.get(f"/apis/leap.dev/v1alpha1/namespaces/{namespace}/trainingruns/{name}")

    def phase(self, namespace: str, name: str) -> str | None:
        return ((self.run(namespace, name) or {}).get("status") or {}).get("phase")

    def pods(self, namespace: str, selector: str = "") -> list[dict]:
        query = f"?labelSelector={selector}" if selector else ""
        return self.rest.ok("GET", f"/api/v1/namespaces/{namespace}/pods{query}")["items"]

    def events(self, namespace: str, name: str) -> list[dict]:
        items = self.rest.ok("GET", f"/api/v1/namespaces/{namespace}/events")["items"]
        return [e for e in items if (e.get("involvedObject") or {}).get("name") == name]


def purge_test_namespaces(rest: Rest) -> None:
    """Delete the test namespaces, removing their pods at once as a kubelet would (grace 0) and
    the operator's finalizer from their runs (as an admin does once no operator runs), so
    nothing waits on a node whose pod runner is gone or on an operator that was stopped."""
    selector = f"labelSelector={TEST_NAMESPACE_LABEL}%3Dtrue"
    for ns in rest.ok("GET", f"/api/v1/namespaces?{selector}")["items"]:
        name = ns["metadata"]["name"]
        code, runs = rest.request("GET", f"/apis/leap.dev/v1alpha1/namespaces/{name}/trainingruns")
        for run in runs.get("items") or [] if code == 200 else []:
            rest.request("PATCH", f"/apis/leap.dev/v1alpha1/namespaces/{name}/trainingruns/{run['metadata']['name']}",
                         {"metadata": {"finalizers": None}}, content_type="application/merge-patch+json")
        rest.request("DELETE", f"/api/v1/namespaces/{name}/pods",
                     {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})
        rest.request("DELETE", f"/api/v1/namespaces/{name}")
    rest.request("DELETE", f"/api/v1/persistentvolumes?{selector}")


def require_tools() -> None:
    missing = [tool for tool in ("go", "kubectl", "openssl") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the real control-plane tier needs {', '.join(missing)} on PATH (see README, Development)")


@pytest.fixture(scope="session")
def control_plane():
    require_tools()
    plane = ControlPlane()
    reused = plane.ready()
    plane.up()
    yield plane
    if not reused:
        plane.down()


@pytest.fixture(scope="session")
def cluster(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("real-cluster")
    kubectl = Kubectl(control_plane.kubeconfig)
    rest = control_plane.rest()
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(INSTALL))
    kubectl("wait", "--for=condition=Established", "crd/trainingruns.leap.dev", "--timeout=60s")
    # The install's operator Deployment would need the image and a kubelet; the operator runs
    # here as a local process instead, with the same ServiceAccount's credentials.
    kubectl("-n", OPERATOR_NAMESPACE, "scale", "deployment/leap-operator", "--replicas=0")
    runner = PodRunner(rest, tmp / "pods").start()
    # A control plane reused from `make control-plane` may hold an earlier session's test
    # namespaces, whose pods would still occupy the test Nodes' GPUs and TPUs.
    purge_test_namespaces(rest)
    token = kubectl("-n", OPERATOR_NAMESPACE, "create", "token", OPERATOR_SA, "--duration=4h").stdout.strip()
    sa_kubeconfig = control_plane.write_kubeconfig(tmp / "operator.kubeconfig", token=token,
                                                   user=f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}")
    cluster = Cluster(control_plane, rest, kubectl, runner, OperatorProcess(None, tmp, [], kubeconfig=sa_kubeconfig))
    try:
        cluster.operator.start().wait_ready()
        yield cluster
    finally:
        purge_test_namespaces(rest)
        operator = cluster.operator  # tests may have replaced it (stopped, then started anew)
        code = operator.stop()
        runner.stop()
        print(operator.output()[-5000:])
        if runner.errors:
            print("pod runner errors:", *runner.errors[-20:], sep="\n  ")
        assert code == 0, "the operator must exit cleanly on SIGTERM"
