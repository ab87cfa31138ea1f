"""Which tf.distribute strategy a TensorFlow run uses, decided from its environment.

`choose_strategy` is a pure function of the environment and a few local facts (GPU count,
TPU device files), so the decision is unit-tested with plain dicts; `make_strategy` turns
the decision into TensorFlow objects and is the only part that needs TensorFlow.

Order of preference:
1. TPUStrategy when this host has a TPU (Cloud TPU VM / GKE TPU pod of a single-host slice) or
   names a remote one; a multi-host slice is refused (StrategyConfigError).
2. MultiWorkerMirroredStrategy when TF_CONFIG lists several workers. Without TF_CONFIG it is
   built from LEAP_WORKER_HOSTS + LEAP_WORKER_INDEX, which the operator renders.
3. MirroredStrategy when this host has several GPUs.
4. TensorFlow's default strategy (one device) otherwise.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from leap_trainer import contract

TPU = "tpu"
MULTI_WORKER = "multi-worker"
MIRRORED = "mirrored"
DEFAULT = "default"

# Variables TPUClusterResolver() itself reads to find a TPU by name (TPU Node architecture);
# when one is set the resolver is built without arguments and resolves it.
TPU_NAME_VARIABLES = ("TPU_NAME", "KUBE_GOOGLE_CLOUD_TPU_ENDPOINTS", "TPU_CONFIG")
# Device files of a TPU attached to this host (TPU VM v4 and later, GKE TPU node): /dev/accel0..N.
# (v2/v3 VMs expose /dev/vfio/<n>, which GPU passthrough hosts have too, so those rely on the
# TPU_* variables or LEAP_ACCELERATOR instead.)
TPU_DEVICE_GLOBS = ("/dev/accel[0-9]*",)
LEAP_TPU_ACCELERATOR = "google-tpu"
TPU_LOAD_LIBRARY = "TPU_LOAD_LIBRARY"  # read by tensorflow-tpu at import: 0 = do not load libtpu


class StrategyConfigError(ValueError):
    """The environment asks for a distributed run but describes it inconsistently."""


@dataclass(frozen=True)
class StrategyPlan:
    kind: str                                # one of TPU, MULTI_WORKER, MIRRORED, DEFAULT
    reason: str                              # one line, logged at start-up
    tpu: str | None = None                   # TPUClusterResolver(tpu=...): "local" or None (named by env)
    tf_config: dict[str, Any] | None = None  # the cluster spec MultiWorkerMirroredStrategy reads
    tf_config_from_leap: bool = False        # True when built from LEAP_WORKER_* (must be exported)
    workers: int = 1
    worker_index: int = 0
    gpus: int = 0

    @property
    def is_chief(self) -> bool:
        """The worker that writes checkpoints and the summary (index 0, or TF_CONFIG's chief)."""
        if self.tf_config is None:
            return self.worker_index == 0
        task = self.tf_config.get("task", {})
        if "chief" in self.tf_config.get("cluster", {}):
            return task.get("type") == "chief"
        return task.get("type", "worker") == "worker" and int(task.get("index", 0)) == 0


def tpu_target(env: Mapping[str, str], *, tpu_devices: bool = False) -> tuple[str | None, str] | None:
    """Whether this process should use a TPU: None if not, else (TPUClusterResolver tpu=..., reason)."""
    tpu_named = next((name for name in TPU_NAME_VARIABLES if env.get(name)), None)
    if tpu_named:
        return None, f"TPU named by {tpu_named}"
    if tpu_devices:
        return "local", "TPU device files on this host"
    if env.get(contract.ENV_TPU_WORKER_ID) is not None or env.get(contract.ENV_TPU_WORKER_HOSTNAMES):
        return "local", f"{contract.ENV_TPU_WORKER_ID}/{contract.ENV_TPU_WORKER_HOSTNAMES} set (GKE TPU pod)"
    if env.get(contract.ENV_ACCELERATOR) == LEAP_TPU_ACCELERATOR:
        return "local", f"{contract.ENV_ACCELERATOR}={LEAP_TPU_ACCELERATOR}"
    return None


def has_tpu_device_files() -> bool:
    return any(glob.glob(pattern) for pattern in TPU_DEVICE_GLOBS)


def keep_libtpu_unloaded_without_tpu(environ: dict[str, str] | None = None, *, tpu_devices: bool | None = None) -> None:
    """Call before TensorFlow is imported. The TPU build of TensorFlow (the tf-tpu image) loads
    libtpu on import, and on a host without a TPU libtpu then retries the GCE metadata server
    for minutes. TPU_LOAD_LIBRARY=0 skips that, so the same image trains on CPU nodes; an
    explicit TPU_LOAD_LIBRARY is left alone. Stock TensorFlow ignores the variable."""
    environ = os.environ if environ is None else environ
    tpu_devices = has_tpu_device_files() if tpu_devices is None else tpu_devices
    if tpu_target(environ, tpu_devices=tpu_devices) is None:
        environ.setdefault(TPU_LOAD_LIBRARY, "0")


def choose_strategy(env: Mapping[str, str], *, gpu_count: int = 0, tpu_devices: bool = False) -> StrategyPlan:
    """Decide the strategy. `env` is os.environ (or a test dict); `gpu_count` the visible GPUs;
    `tpu_devices` whether TPU device files exist on this host."""
    tpu = tpu_target(env, tpu_devices=tpu_devices)
    if tpu is not None:
        worker_id = env.get(contract.ENV_TPU_WORKER_ID, "0").strip() or "0"
        if not worker_id.isdigit():
            raise StrategyConfigError(f"{contract.ENV_TPU_WORKER_ID}={worker_id!r} is not a non-negative integer")
        # TPUStrategy(TPUClusterResolver("local")) drives this host's chips only: on a multi-host
        # slice each host would train its own model, so refuse (the CRD refuses such runs too).
        hosts = [h for h in env.get(contract.ENV_TPU_WORKER_HOSTNAMES, "").split(",") if h.strip()]
        if len(hosts) > 1:
            raise StrategyConfigError(
                f"{contract.TF_MULTI_HOST_TPU_UNSUPPORTED}: {contract.ENV_TPU_WORKER_HOSTNAMES} lists {len(hosts)} "
                "hosts; use a single-host slice")
        return StrategyPlan(TPU, tpu[1], tpu=tpu[0], workers=1, worker_index=int(worker_id))

    tf_config, from_leap = _cluster_spec(env)
    if tf_config is not None:
        workers = _count_workers(tf_config)
        if workers > 1:
            task = tf_config.get("task", {})
            source = f"{contract.ENV_WORKER_HOSTS}+{contract.ENV_WORKER_INDEX}" if from_leap else contract.ENV_TF_CONFIG
            return StrategyPlan(
                MULTI_WORKER, f"{workers} workers from {source}",
                tf_config=tf_config, tf_config_from_leap=from_leap,
                workers=workers, worker_index=int(task.get("index", 0)), gpus=gpu_count,
            )

    if gpu_count > 1:
        return StrategyPlan(MIRRORED, f"{gpu_count} GPUs on this host", gpus=gpu_count)
    device = "1 GPU" if gpu_count == 1 else "CPU"
    return StrategyPlan(DEFAULT, f"single device ({device})", gpus=gpu_count)


def _cluster_spec(env: Mapping[str, str]) -> tuple[dict[str, Any] | None, bool]:
    """TF_CONFIG as a dict (from TF_CONFIG, else from LEAP_WORKER_HOSTS/INDEX), and whether built here."""
    raw = env.get(contract.ENV_TF_CONFIG, "").strip()
    if raw:
        try:
            spec = json.loads(raw)
        except json.JSONDecodeError as error:
            raise StrategyConfigError(
                f"{contract.ENV_TF_CONFIG} is not valid JSON ({error}); expected e.g. "
                '{"cluster": {"worker": ["host0:2222", "host1:2222"]}, "task": {"type": "worker", "index": 0}}'
            ) from None
        if not isinstance(spec, dict) or not isinstance(spec.get("cluster", {}), dict):
            raise StrategyConfigError(
                f"{contract.ENV_TF_CONFIG} must be a JSON object with a 'cluster' object; got {raw[:80]!r}"
            )
        return spec, False

    hosts_raw = env.get(contract.ENV_WORKER_HOSTS, "").strip()
    if not hosts_raw:
        return None, False
    hosts = [host.strip() for host in hosts_raw.split(",") if host.strip()]
    if len(hosts) <= 1:
        return None, False
    for host in hosts:
        if ":" not in host:
            raise StrategyConfigError(
                f"{contract.ENV_WORKER_HOSTS} entry {host!r} has no port; give host:port, "
                f"e.g. {host}:{contract.DEFAULT_TF_PORT}"
            )
    index_raw = env.get(contract.ENV_WORKER_INDEX, env.get(contract.ENV_JOB_COMPLETION_INDEX, "")).strip()
    if not index_raw:
        raise StrategyConfigError(
            f"{contract.ENV_WORKER_HOSTS} lists {len(hosts)} workers but {contract.ENV_WORKER_INDEX} is not set; "
            f"set it to this worker's position (0..{len(hosts) - 1})"
        )
    try:
        index = int(index_raw)
    except ValueError:
        raise StrategyConfigError(f"{contract.ENV_WORKER_INDEX}={index_raw!r} is not an integer") from None
    if not 0 <= index < len(hosts):
        raise StrategyConfigError(
            f"{contract.ENV_WORKER_INDEX}={index} is outside 0..{len(hosts) - 1} "
            f"({len(hosts)} hosts in {contract.ENV_WORKER_HOSTS})"
        )
    return {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}, True


def _count_workers(tf_config: Mapping[str, Any]) -> int:
    cluster = tf_config.get("cluster", {})
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def local_facts() -> dict[str, Any]:
    """The host facts choose_strategy needs, probed without initialising TensorFlow's runtime."""
    import tensorflow as tf

    return {"gpu_count": len(tf.config.list_physical_devices("GPU")), "tpu_devices": has_tpu_device_files()}


def make_strategy(plan: StrategyPlan, environ: dict[str, str] | None = None):
    """Create the tf.distribute strategy for `plan`. Call it before any other TensorFlow op:
    MultiWorkerMirroredStrategy must start its gRPC server before the runtime is initialised."""
    import tensorflow as tf

    environ = os.environ if environ is None else environ
    if plan.kind == TPU:
        # Attribute access on purpose: `from tensorflow.distribute import TPUStrategy` fails in TF 2.21.
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=plan.tpu)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as error:
            raise StrategyConfigError(
                f"a TPU was expected ({plan.reason}) but TensorFlow could not reach it: {error}. "
                "Use the tf-tpu image (tensorflow-tpu + libtpu) on a TPU node, or unset "
                f"{contract.ENV_ACCELERATOR}/TPU variables to train on CPU/GPU"
            ) from error
        return tf.distribute.TPUStrategy(resolver)
    if plan.kind == MULTI_WORKER:
        if plan.tf_config_from_leap:
            environ[contract.ENV_TF_CONFIG] = json.dumps(plan.tf_config)
        # RING all-reduce over gRPC works on CPU and GPU; NCCL is picked automatically with AUTO.
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO
        )
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if plan.kind == MIRRORED:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()
