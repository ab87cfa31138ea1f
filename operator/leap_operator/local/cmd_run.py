"""`leap run FILE.yaml`: run a TrainingRun on this machine, through the operator's validation and
rendering, with live progress, the cluster's restart policy and a final summary.

Exit status (leap_trainer.contract): 0 succeeded, 2 invalid input and nothing started (as `leap
validate`), 1 the run failed, 128+N when stopped by signal N (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from leap_operator import api, goodput, names
from leap_operator.cmd_validate import LoadError, describe, is_leap_document, load_documents
from leap_operator.local import devices
from leap_operator.local.display import RunInfo, make_display, other_accuracies, percent, summary_table
from leap_operator.local.overrides import OverrideError, apply_overrides, origin_of
from leap_operator.local.plan import WorkerPlan, build_plans
from leap_operator.local.podenv import EnvError
from leap_operator.local.ports import PortPicker
from leap_operator.local.rundir import CheckpointsExist, RunDir, RunDirError, checkpoint_step, has_checkpoint, prepare, unlock
from leap_operator.local.runstatus import StatusWriter
from leap_operator.local.scrape import ProgressMonitor
from leap_operator.local.supervisor import Outcome, StopFlag, supervise
from leap_operator.render import render_children
from leap_operator.validation import defaulted, validate_run
from leap_trainer.contract import EXIT_INVALID


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a TrainingRun YAML file (- for stdin)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="change a field before validation, e.g. --set spec.workers=2 "
                             "--set spec.workload.epochs=3 (YAML values; repeatable)")
    parser.add_argument("--name", help="which TrainingRun to run when FILE holds several")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="run directory for checkpoints, logs and the summary (default: runs/<name>)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the checkpoints an earlier `leap run` left in the run directory")
    start.add_argument("--fresh", action="store_true",
                       help="delete the checkpoints an earlier `leap run` left in the run directory and start over")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run a google-tpu run on CPU when this machine is not a TPU host")
    parser.add_argument("--grace-period", type=float, default=10.0, metavar="SECONDS",
                        help="when stopping workers, seconds between SIGTERM and SIGKILL (default 10)")
    parser.add_argument("--backoff", type=float, default=1.0, metavar="SECONDS",
                        help="wait before the first restart, doubled for each further one (default 1)")
    parser.add_argument("--plain", action="store_true",
                        help="progress as plain lines even on a terminal (the default when output is not one)")
    parser.add_argument("--stream", action="store_true",
                        help="also print every worker's output as it comes, each line prefixed with [worker N]")
    parser.add_argument("-o", "--output", choices=["text", "json"], default="text",
                        help="json: the outcome and the trainer's summary as one JSON object on stdout "
                             "(progress goes to stderr)")


class RunError(Exception):
    """An error before anything starts; the message says what to fix."""


def _select(args: argparse.Namespace) -> tuple[str, dict]:
    try:
        documents = list(load_documents([args.file]))
    except LoadError as exc:
        raise RunError(str(exc)) from None
    runs = [(where, doc) for where, doc in documents if is_leap_document(doc)]
    if not runs:
        raise RunError(f"no {names.KIND} found in {args.file}")
    if args.name:
        runs = [(w, d) for w, d in runs if isinstance(d, dict) and (d.get("metadata") or {}).get("name") == args.name]
        if not runs:
            raise RunError(f"no {names.KIND} named {args.name!r} in {args.file}")
    if len(runs) > 1:
        found = ", ".join(describe(d) for _, d in runs)
        raise RunError(f"{args.file} holds {len(runs)} TrainingRuns ({found}); choose one with --name")
    return runs[0]


def _print_problems(where: str, doc: dict, problems, overrides, err: Console) -> None:
    # The same lines as `leap validate`, plus which --set a problem came from.
    err.print(f"{where} {describe(doc)}: INVALID ({len(problems)} problem{'s' if len(problems) > 1 else ''})",
              highlight=False, markup=False, soft_wrap=True)
    for problem in problems:
        origin = origin_of(problem.field, overrides)
        suffix = f" (from --set {origin.raw})" if origin else ""
        err.print(f"  {problem.field}: {problem.message}{suffix}", highlight=False, markup=False, soft_wrap=True)
    err.print("nothing was started.", highlight=False)


def _final_summary(run_dir: RunDir, outcome: Outcome, run_name: str, total_seconds: float,
                   account: dict | None = None) -> dict | None:
    """The trainer's summary (worker 0's, else any worker's) plus the local facts; saved as summary.json."""
    summary = None
    for worker in sorted(outcome.last_workers or [], key=lambda w: w.index):
        try:
            summary = json.loads(worker.plan.summary_path.read_text())
            break
        except (OSError, ValueError):
            continue
    if summary is None:
        return None
    summary = {**summary, "run": run_name, "attempts": outcome.attempts, "total_seconds": round(total_seconds, 3),
               "goodput": account}
    run_dir.summary.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run(args: argparse.Namespace) -> int:
    # soft_wrap: long paths stay on one line (copyable), in terminals and logs alike.
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    # With --output json, stdout carries only the JSON; what people read goes to stderr.
    out = err if args.output == "json" else Console(file=_PipeSafe(sys.stdout, err), highlight=False, soft_wrap=True)
    try:
        return _run(args, out, err)
    except RunError as exc:
        err.print(f"error: {exc}", markup=False, soft_wrap=True)
        if args.output == "json":
            print(json.dumps({"phase": "Invalid", "exitCode": EXIT_INVALID, "message": str(exc)}, indent=2))
        return EXIT_INVALID


