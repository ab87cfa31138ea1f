"""`leap-train --framework tensorflow`: the Keras backend.

What a run is (its fingerprint, resume and re-run rules, phases, metrics endpoint, summary) is
leap_trainer.orchestrator's, shared with PyTorch; this module builds Keras models and trains:
- the strategy comes from the environment (tf_strategy: TPU > multi-worker > multi-GPU > default);
- the global batch is the per-replica --batch-size times the replicas in sync;
- the learning rate follows the same warmup + cosine schedule as PyTorch (orchestrator.lr_factor);
- each epoch's order is a permutation drawn from (seed, epoch), so a resumed phase finishes the
  interrupted epoch with exactly the batches it had not trained, as the PyTorch path does;
- `fit` runs `steps_per_execution` steps per call into the TF runtime (about 2x faster than one
  step per call for small models), and the callbacks run once per such group;
- each training phase checkpoints into <checkpoint-dir>/keras/<phase>/ and resumes from it.

Distillation runs three phases (orchestrator.train_workload, the recipe in leap_trainer.distill):
the teacher (or resumes it), trained for teacher_epochs on randomly shifted images
(tf_models.RandomShift); the student trained alone (the baseline the summary compares against);
and the distilled student, from the same initial weights, in the same data order, for the same
steps. The teacher's soft targets are computed once for the training set, as on the PyTorch path,
and arrive with the labels, y = (labels, targets).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from leap_trainer import contract
from leap_trainer.devices import Accelerator, cpu_model, cpu_threads, cuda_precision, tpu_device_name
from leap_trainer.orchestrator import (CLASSIFIER_PHASES, DISTILLATION_PHASES, PHASE_SEED_OFFSETS, Phase,
                                       RunDirectory, already_complete_message, build_summary, fail, fingerprint,
                                       open_metrics, planned_steps, resolve_batch_size, train_workload)
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


def log(message: str) -> None:
    print(f"[leap-train tensorflow] {message}", file=sys.stderr, flush=True)


@dataclass
class Run:
    """Everything the phases share; the Keras backend of orchestrator.train_workload."""

    args: Any
    plan: StrategyPlan
    strategy: Any
    dataset: Any
    global_batch: int          # samples per step, all replicas
    worker_batch: int          # samples per step on this worker (its replicas): what its metrics count
    steps_per_epoch: int
    metrics: Any
    checkpoint_dir: Path | None
    phases: list[Phase]

    @property
    def train_size(self) -> int:
        return len(self.dataset.x_train)

    @property
    def x_train(self) -> np.ndarray:
        return self.dataset.x_train

    def train(self, phase: str, model_name: str, *, epochs: int, shift_pixels: int = 0, soft_targets=None):
        """Every phase checkpoints to keras/<phase>/ and resumes from it (a finished one is skipped)."""
        if soft_targets is None:
            def make_model():
                model = build(model_name)
                if shift_pixels:   # the distillation teacher: trained on randomly shifted images
                    from leap_trainer.distill import background
                    from leap_trainer.tf_models import build_shifted

                    model = build_shifted(model, shift_pixels, background(self.dataset.x_train),
                                          seed=self.args.seed + PHASE_SEED_OFFSETS[phase])
                return compiled(model, self, epochs)

            return train_phase(self, phase, model_name, make_model, epochs=epochs)

        def make_distiller():
            from leap_trainer.tf_models import Distiller

            student = build(model_name)  # draws the same initial weights as student-alone (same seed)
            distiller = Distiller(student, temperature=self.args.temperature, alpha=self.args.alpha)
            distiller(self.dataset.x_test[:1])  # build, so checkpoints can be loaded into it
            return compiled(distiller, self, epochs)

        return train_phase(self, phase, model_name, make_distiller, epochs=epochs, soft_targets=soft_targets)

    def teacher_predictor(self, teacher):
        """The frozen teacher as numpy inputs -> numpy logits (for distill.soft_targets); a shifted
        teacher passes its inputs through unshifted at inference."""
        def predict(x):
            return np.asarray(teacher.predict(x, batch_size=EVAL_BATCH, verbose=0), dtype=np.float32)

        return predict

    def save_final(self, model) -> None:
        save_final_model(self, getattr(model, "student", model))   # the distiller's student


def main(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter out of pod logs
    # TensorFlow reads its thread pool size when its runtime starts: the pod's CPU limit, not the node's cores.
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(cpu_threads()))
    keep_libtpu_unloaded_without_tpu()  # before TensorFlow's first import
    started = time.perf_counter()

    try:
        plan = choose_strategy(os.environ, **local_facts())
        strategy = make_strategy(plan)  # before any other TF op: multi-worker starts its server here
    except StrategyConfigError as error:
        raise fail(str(error)) from None
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
        raise fail(f"--dataset {args.dataset!r}: {error}") from None
    world_size = strategy.num_replicas_in_sync
    args.batch_size = resolve_batch_size(args, world_size, "replicas")
    global_batch = args.batch_size * world_size
    steps_per_epoch = len(dataset.x_train) // global_batch
    if steps_per_epoch == 0:
        raise fail(
            f"--batch-size {args.batch_size} x {world_size} replicas = {global_batch} exceeds the "
            f"{len(dataset.x_train)} training samples of --dataset {args.dataset}; lower --batch-size or add --samples"
        )

    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    directory = RunDirectory(checkpoint_dir, writer=plan.is_chief)
    status = directory.begin(fingerprint=fingerprint(args, world_size), start_over=args.start_over)
    if status == "complete":
        log(already_complete_message(checkpoint_dir, args.summary))
        return 0

    accelerator = describe_device(plan, world_size, gpu_details=gpu_details(), env=os.environ)
    phase_names = DISTILLATION_PHASES if args.workload == "distillation" else CLASSIFIER_PHASES
    first_model = args.teacher if args.workload == "distillation" else args.model
    metrics = open_metrics(
        args=args, rank=plan.worker_index, local_rank=0, framework=FRAMEWORK,
        accelerator=os.environ.get(contract.ENV_ACCELERATOR) or (
            "google-tpu" if plan.kind == TPU else "nvidia-gpu" if plan.gpus else "cpu"),
        flops_per_sample=model_flops_per_sample(first_model), peak_flops=accelerator.peak,
        total_steps=planned_steps(args, steps_per_epoch),
        initial_step=checkpointed_steps(checkpoint_dir, phase_names))
    worker_batch = global_batch // max(1, plan.workers)
    run = Run(args, plan, strategy, dataset, global_batch, worker_batch, steps_per_epoch, metrics, checkpoint_dir, [])

    try:
        distillation = train_workload(run, args)
        metrics.finish()
    finally:
        metrics.close()

    summary = build_summary(
        args=args, framework=FRAMEWORK, phases=run.phases, device=accelerator.name,
        precision=accelerator.precision, devices_per_process=accelerator.devices, world_size=world_size,
        peak_per_device=accelerator.peak / accelerator.devices if accelerator.peak else None,
        strategy=plan.kind, distillation=distillation, wall_seconds=time.perf_counter() - started)
    if plan.is_chief:
        write_summary(args.summary, summary)
        directory.complete()
    log(human_line(summary))
    return 0


# --- devices ---------------------------------------------------------------------------------------

def gpu_details() -> list[dict]:
    import tensorflow as tf

    return [tf.config.experimental.get_device_details(gpu) for gpu in tf.config.list_physical_devices("GPU")]


def describe_device(plan: StrategyPlan, replicas: int, *, gpu_details: list[dict], env) -> Accelerator:
    """What this worker trains on, for MFU: the device name the peak table reads, the precision
    TensorFlow computes in, and how many devices this worker drives (its share of the replicas)."""
    local = max(1, replicas // max(1, plan.workers))
    if plan.kind == TPU:
        return Accelerator(tpu_device_name(env), "bf16", local)         # mixed_bfloat16
    if gpu_details:
        first = gpu_details[0]
        capability = tuple(first.get("compute_capability") or (0, 0))
        # fp32 variables; TensorFlow runs fp32 matmuls in TF32 on compute capability 8.0+ by default.
        return Accelerator(first.get("device_name", "GPU"), cuda_precision(capability, FRAMEWORK), local)
    return Accelerator(f"CPU ({cpu_model()}, {env.get('TF_NUM_INTRAOP_THREADS', '?')} threads)", "fp32", 1)


# --- models ----------------------------------------------------------------------------------------

def build(model_name: str):
    from leap_trainer.specs import layers_of
    from leap_trainer.tf_models import build_mlp

    return build_mlp(layers_of(model_name), name=model_name.replace("-", "_"))


def compiled(model, run: Run, epochs: int):
    import keras

    steps_per_execution = STEPS_PER_EXECUTION
    if run.plan.kind == MULTI_WORKER:
        from leap_trainer.tf_keras_compat import MULTI_WORKER_STEPS_PER_EXECUTION, patch_model_for_multi_worker

        patch_model_for_multi_worker(model)
        steps_per_execution = MULTI_WORKER_STEPS_PER_EXECUTION
    from leap_trainer.tf_models import WarmupCosine

    schedule = WarmupCosine(run.args.lr, run.steps_per_epoch * epochs)   # over this phase's steps
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=schedule),
        loss=None if hasattr(model, "student") else keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        steps_per_execution=steps_per_execution,
        jit_compile=run.plan.kind == TPU,  # XLA is how TPUs run anyway; on CPU it only adds compile time
    )
    return model


def model_flops_per_sample(model_name: str) -> int:
    from leap_trainer.flops import training_flops_per_sample
    from leap_trainer.specs import layers_of

    return training_flops_per_sample(layers_of(model_name))


# --- training phases -------------------------------------------------------------------------------

def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's sample order: the same on every worker, different every epoch, reproducible on resume."""
    return np.random.default_rng([seed, epoch]).permutation(size)


