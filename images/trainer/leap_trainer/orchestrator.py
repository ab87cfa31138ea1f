"""What both frameworks' runs share: the run's identity in its checkpoint directory, the
re-run rules, the metrics endpoint, phase bookkeeping and the one summary schema.

The framework backends (torch_run, keras_train) build models and train; everything a user
sees about a run as a whole comes from here, so the two cannot drift.

The checkpoint directory D holds `run.json`: the fingerprint of the training config (every flag
that changes what is trained) and whether the run completed. On start:

- no run.json: a new run; it is written before the first step;
- the same fingerprint, not complete: resume;
- the same fingerprint, complete: "already complete", exit 0, the summary left as it was;
- a different fingerprint: stop, naming each changed flag with its old and new value, and the
  two ways out (another --checkpoint-dir, or --start-over to discard D's checkpoints).

Refusals are configuration errors (cli.py): one `leap-train: configuration error: ...` line and
exit code contract.EXIT_CONFIG (78), which `leap run` does not retry and the operator's Job
podFailurePolicy fails the run on at once.

Distillation's recipe (leap_trainer.distill, constants in specs.py) is also run from here, so both
frameworks train it the same way: the teacher for teacher_epochs on randomly shifted images, its
soft targets computed once (averaged over shifted views), then the student alone and distilled.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol

from . import contract as c
from .metrics import PortInUse, TrainingMetrics
from .specs import TEACHER_SHIFT_PIXELS, WARMUP_FRACTION, teacher_epochs

RUN_FILE = "run.json"
CLASSIFIER_PHASES = ("classifier",)
# Distillation: the teacher (trained, or loaded when a previous attempt saved it), the student
# trained alone (the baseline), then the same student with the distillation loss.
DISTILLATION_PHASES = ("teacher", "student-alone", "student-distilled")
# Added to --seed per phase: both students start from the same weights (a fair comparison).
PHASE_SEED_OFFSETS = {"classifier": 0, "teacher": 1000, "student-alone": 1, "student-distilled": 1}
# Files and folders leap-train writes in D (and --start-over removes); nothing else is touched.
OWNED = (RUN_FILE, "latest.pt", "model.pt", "teacher.pt", "keras", "summary.json")

# Fingerprint field -> the flag that sets it (for error messages).
FINGERPRINT_FLAGS = {
    "framework": "--framework", "workload": "--workload", "model": "--model", "dataset": "--dataset",
    "samples": "--samples", "epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr",
    "seed": "--seed", "world_size": "the number of processes (WORLD_SIZE / replicas)",
    "teacher": "--teacher", "teacher_epochs": "--teacher-epochs", "temperature": "--temperature",
    "alpha": "--alpha",
}

# The one summary schema of both frameworks: key -> meaning (docs/trainer.md lists these).
SUMMARY_KEYS: dict[str, str] = {
    "framework": "pytorch or tensorflow",
    "workload": "classifier or distillation",
    "model": "the trained model (the student in distillation)",
    "dataset": "--dataset",
    "test_accuracy": "accuracy of the final model on the test split",
    "final_loss": "mean training loss of the last reporting window or epoch (null when nothing was trained)",
    "steps": "optimizer steps of the final phase (the run's total, resumed steps included)",
    "epochs": "--epochs",
    "batch_size": "samples per step per process (per replica on TensorFlow)",
    "global_batch_size": "samples per optimizer step across all processes",
    "lr": "--lr: the peak learning rate, not scaled with the global batch",
    "samples_per_second": "training throughput of the final phase, all processes, this process's run only",
    "flops_per_sample": "training FLOPs per sample of the final phase's model (flops.py)",
    "flops_per_second": "samples_per_second x flops_per_sample",
    "mfu": "flops_per_second over the summed peak of all devices at `precision`; null when unknown",
    "precision": "bf16, fp16, tf32 or fp32: the matmul precision actually used",
    "device": "the device name (the peak table reads it)",
    "devices_per_process": "devices one process drives (TensorFlow: all of its worker's)",
    "world_size": "processes (PyTorch) or replicas (TensorFlow) that trained",
    "strategy": "TensorFlow's tf.distribute strategy; null on PyTorch",
    "resumed_from_step": "the final phase's step this process resumed at (0: a fresh start)",
    "wall_seconds": "wall time of this process, start-up included",
    "run": "LEAP_RUN or local",
    "attempt": "LEAP_ATTEMPT (1-based)",
    "phases": "per phase: steps, resumed_from_step, samples_per_second, flops_per_sample, flops_per_second, mfu, accuracy",
    "teacher": "distillation: the teacher model (else null)",
    "teacher_accuracy": "distillation: the teacher's test accuracy (else null)",
    "teacher_epochs": "distillation: epochs the teacher trained (--teacher-epochs, default 3 x --epochs; else null)",
    "student_alone_accuracy": "distillation: the student trained without the teacher (else null)",
    "distillation_gain": "distillation: test_accuracy - student_alone_accuracy, same weights, order and steps (else null)",
    "teacher_logits_flops": "distillation: FLOPs of the teacher's forward passes for the soft targets, all shifted views of the training set (else null)",
    "temperature": "distillation: --temperature (else null)",
    "alpha": "distillation: --alpha (else null)",
}


def lr_factor(step: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) over the peak --lr: both frameworks' schedule."""
    warmup = max(1, int(total_steps * WARMUP_FRACTION))
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def fail(message: str) -> SystemExit:
    """A configuration error: one `leap-train: configuration error: ...` line on stderr (naming spec
    fields under a TrainingRun) and SystemExit(contract.EXIT_CONFIG), to raise."""
    from .cli import config_error

    return SystemExit(config_error(message))


