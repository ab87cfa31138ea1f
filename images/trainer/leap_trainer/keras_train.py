"""`leap-train --framework tensorflow`: the Keras training path.

Same workloads, data, metrics and summary as the PyTorch path, on tf.distribute:
- the strategy comes from the environment (tf_strategy: TPU > multi-worker > multi-GPU > default);
- the global batch is the per-replica --batch-size times the replicas in sync;
- `fit` runs `steps_per_execution` steps per call into the TF runtime (about 2x faster than one
  step per call for small models), and the callbacks run once per such group;
- each training phase checkpoints into <checkpoint-dir>/keras/<phase>/ and resumes from it.

Distillation runs three phases: the teacher (trained on shifted images, see leap_trainer.distill),
the student trained alone (the baseline the summary compares against) and the distilled student,
from the same initial weights, in the same data order, for the same steps.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from leap_trainer import contract
from leap_trainer.summary import human_line, write_summary
from leap_trainer.tf_strategy import (
    MULTI_WORKER,
    TPU,
    StrategyConfigError,
    StrategyPlan,
    choose_strategy,
    keep_libtpu_unloaded_without_tpu,
    local_facts,
    make_strategy,
)

FRAMEWORK = "tensorflow"
STEPS_PER_EXECUTION = 50
EVAL_BATCH = 1000
CLASSIFIER_PHASES = ("classifier",)
DISTILLATION_PHASES = ("teacher", "student-alone", "distilled-student")
PHASE_SEEDS = {"classifier": 0, "teacher": 1, "student-alone": 2, "distilled-student": 2}


def log(message: str) -> None:
    print(f"[leap-train tensorflow] {message}", file=sys.stderr, flush=True)


@dataclass
class PhaseResult:
    name: str
    steps: int                 # optimizer steps of the phase when it ended
    resumed_from_step: int     # steps restored from a checkpoint (0 on a fresh start)
    accuracy: float
    samples_per_second: float
    train_seconds: float
    final_loss: float | None   # mean training loss of the last epoch run (None if nothing ran)


@dataclass
class Run:
    """Everything the phases share."""

    args: Any
    plan: StrategyPlan
    strategy: Any
    dataset: Any
    global_batch: int          # samples per step, all replicas
    worker_batch: int          # samples per step on this worker (its replicas): what its metrics count
    steps_per_epoch: int
    metrics: Any
    checkpoint_dir: Path | None
    phases: list[PhaseResult] = field(default_factory=list)


def main(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter out of pod logs
    keep_libtpu_unloaded_without_tpu()  # before TensorFlow's first import
    started = time.perf_counter()
    validate_args(args)

    try:
        plan = choose_strategy(os.environ, **local_facts())
        strategy = make_strategy(plan)  # before any other TF op: multi-worker starts its server here
    except StrategyConfigError as error:
        raise SystemExit(f"leap-train: {error}") from None
    log(f"strategy {plan.kind}: {plan.reason}; {strategy.num_replicas_in_sync} replica(s)")

    import keras

    from leap_trainer.data import load_dataset

    if plan.kind == TPU:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")  # the TPU's native matmul type
    if plan.kind == MULTI_WORKER:
        from leap_trainer.tf_keras_compat import patch_keras_for_multi_worker

        patch_keras_for_multi_worker()
    try:
        dataset = load_dataset(args.dataset, samples=args.samples, seed=0)
    except (ValueError, OSError) as error:
        raise SystemExit(f"leap-train: --dataset {args.dataset!r}: {error}") from None
    world_size = strategy.num_replicas_in_sync
    global_batch = args.batch_size * world_size
    steps_per_epoch = len(dataset.x_train) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(
            f"leap-train: --batch-size {args.batch_size} x {world_size} replicas = {global_batch} exceeds the "
            f"{len(dataset.x_train)} training samples of --dataset {args.dataset}; lower --batch-size or add --samples"
        )

    workload_steps = steps_per_epoch * args.epochs
    if args.workload == "distillation":
        from leap_trainer.specs import teacher_epochs

        total_steps = steps_per_epoch * teacher_epochs(args.epochs, args.teacher_epochs) + 2 * workload_steps
    else:
        total_steps = workload_steps
    device = describe_device(plan)
    dtype = "bf16" if plan.kind == TPU else "fp32"
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    phases = DISTILLATION_PHASES if args.workload == "distillation" else CLASSIFIER_PHASES
    metrics = open_metrics(args, plan, device, dtype, total_steps=total_steps,
                           initial_step=checkpointed_steps(checkpoint_dir, phases))
    worker_batch = global_batch // max(1, plan.workers)
    run = Run(args, plan, strategy, dataset, global_batch, worker_batch, steps_per_epoch, metrics, checkpoint_dir)

    try:
        if args.workload == "distillation":
            summary = distill(run)
        else:
            model = train_phase(run, "classifier", lambda: compiled(build(args.model), args.lr, plan))
            summary = {"test_accuracy": run.phases[-1].accuracy}
            save_final_model(run, model)
        metrics.finish()
    finally:
        metrics.close()

    main_phase = run.phases[-1]
    # As on the PyTorch path: the trained model's FLOPs (a distillation teacher's forward pass is not counted).
    flops_per_second = main_phase.samples_per_second * model_flops_per_sample(args.model)
    peak = peak_flops(device, dtype)
    peak_total = peak * world_size if peak else None  # one replica per device
    summary.update({
        "framework": FRAMEWORK,
        "workload": args.workload,
        "model": args.model,
        "dataset": args.dataset,
        "strategy": plan.kind,
        "samples_per_second": main_phase.samples_per_second,
        "flops_per_second": flops_per_second,
        "mfu": (flops_per_second / peak_total) if peak_total else None,
        "precision": dtype,
        "steps": main_phase.steps,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "global_batch_size": global_batch,
        "final_loss": main_phase.final_loss,
        "wall_seconds": time.perf_counter() - started,
        "device": device,
        "world_size": world_size,
        "resumed_from_step": main_phase.resumed_from_step,
    })
    if plan.is_chief:
        write_summary(args.summary, summary)
    log(human_line(summary))
    return 0


def validate_args(args) -> None:
    from leap_trainer.specs import MODEL_LAYERS

    if args.model not in MODEL_LAYERS:
        raise SystemExit(f"leap-train: --model {args.model!r} is unknown; choose one of {sorted(MODEL_LAYERS)}")
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value is None or value < 1:
            raise SystemExit(f"leap-train: {flag} must be at least 1, got {value}")
    if args.lr is None or args.lr <= 0:
        raise SystemExit(f"leap-train: --lr must be > 0, got {args.lr}")
    if args.workload not in ("classifier", "distillation"):
        raise SystemExit(f"leap-train: --workload {args.workload!r} is unknown; choose classifier or distillation")
    if args.workload == "distillation":
        teacher = args.teacher
        if teacher not in MODEL_LAYERS:
            raise SystemExit(f"leap-train: --teacher {teacher!r} is unknown; choose one of {sorted(MODEL_LAYERS)}")
        if args.temperature is None or args.temperature <= 0:
            raise SystemExit(f"leap-train: --temperature must be > 0, got {args.temperature}")
        if args.alpha is None or not 0.0 <= args.alpha <= 1.0:
            raise SystemExit(f"leap-train: --alpha must be between 0 and 1, got {args.alpha}")


# --- models ----------------------------------------------------------------------------------------

def build(model_name: str):
    from leap_trainer.specs import MODEL_LAYERS
    from leap_trainer.tf_models import build_mlp

    return build_mlp(MODEL_LAYERS[model_name], name=model_name.replace("-", "_"))


def compiled(model, lr: float, plan: StrategyPlan, *, cosine_steps: int | None = None):
    """Compile with Adam at `lr` (constant), or with warmup + cosine decay to 0 over `cosine_steps`
    (the distillation teacher, as on the PyTorch path)."""
    import keras

    from leap_trainer.specs import WARMUP_FRACTION

    steps_per_execution = STEPS_PER_EXECUTION
    if plan.kind == MULTI_WORKER:
        from leap_trainer.tf_keras_compat import MULTI_WORKER_STEPS_PER_EXECUTION, patch_model_for_multi_worker

        patch_model_for_multi_worker(model)
        steps_per_execution = MULTI_WORKER_STEPS_PER_EXECUTION
    if cosine_steps:
        warmup = max(1, int(cosine_steps * WARMUP_FRACTION))
        lr = keras.optimizers.schedules.CosineDecay(0.0, max(cosine_steps - warmup, 1), warmup_target=lr,
                                                    warmup_steps=warmup)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr),
        loss=None if hasattr(model, "student") else keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        steps_per_execution=steps_per_execution,
        jit_compile=plan.kind == TPU,  # XLA is how TPUs run anyway; on CPU it only adds compile time
    )
    return model


def model_flops_per_sample(model_name: str) -> float:
    from leap_trainer.flops import training_flops_per_sample
    from leap_trainer.specs import MODEL_LAYERS

    return float(training_flops_per_sample(MODEL_LAYERS[model_name]))


# --- training phases -------------------------------------------------------------------------------

def train_dataset(run: Run, seed: int, soft_targets=None):
    """One epoch of shuffled global batches; each worker keeps its share (DATA auto-sharding).
    With distillation's soft targets, y = (labels, targets); the order depends only on the seed."""
    import tensorflow as tf

    x, y = run.dataset.x_train, run.dataset.y_train.astype("int32")
    data = tf.data.Dataset.from_tensor_slices((x, y if soft_targets is None else (y, soft_targets)))
    data = data.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    # drop_remainder: every step has the same shape (TPUs need it) and steps_per_epoch is exact.
    data = data.batch(run.global_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return data.with_options(options)


def test_dataset(run: Run):
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((run.dataset.x_test, run.dataset.y_test.astype("int32")))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return data.batch(EVAL_BATCH).with_options(options)


def train_phase(run: Run, name: str, make_model: Callable[[], Any], *, epochs: int | None = None, soft_targets=None):
    """Build (in the strategy's scope), resume, fit and evaluate one phase; returns the model."""
    import keras

    from leap_trainer.tf_callbacks import CheckpointSaver, MetricsReporter, PhaseClock, optimizer_steps
    from leap_trainer.tf_checkpoint import PhaseCheckpoints

    # Same initial weights on every worker; the student trained alone and the distilled student
    # start from the same weights, so the comparison is distillation alone.
    seed = run.args.seed + PHASE_SEEDS.get(name, 0)
    keras.utils.set_random_seed(seed)
    with run.strategy.scope():
        model = make_model()
    checkpoints = PhaseCheckpoints(run.checkpoint_dir, name) if run.checkpoint_dir else None
    state = checkpoints.restore(model) if checkpoints else None
    resumed = optimizer_steps(model) if state else 0
    if state:
        log(f"{name}: resumed from {checkpoints.directory / state.weights} at step {resumed}")

    epochs = epochs or run.args.epochs
    total = run.steps_per_epoch * epochs
    clock = PhaseClock(global_batch=run.global_batch, worker_batch=run.worker_batch)
    callbacks = [MetricsReporter(run.metrics, clock, memory_device=memory_device(run.plan))]
    if checkpoints:
        callbacks.append(CheckpointSaver(checkpoints, every_steps=run.args.checkpoint_every or 0,
                                         steps_per_epoch=run.steps_per_epoch, is_chief=run.plan.is_chief))
    began = time.perf_counter()
    epoch, into_epoch = divmod(resumed, run.steps_per_epoch)
    losses: list[float] = []
    if resumed < total and into_epoch:
        # Finish the interrupted epoch with its remaining batches, then carry on epoch by epoch.
        history = model.fit(train_dataset(run, seed, soft_targets).take(run.steps_per_epoch - into_epoch), initial_epoch=epoch,
                            epochs=epoch + 1, callbacks=callbacks, verbose=0)
        losses += history.history.get("loss", [])
        epoch += 1
    if epoch < epochs:
        history = model.fit(train_dataset(run, seed, soft_targets), initial_epoch=epoch, epochs=epochs,
                            callbacks=callbacks, verbose=0)
        losses += history.history.get("loss", [])
    train_seconds = time.perf_counter() - began
    steps = optimizer_steps(model)
    if checkpoints and run.plan.is_chief and not (state and state.done and state.step == steps):
        checkpoints.save(model, step=steps, epoch=epochs, done=True)

    accuracy = float(model.evaluate(test_dataset(run), verbose=0, return_dict=True)["accuracy"])
    run.metrics.set_accuracy(accuracy)
    result = PhaseResult(name, steps, resumed, accuracy, clock.steady_samples_per_second(), train_seconds,
                         float(losses[-1]) if losses else None)
    run.phases.append(result)
    log(f"{name}: {steps} steps, test accuracy {accuracy:.4f}, {result.samples_per_second:.0f} samples/s")
    return model


def distill(run: Run) -> dict[str, Any]:
    import numpy as np

    from leap_trainer.distill import background, soft_targets
    from leap_trainer.specs import TEACHER_SHIFT_PIXELS, teacher_epochs
    from leap_trainer.summary import distillation_summary
    from leap_trainer.tf_models import Distiller, build_shifted

    args = run.args
    # The student is the --model (the small one); the teacher is bigger, trains longer, on shifted images.
    student_name, teacher_name = args.model, args.teacher
    epochs_of_teacher = teacher_epochs(args.epochs, args.teacher_epochs)
    fill = background(run.dataset.x_train)
    teacher = train_phase(
        run, "teacher",
        lambda: compiled(build_shifted(build(teacher_name), TEACHER_SHIFT_PIXELS, fill, seed=args.seed),
                         args.lr, run.plan, cosine_steps=run.steps_per_epoch * epochs_of_teacher),
        epochs=epochs_of_teacher)

    def predict(x):
        return np.asarray(teacher.predict(x, batch_size=EVAL_BATCH, verbose=0), dtype=np.float32)

    targets = soft_targets(predict, run.dataset.x_train, args.temperature)
    train_phase(run, "student-alone", lambda: compiled(build(student_name), args.lr, run.plan))

    def make_distiller():
        distiller = Distiller(build(student_name), temperature=args.temperature, alpha=args.alpha)
        distiller(run.dataset.x_test[:1])  # build, so checkpoints can be loaded into it
        return compiled(distiller, args.lr, run.plan)

    distiller = train_phase(run, "distilled-student", make_distiller, soft_targets=targets)
    save_final_model(run, distiller.student)
    teacher_phase, alone_phase, distilled_phase = run.phases
    return {"test_accuracy": distilled_phase.accuracy, **distillation_summary(
        teacher=teacher_name, teacher_accuracy=teacher_phase.accuracy, student_alone_accuracy=alone_phase.accuracy,
        distilled_accuracy=distilled_phase.accuracy, temperature=args.temperature, alpha=args.alpha,
        teacher_epochs=epochs_of_teacher)}


# --- outputs ---------------------------------------------------------------------------------------

def save_final_model(run: Run, model) -> None:
    if run.checkpoint_dir is None or not run.plan.is_chief:
        return
    path = run.checkpoint_dir / "keras" / "final.keras"
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(path))
    log(f"final model: {path}")


