"""TrainingRun -> the Kubernetes objects that run it: one headless Service + one Indexed Job per attempt.

Pure functions: dicts in, dicts out, no API calls. The operator creates exactly what
render_children() returns, and `leap render` prints it, so what a user previews is what runs.
render_children() validates first (InvalidRun); the render_* helpers assume a valid run.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from leap_operator import api, names
from leap_operator.config import OperatorConfig
from leap_operator.validation import check_run, defaulted, parse_quantity
from leap_trainer import contract

CONTAINER = "trainer"
CHECKPOINT_VOLUME = "checkpoint"
SHM_VOLUME = "dshm"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
TPU_RESOURCE = "google.com/tpu"
TPU_ACCELERATOR_LABEL = "cloud.google.com/gke-tpu-accelerator"
TPU_TOPOLOGY_LABEL = "cloud.google.com/gke-tpu-topology"
TPU_NODEPOOL_LABEL = "cloud.google.com/gke-nodepool"  # one TPU slice is one GKE node pool
# The Job controller writes each pod's index into this annotation; the downward API turns it
# into env vars, so one pod template serves every rank.
INDEX_FIELD = f"metadata.annotations['{contract.JOB_COMPLETION_INDEX_ANNOTATION}']"
TRAINER_UID = 10001  # the non-root user of Leap's images (images/*/Dockerfile)


def service_name(run_name: str) -> str:
    return run_name


def job_name(run_name: str, attempt: int) -> str:
    # "-a<attempt>" keeps hostnames readable: <run>-a2-0 is attempt 2, worker 0.
    return f"{run_name}-a{attempt}"


def worker_hostnames(run: dict, attempt: int, config: OperatorConfig | None = None) -> list[str]:
    """Stable FQDNs of the workers, index order (pods get hostname <job>-<index> and subdomain <service>)."""
    config = config or OperatorConfig.from_env()
    meta = run["metadata"]
    name, namespace = meta["name"], meta.get("namespace") or "default"
    workers = api.resolved_workers(run["spec"])
    return [f"{job_name(name, attempt)}-{i}.{service_name(name)}.{namespace}.svc.{config.cluster_domain}"
            for i in range(workers)]


def labels(run_name: str, attempt: int | None = None) -> dict[str, str]:
    out = {
        names.LABEL_NAME: "leap",
        names.LABEL_INSTANCE: run_name,
        names.LABEL_COMPONENT: "worker",
        names.LABEL_MANAGED_BY: names.MANAGER,
        names.LABEL_PART_OF: "leap",
        names.LABEL_RUN: run_name,
    }
    if attempt is not None:
        out[names.LABEL_ATTEMPT] = str(attempt)
    return out


def owner_references(run: dict) -> list[dict]:
    meta = run.get("metadata") or {}
    if not meta.get("uid"):
        return []
    return [{"apiVersion": names.API_VERSION, "kind": names.KIND, "name": meta["name"], "uid": meta["uid"],
             "controller": True, "blockOwnerDeletion": True}]


def _metadata(run: dict, name: str, object_labels: dict) -> dict:
    meta = {"name": name, "namespace": run["metadata"].get("namespace") or "default", "labels": object_labels}
    owners = owner_references(run)
    if owners:
        meta["ownerReferences"] = owners
    return meta


def _comm_port(framework: str) -> tuple[str, int]:
    return ("torch-rdzv", contract.DEFAULT_MASTER_PORT) if framework == "pytorch" else ("tf-grpc", contract.DEFAULT_TF_PORT)


def render_service(run: dict) -> dict:
    run = defaulted(run)
    name = run["metadata"]["name"]
    port_name, port = _comm_port(run["spec"]["framework"])
    metrics_port = run["spec"]["metrics"]["port"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(run, service_name(name), labels(name)),
        "spec": {
            # Headless: DNS gives each pod <hostname>.<service>; publishNotReadyAddresses lets
            # workers find each other before any of them is Ready (they have no probes).
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {names.LABEL_RUN: name},
            "ports": [
                {"name": port_name, "port": port, "targetPort": port, "protocol": "TCP"},
                {"name": "metrics", "port": metrics_port, "targetPort": metrics_port, "protocol": "TCP"},
            ],
        },
    }


def _env(name: str, value: Any) -> dict:
    return {"name": name, "value": str(value)}


def _index_env(name: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": INDEX_FIELD}}}


def render_env(run: dict, attempt: int, config: OperatorConfig) -> list[dict]:
    spec, meta = run["spec"], run["metadata"]
    acc_type = spec["accelerator"]["type"]
    framework = spec["framework"]
    hosts = worker_hostnames(run, attempt, config)
    nnodes = len(hosts)
    nproc = api.resolved_procs_per_worker(spec)
    _, comm_port = _comm_port(framework)
    env = [
        _env(contract.ENV_RUN, meta["name"]),
        _env(contract.ENV_NAMESPACE, meta.get("namespace") or "default"),
        _env(contract.ENV_ATTEMPT, attempt),
        _env(contract.ENV_FRAMEWORK, framework),
        _env(contract.ENV_ACCELERATOR, acc_type),
        _env(contract.ENV_METRICS_PORT, spec["metrics"]["port"]),
        _env(contract.ENV_CHECKPOINT_DIR, config.checkpoint_mount_path),
        _env(contract.ENV_CHECKPOINT_EVERY, spec["checkpoint"]["everySteps"]),
        _index_env(contract.ENV_WORKER_INDEX),
        _env(contract.ENV_WORKER_HOSTS, ",".join(f"{h}:{comm_port}" for h in hosts)),
    ]
    if framework == "pytorch":
        env += [
            _env(contract.ENV_MASTER_ADDR, hosts[0]),
            _env(contract.ENV_MASTER_PORT, contract.DEFAULT_MASTER_PORT),
            _env(contract.ENV_NNODES, nnodes),
            _index_env(contract.ENV_NODE_RANK),
            # One process per pod until leap-train (or torchrun) starts NPROC_PER_NODE local
            # processes and sets RANK = NODE_RANK * NPROC_PER_NODE + LOCAL_RANK for each.
            _index_env(contract.ENV_RANK),
            _env(contract.ENV_NPROC_PER_NODE, nproc),
            _env(contract.ENV_WORLD_SIZE, nnodes * nproc),
            _env(contract.ENV_PET_MASTER_ADDR, hosts[0]),
            _env(contract.ENV_PET_MASTER_PORT, contract.DEFAULT_MASTER_PORT),
            _env(contract.ENV_PET_NNODES, nnodes),
            _index_env(contract.ENV_PET_NODE_RANK),
            _env(contract.ENV_PET_NPROC_PER_NODE, nproc),
        ]
    if acc_type == "google-tpu":
        # Set by Leap itself, so multi-host slices work without GKE's TPU webhook (which only
        # injects these for JobSet/Indexed Jobs it recognises).
        env += [
            _index_env(contract.ENV_TPU_WORKER_ID),
            _env(contract.ENV_TPU_WORKER_HOSTNAMES, ",".join(hosts)),
            # The TPU generation, for leap-train's peak FLOP/s (MFU) where GKE sets no TPU_ACCELERATOR_TYPE.
            _env(contract.ENV_TPU_TYPE, spec["accelerator"]["tpu"]["type"]),
        ]
    env += spec.get("env") or []
    return env


def render_args(spec: dict) -> tuple[list[str], list[str]]:
    """(command, args) of the trainer container."""
    if spec.get("command"):
        return list(spec["command"]), list(spec.get("args") or [])
    w = spec["workload"]
    args = ["--framework", spec["framework"], "--workload", w["kind"], "--model", w["model"],
            "--dataset", w["dataset"], "--epochs", str(w["epochs"]), "--batch-size", str(w["batchSize"]),
            "--lr", _num(w["learningRate"])]
    if w.get("samples"):
        args += ["--samples", str(w["samples"])]
    if w["kind"] == "distillation":
        d = {**api.Distillation().model_dump(), **(w.get("distillation") or {})}
        args += ["--teacher", d["teacher"], "--temperature", _num(d["temperature"]), "--alpha", _num(d["alpha"])]
    return ["leap-train"], args


def _num(value: float) -> str:
    return repr(float(value))  # 4 -> '4.0', 0.001 -> '0.001': exact and unambiguous


def render_resources(spec: dict, config: OperatorConfig) -> dict:
    extra = spec.get("resources") or {}
    requests = {"cpu": config.default_cpu_request, "memory": config.default_memory_request}
    requests.update({k: str(v) for k, v in (extra.get("requests") or {}).items()})
    limits = {k: str(v) for k, v in (extra.get("limits") or {}).items()}
    acc = spec["accelerator"]
    if acc["type"] == "nvidia-gpu":
        limits[GPU_RESOURCE] = str(acc.get("count") or 1)
    elif acc["type"] == "google-tpu":
        chips = str(api.tpu_slice(acc["tpu"]["type"], acc["tpu"]["topology"])["chipsPerHost"])
        requests[TPU_RESOURCE] = chips
        limits[TPU_RESOURCE] = chips
    # A request above a user-given limit would be rejected by the API server; the limit wins.
    for key in ("cpu", "memory"):
        if key in limits and key not in (extra.get("requests") or {}):
            requests[key] = limits[key] if _smaller(limits[key], requests[key]) else requests[key]
    out = {"requests": requests}
    if limits:
        out["limits"] = limits
    return out


def _smaller(a: str, b: str) -> bool:
    return parse_quantity(a) < parse_quantity(b)


def _placement(spec: dict) -> tuple[dict, list[dict]]:
    scheduling = spec.get("scheduling") or {}
    selector = dict(scheduling.get("nodeSelector") or {})
    tolerations = [dict(t) for t in scheduling.get("tolerations") or []]
    acc = spec["accelerator"]
    if acc["type"] == "nvidia-gpu":
        if acc.get("product"):
            selector[GPU_PRODUCT_LABEL] = acc["product"]
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    elif acc["type"] == "google-tpu":
        selector[TPU_ACCELERATOR_LABEL] = acc["tpu"]["type"]
        selector[TPU_TOPOLOGY_LABEL] = acc["tpu"]["topology"]
        tolerations.append({"key": TPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return selector, tolerations


def render_pod_template(run: dict, attempt: int, config: OperatorConfig) -> dict:
    spec, name = run["spec"], run["metadata"]["name"]
    framework = spec["framework"]
    acc_type = spec["accelerator"]["type"]
    command, args = render_args(spec)
    metrics_port = spec["metrics"]["port"]
    nproc = api.resolved_procs_per_worker(spec)
    port_name, comm_port = _comm_port(framework)
    ports = [{"name": port_name, "containerPort": comm_port, "protocol": "TCP"},
             {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"}]
    # Local rank r serves metrics on port + r (see contract.ENV_METRICS_PORT).
    ports += [{"name": f"metrics-{r}", "containerPort": metrics_port + r, "protocol": "TCP"} for r in range(1, nproc)]

    claim = spec["checkpoint"].get("claimName")
    volumes = [{"name": CHECKPOINT_VOLUME,
                **({"persistentVolumeClaim": {"claimName": claim}} if claim else {"emptyDir": {}})}]
    mounts = [{"name": CHECKPOINT_VOLUME, "mountPath": config.checkpoint_mount_path}]
    if acc_type == "nvidia-gpu":
        # NCCL and DataLoader workers exchange tensors through /dev/shm; the runtime's 64Mi is too small.
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}})
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})

    container = {
        "name": CONTAINER,
        "image": spec.get("image") or config.default_image(framework, acc_type),
        "imagePullPolicy": config.image_pull_policy,
        "command": command,
        "args": args,
        "env": render_env(run, attempt, config),
        "ports": ports,
        "resources": render_resources(spec, config),
        "volumeMounts": mounts,
        # A failed trainer's last log lines become its termination message, which the run's
        # status quotes (status.config_error_message).
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # Pod Security "restricted". TPUs need no exception on GKE >= 1.28 (older versions
        # required privileged containers for TPU device access; Leap does not support them).
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    selector, tolerations = _placement(spec)
    pod_spec: dict[str, Any] = {
        "subdomain": service_name(name),
        "restartPolicy": "Never",
        # Training pods never call the Kubernetes API: no token, no extra RBAC.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            # The checkpoint volume: chown it only when its root is not ours yet, not on every start.
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if selector:
        pod_spec["nodeSelector"] = selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    affinity = _one_slice_affinity(spec, name, attempt)
    if affinity:
        pod_spec["affinity"] = affinity
    scheduling = spec.get("scheduling") or {}
    if scheduling.get("schedulerName"):
        pod_spec["schedulerName"] = scheduling["schedulerName"]
    if scheduling.get("priorityClassName"):
        pod_spec["priorityClassName"] = scheduling["priorityClassName"]
    return {
        "metadata": {
            "labels": labels(name, attempt),
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(metrics_port),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": pod_spec,
    }


def _one_slice_affinity(spec: dict, name: str, attempt: int) -> dict | None:
    """A multi-host TPU gang must land on one slice: GKE makes each slice a node pool, and two
    pools of the same type and topology would otherwise each get part of the gang, whose
    rendezvous then hangs. As JobSet's exclusive placement does: every pod of the attempt goes
    to the node pool of its first pod (pod affinity to its own gang), and to no pool another
    run's gang holds (anti-affinity)."""
    if spec["accelerator"]["type"] != "google-tpu" or api.resolved_workers(spec) < 2:
        return None
    own = {"matchLabels": {names.LABEL_RUN: name, names.LABEL_ATTEMPT: str(attempt)}}
    others = {"matchExpressions": [{"key": names.LABEL_RUN, "operator": "Exists"},
                                   {"key": names.LABEL_RUN, "operator": "NotIn", "values": [name]}]}
    return {
        "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": own, "topologyKey": TPU_NODEPOOL_LABEL}]},
        "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": others, "topologyKey": TPU_NODEPOOL_LABEL}]},
    }


