"""The scale benchmark stays runnable: a small run of bench/operator_scale.py, end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import operator_scale  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def test_small_scale_run_reports_every_run_and_stays_within_three_writes_per_phase_change(tmp_path, capsys):
    out = tmp_path / "figures.json"
    assert operator_scale.main(["--runs", "10", "--rate", "10", "--json", str(out), "--timeout", "120"]) == 0
    figures = json.loads(out.read_text())
    assert figures["runs"] == 10
    # Every run got its Job and Service, went Running, and reached Succeeded once its Job completed.
    assert figures["create_to_children_ms"]["n"] == 10 and figures["complete_to_succeeded_ms"]["n"] == 10
    assert figures["phase_changes_per_run"] == 3 and figures["reconcile_errors"] == 0
    # The writes of a run's life: finalizer, Service, Job, then a status write and an Event per
    # phase change (a rare extra kopf patch of a run is tolerated, not a pattern).
    assert figures["writes_per_phase_change"]["mean"] <= 3.1, figures["writes_by_kind_per_run"]
    assert figures["writes_by_kind_per_run"]["POST jobs"] == 1.0
    assert "| writes per phase change" in capsys.readouterr().out  # the report a user reads


@pytest.mark.slow
def test_small_scale_run_against_the_real_control_plane_counts_the_operators_writes_from_the_audit_log(
        cluster, tmp_path, capsys):
    from emulator import OperatorProcess
    out = tmp_path / "real.json"
    cluster.operator.stop()  # the benchmark runs its own operator: one at a time acts on a run
    try:
        assert operator_scale.main(["--real", "--runs", "6", "--rate", "3", "--json", str(out), "--timeout", "150"]) == 0
    finally:
        old = cluster.operator
        cluster.operator = OperatorProcess(None, old.tmp, [], kubeconfig=old.kubeconfig).start().wait_ready()
    figures = json.loads(out.read_text())
    assert figures["runs"] == 6 and figures["create_to_children_ms"]["n"] == 6
    assert figures["pods_finished_to_succeeded_ms"]["n"] == 6
    assert figures["phase_changes_per_run"] == 3  # Pending, Running, Succeeded
    kinds = figures["writes_by_kind_per_run"]
    assert kinds["create jobs"] == 1.0 and kinds["create services"] == 1.0, kinds
    # One Event per phase change, kopf's finalizer once; status: one write per phase change plus
    # one per step in which the real Job controller reports its counts (active, ready, succeeded).
    assert kinds["create events"] == 3.0 and kinds["patch trainingruns"] == 1.0, kinds
    assert kinds["patch trainingruns/status"] <= 5.0, kinds
    assert figures["writes_per_phase_change"]["mean"] <= 11 / 3 + 0.01, kinds
    assert "| writes per phase change" in capsys.readouterr().out
