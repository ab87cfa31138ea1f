"""Leap's alert rules and Grafana dashboards, checked without a cluster.

promtool (Debian's, the same release as the Prometheus server) checks the rules file and runs the
unit tests in manifests/monitoring/leap-alerts.test.yaml; the dashboards are checked against the
metric names leap-train and the operator really export (leap_trainer.contract, leap_operator.names).
The dashboards' queries are run against a real Prometheus in test_monitoring_prometheus.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from leap_operator import names
from leap_trainer import contract

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "manifests" / "monitoring"
RULES = MONITORING / "leap-alerts.rules.yaml"
RULE_TESTS = MONITORING / "leap-alerts.test.yaml"
DASHBOARDS = ROOT / "helm" / "leap-operator" / "dashboards"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: `make system-deps` installs it")


def load_generator():
    """helm/generate.py (run as a script by people; loaded by path here)."""
    if "leap_helm_generate" not in sys.modules:
        spec = importlib.util.spec_from_file_location("leap_helm_generate", ROOT / "helm" / "generate.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["leap_helm_generate"]


def alerts() -> dict[str, dict]:
    return {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}


def dashboard(file: str) -> dict:
    return json.loads((DASHBOARDS / file).read_text())


def exprs(dash: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


KNOWN_METRICS = (set(contract.TRAIN_METRICS)
                 | {getattr(names, n) for n in dir(names) if n.startswith("OM_")})


def metric_names(expr: str) -> set[str]:
    found = set(re.findall(r"\b(leap_[a-z_]+)\b", expr))
    return {re.sub(r"_(bucket|count|sum)$", "", m) if re.sub(r"_(bucket|count|sum)$", "", m) in KNOWN_METRICS else m
            for m in found}


# --- promtool ---------------------------------------------------------------------------------

@needs_promtool
def test_promtool_checks_the_rules():
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in out.stdout


@needs_promtool
def test_promtool_unit_tests_pass_and_cover_every_alert():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for t in tests for case in t["alert_rule_test"] if not case["exp_alerts"]}
    assert fired == set(alerts()), "every alert needs a case where it fires"
    assert quiet == set(alerts()), "every alert needs a case where it stays quiet"
    out = subprocess.run([PROMTOOL, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_promtool_unit_tests_catch_a_broken_alert(tmp_path):
    """The unit tests are not vacuous: loosen one alert's threshold and they fail."""
    broken = RULES.read_text().replace("< 0.5 * sum by", "< 0.1 * sum by")
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(broken)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    out = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / RULE_TESTS.name)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "LeapTrainingThroughputDropped" in out.stdout + out.stderr


def test_alerts_use_only_exported_metrics_and_carry_severity_and_text():
    for name, rule in alerts().items():
        unknown = metric_names(rule["expr"]) - KNOWN_METRICS
        assert not unknown, f"{name} uses metrics nobody exports: {unknown}"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert {"LeapTrainingRunFailed", "LeapTrainingProgressStalled", "LeapTrainingThroughputDropped",
            "LeapTrainingStragglerRank", "LeapOperatorDown", "LeapOperatorReconcileErrors",
            "LeapOperatorAPIErrors"} == set(alerts())


# --- dashboards -------------------------------------------------------------------------------

def test_dashboards_are_generated_from_their_panel_lists():
    gen = load_generator()
    for d in gen.DASHBOARDS:
        assert dashboard(d.file) == gen.dashboard_json(d), f"{d.file} stale: run `python helm/generate.py`"


def test_dashboards_use_only_exported_metrics():
    for file in ("leap-training-runs.json", "leap-operator.json"):
        for title, expr in exprs(dashboard(file)):
            unknown = metric_names(expr) - KNOWN_METRICS
            assert not unknown, f"{file} panel {title!r} uses unknown metrics {unknown}"


def test_training_dashboard_shows_every_training_metric_for_the_selected_runs():
    dash = dashboard("leap-training-runs.json")
    assert dash["title"] == "Leap / Training runs"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "run"} <= set(variables)
    assert "$namespace" in variables["run"]["definition"]  # runs of the chosen namespaces
    shown = set().union(*(metric_names(e) for _, e in exprs(dash)))
    # leap_train_total_steps is shown through progress and ETA, which leap-train derives from it.
    assert set(contract.TRAIN_METRICS) - {contract.M_TOTAL_STEPS} <= shown
    for title, expr in exprs(dash):
        if any(m in contract.TRAIN_METRICS for m in metric_names(expr)):
            assert 'namespace=~"$namespace", run=~"$run"' in expr, f"panel {title!r} ignores the variables"
    titles = {p["title"] for p in dash["panels"]}
    assert {"Throughput per run", "Throughput per rank", "MFU", "Loss", "Accuracy", "Step time p50 / p99",
            "Accelerator memory", "Restarts", "ETA per run", "Progress per run"} <= titles


def test_operator_dashboard_shows_reconciles_errors_latency_and_phases():
    dash = dashboard("leap-operator.json")
    assert dash["title"] == "Leap / Operator"
    shown = set().union(*(metric_names(e) for _, e in exprs(dash)))
    assert {names.OM_RECONCILES, names.OM_RECONCILE_SECONDS, names.OM_RUNS, names.OM_API_ERRORS} <= shown


def test_dashboard_panels_fit_the_grid_without_overlap():
    for file in ("leap-training-runs.json", "leap-operator.json"):
        cells = set()
        for p in dashboard(file)["panels"]:
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & mine, f"{file}: panel {p['title']!r} overlaps another"
            cells |= mine
        ids = [p["id"] for p in dashboard(file)["panels"]]
        assert len(ids) == len(set(ids))


@needs_promtool
def test_plain_prometheus_config_in_the_docs_is_valid(tmp_path):
    """docs/monitoring.md's scrape config for clusters without the Prometheus Operator."""
    text = (ROOT / "docs" / "monitoring.md").read_text()
    block = re.search(r"```yaml\n(rule_files:.*?)```", text, re.S)
    assert block, "the plain Prometheus config block is gone from docs/monitoring.md"
    config = yaml.safe_load(block.group(1))
    assert [j["job_name"] for j in config["scrape_configs"]] == ["leap-operator", "leap-training"]
    # Debian builds Prometheus without Kubernetes discovery: check everything else (relabelling,
    # rule files) with a static target standing in for kubernetes_sd_configs.
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs")[0]["role"] in {"endpoints", "pod"}
        job["static_configs"] = [{"targets": ["127.0.0.1:9400"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(RULES, tmp_path / "leap-alerts.rules.yaml")
    out = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # The job names the alerts expect.
    assert f'job="{load_generator().OPERATOR_JOB}"' in RULES.read_text()
