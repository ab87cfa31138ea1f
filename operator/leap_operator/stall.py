"""Hang detection: is a running attempt still taking optimizer steps? Pure functions, no I/O.

While a run is Running the operator scrapes rank 0 every progress interval (handlers.py). Each
scrape, answered or not, is an Observation; `advance` folds it into the attempt's Clock; `judge`
turns the Clock and the run's spec.runPolicy.stallDetection into a Verdict; `apply` writes the
Verdict into the Stalled condition, and `events` says which Events that change deserves.

What counts as a stall: the attempt's process has taken at least one step (start-up and
checkpoint restore come before it and are never a stall), and for longer than the threshold
nothing showed it alive on purpose: no new step, and no pause it announced (leap_train_activity
other than train: startup, restore, checkpoint, evaluate; leap_trainer.contract.PAUSE_ACTIVITIES). A worker that stops answering
its metrics endpoint while its pod runs (a SIGSTOPped or wedged process) shows nothing, so its
silence counts. Rank 0 is the one watched: data-parallel ranks step in lockstep, so a hung rank
stops rank 0 at its next collective.

An announced pause that lasts longer than maxPauseSeconds (default an hour) is a stall too: a
checkpoint write stuck on its storage announces its pause for ever.

The threshold: spec timeoutSeconds when set; else STALL_STEP_TIME_MULTIPLE x rank 0's mean step
time (leap_train_step_seconds sum / count), never below minSeconds, and never below
MIN_SCRAPES scrape intervals (the operator cannot see a step more often than it scrapes).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, replace

from leap_operator import api
from leap_trainer import contract

STALLED = "Stalled"                     # the condition type
R_NO_PROGRESS = "NoProgress"            # Stalled=True
R_PROGRESS_RESUMED = "ProgressResumed"  # Stalled=False: steps came again
R_RESTARTED = "Restarted"               # Stalled=False: the stalled attempt was restarted (action Restart)
R_FINISHED = "Finished"                 # Stalled=False: the run finished
R_STALLED = "Stalled"                   # status.reason of a stalled run, and of its restart
MIN_SCRAPES = 3


@dataclass(frozen=True)
class Observation:
    """One scrape of rank 0: answered or not, and what it said."""
    answered: bool
    step: int | None = None                   # the run's step (status.progress.step)
    process_steps: float | None = None        # leap_train_steps_total: this process's own steps
    mean_step_seconds: float | None = None    # leap_train_step_seconds sum / count
    activity: str | None = None               # leap_train_activity: what the process says it does


SILENT = Observation(answered=False)


def observe(samples: list, step: int | None) -> Observation:
    """The Observation in a /metrics page (progress.parse_samples() of it; the lowest rank's
    values); `step` is the run's step as progress.py read it."""
    best: dict[str, tuple[float, float]] = {}   # name -> (rank, value)
    activity: tuple[float, str] | None = None
    step_sum = contract.M_STEP_SECONDS + "_sum"
    step_count = contract.M_STEP_SECONDS + "_count"
    for sample in samples:
        value = float(sample.value)
        if math.isnan(value):
            continue
        try:
            rank = float(sample.labels.get("rank", 0))
        except ValueError:
            rank = math.inf
        if sample.name == contract.M_ACTIVITY:
            if value == 1 and (activity is None or rank < activity[0]):
                activity = (rank, sample.labels.get(contract.TIME_LABEL, ""))
        elif sample.name in (contract.M_STEPS, step_sum, step_count):
            if sample.name not in best or rank < best[sample.name][0]:
                best[sample.name] = (rank, value)
    count = best.get(step_count, (0, 0.0))[1]
    mean = best[step_sum][1] / count if count > 0 and step_sum in best else None
    return Observation(answered=True, step=step, process_steps=best.get(contract.M_STEPS, (0, None))[1],
                       mean_step_seconds=mean, activity=activity[1] if activity else None)


@dataclass(frozen=True)
class Clock:
    """What the operator knows about one attempt's steps."""
    attempt: int
    process_steps: float = 0.0
    step: int | None = None                    # the run's step at the last step seen
    step_time: dt.datetime | None = None       # when that step was first seen (None: no step yet)
    quiet_since: dt.datetime | None = None     # the later of step_time and the end of the last announced pause
    mean_step_seconds: float | None = None
    paused: str | None = None                  # the pause announced at the last scrape (None if silent)
    pause_since: dt.datetime | None = None     # when that pause was first seen


def advance(clock: Clock | None, observation: Observation, attempt: int, now: dt.datetime) -> Clock:
    """The attempt's Clock after one more scrape (a new attempt starts a new Clock)."""
    if clock is None or clock.attempt != attempt:
        clock = Clock(attempt=attempt)
    if not observation.answered:
        return replace(clock, paused=None, pause_since=None)  # silence is not a pause anyone announced
    paused = observation.activity if observation.activity in contract.PAUSE_ACTIVITIES else None
    steps = observation.process_steps
    if steps is not None and steps > 0 and steps != clock.process_steps:
        clock = replace(clock, process_steps=steps, step=observation.step, step_time=now, quiet_since=now)
    elif observation.step is not None and clock.step_time is not None:
        clock = replace(clock, step=observation.step)  # same steps; the run's step may be read anew
    if paused and clock.step_time is not None:
        clock = replace(clock, quiet_since=now)
    mean = observation.mean_step_seconds if observation.mean_step_seconds is not None else clock.mean_step_seconds
    pause_since = (clock.pause_since if clock.paused == paused and clock.pause_since else now) if paused else None
    return replace(clock, paused=paused, pause_since=pause_since, mean_step_seconds=mean)


