"""The rendered Job -> one local process plan per completion index.

Each worker gets exactly its pod's env (resolved as the kubelet would), with the substitutions
that make one machine stand in for a cluster: 127.0.0.1 for pod hostnames, free ports for the
rendezvous, TensorFlow workers and metrics, the run directory for checkpoints, the local
`leap-train` for the image's entrypoint, and the accelerator this machine really has.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from leap_operator import api
from leap_operator.local.devices import CPU, GPU, TPU, DeviceChoice
from leap_operator.local.podenv import LOCALHOST, expand_all, resolve_env
from leap_operator.local.ports import PortPicker
from leap_operator.local.rundir import RunDir
from leap_trainer import contract

TRAINER_COMMAND = "leap-train"

# Variables a pod starts without: inherited from this shell they would confuse the workers
# (e.g. `leap run` started from inside a torchrun job).
_POD_ONLY = {value for name, value in vars(contract).items() if name.startswith("ENV_")} | {
    "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "CUDA_VISIBLE_DEVICES"}


@dataclass
class WorkerPlan:
    index: int
    argv: list[str]
    env: dict[str, str]            # the full process environment: this shell's, then the pod's
    metrics_ports: list[int]       # one per local process (local rank)
    log_path: Path
    pid_path: Path
    summary_path: Path
    label: str = field(default="")
    metrics_wanted: int | None = None   # spec.metrics.port + this worker's first local rank, when that was taken

    def __post_init__(self):
        self.label = self.label or f"worker {self.index}"


def local_trainer() -> list[str]:
    """The `leap-train` of this Python environment (the one `leap` itself runs in)."""
    beside = Path(sys.executable).with_name(TRAINER_COMMAND)
    if beside.exists():
        return [str(beside)]
    found = shutil.which(TRAINER_COMMAND)
    return [found] if found else [sys.executable, "-m", "leap_trainer.cli"]


def _local_tf_config(hosts: list[str]) -> Callable[[str], str]:
    def rewrite(value: str) -> str:
        try:
            config = json.loads(value)
            config.setdefault("cluster", {})["worker"] = hosts
            return json.dumps(config)
        except (ValueError, AttributeError):
            return value  # not TF_CONFIG JSON: leave the user's value alone
    return rewrite


def _const(value: str) -> Callable[[str], str]:
    return lambda _pod_value: value


def _visible_gpus(device: DeviceChoice, index: int, per_worker: int, workers: int) -> str | None:
    if device.used == CPU:
        return ""  # a CPU pod sees no GPU, whatever this machine has
    if device.used == GPU and device.gpus >= per_worker * workers:
        return ",".join(str(g) for g in range(index * per_worker, (index + 1) * per_worker))
    return None  # fewer GPUs than asked: every worker sees all of them


def build_plans(run: dict, job: dict, attempt: int, run_dir: RunDir, device: DeviceChoice, ports: PortPicker,
                shell_env: Mapping[str, str] | None = None) -> list[WorkerPlan]:
    """`run` is the defaulted TrainingRun, `job` the Job render_children made for this attempt."""
    shell_env = dict(os.environ if shell_env is None else shell_env)
    spec = run["spec"]
    framework = spec["framework"]
    workers = int(job["spec"]["completions"])
    procs = api.resolved_procs_per_worker(spec)
    gpus_per_worker = int(spec["accelerator"].get("count") or 1)
    template = job["spec"]["template"]
    container = template["spec"]["containers"][0]
    namespace = job["metadata"].get("namespace") or "default"

    master_port = ports.one()
    comm_ports = [master_port] + [ports.one() for _ in range(workers - 1)] if framework == "pytorch" \
        else [ports.one() for _ in range(workers)]
    hosts = [f"{LOCALHOST}:{port}" for port in comm_ports]
    # spec.metrics.port + local rank, as in the pod; workers share this host, so worker i starts
    # at port + i x procs. A port already taken moves that worker's block to free ports.
    wanted = [int(spec["metrics"]["port"]) + index * procs for index in range(workers)]
    metrics_bases = [ports.block_at(want, procs) or ports.block(procs) for want in wanted]

    base_env = {k: v for k, v in shell_env.items() if k not in _POD_ONLY}
    base_env["PYTHONUNBUFFERED"] = "1"  # logs and the failure tail stay current

    plans = []
    for index in range(workers):
        local = {
            contract.ENV_MASTER_ADDR: _const(LOCALHOST),
            contract.ENV_PET_MASTER_ADDR: _const(LOCALHOST),
            contract.ENV_MASTER_PORT: _const(str(master_port)),
            contract.ENV_PET_MASTER_PORT: _const(str(master_port)),
            contract.ENV_WORKER_HOSTS: _const(",".join(hosts)),
            contract.ENV_TF_CONFIG: _local_tf_config(hosts),
            contract.ENV_TPU_WORKER_HOSTNAMES: _const(",".join([LOCALHOST] * workers)),
            contract.ENV_METRICS_PORT: _const(str(metrics_bases[index])),
            contract.ENV_CHECKPOINT_DIR: _const(str(run_dir.checkpoints)),
            contract.ENV_ACCELERATOR: _const(device.used),
        }
        pod_name = f"{job['metadata']['name']}-{index}"
        pod_env = resolve_env(container, index=index, pod_name=pod_name, namespace=namespace,
                              pod_metadata=template.get("metadata") or {}, local=local, shell_env=shell_env)
        if device.used != TPU:
            # The trainer takes these as "this is a TPU host"; a TPU run allowed on CPU drops them.
            for name in (contract.ENV_TPU_WORKER_ID, contract.ENV_TPU_WORKER_HOSTNAMES):
                pod_env.pop(name, None)
        pod_env[contract.ENV_SUMMARY] = str(run_dir.worker_summary(attempt, index))
        env = {**base_env, **pod_env}
        if device.used == CPU and workers > 1 and "OMP_NUM_THREADS" not in env:
            # Pods of a cluster each have a node's cores; here the workers share this machine's.
            # A thread per core in every worker would oversubscribe the CPU several times over.
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (workers * procs)))
        visible = _visible_gpus(device, index, gpus_per_worker, workers)
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        command = list(container.get("command") or [])
        if command and command[0] == TRAINER_COMMAND:
            command = local_trainer() + command[1:]
        argv = expand_all(command + list(container.get("args") or []), env)
        plans.append(WorkerPlan(
            index=index, argv=argv, env=env,
            metrics_ports=[metrics_bases[index] + r for r in range(procs)],
            log_path=run_dir.log(attempt, index), pid_path=run_dir.pid_file(attempt, index),
            summary_path=run_dir.worker_summary(attempt, index),
            metrics_wanted=wanted[index] if metrics_bases[index] != wanted[index] else None))
    return plans
