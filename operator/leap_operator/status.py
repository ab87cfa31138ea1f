"""A TrainingRun's status as a pure function of (run, job, pods, now), plus what to do next.

No I/O here: the handlers feed in what they observed and carry out the returned decision.
`compute_status` is deterministic, so the same observation always yields the same status and
the same action, which is what makes the operator safe to restart at any moment.

Decisions (Decision.action):
  create     create the Service and this attempt's Job (names are deterministic, so a retry
             or a second operator can never produce a second Job for the same attempt)
  restart    the attempt failed and restarts remain: status moves to attempt+1 (written first),
             then the old Job is deleted; the new Job is created after the backoff
  stop       delete the current Job (deadline exceeded, or failed while workers still run)
  suspend / resume   set the Job's spec.suspend (a queued run: its Kueue Workload's spec.active)
  activate   a queued run resumed by the user: set its Kueue Workload's spec.active back to true
  replace    the run was edited while suspended: status moves to attempt+1 (written first), the
             old Job is deleted, and the new shape's Job is created next (not a restart)
  delete-run ttlSecondsAfterFinished expired
  none       nothing to do; look again after `requeue_after` seconds when set
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from leap_operator import api, names, stall
from leap_trainer import contract

PENDING, RUNNING, RESTARTING, SUCCEEDED, FAILED, SUSPENDED = api.PHASES
TERMINAL = (SUCCEEDED, FAILED)

# Condition types (Kubeflow/JobSet style).
VALID, CREATED, C_RUNNING, C_RESTARTING, C_SUSPENDED, C_SUCCEEDED, C_FAILED = (
    "Valid", "Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
SCHEDULED = "Scheduled"  # every worker pod of the attempt is bound to a node (False: why not)
PODS_CREATED = "PodsCreated"  # set False (with the Job controller's message) when it cannot create pods
PHASE_CONDITION = {RUNNING: C_RUNNING, RESTARTING: C_RESTARTING, SUSPENDED: C_SUSPENDED,
                   SUCCEEDED: C_SUCCEEDED, FAILED: C_FAILED}

# Reasons (machine-readable, CamelCase).
R_INVALID = "InvalidSpec"
R_BACKOFF = "BackoffLimitExceeded"
R_DEADLINE = "DeadlineExceeded"
R_COMPLETED = "JobCompleted"
R_ATTEMPT_FAILED = "AttemptFailed"
R_QUEUED = "Queued"
R_PREEMPTED = "Preempted"
R_RESHAPED = "Reshaped"
R_UNSCHEDULABLE = "Unschedulable"
R_FAILED_CREATE = "FailedCreate"
R_REJECTED = "Rejected"          # the API server refused a child object for good (422, 400)
R_REFUSED = "CreateRefused"      # ... or for now (403: quota, RBAC, an admission webhook)
R_NAME_TAKEN = "NameTaken"       # an object of that name exists and is not this run's
FAILED_CREATE_RECHECK = 5.0      # seconds between looks at the Job's FailedCreate Events
R_STARTING = "PodsStarting"
R_CONFIG = "ConfigError"            # a trainer exited with contract.EXIT_CONFIG: no restart
JOB_POD_FAILURE_POLICY = "PodFailurePolicy"  # the Job's Failed reason when render's FailJob rule matched

DEFAULT_BACKOFF_BASE = 10.0
DEFAULT_BACKOFF_MAX = 300.0


@dataclass
class Decision:
    status: dict
    action: str = "none"
    requeue_after: float | None = None
    reason: str = ""
    message: str = ""
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


# --- small helpers -------------------------------------------------------------------------------

def fmt_time(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: Any) -> dt.datetime | None:
    if not text or not isinstance(text, str):
        return None
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def backoff_seconds(restart: int, base: float = DEFAULT_BACKOFF_BASE, cap: float = DEFAULT_BACKOFF_MAX) -> float:
    """Delay before the `restart`-th restart (1-based): base, 2*base, 4*base, ... capped."""
    return min(cap, base * (2 ** max(0, restart - 1)))


def set_condition(conditions: list[dict], type_: str, status: bool, reason: str, message: str,
                  now: dt.datetime) -> list[dict]:
    """A new list with `type_` set; lastTransitionTime kept when the status did not change."""
    value = "True" if status else "False"
    out, found = [], False
    for cond in conditions:
        if cond.get("type") == type_:
            found = True
            ltt = cond.get("lastTransitionTime") if cond.get("status") == value else None
            out.append({"type": type_, "status": value, "reason": reason, "message": message,
                        "lastTransitionTime": ltt or fmt_time(now)})
        else:
            out.append(dict(cond))
    if not found:
        out.append({"type": type_, "status": value, "reason": reason, "message": message,
                    "lastTransitionTime": fmt_time(now)})
    return out


def get_condition(conditions: list[dict] | None, type_: str) -> dict | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def _job_condition(job: dict | None, type_: str) -> dict | None:
    for cond in ((job or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def pod_index(pod: dict) -> int | None:
    meta = pod.get("metadata") or {}
    value = (meta.get("annotations") or {}).get(contract.JOB_COMPLETION_INDEX_ANNOTATION)
    if value is None:
        value = (meta.get("labels") or {}).get(contract.JOB_COMPLETION_INDEX_ANNOTATION)
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def pod_attempt(pod: dict) -> int | None:
    try:
        return int(((pod.get("metadata") or {}).get("labels") or {}).get(names.LABEL_ATTEMPT))
    except (TypeError, ValueError):
        return None


def pod_failed(pod: dict) -> str | None:
    """Why this pod counts as a failed worker (None if it does not)."""
    status = pod.get("status") or {}
    disruption = next((c for c in status.get("conditions") or []
                       if c.get("type") == "DisruptionTarget" and c.get("status") == "True"), None)
    if status.get("phase") == "Failed":
        return status.get("reason") or (disruption or {}).get("reason") or "PodFailed"
    if (pod.get("metadata") or {}).get("deletionTimestamp") and status.get("reason") == "Evicted":
        return "Evicted"
    if disruption is not None:  # node loss, preemption, eviction by the API: the pod is going
        return disruption.get("reason") or "DisruptionTarget"
    return None


def attempt_failure(job: dict | None, pods: list[dict]) -> tuple[str, str] | None:
    """(reason, message) if this attempt has failed: a gang cannot lose a worker and go on."""
    for type_ in ("Failed", "FailureTarget"):
        cond = _job_condition(job, type_)
        if cond:
            return cond.get("reason") or "JobFailed", cond.get("message") or f"Job {type_}"
    # The pods say why (Evicted, DeletionByPodGC after a node loss, ...); the Job only counts.
    for pod in sorted(pods, key=lambda p: (pod_index(p) is None, pod_index(p) or 0)):
        why = pod_failed(pod)
        if why:
            name = (pod.get("metadata") or {}).get("name", "?")
            return ("Evicted" if why == "Evicted" else "WorkerFailed"), f"pod {name} failed ({why})"
    failed = int(((job or {}).get("status") or {}).get("failed") or 0)
    if failed:
        return "WorkerFailed", f"{failed} worker pod(s) failed"
    return None


def running_pods(job: dict | None, pods: list[dict]) -> int:
    """Worker pods that really run. Job.status.active also counts Pending pods (waiting for a
    node, pulling images), so it cannot tell a gang that trains from one that waits."""
    ready = int(((job or {}).get("status") or {}).get("ready") or 0)  # pods with Ready=True
    running = sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Running"
                  and not (p.get("metadata") or {}).get("deletionTimestamp"))
    return max(ready, running)  # whichever the operator's watch has seen first


def unschedulable(pods: list[dict]) -> tuple[str, str] | None:
    """(pod name, the scheduler's message) for the first worker pod the scheduler cannot place."""
    for pod in sorted(pods, key=lambda p: (pod_index(p) is None, pod_index(p) or 0)):
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                    and cond.get("reason") == R_UNSCHEDULABLE:
                return (pod.get("metadata") or {}).get("name", "?"), cond.get("message") or ""
    return None


def config_error_message(job: dict | None, pods: list[dict]) -> str | None:
    """Why the attempt failed for good, when a worker refused its configuration: its container
    exited with contract.EXIT_CONFIG (seen on the pod, which may come before the Job's condition),
    or the Job failed by the podFailurePolicy rule render.py gives it for that code. None otherwise."""
    for pod in sorted(pods, key=lambda p: pod_index(p) if pod_index(p) is not None else 1 << 30):
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated") or {}
            if terminated.get("exitCode") != contract.EXIT_CONFIG:
                continue
            lines = [line.strip() for line in (terminated.get("message") or "").splitlines() if line.strip()]
            line = next((l for l in reversed(lines) if l.startswith(contract.CONFIG_ERROR_PREFIX)),
                        lines[-1] if lines else "")
            name = (pod.get("metadata") or {}).get("name", "?")
            return f"pod {name} refused its configuration (exit code {contract.EXIT_CONFIG})" + (f": {line}" if line else "")
    cond = _job_condition(job, "Failed") or _job_condition(job, "FailureTarget")
    if cond and cond.get("reason") == JOB_POD_FAILURE_POLICY:
        return cond.get("message") or f"a worker exited with code {contract.EXIT_CONFIG} (configuration error)"
    return None


def worker_counts(spec: dict, job: dict | None, pods: list[dict]) -> dict:
    js = (job or {}).get("status") or {}
    failed_pods = sum(1 for p in pods if pod_failed(p))
    counts = {
        "desired": api.resolved_workers(spec),
        "active": int(js.get("active") or 0),
        "succeeded": int(js.get("succeeded") or 0),
        "failed": max(int(js.get("failed") or 0), failed_pods),
    }
    if js.get("ready") is not None:
        counts["ready"] = int(js["ready"])
    return counts


# --- the status function ---------------------------------------------------------------------------

def compute_status(run: dict, job: dict | None, pods: list[dict], now: dt.datetime, *,
                   problems: list | None = None, backoff_base: float = DEFAULT_BACKOFF_BASE,
                   backoff_max: float = DEFAULT_BACKOFF_MAX, pods_not_created: str | None = None,
                   job_outdated: bool = False, workload_inactive: bool = False,
                   stall_verdict: stall.Verdict | None = None) -> Decision:
    """The run's new status and the next action.

    run: the TrainingRun (spec defaulted; status = the last status written);
    job: this attempt's Job (status.attempt, default 1), or None if it does not exist;
    pods: the pods of this attempt; problems: validate_run()'s result (empty: valid);
    pods_not_created: the Job controller's last FailedCreate message for this attempt's Job, if
    it could not create some of its pods (a missing PriorityClass, a quota, Pod Security...);
    job_outdated: the run was edited since its Job was rendered (only possible while Suspended);
    workload_inactive: a queued run's Kueue Workload has spec.active false (how Leap suspends a
    queued run: Kueue's own way to stop a workload, so Leap never fights Kueue over spec.suspend);
    stall_verdict: stall.judge()'s verdict on the attempt's steps (None: unknown; stall.py).
    """
    spec = run.get("spec") if isinstance(run.get("spec"), dict) else {}
    old = dict(run.get("status") or {}) if isinstance(run.get("status"), dict) else {}
    meta = run.get("metadata") or {}
    conds = [dict(c) for c in old.get("conditions") or [] if isinstance(c, dict)]
    attempt = int(old.get("attempt") or 1)
    restarts = int(old.get("restarts") or 0)
    policy = spec.get("runPolicy") if isinstance(spec.get("runPolicy"), dict) else {}
    backoff_limit = int(policy.get("backoffLimit", 3)) if not problems else 0
    phase_before = old.get("phase")

    new: dict[str, Any] = {k: v for k, v in old.items() if k not in ("progress",)}
    new["attempt"] = attempt
    new["restarts"] = restarts
    if meta.get("generation") is not None:
        new["observedGeneration"] = meta["generation"]

    def finish(phase: str, reason: str, message: str, action: str = "none",
               requeue: float | None = None) -> Decision:
        nonlocal conds
        new["phase"], new["reason"], new["message"] = phase, reason, message
        for p, ctype in PHASE_CONDITION.items():
            if p == phase:
                conds = set_condition(conds, ctype, True, reason, message, now)
            elif get_condition(conds, ctype) is not None or ctype == C_RUNNING:
                conds = set_condition(conds, ctype, False, reason or phase, message, now)
        if phase in TERMINAL and not new.get("completionTime"):
            new["completionTime"] = fmt_time(now)
        new["conditions"] = conds
        decision = Decision(status=new, action=action, requeue_after=requeue, reason=reason, message=message)
        decision.events = transition_events(old, new)
        decision.events += [e for e in stall.events(old.get("conditions"), conds)
                            if (e[0], e[1]) not in {(t, r) for t, r, _ in decision.events}]
        return decision

    # Invalid runs: no children, a condition saying why, terminal (the spec is immutable).
    if problems:
        message = "; ".join(str(p) for p in problems)
        conds = set_condition(conds, VALID, False, R_INVALID, message, now)
        return finish(FAILED, R_INVALID, message)
    conds = set_condition(conds, VALID, True, "Validated", "spec is valid", now)

    if job is not None:
        new["jobName"] = (job.get("metadata") or {}).get("name")
        conds = set_condition(conds, CREATED, True, "JobCreated",
                              f"Job {new['jobName']} created for attempt {attempt}", now)
    elif get_condition(conds, CREATED) is None:
        conds = set_condition(conds, CREATED, False, "JobPending", "the Job is not created yet", now)
    new["workers"] = worker_counts(spec, job, pods)
    verdict = stall_verdict if stall_verdict is not None and stall_verdict.attempt == attempt else None

    # Finished runs stay finished; only the TTL remains.
    if phase_before in TERMINAL:
        ttl = policy.get("ttlSecondsAfterFinished")
        done = parse_time(old.get("completionTime"))
        decision = finish(phase_before, old.get("reason") or "", old.get("message") or "")
        decision.events = []
        if ttl is not None and done is not None:
            left = (done + dt.timedelta(seconds=int(ttl)) - now).total_seconds()
            if left <= 0:
                decision.action = "delete-run"
                decision.events = [("Normal", "TTLExpired",
                                    f"deleting the run {ttl}s after it finished")]
            else:
                decision.requeue_after = left
        if phase_before == FAILED and job is not None and not _job_finished(job) \
                and new["workers"]["active"] > 0:
            decision.action = "stop"
        return decision

    # Deadline: counted from the run's first start, across attempts.
    deadline = policy.get("activeDeadlineSeconds")
    started = parse_time(old.get("startTime"))
    # A Job's own deadline (Jobs rendered before the operator kept the only deadline): since
    # Kubernetes 1.31 the Job controller says FailureTarget first, Failed once its pods are gone.
    # Either way it is the deadline, not a worker failure: no restart.
    for type_ in ("Failed", "FailureTarget"):
        if (_job_condition(job, type_) or {}).get("reason") == R_DEADLINE:
            return finish(FAILED, R_DEADLINE, f"attempt {attempt} ran past activeDeadlineSeconds={deadline}",
                          action="stop" if not _job_finished(job) else "none")
    if deadline and started is not None:
        left = (started + dt.timedelta(seconds=int(deadline)) - now).total_seconds()
        if left <= 0:
            return finish(FAILED, R_DEADLINE, f"the run ran longer than activeDeadlineSeconds={deadline}",
                          action="stop" if job is not None else "none")
    else:
        left = None

    def requeue(value: float | None = None) -> float | None:
        values = [v for v in (value, left) if v is not None]
        return max(0.0, min(values)) if values else None

    # Suspended by the user: the Job is suspended (pods gone) or never created.
    if policy.get("suspend"):
        action = "suspend" if job is not None and not (job.get("spec") or {}).get("suspend") else "none"
        return finish(SUSPENDED, "Suspended", "spec.runPolicy.suspend is true: no pods run", action)

    if job is None:
        # Between attempts: wait for the backoff, counted from when the attempt failed.
        if phase_before == RESTARTING:
            since = parse_time((get_condition(conds, C_RESTARTING) or {}).get("lastTransitionTime"))
            wait = backoff_seconds(restarts, backoff_base, backoff_max)
            remaining = wait - (now - since).total_seconds() if since else 0.0
            if remaining > 0:
                return finish(RESTARTING, old.get("reason") or R_ATTEMPT_FAILED,
                              f"attempt {attempt} starts in {remaining:.0f}s", requeue=requeue(remaining))
            d = finish(RESTARTING, old.get("reason") or R_ATTEMPT_FAILED,
                       f"creating the Job for attempt {attempt}", action="create", requeue=requeue())
            return d
        return finish(PENDING, "Creating", f"creating the Job for attempt {attempt}", action="create",
                      requeue=requeue())

    # The Job exists: read its outcome.
    if _job_condition(job, "Complete") or _job_condition(job, "SuccessCriteriaMet") or (
            new["workers"]["succeeded"] >= new["workers"]["desired"] > 0):
        if not new.get("startTime"):
            new["startTime"] = fmt_time(now)
        conds = stall.clear(conds, stall.R_FINISHED, f"attempt {attempt} finished", set_condition, now)
        return finish(SUCCEEDED, R_COMPLETED, f"all {new['workers']['desired']} workers finished (attempt {attempt})")

    config_error = config_error_message(job, pods)
    if config_error:
        still_running = new["workers"]["active"] > 0 and not _job_finished(job)
        return finish(FAILED, R_CONFIG, f"attempt {attempt} failed and is not restarted: {config_error}; "
                                        "fix the spec and create the run again",
                      action="stop" if still_running else "none")

    # A suspended Job (Kueue preempting it, or our own suspend) has its pods deleted, and the
    # kubelet moves them to Failed on the way out: that is not a worker failure.
    job_suspended = bool((job.get("spec") or {}).get("suspend"))
    failure = attempt_failure(job, pods) if not job_suspended or _job_condition(job, "Failed") else None
    if failure is None and not job_suspended and verdict is not None and verdict.stalled and verdict.restart:
        failure = (stall.R_STALLED, verdict.detail)  # runPolicy.stallDetection.action Restart
        conds = stall.apply(conds, verdict, set_condition, now)
    if failure:
        why, detail = failure
        if restarts < backoff_limit:
            wait = backoff_seconds(restarts + 1, backoff_base, backoff_max)
            new["attempt"], new["restarts"] = attempt + 1, restarts + 1
            new.pop("jobName", None)
            conds = stall.clear(conds, stall.R_RESTARTED, f"attempt {attempt} failed ({detail}); "
                                f"restarted as attempt {attempt + 1}", set_condition, now)
            return finish(RESTARTING, why,
                          f"attempt {attempt} failed ({detail}); restart {restarts + 1}/{backoff_limit} "
                          f"as attempt {attempt + 1} in {wait:g}s", action="restart", requeue=requeue(wait))
        still_running = new["workers"]["active"] > 0 and not _job_finished(job)
        return finish(FAILED, R_BACKOFF,
                      f"attempt {attempt} failed ({detail}) and backoffLimit={backoff_limit} restarts are used up",
                      action="stop" if still_running else "none")

    if job_suspended:
        queue = (spec.get("scheduling") or {}).get("queueName")
        if queue:
            if workload_inactive:  # suspended by the user earlier, now resumed: let Kueue admit it again
                return finish(PENDING, "Resuming", f"reactivating its Kueue Workload in queue {queue}",
                              action="activate", requeue=requeue())
            if new.get("startTime"):  # it ran, and its queue took the nodes back
                return finish(PENDING, R_PREEMPTED, f"preempted: queue {queue} suspended the Job; "
                              f"it resumes (from its last checkpoint) when readmitted", requeue=requeue())
            return finish(PENDING, R_QUEUED, f"waiting for admission by queue {queue}", requeue=requeue())
        if job_outdated:
            # Edited while suspended: the Job's pod template is immutable, so the new shape gets
            # a new Job, as the next attempt. Not a restart: nothing failed.
            new["attempt"] = attempt + 1
            new.pop("jobName", None)
            return finish(PENDING, R_RESHAPED, f"the run was edited while suspended: attempt {attempt + 1} "
                          f"starts in its new shape (from the last checkpoint)", action="replace", requeue=0.0)
        return finish(PENDING, "Resuming", "resuming the suspended Job", action="resume", requeue=requeue())

    # Running means every worker's pod runs; until then the run waits, and says for what.
    workers = new["workers"]
    running = running_pods(job, pods)
    stuck = unschedulable(pods)
    if stuck:
        pod_name, why = stuck
        conds = set_condition(conds, SCHEDULED, False, R_UNSCHEDULABLE, f"pod {pod_name}: {why}", now)
    elif get_condition(conds, SCHEDULED) is not None and pods and len(pods) >= workers["desired"] \
            and all((p.get("spec") or {}).get("nodeName") for p in pods):
        # Said only once it was False: a gang placed at once costs no extra status write.
        conds = set_condition(conds, SCHEDULED, True, "PodsScheduled",
                              f"all {workers['desired']} worker pods are bound to nodes", now)
    missing = len([p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]) < workers["desired"]
    if get_condition(conds, PODS_CREATED) is not None and (not missing or running >= workers["desired"]):
        conds = set_condition(conds, PODS_CREATED, True, "PodsCreated", "the Job created its pods", now)
    if running >= workers["desired"] > 0:
        if not new.get("startTime"):
            new["startTime"] = fmt_time(now)
            if deadline:
                left = float(deadline)
        conds = stall.apply(conds, verdict, set_condition, now)
        if stall.is_stalled(conds):  # still Running (action Report): the reason says it hangs
            return finish(RUNNING, stall.R_STALLED, stall.stalled_message(conds), requeue=requeue())
        return finish(RUNNING, "WorkersActive",
                      f"{running}/{workers['desired']} workers running (attempt {attempt})",
                      requeue=requeue())
    if pods_not_created and missing:
        conds = set_condition(conds, PODS_CREATED, False, R_FAILED_CREATE, pods_not_created, now)
        return finish(PENDING, R_FAILED_CREATE, f"the Job cannot create its pods: {pods_not_created}",
                      requeue=requeue(FAILED_CREATE_RECHECK))
    # Pods still missing: look again, for the Job controller reports failures to create them
    # only as Events (which wake nobody).
    recheck = FAILED_CREATE_RECHECK if missing else None
    if stuck:
        return finish(PENDING, R_UNSCHEDULABLE, f"waiting for nodes: pod {stuck[0]}: {stuck[1]}", requeue=requeue())
    if workers["active"] > 0:
        return finish(PENDING, R_STARTING, f"{running}/{workers['desired']} worker pods running (attempt {attempt})",
                      requeue=requeue(recheck))
    return finish(PENDING, "JobCreated", f"Job {new['jobName']} created; waiting for its pods",
                  requeue=requeue(recheck))


def refused(run: dict, kind: str, name: str, code: int, message: str, now: dt.datetime) -> Decision:
    """The API server refused to create this run's `kind` `name`: what the run says.

    422 and 400 will not change on a retry: the run fails, saying why. Anything else (403 from
    a quota, RBAC or an admission webhook; 409 from a stranger's object of that name) may clear:
    the run stays Pending with a condition naming the refusal, and the operator tries again."""
    old = dict(run.get("status") or {})
    conds = [dict(c) for c in old.get("conditions") or [] if isinstance(c, dict)]
    new = {**old}
    if code == 409:
        reason, text = R_NAME_TAKEN, (f"{kind} {name} exists and is not this run's (no controller ownerReference "
                                      f"to it); Leap neither adopts nor deletes it: rename or remove it")
    else:
        reason, text = (R_REJECTED if code in (400, 422) else R_REFUSED), f"{kind} {name}: {code} {message}"
    conds = set_condition(conds, CREATED, False, reason, text[:1024], now)
    if reason == R_REJECTED:
        new.update(phase=FAILED, reason=reason, message=text[:1024], completionTime=old.get("completionTime") or fmt_time(now))
        conds = set_condition(conds, C_FAILED, True, reason, text[:1024], now)
    else:
        new.update(phase=old.get("phase") or PENDING, reason=reason, message=text[:1024])
    new["conditions"] = conds
    decision = Decision(status=new, reason=reason, message=text)
    if (get_condition(old.get("conditions"), CREATED) or {}).get("reason") != reason:
        decision.events = [("Warning", reason, text[:1024])]
    return decision


def _job_finished(job: dict) -> bool:
    return bool(_job_condition(job, "Complete") or _job_condition(job, "Failed"))


def transition_events(old: dict, new: dict) -> list[tuple[str, str, str]]:
    """One Event per phase transition (and per new attempt)."""
    events: list[tuple[str, str, str]] = []
    if old.get("phase") == new.get("phase") and old.get("attempt", 1) == new.get("attempt"):
        return events
    phase, reason, message = new.get("phase"), new.get("reason") or "", new.get("message") or ""
    warning = phase == FAILED or phase == RESTARTING
    events.append(("Warning" if warning else "Normal", reason or phase or "Updated", f"{phase}: {message}"))
    return events


def status_patch(old: dict, new: dict) -> dict | None:
    """A merge patch from old to new status (None: nothing changed). Progress is not ours here."""
    patch = {}
    for key, value in new.items():
        if key == "progress":
            continue
        if old.get(key) != value:
            before = old.get(key)
            if isinstance(value, dict) and isinstance(before, dict):
                # A merge patch merges maps: drop the keys the new value no longer has.
                value = {**{k: None for k in before if k not in value}, **value}
            patch[key] = value
    for key in old:
        if key not in new and key != "progress" and old.get(key) is not None:
            patch[key] = None
    return patch or None
