"""Goodput: where a run's wall time went. Pure functions; the operator and `leap run` both use them.

A run's wall time (its creation to its end, or to now) is split into parts that add up to it exactly:

  scheduling    waiting for an attempt's workers to run: the run's creation (later attempts: their
                Job's creation) until all pods run; on `leap run`, starting the processes
  restarting    between attempts: an attempt's end until the next attempt's Job exists (teardown, backoff)
  startup       rank 0's process start until its first training step, restore excluded (trainer counter)
  restore       reading checkpoints back (trainer counter)
  checkpoint    writing checkpoints (trainer counter)
  evaluation    held-out evaluation between epochs (trainer counter)
  productive    training steps that the run kept
  lost          training steps redone after a restart: a failed attempt's steps after its last
                checkpoint (its last step seen minus the next attempt's resume step), at that
                attempt's step time; an attempt that checkpointed nothing loses all its steps
  stalled       a hang: the last step until steps resume or the attempt is restarted for it (stalled_total())
  unattributed  the rest of the time workers ran, said out loud: the trainer's own time outside the
                activities above (the final summary, process exit), steps after the last scrape of
                an attempt that failed, an attempt never scraped (a program that exports no counters),
                the training of an attempt while no later attempt has said where it resumed

ratio = productive / wall. Parts that need the trainer's counters are unknown (absent) until some
attempt has reported them; unknown is never shown as 0.

The trainer's counters (contract.M_TIME by activity, contract.M_RESUMED_STEP, contract.M_STEPS) are
read from rank 0's /metrics as last scraped: per attempt, they say how its running time was spent.
Steps after the last scrape, and steps later redone, are priced at the attempt's latest pace (its
train seconds per step between its last two scrapes; the mean over the attempt, warm-up and all,
overstated lost work), else at its mean step time, capped so that an attempt's parts never exceed its running time.

The record (status.goodput) holds the parts and, per attempt, the facts they come from (times and
the last counters), so an operator that restarts carries on from the status alone. It keeps the
last KEEP_ATTEMPTS attempts; older ones (ended, as has the attempt after each) are folded into
`carried` (their parts' totals and the time they reach), which the account starts from.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from leap_trainer import contract

PARTS = ("productive", "scheduling", "startup", "restore", "checkpoint", "evaluation", "lost", "restarting",
         "stalled", "unattributed")
# Parts that only the trainer's counters can tell (absent while no attempt reported them).
TRAINER_PARTS = ("productive", "startup", "restore", "checkpoint", "evaluation", "lost")
# Trainer activity -> part of the account (train is split into productive and lost).
ACTIVITY_PART = {contract.ACTIVITY_STARTUP: "startup", contract.ACTIVITY_RESTORE: "restore",
                 contract.ACTIVITY_CHECKPOINT: "checkpoint", contract.ACTIVITY_EVALUATE: "evaluation"}
# status.goodput keeps this many attempts' facts; older ones are folded into status.goodput.carried
# (totals by part, exact), so a run restarted many times keeps its status writes small.
KEEP_ATTEMPTS = 16
STALLED = "Stalled"   # the condition type another part of the operator sets on a hung run
_WANTED = (contract.M_TIME, contract.M_RESUMED_STEP, contract.M_STEPS)


# --- reading the trainer's counters ------------------------------------------------------------------

def counters_from_metrics_text(text: str) -> dict | None:
    """Rank 0's goodput counters from a /metrics page: {"seconds": {activity: s}, "resumedStep": n,
    "steps": n} (the lowest rank on the page), or None when the page has none (a program that
    exports no leap_train_time_seconds_total). Only the few lines it needs are parsed."""
    from prometheus_client.parser import text_string_to_metric_families

    lines = [line for line in text.splitlines() if line.startswith(_WANTED)]
    if not any(line.startswith(contract.M_TIME) for line in lines):
        return None
    return counters_from_samples(sample for family in text_string_to_metric_families("\n".join(lines) + "\n")
                                 for sample in family.samples)


def counters_from_samples(samples) -> dict | None:
    """counters_from_metrics_text() of a page already parsed (progress.parse_samples(): the operator
    parses each scrape once for progress, hang detection and this)."""
    ranks: dict[float, dict] = {}
    for sample in samples:
        if sample.name not in _WANTED:
            continue
        value = float(sample.value)
        if math.isnan(value) or math.isinf(value):
            continue
        try:
            rank = float(sample.labels.get("rank", 0))
        except ValueError:
            continue
        out = ranks.setdefault(rank, {"seconds": {}})
        if sample.name == contract.M_TIME and sample.labels.get(contract.TIME_LABEL) in contract.TIME_ACTIVITIES:
            out["seconds"][sample.labels[contract.TIME_LABEL]] = round(value, 3)
        elif sample.name == contract.M_RESUMED_STEP:
            out["resumedStep"] = int(value)
        elif sample.name == contract.M_STEPS:
            out["steps"] = int(value)
    found = [ranks[rank] for rank in sorted(ranks) if ranks[rank]["seconds"]]
    return found[0] if found else None


# --- the account ------------------------------------------------------------------------------------

def _known(attempt: dict) -> bool:
    return bool(attempt.get("seconds")) and attempt.get("steps") is not None


# A later attempt exists but none has said where it resumed (not scraped yet, or it never served
# its counters): which of this attempt's steps were kept is not known yet.
UNDECIDED = object()


def _attempt_parts(attempt: dict, window: float, next_resumed, final_step: int | None) -> dict:
    """How one attempt's running window (all workers running until it ended) was spent.
    next_resumed: the step the run resumed at after it (None: no later attempt; UNDECIDED)."""
    parts = dict.fromkeys(PARTS, 0.0)
    if next_resumed is UNDECIDED and _known(attempt):   # its training stays unattributed until known
        attempt = {**attempt, "seconds": {k: v for k, v in attempt["seconds"].items() if k != contract.ACTIVITY_TRAIN},
                   "steps": 0, "resumedStep": 0}
        next_resumed = 0
    if not _known(attempt):
        parts["unattributed"] = window
        return parts
    seconds = attempt["seconds"]
    measured = {part: float(seconds.get(activity) or 0.0) for activity, part in ACTIVITY_PART.items()}
    total = sum(measured.values())
    if total > window > 0:   # clocks of two machines: never more than the window
        measured = {part: value * window / total for part, value in measured.items()}
    elif window <= 0:
        measured = dict.fromkeys(measured, 0.0)
    parts.update(measured)
    room = max(window - sum(measured.values()), 0.0)
    resumed, seen = int(attempt.get("resumedStep") or 0), int(attempt.get("steps") or 0)
    train_seen = float(seconds.get(contract.ACTIVITY_TRAIN) or 0.0)
    end_step = resumed + seen
    if final_step is not None:                               # succeeded: it did every remaining step
        end_step = max(end_step, final_step)
    elif next_resumed is not None:                           # it checkpointed after its last scrape
        end_step = max(end_step, next_resumed)
    done = end_step - resumed
    # Steps not seen in its counters (after the last scrape) and steps later redone are priced at the
    # attempt's latest pace (between its last two scrapes) when known, else at its mean step time.
    step_time = float(attempt.get("recentStepSeconds") or 0.0) or (train_seen / seen if seen > 0 else 0.0)
    train = min(train_seen + max(done - seen, 0) * step_time, room) if done > 0 else min(train_seen, room)
    kept = done if next_resumed is None else min(done, max(next_resumed - resumed, 0))
    if done > 0:
        parts["lost"] = min((done - kept) * step_time, train)
        parts["productive"] = train - parts["lost"]
    else:
        parts["lost"] = train
    parts["unattributed"] = max(window - sum(measured.values()) - train, 0.0)
    return parts


def _resumed_after(later: list[dict]):
    """The step the run resumed at after an attempt: the first later attempt that reported its
    resumedStep (an attempt that died before reporting resumed from the same checkpoints);
    UNDECIDED while none has; None when there is no later attempt."""
    if not later:
        return None
    return next((int(a["resumedStep"]) for a in later if a.get("resumedStep") is not None), UNDECIDED)


def _tally(created: float, end: float, attempts: list[dict], *, carried: dict | None = None,
           after: list[dict] | None = None, final_step: int | None = None) -> tuple[dict, float]:
    """The parts of the attempts' time, up to the end of the last attempt that ran: (totals,
    clock). carried: the record's totals of older attempts (seconds by part, until when); after:
    the attempts that follow the ones given (where they resumed prices the last one's lost work)."""
    totals = dict.fromkeys(PARTS, 0.0)
    clock = created   # time points are taken in order: a part is never negative, the sum telescopes
    if carried:
        for part, value in (carried.get("seconds") or {}).items():
            if part in totals:
                totals[part] += float(value)
        clock = min(max(carried.get("until", created), created), end)

    def advance(to: float | None, part: str) -> None:
        nonlocal clock
        if to is None:
            return
        to = min(max(to, clock), end)
        totals[part] += to - clock
        clock = to

    for index, attempt in enumerate(attempts):
        if index > 0 or carried:
            advance(attempt.get("created"), "restarting")
        running = attempt.get("running")
        advance(running if running is not None else attempt.get("ended", end) or end, "scheduling")
        if running is None:
            continue
        start = clock
        stop = min(max(attempt.get("ended") if attempt.get("ended") is not None else end, start), end)
        later = attempts[index + 1:] + list(after or [])
        next_resumed = _resumed_after(later)
        last = not later and attempt.get("ended") is not None
        parts = _attempt_parts(attempt, stop - start, next_resumed, final_step if last else None)
        for part, value in parts.items():
            totals[part] += value
        clock = stop
    return totals, clock


def account(created: float, end: float, attempts: list[dict], *, final_step: int | None = None,
            stalled_seconds: float = 0.0, carried: dict | None = None) -> dict:
    """The run's account from its timeline (seconds on one clock).

    created: the run's creation; end: when it finished (or now); attempts: in order, each
    {"created", "running" (None: its workers never all ran), "ended" (None: still on), and, when
    rank 0 reported them, "seconds" {activity: s}, "resumedStep", "steps"}; final_step: the run's
    last step when it succeeded (its last attempt did every step up to it); stalled_seconds: time
    with Stalled=True; carried: older attempts already folded into totals ({"seconds": {part: s},
    "until": the clock after them, "known": whether they reported counters}; see fold()).
    Returns {"wallSeconds", "<part>Seconds"..., "ratio"}; trainer parts and the ratio are absent
    while no attempt reported counters.
    """
    totals, clock = _tally(created, end, attempts, carried=carried, final_step=final_step)
    if end > clock:   # after the last attempt: waiting for the next one, or for the first
        ended = attempts[-1].get("ended") is not None if attempts else bool(carried)
        totals["restarting" if ended else "scheduling"] += end - clock

    stalled = min(max(stalled_seconds, 0.0), totals["unattributed"])
    totals["stalled"], totals["unattributed"] = stalled, totals["unattributed"] - stalled
    wall = round(end - created, 3) if end > created else 0.0
    known = bool((carried or {}).get("known")) or any(_known(a) and a.get("running") is not None for a in attempts)
    out: dict[str, Any] = {"wallSeconds": wall}
    for part in PARTS:
        if part in TRAINER_PARTS and not known:
            continue
        out[f"{part}Seconds"] = round(totals[part], 3)
    # Rounding must not break the sum: the remainder takes the rounding error.
    others = sum(v for k, v in out.items() if k.endswith("Seconds") and k not in ("wallSeconds", "unattributedSeconds"))
    out["unattributedSeconds"] = round(max(wall - others, 0.0), 3)
    if known and wall > 0:
        out["ratio"] = round(out["productiveSeconds"] / wall, 4)
    return out


def fold(created: float, older: list[dict], after: list[dict], carried: dict | None = None) -> dict:
    """Older attempts (each ended, as has the first of `after`, the attempts that follow them: their
    facts are final) folded into carried totals, so the record keeps only recent attempts and stays exact.
    Stalled time is not in them: it is the run's, taken out of the remainder at the end."""
    until = older[-1]["ended"]
    totals, clock = _tally(created, until, older, carried=carried, after=after)
    known = bool((carried or {}).get("known")) or any(_known(a) and a.get("running") is not None for a in older)
    return {"attempts": int((carried or {}).get("attempts") or 0) + len(older), "until": clock, "known": known,
            "seconds": {part: round(value, 6) for part, value in totals.items() if value}}


def parts_sum(record: dict) -> float:
    """The sum of a record's parts (equal to its wallSeconds, up to float addition)."""
    return sum(record.get(f"{part}Seconds") or 0.0 for part in PARTS)


# --- the record kept in status.goodput -------------------------------------------------------------

def fmt(t: float) -> str:
    """A time as RFC 3339 with milliseconds (status times elsewhere have seconds; parts are smaller)."""
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse(text: Any) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).timestamp()


