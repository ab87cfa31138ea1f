"""Hang detection (operator/leap_operator/stall.py) and its hooks in compute_status: pure, no cluster.

Observations are read from real leap-train metrics pages (leap_trainer.metrics.TrainingMetrics
rendered by prometheus_client), as the operator's scrape reads them; time is given explicitly.
The real control plane tier (tests/test_real_stall.py) shows the same with a real hung process.
"""

from __future__ import annotations

import datetime as dt

import pytest
from prometheus_client import generate_latest

from leap_operator import progress, stall
from leap_operator.status import compute_status, get_condition, set_condition
from leap_operator.validation import defaulted, validate_run
from leap_trainer import contract
from leap_trainer.metrics import TrainingMetrics
from test_status import job, make_run, pod

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
POLICY = {"action": "Report", "minSeconds": 60}
INTERVAL = 5.0


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


class Trainer:
    """A real TrainingMetrics exporter (no server) whose page the test scrapes."""

    def __init__(self, total_steps: int = 10_000, initial_step: int = 0):
        self.metrics = TrainingMetrics(run="r", namespace="ns", rank=0, framework="pytorch", accelerator="cpu",
                                       port=None, flops_per_sample=1.0, peak_flops=None,
                                       total_steps=total_steps, initial_step=initial_step)

    def steps(self, n: int, each: float = 0.5) -> None:
        self.metrics.report(steps=n, samples=n * 32, seconds=n * each, step_seconds=[each] * n)

    def scrape(self) -> stall.Observation:
        samples = progress.parse_samples(generate_latest(self.metrics.registry).decode())
        return stall.observe(samples, progress.progress_from_samples(samples).get("step"))


def watch(trainer: Trainer | None, clock, seconds: float, policy=POLICY, attempt: int = 1):
    """One scrape at T0 + seconds (trainer None: it did not answer) -> (clock, verdict)."""
    observation = trainer.scrape() if trainer is not None else stall.SILENT
    clock = stall.advance(clock, observation, attempt, at(seconds))
    return clock, stall.judge(clock, policy, at(seconds), INTERVAL)


def test_a_real_metrics_page_gives_the_process_steps_mean_step_time_and_activity():
    trainer = Trainer(initial_step=400)
    seen = trainer.scrape()
    assert seen.answered and seen.process_steps == 0 and seen.activity == contract.ACTIVITY_STARTUP
    assert seen.mean_step_seconds is None  # no step yet: unknown, not 0
    with trainer.metrics.timed(contract.ACTIVITY_RESTORE):   # a restore during start-up, then start-up again
        assert trainer.scrape().activity == contract.ACTIVITY_RESTORE
    assert trainer.scrape().activity == contract.ACTIVITY_STARTUP
    trainer.steps(10, 0.25)
    trainer.steps(10, 0.75)
    seen = trainer.scrape()
    assert seen.process_steps == 20 and seen.step == 420 and seen.activity == contract.ACTIVITY_TRAIN
    assert seen.mean_step_seconds == pytest.approx(0.5)
    with trainer.metrics.timed(contract.ACTIVITY_CHECKPOINT):
        assert trainer.scrape().activity == contract.ACTIVITY_CHECKPOINT
    assert trainer.scrape().activity == contract.ACTIVITY_TRAIN
    with pytest.raises(ValueError, match="unknown activity 'sleeping'"):
        with trainer.metrics.timed("sleeping"):
            pass


def test_threshold_is_the_floor_or_a_multiple_of_the_mean_step_time_or_the_fixed_timeout():
    assert stall.threshold({"minSeconds": 300}, 0.5, INTERVAL) == (300, "the floor minSeconds (10 x the mean step time 0.5s is less)")
    assert stall.threshold({"minSeconds": 300}, None, INTERVAL) == (300, "the floor minSeconds")
    assert stall.threshold({"minSeconds": 300}, 60.0, INTERVAL) == (600, "10 x the mean step time 60s")
    assert stall.threshold({"minSeconds": 300, "timeoutSeconds": 42}, 60.0, INTERVAL) == (
        42, "spec.runPolicy.stallDetection.timeoutSeconds")
    seconds, source = stall.threshold({"minSeconds": 5}, 0.01, 5.0)  # the operator sees a step once a scrape
    assert seconds == 15 and source.startswith("3 scrape intervals of the operator")
    assert stall.threshold({}, None, INTERVAL)[0] == 300  # the documented default floor


