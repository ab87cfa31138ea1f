"""kopf glue: watch TrainingRuns and their Jobs and Pods, and keep the world as compute_status says.

Shape of the controller (level-triggered, one reconcile loop per run):
- kopf indexes hold every Job and Pod labelled leap.dev/run, keyed by (namespace, run). kopf fills
  the indexes before any handler starts, so after an operator restart the first reconcile already
  sees the Jobs that exist and adopts them instead of creating new ones.
- A kopf daemon per TrainingRun (started on create and on resume) reconciles: observe (run,
  Job of the current attempt, its pods) -> status.compute_status() -> write status if it changed
  -> carry out the decision. It sleeps until woken by an event of the run or of its Jobs/Pods,
  or until the next deadline (backoff, activeDeadlineSeconds, TTL).
- Event handlers on the run (update) and on Jobs/Pods map each event to its run and wake it.
- When a run is deleted, its loop removes the children before it ends (the API server's GC does
  too, via ownerReferences). This is done in the daemon, not in an on.delete handler: kopf runs
  daemons under its finalizer anyway, while a change handler would make kopf write its
  last-handled-configuration annotation on every run it creates or resumes (one more write per
  run, and a write to every run at each operator start).
- While the run is Running, the same loop scrapes rank 0's /metrics every progress_interval and
  writes status.progress; the same scrapes feed hang detection (stall.py: condition Stalled).
  (Not a kopf timer: at 1,000 running runs, kopf's per-call machinery for 200 timer calls a
  second took more CPU than all the reconciling; bench/operator_scale.py.)
Job names are deterministic (<run>-a<attempt>) and the attempt is written to status before its
Job is created, so neither a crash nor a retry can create two Jobs for one attempt.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kopf

from leap_operator import api, goodput, names, opmetrics, progress, render, stall
from leap_operator.config import OperatorConfig
from leap_operator.kube import Kube, KubeError
from leap_operator.status import (FAILED_CREATE_RECHECK, compute_status, parse_time, pod_attempt, pod_index,
                                  status_patch)
from leap_operator.status import refused as status_refused
from leap_operator.validation import Problem, defaulted, plain, validate_run

RUNS = (names.GROUP, names.VERSION, names.PLURAL)
JOBS = ("batch", "v1", "jobs")
PODS = ("", "v1", "pods")
OWNED = {names.LABEL_RUN: kopf.PRESENT}
FINALIZER = f"{names.GROUP}/finalizer"
KUEUE_API = "kueue.x-k8s.io/v1beta1"
KUEUE_JOB_UID = "kueue.x-k8s.io/job-uid"  # the label Kueue puts on the Workload of a Job
FAILED_CREATE_GRACE = 3.0  # seconds a new Job gets to create its pods before the operator asks why not


@dataclass
class ControllerConfig:
    backoff_base: float = 10.0        # first gang-restart delay, doubled per restart
    backoff_max: float = 300.0
    progress_interval: float = 5.0    # seconds between scrapes of rank 0
    scrape_timeout: float = 2.0
    error_backoff: float = 1.0        # first retry delay after a failed reconcile
    operator: OperatorConfig = field(default_factory=OperatorConfig.from_env)


@dataclass
class RunState:
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    status: dict | None = None               # the last status this operator wrote
    phase: str | None = None                 # the phase of the last reconcile (written or not)
    created: dict[str, dict] = field(default_factory=dict)  # Jobs created, not yet seen in the index
    deleted: set[str] = field(default_factory=set)           # Jobs deleted by us
    validated: tuple[Any, list] | None = None                 # (generation, problems)
    progress: dict | None = None
    goodput: dict | None = None                               # the last status.goodput computed
    counters: tuple[int, dict] | None = None                  # (attempt, rank 0's goodput counters) last scraped
    errors: int = 0
    refusals: int = 0                                         # refused creates in a row
    failed_create: str | None = None                          # the Job controller's FailedCreate message
    failed_create_checked: float = -math.inf
    stall_clock: stall.Clock | None = None                    # hang detection: what the scrapes saw
    stall_verdict: stall.Verdict | None = None


class Controller:
    def __init__(self, config: ControllerConfig | None = None):
        self.config = config or ControllerConfig()
        self.kube: Kube | None = None
        self.runs: dict[tuple[str, str], RunState] = {}
        self._http: aiohttp.ClientSession | None = None

    def state(self, namespace: str, name: str) -> RunState:
        return self.runs.setdefault((namespace, name), RunState())

    def wake(self, namespace: str | None, name: str | None) -> None:
        state = self.runs.get((namespace or "", name or ""))
        if state is not None:
            state.wake.set()

    # --- one reconciliation ------------------------------------------------------------------

    async def reconcile(self, body: Any, jobs_index: Any, pods_index: Any, logger: logging.Logger) -> float | None:
        raw = plain(body)
        meta = raw.get("metadata") or {}
        namespace, name, uid = meta.get("namespace") or "default", meta["name"], meta.get("uid")
        state = self.state(namespace, name)
        if meta.get("deletionTimestamp"):
            return None

        generation = meta.get("generation")
        if state.validated is None or state.validated[0] != (generation, _spec_key(raw)):
            try:
                found = validate_run(raw, config=self.config.operator)
            except Exception as exc:  # a malformed object must not crash the loop
                found = [Problem("spec", f"cannot be validated: {exc!r}")]
            state.validated = ((generation, _spec_key(raw)), found)
        problems = state.validated[1]

        run = defaulted(raw) if not problems else raw
        run["status"] = dict(state.status if state.status is not None else raw.get("status") or {})
        attempt = int(run["status"].get("attempt") or 1)
        current_name = render.job_name(name, attempt)

        # Observe: Jobs of this run (index, plus our own creations the index has not shown yet).
        jobs: dict[str, dict] = {}
        for job in jobs_index.get((namespace, name), []):
            job_name = job["metadata"]["name"]
            state.created.pop(job_name, None)
            jobs[job_name] = job
        for job_name, job in state.created.items():
            jobs.setdefault(job_name, job)
        current = jobs.get(current_name)
        if current is not None and not _owned_by(current, uid):
            current = None  # a leftover of an earlier run with the same name: stale, deleted below
        pods = [p for p in pods_index.get((namespace, name), []) if pod_attempt(p) == attempt]
        not_created = await self._pods_not_created(namespace, current, pods, state)
        workload = await self._kueue_workload(namespace, run, current)

        decision = compute_status(run, current, pods, _now(), problems=problems,
                                  backoff_base=self.config.backoff_base, backoff_max=self.config.backoff_max,
                                  pods_not_created=not_created, job_outdated=_outdated(current, run, problems),
                                  workload_inactive=workload is not None and (workload.get("spec") or {}).get("active") is False,
                                  stall_verdict=state.stall_verdict)

        # Persist first: the attempt number must be durable before its Job exists. A "create"
        # decision never changes the attempt (restarts persist the new one first), so its status
        # is written with the Job in hand on the next pass: one status write instead of two.
        if decision.action != "create" and status_patch(run["status"], decision.status):
            # The account rides on writes the status makes anyway (never a write of its own).
            verdict = state.stall_verdict
            stalled = verdict is not None and verdict.stalled and (
                decision.action == "restart" or verdict.attempt == int(decision.status.get("attempt") or attempt))
            decision.status["goodput"] = self._goodput(state, raw, decision.status, current,
                                                       stalled_since=verdict.since if stalled else None)
        opmetrics.set_goodput((namespace, name), state.goodput or run["status"].get("goodput"))
        if decision.action == "create":
            decision.events = []
        elif not await self._persist(raw, run, state, decision, logger):
            return None  # the run is gone
        state.phase = decision.status.get("phase")
        opmetrics.set_phase((namespace, name), state.phase)
        verdict = state.stall_verdict
        opmetrics.set_stalled((namespace, name), verdict.since.timestamp() if (
            verdict is not None and verdict.stalled and state.phase == "Running"
            and verdict.attempt == int(decision.status.get("attempt") or attempt)) else None)
        if decision.action == "restart":
            opmetrics.RESTARTS.inc()

        requeue = decision.requeue_after
        new_attempt = int(decision.status.get("attempt") or attempt)
        new_current = render.job_name(name, new_attempt)

        # This run's Jobs of other attempts go, pods with them. Only its own: a Job left by an
        # earlier run of the same name belongs to that run (the garbage collector removes it),
        # and an object someone else labelled is not ours to delete.
        for job_name, job in jobs.items():
            if job_name != new_current and _owned_by(job, uid) and job_name not in state.deleted:
                await self._delete_job(namespace, job_name, state, logger)

        action = decision.action
        if action == "create":
            # No Event here: the next pass reports the new phase with the Job in hand (one Event,
            # reason JobCreated), so a create costs no extra write.
            children = render.render_children(raw, new_attempt, self.config.operator)
            for child in children:
                kind, child_name = child["kind"], child["metadata"]["name"]
                try:
                    created = await self.kube.create(child)
                except KubeError as exc:
                    return await self._refused(raw, run, state, kind, child_name, exc.status, exc.message, logger)
                if not _owned_by(created, uid):  # the name is taken by an object that is not ours
                    return await self._refused(raw, run, state, kind, child_name, 409, "", logger)
                if kind == "Job":
                    state.created[child_name] = _trim(created)
                    state.deleted.discard(child_name)
            state.refusals = 0
            requeue = 0.0  # look again right away with the Job in hand
        elif action == "stop" and current is not None and current_name not in state.deleted:
            await self._delete_job(namespace, current_name, state, logger)
        elif action in ("suspend", "resume") and current is not None:
            if action == "suspend" and workload is not None:
                # A queued run is stopped the way Kueue documents: its Workload inactive. Kueue then
                # suspends the Job itself; patching spec.suspend would fight Kueue's own use of it.
                if (workload.get("spec") or {}).get("active") is not False:
                    await self._set_workload_active(namespace, workload, False)
            else:
                await self.kube.patch("batch/v1", "jobs", namespace, current_name,
                                      {"spec": {"suspend": action == "suspend"}})
        elif action == "activate" and workload is not None:
            await self._set_workload_active(namespace, workload, True)
        elif action == "delete-run":
            await self.kube.delete(names.API_VERSION, names.PLURAL, namespace, name)
            return None
        return requeue

    async def delete_children(self, namespace: str, name: str, uid: str | None, status: dict, jobs_index: Any,
                              logger: logging.Logger) -> None:
        """The run is being deleted: remove its Jobs (pods with them) and its Service.

        A Job the loop created a moment ago may not be in the index yet, so the Job names of all
        of this run's attempts are looked up by name too. Only objects whose controller is this
        run are deleted (with a uid precondition): a stranger's object of the same name stays."""
        state = self.runs.get((namespace, name)) or RunState()
        attempt = max(int((state.status or {}).get("attempt") or 0), int((status or {}).get("attempt") or 1))
        job_names = {job["metadata"]["name"] for job in jobs_index.get((namespace, name), [])}
        job_names |= set(state.created) | {render.job_name(name, a) for a in range(1, attempt + 1)}
        for job_name in sorted(job_names):
            await self._delete_if_ours("batch/v1", "jobs", namespace, job_name, uid)
        await self._delete_if_ours("v1", "services", namespace, render.service_name(name), uid)
        self.runs.pop((namespace, name), None)
        opmetrics.set_phase((namespace, name), None)
        opmetrics.set_goodput((namespace, name), None)
        opmetrics.set_stalled((namespace, name), None)
        logger.info("deleted the children of %s", name)

    async def _persist(self, raw: dict, run: dict, state: "RunState", decision: Any, logger: logging.Logger) -> bool:
        """Write the decision's status if it changed, then post its Events; False if the run is gone."""
        meta = raw.get("metadata") or {}
        patch = status_patch(run["status"], decision.status)
        if patch:
            result = await self.kube.patch(names.API_VERSION, names.PLURAL, meta.get("namespace") or "default",
                                           meta["name"], {"status": patch}, subresource="status")
            if result is None:
                return False
            state.status = decision.status
        for type_, reason, message in decision.events:
            kopf.event(raw, type=type_, reason=reason, message=message)
            (logger.warning if type_ == "Warning" else logger.info)("%s: %s", reason, message)
        return True

    async def _delete_if_ours(self, api_version: str, plural: str, namespace: str, name: str, uid: str | None) -> None:
        obj = await self.kube.get(api_version, plural, namespace, name)
        if obj is not None and _owned_by(obj, uid):
            await self.kube.delete(api_version, plural, namespace, name,
                                   uid=(obj.get("metadata") or {}).get("uid"))

    async def _refused(self, raw: dict, run: dict, state: "RunState", kind: str, child_name: str, code: int,
                       message: str, logger: logging.Logger) -> float | None:
        """The API server refused a child (or its name is taken): say so on the run, and retry
        with backoff unless the refusal is final (the run is then Failed)."""
        decision = status_refused(run, kind, child_name, code, message, _now())
        if not await self._persist(raw, run, state, decision, logger):
            return None
        state.phase = decision.status.get("phase")
        if decision.status.get("phase") == "Failed":
            return None
        state.refusals += 1
        return min(60.0, self.config.error_backoff * 2 ** (state.refusals - 1))

    async def _kueue_workload(self, namespace: str, run: dict, job: dict | None) -> dict | None:
        """The Kueue Workload of a queued run's Job, while that matters (the run is suspended by
        its user, or its Job is suspended); None without Kueue, a queue, or a Workload yet."""
        spec = run.get("spec") or {}
        if job is None or not (spec.get("scheduling") or {}).get("queueName"):
            return None
        if not ((spec.get("runPolicy") or {}).get("suspend") or (job.get("spec") or {}).get("suspend")):
            return None
        uid = (job.get("metadata") or {}).get("uid")
        try:
            found = await self.kube.list(KUEUE_API, "workloads", namespace, label_selector=f"{KUEUE_JOB_UID}={uid}")
        except KubeError as exc:
            if exc.status in (403, 404):  # Kueue is not installed (or not granted): the Job is suspended instead
                return None
            raise
        return found[0] if found else None

    async def _set_workload_active(self, namespace: str, workload: dict, active: bool) -> None:
        await self.kube.patch(KUEUE_API, "workloads", namespace, workload["metadata"]["name"],
                              {"spec": {"active": active}})

    async def _pods_not_created(self, namespace: str, job: dict | None, pods: list[dict],
                                state: "RunState") -> str | None:
        """The Job controller's latest FailedCreate message for this Job, while pods are missing.

        It reports those only as Events on the Job. Looked up only once the Job is a few seconds
        old and still short of pods, and then at most every FAILED_CREATE_RECHECK seconds."""
        if job is None or (job.get("spec") or {}).get("suspend"):
            return None
        desired = int((job.get("spec") or {}).get("completions") or 1)
        created = parse_time((job.get("metadata") or {}).get("creationTimestamp"))
        if len(pods) >= desired or created is None or (_now() - created).total_seconds() < FAILED_CREATE_GRACE:
            state.failed_create = None
            return None
        now = time.monotonic()
        if now - state.failed_create_checked < FAILED_CREATE_RECHECK:
            return state.failed_create
        state.failed_create_checked = now
        meta = job.get("metadata") or {}
        selector = (f"involvedObject.kind=Job,involvedObject.name={meta.get('name')},reason=FailedCreate"
                    + (f",involvedObject.uid={meta['uid']}" if meta.get("uid") else ""))
        events = [e for e in await self.kube.list("v1", "events", namespace, field_selector=selector)
                  if e.get("reason") == "FailedCreate"
                  and (e.get("involvedObject") or {}).get("name") == meta.get("name")]  # whatever the server filtered
        latest = max(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "", default=None)
        state.failed_create = (latest or {}).get("message")
        return state.failed_create

    async def _delete_job(self, namespace: str, job_name: str, state: RunState, logger: logging.Logger) -> None:
        await self.kube.delete("batch/v1", "jobs", namespace, job_name, propagation="Background")
        state.deleted.add(job_name)
        state.created.pop(job_name, None)
        logger.info("deleted Job %s", job_name)

    def _goodput(self, state: RunState, raw: dict, status: dict, job: dict | None,
                 stalled_since: dt.datetime | None = None) -> dict:
        """status.goodput after this observation (goodput.py), from the last one this operator made
        or, after a restart of the operator, the one in the status. stalled_since: the last step of
        the attempt hang detection judges stalled now (stalled time starts there, not at detection)."""
        progress_now = state.progress or (raw.get("status") or {}).get("progress") or {}
        state.goodput = goodput.observe(
            state.goodput if state.goodput is not None else (raw.get("status") or {}).get("goodput"),
            run=raw, status=status, job=job, counters=state.counters,
            total_steps=progress_now.get("totalSteps"), now=_now(), stalled_since=stalled_since)
        return state.goodput

    # --- progress ---------------------------------------------------------------------------

    async def scrape(self, body: Any, pods_index: Any, logger: logging.Logger) -> None:
        raw = plain(body)
        meta, status = raw.get("metadata") or {}, raw.get("status") or {}
        namespace, name = meta.get("namespace") or "default", meta["name"]
        attempt = int(status.get("attempt") or 1)
        # A pod that ended has given its IP back: another pod (the next attempt's) may serve there.
        pod0 = next((p for p in pods_index.get((namespace, name), [])
                     if pod_attempt(p) == attempt and pod_index(p) == 0
                     and (p.get("status") or {}).get("phase") == "Running"
                     and (p.get("status") or {}).get("podIP")), None)
        if pod0 is None:
            return
        spec = defaulted(raw)["spec"]
        url = f"http://{pod0['status']['podIP']}:{spec['metrics']['port']}/metrics"
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.scrape_timeout))
        try:
            async with self._http.get(url) as response:
                text = await response.text()
            samples = progress.parse_samples(text)
            rank0 = progress.progress_from_samples(samples)
            observation = stall.observe(samples, rank0.get("step"))
            counters = goodput.counters_from_samples(samples)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            logger.debug("scraping %s failed: %r", url, exc)
            rank0, observation = None, stall.SILENT  # a silent worker has not stepped either
        state = self.state(namespace, name)
        self._watch_steps(state, raw, spec, attempt, observation)
        if rank0 is None:
            return
        world = api.resolved_workers(spec) * api.resolved_procs_per_worker(spec)
        new = progress.run_progress(rank0, world)
        old = state.progress if state.progress is not None else {
            k: v for k, v in (status.get("progress") or {}).items() if k != "updateTime"}
        if counters is not None:
            state.counters = (attempt, counters)
        if new and new != old:
            new_status = {"progress": {**new, "updateTime": _now().strftime("%Y-%m-%dT%H:%M:%SZ")}}
            if counters is not None:   # the account rides on the progress write
                before = state.goodput or status.get("goodput") or {}
                record = self._goodput(state, raw, {**status, **(state.status or {})}, None)
                new_status["goodput"] = {**{k: None for k in before if k not in record}, **record}
            if await self.kube.patch(names.API_VERSION, names.PLURAL, namespace, name,
                                     {"status": new_status}, subresource="status") is not None:
                state.progress = new
                if state.status is not None and state.goodput is not None:
                    state.status["goodput"] = state.goodput   # what the next status patch is relative to

    def _watch_steps(self, state: RunState, raw: dict, spec: dict, attempt: int,
                     observation: stall.Observation) -> None:
        """Hang detection (stall.py): fold in one scrape; wake the reconcile when the verdict
        differs from what the run's Stalled condition says."""
        now = _now()
        state.stall_clock = stall.advance(state.stall_clock, observation, attempt, now)
        policy = (spec.get("runPolicy") or {}).get("stallDetection") or {}
        verdict = stall.judge(state.stall_clock, policy, now, self.config.progress_interval)
        state.stall_verdict = verdict
        shown = stall.is_stalled(((state.status if state.status is not None else raw.get("status")) or {}).get("conditions"))
        if verdict is not None and verdict.stalled != shown:
            state.wake.set()


