"""The Keras path's goodput counters (leap_train_time_seconds_total by activity), scraped from a real
`leap-train --framework tensorflow` process as the operator scrapes rank 0, with the operator's parser.

Keras evaluates once, after the last epoch, and the process exits right after: a scrape can only
see evaluation when it lands in that moment, so it is not required here (the account counts an
unseen end as unattributed, said out loud).
"""

from __future__ import annotations

import subprocess
import time
import urllib.request

import pytest

from leap_operator.goodput import counters_from_metrics_text
from test_trainer_keras import LEAP_TRAIN, free_port, leap_train_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_keras_run_reports_its_start_up_training_and_checkpoint_time_within_its_wall_clock(tmp_path):
    port = free_port()
    command = [LEAP_TRAIN, "--framework", "tensorflow", "--workload", "classifier", "--model", "mlp",
               "--dataset", "digits", "--epochs", "8", "--batch-size", "64", "--checkpoint-every", "50",
               "--checkpoint-dir", str(tmp_path / "ckpt"), "--metrics-port", str(port),
               "--summary", str(tmp_path / "summary.json")]
    began = time.time()
    proc = subprocess.Popen(command, env=leap_train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pages: list[tuple[float, dict]] = []   # (when, rank 0's counters)
    try:
        while proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
                    found = counters_from_metrics_text(response.read().decode())
                if found is not None:
                    pages.append((time.time(), found))
            except OSError:
                pass   # not serving yet, or gone
            time.sleep(0.2)
        out = proc.communicate(timeout=30)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    training = [(when, page) for when, page in pages if page.get("steps")]
    assert training, f"no scrape saw a training step ({len(pages)} scrapes)"
    first_step_seen, _ = training[0]
    when, last = training[-1]
    seconds = last["seconds"]
    assert last["resumedStep"] == 0 and seconds["restore"] == 0
    # Start-up: the process start (after `began`) until the first step (seen by the first scrape after it).
    assert 0 < seconds["startup"] <= first_step_seen - began
    assert seconds["train"] > 0 and seconds["checkpoint"] > 0
    # Every activity of the process fits in its wall time so far, measured by this test's clock, and
    # they cover most of it (what they miss would be unattributed in the account).
    assert 0.5 * (when - began) < sum(seconds.values()) <= when - began
