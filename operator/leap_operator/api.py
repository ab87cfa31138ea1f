"""The `leap.dev/v1alpha1` TrainingRun API as pydantic models: the single source of truth.

crd.py turns these models into the CustomResourceDefinition (structural schema with defaults,
enums, bounds, patterns and CEL rules); validation.py checks objects against that CRD; render.py
reads the defaulted dicts. Nothing here imports kopf, torch or TensorFlow.

CEL rules live next to the fields they constrain (`x-kubernetes-validations` in
json_schema_extra) so a reader sees the shape and its rules together.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from leap_trainer import contract, specs
from leap_trainer.specs import MODEL_LAYERS

from leap_operator.goodput import KEEP_ATTEMPTS

# --- Small shared vocabularies --------------------------------------------------------------

FRAMEWORKS = ("pytorch", "tensorflow")
ACCELERATORS = ("cpu", "nvidia-gpu", "google-tpu")
WORKLOAD_KINDS = ("classifier", "distillation")
# The built-in models are the trainer's (leap_trainer.specs imports nothing heavy).
MODELS = tuple(MODEL_LAYERS)
DATASETS = ("digits", "synthetic")
PHASES = ("Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended")
# Phases in which the run's shape may still change: nothing runs yet, or the run is suspended.
EDITABLE_PHASES = ("Suspended",)

# Kubernetes name and label grammars (apimachinery's validation package).
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
TOPOLOGY = r"^\d+x\d+(x\d+)?$"
IMAGE = r"^[^\s]+$"
DATASET = rf"^({'|'.join(DATASETS)}|/.+\.npz)$"

# Run names become Service names (DNS-1035 labels) and prefixes of Job names and pod
# hostnames `<run>-a<attempt>-<index>` (63 characters at most), hence the bound.
MAX_RUN_NAME = 40

# Env var names Leap sets on every pod; a user value would silently break the rendezvous.
RESERVED_ENV = (
    contract.ENV_RUN, contract.ENV_NAMESPACE, contract.ENV_ATTEMPT, contract.ENV_FRAMEWORK,
    contract.ENV_ACCELERATOR, contract.ENV_METRICS_PORT, contract.ENV_CHECKPOINT_DIR,
    contract.ENV_CHECKPOINT_EVERY, contract.ENV_WORKER_INDEX, contract.ENV_WORKER_HOSTS,
    contract.ENV_MASTER_ADDR, contract.ENV_MASTER_PORT, contract.ENV_WORLD_SIZE, contract.ENV_RANK,
    contract.ENV_LOCAL_RANK, contract.ENV_NODE_RANK, contract.ENV_NNODES, contract.ENV_NPROC_PER_NODE,
    contract.ENV_PET_MASTER_ADDR, contract.ENV_PET_MASTER_PORT, contract.ENV_PET_NNODES,
    contract.ENV_PET_NODE_RANK, contract.ENV_PET_NPROC_PER_NODE, contract.ENV_TF_CONFIG,
    contract.ENV_TPU_WORKER_ID, contract.ENV_TPU_WORKER_HOSTNAMES, contract.ENV_JOB_COMPLETION_INDEX,
)


def _cel_list(values) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def rule(expr: str, message: str, *, field_path: str | None = None, reason: str | None = None,
         message_expression: str | None = None) -> dict:
    """One `x-kubernetes-validations` entry. fieldPath points the error at the offending field."""
    out: dict[str, Any] = {"rule": expr, "message": message}
    if message_expression:
        out["messageExpression"] = message_expression
    if field_path:
        out["fieldPath"] = field_path
    if reason:
        out["reason"] = reason
    return out


def rules(*items: dict) -> dict:
    return {"x-kubernetes-validations": list(items)}


class _Model(BaseModel):
    # Unknown fields are errors (like `kubectl apply`'s strict field validation).
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --- TPU facts --------------------------------------------------------------------------------
# GKE's TPU node pools: `cloud.google.com/gke-tpu-accelerator` names the TPU type and
# `cloud.google.com/gke-tpu-topology` the slice shape. Multi-host slices put 4 chips on each host
# (VM); a slice of at most `single_host_max` chips fits on one host with all chips (v5e/v6e 2x4 is
# the 8-chip ct5lp-hightpu-8t / ct6e-standard-8t machine; v4/v5p 2x2x1 is one 4-chip host).
# The CEL rule on spec and tpu_slice() below derive from this one table.
TPU_TYPES: dict[str, dict] = {
    "tpu-v5-lite-podslice": {"single_host_max": 8, "chips_per_host": 4,
                             "topologies": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")},
    "tpu-v6e-slice": {"single_host_max": 8, "chips_per_host": 4,
                      "topologies": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")},
    "tpu-v4-podslice": {"single_host_max": 4, "chips_per_host": 4,
                        "topologies": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8",
                                       "8x8x8", "8x8x12", "8x8x16", "8x16x16", "12x16x16", "16x16x16")},
    "tpu-v5p-slice": {"single_host_max": 4, "chips_per_host": 4,
                      "topologies": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8",
                                     "8x8x8", "8x8x16", "8x16x16", "16x16x16", "16x16x24")},
}


def tpu_slice(tpu_type: str, topology: str) -> dict:
    """{'chips', 'hosts', 'chipsPerHost'} of a GKE TPU slice."""
    chips = 1
    for part in topology.split("x"):
        chips *= int(part)
    facts = TPU_TYPES[tpu_type]
    if chips <= facts["single_host_max"]:
        return {"chips": chips, "hosts": 1, "chipsPerHost": chips}
    return {"chips": chips, "hosts": chips // facts["chips_per_host"], "chipsPerHost": facts["chips_per_host"]}


# Messages are built from string literals only: the API server's CEL cost estimator counts
# join() and string() as unbounded and refuses the whole CRD (seen on kube-apiserver 1.33).
def _cel_topologies_text() -> str:
    """CEL: the topologies of self.type as one string, e.g. '1x1, 2x2, 2x4, 4x4'."""
    chain = " : ".join(f"self.type == '{name}' ? '{', '.join(facts['topologies'])}'" for name, facts in TPU_TYPES.items())
    return f"({chain} : '')"


def _cel_tpu_hosts_text(tpu: str) -> str:
    """CEL: the host count of the slice `tpu` (a CEL expression for the TPU block) as a string."""
    chain = " : ".join(
        f"{tpu}.type == '{name}' ? {{" + ", ".join(f"'{t}': '{tpu_slice(name, t)['hosts']}'" for t in facts["topologies"])
        + f"}}[{tpu}.topology]" for name, facts in TPU_TYPES.items())
    return f"({chain} : '?')"


def _cel_first_present(values, present: str) -> str:
    """CEL: the first of `values` for which `present` (with {v} for the value) holds, as a string."""
    chain = " : ".join(f"{present.format(v=v)} ? '{v}'" for v in values)
    return f"({chain} : '')"


def single_host_topologies(tpu_type: str) -> tuple[str, ...]:
    """The topologies of `tpu_type` whose slice is one host (VM)."""
    return tuple(t for t in TPU_TYPES[tpu_type]["topologies"] if tpu_slice(tpu_type, t)["hosts"] == 1)


# TensorFlow trains on TPUs with TPUStrategy, which drives every chip of a slice from one client
# process. Google documents TensorFlow on multi-host slices only for Cloud TPU VMs created with a
# "-pod" TensorFlow runtime (which runs TensorFlow servers on the other hosts), not on GKE, where
# every host is a pod of its own; GKE's Multislice supports JAX and PyTorch; TPU7x (Ironwood) has no
# TensorFlow at all. So Leap runs TensorFlow on single-host slices only, and says so.
TF_MULTI_HOST_TPU_MESSAGE = (
    contract.TF_MULTI_HOST_TPU_UNSUPPORTED + ". Use a single-host slice: "
    + "; ".join(f"{name} {', '.join(single_host_topologies(name))}" for name in TPU_TYPES)
    + ". Multi-host slices remain open to your own program (framework: pytorch with spec.image and "
    "spec.command, e.g. PyTorch/XLA or JAX, which Google supports on multi-host GKE slices)."
)



def _cel_tpu_hosts_map() -> str:
    """CEL map literal {type: {topology: hosts}} generated from TPU_TYPES (so CEL and tpu_slice() agree)."""
    per_type = []
    for name, facts in TPU_TYPES.items():
        entries = ", ".join(f"'{topo}': {tpu_slice(name, topo)['hosts']}" for topo in facts["topologies"])
        per_type.append(f"'{name}': {{{entries}}}")
    return "{" + ", ".join(per_type) + "}"


# --- spec --------------------------------------------------------------------------------------

class Distillation(_Model):
    """Knowledge distillation: a teacher model is trained first, then the student learns from its softened outputs."""
    teacher: Literal[MODELS] = Field(specs.DISTILLATION_TEACHER, description=(
        f"Teacher model; should be larger than the student (workload.model). It trains {specs.TEACHER_EPOCH_FACTOR}x "
        "the workload's epochs on randomly shifted images."))
    temperature: float = Field(specs.DISTILLATION_TEMPERATURE, gt=0, le=100, description="Softmax temperature applied to teacher and student logits.")
    alpha: float = Field(specs.DISTILLATION_ALPHA, ge=0, le=1, description="Weight of the distillation loss; 1 - alpha weighs the hard-label loss.")


class Workload(_Model):
    """A built-in workload run by the image's `leap-train` entrypoint."""
    model_config = ConfigDict(json_schema_extra=rules(
        rule("self.kind == 'distillation' || !has(self.distillation)",
             "workload.distillation only applies to kind: distillation; remove it or set kind: distillation",
             field_path=".distillation"),
        rule("!has(self.distillation) || self.distillation.teacher != self.model",
             "workload.distillation.teacher must differ from workload.model (the student); use mlp-large as teacher for mlp",
             field_path=".distillation.teacher"),
    ))
    kind: Literal[WORKLOAD_KINDS] = Field("classifier", description="classifier trains one model; distillation trains a teacher, then distils it into the model.")
    model: Literal[MODELS] = Field("mlp", description="mlp (784-128-10) or mlp-large (784-512-256-10).")
    dataset: str = Field("digits", max_length=512, pattern=DATASET,
                         description="digits (shipped with the image), synthetic, or an absolute path to a .npz file in the pod.")
    samples: int | None = Field(None, ge=1, le=100_000_000, description="Limit the training set to this many samples (synthetic: generate this many).")
    epochs: int = Field(specs.DEFAULT_EPOCHS, ge=1, le=100_000, description="Passes over the training set.")
    batchSize: int = Field(64, ge=1, le=1_048_576, description="Batch size per process (per replica); the global batch is batchSize x world size.")
    learningRate: float = Field(specs.DEFAULT_LR, gt=0, le=10, description="Peak learning rate of Adam.")
    distillation: Distillation | None = Field(None, description="Distillation settings (kind: distillation only); defaults apply when omitted.")