@dataclass(frozen=True)
class Verdict:
    attempt: int
    stalled: bool
    step: int | None
    since: dt.datetime             # when that step was first seen
    threshold: float
    source: str                    # where the threshold comes from, for the message
    restart: bool                  # spec action Restart
    pause: str | None = None       # a stall inside an announced pause: that pause (evaluate, checkpoint, ...)
    pause_since: dt.datetime | None = None

    @property
    def detail(self) -> str:
        """What was seen, without the attempt: "no optimizer step since step 500 at ... (threshold ...)"."""
        step = f"step {self.step}" if self.step is not None else "its last step"
        if self.stalled and self.pause:
            return (f"no optimizer step since {step} at {_fmt(self.since)}: its announced {self.pause} pause, "
                    f"since {_fmt(self.pause_since or self.since)}, lasts longer than "
                    f"spec.runPolicy.stallDetection.maxPauseSeconds ({self.threshold:g}s)")
        if self.stalled:
            return f"no optimizer step since {step} at {_fmt(self.since)} (threshold {self.threshold:g}s: {self.source})"
        return f"steps again ({step} at {_fmt(self.since)})"

    @property
    def message(self) -> str:
        return f"attempt {self.attempt} took {self.detail}" if self.stalled else f"attempt {self.attempt} {self.detail}"


def threshold(policy: dict, mean_step_seconds: float | None, scrape_interval: float) -> tuple[float, str]:
    """(seconds, where they come from) for spec.runPolicy.stallDetection `policy` (defaulted)."""
    least = MIN_SCRAPES * scrape_interval
    fixed = policy.get("timeoutSeconds")
    if fixed is not None:
        seconds, source = float(fixed), "spec.runPolicy.stallDetection.timeoutSeconds"
    else:
        floor = float(policy.get("minSeconds") or api.DEFAULT_STALL_MIN_SECONDS)
        derived = api.STALL_STEP_TIME_MULTIPLE * mean_step_seconds if mean_step_seconds else None
        steps = (f"{api.STALL_STEP_TIME_MULTIPLE} x the mean step time {mean_step_seconds:.3g}s"
                 if derived is not None else "no step time yet")
        if derived is not None and derived > floor:
            seconds, source = derived, steps
        else:
            seconds, source = floor, f"the floor minSeconds ({steps} is less)" if derived else "the floor minSeconds"
    if least > seconds:
        return least, f"{MIN_SCRAPES} scrape intervals of the operator ({source} is less)"
    return seconds, source


def judge(clock: Clock | None, policy: dict, now: dt.datetime, scrape_interval: float) -> Verdict | None:
    """The attempt's Verdict, or None while unknown (no step seen yet in this attempt)."""
    if clock is None or clock.step_time is None or clock.quiet_since is None:
        return None
    restart = policy.get("action") == "Restart"
    if clock.paused is not None and clock.pause_since is not None:
        # An announced pause is no stall, up to maxPauseSeconds: a write stuck on storage never ends.
        longest = max(float(policy.get("maxPauseSeconds") or api.DEFAULT_MAX_PAUSE_SECONDS), MIN_SCRAPES * scrape_interval)
        stalled = (now - clock.pause_since).total_seconds() > longest
        return Verdict(attempt=clock.attempt, stalled=stalled, step=clock.step, since=clock.step_time,
                       threshold=round(longest, 3), source="spec.runPolicy.stallDetection.maxPauseSeconds",
                       restart=restart, pause=clock.paused if stalled else None, pause_since=clock.pause_since)
    seconds, source = threshold(policy, clock.mean_step_seconds, scrape_interval)
    quiet = (now - clock.quiet_since).total_seconds()
    stalled = quiet > seconds
    return Verdict(attempt=clock.attempt, stalled=stalled, step=clock.step, since=clock.step_time,
                   threshold=round(seconds, 3), source=source, restart=restart)


def apply(conditions: list[dict], verdict: Verdict | None, set_condition, now: dt.datetime) -> list[dict]:
    """The conditions with Stalled set from `verdict` (None: unchanged). Stalled=False is written
    only to clear a stall: a run that never stalled carries no Stalled condition."""
    if verdict is None:
        return conditions
    if verdict.stalled:
        return set_condition(conditions, STALLED, True, R_NO_PROGRESS, verdict.message, now)
    if is_stalled(conditions):
        return set_condition(conditions, STALLED, False, R_PROGRESS_RESUMED, verdict.message, now)
    return conditions


def clear(conditions: list[dict], reason: str, message: str, set_condition, now: dt.datetime) -> list[dict]:
    """Stalled=False for `reason` (restarted, finished) if it was True."""
    if is_stalled(conditions):
        return set_condition(conditions, STALLED, False, reason, message, now)
    return conditions


def is_stalled(conditions: list[dict] | None) -> bool:
    return any(c.get("type") == STALLED and c.get("status") == "True" for c in conditions or [])


def stalled_message(conditions: list[dict] | None) -> str:
    return next((c.get("message") or "" for c in conditions or []
                 if c.get("type") == STALLED and c.get("status") == "True"), "")


def events(old_conditions: list[dict] | None, new_conditions: list[dict] | None) -> list[tuple[str, str, str]]:
    """A Warning when a stall begins, a Normal Event when steps resume (one each per change)."""
    before, after = is_stalled(old_conditions), is_stalled(new_conditions)
    if after and not before:
        return [("Warning", R_STALLED, stalled_message(new_conditions))]
    cond = next((c for c in new_conditions or [] if c.get("type") == STALLED), {})
    if before and not after and cond.get("reason") == R_PROGRESS_RESUMED:
        return [("Normal", R_PROGRESS_RESUMED, cond.get("message") or "")]
    return []


def _fmt(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
