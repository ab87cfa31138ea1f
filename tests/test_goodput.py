"""The goodput account (operator/leap_operator/goodput.py): pure, from timelines built here.

Each part is checked against the timeline it comes from; the parts always add up to the wall
time; what needs the trainer's counters stays unknown (absent) until an attempt reported them.
"""

from __future__ import annotations

import datetime as dt

import pytest

from leap_operator import goodput as g
from leap_trainer import contract


def counters(*, startup=3.0, restore=0.0, checkpoint=1.0, train=20.0, evaluate=1.0, resumed=0, steps=200):
    return {"seconds": {"startup": startup, "restore": restore, "checkpoint": checkpoint, "train": train,
                        "evaluate": evaluate}, "resumedStep": resumed, "steps": steps}


def test_a_run_restarted_once_splits_its_wall_time_into_parts_that_add_up():
    attempts = [
        {"created": 10.0, "running": 12.0, "ended": 40.0, **counters()},               # 200 steps at 0.1 s
        {"created": 45.0, "running": 46.0, "ended": 70.0,
         **counters(startup=2.0, restore=0.5, train=10.0, resumed=150, steps=100)},   # resumed at 150
    ]
    record = g.account(0.0, 70.0, attempts, final_step=300)
    assert record["wallSeconds"] == 70.0
    assert g.parts_sum(record) == pytest.approx(70.0)
    assert record["schedulingSeconds"] == pytest.approx(12.0 + 1.0)   # creation -> running, Job -> running
    assert record["restartingSeconds"] == pytest.approx(5.0)          # attempt 1 ended -> attempt 2's Job
    assert record["lostSeconds"] == pytest.approx(50 * 0.1)           # steps 150..200 redone
    assert record["restoreSeconds"] == pytest.approx(0.5)
    # Kept: 150 steps of attempt 1, and attempt 2's 150 (100 seen + 50 after its last scrape) at 0.1 s.
    assert record["productiveSeconds"] == pytest.approx(30.0)
    assert record["ratio"] == pytest.approx(30.0 / 70.0, abs=1e-4)
    assert record["unattributedSeconds"] == pytest.approx((28 - 5 - 20) + (24 - 4.5 - 15))


def test_redone_steps_are_priced_at_the_attempts_latest_pace_not_its_mean_with_the_warm_up():
    """Attempt 1's first 100 steps took 0.5 s each (warm-up, a busy machine), the last 100 0.1 s each;
    the 50 steps it did after its checkpoint were of the fast kind: 5 s lost, not 50 x its 0.3 s mean."""
    slow = g.update(None, created=0.0, now=2.0, attempt=1, phase="Running", job_created=1.0,
                    counters=(1, {"seconds": {"startup": 1.0, "train": 50.0}, "resumedStep": 0, "steps": 100}))
    record = g.update(slow, created=0.0, now=70.0, attempt=1, phase="Running", job_created=1.0,
                      counters=(1, {"seconds": {"startup": 1.0, "train": 60.0}, "resumedStep": 0, "steps": 200}))
    assert record["attempts"][0]["recentStepSeconds"] == pytest.approx(0.1)
    record = g.update(record, created=0.0, now=75.0, attempt=2, phase="Running", job_created=72.0,
                      counters=(2, {"seconds": {"startup": 1.0, "restore": 0.2, "train": 1.0}, "resumedStep": 150,
                                    "steps": 10}))
    assert record["lostSeconds"] == pytest.approx(50 * 0.1)
    assert g.parts_sum(record) == pytest.approx(record["wallSeconds"])


def test_an_attempt_that_never_checkpointed_loses_all_its_steps():
    attempts = [{"created": 0.0, "running": 1.0, "ended": 16.0, **counters(train=8.0, steps=80)},
                {"created": 17.0, "running": 17.0, "ended": 35.0, **counters(train=10.0, resumed=0, steps=100)}]
    record = g.account(0.0, 35.0, attempts, final_step=100)
    assert record["lostSeconds"] == pytest.approx(8.0)
    assert record["productiveSeconds"] == pytest.approx(10.0)
    assert g.parts_sum(record) == pytest.approx(35.0)