def created_at(timestamp: Any, seen: float) -> float:
    """When an object was created, from its creationTimestamp and the first time it was seen.
    Kubernetes keeps whole seconds: an object stamped t was created in [t, t + 1), and not after
    it was seen, so the estimate is min(seen, t + 1) (never before t). Without the narrowing, an
    attempt's Job created 0.8 s after the previous attempt ended would look created before it, and
    its restarting time would vanish into scheduling."""
    stamped = parse(timestamp)
    if stamped is None:
        return seen
    if stamped != int(stamped):   # a timestamp with a fraction needs no narrowing
        return stamped
    return min(max(seen, stamped), stamped + 1.0)


def stalled_total(record: dict, conditions: list[dict] | None, now: float,
                  stalled_since: float | None = None) -> tuple[float, str | None, float]:
    """(stalled seconds so far, the open episode's start, seconds of closed episodes) from the
    record's bookkeeping and the Stalled condition now.

    An episode starts at the run's last step (stalled_since: hang detection's verdict, passed when
    this observation judged the attempt stalled) or, without it, when Stalled turned True; it ends
    when Stalled is no longer True, at the condition's lastTransitionTime. A stall that restarts the
    attempt (runPolicy.stallDetection.action Restart) never shows Stalled=True: its episode is the
    last step to the restart, closed in the observation that decided the restart."""
    closed = float(record.get("stalledClosedSeconds") or 0.0)
    since = parse(record.get("stalledSince"))
    cond = next((c for c in conditions or [] if c.get("type") == STALLED), None)
    open_now = cond is not None and cond.get("status") == "True"
    changed = parse((cond or {}).get("lastTransitionTime"))
    if open_now or stalled_since is not None:
        starts = [t for t in (since, stalled_since, changed if open_now and since is None else None) if t is not None]
        since = min(starts) if starts else now
    if since is not None and not open_now:
        ended = changed if changed is not None and changed >= since else now
        closed += max(ended - since, 0.0)
        since = None
    current = max(now - since, 0.0) if since is not None else 0.0
    return closed + current, fmt(since) if since is not None else None, closed