class TPU(_Model):
    """A GKE TPU slice: the type and topology select the node pool; hosts and chips per host follow."""
    model_config = ConfigDict(json_schema_extra=rules(
        rule(f"self.topology in {_cel_tpu_hosts_map()}[self.type]",
             "accelerator.tpu.topology is not a slice GKE offers for this TPU type; pick one of its topologies (see docs/api.md)",
             message_expression=f"'accelerator.tpu.topology ' + self.topology + ' is not a ' + self.type + "
                                f"' slice; use one of ' + {_cel_topologies_text()}",
             field_path=".topology"),
    ))
    # maxLength bounds the API server's CEL cost estimate of the rules that print it.
    type: Literal[tuple(TPU_TYPES)] = Field(
        ..., description="GKE TPU accelerator (node label cloud.google.com/gke-tpu-accelerator).",
        json_schema_extra={"maxLength": 32})
    topology: str = Field(..., max_length=16, pattern=TOPOLOGY,
                          description="Slice topology, e.g. 2x4 or 4x4 (v5e/v6e) or 2x2x2 (v4/v5p) (node label cloud.google.com/gke-tpu-topology).")


class Accelerator(_Model):
    """What each worker computes on."""
    model_config = ConfigDict(json_schema_extra=rules(
        rule("self.type != 'google-tpu' || has(self.tpu)",
             "accelerator.tpu {type, topology} is required when accelerator.type is google-tpu",
             field_path=".tpu"),
        rule("self.type == 'google-tpu' || !has(self.tpu)",
             "accelerator.tpu is only allowed with accelerator.type google-tpu; remove it or set type: google-tpu",
             field_path=".tpu"),
        rule("self.type == 'nvidia-gpu' || !has(self.count)",
             "accelerator.count (GPUs per worker) only applies to nvidia-gpu; remove it (TPU chips per host come from tpu.topology)",
             field_path=".count"),
        rule("self.type == 'nvidia-gpu' || !has(self.product)",
             "accelerator.product only applies to nvidia-gpu; remove it",
             field_path=".product"),
    ))
    type: Literal[ACCELERATORS] = Field("cpu", description="cpu, nvidia-gpu or google-tpu.")
    count: int | None = Field(None, ge=1, le=16, description="GPUs per worker (nvidia-gpu only; default 1).")
    product: str | None = Field(None, max_length=63, pattern=LABEL_VALUE,
                                description="GPU product, e.g. NVIDIA-H100-80GB-HBM3: selects nodes labelled nvidia.com/gpu.product.")
    tpu: TPU | None = Field(None, description="The TPU slice (google-tpu only, required with it).")


