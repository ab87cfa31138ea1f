"""What `leap run` shows: lifecycle lines, live progress, and the final summary.

On a terminal, a rich live table (one row per worker) redraws every second; elsewhere (CI
logs, pipes) the same numbers come as plain lines every few seconds. The final summary comes
from the trainer's JSON summary, with the test accuracy on its own line.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table

from leap_operator import goodput
from rich.text import Text

from leap_operator.api import format_duration
from leap_operator.local.scrape import ProgressMonitor
from leap_operator.local.supervisor import Worker, describe_exit


def si(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


@dataclass
class RunInfo:
    name: str
    framework: str
    workers: int
    procs_per_worker: int
    device: str                  # what the workers run on
    epochs: int | None
    max_attempts: int
    distillation: bool = False   # a distillation workload: show which of its three phases is training


def progress_line(label: str, p: dict, epochs: int | None) -> str:
    parts = [f"{label}:"]
    step, total = p.get("step"), p.get("totalSteps")
    if step is not None:
        parts.append(f"step {int(step)}/{int(total)}" if total else f"step {int(step)}")
    if p.get("percent") is not None:
        parts.append(f"({p['percent']:.0f}%)")
    if p.get("epoch") is not None:
        parts.append(f"epoch {int(p['epoch'])}" + (f"/{epochs}" if epochs else ""))
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4f}")
    if p.get("accuracy") is not None:
        parts.append(f"accuracy {100 * p['accuracy']:.1f}%")
    if p.get("samplesPerSecond") is not None:
        parts.append(f"{p['samplesPerSecond']:,.0f} samples/s")
    if p.get("etaSeconds") is not None:
        parts.append(f"ETA {format_duration(p['etaSeconds'])}")
    return " ".join(parts)


# Distillation trains three models in turn; leap-train names each phase in its log (PyTorch when
# a phase starts, TensorFlow when one ends). The display shows which one is training.
PHASES = (("teacher", "teacher"), ("student-alone", "student alone"), ("distilled", "distilled student"))
_PHASE_STARTED = re.compile(r"^leap-train: (teacher|student-alone|student-distilled): ", re.M)
_PHASE_ENDED = re.compile(r"^\[leap-train tensorflow\] (teacher|student-alone|student-distilled): \d+ steps", re.M)
_TEACHER_LOADED = re.compile(r"^leap-train: teacher loaded from ", re.M)


def distillation_phase(log_text: str) -> str | None:
    """'teacher (1/3)', 'student alone (2/3)' or 'distilled student (3/3)' from worker 0's log."""
    index = None
    for match in re.finditer(f"{_PHASE_STARTED.pattern}|{_PHASE_ENDED.pattern}|{_TEACHER_LOADED.pattern}",
                             log_text, re.M):
        text = match.group(0)
        if _TEACHER_LOADED.match(text):
            index = 1  # a restart found the trained teacher: the student alone is next
        elif started := _PHASE_STARTED.match(text):
            index = ("teacher", "student-alone", "student-distilled").index(started.group(1))
        else:
            ended = _PHASE_ENDED.match(text).group(1)
            index = min(("teacher", "student-alone", "student-distilled").index(ended) + 1, 2)
    if index is None:
        return None
    return f"{PHASES[index][1]} ({index + 1}/3)"


