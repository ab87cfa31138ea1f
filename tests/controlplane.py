"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

All four come from one binary built from their Go modules at one pinned release
(test/controlplane/, cached in .cache/bin/). What runs is the real thing: admission (incl.
PodSecurity and OwnerReferencesPermissionEnforcement), CEL, RBAC, ServiceAccount tokens
(TokenRequest), the Job, garbage-collector, ttl-after-finished, namespace and serviceaccount
controllers, and the scheduler. There are no
Nodes and no kubelet: tests add Nodes and a pod runner (tests/podrunner.py).

    python tests/controlplane.py build|up|down|status     (what `make control-plane` runs)

`up` is idempotent: a control plane that answers /readyz is reused. State, logs and the admin
kubeconfig live in .cache/control-plane/; `down` stops every process `up` started and removes it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "test" / "controlplane"
CACHE = ROOT / ".cache"
BINARY = CACHE / "bin" / "leap-controlplane"
STATE_DIR = CACHE / "control-plane"
KUBECONFIG = STATE_DIR / "kubeconfig"

ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.96.0.0/16"
ADMIN_USER = "leap-admin"
# The audit log records every request of ServiceAccounts in leap-system (the operator's), one
# line each at ResponseComplete: an independent count of what the operator asks of the API
# server, by verb and resource (bench/operator_scale.py --real, RBAC tests).
AUDITED_GROUP = "system:serviceaccounts:leap-system"
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata", "userGroups": [AUDITED_GROUP]}, {"level": "None"}],
}
# node-lifecycle is on: the pod runner keeps its Nodes' Leases fresh, as kubelets do.
CONTROLLERS = "*"


class ControlPlaneError(RuntimeError):
    pass


# --- build ---------------------------------------------------------------------------------------

