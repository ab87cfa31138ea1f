"""What `leap run` shows: lifecycle lines, live progress, and the final summary.

On a terminal, a rich live table (one row per worker) redraws every second; elsewhere (CI
logs, pipes) the same numbers come as plain lines every few seconds. The final summary comes
from the trainer's JSON summary, with the test accuracy on its own line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
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


class BaseDisplay:
    def __init__(self, console: Console, info: RunInfo, monitor: ProgressMonitor):
        self.console, self.info, self.monitor = console, info, monitor
        self.attempt = 0
        self.workers: list[Worker] = []

    # lifecycle -------------------------------------------------------------------------------
    def note(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def attempt_started(self, attempt: int, workers: list[Worker]) -> None:
        self.attempt, self.workers = attempt, workers
        self.monitor.reset()
        self.note(f"attempt {attempt}/{self.info.max_attempts}: started "
                  + ", ".join(f"worker {w.index} (pid {w.pid})" for w in workers)
                  + f"; logs in {escape(str(workers[0].plan.log_path.parent))}")

    def attempt_failed(self, attempt: int, message: str, log_tail: str, retry_in: float | None) -> None:
        self.note(f"[bold red]{escape(message)}[/]")
        if log_tail:
            self.console.print(Text("  | " + log_tail.replace("\n", "\n  | "), style="dim"))
        if retry_in is not None:
            self.note(f"restarting all workers from the latest checkpoint in {retry_in:g}s "
                      f"(attempt {attempt + 1}/{self.info.max_attempts})")

    def tick(self, workers: list[Worker]) -> None:
        self.monitor.poll(workers)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class PlainDisplay(BaseDisplay):
    """Plain lines for logs: each worker's progress every `every` seconds."""

    def __init__(self, console: Console, info: RunInfo, monitor: ProgressMonitor, every: float = 5.0):
        super().__init__(console, info, monitor)
        self.every = every
        self._printed: dict[int, float] = {}

    def attempt_started(self, attempt: int, workers: list[Worker]) -> None:
        super().attempt_started(attempt, workers)
        self._printed.clear()

    def tick(self, workers: list[Worker]) -> None:
        latest = self.monitor.poll(workers)
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

    def __init__(self, console: Console, info: RunInfo, monitor: ProgressMonitor):
        super().__init__(console, info, monitor)
        self.live = Live(console=console, get_renderable=self.render, refresh_per_second=2, transient=False)

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        self.live.stop()

    def note(self, text: str) -> None:
        self.live.console.print(text, highlight=False)

    def render(self):
        info = self.info
        title = (f"[bold]{escape(info.name)}[/]  attempt {self.attempt}/{info.max_attempts}  "
                 f"{info.framework} on {info.device}, {info.workers} worker{'s' if info.workers > 1 else ''}"
                 + (f" x {info.procs_per_worker} processes" if info.procs_per_worker > 1 else ""))
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("worker", "progress", "", "step", "epoch", "loss", "samples/s", "FLOP/s", "ETA", "state"):
            table.add_column(column, justify="left" if column in ("worker", "progress", "state") else "right")
        latest = self.monitor.latest
        for worker in self.workers:
            p = dict(latest.get(worker.index, {}))
            code = worker.proc.poll()
            if code == 0 and p.get("totalSteps"):
                # leap-train exits 0 only after its last step; the last scrape may predate it.
                p.update(step=p["totalSteps"], percent=100.0, etaSeconds=0.0)
            state = "running" if code is None else ("done" if code == 0 else describe_exit(code))
            pct = p.get("percent")
            table.add_row(
                str(worker.index),
                ProgressBar(total=100, completed=pct or 0, width=24),
                f"{pct:.0f}%" if pct is not None else "",
                f"{int(p['step'])}/{int(p.get('totalSteps') or 0)}" if p.get("step") is not None else "-",
                (f"{int(p['epoch'])}" + (f"/{info.epochs}" if info.epochs else "")) if p.get("epoch") is not None else "-",
                f"{p['loss']:.4f}" if p.get("loss") is not None else "-",
                f"{p['samplesPerSecond']:,.0f}" if p.get("samplesPerSecond") is not None else "-",
                si(p.get("flopsPerSecond"), "FLOP/s"),
                format_duration(p["etaSeconds"]) if p.get("etaSeconds") is not None else "-",
                state,
            )
        return Group(Text.from_markup(title), table)


def make_display(console: Console, info: RunInfo, monitor: ProgressMonitor, live: bool) -> BaseDisplay:
    return (LiveDisplay if live else PlainDisplay)(console, info, monitor)


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


def other_accuracies(summary: dict) -> list[tuple[str, float]]:
    """Accuracies besides the headline one: distillation's student_alone_accuracy and
    teacher_accuracy, and whatever other *_accuracy a workload reports."""
    return [(key.replace("_", " "), value) for key, value in summary.items()
            if key != "test_accuracy" and key.endswith("accuracy") and isinstance(value, (int, float))]


def summary_table(summary: dict, *, attempts: int, total_seconds: float) -> Table:
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
    table.add_row("attempts", str(attempts))
    table.add_row("total time", f"{total_seconds:.1f}s")
    return table