def recent_pace(before: dict, after: dict) -> dict:
    """{"recentStepSeconds": train seconds per step between two scrapes of one attempt} when it stepped
    in between (else nothing: the last pace known stays)."""
    steps = int(after.get("steps") or 0) - int(before.get("steps") or 0)
    train = (float((after.get("seconds") or {}).get(contract.ACTIVITY_TRAIN) or 0.0)
             - float((before.get("seconds") or {}).get(contract.ACTIVITY_TRAIN) or 0.0))
    if before.get("steps") is None or steps <= 0 or train < 0:
        return {}
    return {"recentStepSeconds": round(train / steps, 9)}


def update(record: dict | None, *, created: float, now: float, attempt: int, phase: str,
           job_created: float | None, counters: tuple[int, dict] | None, conditions: list[dict] | None = None,
           final_step: int | None = None, stalled_since: float | None = None) -> dict:
    """The run's new record (status.goodput) after one observation by the operator.

    record: the last one (None: none yet); attempt, phase: the run's status now; job_created: the
    creation time of this attempt's Job (None: not created yet); counters: (attempt, rank 0's
    counters) as last scraped; final_step: the run's planned steps once it succeeded.
    An attempt is running from the first observation in phase Running, and ended at the first
    observation of a later attempt or of a finished run."""
    record = dict(record or {})
    attempts = [dict(a) for a in record.get("attempts") or []]
    finished = phase in ("Succeeded", "Failed")
    if counters is not None:
        for entry in attempts:
            if entry.get("attempt") == counters[0] and entry.get("ended") is None:
                entry.update(counters[1], **recent_pace(entry, counters[1]))
    for entry in attempts:   # earlier attempts ended when a later one began
        if entry.get("attempt", 0) < attempt and entry.get("ended") is None:
            entry["ended"] = fmt(now)
    entry = next((a for a in attempts if a.get("attempt") == attempt), None)
    if entry is None and job_created is not None:
        entry = {"attempt": attempt, "created": fmt(job_created)}
        if counters is not None and counters[0] == attempt:
            entry.update(counters[1])
        attempts.append(entry)
    if entry is not None and entry.get("ended") is None:
        if phase == "Running" and entry.get("running") is None:
            entry["running"] = fmt(now)
        if finished:
            entry["ended"] = fmt(now)
            entry["succeeded"] = phase == "Succeeded"
    stalled, since, closed = stalled_total(record, conditions, now, stalled_since)
    timeline = [{**a, "created": parse(a.get("created")), "running": parse(a.get("running")),
                 "ended": parse(a.get("ended"))} for a in attempts]
    carried = record.get("carried")
    if carried:
        carried = {**carried, "until": parse(carried.get("until")) or created}
    folded = 0   # the oldest attempts beyond KEEP_ATTEMPTS, each with its successor ended (final facts)
    while (folded < len(attempts) - KEEP_ATTEMPTS and timeline[folded]["ended"] is not None
           and timeline[folded + 1]["ended"] is not None):
        folded += 1
    if folded:
        carried = fold(created, timeline[:folded], timeline[folded:], carried)
        attempts, timeline = attempts[folded:], timeline[folded:]
    end = timeline[-1]["ended"] if finished and timeline and timeline[-1]["ended"] is not None else now
    succeeded = bool(attempts and attempts[-1].get("succeeded"))
    out = account(created, end, timeline, final_step=final_step if succeeded else None, stalled_seconds=stalled,
                  carried=carried)
    out["attempts"] = attempts
    if carried:
        out["carried"] = {**carried, "until": fmt(carried["until"])}
    if since:
        out["stalledSince"] = since
    if closed:
        out["stalledClosedSeconds"] = round(closed, 3)
    return out


