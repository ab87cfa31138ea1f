"""The PyTorch workloads end to end: data, model, resume, the loop, checkpoints, summary."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import contract as c
from .data import load_dataset
from .devices import Accelerator, cpu_model, cpu_threads, cuda_precision
from .distributed import Layout, destroy_process_group, init_process_group, layout_from_env
from .flops import training_flops_per_sample
from .metrics import TrainingMetrics
from .distill import background
from .orchestrator import (DISTILLATION_PHASES, PHASE_SEED_OFFSETS, Phase, RunDirectory, already_complete_message,
                           build_summary, fail, fingerprint, open_metrics, phase_epochs, planned_steps,
                           resolve_batch_size, train_workload)
from .specs import layers_of
from .summary import human_line, write_summary
from .torch_models import build_mlp
from .torch_train import (DeviceData, FitResult, ShiftedInputs, cross_entropy, distillation_loss, evaluate, fit,
                          make_optimizer, make_schedule, predict_logits, steps_per_epoch)

FRAMEWORK = "pytorch"
# Phases that checkpoint to latest.pt and resume from it (the teacher has teacher.pt; the student
# trained alone, a baseline, is retrained on a restart).
RESUMABLE = ("classifier", "student-distilled")


def main(args) -> int:
    started = time.perf_counter()
    layout = layout_from_env()
    device = pick_device(layout)
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        # The pod's CPU limit (cgroup quota), not the node's cores, shared by the local processes
        # (an explicit OMP_NUM_THREADS wins, as TF_NUM_INTRAOP_THREADS does on the Keras path).
        torch.set_num_threads(cpu_threads(layout.nproc_per_node))
    if layout.distributed:
        init_process_group(layout, device.type)
    try:
        run = Run(args, layout, device)
        summary = run.execute(started)
    finally:
        destroy_process_group()
    if summary is not None and layout.is_main:
        write_summary(args.summary, summary)
        run.directory.complete()
        print(f"leap-train: {human_line(summary)}", flush=True)
    return 0


def check_gpus_per_process(nproc_per_node: int, gpus: int) -> None:
    """One GPU per process: two ranks on one GPU fail inside NCCL, so refuse it up front."""
    if gpus and nproc_per_node > gpus:
        raise fail(f"NPROC_PER_NODE={nproc_per_node} processes but this machine has {gpus} GPU(s): two ranks "
                   f"would share a GPU, which NCCL does not support. Run at most {gpus} process(es) per worker "
                   f"(TrainingRun spec.procsPerWorker, or NPROC_PER_NODE) or give each worker more GPUs "
                   f"(spec.accelerator.count)")


def pick_device(layout: Layout) -> torch.device:
    if torch.cuda.is_available():
        check_gpus_per_process(layout.nproc_per_node, torch.cuda.device_count())
        device = torch.device("cuda", layout.local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_model()}, {torch.get_num_threads()} threads)"


def describe(device: torch.device) -> Accelerator:
    """The name, precision and device count MFU is computed against (one device per process)."""
    if device.type == "cuda":
        precision = cuda_precision(torch.cuda.get_device_capability(device), FRAMEWORK)
        return Accelerator(device_name(device), precision, 1)
    return Accelerator(device_name(device), "fp32", 1)   # CPUs have no peak: MFU unknown


class Run:
    def __init__(self, args, layout: Layout, device: torch.device):
        self.args = args
        self.layout = layout
        self.device = device
        self.accelerator = describe(device)
        self.name = self.accelerator.name
        self.precision = self.accelerator.precision
        self.autocast = torch.bfloat16 if self.precision == "bf16" else None
        # CPUs have no peak in the table (and a CPU model name must not match a GPU's).
        self.peak = self.accelerator.peak if device.type == "cuda" else None
        self.dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None
        self.directory = RunDirectory(self.dir, writer=layout.is_main)
        args.batch_size = resolve_batch_size(args, layout.world_size)
        try:
            dataset = load_dataset(args.dataset, samples=args.samples, seed=0)
        except (ValueError, OSError) as error:
            raise fail(f"--dataset {args.dataset!r}: {error}") from None
        self.train_size = len(dataset.x_train)
        self.data = DeviceData.from_dataset(dataset, device)
        self.x_train = dataset.x_train  # host copy: distillation's soft targets are computed from it
        self.per_epoch = steps_per_epoch(len(dataset.x_train), args.batch_size, layout.world_size)
        if self.per_epoch == 0:
            raise fail(
                f"--batch-size {args.batch_size} x {layout.world_size} process(es) exceeds the "
                f"{len(dataset.x_train)} training samples of --dataset {args.dataset}; lower --batch-size "
                f"or raise --samples")
        self.epochs = phase_epochs(args)   # per phase: the distillation teacher trains longer
        self.metrics: TrainingMetrics | None = None
        self.phases: list[Phase] = []
        self.teacher_state: dict | None = None   # distillation: teacher.pt of an earlier attempt

    def log(self, message: str) -> None:
        if self.layout.is_main:
            print(f"leap-train: {message}", flush=True)

    # --- shared pieces ---------------------------------------------------------------------
    def open_metrics(self, *, initial_step: int, model: str) -> TrainingMetrics:
        env = os.environ
        metrics = open_metrics(
            args=self.args, rank=self.layout.rank, local_rank=self.layout.local_rank, framework=FRAMEWORK,
            accelerator=env.get(c.ENV_ACCELERATOR) or ("nvidia-gpu" if self.device.type == "cuda" else "cpu"),
            flops_per_sample=training_flops_per_sample(layers_of(model)), peak_flops=self.peak,
            total_steps=planned_steps(self.args, self.per_epoch), initial_step=initial_step)
        if metrics.port:
            self.log(f"metrics on :{metrics.port}/metrics (rank {self.layout.rank})")
        return metrics

    def timed(self, activity: str):
        """Count a block's wall time as `activity` in the metrics (once they exist)."""
        return self.metrics.timed(activity) if self.metrics is not None else contextlib.nullcontext()

    def begin(self) -> str:
        """Rank 0 reads D/run.json and decides (new, resume, complete); every rank follows it."""
        status, error = None, None
        if self.layout.is_main:
            try:
                status = self.directory.begin(fingerprint=fingerprint(self.args, self.layout.world_size),
                                              start_over=getattr(self.args, "start_over", False))
            except SystemExit as exc:
                status, error = "error", exc
        status = self.shared(status)
        if status == "error":   # rank 0 printed the one line; every rank exits the same way
            raise error or SystemExit(c.EXIT_CONFIG)
        return status

    def shared(self, obj):
        """Rank 0's object on every rank: only rank 0 needs to see the checkpoint volume."""
        if not self.layout.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.layout.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.layout.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        if self.args.compile:
            model = torch.compile(model)
        return model

    # --- the backend (orchestrator.Backend) ---------------------------------------------------
    def train(self, phase: str, model_name: str, *, epochs: int, shift_pixels: int = 0,
              soft_targets=None) -> torch.nn.Module:
        """One phase. The final phase (classifier, distilled student) checkpoints to latest.pt and
        resumes from it; the teacher is saved to teacher.pt once trained and loaded from it after."""
        if phase == DISTILLATION_PHASES[0] and self.teacher_state is not None:
            teacher = build_mlp(model_name).to(self.device)
            teacher.load_state_dict(self.teacher_state)
            self.log(f"teacher loaded from {self.dir / ckpt.TEACHER}")
            accuracy = evaluate(teacher, self.data.x_test, self.data.y_test, self.autocast)
            steps = self.per_epoch * epochs
            self.phases.append(Phase(name=phase, model=model_name, steps=steps, resumed_from_step=steps,
                                     accuracy=accuracy, samples_per_second=0.0,
                                     flops_per_sample=training_flops_per_sample(layers_of(model_name))))
            return teacher
        loss_fn = None
        if soft_targets is not None:
            targets = torch.from_numpy(soft_targets).to(self.device)
            loss_fn = distillation_loss(targets, self.args.temperature, self.args.alpha)
        model, _ = self.fit_phase(model_name, phase=phase, loss_fn=loss_fn, resume=phase in RESUMABLE,
                                  seed_offset=PHASE_SEED_OFFSETS[phase], epochs=epochs, shift_pixels=shift_pixels)
        if phase == DISTILLATION_PHASES[0]:
            self.save_model(model, ckpt.TEACHER)
        return model

    def teacher_predictor(self, teacher: torch.nn.Module):
        """The frozen teacher as numpy inputs -> numpy logits (for distill.soft_targets)."""
        def predict(x):
            return predict_logits(teacher, torch.from_numpy(x).to(self.device)).float().cpu().numpy()

        return predict

    def save_final(self, model: torch.nn.Module) -> None:
        self.save_model(model, ckpt.FINAL_MODEL)

    def fit_phase(self, model_name: str, *, phase: str, loss_fn=None, resume: bool = False,
                  seed_offset: int = 0, epochs: int, shift_pixels: int = 0) -> tuple[torch.nn.Module, FitResult]:
        """One training phase: build, (resume), fit, (checkpoint). Returns the plain model.

        `shift_pixels` > 0 trains on randomly shifted images (the distillation teacher)."""
        args = self.args
        torch.manual_seed(args.seed + seed_offset)
        model = build_mlp(model_name).to(self.device)
        optimizer = make_optimizer(model, args.lr)
        scheduler = make_schedule(optimizer, self.per_epoch * epochs)
        start_step = 0
        latest = self.dir / ckpt.LATEST if self.dir else None
        if resume and latest is not None:
            with self.timed(c.ACTIVITY_RESTORE):
                state = self.shared(ckpt.load(latest) if self.layout.is_main else None)
            if state is not None:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                if scheduler is not None and state["scheduler"] is not None:
                    scheduler.load_state_dict(state["scheduler"])
                torch.set_rng_state(state["rng"]["torch"])
                start_step = state["step"]
                self.log(f"resumed {phase} from {latest} at step {start_step}")
        if self.metrics is not None:
            self.metrics.flops_per_sample = training_flops_per_sample(layers_of(model_name))

        def save(step: int, epoch: int) -> None:
            if self.layout.is_main and latest is not None:
                with self.timed(c.ACTIVITY_CHECKPOINT):
                    ckpt.save_atomic(ckpt.training_state(model=model, optimizer=optimizer, scheduler=scheduler,
                                                         step=step, epoch=epoch), latest)

        self.log(f"{phase}: {model_name}, {self.per_epoch * epochs} steps of {args.batch_size} x "
                 f"{self.layout.world_size} = {args.batch_size * self.layout.world_size} samples "
                 f"on {self.name} ({self.precision})")
        trained = ShiftedInputs(model, shift_pixels, background(self.x_train)) if shift_pixels else model
        result = fit(self.wrap(trained), optimizer, scheduler, self.data, batch_size=args.batch_size,
                     epochs=epochs, rank=self.layout.rank, world_size=self.layout.world_size,
                     seed=args.seed, start_step=start_step, autocast_dtype=self.autocast,
                     metrics=self.metrics, loss_fn=loss_fn or cross_entropy,
                     checkpoint_every=args.checkpoint_every if resume else 0,
                     save_checkpoint=save if resume else None, log=self.log)
        if resume:
            save(result.end_step, epochs)
        self.phases.append(Phase(
            name=phase, model=model_name, steps=result.end_step, resumed_from_step=result.start_step,
            accuracy=result.accuracy, samples_per_second=result.samples_per_second * self.layout.world_size,
            flops_per_sample=training_flops_per_sample(layers_of(model_name)), final_loss=result.loss))
        return model, result

    def save_model(self, model: torch.nn.Module, filename: str) -> None:
        if self.layout.is_main and self.dir is not None:
            with self.timed(c.ACTIVITY_CHECKPOINT):
                ckpt.save_atomic(model.state_dict(), self.dir / filename)

    # --- the run ----------------------------------------------------------------------------
    def execute(self, started: float) -> dict | None:
        """Train the workload; None when the run in D is already complete (nothing is written)."""
        if self.begin() == "complete":
            self.log(already_complete_message(self.dir, self.args.summary))
            return None
        args = self.args
        distilling = args.workload == "distillation"
        teacher_path = self.dir / ckpt.TEACHER if self.dir and distilling else None
        restoring = time.perf_counter()   # before the metrics exist: added to them once they do
        self.teacher_state = self.shared(ckpt.load(teacher_path) if self.layout.is_main and teacher_path else None)
        latest = self.dir / ckpt.LATEST if self.dir else None
        resumed_step = self.shared(_saved_step(latest) if self.layout.is_main else 0)
        restored_seconds = time.perf_counter() - restoring if (self.teacher_state is not None or resumed_step) else 0.0
        # The run's steps done before this process: a saved teacher's, and the final phase's.
        teacher_steps = self.per_epoch * self.epochs.get(DISTILLATION_PHASES[0], 0)
        done = (teacher_steps if self.teacher_state is not None else 0) + resumed_step
        self.metrics = self.open_metrics(initial_step=done, model=args.teacher if distilling else args.model)
        self.metrics.add_time(c.ACTIVITY_RESTORE, restored_seconds)
        try:
            distillation = train_workload(self, args)
            self.metrics.finish()
        finally:
            self.metrics.close()
        return build_summary(args=args, framework=FRAMEWORK, phases=self.phases, device=self.name,
                             precision=self.precision, devices_per_process=1,
                             world_size=self.layout.world_size, peak_per_device=self.peak,
                             distillation=distillation, wall_seconds=time.perf_counter() - started)


def _saved_step(latest: Path | None) -> int:
    state = ckpt.load(latest) if latest is not None else None
    return state["step"] if state else 0