def test_without_counters_the_trainer_parts_and_the_ratio_are_unknown_not_zero():
    record = g.account(0.0, 20.0, [{"created": 2.0, "running": 5.0, "ended": 20.0}])
    for part in g.TRAINER_PARTS:
        assert f"{part}Seconds" not in record
    assert "ratio" not in record
    assert record["schedulingSeconds"] == 5.0 and record["unattributedSeconds"] == 15.0
    assert g.parts_sum(record) == pytest.approx(20.0)


def test_a_run_waiting_for_its_pods_or_its_backoff_is_scheduling_or_restarting_until_now():
    assert g.account(0.0, 7.0, [])["schedulingSeconds"] == 7.0
    waiting = g.account(0.0, 9.0, [{"created": 1.0, "running": None, "ended": None}])
    assert waiting["schedulingSeconds"] == 9.0
    backoff = g.account(0.0, 30.0, [{"created": 0.0, "running": 2.0, "ended": 20.0, **counters(train=10, steps=100)}])
    assert backoff["restartingSeconds"] == pytest.approx(10.0)
    assert g.parts_sum(backoff) == pytest.approx(30.0)


def test_counters_larger_than_the_window_are_capped_so_parts_never_exceed_the_wall():
    record = g.account(0.0, 10.0, [{"created": 0.0, "running": 0.0, "ended": 10.0,
                                    **counters(startup=6, checkpoint=6, train=0, evaluate=0, steps=0)}])
    assert record["startupSeconds"] + record["checkpointSeconds"] == pytest.approx(10.0)
    assert g.parts_sum(record) == pytest.approx(10.0)


def _time(seconds: float) -> str:
    return g.fmt(1_700_000_000.0 + seconds)


def test_stalled_time_comes_from_the_stalled_condition_and_is_taken_out_of_the_remainder():
    base = 1_700_000_000.0
    run_status = {"attempt": 1, "phase": "Running"}
    record = g.update(None, created=base, now=base + 5, attempt=1, phase="Running", job_created=base + 1,
                      counters=(1, counters(startup=1, checkpoint=0, train=2, evaluate=0, steps=20)))
    stalled = [{"type": "Stalled", "status": "True", "lastTransitionTime": _time(10)}]
    record = g.update(record, created=base, now=base + 30, attempt=1, phase="Running", job_created=None,
                      counters=None, conditions=stalled)
    assert record["stalledSeconds"] == pytest.approx(20.0)
    assert g.parse(record["stalledSince"]) == g.parse(_time(10))
    recovered = [{"type": "Stalled", "status": "False", "lastTransitionTime": _time(40)}]
    record = g.update(record, created=base, now=base + 50, attempt=1, phase="Running", job_created=None,
                      counters=None, conditions=recovered)
    assert record["stalledSeconds"] == pytest.approx(30.0)   # 10 s to 40 s, closed
    assert "stalledSince" not in record
    assert g.parts_sum(record) == pytest.approx(record["wallSeconds"])
    del run_status


def test_a_stall_counts_from_the_last_step_not_from_its_detection():
    """Hang detection says Stalled=True only after its threshold (here 30 s after the last step at
    10 s): those 30 s were stalled too."""
    base = 1_700_000_000.0
    record = g.update(None, created=base, now=base + 5, attempt=1, phase="Running", job_created=base + 1,
                      counters=(1, counters(startup=1, checkpoint=0, train=2, evaluate=0, steps=20)))
    stalled = [{"type": "Stalled", "status": "True", "lastTransitionTime": _time(40)}]
    record = g.update(record, created=base, now=base + 45, attempt=1, phase="Running", job_created=None,
                      counters=None, conditions=stalled, stalled_since=base + 10)
    assert record["stalledSeconds"] == pytest.approx(35.0)
    # Later observations (the scrape path knows no verdict) keep the episode's start.
    record = g.update(record, created=base, now=base + 50, attempt=1, phase="Running", job_created=None,
                      counters=None, conditions=stalled)
    assert record["stalledSeconds"] == pytest.approx(40.0)
    assert g.parts_sum(record) == pytest.approx(record["wallSeconds"])