def _int_or_string(description: str, **extra) -> Any:
    return WithJsonSchema({"x-kubernetes-int-or-string": True, "description": description, **extra})


Quantity = Annotated[Union[int, str], _int_or_string(
    "A Kubernetes quantity such as 500m, 2, 4Gi.",
    anyOf=[{"type": "integer"}, {"type": "string"}], pattern=QUANTITY, maxLength=64)]

class ResourceList(_Model):
    """Named resources (a typed core/v1 ResourceList: no free-form keys, so GPUs cannot sneak in here)."""
    cpu: Quantity | None = None
    memory: Quantity | None = None
    ephemeral_storage: Quantity | None = Field(None, alias="ephemeral-storage")


class Resources(_Model):
    """Extra compute resources per worker (on top of the operator's defaults); GPUs and TPUs come from spec.accelerator."""
    requests: ResourceList | None = Field(None, description="e.g. {cpu: '4', memory: 16Gi}; replaces the operator's default request.")
    limits: ResourceList | None = Field(None, description="e.g. {memory: 32Gi}.")


class KeySelector(_Model):
    name: str = Field(..., max_length=253, pattern=DNS1123_SUBDOMAIN, description="Name of the Secret or ConfigMap.")
    key: str = Field(..., max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key in it.")
    optional: bool | None = None


# The downward API fields core/v1 allows in a container's env (valid at Job creation, not later).
ENV_FIELD_PATHS = ("metadata.name", "metadata.namespace", "metadata.uid", "spec.nodeName",
                   "spec.serviceAccountName", "status.hostIP", "status.hostIPs", "status.podIP", "status.podIPs")
ENV_RESOURCES = ("limits.cpu", "limits.memory", "limits.ephemeral-storage",
                 "requests.cpu", "requests.memory", "requests.ephemeral-storage")
_LABEL_OR_ANNOTATION_PATH = r"^metadata\\.(labels|annotations)\\[.+\\]$"


class FieldSelector(_Model):
    model_config = ConfigDict(json_schema_extra=rules(
        rule(f"self.fieldPath in {_cel_list(ENV_FIELD_PATHS)} || self.fieldPath.matches('{_LABEL_OR_ANNOTATION_PATH}')",
             "fieldRef.fieldPath must be one the downward API offers to env: " + ", ".join(ENV_FIELD_PATHS)
             + ", metadata.labels['KEY'] or metadata.annotations['KEY']", field_path=".fieldPath"),
        rule("!has(self.apiVersion) || self.apiVersion == 'v1'", "fieldRef.apiVersion must be v1 (or omitted)",
             field_path=".apiVersion"),
    ))
    fieldPath: str = Field(..., max_length=256, description="e.g. metadata.name, status.podIP, spec.nodeName.")
    apiVersion: str | None = Field(None, max_length=64)


class ResourceFieldSelector(_Model):
    model_config = ConfigDict(json_schema_extra=rules(
        rule(f"self.resource in {_cel_list(ENV_RESOURCES)}",
             "resourceFieldRef.resource must be one of " + ", ".join(ENV_RESOURCES), field_path=".resource"),
    ))
    resource: str = Field(..., max_length=64, description="e.g. limits.memory.")
    containerName: str | None = Field(None, max_length=63)
    divisor: Annotated[Union[int, str], _int_or_string("Quantity divisor.", anyOf=[{"type": "integer"}, {"type": "string"}], pattern=QUANTITY, maxLength=64)] | None = None


class EnvVarSource(_Model):
    model_config = ConfigDict(json_schema_extra=rules(rule(
        "[has(self.secretKeyRef), has(self.configMapKeyRef), has(self.fieldRef), has(self.resourceFieldRef)].filter(x, x).size() == 1",
        "env[].valueFrom needs exactly one of secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef")))
    secretKeyRef: KeySelector | None = None
    configMapKeyRef: KeySelector | None = None
    fieldRef: FieldSelector | None = None
    resourceFieldRef: ResourceFieldSelector | None = None


class EnvVar(_Model):
    """An environment variable for the trainer container (like a core/v1 EnvVar)."""
    model_config = ConfigDict(json_schema_extra=rules(rule(
        "!(has(self.value) && has(self.valueFrom))",
        "env[] sets value or valueFrom, not both")))
    name: str = Field(..., min_length=1, max_length=256, pattern=ENV_NAME)
    value: str | None = Field(None, max_length=32768)
    valueFrom: EnvVarSource | None = None


class Toleration(_Model):
    """A core/v1 Toleration."""
    # What core/v1 validation refuses at Job (pod template) creation, caught here first.
    model_config = ConfigDict(json_schema_extra=rules(
        rule("!has(self.operator) || self.operator != 'Exists' || !has(self.value)",
             "a toleration with operator Exists must not set value; remove value or use operator Equal"),
        rule("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
             "tolerationSeconds only applies to effect NoExecute; set effect: NoExecute or remove tolerationSeconds",
             field_path=".tolerationSeconds"),
        rule("(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
             "a toleration without a key must use operator Exists (it then tolerates every taint); set key or operator: Exists",
             field_path=".operator"),
    ))
    key: str | None = Field(None, max_length=316, pattern=LABEL_KEY)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(None, max_length=63, pattern=LABEL_VALUE)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None


class Checkpoint(_Model):
    """Where built-in workloads save checkpoints, so a restarted attempt resumes instead of starting over."""
    claimName: str | None = Field(None, max_length=253, pattern=DNS1123_SUBDOMAIN,
                                  description="PersistentVolumeClaim mounted at the checkpoint directory (ReadWriteMany for several workers); without it an emptyDir is used and restarts start over.")
    everySteps: int = Field(500, ge=1, le=100_000_000, description="Save a checkpoint every this many optimizer steps.")


# Hang detection (operator/leap_operator/stall.py). The threshold is derived from the run's own
# step times: STALL_STEP_TIME_MULTIPLE x rank 0's mean step time, never below minSeconds.
STALL_ACTIONS = ("Report", "Restart")
DEFAULT_STALL_MIN_SECONDS = 300
STALL_STEP_TIME_MULTIPLE = 10
MIN_STALL_SECONDS = 5          # the least the schema allows (tests); under a minute risks false alarms
MAX_STALL_SECONDS = 7 * 86400
DEFAULT_MAX_PAUSE_SECONDS = 3600  # an hour-long evaluation or checkpoint write is long; a stuck one never ends


class StallDetection(_Model):
    """A run whose optimizer steps stop gets condition Stalled=True (hang detection)."""
    action: Literal[STALL_ACTIONS] = Field("Report", description=(
        "Report: condition Stalled=True, a Warning Event, status.reason Stalled and the operator's "
        "stall gauge (alert LeapTrainingProgressStalled); the run keeps running. Restart: the stalled "
        "attempt is also restarted as the next attempt (from its last checkpoint; counted in restarts "
        "and backoffLimit, reason Stalled)."))
    minSeconds: int = Field(DEFAULT_STALL_MIN_SECONDS, ge=MIN_STALL_SECONDS, le=MAX_STALL_SECONDS, description=(
        f"Floor of the threshold, which is {STALL_STEP_TIME_MULTIPLE} x rank 0's mean step time "
        "(leap_train_step_seconds) when that is longer."))
    timeoutSeconds: int | None = Field(None, ge=MIN_STALL_SECONDS, le=MAX_STALL_SECONDS, description=(
        "A fixed threshold instead of the derived one: seconds without an optimizer step (pauses the "
        "trainer announces not counted) before the run is Stalled."))
    maxPauseSeconds: int = Field(DEFAULT_MAX_PAUSE_SECONDS, ge=MIN_STALL_SECONDS, le=MAX_STALL_SECONDS, description=(
        "A pause the trainer announces (evaluation, a checkpoint write or restore) that lasts longer "
        "than this is a stall too: e.g. a checkpoint write stuck on its storage."))


class RunPolicy(_Model):
    """Restarts, deadlines, cleanup, suspension and hang detection (may change while running)."""
    backoffLimit: int = Field(3, ge=0, le=100, description="Gang restarts (new attempts) after a failed attempt before the run is Failed.")
    activeDeadlineSeconds: int | None = Field(None, ge=1, description="Fail the run (reason DeadlineExceeded) after this many seconds since it started.")
    ttlSecondsAfterFinished: int | None = Field(None, ge=0, description="Delete the run this many seconds after it Succeeded or Failed.")
    suspend: bool = Field(False, description="true removes the pods (the run is Suspended); false resumes it.")
    stallDetection: StallDetection = Field(default_factory=StallDetection, json_schema_extra={"default": {}},
                                           description="Hang detection and optional recovery.")


class Scheduling(_Model):
    """Where and how the pods are scheduled."""
    queueName: str | None = Field(None, max_length=63, pattern=LABEL_VALUE,
                                  description="Kueue LocalQueue: the Job gets label kueue.x-k8s.io/queue-name and starts suspended until Kueue admits it.")
    schedulerName: str | None = Field(None, max_length=253, pattern=DNS1123_SUBDOMAIN, description="e.g. volcano for gang scheduling.")
    priorityClassName: str | None = Field(None, max_length=253, pattern=DNS1123_SUBDOMAIN, description="PriorityClass of the pods.")
    nodeSelector: Annotated[dict[str, str], WithJsonSchema({
        "type": "object", "maxProperties": 32,
        "additionalProperties": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE},
        "description": "Extra node labels the pods require."})] | None = None
    tolerations: list[Toleration] | None = Field(None, max_length=32, description="Extra tolerations (core/v1 Toleration); Leap adds the GPU and TPU ones itself.")


