"""The operator's memory in a busy cluster: N pods that are not Leap's (default 10,000).

On the real control plane (tests/controlplane.py): the pods are created in one namespace
(Pending, bound to no node), then the operator (`leap operator`, as its ServiceAccount) is
started and its resident memory read once its lists and watches have settled. Since the
operator asks the API server for Leap's pods and Jobs only (server-side label selectors), the
unrelated pods should cost it nothing.

Usage: .venv/bin/python bench/operator_unrelated_pods.py [--pods 10000] [--settle 25]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Kubectl  # noqa: E402
from controlplane import ControlPlane  # noqa: E402
from emulator import OperatorProcess, wait_for  # noqa: E402

NAMESPACE = "bench-unrelated"


def memory_kb(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--settle", type=float, default=25.0, help="seconds for the operator's lists and watches")
    args = parser.parse_args(argv)
    plane = ControlPlane().up()
    rest, kubectl = plane.rest(), Kubectl(plane.kubeconfig)
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "manifests" / "install.yaml"))
    kubectl("-n", "leap-system", "scale", "deployment/leap-operator", "--replicas=0")
    token = kubectl("-n", "leap-system", "create", "token", "leap-operator", "--duration=1h").stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="leap-unrelated-"))
    kubeconfig = plane.write_kubeconfig(tmp / "operator.kubeconfig", token=token, user="leap-operator")
    rest.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    wait_for(lambda: rest.get(f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default"), 60)

    def create(i: int) -> None:  # a typical small web pod: labels, an annotation, ten env vars
        rest.request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"web-{i}", "labels": {"app": "web", "tier": "frontend"},
                         "annotations": {"note": "x" * 200}},
            "spec": {"automountServiceAccountToken": False, "nodeSelector": {"no": "node"},
                     "containers": [{"name": "web", "image": "nginx:1.27",
                                     "env": [{"name": f"E{k}", "value": "v" * 20} for k in range(10)]}]}})

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(create, range(args.pods)))
    print(f"{args.pods} unrelated pods created in {time.monotonic() - started:.0f} s")
    with OperatorProcess(None, tmp, [], kubeconfig=kubeconfig, verbose=False) as operator:
        operator.wait_ready()
        time.sleep(args.settle)
        memory = memory_kb(operator.proc.pid)
    print(f"operator with {args.pods} unrelated pods: RSS {memory['VmRSS'] / 1024:.1f} MB, "
          f"peak {memory['VmHWM'] / 1024:.1f} MB")
    kubectl("delete", "namespace", NAMESPACE, "--wait=false")
    return 0


if __name__ == "__main__":
    sys.exit(main())
