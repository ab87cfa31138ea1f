"""The contract between the operator (which renders pods) and leap-train (which runs in them).

This module is the single source of truth for environment variable names, metric names,
label names and default ports. It imports nothing heavy: the operator imports it without
torch or TensorFlow installed. Docs, dashboards and alert rules are tested against it.
"""

from __future__ import annotations

# --- Leap's own environment -------------------------------------------------------------
ENV_RUN = "LEAP_RUN"                      # TrainingRun name
ENV_NAMESPACE = "LEAP_NAMESPACE"          # TrainingRun namespace
ENV_ATTEMPT = "LEAP_ATTEMPT"              # 1-based attempt number (gang restarts increment it)
ENV_FRAMEWORK = "LEAP_FRAMEWORK"          # pytorch | tensorflow
ENV_ACCELERATOR = "LEAP_ACCELERATOR"      # cpu | nvidia-gpu | google-tpu
ENV_METRICS_PORT = "LEAP_METRICS_PORT"    # port of rank 0 on this worker; local rank r uses port + r
ENV_CHECKPOINT_DIR = "LEAP_CHECKPOINT_DIR"
ENV_CHECKPOINT_EVERY = "LEAP_CHECKPOINT_EVERY_STEPS"
ENV_WORKER_INDEX = "LEAP_WORKER_INDEX"    # the Job completion index of this pod (downward API)
ENV_WORKER_HOSTS = "LEAP_WORKER_HOSTS"    # comma-separated host:port of every worker, index order
ENV_SUMMARY = "LEAP_SUMMARY_PATH"         # where the final JSON summary goes
ENV_TPU_TYPE = "LEAP_TPU_TYPE"            # GKE TPU type (node label), for the peak FLOP/s when GKE sets no TPU_ACCELERATOR_TYPE

# --- torchrun conventions (PyTorch) ---------------------------------------------------------
ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
ENV_WORLD_SIZE = "WORLD_SIZE"             # total processes = workers * procs per worker
ENV_RANK = "RANK"                         # global rank of a process (per pod: its node rank until launched)
ENV_LOCAL_RANK = "LOCAL_RANK"
ENV_NODE_RANK = "NODE_RANK"
ENV_NNODES = "NNODES"
ENV_NPROC_PER_NODE = "NPROC_PER_NODE"
# torchrun reads its arguments from PET_<ARG> variables.
ENV_PET_MASTER_ADDR = "PET_MASTER_ADDR"
ENV_PET_MASTER_PORT = "PET_MASTER_PORT"
ENV_PET_NNODES = "PET_NNODES"
ENV_PET_NODE_RANK = "PET_NODE_RANK"
ENV_PET_NPROC_PER_NODE = "PET_NPROC_PER_NODE"

# --- TensorFlow / TPU -----------------------------------------------------------------------
# Refused by the CRD, `leap validate` and leap-train alike (see docs/images.md, "TPUs").
TF_MULTI_HOST_TPU_UNSUPPORTED = (
    "TensorFlow on a multi-host TPU slice is not supported (TPUStrategy drives one host; nothing on GKE "
    "connects the other hosts' chips to it, so each host would train a separate model)")
ENV_TF_CONFIG = "TF_CONFIG"
ENV_TPU_WORKER_ID = "TPU_WORKER_ID"
ENV_TPU_WORKER_HOSTNAMES = "TPU_WORKER_HOSTNAMES"

# --- Kubernetes-provided --------------------------------------------------------------------
ENV_JOB_COMPLETION_INDEX = "JOB_COMPLETION_INDEX"
JOB_COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

# --- Ports ----------------------------------------------------------------------------------
DEFAULT_METRICS_PORT = 9400
DEFAULT_MASTER_PORT = 29500               # torch.distributed rendezvous
DEFAULT_TF_PORT = 2222                    # TF gRPC server for MultiWorkerMirroredStrategy
DEFAULT_CHECKPOINT_DIR = "/checkpoints"

# --- Prometheus metrics exported by leap-train ----------------------------------------------
# Every series carries these labels.
METRIC_LABELS = ("run", "namespace", "rank", "framework", "accelerator")

M_SAMPLES = "leap_train_samples_total"              # counter
M_STEPS = "leap_train_steps_total"                  # counter
M_STEP_SECONDS = "leap_train_step_seconds"          # histogram
M_COMPUTE_SECONDS = "leap_train_compute_seconds_total"  # counter: step time minus waiting for other ranks
M_SAMPLES_PER_SECOND = "leap_train_samples_per_second"  # gauge
M_FLOPS_PER_SECOND = "leap_train_flops_per_second"  # gauge: achieved training FLOP/s
M_MFU = "leap_train_mfu"                            # gauge 0..1; absent on unknown devices
M_LOSS = "leap_train_loss"                          # gauge
M_ACCURACY = "leap_train_accuracy"                  # gauge: last evaluation accuracy
M_PROGRESS = "leap_train_progress_ratio"            # gauge 0..1
M_ETA = "leap_train_eta_seconds"                    # gauge
M_EPOCH = "leap_train_epoch"                        # gauge
M_TOTAL_STEPS = "leap_train_total_steps"            # gauge: steps planned for the whole run
M_ACCEL_MEMORY = "leap_accelerator_memory_bytes"    # gauge
M_TIME = "leap_train_time_seconds_total"            # counter {activity}: where this process's time went
M_RESUMED_STEP = "leap_train_resumed_step"          # gauge: the run's step this process started at