class Metrics(_Model):
    """The trainer's Prometheus endpoint (scraped by Prometheus and by the operator for status.progress)."""
    port: int = Field(contract.DEFAULT_METRICS_PORT, ge=1024, le=65000,
                      description="Port of local rank 0; local rank r serves port + r.")


ProcsPerWorker = Annotated[Union[int, Literal["auto"]], _int_or_string(
    "Processes per worker: auto (one per GPU, else 1) or a number.", maxLength=8,
    **rules(rule("type(self) == string ? self == 'auto' : self >= 1",
                 "procsPerWorker must be auto or an integer >= 1")))]


_HOSTS = _cel_tpu_hosts_map()
_ENV_HAS = "self.env.exists(e, e.name == '{v}')"


def _spec_rules() -> dict:
    return rules(
        rule("has(self.workload) != has(self.command)",
             "set exactly one of spec.workload (a built-in workload) or spec.command (your own program)",
             field_path=".workload"),
        rule("!has(self.args) || has(self.command)",
             "spec.args needs spec.command (built-in workloads are configured with spec.workload)",
             field_path=".args"),
        rule("!has(self.workers) || self.accelerator.type != 'google-tpu' || !has(self.accelerator.tpu) || "
             f"!(self.accelerator.tpu.topology in {_HOSTS}[self.accelerator.tpu.type]) || "
             f"self.workers == {_HOSTS}[self.accelerator.tpu.type][self.accelerator.tpu.topology]",
             "spec.workers must equal the TPU slice's host count (one pod per TPU VM); omit workers to derive it from accelerator.tpu.topology",
             message_expression=f"'spec.workers must be ' + {_cel_tpu_hosts_text('self.accelerator.tpu')} + "
                                "', the number of hosts in a ' + self.accelerator.tpu.topology + ' ' + self.accelerator.tpu.type + "
                                "' slice; omit workers to derive it'",
             field_path=".workers"),
        rule("self.framework != 'tensorflow' || self.accelerator.type != 'google-tpu' || !has(self.accelerator.tpu) || "
             f"!(self.accelerator.tpu.topology in {_HOSTS}[self.accelerator.tpu.type]) || "
             f"{_HOSTS}[self.accelerator.tpu.type][self.accelerator.tpu.topology] == 1",
             TF_MULTI_HOST_TPU_MESSAGE, field_path=".accelerator.tpu.topology"),
        rule("self.framework != 'tensorflow' || !has(self.procsPerWorker) || type(self.procsPerWorker) == string || self.procsPerWorker == 1",
             "TensorFlow runs one process per worker (it drives all local devices); set procsPerWorker to auto or 1",
             field_path=".procsPerWorker"),
        rule(f"!has(self.env) || self.env.all(e, !(e.name in {_cel_list(RESERVED_ENV)}))",
             "spec.env must not set variables Leap sets itself: " + ", ".join(RESERVED_ENV),
             message_expression="'spec.env sets ' + "
                                f"{_cel_first_present(RESERVED_ENV, _ENV_HAS)} + "
                                "', which Leap sets itself for the distributed rendezvous; remove it'",
             field_path=".env"),
    )