class _PipeSafe:
    """stdout that survives its reader going away (`leap run ... | head`): training goes on, the
    output is dropped, and one line on stderr says so and where the logs are."""

    def __init__(self, stream, err: Console):
        self.stream, self.err, self.closed_reader = stream, err, False

    def write(self, text: str) -> int:
        if not self.closed_reader:
            try:
                self.stream.write(text)
                return len(text)
            except BrokenPipeError:
                self._closed()
        return len(text)

    def flush(self) -> None:
        if not self.closed_reader:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._closed()

    def _closed(self) -> None:
        self.closed_reader = True
        try:  # Python would complain about the unflushable stdout at exit: point it at /dev/null
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except (OSError, ValueError):
            pass
        self.err.print("leap run: the output pipe closed; training goes on (see `leap logs` and `leap runs`)",
                       markup=False)

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")


def _run(args: argparse.Namespace, out: Console, err: Console) -> int:
    where, doc = _select(args)
    try:
        doc, overrides = apply_overrides(doc, args.overrides)
    except OverrideError as exc:
        raise RunError(str(exc)) from None
    problems = validate_run(doc)
    if problems:
        _print_problems(where, doc, problems, overrides, err)
        if args.output == "json":
            print(json.dumps({"phase": "Invalid", "exitCode": EXIT_INVALID,
                              "problems": [{"field": p.field, "message": p.message} for p in problems]}, indent=2))
        return EXIT_INVALID
    run_obj = defaulted(doc)
    spec, name = run_obj["spec"], run_obj["metadata"]["name"]
    if spec["runPolicy"]["suspend"]:
        raise RunError("spec.runPolicy.suspend is true, so the run has no workers; "
                       "--set spec.runPolicy.suspend=false runs it")
    workers = api.resolved_workers(spec)
    procs = api.resolved_procs_per_worker(spec)
    try:
        device = devices.choose(spec["accelerator"]["type"], spec["framework"],
                                int(spec["accelerator"].get("count") or 1), workers, args.allow_cpu)
    except devices.AcceleratorUnavailable as exc:
        raise RunError(str(exc)) from None
    run_dir = RunDir((args.workdir or Path("runs") / name).resolve())

    def plans_for(attempt: int) -> list[WorkerPlan]:
        job = next(c for c in render_children(doc, attempt) if c["kind"] == "Job")
        return build_plans(run_obj, job, attempt, run_dir, device, PortPicker())

    try:
        first = plans_for(1)  # env problems (e.g. a Secret) surface before anything is created
        step = checkpoint_step(run_dir) if args.resume and has_checkpoint(run_dir) else None
        args.deleting = args.fresh and has_checkpoint(run_dir)
        prepare(run_dir.path, name, resume=args.resume, fresh=args.fresh)
    except CheckpointsExist as exc:
        command = " ".join(shlex.quote(a) for a in ["leap", *sys.argv[1:]]) if sys.argv[1:2] == ["run"] \
            else f"leap run {shlex.quote(args.file)}"
        at = f" from step {exc.step}" if exc.step is not None else ""
        raise RunError(f"{exc}; say which you want:\n"
                       f"  {command} --resume    # continue{at}\n"
                       f"  {command} --fresh     # delete them and start over") from None
    except (EnvError, RunDirError) as exc:
        raise RunError(str(exc)) from None
    try:
        return _start(args, out, err, run_dir, run_obj, doc, name, workers, procs, device, first, plans_for, step)
    finally:
        unlock(run_dir.path)


