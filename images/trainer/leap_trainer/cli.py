"""`leap-train`: the entrypoint of Leap's training images.

Flags that have an environment variable in contract.py default from it, so a pod rendered by
the operator and a person at a terminal run the same command.

Exit status (contract.py): 0 done, 78 (EXIT_CONFIG) the configuration can never work (a flag, an
environment variable, the dataset, a checkpoint of another run): one line says what and is not
worth a retry; anything else (1, a signal) is a crash that a restart may get past. Run from a
TrainingRun (LEAP_RUN set), messages name the spec fields the flags come from.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import contract as c
from .specs import (DEFAULT_EPOCHS, DEFAULT_LR, DISTILLATION_ALPHA, DISTILLATION_TEACHER, DISTILLATION_TEMPERATURE, MODEL_LAYERS,
                    TEACHER_EPOCH_FACTOR)

FRAMEWORKS = ("pytorch", "tensorflow")
WORKLOADS = ("classifier", "distillation")
DEFAULT_CHECKPOINT_EVERY = 100


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value
    return parse


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _dataset(text: str) -> str:
    if text in ("digits", "synthetic"):
        return text
    if text.endswith(".npz"):
        if not os.path.exists(text):
            raise argparse.ArgumentTypeError(f"file {text!r} does not exist here; give the path of an .npz file "
                                             "that this machine (or pod) has, or digits or synthetic")
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not 'digits', 'synthetic' or a path to a .npz file")


# Where each flag comes from in a TrainingRun (render.render_args), for messages in a pod.
SPEC_FIELDS = {
    "--framework": "spec.framework", "--workload": "spec.workload.kind", "--model": "spec.workload.model",
    "--dataset": "spec.workload.dataset", "--samples": "spec.workload.samples", "--epochs": "spec.workload.epochs",
    "--batch-size": "spec.workload.batchSize", "--lr": "spec.workload.learningRate",
    "--teacher": "spec.workload.distillation.teacher", "--temperature": "spec.workload.distillation.temperature",
    "--alpha": "spec.workload.distillation.alpha", "--metrics-port": "spec.metrics.port",
    "--checkpoint-every": "spec.checkpoint.everySteps", "--checkpoint-dir": "the run's checkpoint directory",
}


class ConfigError(Exception):
    """The configuration can never work: exit EXIT_CONFIG with this one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and EXIT_CONFIG, not the usage text and 2
        raise ConfigError(message.replace("argument ", "", 1))


def in_training_run() -> bool:
    return bool(os.environ.get(c.ENV_RUN))


def speak(message: str) -> str:
    """Name spec fields instead of flags when leap-train runs for a TrainingRun."""
    if not in_training_run():
        return message
    import re

    return re.sub(r"--[a-z][a-z-]*", lambda m: SPEC_FIELDS.get(m.group(0), m.group(0)), message)