class TrainingRunSpec(_Model):
    """What to train, on what, and how."""
    model_config = ConfigDict(json_schema_extra=_spec_rules())
    framework: Literal[FRAMEWORKS] = Field(..., description="pytorch or tensorflow.")
    image: str | None = Field(None, max_length=512, pattern=IMAGE,
                              description="Container image; default per framework and accelerator from the operator's configuration.")
    workload: Workload | None = Field(None, description="A built-in workload (mutually exclusive with command).")
    command: list[Annotated[str, Field(max_length=4096)]] | None = Field(None, min_length=1, max_length=64, description="Your own program (custom images).")
    args: list[Annotated[str, Field(max_length=4096)]] | None = Field(None, max_length=256, description="Arguments to command.")
    accelerator: Accelerator = Field(default_factory=Accelerator, json_schema_extra={"default": {"type": "cpu"}})
    workers: int | None = Field(None, ge=1, le=4096, description="Pods (one per node). Default 1, or the host count of the TPU slice.")
    procsPerWorker: ProcsPerWorker = Field("auto")
    resources: Resources | None = None
    env: list[EnvVar] | None = Field(None, max_length=64, description=(
        "Extra environment variables for the trainer container (core/v1 EnvVar: value or valueFrom); "
        "names Leap sets itself are rejected."), json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]})
    checkpoint: Checkpoint = Field(default_factory=Checkpoint, json_schema_extra={"default": {}})
    runPolicy: RunPolicy = Field(default_factory=RunPolicy, json_schema_extra={"default": {}})
    scheduling: Scheduling | None = None
    metrics: Metrics = Field(default_factory=Metrics, json_schema_extra={"default": {}})