def _start(args, out: Console, err: Console, run_dir: RunDir, run_obj: dict, doc: dict, name: str, workers: int,
           procs: int, device, first: list[WorkerPlan], plans_for, step: int | None) -> int:
    spec = run_obj["spec"]

    workload = spec.get("workload") or {}
    what = (f"{workload['kind']} {workload['model']} on {workload['dataset']}" if workload
            else "command " + " ".join(spec["command"]))
    batch = ""
    if workload and spec["framework"] == "pytorch":
        processes = workers * procs
        batch = f", batch {workload['batchSize']} x {processes} = {workload['batchSize'] * processes} per step"
    elif workload:
        batch = f", batch {workload['batchSize']} per replica"
    out.print(f"leap run: [bold]{escape(name)}[/] ({spec['framework']}, {what}, {workers} worker{'s' if workers > 1 else ''}"
              + (f" x {procs} processes" if procs > 1 else "") + f"{batch}) on {device.used}")
    if device.note:
        out.print(f"note: {device.note}")
    if (spec.get("scheduling") or {}).get("queueName"):
        out.print("note: spec.scheduling.queueName is for the cluster's Kueue; a local run starts at once")
    cores = os.cpu_count() or 1
    if workers * procs > cores:
        out.print(f"warning: {workers * procs} training processes on {cores} CPU core{'s' if cores > 1 else ''}: "
                  "they share the cores and run slower than in a cluster; lower spec.workers or spec.procsPerWorker "
                  "for a quicker local run", markup=False)
    if args.resume and has_checkpoint(run_dir):
        at = f"step {step}" if step is not None else "the latest checkpoint"
        out.print(f"resuming from {at} (checkpoints in {run_dir.checkpoints})", markup=False)
    elif args.resume:
        out.print(f"starting fresh: nothing to resume (no checkpoints in {run_dir.checkpoints})", markup=False)
    else:
        out.print("starting fresh" + (" (earlier checkpoints deleted: --fresh)" if args.deleting else ""), markup=False)
    out.print(f"run directory: {run_dir.path}", markup=False)
    for plan in first:
        urls = ", ".join(f"http://127.0.0.1:{port}/metrics" for port in plan.metrics_ports)
        moved = (f" (spec.metrics.port {spec['metrics']['port']} + {plan.metrics_wanted - spec['metrics']['port']} "
                 f"= {plan.metrics_wanted} was taken)") if plan.metrics_wanted is not None else ""
        out.print(f"metrics: {plan.label}: {urls}{moved}", markup=False)

    info = RunInfo(name=name, framework=spec["framework"], workers=workers, procs_per_worker=procs,
                   device=device.used, epochs=workload.get("epochs"),
                   max_attempts=spec["runPolicy"]["backoffLimit"] + 1,
                   distillation=workload.get("kind") == "distillation")
    status = StatusWriter(run_dir, name=name, file=args.file, workers=workers, max_attempts=info.max_attempts)
    display = make_display(out, info, ProgressMonitor(), live=out.is_terminal and not args.plain,
                           stream=args.stream, status=status)
    stop = StopFlag()
    previous = stop.install()
    started, created = time.monotonic(), time.time()
    display.start()
    try:
        outcome = supervise(lambda attempt: first if attempt == 1 else plans_for(attempt),
                            backoff_limit=spec["runPolicy"]["backoffLimit"], stop=stop, events=display,
                            grace_seconds=args.grace_period, backoff_base=args.backoff,
                            deadline_seconds=spec["runPolicy"].get("activeDeadlineSeconds"))
    except BaseException:
        status.finish("Failed", "Error", "leap run stopped unexpectedly")
        raise
    finally:
        display.stop()
        StopFlag.restore(previous)
    total = time.monotonic() - started
    account = _goodput(created, outcome, display)
    code = _report(outcome, run_dir, name, total, args, out, err, account)
    phase = "Succeeded" if outcome.succeeded else ("Stopped" if outcome.reason == "Interrupted" else "Failed")
    status.finish(phase, outcome.reason, outcome.message)
    return code