def epoch_dataset(run: Run, seed: int, epoch: int, skip_steps: int, soft_targets=None):
    """The global batches of `epoch` after the first `skip_steps`; each worker keeps its share (DATA sharding).
    With distillation's soft targets, y = (labels, the targets of those samples)."""
    import tensorflow as tf

    order = epoch_order(len(run.dataset.x_train), seed, epoch)
    order = order[skip_steps * run.global_batch:run.steps_per_epoch * run.global_batch]
    labels = run.dataset.y_train[order].astype("int32")
    y = labels if soft_targets is None else (labels, soft_targets[order])
    data = tf.data.Dataset.from_tensor_slices((run.dataset.x_train[order], y))
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


def train_phase(run: Run, name: str, model_name: str, make_model: Callable[[], Any], *, epochs: int,
                soft_targets=None):
    """Build (in the strategy's scope), resume, fit and evaluate one phase; returns the model."""
    import keras

    from leap_trainer.tf_callbacks import CheckpointSaver, MetricsReporter, PhaseClock, optimizer_steps
    from leap_trainer.tf_checkpoint import PhaseCheckpoints

    # Same initial weights on every worker; the student trained alone and the distilled student
    # start from the same weights, so the comparison is distillation alone.
    seed = run.args.seed + PHASE_SEED_OFFSETS[name]
    keras.utils.set_random_seed(seed)
    with run.strategy.scope():
        model = make_model()
    checkpoints = PhaseCheckpoints(run.checkpoint_dir, name) if run.checkpoint_dir else None
    with run.metrics.timed(contract.ACTIVITY_RESTORE):
        state = checkpoints.restore(model) if checkpoints else None
    resumed = optimizer_steps(model) if state else 0
    if state:
        from leap_trainer.tf_models import resume_random_shifts

        resume_random_shifts(model, resumed)   # the teacher's shifts continue where they were
        log(f"{name}: resumed from {checkpoints.directory / state.weights} at step {resumed}")
    run.metrics.flops_per_sample = model_flops_per_sample(model_name)
    log(f"{name}: {model_name}, {run.steps_per_epoch * epochs} steps of {run.global_batch} samples "
        f"({run.args.batch_size} x {run.strategy.num_replicas_in_sync} replicas)")

    clock = PhaseClock(global_batch=run.global_batch, worker_batch=run.worker_batch)
    callbacks = [MetricsReporter(run.metrics, clock, memory_device=memory_device(run.plan))]
    if checkpoints:
        callbacks.append(CheckpointSaver(checkpoints, every_steps=run.args.checkpoint_every or 0,
                                         steps_per_epoch=run.steps_per_epoch, is_chief=run.plan.is_chief,
                                         metrics=run.metrics))
    began = time.perf_counter()
    first_epoch, into_epoch = divmod(resumed, run.steps_per_epoch)
    losses: list[float] = []
    for epoch in range(first_epoch, epochs):
        # The interrupted epoch resumes after the batches it already trained, in the same order.
        skip = into_epoch if epoch == first_epoch else 0
        history = model.fit(epoch_dataset(run, seed, epoch, skip, soft_targets), initial_epoch=epoch,
                            epochs=epoch + 1, callbacks=callbacks, shuffle=False, verbose=0)
        losses += history.history.get("loss", [])
    train_seconds = time.perf_counter() - began
    steps = optimizer_steps(model)
    if checkpoints and run.plan.is_chief and not (state and state.done and state.step == steps):
        with run.metrics.timed(contract.ACTIVITY_CHECKPOINT):
            checkpoints.save(model, step=steps, epoch=epochs, done=True)

    with run.metrics.timed(contract.ACTIVITY_EVALUATE):
        accuracy = float(model.evaluate(test_dataset(run), verbose=0, return_dict=True)["accuracy"])
    run.metrics.set_accuracy(accuracy)
    phase = Phase(name=name, model=model_name, steps=steps, resumed_from_step=resumed, accuracy=accuracy,
                  samples_per_second=clock.steady_samples_per_second(),
                  flops_per_sample=model_flops_per_sample(model_name),
                  final_loss=float(losses[-1]) if losses else None)
    run.phases.append(phase)
    log(f"{name}: {steps} steps, test accuracy {accuracy:.4f}, {phase.samples_per_second:.0f} samples/s "
        f"in {train_seconds:.1f} s")
    return model


# --- outputs ---------------------------------------------------------------------------------------

def save_final_model(run: Run, model) -> None:
    if run.checkpoint_dir is None or not run.plan.is_chief:
        return
    path = run.checkpoint_dir / "keras" / "final.keras"
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(path))
    log(f"final model: {path}")


def memory_device(plan: StrategyPlan) -> str | None:
    """The device whose memory use is exported (leap_accelerator_memory_bytes); None on CPU."""
    if plan.kind == TPU:
        return "TPU:0"
    return "GPU:0" if plan.gpus else None


def checkpointed_steps(checkpoint_dir: Path | None, phases: tuple[str, ...]) -> int:
    """Steps already done according to the phases' checkpoints: where the run's progress resumes."""
    from leap_trainer.tf_checkpoint import PhaseCheckpoints

    if checkpoint_dir is None:
        return 0
    states = (PhaseCheckpoints(checkpoint_dir, phase).latest() for phase in phases)
    return sum(state.step for state in states if state is not None)