def render_job(run: dict, attempt: int = 1, config: OperatorConfig | None = None) -> dict:
    config = config or OperatorConfig.from_env()
    run = defaulted(run)
    spec, name = run["spec"], run["metadata"]["name"]
    workers = api.resolved_workers(spec)
    queue = (spec.get("scheduling") or {}).get("queueName")
    job_labels = labels(name, attempt)
    if queue:
        job_labels[names.KUEUE_QUEUE_LABEL] = queue
    job_spec: dict[str, Any] = {
        "completions": workers,
        "parallelism": workers,
        "completionMode": "Indexed",
        # Leap restarts the whole gang itself (a new Job per attempt): a lone replacement pod
        # cannot rejoin a torch.distributed or TPU rendezvous, so the Job must not retry pods.
        "backoffLimit": 0,
        # A trainer that refuses its configuration (contract.EXIT_CONFIG) fails the Job for good:
        # the Failed condition's reason PodFailurePolicy tells the operator not to restart the gang.
        "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
            "containerName": CONTAINER, "operator": "In", "values": [contract.EXIT_CONFIG]}}]},
        # Kueue admits a queued Job by unsuspending it, so a queued Job is created suspended.
        "suspend": bool(spec["runPolicy"]["suspend"] or queue),
        "template": render_pod_template(run, attempt, config),
    }
    # No Job activeDeadlineSeconds: the run's deadline spans attempts and may be raised while
    # the run runs, so the operator alone keeps it (a Job's own clock restarts per attempt).
    metadata = _metadata(run, job_name(name, attempt), job_labels)
    metadata["annotations"] = {names.ANNOTATION_SHAPE: shape_hash(run)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": job_spec,
    }


def shape_hash(run: dict) -> str:
    """A digest of what shapes the run's pods (its spec less runPolicy, which never does).

    The Job carries it, so a run edited while suspended is recognised on resume: a Job's pod
    template is immutable, and the new shape needs a new Job (see status.compute_status)."""
    spec = {k: v for k, v in defaulted(run)["spec"].items() if k != "runPolicy"}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def render_children(run: dict, attempt: int = 1, config: OperatorConfig | None = None) -> list[dict]:
    """[Service, Job] for this attempt of the run. Raises InvalidRun (with .problems) for a run
    validate_run() rejects, so a caller never creates half-formed objects."""
    config = config or OperatorConfig.from_env()
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1 (got {attempt})")
    check_run(run, config=config)
    return [render_service(run), render_job(run, attempt, config)]