def _goodput(created: float, outcome: Outcome, display) -> dict:
    """Where the run's wall time went (goodput.py): the supervisor's timeline and rank 0's counters
    as the display last scraped them, per attempt."""
    attempts = [{**entry, **display.counters.get(entry["attempt"], {})} for entry in outcome.timeline]
    end = (attempts[-1].get("ended") if attempts else None) or time.time()
    record = goodput.account(created, end, attempts, final_step=display.total_steps if outcome.succeeded else None)
    # Each attempt's facts (times as RFC 3339, as in status.goodput), to check the account by.
    times = ("created", "running", "ended")
    record["attempts"] = [{k: goodput.fmt(v) if k in times and v is not None else v for k, v in a.items()}
                          for a in attempts]
    return record


def _report(outcome: Outcome, run_dir: RunDir, name: str, total: float, args, out: Console, err: Console,
            account: dict | None = None) -> int:
    if args.output == "json":
        summary = _final_summary(run_dir, outcome, name, total, account) if outcome.succeeded else None
        print(json.dumps({"run": name, "phase": "Succeeded" if outcome.succeeded else (
            "Stopped" if outcome.reason == "Interrupted" else "Failed"), "reason": outcome.reason,
            "message": outcome.message, "exitCode": outcome.exit_code, "attempts": outcome.attempts,
            "totalSeconds": round(total, 3), "runDirectory": str(run_dir.path), "goodput": account,
            "summary": summary}, indent=2))
        if outcome.succeeded:
            return outcome.exit_code
    if outcome.reason == "Interrupted":
        err.print(f"{name}: {outcome.message}.", markup=False)
        if has_checkpoint(run_dir):
            err.print(f"checkpoints are kept in {run_dir.checkpoints}; "
                      "the same command with --resume continues from them", markup=False, soft_wrap=True)
        return outcome.exit_code
    if not outcome.succeeded:
        err.print(f"{name} failed ({outcome.reason}): {outcome.message}", markup=False, soft_wrap=True)
        if outcome.reason == "ConfigError" and args.resume:
            err.print(f"if the checkpoints in {run_dir.checkpoints} are from another configuration, "
                      "the same command with --fresh instead of --resume starts over", markup=False, soft_wrap=True)
        return outcome.exit_code
    if account is not None:
        out.print(goodput.summary_line(account), markup=False, soft_wrap=True)
    summary = _final_summary(run_dir, outcome, name, total, account)
    if summary is None:
        out.print(f"{escape(name)} succeeded in {total:.1f}s ({outcome.attempts} attempt{'s' if outcome.attempts > 1 else ''}); "
                  "the workers wrote no summary (a custom command need not)")
        return 0
    out.print(summary_table(summary, attempts=outcome.attempts, total_seconds=total, goodput=account))
    accuracy = summary.get("test_accuracy")
    tail = f"test accuracy {percent(accuracy)}" if accuracy is not None else "no test accuracy reported"
    others = other_accuracies(summary)
    if others:
        tail += " (" + ", ".join(f"{label} {percent(value)}" for label, value in others) + ")"
    out.print(f"[bold green]{escape(name)} succeeded[/]: [bold]{tail}[/] (summary: {escape(str(run_dir.summary))})")
    return 0
