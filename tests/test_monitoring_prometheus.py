"""The real thing: a real Prometheus (Debian's binary) scrapes a real `leap-train` run, and every
Grafana dashboard panel's query runs against it.

One module-scoped fixture starts the training and the server once (about 30 s on 2 CPU cores);
the tests then query it. Queries are evaluated at one instant taken while the run was live, so a
run that finishes early cannot turn the answers stale.

Set LEAP_DASHBOARD_PNG=docs/img to also plot the training dashboard's series from this run.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from leap_operator import names
from leap_trainer import contract

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prometheus_server import PromQLError, PrometheusServer, free_port  # noqa: E402
from test_monitoring import RULES, alerts, dashboard, load_generator  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="prometheus missing: `make system-deps` installs it")]

ROOT = Path(__file__).resolve().parents[1]
OPERATOR_JOB = load_generator().OPERATOR_JOB
RUN, NAMESPACE = "e2e-mnist", "ml-team"
# Grafana's substitutions for a single selected run (scrape interval 1 s here).
SUBSTITUTIONS = {"$namespace": NAMESPACE, "$run": RUN, "$__rate_interval": "10s", "$__range": "1m"}

# Panels of "Leap / Training runs" that have no data in a CPU-only, operator-less run, and why.
MAY_BE_EMPTY = {
    "MFU": "leap_train_mfu is absent on devices without a known peak FLOP/s: a CPU has none in Leap's table.",
    "Accelerator memory": "leap_accelerator_memory_bytes measures GPU/TPU memory; a CPU run has no accelerator.",
}


def leap_train() -> str:
    exe = Path(sys.executable).with_name("leap-train")
    return str(exe) if exe.exists() else "leap-train"


@dataclass
class Live:
    prom: PrometheusServer
    at: float        # an instant at which the run was live and every series present
    started: float


PORT_NAME_META = "__meta_kubernetes_pod_container_port_name"


def podmonitor_relabel_configs() -> list[dict]:
    """The chart's PodMonitor relabelings, in Prometheus's own spelling."""
    import test_helm
    _, objects = test_helm.render(test_helm.MONITORING)
    pm = test_helm.one(objects, "PodMonitor")
    spelled = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return [{spelled.get(k, k): v for k, v in r.items()} for r in pm["spec"]["podMetricsEndpoints"][0]["relabelings"]]


def substitute(expr: str) -> str:
    for var, value in SUBSTITUTIONS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, expr
    return expr


# The operator's real metrics registry (leap_operator.opmetrics), fed the way the operator feeds it
# for two runs, one Running and one Failed, and served on 127.0.0.1. (Running the operator itself
# needs a Kubernetes API server; this keeps the metric names, types and labels real.)
OPERATOR_METRICS = """
import sys, time
from leap_operator import opmetrics as m
m.set_phase(("ml-team", "e2e-mnist"), "Running")
m.set_phase(("ml-team", "broken"), "Failed")
from leap_operator import goodput
m.set_goodput(("ml-team", "e2e-mnist"), goodput.account(0.0, 60.0, [{"created": 1.0, "running": 3.0, "ended": 60.0,
    "seconds": {"startup": 4.0, "restore": 0.0, "checkpoint": 1.0, "train": 50.0, "evaluate": 1.0},
    "resumedStep": 0, "steps": 500}]))
for result, n in (("success", 40), ("error", 2)):
    for _ in range(n):
        m.RECONCILES.labels(result).inc()
for seconds in (0.004, 0.02, 0.03, 0.2):
    m.RECONCILE_SECONDS.observe(seconds)