def test_steps_that_stop_are_a_stall_after_the_threshold_and_steps_that_resume_clear_it():
    trainer, clock = Trainer(), None
    trainer.steps(100)
    clock, verdict = watch(trainer, clock, 0)
    assert verdict is not None and not verdict.stalled
    trainer.steps(100)
    clock, verdict = watch(trainer, clock, 10)
    assert not verdict.stalled and verdict.step == 200 and verdict.since == at(10)
    for seconds in range(15, 71, 5):  # nothing new on the page: not stalled until 60s have passed
        clock, verdict = watch(trainer, clock, seconds)
        assert not verdict.stalled, seconds
    clock, verdict = watch(trainer, clock, 75)
    assert verdict.stalled and verdict.step == 200 and verdict.since == at(10) and verdict.threshold == 60
    assert verdict.message == ("attempt 1 took no optimizer step since step 200 at 2026-01-01T12:00:10Z "
                               "(threshold 60s: the floor minSeconds (10 x the mean step time 0.5s is less))")
    trainer.steps(1)
    clock, verdict = watch(trainer, clock, 80)
    assert not verdict.stalled and verdict.step == 201 and verdict.since == at(80)


def test_start_up_and_announced_pauses_are_not_stalls_but_silence_is():
    trainer, clock = Trainer(), None
    for seconds in (0, 100, 1000):  # before the first step (start-up, restore): unknown, never stalled
        clock, verdict = watch(trainer, clock, seconds)
        assert verdict is None
    trainer.steps(10)
    clock, _ = watch(trainer, clock, 1005)
    with trainer.metrics.timed(contract.ACTIVITY_EVALUATE):
        for seconds in (1100, 1500):   # a long evaluation the trainer announced
            clock, verdict = watch(trainer, clock, seconds)
            assert not verdict.stalled
    clock, verdict = watch(trainer, clock, 1550)   # back to training, no step yet: counted from the pause's end
    assert not verdict.stalled
    clock, verdict = watch(trainer, clock, 1561)
    assert verdict.stalled and verdict.since == at(1005)  # "since" stays the last step's time
    # Silence during an announced pause is not a pause: a stopped process cannot announce anything.
    trainer.steps(1)
    clock, _ = watch(trainer, clock, 2000)
    with trainer.metrics.timed(contract.ACTIVITY_CHECKPOINT):
        clock, verdict = watch(trainer, clock, 2005)
        assert not verdict.stalled
        for seconds in (2010, 2060):
            clock, verdict = watch(None, clock, seconds)
            assert not verdict.stalled
        clock, verdict = watch(None, clock, 2066)
        assert verdict.stalled and verdict.step == 11


def test_an_announced_pause_longer_than_max_pause_seconds_is_a_stall():
    """A checkpoint write stuck on its storage announces its pause for ever: after maxPauseSeconds it
    is a stall, naming the pause; a pause that ends in time is none."""
    policy = {**POLICY, "maxPauseSeconds": 600}
    trainer, clock = Trainer(), None
    trainer.steps(10)
    clock, _ = watch(trainer, clock, 0, policy)
    with trainer.metrics.timed(contract.ACTIVITY_EVALUATE):   # 500 s of evaluation: long, but it ends
        for seconds in (5, 300, 505):
            clock, verdict = watch(trainer, clock, seconds, policy)
            assert not verdict.stalled
    trainer.steps(1)
    clock, verdict = watch(trainer, clock, 510, policy)
    assert not verdict.stalled
    with trainer.metrics.timed(contract.ACTIVITY_CHECKPOINT):
        for seconds in (515, 1000, 1115):
            clock, verdict = watch(trainer, clock, seconds, policy)
            assert not verdict.stalled
        clock, verdict = watch(trainer, clock, 1116, policy)   # 601 s into the write
    assert verdict.stalled and verdict.step == 11 and verdict.since == at(510)
    assert "announced checkpoint pause, since 2026-01-01T12:08:35Z, lasts longer than" in verdict.message
    assert "maxPauseSeconds (600s)" in verdict.message, verdict.message


