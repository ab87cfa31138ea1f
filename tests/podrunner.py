"""Nodes and a pod runner for the real control plane: the one stand-in left for the kubelet.

Nodes are real Node objects in the shapes Leap targets (a CPU node, an 8-GPU node labelled as
NVIDIA GPU Feature Discovery does, GKE TPU hosts of v5e 4x4 slices), kept Ready by renewing their
Leases as kubelets do, so the real scheduler places Leap's pods by the selectors, tolerations and
requests Leap renders and the real node-lifecycle controller leaves them alone.

The PodRunner watches pods bound to those Nodes and does what a kubelet would report:
- by default it marks a pod Running (a loopback pod IP, Ready), and Succeeded or Failed when a
  test says so (`finish`), with the container's exit code;
- for pods a test hands it (`run_for_real`), it really runs the container's command as a local
  process with the pod's env resolved as `leap run` resolves it (leap_operator.local.podenv),
  its own 127.0.0.x address as pod IP, and reports the exit code when the process ends;
- on graceful deletion it stops the process, moves a started pod to Failed (as the kubelet does
  before a deleted pod vanishes) and removes the pod.

What it cannot show: images, pulls, volumes, probes, cgroup limits, restarts of containers,
DNS of the headless Service (rank 0's name is mapped to its pod IP here), and networking between
real hosts. Its processes share one network namespace, where every pod would have its own: the
metrics port of workers other than index 0 (which the operator scrapes) is moved to a free port,
so two workers do not contend for one port.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from controlplane import ControlPlaneError, Rest
from leap_operator.local.plan import _POD_ONLY, local_trainer, TRAINER_COMMAND
from leap_operator.local.podenv import resolve_env
from leap_operator.render import CHECKPOINT_VOLUME
from leap_trainer import contract

GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
TPU_TYPE, TPU_TOPOLOGY = "tpu-v5-lite-podslice", "4x4"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def node(name: str, *, cpu: str = "16", memory: str = "64Gi", labels: dict | None = None,
         extended: dict | None = None, taints: list | None = None) -> dict:
    capacity = {"cpu": cpu, "memory": memory, "pods": "110", "ephemeral-storage": "100Gi", **(extended or {})}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                              "kubernetes.io/arch": "amd64", "leap.dev/test-node": "true",
                                              **(labels or {})}},
        "spec": {"taints": taints or []},
        "status": {"capacity": capacity, "allocatable": capacity,
                   "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                   "message": "leap pod runner", "lastHeartbeatTime": _now(),
                                   "lastTransitionTime": _now()}],
                   "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                                 {"type": "Hostname", "address": name}],
                   "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "v1.33.0",
                                "containerRuntimeVersion": "leap-pod-runner://0", "kernelVersion": "",
                                "osImage": "", "kubeProxyVersion": "", "machineID": "", "systemUUID": "",
                                "bootID": ""}},
    }


def cpu_node(name: str = "cpu-0") -> dict:
    return node(name)


def gpu_node(name: str = "gpu-0", product: str = GPU_PRODUCT, count: int = 8) -> dict:
    """Labels as NVIDIA GPU Feature Discovery sets them; the taint GPU node pools carry."""
    return node(name, cpu="96", memory="1Ti", labels={
        "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": product, "nvidia.com/gpu.count": str(count),
        "nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.family": "hopper"},
        extended={"nvidia.com/gpu": str(count)},
        taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}])


def tpu_slice(pool: str, hosts: int = 4, chips_per_host: int = 4, tpu_type: str = TPU_TYPE,
              topology: str = TPU_TOPOLOGY) -> list[dict]:
    """The hosts of one GKE TPU slice: one node pool, GKE's TPU labels and taint."""
    return [node(f"{pool}-{i}", cpu="224", memory="192Gi", labels={
        "cloud.google.com/gke-tpu-accelerator": tpu_type, "cloud.google.com/gke-tpu-topology": topology,
        "cloud.google.com/gke-nodepool": pool, "cloud.google.com/gke-accelerator-count": str(chips_per_host)},
        extended={"google.com/tpu": str(chips_per_host)},
        taints=[{"key": "google.com/tpu", "value": "present", "effect": "NoSchedule"}]) for i in range(hosts)]