def test_a_stall_that_restarts_the_attempt_is_stalled_from_its_last_step_to_the_restart():
    """With action Restart the written status never shows Stalled=True (the same decision restarts
    and clears it): the episode is the last step (20 s) to the restart (50 s), and no more."""
    base = 1_700_000_000.0
    record = g.update(None, created=base, now=base + 5, attempt=1, phase="Running", job_created=base + 1,
                      counters=(1, counters(startup=1, checkpoint=0, train=10, evaluate=0, steps=100)))
    restarted = [{"type": "Stalled", "status": "False", "reason": "Restarted", "lastTransitionTime": _time(50)}]
    record = g.update(record, created=base, now=base + 50, attempt=2, phase="Restarting", job_created=None,
                      counters=None, conditions=restarted, stalled_since=base + 20)
    assert record["stalledSeconds"] == pytest.approx(30.0)
    record = g.update(record, created=base, now=base + 70, attempt=2, phase="Restarting", job_created=None,
                      counters=None, conditions=restarted)
    assert record["stalledSeconds"] == pytest.approx(30.0)   # the backoff is restarting, not stalled
    assert record["restartingSeconds"] == pytest.approx(20.0)
    assert g.parts_sum(record) == pytest.approx(record["wallSeconds"])


def test_the_operator_record_follows_attempts_through_a_restart_and_success():
    base = 1_700_000_000.0
    rec = g.update(None, created=base, now=base + 2, attempt=1, phase="Pending", job_created=base + 1, counters=None)
    rec = g.update(rec, created=base, now=base + 4, attempt=1, phase="Running", job_created=base + 1, counters=None)
    rec = g.update(rec, created=base, now=base + 20, attempt=1, phase="Running", job_created=None,
                   counters=(1, counters(startup=2, checkpoint=1, train=10, evaluate=0, steps=100)))
    # The operator sees the failure: status moves to attempt 2 (Restarting); attempt 1 ended then.
    rec = g.update(rec, created=base, now=base + 22, attempt=2, phase="Restarting", job_created=None, counters=None)
    assert rec["attempts"][0]["ended"] == g.fmt(base + 22)
    rec = g.update(rec, created=base, now=base + 33, attempt=2, phase="Pending", job_created=base + 32, counters=None)
    rec = g.update(rec, created=base, now=base + 35, attempt=2, phase="Running", job_created=base + 32,
                   counters=(2, counters(startup=1, restore=0.5, checkpoint=1, train=5, evaluate=0, resumed=80, steps=50)))
    rec = g.update(rec, created=base, now=base + 50, attempt=2, phase="Succeeded", job_created=base + 32,
                   counters=None, final_step=150)
    assert [a["attempt"] for a in rec["attempts"]] == [1, 2] and rec["attempts"][1]["succeeded"] is True
    assert rec["wallSeconds"] == pytest.approx(50.0)
    assert rec["restartingSeconds"] == pytest.approx(32 - 22)
    assert rec["schedulingSeconds"] == pytest.approx(4 + (35 - 32))
    assert rec["lostSeconds"] == pytest.approx(20 * 0.1)   # attempt 1 saw step 100, attempt 2 resumed at 80
    assert rec["restoreSeconds"] == pytest.approx(0.5)
    assert g.parts_sum(rec) == pytest.approx(50.0)
    later = g.update(rec, created=base, now=base + 500, attempt=2, phase="Succeeded", job_created=None, counters=None)
    assert later["wallSeconds"] == rec["wallSeconds"]      # a finished run's account is final


def test_counters_are_read_from_a_trainer_metrics_page():
    from prometheus_client import generate_latest
    from leap_trainer.metrics import TrainingMetrics

    metrics = TrainingMetrics(run="r", namespace="n", rank=0, framework="pytorch", accelerator="cpu", port=None,
                              flops_per_sample=1.0, peak_flops=None, total_steps=100, initial_step=40)
    page = generate_latest(metrics.registry).decode()
    assert "startup" not in g.counters_from_metrics_text(page)["seconds"]   # unknown until the first step
    metrics.add_time(contract.ACTIVITY_RESTORE, 0.25)
    metrics.training_started()
    metrics.report(steps=10, samples=640, seconds=1.5)
    with metrics.timed(contract.ACTIVITY_CHECKPOINT):
        pass
    found = g.counters_from_metrics_text(generate_latest(metrics.registry).decode())
    assert found["resumedStep"] == 40 and found["steps"] == 10
    assert found["seconds"]["restore"] == 0.25 and found["seconds"]["train"] == 1.5
    assert found["seconds"]["startup"] > 0
    assert g.counters_from_metrics_text("leap_train_steps_total 3\n") is None   # a program without them
    with pytest.raises(ValueError, match="unknown activity"):
        metrics.add_time("lunch", 1.0)