def _source_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(MODULE.glob("*")):
        if path.suffix in (".go", ".mod", ".sum"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def kubernetes_version() -> str:
    """The pinned release, read from the module's go.mod (its one source of truth)."""
    found = re.search(r"^\s*(?:require\s+)?k8s\.io/kubernetes\s+(v\S+)", (MODULE / "go.mod").read_text(), re.M)
    if found:
        return found.group(1)
    raise ControlPlaneError("test/controlplane/go.mod does not require k8s.io/kubernetes")


def build(quiet: bool = False) -> Path:
    """Build the binary unless the cached one was built from the same sources."""
    stamp = BINARY.with_suffix(".sha256")
    digest = _source_digest()
    if BINARY.exists() and stamp.exists() and stamp.read_text() == digest:
        return BINARY
    if shutil.which("go") is None:
        raise ControlPlaneError("`go` is not on PATH: the control plane is built from Go modules (Go 1.24+)")
    version = kubernetes_version()
    major, minor = version.lstrip("v").split(".")[:2]
    pkg = "k8s.io/component-base/version"
    ldflags = (f"-s -w -X {pkg}.gitVersion={version} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor} "
               f"-X {pkg}.gitTreeState=clean")
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if not quiet:
        print(f"building the control plane ({version}) into {BINARY.relative_to(ROOT)} "
              "(a cold build takes a while; it is cached)", flush=True)
    subprocess.run(["go", "build", "-trimpath", f"-ldflags={ldflags}", "-o", str(BINARY), "."],
                   cwd=MODULE, check=True)
    stamp.write_text(digest)
    if not quiet:
        print(f"built in {time.monotonic() - started:.0f}s", flush=True)
    return BINARY


# --- processes -----------------------------------------------------------------------------------

def _epoch(stamp: str) -> float:
    try:
        return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class ControlPlane:
    """One control plane's state directory, processes and admin access."""

    def __init__(self, state_dir: Path = STATE_DIR, binary: Path = BINARY):
        self.dir = Path(state_dir)
        self.binary = Path(binary)
        self.kubeconfig = self.dir / "kubeconfig"
        self.state_file = self.dir / "state.json"

    # state.json: {"pids": {component: pid}, "ports": {...}, "token": ...}
    def state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    @property
    def audit_log(self) -> Path:
        return self.dir / "logs" / "audit.log"

    def audited(self, since: float = 0.0) -> list[dict]:
        """The audit events (see AUDIT_POLICY) whose request completed after `since` (epoch s)."""
        events = []
        try:
            lines = self.audit_log.read_text().splitlines()
        except OSError:
            return events
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line being written
            stamp = event.get("stageTimestamp") or ""
            if not since or _epoch(stamp) >= since:
                events.append(event)
        return events

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.state()['ports']['apiserver']}"

    @property
    def ca_file(self) -> Path:
        return self.dir / "pki" / "apiserver.crt"

    @property
    def token(self) -> str:
        return self.state()["token"]

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        request = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self.ssl_context()) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def rest(self, token: str | None = None) -> "Rest":
        """A small JSON client for this API server (admin unless given another token)."""
        return Rest(self.server, token or self.token, self.ssl_context())

    def ready(self) -> bool:
        state = self.state()
        if not state or not all(_alive(pid) for pid in state.get("pids", {}).values()):
            return False
        try:
            return self.get("/readyz")[0] == 200
        except (OSError, ssl.SSLError, KeyError):
            return False

    def up(self, timeout: float = 180.0) -> "ControlPlane":
        if self.ready():
            return self
        self.down()
        build()
        for sub in ("pki", "etcd", "logs"):
            (self.dir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        ports = {"etcd": _free_port(), "etcd-peer": _free_port(), "apiserver": _free_port()}
        token = hashlib.sha256(os.urandom(32)).hexdigest()
        (self.dir / "tokens.csv").write_text(f'{token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
        key = self.dir / "pki" / "service-account.key"
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        (self.dir / "audit-policy.yaml").write_text(json.dumps(AUDIT_POLICY))
        state = {"pids": {}, "ports": ports, "token": token}
        self.state_file.write_text(json.dumps(state))

        def start(component: str, *args: str) -> None:
            log = open(self.dir / "logs" / f"{component}.log", "ab")
            process = subprocess.Popen([str(self.binary), component, *args], stdout=log, stderr=log,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            state["pids"][component] = process.pid
            self.state_file.write_text(json.dumps(state))

        etcd = f"http://127.0.0.1:{ports['etcd']}"
        peer = f"http://127.0.0.1:{ports['etcd-peer']}"
        start("etcd", "--name=leap", f"--data-dir={self.dir / 'etcd'}", f"--listen-client-urls={etcd}",
              f"--advertise-client-urls={etcd}", f"--listen-peer-urls={peer}",
              f"--initial-advertise-peer-urls={peer}", f"--initial-cluster=leap={peer}",
              "--unsafe-no-fsync", "--log-level=warn")
        start("kube-apiserver", f"--etcd-servers={etcd}", "--bind-address=127.0.0.1",
              "--advertise-address=127.0.0.1", f"--secure-port={ports['apiserver']}",
              f"--cert-dir={self.dir / 'pki'}", f"--token-auth-file={self.dir / 'tokens.csv'}",
              "--authorization-mode=RBAC", f"--service-account-issuer={ISSUER}",
              # As on OpenShift: setting blockOwnerDeletion needs update on the owner's finalizers.
              "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
              f"--service-account-key-file={key}", f"--service-account-signing-key-file={key}",
              f"--service-cluster-ip-range={SERVICE_CIDR}", "--profiling=false", "--v=1",
              f"--audit-policy-file={self.dir / 'audit-policy.yaml'}", f"--audit-log-path={self.audit_log}",
              "--audit-log-mode=batch", "--audit-log-batch-max-wait=1s")
        self._wait(lambda: self._readyz_ok(), timeout, "kube-apiserver /readyz")
        self.write_kubeconfig(self.kubeconfig, token=token, user=ADMIN_USER)
        start("kube-controller-manager", f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
              "--secure-port=0", f"--controllers={CONTROLLERS}",
              f"--service-account-private-key-file={key}", f"--root-ca-file={self.ca_file}",
              f"--cluster-name=leap-test", "--v=1")
        start("kube-scheduler", f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
              "--secure-port=0", "--v=1")
        # The serviceaccount controller made the default namespace's ServiceAccount: the
        # controller manager is up and talking to the API server.
        self._wait(lambda: self.get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
                   timeout, "kube-controller-manager (the default ServiceAccount)")
        return self

    def _readyz_ok(self) -> bool:
        try:
            return self.get("/readyz")[0] == 200
        except (OSError, ssl.SSLError):
            return False

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [c for c, pid in self.state().get("pids", {}).items() if not _alive(pid)]
            if dead:
                raise ControlPlaneError(f"{', '.join(dead)} exited while waiting for {what}; "
                                        f"see {self.dir / 'logs'}:\n{self.log_tail(dead[0])}")
            if predicate():
                return
            time.sleep(0.2)
        raise ControlPlaneError(f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.dir / 'logs'}")

    def log_tail(self, component: str, lines: int = 20) -> str:
        try:
            return "\n".join((self.dir / "logs" / f"{component}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def write_kubeconfig(self, path: Path, *, token: str, user: str, namespace: str | None = None) -> Path:
        """A kubeconfig for this API server with a bearer token (admin, or a ServiceAccount's)."""
        context = {"cluster": "leap-test", "user": user}
        if namespace:
            context["namespace"] = namespace
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "leap-test",
            "clusters": [{"name": "leap-test", "cluster": {"server": self.server,
                                                           "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "leap-test", "context": context}],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        path.chmod(0o600)
        return path

    def down(self) -> None:
        """Stop every process `up` started (scheduler and controllers first, etcd last); remove the state."""
        pids = self.state().get("pids", {})
        for component in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            pid = pids.get(component)
            if pid is None or not _alive(pid):
                continue
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                continue
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


class Rest:
    """JSON over HTTPS with a bearer token: what the harness needs, nothing more."""

    def __init__(self, server: str, token: str, context: ssl.SSLContext):
        self.server, self.token, self.context = server, token, context

    def request(self, method: str, path: str, body: object = None, *,
                content_type: str = "application/json", timeout: float = 30.0) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.server + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": content_type, "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self.context) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read() or b"{}")
            except ValueError:
                return exc.code, {}

    def ok(self, method: str, path: str, body: object = None, **kwargs) -> dict:
        status, payload = self.request(method, path, body, **kwargs)
        if status >= 400:
            raise ControlPlaneError(f"{method} {path}: {status} {payload.get('message', payload)}")
        return payload

    def get(self, path: str) -> dict | None:
        status, payload = self.request("GET", path)
        if status == 404:
            return None
        if status >= 400:
            raise ControlPlaneError(f"GET {path}: {status} {payload.get('message', payload)}")
        return payload

    def watch(self, path: str, resource_version: str, timeout: float):
        """Yield (type, object) from a watch until the server or `timeout` ends it."""
        sep = "&" if "?" in path else "?"
        url = (f"{self.server}{path}{sep}watch=1&allowWatchBookmarks=true"
               f"&resourceVersion={resource_version}&timeoutSeconds={int(timeout)}")
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout + 10, context=self.context) as response:
            for line in response:
                if line.strip():
                    event = json.loads(line)
                    yield event.get("type"), event.get("object") or {}


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else "status"
    plane = ControlPlane()
    try:
        if command == "build":
            build()
        elif command == "up":
            started = time.monotonic()
            plane.up()
            print(f"control plane ready at {plane.server} ({time.monotonic() - started:.0f}s); "
                  f"kubeconfig: {plane.kubeconfig.relative_to(ROOT)}")
        elif command == "down":
            plane.down()
            print("control plane stopped")
        elif command == "status":
            print("ready" if plane.ready() else "not running")
            return 0 if plane.ready() else 1
        else:
            print(f"usage: {argv[0]} build|up|down|status", file=sys.stderr)
            return 2
    except (ControlPlaneError, subprocess.CalledProcessError) as exc:
        print(f"control plane: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