class BaseDisplay:
    def __init__(self, console: Console, info: RunInfo, monitor: ProgressMonitor, stream: bool = False,
                 status=None):
        self.console, self.info, self.monitor = console, info, monitor
        self.attempt = 0
        self.workers: list[Worker] = []
        self.stream, self.status = stream, status
        self._offsets: dict[int, int] = {}
        self._partial: dict[int, bytes] = {}
        self.phase: str | None = None
        self._phase_checked = 0.0
        self.counters: dict[int, dict] = {}   # attempt -> rank 0's goodput counters, as last scraped
        self.total_steps: int | None = None

    # lifecycle -------------------------------------------------------------------------------
    def note(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def attempt_started(self, attempt: int, workers: list[Worker]) -> None:
        self.flush_streams(final=True)
        self.attempt, self.workers = attempt, workers
        self._offsets.clear()
        self.phase = None
        self.monitor.reset()
        if self.status is not None:
            self.status.attempt(attempt)
        self.note(f"attempt {attempt}/{self.info.max_attempts}: started "
                  + ", ".join(f"worker {w.index} (pid {w.pid})" for w in workers)
                  + f"; logs in {escape(str(workers[0].plan.log_path.parent))}")

    def attempt_failed(self, attempt: int, message: str, log_tail: str, retry_in: float | None) -> None:
        self.flush_streams(final=True)
        self.note(f"[bold red]{escape(message)}[/]")
        if log_tail:
            self.console.print(Text("  | " + log_tail.replace("\n", "\n  | "), style="dim"))
        if retry_in is not None:
            self.note(f"restarting all workers from the latest checkpoint in {retry_in:g}s "
                      f"(attempt {attempt + 1}/{self.info.max_attempts})")

    def phase_changed(self, phase: str) -> None:
        self.note(f"distillation: training the {escape(phase)}")

    def stopping(self, workers: list[Worker], grace_seconds: float) -> None:
        self.note(f"stopping {len(workers)} worker{'s' if len(workers) > 1 else ''}: waiting up to {grace_seconds:g}s "
                  "for them to exit (Ctrl-C again stops them at once)")

    def tick(self, workers: list[Worker]) -> None:
        self.after_poll(self.monitor.poll(workers))

    def after_poll(self, latest: dict[int, dict]) -> None:
        self.flush_streams()
        rank0 = latest.get(0) or {}
        if rank0.get("goodput") is not None and self.attempt:
            before = self.counters.get(self.attempt) or {}
            self.counters[self.attempt] = {**before, **rank0["goodput"], **goodput.recent_pace(before, rank0["goodput"])}
        if rank0.get("totalSteps"):
            self.total_steps = int(rank0["totalSteps"])
        if self.info.distillation and self.workers and time.monotonic() - self._phase_checked >= 0.5:
            self._phase_checked = time.monotonic()
            from leap_operator.local.supervisor import log_tail
            phase = distillation_phase(log_tail(self.workers[0].plan.log_path, lines=400))
            if phase and phase != self.phase:
                self.phase = phase
                self.phase_changed(phase)
        if self.status is not None:
            self.status.progress(latest.get(0))

    def flush_streams(self, final: bool = False) -> None:
        """--stream: the workers' new output, line by line, prefixed with [worker N]."""
        if not self.stream:
            return
        for worker in self.workers:
            index = worker.index
            try:
                with open(worker.plan.log_path, "rb") as log:
                    log.seek(self._offsets.get(index, 0))
                    data = log.read(1 << 20)
            except OSError:
                continue
            self._offsets[index] = self._offsets.get(index, 0) + len(data)
            data = self._partial.pop(index, b"") + data
            lines = data.split(b"\n")
            rest = lines.pop()
            if rest and final:
                lines.append(rest)
            elif rest:
                self._partial[index] = rest
            for line in lines:
                self.console.print(Text(f"[{worker.plan.label}] ", style="dim") + Text(line.decode("utf-8", "replace")),
                                   highlight=False, soft_wrap=True)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.flush_streams(final=True)


class PlainDisplay(BaseDisplay):
    """Plain lines for logs: each worker's progress every `every` seconds."""

    def __init__(self, console: Console, info: RunInfo, monitor: ProgressMonitor, every: float = 5.0, **kwargs):
        super().__init__(console, info, monitor, **kwargs)
        self.every = every
        self._printed: dict[int, float] = {}

    def attempt_started(self, attempt: int, workers: list[Worker]) -> None:
        super().attempt_started(attempt, workers)
        self._printed.clear()

    def tick(self, workers: list[Worker]) -> None:
        latest = self.monitor.poll(workers)
        self.after_poll(latest)
        now = time.monotonic()
        for index, progress in sorted(latest.items()):
            if not progress.get("samplesPerSecond"):
                continue  # serving metrics, not training yet
            # The first report at once (training has begun), then every few seconds.
            if now - self._printed.get(index, -1e9) >= self.every:
                self._printed[index] = now
                self.note(escape(progress_line(f"  worker {index}", progress, self.info.epochs)))


class LiveDisplay(BaseDisplay):
    """A table redrawn in place on a terminal."""

    def __init__(self, console: Console, info: RunInfo, monitor: ProgressMonitor, **kwargs):
        super().__init__(console, info, monitor, **kwargs)
        self.live = Live(console=console, get_renderable=self.render, refresh_per_second=2, transient=False)

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        super().stop()
        self.live.refresh()  # the final frame shows the final state, not the last timer redraw
        self.live.stop()

    def note(self, text: str) -> None:
        self.live.console.print(text, highlight=False)

    def render(self):
        info = self.info
        width = self.console.width
        where = (f"{info.framework} on {info.device}, {info.workers} worker{'s' if info.workers > 1 else ''}"
                 + (f" x {info.procs_per_worker} processes" if info.procs_per_worker > 1 else ""))
        state = f"attempt {self.attempt}/{info.max_attempts}" if self.attempt else "starting workers"
        if self.phase:
            state += f"  {self.phase}"
        title = Text.assemble((info.name, "bold"), f"  {state}  {where}", no_wrap=True, overflow="ellipsis")
        title.truncate(width, overflow="ellipsis")
        # Narrow terminals lose the least needed columns rather than wrapping rows.
        columns = ["worker", "progress", "", "step", "epoch", "loss", "samples/s", "FLOP/s", "ETA", "state"]
        if width < 120:
            columns.remove("FLOP/s")
        if width < 100:
            columns.remove("progress")
        if width < 72:
            columns = [c for c in columns if c not in ("epoch", "loss")]
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in columns:
            table.add_column(column, justify="left" if column in ("worker", "progress", "state") else "right",
                             no_wrap=True, overflow="ellipsis")
        latest = self.monitor.latest
        for worker in self.workers:
            p = dict(latest.get(worker.index, {}))
            code = worker.proc.poll()
            if code == 0:
                p.update(self._final(worker, p))
            state = "running" if code is None else ("done" if code == 0 else describe_exit(code))
            pct = p.get("percent")
            cells = {
                "worker": str(worker.index),
                "progress": ProgressBar(total=100, completed=pct or 0, width=24),
                "": f"{pct:.0f}%" if pct is not None else "",
                "step": (f"{int(p['step'])}/{int(p['totalSteps'])}" if p.get("totalSteps") else f"{int(p['step'])}")
                if p.get("step") is not None else "-",   # unknown total steps (an SDK run without them): no "/0"
                "epoch": (f"{int(p['epoch'])}" + (f"/{info.epochs}" if info.epochs else "")) if p.get("epoch") is not None else "-",
                "loss": f"{p['loss']:.4f}" if p.get("loss") is not None else "-",
                "samples/s": f"{p['samplesPerSecond']:,.0f}" if p.get("samplesPerSecond") is not None else "-",
                "FLOP/s": si(p.get("flopsPerSecond"), "FLOP/s"),
                "ETA": format_duration(p["etaSeconds"]) if p.get("etaSeconds") is not None else "-",
                "state": state,
            }
            table.add_row(*(cells[c] for c in columns))
        return Group(title, table)

    def _final(self, worker: Worker, p: dict) -> dict:
        """A finished worker's row from its own summary, not the last scrape (which predates the end)."""
        out: dict = {"etaSeconds": 0.0} if p else {}
        if p.get("totalSteps"):
            # leap-train exits 0 only after its last step; the last scrape may predate it.
            out.update(step=p["totalSteps"], percent=100.0)
        if self.info.epochs and p.get("epoch") is not None:
            out["epoch"] = self.info.epochs
        try:
            import json
            summary = json.loads(worker.plan.summary_path.read_text())
        except (OSError, ValueError):
            return out
        if isinstance(summary.get("final_loss"), (int, float)):
            out["loss"] = summary["final_loss"]  # (throughput in the summary is the whole run's, not this row's)
        if isinstance(summary.get("steps"), int) and summary["steps"] > 0:
            out.update(step=summary["steps"], totalSteps=summary["steps"], percent=100.0)
        return out


def make_display(console: Console, info: RunInfo, monitor: ProgressMonitor, live: bool, **kwargs) -> BaseDisplay:
    return (LiveDisplay if live else PlainDisplay)(console, info, monitor, **kwargs)


# --- final summary -----------------------------------------------------------------------------

_ROWS = (
    ("test_accuracy", "test accuracy", percent),
    ("samples_per_second", "throughput", lambda v: f"{v:,.0f} samples/s"),
    ("flops_per_second", "FLOP/s", lambda v: si(v, "FLOP/s")),
    ("mfu", "MFU", lambda v: f"{100 * v:.2f}%"),
    ("steps", "steps", lambda v: f"{int(v)}"),
    ("batch_size", "batch per process", lambda v: f"{int(v)}"),
    ("global_batch_size", "global batch (per step)", lambda v: f"{int(v)}"),
    ("resumed_from_step", "resumed from step", lambda v: f"{int(v)}" if v else None),
    ("world_size", "world size", lambda v: f"{int(v)}"),
    ("device", "device", str),
    ("wall_seconds", "wall time (last attempt)", lambda v: f"{v:.1f}s"),
)


def goodput_rows(record: dict | None) -> list[tuple[str, str]]:
    """The summary's goodput rows: the ratio, then each part of the wall time (goodput.py)."""
    from leap_operator.goodput import PARTS

    if not record:
        return []
    ratio = record.get("ratio")
    rows = [("goodput", f"{100 * ratio:.1f}% of {record['wallSeconds']:.1f}s" if ratio is not None
             else "unknown (the workers reported no time counters)")]
    for part in PARTS:
        value = record.get(f"{part}Seconds")
        rows.append((f"  {part}", f"{value:.1f}s" if value is not None else "unknown"))
    return rows


def other_accuracies(summary: dict) -> list[tuple[str, float]]:
    """Accuracies besides the headline one: distillation's student_alone_accuracy and
    teacher_accuracy, and whatever other *_accuracy a workload reports."""
    return [(key.replace("_", " "), value) for key, value in summary.items()
            if key != "test_accuracy" and key.endswith("accuracy") and isinstance(value, (int, float))]


def summary_table(summary: dict, *, attempts: int, total_seconds: float, goodput: dict | None = None) -> Table:
    table = Table(title="Summary", show_header=False, title_justify="left", title_style="bold")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, label, fmt in _ROWS:
        text = fmt(summary[key]) if summary.get(key) is not None else None
        if text is not None:
            table.add_row(label, text)
        elif key == "mfu":
            table.add_row(label, "n/a (no known peak FLOP/s for this device)")
        if key == "test_accuracy":
            for other_label, value in other_accuracies(summary):
                table.add_row(other_label, percent(value))
            if isinstance(summary.get("distillation_gain"), (int, float)):
                table.add_row("distillation gain", f"{100 * summary['distillation_gain']:+.1f} points")
    table.add_row("attempts", str(attempts))
    table.add_row("total time", f"{total_seconds:.1f}s")
    for label, text in goodput_rows(goodput):
        table.add_row(label, text)
    return table
