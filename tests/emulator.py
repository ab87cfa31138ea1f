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
from typing import Any, Callable, Iterator

import aiohttp.web
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


def _patch_kmock_membership() -> None:
    """kmock decides whether a reaction applies to a request by iterating every request its view
    ever saw (`request in view`), for each reaction including its built-in fallbacks, so each
    request costs O(requests so far): quadratic, minutes at the scale benchmark's 10^4 requests.
    For the views that are plain filters over the root, membership is decidable from the request
    alone: it reached the root, and the criteria accept it. Slices and groups keep kmock's way."""
    from kmock._internal import dsl, rendering

    original = dsl.View.__contains__
    if getattr(original, "_leap_patched", False):
        return

    def contains(view: Any, item: Any) -> bool:
        if not isinstance(item, rendering.Request):
            return original(view, item)
        if isinstance(view, dsl.Root):
            return any(request is item for request in reversed(view._requests))  # it is the newest
        if type(view) is dsl.Filter:
            return bool(view.criteria(item)) and contains(view._source, item)
        if type(view) is dsl.Priority:
            return contains(view._source, item)
        return original(view, item)

    contains._leap_patched = True  # type: ignore[attr-defined]
    dsl.View.__contains__ = contains


_patch_kmock_membership()

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


def method_of(request: Any) -> str:
    """A kmock request's HTTP method, upper-case ("POST")."""
    return str(getattr(request.method, "value", request.method)).upper()


class _Emulator(kmock.KubernetesEmulator):
    """KubernetesEmulator plus metadata.generateName (kopf names its Events that way), lookups of
    one object by its key (kmock scans every stored object for each fetch, create, patch and
    delete answer, which dominates at thousands of objects), and an observer that sees every
    answered request with the time it was answered (the scale benchmark's probe)."""

    observer: Callable[[Any, Any, float], None] | None = None  # (request, response, monotonic time)
    # kmock's own reactions answer after the emulator stored a write (a lost answer); a refusal
    # answers with an error status before anything is stored (a write that did not happen).
    refusals: tuple[Callable[[Any], int | None], ...] = ()

    async def _handle(self, request):  # type: ignore[override]
        for refusal in self.refusals:
            code = refusal(request)
            if code:
                return aiohttp.web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                  "code": code, "message": "refused by the test"}, status=code)
        data = request.data if request.action == kmock.action.CREATE else None
        meta = data.get("metadata") if isinstance(data, dict) else None
        if isinstance(meta, dict) and not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        response = await super()._handle(request)
        if self.observer is not None:
            self.observer(request, response, time.monotonic())
        return response

    def _stored(self, request, *, name: str | None = None, namespace: str | None = None):
        key = (request.resource, request.namespace or namespace, request.name or name)
        return self.objects._objects.get(key)

    async def _serve_fetch(self, request):  # type: ignore[override]
        obj = self._stored(request)
        if obj is None or obj.deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return obj.raw

    async def _serve_create(self, request):  # type: ignore[override]
        meta = (request.data or {}).get("metadata") or {}
        return self._stored(request, name=meta.get("name"), namespace=meta.get("namespace")).raw

    async def _serve_update(self, request):  # type: ignore[override]
        return self._stored(request).last.raw

    _serve_delete = _serve_update


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

    def call(self, fn: Callable[[_Emulator], Any]) -> Any:
        """Run fn(kmock) on the emulator's loop (kmock is not thread-safe), e.g. to add a reaction:
        `k8s.call(lambda km: km["post /apis/batch/v1/namespaces/ns/jobs"][:2] << 503)`."""
        async def on_loop() -> Any:
            result = fn(self.kmock)
            return await result if asyncio.iscoroutine(result) else result
        return asyncio.run_coroutine_threadsafe(on_loop(), self.loop).result(10)

    def refuse(self, method: str, path: str, code: int, while_set: threading.Event) -> None:
        """Answer `method` requests on `path` with `code`, storing nothing, while `while_set` is set."""
        def refusal(request: Any) -> int | None:
            same = method_of(request) == method.upper()
            return code if same and request.url.path == path and while_set.is_set() else None
        self.call(lambda km: setattr(km, "refusals", (*km.refusals, refusal)))

    def requests(self, method: str, path_suffix: str) -> list:
        """The requests the emulator answered for `method` on paths ending in path_suffix."""
        def matching(km: _Emulator) -> list:
            return [r for r in km if method_of(r) == method.upper()
                    and r.url.path.endswith(path_suffix)]
        return self.call(matching)

    def kubeconfig(self, path: Path, server: str | None = None) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": server or self.url}}],
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
        return len(self.requests(method, path_suffix))

    def events(self, namespace: str, name: str) -> list[dict]:
        return [e for e in self.list("v1/events", namespace)
                if (e.get("involvedObject") or {}).get("name") == name]


