"""The PyTorch workloads end to end: data, model, resume, the loop, checkpoints, summary."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import contract as c
from .data import load_dataset
from .devices import cpu_model, peak_flops
from .distributed import Layout, destroy_process_group, init_process_group, layout_from_env
from .flops import training_flops_per_sample
from .metrics import TrainingMetrics
from .specs import layers_of
from .summary import distillation_summary, human_line, write_summary
from .torch_models import build_mlp
from .distill import background, soft_targets
from .specs import TEACHER_SHIFT_PIXELS, teacher_epochs
from .torch_train import (DeviceData, FitResult, ShiftedInputs, cross_entropy, distillation_loss, evaluate, fit,
                          make_optimizer, make_schedule, predict_logits, steps_per_epoch)

FRAMEWORK = "pytorch"


def main(args) -> int:
    started = time.perf_counter()
    layout = layout_from_env()
    device = pick_device(layout)
    if device.type == "cpu" and layout.nproc_per_node > 1:
        # Local processes share this machine's cores; without this each one starts a thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // layout.nproc_per_node))
    if layout.distributed:
        init_process_group(layout, device.type)
    try:
        summary = Run(args, layout, device).execute()
    finally:
        destroy_process_group()
    summary["wall_seconds"] = time.perf_counter() - started
    if layout.is_main:
        write_summary(args.summary, summary)
        print(f"leap-train: {human_line(summary)}", flush=True)
    return 0


def pick_device(layout: Layout) -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", layout.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_model()}, {torch.get_num_threads()} threads)"


class Run:
    def __init__(self, args, layout: Layout, device: torch.device):
        self.args = args
        self.layout = layout
        self.device = device
        self.autocast = torch.bfloat16 if device.type == "cuda" else None
        self.dtype = "bf16" if device.type == "cuda" else "fp32"
        self.name = device_name(device)
        # CPUs have no peak in the table (and a CPU model name must not match a GPU fragment).
        self.peak = peak_flops(self.name, self.dtype) if device.type == "cuda" else None
        self.dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None
        dataset = load_dataset(args.dataset, samples=args.samples, seed=0)
        self.data = DeviceData.from_dataset(dataset, device)
        self.x_train = dataset.x_train  # host copy: distillation's soft targets are computed from it
        self.per_epoch = steps_per_epoch(len(dataset.x_train), args.batch_size, layout.world_size)
        if self.per_epoch == 0:
            raise SystemExit(
                f"leap-train: --batch-size {args.batch_size} x {layout.world_size} process(es) exceeds the "
                f"{len(dataset.x_train)} training samples of --dataset {args.dataset}; lower --batch-size "
                f"or raise --samples")
        self.total_steps = self.per_epoch * args.epochs
        self.metrics: TrainingMetrics | None = None

    def log(self, message: str) -> None:
        if self.layout.is_main:
            print(f"leap-train: {message}", flush=True)

    # --- shared pieces ---------------------------------------------------------------------
    def open_metrics(self, *, total_steps: int, initial_step: int, model: str) -> TrainingMetrics:
        env = os.environ
        port = self.args.metrics_port + self.layout.local_rank if self.args.metrics_port else None
        metrics = TrainingMetrics(
            run=env.get(c.ENV_RUN) or "local", namespace=env.get(c.ENV_NAMESPACE) or "default",
            rank=self.layout.rank, framework=FRAMEWORK,
            accelerator=env.get(c.ENV_ACCELERATOR) or ("nvidia-gpu" if self.device.type == "cuda" else "cpu"),
            port=port, flops_per_sample=training_flops_per_sample(layers_of(model)), peak_flops=self.peak,
            total_steps=total_steps, initial_step=initial_step)
        try:
            metrics.start_server()
        except OSError as error:
            raise SystemExit(f"leap-train: cannot serve metrics on port {port} (rank {self.layout.rank}, "
                             f"--metrics-port + local rank {self.layout.local_rank}): {error}; "
                             f"choose another --metrics-port (or {c.ENV_METRICS_PORT})") from None
        if port:
            self.log(f"metrics on :{port}/metrics (rank {self.layout.rank})")
        return metrics

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

    def train(self, model_name: str, *, phase: str, loss_fn=None, resume: bool = False,
              seed_offset: int = 0, epochs: int | None = None,
              shift_pixels: int = 0) -> tuple[torch.nn.Module, FitResult]:
        """One training phase: build, (resume), fit, (checkpoint). Returns the plain model.

        `shift_pixels` > 0 trains on randomly shifted images (the distillation teacher)."""
        args = self.args
        epochs = epochs or args.epochs
        torch.manual_seed(args.seed + seed_offset)
        model = build_mlp(model_name).to(self.device)
        optimizer = make_optimizer(model, args.lr)
        scheduler = make_schedule(optimizer, self.per_epoch * epochs)
        config = {"workload": args.workload, "phase": phase, "model": model_name, "dataset": args.dataset,
                  "batch_size": args.batch_size, "world_size": self.layout.world_size}
        start_step = 0
        latest = self.dir / ckpt.LATEST if self.dir else None
        if resume and latest is not None:
            state = self.shared(ckpt.load(latest) if self.layout.is_main else None)
            if state is not None:
                ckpt.check_compatible(state, config, latest)
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
                ckpt.save_atomic(ckpt.training_state(model=model, optimizer=optimizer, scheduler=scheduler,
                                                     step=step, epoch=epoch, config=config), latest)

        self.log(f"{phase}: {model_name}, {self.per_epoch * epochs} steps of {args.batch_size} x "
                 f"{self.layout.world_size} on {self.name}")
        trained = ShiftedInputs(model, shift_pixels, background(self.x_train)) if shift_pixels else model
        result = fit(self.wrap(trained), optimizer, scheduler, self.data, batch_size=args.batch_size,
                     epochs=epochs, rank=self.layout.rank, world_size=self.layout.world_size,
                     seed=args.seed, start_step=start_step, autocast_dtype=self.autocast,
                     metrics=self.metrics, loss_fn=loss_fn or cross_entropy,
                     checkpoint_every=args.checkpoint_every if resume else 0,
                     save_checkpoint=save if resume else None, log=self.log)
        if resume:
            save(result.end_step, epochs)
        return model, result

    def save_model(self, model: torch.nn.Module, filename: str) -> None:
        if self.layout.is_main and self.dir is not None:
            ckpt.save_atomic(model.state_dict(), self.dir / filename)

    # --- workloads -------------------------------------------------------------------------
    def execute(self) -> dict:
        if self.args.workload == "distillation":
            summary = self.distillation()
        else:
            summary = self.classifier()
        return summary

    def classifier(self) -> dict:
        latest = self.dir / ckpt.LATEST if self.dir else None
        resumed_step = self.shared(_saved_step(latest) if self.layout.is_main else 0)
        self.metrics = self.open_metrics(total_steps=self.total_steps, initial_step=resumed_step,
                                         model=self.args.model)
        try:
            model, result = self.train(self.args.model, phase="classifier", resume=True)
            self.save_model(model, ckpt.FINAL_MODEL)
            self.metrics.finish()
        finally:
            self.metrics.close()
        return self.summary(result, self.args.model)

    def distillation(self) -> dict:
        """Teacher (trained on shifted images, or loaded), soft targets, then two students from the
        same initial weights, in the same data order for the same steps: alone, and distilled."""
        args = self.args
        teacher_name = args.teacher
        epochs_of_teacher = teacher_epochs(args.epochs, args.teacher_epochs)
        teacher_path = self.dir / ckpt.TEACHER if self.dir else None
        teacher_state = self.shared(ckpt.load(teacher_path) if self.layout.is_main and teacher_path else None)
        student_steps = 2 * self.total_steps
        total = student_steps + (0 if teacher_state is not None else self.per_epoch * epochs_of_teacher)
        self.metrics = self.open_metrics(total_steps=total, initial_step=0, model=args.model)
        try:
            if teacher_state is not None:
                teacher = build_mlp(teacher_name).to(self.device)
                teacher.load_state_dict(teacher_state)
                self.log(f"teacher loaded from {teacher_path}")
            else:
                teacher, _ = self.train(teacher_name, phase="teacher", seed_offset=1000, epochs=epochs_of_teacher,
                                        shift_pixels=TEACHER_SHIFT_PIXELS)
                self.save_model(teacher, ckpt.TEACHER)
            teacher_accuracy = evaluate(teacher, self.data.x_test, self.data.y_test, self.autocast)

            def predict(x):
                return predict_logits(teacher, torch.from_numpy(x).to(self.device)).cpu().numpy()

            targets = torch.from_numpy(soft_targets(predict, self.x_train, args.temperature)).to(self.device)
            # Same initialisation (seed offset), data order and steps for both students: a fair comparison.
            _, alone = self.train(args.model, phase="student-alone", seed_offset=1)
            student, distilled = self.train(
                args.model, phase="student-distilled", seed_offset=1, resume=True,
                loss_fn=distillation_loss(targets, args.temperature, args.alpha))
            self.save_model(student, ckpt.FINAL_MODEL)
            self.metrics.finish()
        finally:
            self.metrics.close()
        summary = self.summary(distilled, args.model)
        summary.update(distillation_summary(
            teacher=teacher_name, teacher_accuracy=teacher_accuracy, student_alone_accuracy=alone.accuracy,
            distilled_accuracy=distilled.accuracy, temperature=args.temperature, alpha=args.alpha,
            teacher_epochs=epochs_of_teacher))
        return summary

    def summary(self, result: FitResult, model_name: str) -> dict:
        # Every rank trains the same number of samples per step: the global rate is world x this rank's.
        samples_per_second = result.samples_per_second * self.layout.world_size
        flops_per_second = samples_per_second * training_flops_per_sample(layers_of(model_name))
        peak_total = self.peak * self.layout.world_size if self.peak else None
        return {
            "framework": FRAMEWORK, "workload": self.args.workload, "model": model_name,
            "dataset": self.args.dataset, "test_accuracy": result.accuracy, "steps": result.end_step,
            "epochs": self.args.epochs, "batch_size": self.args.batch_size,
            "global_batch_size": self.args.batch_size * self.layout.world_size,
            "samples_per_second": samples_per_second, "flops_per_second": flops_per_second,
            "mfu": flops_per_second / peak_total if peak_total else None, "precision": self.dtype,
            "device": self.name, "world_size": self.layout.world_size,
            "resumed_from_step": result.start_step, "final_loss": result.loss,
            "run": os.environ.get(c.ENV_RUN) or "local", "attempt": _attempt(),
        }


def _saved_step(latest: Path | None) -> int:
    state = ckpt.load(latest) if latest is not None else None
    return state["step"] if state else 0


def _attempt() -> int:
    from .distributed import env_int

    return env_int(os.environ, c.ENV_ATTEMPT, 1)