def _outdated(job: dict | None, run: dict, problems: list) -> bool:
    """The suspended Job was rendered from another shape of the run (a Job without the annotation,
    made by an older operator, is taken as current). Only a suspended Job can be outdated (the
    shape is fixed while it runs), so the hash is not computed on every reconcile."""
    if not ((job or {}).get("spec") or {}).get("suspend"):
        return False
    shape = ((job or {}).get("metadata") or {}).get("annotations", {}).get(names.ANNOTATION_SHAPE)
    return bool(shape) and not problems and shape != render.shape_hash(run)


def _spec_key(raw: dict) -> str:
    return repr(raw.get("spec"))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _owned_by(obj: dict, uid: str | None) -> bool:
    """Is this run (uid) the object's controller? An object with no controller is nobody's run."""
    owners = (obj.get("metadata") or {}).get("ownerReferences") or []
    controller = next((o for o in owners if o.get("controller")), None)
    return controller is not None and (uid is None or controller.get("uid") == uid)


def _trim(obj: dict) -> dict:
    """What the controller needs of a Job or Pod (indexes hold thousands of these)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    return {
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid", "labels", "annotations", "ownerReferences",
                                              "creationTimestamp", "deletionTimestamp") if meta.get(k) is not None},
        "spec": {k: spec[k] for k in ("suspend", "completions", "parallelism") if k in spec},
        "status": dict(obj.get("status") or {}),
    }


async def _sleep(wake: asyncio.Event, stopped: Any, timeout: float | None) -> None:
    if timeout is not None and timeout <= 0:
        return
    if timeout == math.inf:
        timeout = None
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _run_key(namespace: str | None, labels: Any) -> tuple[str, str]:
    return namespace or "", str((labels or {}).get(names.LABEL_RUN, ""))


def setup(registry: kopf.OperatorRegistry, controller: Controller) -> Controller:
    """Register every handler on `registry`, bound to `controller`."""
    cfg = controller.config

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
        if info is None:
            info = kopf.login_via_client(**kwargs)
        if info is not None:
            controller.kube = Kube(info=info)
        return info

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        if controller.kube is not None:
            await controller.kube.close()
        if controller._http is not None:
            await controller._http.close()

    # The per-event handlers are async on purpose: kopf runs sync ones on a thread pool, and that
    # handoff cost more than their work at thousands of events a second.
    @kopf.index(*JOBS, labels=OWNED, id="jobs_by_run", registry=registry)
    async def jobs_by_run(namespace: str, labels: Any, body: Any, **_: Any) -> dict:
        return {_run_key(namespace, labels): _trim(plain(body))}

    @kopf.index(*PODS, labels=OWNED, id="pods_by_run", registry=registry)
    async def pods_by_run(namespace: str, labels: Any, body: Any, **_: Any) -> dict:
        return {_run_key(namespace, labels): _trim(plain(body))}

    @kopf.on.event(*JOBS, labels=OWNED, registry=registry)
    @kopf.on.event(*PODS, labels=OWNED, registry=registry)
    async def child_event(namespace: str, labels: Any, **_: Any) -> None:
        controller.wake(*_run_key(namespace, labels))

    @kopf.on.event(*RUNS, registry=registry)
    async def run_event(namespace: str, name: str, **_: Any) -> None:
        controller.wake(namespace, name)  # create, update (spec edits, suspend), status of others

    async def _reconcile_once(state: RunState, body: Any, logger: logging.Logger, jobs_by_run: Any,
                              pods_by_run: Any) -> float | None:
        started = time.perf_counter()
        try:
            delay = await controller.reconcile(body, jobs_by_run, pods_by_run, logger)
            opmetrics.RECONCILES.labels("success").inc()
            state.errors = 0
        except (KubeError, Exception) as exc:  # never let one run's trouble stop its loop
            opmetrics.RECONCILES.labels("error").inc()
            state.errors += 1
            delay = min(60.0, cfg.error_backoff * 2 ** (state.errors - 1))
            logger.warning("reconcile failed (retry in %.1fs): %r", delay, exc)
            if state.errors == 1:  # one Event per streak of failures, not one per retry
                kopf.event(plain(body), type="Warning", reason="ReconcileError",
                           message=f"{exc} (retrying with backoff)"[:1024])
        opmetrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
        return delay

    # cancellation_backoff: on deletion kopf asks the loop to stop and gives it that long before
    # cancelling it, so the loop can remove the children (without it kopf cancels at once); the
    # finalizer goes as soon as the loop has ended (settings.background.instant_exit_timeout).
    @kopf.daemon(*RUNS, cancellation_backoff=5.0, cancellation_timeout=25.0, backoff=1.0, registry=registry)
    async def run_daemon(stopped: Any, body: Any, namespace: str, name: str, logger: logging.Logger,
                         jobs_by_run: Any, pods_by_run: Any, **_: Any) -> None:
        """Create and resume: one loop per TrainingRun until it is deleted. It reconciles when
        woken or when the last reconcile asked to look again, scrapes progress while Running,
        and once the run is deleted removes its children (kopf keeps its finalizer until then)."""
        state = controller.state(namespace, name)
        reconcile_at, scrape_at = 0.0, math.inf  # monotonic deadlines
        while not stopped:
            now = time.monotonic()
            if state.wake.is_set() or now >= reconcile_at:
                state.wake.clear()
                delay = await _reconcile_once(state, body, logger, jobs_by_run, pods_by_run)
                reconcile_at = now + delay if delay is not None else math.inf
            if state.phase != "Running":
                scrape_at = math.inf
            elif scrape_at == math.inf:  # just became Running: the first scrape one interval on
                scrape_at = time.monotonic() + cfg.progress_interval
            elif time.monotonic() >= scrape_at:
                try:
                    await controller.scrape(body, pods_by_run, logger)
                except Exception as exc:  # progress is best effort; the loop must go on
                    logger.warning("writing progress failed: %r", exc)
                scrape_at = time.monotonic() + cfg.progress_interval
            await _sleep(state.wake, stopped, min(reconcile_at, scrape_at) - time.monotonic())
        if stopped.reason is not None and stopped.reason & kopf.DaemonStoppingReason.RESOURCE_DELETED:
            raw = plain(body)
            await controller.delete_children(namespace, name, (raw.get("metadata") or {}).get("uid"),
                                             raw.get("status") or {}, jobs_by_run, logger)

    return controller