def summary_line(record: dict) -> str:
    """'goodput 71.2% of 84.0s: productive 59.8s, scheduling 0.4s, ...': every part, in PARTS'
    order; a part the trainer never reported says unknown."""
    wall = record.get("wallSeconds") or 0.0
    head = f"goodput {100 * record['ratio']:.1f}%" if record.get("ratio") is not None else "goodput unknown"
    shown = [f"{part} {record[f'{part}Seconds']:.1f}s" if record.get(f"{part}Seconds") is not None
             else f"{part} unknown" for part in PARTS]
    return f"{head} of {wall:.1f}s: " + ", ".join(shown)


def observe(record: dict | None, *, run: dict, status: dict, job: dict | None, counters: tuple[int, dict] | None,
            total_steps: int | None, now: dt.datetime, stalled_since: dt.datetime | None = None) -> dict:
    """update() from the operator's objects: the TrainingRun (its creation), the status it is about
    to write (attempt, phase, conditions), the Job it observed (used when it is this attempt's),
    the run's planned steps (status.progress.totalSteps) if known, and the time of the last step of
    an attempt that this observation judged stalled (see stalled_total())."""
    meta = run.get("metadata") or {}
    attempt = int(status.get("attempt") or 1)
    job_meta = (job or {}).get("metadata") or {}
    labels = job_meta.get("labels") or {}
    from leap_operator import names

    this_attempt = job is not None and str(labels.get(names.LABEL_ATTEMPT, attempt)) == str(attempt)
    total = total_steps
    created = parse(meta.get("creationTimestamp")) or now.timestamp()
    return update(record, created=created, now=now.timestamp(), attempt=attempt, phase=status.get("phase") or "",
                  job_created=created_at(job_meta.get("creationTimestamp"), now.timestamp()) if this_attempt else None,
                  counters=counters, conditions=status.get("conditions"), final_step=int(total) if total else None,
                  stalled_since=stalled_since.timestamp() if stalled_since is not None else None)