def test_gauges_carry_the_record_and_go_with_the_run():
    from prometheus_client import generate_latest
    from leap_operator import names, opmetrics

    record = g.account(0.0, 70.0, [{"created": 1.0, "running": 2.0, "ended": 70.0, **counters()}])
    opmetrics.set_goodput(("ns", "gp-run"), record)
    text = generate_latest(opmetrics.REGISTRY).decode()
    assert f'{names.OM_GOODPUT_RATIO}{{namespace="ns",run="gp-run"}} {record["ratio"]}' in text
    assert f'{names.OM_GOODPUT_SECONDS}{{namespace="ns",part="lost",run="gp-run"}}' in text
    opmetrics.set_goodput(("ns", "gp-run"), None)
    assert "gp-run" not in generate_latest(opmetrics.REGISTRY).decode()


def test_a_job_stamped_in_whole_seconds_is_placed_by_when_it_was_first_seen():
    # Kubernetes stamps 12:00:43 for a Job created at 43.9 s; attempt 1 ended at 43.75 s (the operator's
    # clock). Taken as 43.0, the Job would precede the end and the restart's 0.15 s would vanish.
    base = 1_700_000_040.0
    stamp = g.fmt(base + 3).replace(".000Z", "Z")
    assert g.created_at(stamp, base + 3.9) == base + 3.9          # first seen within its second
    assert g.created_at(stamp, base + 9.0) == base + 4.0          # seen late: no later than t + 1
    assert g.created_at(stamp, base + 2.0) == base + 3.0          # a clock behind the server's: t
    assert g.created_at(g.fmt(base + 3.25), base + 9.0) == base + 3.25   # sub-second stamps are taken as they are
    assert g.created_at(None, base + 5.0) == base + 5.0
    rec = g.update(None, created=base, now=base + 1.2, attempt=1, phase="Running",
                   job_created=g.created_at(g.fmt(base).replace(".000Z", "Z"), base + 0.4), counters=None)
    rec = g.update(rec, created=base, now=base + 3.75, attempt=2, phase="Restarting", job_created=None, counters=None)
    rec = g.update(rec, created=base, now=base + 3.95, attempt=2, phase="Pending",
                   job_created=g.created_at(stamp, base + 3.9), counters=None)
    assert rec["restartingSeconds"] == pytest.approx(3.9 - 3.75)
    assert rec["schedulingSeconds"] == pytest.approx(1.2 + (3.95 - 3.9))
    assert g.parts_sum(rec) == pytest.approx(rec["wallSeconds"])