def default_nodes() -> list[dict]:
    return [cpu_node(), gpu_node(), *tpu_slice("tpu-v5e-a")]


@dataclass
class PodRecord:
    namespace: str
    name: str
    uid: str
    ip: str
    process: subprocess.Popen | None = None
    log: Path | None = None
    finished: bool = False
    stopping: bool = False


@dataclass
class PodRunner:
    """Stand-in kubelet for the test Nodes (see the module docstring)."""

    rest: Rest
    workdir: Path
    nodes: list[dict] = field(default_factory=default_nodes)
    lease_interval: float = 10.0

    def __post_init__(self):
        self.pods: dict[tuple[str, str], PodRecord] = {}
        self.real: list[Callable[[dict], bool]] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._next_ip = 2
        self.errors: list[str] = []

    @property
    def node_names(self) -> set[str]:
        return {n["metadata"]["name"] for n in self.nodes}

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "PodRunner":
        for obj in self.nodes:
            self.add_node(obj)
        for target in (self._watch_pods, self._renew_leases, self._reap):
            thread = threading.Thread(target=target, daemon=True, name=f"podrunner-{target.__name__}")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            records = list(self.pods.values())
        for record in records:
            self._kill(record)

    def add_node(self, obj: dict) -> None:
        name = obj["metadata"]["name"]
        self.rest.request("DELETE", f"/api/v1/nodes/{name}")  # a Node left by an earlier session
        self.rest.ok("POST", "/api/v1/nodes", obj)
        # The API server drops status on create: report it as a kubelet does, on the subresource.
        self.rest.ok("PATCH", f"/api/v1/nodes/{name}/status", {"status": obj["status"]},
                     content_type="application/merge-patch+json")
        if obj not in self.nodes:
            self.nodes.append(obj)
        self._renew_lease(name)

    def remove_node(self, name: str) -> None:
        self.nodes = [n for n in self.nodes if n["metadata"]["name"] != name]
        self.rest.request("DELETE", f"/api/v1/nodes/{name}")

    def run_for_real(self, predicate: Callable[[dict], bool]) -> None:
        """Pods matching `predicate` run their container's command as a local process."""
        self.real.append(predicate)

    # --- what a test asks for ----------------------------------------------------------------------

    def finish(self, namespace: str, name: str, exit_code: int = 0, reason: str | None = None) -> None:
        """The pod's container exits with `exit_code`: Succeeded on 0, else Failed."""
        with self._lock:
            record = self.pods.get((namespace, name))
        if record is None:
            raise ControlPlaneError(f"pod {namespace}/{name} is not running on a test node")
        self._report_exit(record, exit_code, reason)

    def pod_ip(self, namespace: str, name: str) -> str | None:
        record = self.pods.get((namespace, name))
        return record.ip if record else None

    # --- the watch ---------------------------------------------------------------------------------

    def _watch_pods(self) -> None:
        version = ""
        while not self._stop.is_set():
            try:
                if not version:
                    listing = self.rest.ok("GET", "/api/v1/pods")
                    for pod in listing.get("items") or []:
                        self._on_pod(pod)
                    version = listing["metadata"]["resourceVersion"]
                for kind, pod in self.rest.watch("/api/v1/pods", version, timeout=60):
                    if self._stop.is_set():
                        return
                    if kind == "ERROR":
                        version = ""  # too old: list again
                        break
                    version = (pod.get("metadata") or {}).get("resourceVersion") or version
                    if kind in ("ADDED", "MODIFIED"):
                        self._on_pod(pod)
                    elif kind == "DELETED":
                        self._forget(pod)
            except Exception as exc:  # the API server restarting, a dropped stream: watch again
                if self._stop.is_set():
                    return
                self.errors.append(repr(exc))
                version = ""
                time.sleep(0.5)

    def _on_pod(self, pod: dict) -> None:
        meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
        if spec.get("nodeName") not in self.node_names:
            return
        key = (meta["namespace"], meta["name"])
        with self._lock:
            record = self.pods.get(key)
            if record is not None and record.uid != meta["uid"]:
                self._kill(record)
                record = None
            if record is None:
                if status.get("phase") in ("Succeeded", "Failed"):
                    return
                record = PodRecord(meta["namespace"], meta["name"], meta["uid"], self._allocate_ip())
                self.pods[key] = record
                new = True
            else:
                new = False
        if meta.get("deletionTimestamp"):
            self._delete(record, started=not new or status.get("phase") == "Running")
            return
        if new:
            self._start(record, pod)

    def _forget(self, pod: dict) -> None:
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        with self._lock:
            record = self.pods.get(key)
            if record is not None and record.uid == pod["metadata"]["uid"]:
                self._kill(record)
                del self.pods[key]

    def _allocate_ip(self) -> str:
        with self._lock:
            n = self._next_ip
            self._next_ip += 1
        return f"127.0.{n // 250}.{n % 250 + 2}"

    # --- a pod's life ------------------------------------------------------------------------------

    def _start(self, record: PodRecord, pod: dict) -> None:
        if any(predicate(pod) for predicate in self.real):
            try:
                self._spawn(record, pod)
            except Exception as exc:  # what a kubelet reports when a container cannot start
                self.errors.append(f"{record.name}: {exc!r}")
                self._report_exit(record, 128, "StartError", message=str(exc))
                return
        container = (pod["spec"].get("containers") or [{}])[0]
        now = _now()
        conditions = [{"type": t, "status": "True", "lastTransitionTime": now}
                      for t in ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready", "PodScheduled")]
        self._patch_status(record, {
            "phase": "Running", "podIP": record.ip, "podIPs": [{"ip": record.ip}], "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}], "startTime": now, "conditions": conditions,
            "containerStatuses": [{"name": container.get("name", "main"), "ready": True, "started": True,
                                   "restartCount": 0, "image": container.get("image", ""), "imageID": "",
                                   "containerID": f"leap://{record.uid}",
                                   "state": {"running": {"startedAt": now}}}]})

    def _checkpoint_dir(self, pod: dict, home: Path) -> Path:
        """The pod's checkpoint directory. An emptyDir lives and dies with the pod (a new attempt's
        pods start over); a PersistentVolumeClaim is one directory per claim in the namespace, shared
        by every pod that mounts it and kept across attempts: a stand-in for a ReadWriteMany volume
        (it cannot show a real volume's attach/detach, capacity or access-mode rules)."""
        claim = next((v["persistentVolumeClaim"]["claimName"] for v in pod["spec"].get("volumes") or []
                      if v.get("name") == CHECKPOINT_VOLUME and v.get("persistentVolumeClaim")), None)
        where = self.workdir / pod["metadata"]["namespace"] / "pvc" / claim if claim else home / "checkpoints"
        where.mkdir(parents=True, exist_ok=True)
        return where

    def _spawn(self, record: PodRecord, pod: dict) -> None:
        container = pod["spec"]["containers"][0]
        meta = pod["metadata"]
        index = int((meta.get("annotations") or {}).get(contract.JOB_COMPLETION_INDEX_ANNOTATION, "0"))
        home = self.workdir / record.namespace / record.name
        home.mkdir(parents=True, exist_ok=True)
        checkpoints = self._checkpoint_dir(pod, home)
        rank0 = self._rank0_ip(pod) or record.ip

        def const(value: str) -> Callable[[str], str]:
            return lambda _pod_value: value
        local = {contract.ENV_MASTER_ADDR: const(rank0), contract.ENV_PET_MASTER_ADDR: const(rank0),
                 contract.ENV_CHECKPOINT_DIR: const(str(checkpoints))}
        pod_env = resolve_env(container, index=index, pod_name=record.name, namespace=record.namespace,
                              pod_metadata=meta, local=local, shell_env={}, pod_ip=record.ip)
        env = {k: v for k, v in os.environ.items() if k not in _POD_ONLY}
        env.update(pod_env)
        if index > 0 and env.get(contract.ENV_METRICS_PORT, "0") != "0":
            env[contract.ENV_METRICS_PORT] = str(_free_port())   # one network namespace for all pods here
        env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
                    contract.ENV_SUMMARY: str(home / "summary.json")})
        command = list(container.get("command") or [])
        if command and command[0] == TRAINER_COMMAND:
            command = local_trainer() + command[1:]
        record.log = home / "container.log"
        with open(record.log, "wb") as log:
            record.process = subprocess.Popen(command + list(container.get("args") or []), env=env,
                                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              cwd=home, start_new_session=True)

    def _rank0_ip(self, pod: dict) -> str | None:
        job = (pod["metadata"].get("labels") or {}).get("job-name")
        with self._lock:
            return next((r.ip for r in self.pods.values() if r.namespace == pod["metadata"]["namespace"]
                         and job and r.name.startswith(f"{job}-0-")), None)

    def _reap(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                records = [r for r in self.pods.values() if r.process is not None and not r.finished]
            for record in records:
                code = record.process.poll()
                if code is not None and not record.stopping:
                    self._report_exit(record, code if code >= 0 else 128 - code)
            time.sleep(0.2)

    def _report_exit(self, record: PodRecord, exit_code: int, reason: str | None = None,
                     message: str | None = None) -> None:
        if record.finished:
            return
        record.finished = True
        now = _now()
        terminated = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                      "finishedAt": now, "startedAt": now}
        if message:
            terminated["message"] = message[:1024]
        self._patch_status(record, {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "conditions": [{"type": t, "status": "False", "lastTransitionTime": now, "reason": "PodCompleted"}
                           for t in ("ContainersReady", "Ready")],
            "containerStatuses": [{"name": "trainer", "ready": False, "started": False, "restartCount": 0,
                                   "image": "", "imageID": "", "state": {"terminated": terminated}}]})

    def _delete(self, record: PodRecord, started: bool) -> None:
        """Graceful deletion: stop the container, report it Failed (as the kubelet does), remove it."""
        if record.stopping:
            return
        record.stopping = True
        self._kill(record)
        if started and not record.finished:
            record.stopping = False
            self._report_exit(record, 137, "Error", message="the pod was deleted")
            record.stopping = True
        self.rest.request("DELETE", f"/api/v1/namespaces/{record.namespace}/pods/{record.name}",
                          {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                           "preconditions": {"uid": record.uid}})

    def _kill(self, record: PodRecord) -> None:
        process = record.process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass

    def _patch_status(self, record: PodRecord, status: dict) -> None:
        code, payload = self.rest.request(
            "PATCH", f"/api/v1/namespaces/{record.namespace}/pods/{record.name}/status",
            {"metadata": {"uid": record.uid}, "status": status}, content_type="application/merge-patch+json")
        if code >= 400 and code != 404:
            self.errors.append(f"status of {record.name}: {code} {payload.get('message')}")

    # --- node heartbeats ---------------------------------------------------------------------------

    def _renew_lease(self, name: str) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": name, "namespace": "kube-node-lease"},
                 "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": _micro_now()}}
        code, _ = self.rest.request("PATCH", path, {"spec": lease["spec"]},
                                    content_type="application/merge-patch+json")
        if code == 404:
            self.rest.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease)

    def _renew_leases(self) -> None:
        while not self._stop.wait(self.lease_interval):
            for name in list(self.node_names):
                try:
                    self._renew_lease(name)
                except Exception as exc:
                    self.errors.append(f"lease {name}: {exc!r}")