# --- status ------------------------------------------------------------------------------------

class Condition(_Model):
    """A metav1.Condition."""
    type: str = Field(..., max_length=316)
    status: Literal["True", "False", "Unknown"]
    reason: str | None = Field(None, max_length=1024)
    message: str | None = Field(None, max_length=32768)
    lastTransitionTime: str | None = Field(None, json_schema_extra={"format": "date-time"})
    observedGeneration: int | None = Field(None, ge=0)


class WorkerCounts(_Model):
    desired: int | None = Field(None, ge=0, description="Workers this run asks for (spec.workers, or derived from the TPU slice).")
    active: int = Field(0, ge=0)
    ready: int | None = Field(None, ge=0)
    succeeded: int = Field(0, ge=0)
    failed: int = Field(0, ge=0)


class Progress(_Model):
    """Scraped from rank 0's metrics endpoint while Running."""
    step: int = Field(0, ge=0)
    totalSteps: int = Field(0, ge=0)
    percent: float = Field(0, ge=0, le=100)
    samplesPerSecond: float = Field(0, ge=0)
    etaSeconds: float = Field(0, ge=0)
    eta: str | None = Field(None, max_length=32, description="etaSeconds for humans, e.g. 3m20s.")
    loss: float | None = None
    accuracy: float | None = None
    epoch: int | None = None
    flopsPerSecond: float = Field(0, ge=0)
    updateTime: str | None = Field(None, json_schema_extra={"format": "date-time"})