# Values of M_TIME's `activity` label (the goodput account, operator/leap_operator/goodput.py, reads them).
ACTIVITY_STARTUP = "startup"          # process start to the first training step (restore excluded)
ACTIVITY_RESTORE = "restore"          # reading checkpoints back
ACTIVITY_CHECKPOINT = "checkpoint"    # writing checkpoints
ACTIVITY_TRAIN = "train"              # training steps (the reporting windows' wall time)
ACTIVITY_EVALUATE = "evaluate"        # held-out evaluation between epochs
TIME_ACTIVITIES = (ACTIVITY_STARTUP, ACTIVITY_RESTORE, ACTIVITY_CHECKPOINT, ACTIVITY_TRAIN, ACTIVITY_EVALUATE)
TIME_LABEL = "activity"
M_ACTIVITY = "leap_train_activity"                  # gauge {activity}: 1 for what the process does now
# Activities other than train are pauses the trainer makes on purpose: the operator's hang
# detection (operator/leap_operator/stall.py) does not count them as a stall.
PAUSE_ACTIVITIES = (ACTIVITY_STARTUP, ACTIVITY_RESTORE, ACTIVITY_CHECKPOINT, ACTIVITY_EVALUATE)

# Description of each metric: used for HELP text and the metrics reference in the docs.
TRAIN_METRICS: dict[str, tuple[str, str]] = {
    M_SAMPLES: ("counter", "Training samples processed by this process since it started (a resumed run starts at 0)."),
    M_STEPS: ("counter", "Optimizer steps taken by this process since it started (a resumed run starts at 0)."),
    M_STEP_SECONDS: ("histogram", "Wall time of each optimizer step (Keras: each step of a steps_per_execution group at the group's mean)."),
    M_COMPUTE_SECONDS: ("counter", "Seconds of this rank's own training work: its step time minus the time it waited for the other ranks in the gradient all-reduce (PyTorch; absent where unmeasured)."),
    M_SAMPLES_PER_SECOND: ("gauge", "Training throughput of this rank over the last reporting window."),
    M_FLOPS_PER_SECOND: ("gauge", "Achieved model FLOP/s of this rank: samples/s x the model's training FLOPs per sample (matmuls, no recomputation)."),
    M_MFU: ("gauge", "Model FLOPs utilisation: achieved FLOP/s over the peak of this rank's devices at the precision used; absent when unknown."),
    M_LOSS: ("gauge", "Training loss over the last reporting window."),
    M_ACCURACY: ("gauge", "Accuracy of the last evaluation on held-out data."),
    M_PROGRESS: ("gauge", "Fraction of the run's planned steps done, 0 to 1 (resumed steps included)."),
    M_ETA: ("gauge", "Estimated seconds until the run's planned steps are done."),
    M_EPOCH: ("gauge", "Current epoch, 1-based."),
    M_TOTAL_STEPS: ("gauge", "Optimizer steps planned for the whole run."),
    M_ACCEL_MEMORY: ("gauge", "Accelerator memory in use by this rank, in bytes."),
    M_TIME: ("counter", "Wall seconds this process spent, by activity: startup (process start to the first step, "
                        "restore excluded), restore, checkpoint, train, evaluate."),
    M_RESUMED_STEP: ("gauge", "The run's step this process started at (0: a fresh start; else the checkpoint it resumed)."),
    M_ACTIVITY: ("gauge", "What this process does now: 1 for its activity (startup, restore, checkpoint, train, evaluate), "
                          "0 for the others; the operator does not count a pause (any but train) as a stall."),
}

# --- Exit codes -------------------------------------------------------------------------------
# One set for leap-train, `leap` and the operator's Job podFailurePolicy (render.py).
EXIT_OK = 0
EXIT_FAILED = 1          # leap-train crashed / `leap run`: the run failed (a retry may help)
EXIT_INVALID = 2         # `leap`: invalid input (file, spec, flag, run directory): nothing was started
EXIT_CONFIG = 78         # leap-train: its configuration can never work (flag, env, dataset, checkpoint):
                         # not retried by `leap run`, fails the Job at once in a cluster (EX_CONFIG)
CONFIG_ERROR_PREFIX = "leap-train: configuration error: "   # starts the one line leap-train prints then

# --- Shipped data -----------------------------------------------------------------------------
DIGITS_TRAIN_SAMPLES = 4000   # the "digits" dataset's training split (4,000 train / 1,000 test)
