"""A Kubernetes API for tests: kmock's KubernetesEmulator on a real localhost port, in a thread.

The emulator runs on its own event loop in a background thread, so tests are plain sync code
and the operator (a real `leap operator` process) talks to it over HTTP like to a cluster. Tests
drive the cluster's side through HTTP too (every write becomes a watch event): the emulator
has no Job controller, no garbage collector and no admission, so a test sets Job and Pod status
itself, and creates TrainingRuns with the uid/creationTimestamp/generation an API server adds.

Verified wiring: besides the resources under test, the emulator must list
apiextensions.k8s.io/v1/customresourcedefinitions and v1/namespaces, or kopf's resource
observer never starts watching.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

import kmock

from leap_operator import crd, names
from leap_trainer import contract

ROOT = Path(__file__).resolve().parents[1]


def _patch_kmock_namespaces_path() -> None:
    """kmock 0.8 cannot parse the namespaces collection itself (/api/v1/namespaces: it takes
    "namespaces" for the namespace prefix of a namespaced path and fails with a 500), which a
    namespace-scoped kopf lists. Parse it as the cluster-scoped resource it is."""
    from kmock._internal import parsing

    original = parsing.parse_path
    if getattr(original, "_leap_patched", False):
        return

    def parse_path(path: str) -> "parsing.ParsedPath":
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "v1"] and len(parts) in (3, 4) and parts[2] == "namespaces":
            return parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None)
        return original(path)

    parse_path._leap_patched = True  # type: ignore[attr-defined]
    parsing.parse_path = parse_path


_patch_kmock_namespaces_path()

RESOURCES = {
    "apiextensions.k8s.io/v1/customresourcedefinitions": dict(kind="CustomResourceDefinition", namespaced=False),
    "v1/namespaces": dict(kind="Namespace", namespaced=False),
    f"{names.API_VERSION}/{names.PLURAL}": dict(kind=names.KIND, singular=names.SINGULAR, namespaced=True,
                                                shortnames=names.SHORT_NAMES, subresources=["status"]),
    "batch/v1/jobs": dict(kind="Job", singular="job", namespaced=True, subresources=["status"]),
    "v1/pods": dict(kind="Pod", singular="pod", namespaced=True, subresources=["status"]),
    "v1/services": dict(kind="Service", singular="service", namespaced=True),
    "v1/events": dict(kind="Event", singular="event", namespaced=True),
    "kopf.dev/v1/kopfpeerings": dict(kind="KopfPeering", namespaced=True),
    "kopf.dev/v1/clusterkopfpeerings": dict(kind="ClusterKopfPeering", namespaced=False),
}
VERBS = ["list", "watch", "get", "create", "patch", "update", "delete"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_path(resource: str, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
    """'batch/v1/jobs' -> /apis/batch/v1/namespaces/NS/jobs/NAME[/status]; 'v1/pods' -> /api/v1/..."""
    *gv, plural = resource.split("/")
    base = "/api/" + "/".join(gv) if len(gv) == 1 else "/apis/" + "/".join(gv)
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    if name:
        base += f"/{name}"
    if subresource:
        base += f"/{subresource}"
    return base


class _Emulator(kmock.KubernetesEmulator):
    """KubernetesEmulator plus metadata.generateName (kopf names its Events that way)."""

    async def _handle(self, request):  # type: ignore[override]
        data = request.data if request.action == kmock.action.CREATE else None
        meta = data.get("metadata") if isinstance(data, dict) else None
        if isinstance(meta, dict) and not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        return await super()._handle(request)


class Emulator:
    """Start with `with Emulator() as k8s:`; k8s.url is the API server's URL."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="kmock")
        self.kmock: _Emulator | None = None
        self._server: kmock.Server | None = None
        self.url = ""

    def __enter__(self) -> "Emulator":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        self.create("apiextensions.k8s.io/v1/customresourcedefinitions", crd.crd_manifest())
        return self

    async def _start(self) -> None:
        self.kmock = _Emulator()
        for resource, info in RESOURCES.items():
            self.kmock.resources[resource] = kmock.ResourceInfo(verbs=VERBS, **info)
        await self.kmock.__aenter__()
        self._server = kmock.Server(self.kmock)
        await self._server.__aenter__()
        self.url = str(self._server.url).rstrip("/")

    def __exit__(self, *exc: Any) -> None:
        async def stop() -> None:
            await self._server.__aexit__(None, None, None)
            await self.kmock.__aexit__(None, None, None)
        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {"token": "test"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator"}}],
        }))
        return path

    # --- HTTP, like kubectl -----------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def create(self, resource: str, obj: dict, namespace: str | None = None) -> dict:
        ns = namespace or (obj.get("metadata") or {}).get("namespace")
        return self.request("POST", api_path(resource, ns), obj)

    def get(self, resource: str, namespace: str | None, name: str) -> dict | None:
        return self.request("GET", api_path(resource, namespace, name))

    def list(self, resource: str, namespace: str | None = None, labels: dict | None = None) -> list[dict]:
        items = (self.request("GET", api_path(resource, namespace)) or {}).get("items") or []
        # The emulator ignores label selectors: filter here, as the API server would.
        return [i for i in items if all(((i.get("metadata") or {}).get("labels") or {}).get(k) == v
                                        for k, v in (labels or {}).items())]

    def patch(self, resource: str, namespace: str | None, name: str, patch: dict,
              subresource: str | None = None) -> dict | None:
        return self.request("PATCH", api_path(resource, namespace, name, subresource), patch,
                            "application/merge-patch+json")

    def delete(self, resource: str, namespace: str | None, name: str) -> dict | None:
        return self.request("DELETE", api_path(resource, namespace, name))

    # --- cluster-side behaviour the emulator lacks --------------------------------------------

    def create_namespace(self, name: str) -> None:
        self.create("v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def create_run(self, run: dict) -> dict:
        """Create a TrainingRun as the API server would store it (uid, timestamps, generation)."""
        run = copy.deepcopy(run)
        meta = run.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        meta.setdefault("generation", 1)
        meta.setdefault("resourceVersion", "1")  # kopf guards its JSON patches with it; kmock keeps it as is
        return self.create(f"{names.API_VERSION}/{names.PLURAL}", run)

    def run(self, namespace: str, name: str) -> dict | None:
        return self.get(f"{names.API_VERSION}/{names.PLURAL}", namespace, name)

    def jobs(self, namespace: str, run: str) -> list[dict]:
        return self.list("batch/v1/jobs", namespace, {names.LABEL_RUN: run})

    def set_job_status(self, namespace: str, name: str, status: dict) -> None:
        self.patch("batch/v1/jobs", namespace, name, {"status": status}, "status")

    def start_pods(self, job: dict, phase: str = "Running", pod_ip: str = "10.0.0.1") -> list[dict]:
        """What the Job controller and kubelet would do: one pod per completion index."""
        meta, spec = job["metadata"], job["spec"]
        template = spec["template"]
        pods = []
        for index in range(int(spec.get("completions") or 1)):
            pod = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": f"{meta['name']}-{index}-x{index}",
                    "namespace": meta["namespace"],
                    "labels": {**template["metadata"]["labels"],
                               contract.JOB_COMPLETION_INDEX_ANNOTATION: str(index)},
                    "annotations": {**(template["metadata"].get("annotations") or {}),
                                    contract.JOB_COMPLETION_INDEX_ANNOTATION: str(index)},
                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                         "uid": meta.get("uid", ""), "controller": True}],
                },
                "spec": template["spec"],
                "status": {"phase": phase, "podIP": pod_ip if index == 0 else f"10.0.0.{index + 1}"},
            }
            pods.append(self.create("v1/pods", pod))
        return pods

    def writes(self, method: str, path_suffix: str) -> int:
        """How many `method` requests the emulator received for paths ending in path_suffix."""
        return sum(1 for r in list(self.kmock) if str(r.method.value if hasattr(r.method, "value") else r.method).upper()
                   == method.upper() and r.url.path.endswith(path_suffix))

    def events(self, namespace: str, name: str) -> list[dict]:
        return [e for e in self.list("v1/events", namespace)
                if (e.get("involvedObject") or {}).get("name") == name]


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
             message: str = "condition") -> Any:
    """Poll until predicate() is truthy; return its value. Generous timeouts: CI machines are slow."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (KeyError, TypeError, IndexError):
            last = None
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}; last value: {last!r}")


class OperatorProcess:
    """The real operator, `leap operator`, as a child process pointed at the emulator."""

    def __init__(self, emulator: Emulator, tmp: Path, namespaces: list[str], *extra: str):
        self.emulator, self.tmp, self.namespaces, self.extra = emulator, tmp, namespaces, extra
        self.proc: subprocess.Popen | None = None
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.log = tmp / f"operator-{time.monotonic_ns()}.log"

    def start(self) -> "OperatorProcess":
        env = {**os.environ, "KUBECONFIG": str(self.emulator.kubeconfig(self.tmp / "kubeconfig")),
               "PYTHONUNBUFFERED": "1"}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        cmd = [sys.executable, "-m", "leap_operator.cli", "operator",
               *(() if "--peering" in self.extra else ("--standalone",)),
               "--metrics-port", str(self.metrics_port), "--liveness-port", str(self.liveness_port),
               "--restart-backoff", "0.2", "--progress-interval", "0.3", "--verbose", *self.extra]
        for ns in self.namespaces:
            cmd += ["--namespace", ns]
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self, kill: bool = False) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def __enter__(self) -> "OperatorProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