def config_error(message: str) -> int:
    message = message.removeprefix("leap-train: ")
    hint = "" if in_training_run() else " (leap-train --help lists the flags)"
    print(f"{c.CONFIG_ERROR_PREFIX}{speak(message)}{hint}", file=sys.stderr, flush=True)
    return c.EXIT_CONFIG


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    p = _Parser(
        prog="leap-train",
        description="Train a Leap workload (PyTorch or TensorFlow) and export throughput metrics.")
    p.add_argument("--framework", choices=FRAMEWORKS, default=env.get(c.ENV_FRAMEWORK) or "pytorch",
                   help=f"default: ${c.ENV_FRAMEWORK} or pytorch")
    p.add_argument("--workload", choices=WORKLOADS, default="classifier")
    p.add_argument("--model", choices=sorted(MODEL_LAYERS), default="mlp",
                   help="mlp = 784-128-10 (the classifier, the distillation student); mlp-large = 784-512-256-10")
    p.add_argument("--dataset", type=_dataset, default="digits",
                   help="digits (shipped: 4000 train / 1000 test), synthetic, or PATH.npz")
    p.add_argument("--samples", type=_positive(int), default=None,
                   help="training samples (synthetic: how many to generate; digits: a prefix)")
    p.add_argument("--epochs", type=_positive(int), default=DEFAULT_EPOCHS)
    p.add_argument("--batch-size", type=_positive(int), default=64, help="per process; global = this x world size")
    p.add_argument("--global-batch-size", type=_positive(int), default=None,
                   help="samples per step across all processes (instead of --batch-size): each takes an equal share")
    p.add_argument("--lr", type=_positive(float), default=DEFAULT_LR,
                   help="peak learning rate (PyTorch: 5%% linear warmup, then cosine decay)")
    p.add_argument("--teacher", choices=sorted(MODEL_LAYERS), default=DISTILLATION_TEACHER, help="distillation teacher")
    p.add_argument("--teacher-epochs", type=_positive(int), default=None,
                   help=f"epochs the distillation teacher trains; default: {TEACHER_EPOCH_FACTOR} x --epochs")
    p.add_argument("--temperature", type=_positive(float), default=DISTILLATION_TEMPERATURE,
                   help="distillation softmax temperature")
    p.add_argument("--alpha", type=_fraction, default=DISTILLATION_ALPHA,
                   help="weight of the distillation (KL) term, 0..1")
    p.add_argument("--checkpoint-dir", default=env.get(c.ENV_CHECKPOINT_DIR) or None,
                   help=f"resume from and save to this directory; default: ${c.ENV_CHECKPOINT_DIR}")
    p.add_argument("--checkpoint-every", type=_non_negative_int, default=None,
                   help=f"steps between checkpoints (0: only at the end); default: ${c.ENV_CHECKPOINT_EVERY} "
                        f"or {DEFAULT_CHECKPOINT_EVERY}")
    p.add_argument("--metrics-port", type=_non_negative_int, default=None,
                   help=f"serve Prometheus metrics here (local rank r uses port + r; 0: off); "
                        f"default: ${c.ENV_METRICS_PORT}")
    p.add_argument("--start-over", action="store_true",
                   help="discard the checkpoints in --checkpoint-dir (of another or a finished run) and train afresh")
    p.add_argument("--summary", default=env.get(c.ENV_SUMMARY) or None,
                   help=f"write the JSON summary here; default: ${c.ENV_SUMMARY} or CHECKPOINT_DIR/summary.json")
    p.add_argument("--compile", action="store_true", help="PyTorch: torch.compile the model")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and shuffling seed")
    return p


def _env_default(parser: argparse.ArgumentParser, args, flag: str, var: str, fallback):
    """Fill an unset flag from its environment variable, failing clearly on a malformed value."""
    dest = flag.lstrip("-").replace("-", "_")
    if getattr(args, dest) is not None:
        return
    raw = os.environ.get(var)
    if raw in (None, ""):
        setattr(args, dest, fallback)
        return
    try:
        setattr(args, dest, _non_negative_int(raw))
    except argparse.ArgumentTypeError as error:
        parser.error(f"environment variable {var} (default of {flag}): {error}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    _env_default(parser, args, "--checkpoint-every", c.ENV_CHECKPOINT_EVERY, DEFAULT_CHECKPOINT_EVERY)
    _env_default(parser, args, "--metrics-port", c.ENV_METRICS_PORT, None)
    if args.metrics_port == 0:
        args.metrics_port = None
    if args.summary is None and args.checkpoint_dir:
        args.summary = os.path.join(args.checkpoint_dir, "summary.json")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except ConfigError as error:
        return config_error(str(error))
    except SystemExit as exit_:
        # leap-train's own refusals raise SystemExit("leap-train: ..."): all configuration errors.
        if isinstance(exit_.code, str):
            return config_error(exit_.code)
        raise


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.framework == "tensorflow":
        from . import keras_train

        return keras_train.main(args)
    from . import distributed

    if distributed.needs_local_launch():
        return distributed.launch_local(argv)
    from . import torch_run

    return torch_run.main(args)


if __name__ == "__main__":
    sys.exit(main())
