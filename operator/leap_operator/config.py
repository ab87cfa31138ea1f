"""Operator configuration: default trainer images and pod defaults, overridable by env vars.

The Helm chart sets these env vars on the operator Deployment; ENV_VARS below is the one list
of their names (the chart's tests and docs read it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Mapping

from leap_operator import __version__
from leap_trainer import contract

DEFAULT_REGISTRY = "ghcr.io/leap-dev"
DEFAULT_TAG = __version__

# (framework, accelerator) -> image name, one per images/<name>/Dockerfile. The CUDA PyTorch image
# also runs on CPU nodes, and the TPU TensorFlow image on CPU. Missing pairs (PyTorch on TPU needs
# torch_xla; TensorFlow on GPU) have no default: such runs must name spec.image (validation says so).
IMAGE_NAMES: dict[tuple[str, str], str] = {
    ("pytorch", "cpu"): "leap-torch-gpu",
    ("pytorch", "nvidia-gpu"): "leap-torch-gpu",
    ("tensorflow", "cpu"): "leap-tf-tpu",
    ("tensorflow", "google-tpu"): "leap-tf-tpu",
}

# Env var names the operator reads (all in one place).
ENV_IMAGE_REGISTRY = "LEAP_IMAGE_REGISTRY"        # registry/org of the default images
ENV_IMAGE_TAG = "LEAP_IMAGE_TAG"                  # tag of the default images
ENV_IMAGE_PULL_POLICY = "LEAP_IMAGE_PULL_POLICY"  # IfNotPresent | Always | Never
ENV_DEFAULT_CPU = "LEAP_DEFAULT_CPU_REQUEST"      # per worker, when spec.resources omits cpu
ENV_DEFAULT_MEMORY = "LEAP_DEFAULT_MEMORY_REQUEST"
ENV_CLUSTER_DOMAIN = "LEAP_CLUSTER_DOMAIN"        # for pod FQDNs (MASTER_ADDR, worker hosts)
ENV_CHECKPOINT_MOUNT = "LEAP_CHECKPOINT_MOUNT_PATH"
ENV_SHM_SIZE = "LEAP_SHM_SIZE"                    # /dev/shm size on GPU pods (NCCL, DataLoader)


def image_env_var(framework: str, accelerator: str) -> str:
    """LEAP_IMAGE_TORCH_GPU, LEAP_IMAGE_TF_TPU, ...: a full image reference overriding one default."""
    fw = {"pytorch": "TORCH", "tensorflow": "TF"}[framework]
    return f"LEAP_IMAGE_{fw}_{accelerator.split('-')[-1].upper()}"


ENV_VARS: tuple[str, ...] = (
    ENV_IMAGE_REGISTRY, ENV_IMAGE_TAG, ENV_IMAGE_PULL_POLICY, ENV_DEFAULT_CPU, ENV_DEFAULT_MEMORY,
    ENV_CLUSTER_DOMAIN, ENV_CHECKPOINT_MOUNT, ENV_SHM_SIZE,
    *(image_env_var(fw, acc) for fw, acc in IMAGE_NAMES),
)


@dataclass(frozen=True)
class OperatorConfig:
    images: Mapping[tuple[str, str], str] = field(default_factory=lambda: {
        key: f"{DEFAULT_REGISTRY}/{name}:{DEFAULT_TAG}" for key, name in IMAGE_NAMES.items()})
    image_pull_policy: str = "IfNotPresent"
    default_cpu_request: str = "1"
    default_memory_request: str = "2Gi"
    cluster_domain: str = "cluster.local"
    checkpoint_mount_path: str = contract.DEFAULT_CHECKPOINT_DIR
    shm_size: str = "8Gi"

    def default_image(self, framework: str, accelerator: str) -> str | None:
        return self.images.get((framework, accelerator))

    def with_overrides(self, **changes) -> "OperatorConfig":
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "OperatorConfig":
        env = os.environ if environ is None else environ
        base = cls()

        def get(name: str, default: str) -> str:
            return env.get(name) or default  # an empty value (e.g. from a Helm default) means unset

        registry = get(ENV_IMAGE_REGISTRY, DEFAULT_REGISTRY).rstrip("/")
        tag = get(ENV_IMAGE_TAG, DEFAULT_TAG)
        return cls(
            images={key: get(image_env_var(*key), f"{registry}/{name}:{tag}") for key, name in IMAGE_NAMES.items()},
            image_pull_policy=get(ENV_IMAGE_PULL_POLICY, base.image_pull_policy),
            default_cpu_request=get(ENV_DEFAULT_CPU, base.default_cpu_request),
            default_memory_request=get(ENV_DEFAULT_MEMORY, base.default_memory_request),
            cluster_domain=get(ENV_CLUSTER_DOMAIN, base.cluster_domain),
            checkpoint_mount_path=get(ENV_CHECKPOINT_MOUNT, base.checkpoint_mount_path),
            shm_size=get(ENV_SHM_SIZE, base.shm_size),
        )