def test_a_new_attempt_starts_a_new_clock():
    trainer, clock = Trainer(), None
    trainer.steps(10)
    clock, _ = watch(trainer, clock, 0)
    clock, verdict = watch(None, clock, 100)
    assert verdict.stalled and verdict.attempt == 1
    clock, verdict = watch(Trainer(initial_step=10), clock, 101, attempt=2)  # resumed, not stepped yet
    assert verdict is None and clock.attempt == 2


# --- compute_status ----------------------------------------------------------------------------

RUNNING = dict(active=2, ready=2)
PODS = [pod(0, "Running"), pod(1, "Running")]


def running_run(**stall_detection) -> dict:
    run = make_run(backoffLimit=1, stallDetection=stall_detection)
    run["status"] = compute_status(run, job(**RUNNING), PODS, T0).status
    assert run["status"]["phase"] == "Running"
    return run


def verdict(stalled: bool, attempt: int = 1, restart: bool = False, step: int = 200) -> stall.Verdict:
    return stall.Verdict(attempt=attempt, stalled=stalled, step=step, since=at(10), threshold=60,
                         source="the floor minSeconds", restart=restart)


def test_report_a_stalled_run_stays_running_with_condition_reason_and_one_warning():
    run = running_run()
    d = compute_status(run, job(**RUNNING), PODS, at(75), stall_verdict=verdict(True))
    stalled = get_condition(d.status["conditions"], "Stalled")
    assert d.status["phase"] == "Running" and d.action == "none"
    assert d.status["reason"] == "Stalled" and stalled["status"] == "True" and stalled["reason"] == "NoProgress"
    assert "since step 200 at 2026-01-01T12:00:10Z" in stalled["message"] and "threshold 60s" in stalled["message"]
    assert d.status["message"] == stalled["message"]
    assert d.events == [("Warning", "Stalled", stalled["message"])]
    run["status"] = d.status
    again = compute_status(run, job(**RUNNING), PODS, at(90), stall_verdict=verdict(True))
    assert again.events == [] and again.status == d.status  # once per stall: no new Event, no write
    resumed = compute_status(run, job(**RUNNING), PODS, at(95), stall_verdict=verdict(False, step=201))
    cleared = get_condition(resumed.status["conditions"], "Stalled")
    assert cleared["status"] == "False" and cleared["reason"] == "ProgressResumed"
    assert resumed.status["reason"] == "WorkersActive"
    assert resumed.events == [("Normal", "ProgressResumed", cleared["message"])]


def test_a_run_that_never_stalled_has_no_stalled_condition_and_a_verdict_of_another_attempt_is_ignored():
    run = running_run()
    d = compute_status(run, job(**RUNNING), PODS, at(75), stall_verdict=verdict(False))
    assert get_condition(d.status["conditions"], "Stalled") is None and d.events == []
    d = compute_status(run, job(**RUNNING), PODS, at(75), stall_verdict=verdict(True, attempt=2))
    assert get_condition(d.status["conditions"], "Stalled") is None and d.status["reason"] == "WorkersActive"