class GoodputTime(_Model):
    """Seconds of one trainer activity (leap_train_time_seconds_total, rank 0, as last scraped)."""
    startup: float | None = Field(None, ge=0)
    restore: float | None = Field(None, ge=0)
    checkpoint: float | None = Field(None, ge=0)
    train: float | None = Field(None, ge=0)
    evaluate: float | None = Field(None, ge=0)


class GoodputAttempt(_Model):
    """One attempt's timeline and rank 0's counters as last scraped: what the account is made of."""
    attempt: int = Field(..., ge=1)
    created: str | None = Field(None, json_schema_extra={"format": "date-time"}, description="Its Job was created.")
    running: str | None = Field(None, json_schema_extra={"format": "date-time"}, description="All its workers ran.")
    ended: str | None = Field(None, json_schema_extra={"format": "date-time"})
    succeeded: bool | None = None
    resumedStep: int | None = Field(None, ge=0, description="The run's step rank 0 started at (its checkpoint).")
    steps: int | None = Field(None, ge=0, description="Steps rank 0 took in this attempt, as last scraped.")
    seconds: GoodputTime | None = None
    recentStepSeconds: float | None = Field(None, ge=0, description=(
        "Rank 0's step time between its last two scrapes: the price of steps after the last scrape "
        "and of steps redone after a restart (the latest pace, not the attempt's mean with its warm-up)."))


class GoodputParts(_Model):
    """Seconds by part of the account (the parts of status.goodput)."""
    productive: float | None = Field(None, ge=0)
    scheduling: float | None = Field(None, ge=0)
    startup: float | None = Field(None, ge=0)
    restore: float | None = Field(None, ge=0)
    checkpoint: float | None = Field(None, ge=0)
    evaluation: float | None = Field(None, ge=0)
    lost: float | None = Field(None, ge=0)
    restarting: float | None = Field(None, ge=0)
    stalled: float | None = Field(None, ge=0)
    unattributed: float | None = Field(None, ge=0)