m.RESTARTS.inc()
m.API_ERRORS.labels("patch", "trainingruns").inc()
m.serve(int(sys.argv[1]), addr="127.0.0.1")
while True:
    m.RECONCILES.labels("success").inc()
    m.RECONCILE_SECONDS.observe(0.01)
    time.sleep(0.2)
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    port, operator_port = free_port(), free_port()
    env = {**os.environ, contract.ENV_RUN: RUN, contract.ENV_NAMESPACE: NAMESPACE,
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(contract.ENV_METRICS_PORT, None)
    # Far more work than the tests need (~40 s at 150k samples/s; the fixture stops it once the tests
    # are done): the first scrapes come ~6 s after start, and progress must still be below 1 then.
    # Short epochs, so accuracy is evaluated early.
    cmd = [leap_train(), "--framework", "pytorch", "--workload", "classifier", "--model", "mlp",
           "--dataset", "synthetic", "--samples", "60000", "--epochs", "100", "--batch-size", "64",
           "--metrics-port", str(port), "--checkpoint-dir", str(tmp / "ckpt"), "--summary", str(tmp / "summary.json")]
    log = open(tmp / "leap-train.log", "wb")
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    operator = subprocess.Popen([sys.executable, "-c", OPERATOR_METRICS, str(operator_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    decoy = free_port()  # a container port that is not a metrics port (e.g. torch.distributed's)
    podmonitor_job = {
        "job_name": "podmonitor",
        "static_configs": [
            {"targets": [f"127.0.0.1:{port}"], "labels": {PORT_NAME_META: "metrics"}},
            {"targets": [f"127.0.0.1:{decoy}"], "labels": {PORT_NAME_META: "torch-dist"}},
        ],
        "relabel_configs": podmonitor_relabel_configs(),
    }
    try:
        with PrometheusServer(targets=[f"127.0.0.1:{port}"], scrape_interval="1s", rule_files=[RULES],
                              jobs={OPERATOR_JOB: [f"127.0.0.1:{operator_port}"]},
                              scrape_configs=[podmonitor_job]) as prom:
            def need(expr: str, timeout: float = 90) -> None:
                if proc.poll() is not None:
                    pytest.fail(f"leap-train exited early ({proc.returncode}):\n{(tmp / 'leap-train.log').read_text()[-3000:]}")
                try:
                    prom.wait_for(expr, timeout=timeout)
                except TimeoutError as err:
                    pytest.fail(f"{err}\nleap-train log:\n{(tmp / 'leap-train.log').read_text()[-3000:]}")
            need(f"rate({contract.M_SAMPLES}[30s]) > 0")
            need(contract.M_ACCURACY)                                   # after the first evaluation
            need(f"rate({contract.M_STEP_SECONDS}_count[10s]) > 0")     # histogram moving
            need(f"rate({contract.M_SAMPLES}[10s]) > 0")                # still running now
            need(f"rate({names.OM_RECONCILES}[10s]) > 0")               # the operator's registry too
            at = time.time()
            yield Live(prom=prom, at=at, started=started)
            if os.environ.get("LEAP_DASHBOARD_PNG"):
                time.sleep(30)  # let the picture show some history
                out_dir, end = Path(os.environ["LEAP_DASHBOARD_PNG"]), time.time()
                plot_dashboard(prom, "leap-training-runs.json", started, end, out_dir / "dashboard-training-runs.png",
                               f"Leap / Training runs: one CPU run of leap-train scraped by Prometheus ({RUN})")
                plot_dashboard(prom, "leap-operator.json", started, end, out_dir / "dashboard-operator.png",
                               "Leap / Operator: the operator's metrics registry (one Running and one Failed run)")
    finally:
        operator.terminate()
        operator.wait(timeout=20)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


# --- issue 6: Prometheus scrapes a running leap-train ---------------------------------------------

def test_prometheus_scrapes_a_running_leap_train(live):
    result = live.prom.query(f"rate({contract.M_SAMPLES}[30s]) > 0", at=live.at)
    assert result, "no positive rate of leap_train_samples_total"
    labels = result[0]["metric"]
    assert labels["run"] == RUN and labels["namespace"] == NAMESPACE
    assert labels["rank"] == "0" and labels["framework"] == "pytorch" and labels["accelerator"] == "cpu"
    assert float(result[0]["value"][1]) > 100  # samples/s: the MLP trains far faster than this even on a busy CPU
    up = live.prom.query('up{job="leap"}', at=live.at)
    assert [float(s["value"][1]) for s in up] == [1.0]


def test_pod_monitor_relabelling_keeps_only_metrics_ports(live):
    """The chart's PodMonitor keep-rule, applied by a real Prometheus to a metrics port and a decoy."""
    targets = [t for t in live.prom.targets() if t["labels"]["job"] == "podmonitor"]
    assert len(targets) == 1, targets
    up = live.prom.query('up{job="podmonitor"}', at=live.at)
    assert [float(s["value"][1]) for s in up] == [1.0]


# --- every dashboard panel against the real run ------------------------------------------------------

def panel_queries(file: str):
    return [(p["title"], t["refId"], substitute(t["expr"]))
            for p in dashboard(file)["panels"] for t in p.get("targets", [])]


def test_every_training_dashboard_query_returns_data(live):
    titles = {p["title"] for p in dashboard("leap-training-runs.json")["panels"]}
    assert set(MAY_BE_EMPTY) <= titles, "an excepted panel no longer exists"
    # The generator carries the same exceptions next to each panel (and the docs quote them).
    gen = load_generator()
    assert {p.title for p in gen.TRAINING.panels if p.may_be_empty} == set(MAY_BE_EMPTY)
    empty = []
    for title, ref, expr in panel_queries("leap-training-runs.json"):
        try:
            result = live.prom.query(expr, at=live.at)
        except PromQLError as err:
            pytest.fail(f"panel {title!r} query {ref} is not valid PromQL: {err}")
        values = [float(s["value"][1]) for s in result]
        if not values and title not in MAY_BE_EMPTY:
            empty.append(f"{title} [{ref}]: {expr}")
        assert all(not math.isnan(v) for v in values) or title in MAY_BE_EMPTY, f"{title}: NaN in {values}"
    assert not empty, "dashboard panels without data:\n" + "\n".join(empty)


def value(live: Live, expr: str) -> float:
    result = live.prom.query(substitute(expr), at=live.at)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


def test_training_dashboard_values_make_sense(live):
    queries = {title: expr for title, _, expr in panel_queries("leap-training-runs.json")}
    assert value(live, queries["Throughput"]) > 100
    assert value(live, queries["Achieved FLOP/s"]) > 1e6
    assert 0 < value(live, queries["Progress"]) < 1
    assert value(live, queries["ETA"]) > 0
    assert 0 < value(live, queries["Loss"]) < 10
    assert 0 < value(live, queries["Accuracy"]) <= 1
    assert value(live, queries["Epoch"]) >= 1
    step_times = [q for t, r, q in panel_queries("leap-training-runs.json") if t == "Step time p50 / p99"]
    p50, p99 = (value(live, q) for q in step_times)
    assert 0 < p50 <= p99 < 10


def test_every_operator_dashboard_query_returns_data(live):
    empty = []
    for title, ref, expr in panel_queries("leap-operator.json"):
        try:
            result = live.prom.query(expr, at=live.at)
        except PromQLError as err:
            pytest.fail(f"panel {title!r} query {ref} is not valid PromQL: {err}")
        if not result:
            empty.append(f"{title} [{ref}]: {expr}")
    assert not empty, "operator dashboard panels without data:\n" + "\n".join(empty)
    queries = {title: expr for title, _, expr in panel_queries("leap-operator.json")}
    assert value(live, queries["Operator up"]) == 1
    assert value(live, queries["Runs"]) == 2
    phases = {s["metric"]["phase"]: float(s["value"][1])
              for s in live.prom.query(queries["Runs by phase"], at=live.at)}
    assert phases["Running"] == 1 and phases["Failed"] == 1 and phases["Pending"] == 0


def test_alert_rules_run_in_prometheus_against_real_metrics(live):
    """The rules load into the real server; the Failed run fires LeapTrainingRunFailed, and the
    healthy training run and the live operator fire nothing."""
    firing = live.prom.wait_for('ALERTS{alertname="LeapTrainingRunFailed", alertstate="firing"}', timeout=30)
    assert float(firing[0]["value"][1]) == 1
    groups = live.prom._get("/api/v1/rules", {"type": "alert"})["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == set(alerts())
    assert all(r["health"] != "err" for r in loaded.values()), {n: r.get("lastError") for n, r in loaded.items()}
    for name in ("LeapTrainingProgressStalled", "LeapTrainingThroughputDropped", "LeapTrainingStragglerRank",
                 "LeapOperatorDown", "LeapOperatorAPIErrors"):
        assert loaded[name]["state"] == "inactive", loaded[name]


# --- optional picture for the docs -------------------------------------------------------------------

def plot_dashboard(prom: PrometheusServer, file: str, start: float, end: float, out: Path, title: str) -> None:
    """Plot a dashboard's time-series panels from their own queries against this Prometheus."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in dashboard(file)["panels"]
              if p["type"] == "timeseries" and p["title"] not in MAY_BE_EMPTY]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 4.2, rows * 2.6), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for target in panel["targets"]:
            for series in prom.query_range(substitute(target["expr"]), start, end, step=1):
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                label = target["legendFormat"]
                for key, val in series["metric"].items():
                    label = label.replace("{{%s}}" % key, val)
                ax.plot(xs, ys, label=label, linewidth=1.2)
        ax.set_title(panel["title"], fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("seconds", fontsize=7)
        if ax.lines:
            ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