class Proxy:
    """A TCP proxy in front of the emulator, on the emulator's loop, that can cut the network:
    down() resets every open connection (watch streams included) and refuses new ones until
    up(). The test itself keeps talking to the emulator directly."""

    def __init__(self, emulator: Emulator):
        self.emulator = emulator
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: asyncio.AbstractServer | None = None
        self._transports: set[asyncio.BaseTransport] = set()

    def up(self) -> "Proxy":
        async def start() -> None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.emulator.call(lambda _: start())
        return self

    def down(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
                self._server = None
            for transport in list(self._transports):
                transport.abort()  # a reset, as when a load balancer or the API server goes away
            self._transports.clear()
        self.emulator.call(lambda _: stop())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = self.emulator.url.rsplit(":", 1)[1]
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(upstream))
        except OSError:
            writer.transport.abort()
            return
        self._transports |= {writer.transport, up_writer.transport}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._transports -= {writer.transport, up_writer.transport}


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


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, so no operator outlives its session
    (a stray one would keep acting on a reused control plane with the code it started with)."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class OperatorProcess:
    """The real operator, `leap operator`, as a child process pointed at the emulator (or at a
    real API server through `kubeconfig`)."""

    def __init__(self, emulator: Emulator | None, tmp: Path, namespaces: list[str], *extra: str,
                 server: str | None = None, verbose: bool = True, kubeconfig: Path | None = None):
        self.emulator, self.tmp, self.namespaces, self.extra = emulator, tmp, namespaces, extra
        self.kubeconfig = kubeconfig  # a real API server's (then `emulator` is None)
        self.server = server  # the API URL it talks to (default: the emulator's; a Proxy's, say)
        self.verbose = verbose  # debug logs for the tests' post-mortems; off to measure
        self.proc: subprocess.Popen | None = None
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.log = tmp / f"operator-{time.monotonic_ns()}.log"

    def start(self) -> "OperatorProcess":
        kubeconfig = self.kubeconfig or self.emulator.kubeconfig(self.tmp / f"kubeconfig-{self.metrics_port}",
                                                                 self.server)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig),
               "PYTHONUNBUFFERED": "1"}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        cmd = [sys.executable, "-m", "leap_operator.cli", "operator",
               *(() if "--peering" in self.extra else ("--standalone",)),
               "--metrics-port", str(self.metrics_port), "--liveness-port", str(self.liveness_port),
               "--restart-backoff", "0.2", "--progress-interval", "0.3", *(("--verbose",) if self.verbose else ()),
               *self.extra]
        for ns in self.namespaces:
            cmd += ["--namespace", ns]
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, timeout: float = 60) -> "OperatorProcess":
        """Until kopf's liveness endpoint answers (the operator has started watching)."""
        def alive() -> bool:
            assert self.proc.poll() is None, self.output()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_for(alive, timeout, 0.2, "the operator's liveness endpoint")
        return self

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


def shared_operator(emulator: Emulator, tmp: Path, namespaces: list[str]) -> Iterator[OperatorProcess]:
    """A module fixture's body: one operator for several tests, which must exit cleanly at the end."""
    op = OperatorProcess(emulator, tmp, namespaces).start()
    try:
        yield op.wait_ready()
    finally:
        code = op.stop()
        print(op.output()[-5000:])
        assert code == 0, "the operator must exit cleanly on SIGTERM"