def describe_device(plan: StrategyPlan) -> str:
    """A device name the peak-FLOP/s table understands: the GPU's name, the TPU type, or 'cpu'."""
    import tensorflow as tf

    if plan.kind == TPU:
        # GKE sets TPU_ACCELERATOR_TYPE, e.g. v4-8, v5litepod-16, v6e-8: "TPU v5 lite-16" matches the table.
        accelerator_type = os.environ.get("TPU_ACCELERATOR_TYPE", "").replace("litepod", " lite")
        return f"TPU {accelerator_type}".strip()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    return "cpu"


def memory_device(plan: StrategyPlan) -> str | None:
    """The device whose memory use is exported (leap_accelerator_memory_bytes); None on CPU."""
    if plan.kind == TPU:
        return "TPU:0"
    return "GPU:0" if plan.gpus else None


def peak_flops(device: str, dtype: str) -> float | None:
    from leap_trainer.devices import peak_flops as table_peak

    return table_peak(device, dtype)


def checkpointed_steps(checkpoint_dir: Path | None, phases: tuple[str, ...]) -> int:
    """Steps already done according to the phases' checkpoints: where the counters resume."""
    from leap_trainer.tf_checkpoint import PhaseCheckpoints

    if checkpoint_dir is None:
        return 0
    states = (PhaseCheckpoints(checkpoint_dir, phase).latest() for phase in phases)
    return sum(state.step for state in states if state is not None)


def open_metrics(args, plan: StrategyPlan, device: str, dtype: str, total_steps: int, initial_step: int):
    """TrainingMetrics for this worker, serving /metrics when a port is given."""
    from leap_trainer.metrics import TrainingMetrics

    env = os.environ
    accelerator = env.get(contract.ENV_ACCELERATOR) or (
        "google-tpu" if plan.kind == TPU else "nvidia-gpu" if plan.gpus else "cpu")
    metrics = TrainingMetrics(
        run=env.get(contract.ENV_RUN, "local"),
        namespace=env.get(contract.ENV_NAMESPACE, ""),
        rank=plan.worker_index,
        framework=FRAMEWORK,
        accelerator=accelerator,
        port=args.metrics_port,
        flops_per_sample=model_flops_per_sample(args.model),
        peak_flops=peak_flops(device, dtype),
        total_steps=total_steps,
        initial_step=initial_step,
    )
    metrics.start_server()  # serves only when a port is set
    return metrics