class GoodputCarried(_Model):
    """Older attempts folded into totals (their facts are final): the account starts from them, so
    it stays exact while status.goodput.attempts stays short."""
    attempts: int = Field(..., ge=1, description="How many attempts are folded in.")
    until: str = Field(..., json_schema_extra={"format": "date-time"}, description="Where their time ends.")
    known: bool = Field(False, description="Some of them reported the trainer's time counters.")
    seconds: GoodputParts | None = None


class Goodput(_Model):
    """Where the run's wall time went; the parts add up to wallSeconds (docs/monitoring.md, Goodput).
    Parts that need the trainer's counters are absent until rank 0 has reported them."""
    ratio: float | None = Field(None, ge=0, le=1, description="productiveSeconds / wallSeconds.")
    wallSeconds: float = Field(0, ge=0, description="Creation to completion (or to the last update).")
    productiveSeconds: float | None = Field(None, ge=0, description="Training steps the run kept.")
    schedulingSeconds: float = Field(0, ge=0, description="Waiting for each attempt's workers to run.")
    startupSeconds: float | None = Field(None, ge=0, description="Process start to the first step, restore excluded.")
    restoreSeconds: float | None = Field(None, ge=0, description="Reading checkpoints back.")
    checkpointSeconds: float | None = Field(None, ge=0, description="Writing checkpoints.")
    evaluationSeconds: float | None = Field(None, ge=0, description="Held-out evaluation.")
    lostSeconds: float | None = Field(None, ge=0, description="Steps redone after a restart.")
    restartingSeconds: float = Field(0, ge=0, description="Between attempts: teardown and backoff.")
    stalledSeconds: float = Field(0, ge=0, description="Time with condition Stalled=True.")
    unattributedSeconds: float = Field(0, ge=0, description="The rest, said out loud (see docs/monitoring.md).")
    stalledSince: str | None = Field(None, json_schema_extra={"format": "date-time"})
    stalledClosedSeconds: float | None = Field(None, ge=0)
    attempts: list[GoodputAttempt] | None = Field(None, max_length=256, description=f"The last attempts' facts ({KEEP_ATTEMPTS} at most; older ones are in carried).")
    carried: GoodputCarried | None = None


class TrainingRunStatus(_Model):
    """Observed state, written by the operator."""
    phase: Literal[PHASES] | None = None
    reason: str | None = Field(None, max_length=1024, description="Machine-readable reason of the phase, e.g. BackoffLimitExceeded.")
    message: str | None = Field(None, max_length=32768)
    conditions: list[Condition] | None = Field(None, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    attempt: int | None = Field(None, ge=0)
    restarts: int | None = Field(None, ge=0)
    jobName: str | None = None
    workers: WorkerCounts | None = None
    progress: Progress | None = None
    goodput: Goodput | None = None
    startTime: str | None = Field(None, json_schema_extra={"format": "date-time"})
    completionTime: str | None = Field(None, json_schema_extra={"format": "date-time"})
    observedGeneration: int | None = Field(None, ge=0)


class TrainingRun(_Model):
    """A TrainingRun: one training job on Kubernetes, from pods to progress."""
    apiVersion: str | None = None
    kind: str | None = None
    metadata: dict[str, Any] | None = None
    spec: TrainingRunSpec
    status: TrainingRunStatus | None = None


# --- derived facts shared by validation, render and the operator ------------------------------

def resolved_workers(spec: dict) -> int:
    """Pods of the run: spec.workers, else the TPU slice's host count, else 1."""
    if spec.get("workers"):
        return int(spec["workers"])
    tpu = (spec.get("accelerator") or {}).get("tpu")
    if tpu and tpu.get("type") in TPU_TYPES:
        return tpu_slice(tpu["type"], tpu["topology"])["hosts"]
    return 1


def resolved_procs_per_worker(spec: dict) -> int:
    """Processes per pod: auto = one per GPU (NCCL wants one process per device), else 1.

    TensorFlow and TPUs use one process per host that drives all local devices."""
    procs = spec.get("procsPerWorker", "auto")
    if procs != "auto":
        return int(procs)
    acc = spec.get("accelerator") or {}
    if spec.get("framework") == "pytorch" and acc.get("type") == "nvidia-gpu":
        return int(acc.get("count") or 1)
    return 1


def format_duration(seconds: float | None) -> str:
    """3727 -> '1h2m7s': the ETA printer column (status.progress.eta)."""
    if seconds is None:
        return ""
    s = int(round(max(0.0, float(seconds))))
    hours, rest = divmod(s, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