def resolve_batch_size(args, world_size: int, unit: str = "process(es)") -> int:
    """The per-process batch: --global-batch-size split evenly over the world, else --batch-size."""
    total = getattr(args, "global_batch_size", None)
    if not total:
        return args.batch_size
    if total % world_size:
        raise fail(f"--global-batch-size {total} does not split evenly over {world_size} {unit}; "
                   f"use a multiple of {world_size}, or --batch-size for the per-process batch")
    return total // world_size


# --- the run's identity -----------------------------------------------------------------------------

def fingerprint(args, world_size: int) -> dict[str, Any]:
    """Every setting that changes what is trained; a checkpoint is only resumed under the same ones."""
    out = {"framework": args.framework, "workload": args.workload, "model": args.model,
           "dataset": args.dataset, "samples": args.samples, "epochs": args.epochs,
           "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "world_size": world_size}
    if args.workload == "distillation":
        # --teacher-epochs as given (None: the recipe's TEACHER_EPOCH_FACTOR x --epochs).
        out.update(teacher=args.teacher, teacher_epochs=getattr(args, "teacher_epochs", None),
                   temperature=args.temperature, alpha=args.alpha)
    return out


def changed_fields(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [key for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]


@dataclass
class RunDirectory:
    """D/run.json: the fingerprint and whether the run completed. Without D: nothing to remember."""

    path: Path | None
    writer: bool = True     # rank 0 / the chief writes; the others only read

    @property
    def file(self) -> Path | None:
        return self.path / RUN_FILE if self.path else None

    def read(self) -> dict | None:
        if self.file is None or not self.file.exists():
            return None
        try:
            return json.loads(self.file.read_text())
        except ValueError as error:
            raise fail(f"{self.file} is unreadable ({error}); use another --checkpoint-dir or --start-over")

    def begin(self, print_fn=print, *, fingerprint: dict[str, Any], start_over: bool) -> str:
        """'new', 'resume' or 'complete' (see the module's docstring); raises SystemExit on a mismatch."""
        if self.path is None:
            return "new"
        if start_over:
            if self.writer:
                self.discard()
            record = None
        else:
            record = self.read()
        if record is not None:
            saved = record.get("fingerprint", {})
            changed = changed_fields(saved, fingerprint)
            if changed:
                details = "; ".join(f"{FINGERPRINT_FLAGS.get(key, key)}: checkpoint {saved.get(key)!r}, now "
                                    f"{fingerprint.get(key)!r}" for key in changed)
                raise fail(f"--checkpoint-dir {self.path} holds a run trained with other settings ({details}). "
                           f"Resuming would mix two runs: use another --checkpoint-dir, or --start-over to "
                           f"discard its checkpoints and train afresh")
            if record.get("complete"):
                return "complete"
            return "resume"
        if self.writer:
            self._write({"fingerprint": fingerprint, "complete": False})
        return "new"

    def complete(self) -> None:
        if self.file is not None and self.writer:
            record = self.read() or {}
            record["complete"] = True
            self._write(record)

    def discard(self) -> None:
        for name in OWNED:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    def _write(self, record: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        temporary = self.file.with_name(f".{RUN_FILE}.tmp")
        temporary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(temporary, self.file)


def already_complete_message(directory: Path, summary: str | None) -> str:
    where = f"its summary {summary} is left as it was" if summary else "nothing was changed"
    return (f"the run in --checkpoint-dir {directory} is already complete; {where}. "
            f"To train again, use another --checkpoint-dir or add --start-over")


# --- metrics ---------------------------------------------------------------------------------------

def open_metrics(*, args, rank: int, local_rank: int, framework: str, accelerator: str,
                 flops_per_sample: float, peak_flops: float | None, total_steps: int,
                 initial_step: int) -> TrainingMetrics:
    """This process's metrics; a port in use stops the run with one line naming the port and the flag.

    The run's identity comes from the reporting SDK's reading of the env (leap_trainer.sdk), so a
    user's program and leap-train label their series alike; both feed the same TrainingMetrics."""
    from .sdk import settings_from_env

    identity = settings_from_env()
    port = args.metrics_port + local_rank if args.metrics_port else None
    metrics = TrainingMetrics(
        run=identity["run"], namespace=identity["namespace"],
        rank=rank, framework=framework, accelerator=accelerator, port=port,
        flops_per_sample=flops_per_sample, peak_flops=peak_flops, total_steps=total_steps,
        initial_step=initial_step)
    try:
        metrics.start_server()
    except PortInUse as error:
        offset = f" (--metrics-port {args.metrics_port} + local rank {local_rank})" if local_rank else ""
        raise fail(f"cannot serve metrics on port {error.port}{offset}: it is in use ({error}); "
                   f"choose another --metrics-port (or {c.ENV_METRICS_PORT}), or 0 for none") from None
    return metrics


# --- the workload ---------------------------------------------------------------------------------

def phase_epochs(args) -> dict[str, int]:
    """Epochs of each phase of the workload: the distillation teacher trains teacher_epochs."""
    if args.workload != "distillation":
        return {"classifier": args.epochs}
    teacher = teacher_epochs(args.epochs, getattr(args, "teacher_epochs", None))
    return {"teacher": teacher, "student-alone": args.epochs, "student-distilled": args.epochs}


def planned_steps(args, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run (every phase): the metrics' total and progress."""
    return steps_per_epoch * sum(phase_epochs(args).values())


class Backend(Protocol):
    """What a framework provides: train one phase for `epochs` (on images shifted at random by up
    to `shift_pixels`; with `soft_targets`, the distillation loss), resuming it where that framework
    checkpoints it and appending its Phase to `phases`; the frozen teacher as a function of a numpy
    batch of training inputs to its logits; the final model's file."""

    phases: list["Phase"]
    train_size: int
    x_train: Any                 # the training inputs (numpy, n x features): the soft targets' source

    def train(self, phase: str, model_name: str, *, epochs: int, shift_pixels: int = 0,
              soft_targets: Any = None) -> Any: ...

    def teacher_predictor(self, teacher: Any) -> Callable[[Any], Any]: ...

    def save_final(self, model: Any) -> None: ...


def train_workload(backend: Backend, args) -> dict[str, Any] | None:
    """The workload's phases, in order, on any backend; returns distillation's summary facts (None for a classifier)."""
    epochs = phase_epochs(args)
    if args.workload != "distillation":
        backend.save_final(backend.train("classifier", args.model, epochs=epochs["classifier"]))
        return None
    from .distill import soft_target_views, soft_targets
    from .flops import forward_flops_per_sample
    from .specs import layers_of
    from .summary import distillation_summary

    teacher_phase, alone_phase, distilled_phase = DISTILLATION_PHASES
    teacher = backend.train(teacher_phase, args.teacher, epochs=epochs[teacher_phase],
                            shift_pixels=TEACHER_SHIFT_PIXELS)
    # Once, before the students train: outside the training loop and its FLOP/s (see flops.py).
    targets = soft_targets(backend.teacher_predictor(teacher), backend.x_train, args.temperature)
    backend.train(alone_phase, args.model, epochs=epochs[alone_phase])
    student = backend.train(distilled_phase, args.model, epochs=epochs[distilled_phase], soft_targets=targets)
    backend.save_final(student)
    by_name = {phase.name: phase for phase in backend.phases}
    views = soft_target_views(backend.x_train.shape[1])
    facts = distillation_summary(
        teacher=args.teacher, teacher_accuracy=by_name[teacher_phase].accuracy,
        student_alone_accuracy=by_name[alone_phase].accuracy, distilled_accuracy=by_name[distilled_phase].accuracy,
        temperature=args.temperature, alpha=args.alpha, teacher_epochs=epochs[teacher_phase])
    facts["teacher_logits_flops"] = forward_flops_per_sample(layers_of(args.teacher)) * backend.train_size * views
    return facts


# --- phases and the summary ------------------------------------------------------------------------

@dataclass
class Phase:
    """One training phase as both backends report it."""

    name: str
    model: str
    steps: int                   # the phase's step when it ended
    resumed_from_step: int       # where this process picked it up (0: fresh)
    accuracy: float | None
    samples_per_second: float    # global: all processes
    flops_per_sample: float
    final_loss: float | None = None

    def as_dict(self, peak_total: float | None) -> dict[str, Any]:
        flops_per_second = self.samples_per_second * self.flops_per_sample
        return {"model": self.model, "steps": self.steps, "resumed_from_step": self.resumed_from_step,
                "accuracy": self.accuracy, "samples_per_second": self.samples_per_second,
                "flops_per_sample": self.flops_per_sample, "flops_per_second": flops_per_second,
                "mfu": flops_per_second / peak_total if peak_total else None}


def build_summary(*, args, framework: str, phases: list[Phase], device: str, precision: str,
                  devices_per_process: int, world_size: int, peak_per_device: float | None,
                  strategy: str | None = None, distillation: dict[str, Any] | None = None,
                  wall_seconds: float) -> dict[str, Any]:
    """The summary of a run (one schema, SUMMARY_KEYS, for both frameworks). The last phase is the result."""
    # world_size counts processes (PyTorch) or replicas (TensorFlow); each drives devices_per_process
    # devices on PyTorch and one device per replica on TensorFlow.
    devices_total = world_size * devices_per_process if framework == "pytorch" else world_size
    peak_total = peak_per_device * devices_total if peak_per_device else None
    final = phases[-1]
    main = final.as_dict(peak_total)
    distillation = distillation or {}
    summary = {
        "framework": framework, "workload": args.workload, "model": final.model, "dataset": args.dataset,
        "test_accuracy": final.accuracy, "final_loss": final.final_loss, "steps": final.steps,
        "epochs": args.epochs, "batch_size": args.batch_size,
        "global_batch_size": args.batch_size * world_size, "lr": args.lr,
        "samples_per_second": main["samples_per_second"], "flops_per_sample": main["flops_per_sample"],
        "flops_per_second": main["flops_per_second"], "mfu": main["mfu"], "precision": precision,
        "device": device, "devices_per_process": devices_per_process, "world_size": world_size,
        "strategy": strategy, "resumed_from_step": final.resumed_from_step, "wall_seconds": wall_seconds,
        "run": os.environ.get(c.ENV_RUN) or "local", "attempt": _attempt(),
        "phases": {phase.name: phase.as_dict(peak_total) for phase in phases},
        "teacher": distillation.get("teacher"), "teacher_accuracy": distillation.get("teacher_accuracy"),
        "teacher_epochs": distillation.get("teacher_epochs"),
        "student_alone_accuracy": distillation.get("student_alone_accuracy"),
        "distillation_gain": distillation.get("distillation_gain"),
        "teacher_logits_flops": distillation.get("teacher_logits_flops"),
        "temperature": args.temperature if args.workload == "distillation" else None,
        "alpha": args.alpha if args.workload == "distillation" else None,
    }
    assert set(summary) == set(SUMMARY_KEYS), set(summary) ^ set(SUMMARY_KEYS)
    return summary


def _attempt() -> int:
    from .distributed import env_int

    return env_int(os.environ, c.ENV_ATTEMPT, 1)