def test_a_run_of_300_attempts_keeps_the_last_attempts_and_its_account_stays_exact():
    # status.goodput.attempts is capped by the CRD: older attempts are folded into carried totals.
    from leap_operator import api

    base, rec, timeline = 1_700_000_000.0, None, []
    for n in range(1, 301):
        t = base + 7.0 * (n - 1)
        # Attempt n: Job created at t + 0.5, workers running at t + 1.5, scraped at t + 5 (20 steps resumed
        # per attempt, 30 seen), failure seen at t + 7 (except the last, which succeeds at t + 6).
        facts = counters(startup=1.0, restore=0.2 if n > 1 else 0.0, checkpoint=0.3, train=3.0, evaluate=0.0,
                         resumed=20 * (n - 1), steps=30)
        rec = g.update(rec, created=base, now=t + 0.6, attempt=n, phase="Pending", job_created=t + 0.5, counters=None)
        rec = g.update(rec, created=base, now=t + 1.5, attempt=n, phase="Running", job_created=t + 0.5, counters=None)
        rec = g.update(rec, created=base, now=t + 5.0, attempt=n, phase="Running", job_created=None, counters=(n, facts))
        last = n == 300
        rec = g.update(rec, created=base, now=t + (6.0 if last else 7.0), attempt=n if last else n + 1,
                       phase="Succeeded" if last else "Restarting", job_created=None, counters=None,
                       final_step=20 * 299 + 30 if last else None)
        timeline.append({"created": t + 0.5, "running": t + 1.5, "ended": t + (6.0 if last else 7.0), **facts})
        assert len(rec["attempts"]) <= g.KEEP_ATTEMPTS + 1   # + the one that has not ended, at most
        api.Goodput.model_validate(rec)                        # a valid status.goodput all along
    assert [a["attempt"] for a in rec["attempts"]] == list(range(301 - g.KEEP_ATTEMPTS, 301))
    assert rec["carried"]["attempts"] == 300 - g.KEEP_ATTEMPTS
    assert g.KEEP_ATTEMPTS <= api.Goodput.model_fields["attempts"].metadata[0].max_length
    # The same account as from every attempt's facts, kept in full.
    full = g.account(base, timeline[-1]["ended"], timeline, final_step=20 * 299 + 30)
    for key, value in full.items():
        assert rec[key] == pytest.approx(value, abs=0.002), key
    assert rec["lostSeconds"] == pytest.approx(299 * 10 * 0.1)      # 10 of 30 steps redone per failed attempt
    assert rec["restartingSeconds"] == pytest.approx(299 * 0.5)      # failure seen -> next Job
    assert g.parts_sum(rec) == pytest.approx(rec["wallSeconds"])


def test_work_is_not_lost_before_a_later_attempt_says_where_it_resumed():
    # The flake: attempt 1 (100 steps seen, checkpoint at 80) was reported to have lost all its 10 s
    # of training while attempt 2 had not been scraped yet: its unknown resume step counted as 0.
    base = 1_700_000_000.0
    rec = g.update(None, created=base, now=base + 2, attempt=1, phase="Running", job_created=base + 1, counters=None)
    rec = g.update(rec, created=base, now=base + 20, attempt=1, phase="Running", job_created=None,
                   counters=(1, counters(startup=2, checkpoint=1, train=10, evaluate=0, steps=100)))
    rec = g.update(rec, created=base, now=base + 22, attempt=2, phase="Restarting", job_created=None, counters=None)
    rec = g.update(rec, created=base, now=base + 24, attempt=2, phase="Running", job_created=base + 23, counters=None)
    assert rec["lostSeconds"] == 0 and rec["productiveSeconds"] == 0   # undecided: said as unattributed
    assert rec["unattributedSeconds"] == pytest.approx(20 - 3)          # attempt 1: its 20 s window less startup, checkpoint
    assert g.parts_sum(rec) == pytest.approx(rec["wallSeconds"])
    scraped = g.update(rec, created=base, now=base + 26, attempt=2, phase="Running", job_created=None,
                       counters=(2, counters(startup=1, restore=0.5, checkpoint=0, train=0, evaluate=0, resumed=80, steps=0)))
    assert scraped["lostSeconds"] == pytest.approx(20 * 0.1)          # now known: steps 80..100 redone
    assert scraped["productiveSeconds"] == pytest.approx(80 * 0.1)
    # Attempt 2 died before it served its counters; attempt 3 tells where the run resumed.
    rec = g.update(rec, created=base, now=base + 30, attempt=3, phase="Restarting", job_created=None, counters=None)
    rec = g.update(rec, created=base, now=base + 31, attempt=3, phase="Running", job_created=base + 31, counters=None)
    rec = g.update(rec, created=base, now=base + 35, attempt=3, phase="Running", job_created=None,
                   counters=(3, counters(startup=1, restore=0.5, checkpoint=0, train=2, evaluate=0, resumed=80, steps=20)))
    assert rec["lostSeconds"] == pytest.approx(20 * 0.1)
    assert rec["productiveSeconds"] == pytest.approx(80 * 0.1 + 2)
    assert g.parts_sum(rec) == pytest.approx(rec["wallSeconds"])