def test_restart_a_stalled_attempt_is_restarted_through_the_normal_restart_path():
    run = running_run(action="Restart")
    d = compute_status(run, job(**RUNNING), PODS, at(75), stall_verdict=verdict(True, restart=True))
    assert d.action == "restart" and d.status["phase"] == "Restarting" and d.status["reason"] == "Stalled"
    assert d.status["attempt"] == 2 and d.status["restarts"] == 1
    assert d.status["message"].startswith("attempt 1 failed (no optimizer step since step 200 at 2026-01-01T12:00:10Z")
    stalled = get_condition(d.status["conditions"], "Stalled")
    assert stalled["status"] == "False" and stalled["reason"] == "Restarted"
    assert [(t, r) for t, r, _ in d.events] == [("Warning", "Stalled")]
    # backoffLimit used up: Failed, the stalled Job stopped, Stalled stays True.
    run["status"] = {**d.status, "phase": "Running", "attempt": 2}
    d = compute_status(run, job(2, **RUNNING), [pod(0, "Running", 2), pod(1, "Running", 2)], at(200),
                       stall_verdict=verdict(True, attempt=2, restart=True))
    assert d.status["phase"] == "Failed" and d.status["reason"] == "BackoffLimitExceeded" and d.action == "stop"
    assert get_condition(d.status["conditions"], "Stalled")["status"] == "True"


def test_the_stalled_condition_is_cleared_when_the_run_succeeds():
    run = running_run()
    run["status"] = compute_status(run, job(**RUNNING), PODS, at(75), stall_verdict=verdict(True)).status
    d = compute_status(run, job(succeeded=2, conditions=[{"type": "Complete", "status": "True"}]), [], at(99))
    assert d.status["phase"] == "Succeeded"
    assert get_condition(d.status["conditions"], "Stalled")["reason"] == "Finished"


def test_stall_detection_spec_defaults_and_bounds_name_the_field():
    spec = defaulted(make_run())["spec"]
    assert spec["runPolicy"]["stallDetection"] == {"action": "Report", "minSeconds": 300, "maxPauseSeconds": 3600}
    run = make_run()
    run["spec"]["runPolicy"]["stallDetection"] = {"action": "Kill", "minSeconds": 1}
    found = [str(p) for p in validate_run(run)]
    assert any("spec.runPolicy.stallDetection.action" in p and "Restart" in p for p in found), found
    assert any("spec.runPolicy.stallDetection.minSeconds" in p for p in found), found


def test_set_condition_is_the_one_status_uses():
    # stall.apply takes status.set_condition: a Stalled condition keeps its transition time.
    conds = stall.apply([], verdict(True), set_condition, at(75))
    assert stall.apply(conds, verdict(True), set_condition, at(90))[0]["lastTransitionTime"] == "2026-01-01T12:01:15Z"


def test_the_torch_loop_announces_its_evaluations_and_timed_checkpoint_saves():
    """The built-in PyTorch loop's pauses, read from its real metrics page while they happen: fit()
    times its evaluations; its checkpoint saves are timed by the caller, as torch_run's save is."""
    torch = pytest.importorskip("torch")
    from leap_trainer.torch_train import DeviceData, fit, make_optimizer

    trainer = Trainer(total_steps=20)
    seen: dict[str, list] = {"checkpoint": [], "evaluation": []}

    class Probe(torch.nn.Module):  # a real model that reads the page whenever it is evaluated
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(784, 10)

        def forward(self, x):
            if not self.training:
                seen["evaluation"].append(trainer.scrape().activity)
            return self.net(x)

    def save(step: int, epoch: int) -> None:
        with trainer.metrics.timed(contract.ACTIVITY_CHECKPOINT):
            seen["checkpoint"].append(trainer.scrape().activity)

    x, y = torch.randn(640, 784), torch.randint(0, 10, (640,))
    model = Probe()
    fit(model, make_optimizer(model, 1e-3), None, DeviceData(x, y, x[:64], y[:64]), batch_size=64, epochs=2,
        metrics=trainer.metrics, checkpoint_every=5, save_checkpoint=save)
    assert seen["checkpoint"] == [contract.ACTIVITY_CHECKPOINT] * 4   # 2 epochs x 10 steps, every 5
    assert seen["evaluation"] == [contract.ACTIVITY_EVALUATE] * 2     # once per epoch
    after = trainer.scrape()
    assert after.activity == contract.ACTIVITY_TRAIN and after.process_steps == 20
