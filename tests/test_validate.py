"""`leap validate`: bad TrainingRuns are rejected with a message naming the field (and the fix).

Every case goes through the real CLI entry point and the real checks: the CRD schema as
jsonschema, the CRD's CEL rules evaluated by common-expression-language, then semantics.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from leap_operator import cli
from leap_operator.validation import InvalidRun, Problem, check_run, validate_run
from leap_trainer.contract import EXIT_INVALID

EXAMPLES = sorted(Path(__file__).resolve().parents[1].glob("manifests/examples/*.yaml"))

BASE = {
    "apiVersion": "leap.dev/v1alpha1",
    "kind": "TrainingRun",
    "metadata": {"name": "demo"},
    "spec": {
        "framework": "pytorch",
        "workload": {"kind": "classifier", "model": "mlp", "dataset": "digits", "epochs": 2},
        "accelerator": {"type": "cpu"},
        "workers": 1,
    },
}
DELETE = object()


def variant(**changes) -> dict:
    """BASE with dotted-path changes: variant(**{"spec.workers": 0}); DELETE removes a key."""
    run = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = run
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return run


GPU = {"type": "nvidia-gpu", "count": 2}
V5E_4X4 = {"type": "google-tpu", "tpu": {"type": "tpu-v5-lite-podslice", "topology": "4x4"}}

# (id, run, field the message must name, words the message must contain)
BAD_RUNS = [
    ("framework-missing", variant(**{"spec.framework": DELETE}), "spec.framework", "required"),
    ("framework-unknown", variant(**{"spec.framework": "jax"}), "spec.framework", "pytorch, tensorflow"),
    ("accelerator-type-unknown", variant(**{"spec.accelerator.type": "gpu"}), "spec.accelerator.type", "nvidia-gpu"),
    ("workload-and-command", variant(**{"spec.command": ["python", "train.py"]}), "spec.workload", "exactly one"),
    ("neither-workload-nor-command", variant(**{"spec.workload": DELETE}), "spec.workload", "exactly one"),
    ("args-without-command", variant(**{"spec.args": ["--fast"]}), "spec.args", "spec.command"),
    ("epochs-zero", variant(**{"spec.workload.epochs": 0}), "spec.workload.epochs", ">= 1"),
    ("typo-epoch", variant(**{"spec.workload.epoch": 3}), "spec.workload.epoch", "did you mean epochs"),
    ("typo-top-level", variant(**{"spec.replicas": 3}), "spec.replicas", "unknown field"),
    ("model-unknown", variant(**{"spec.workload.model": "resnet50"}), "spec.workload.model", "mlp, mlp-large"),
    ("dataset-unknown", variant(**{"spec.workload.dataset": "imagenet"}), "spec.workload.dataset", "imagenet"),
    ("learning-rate-zero", variant(**{"spec.workload.learningRate": 0}), "spec.workload.learningRate", "> 0"),
    ("batch-size-string", variant(**{"spec.workload.batchSize": "64"}), "spec.workload.batchSize", "integer"),
    ("distillation-block-on-classifier", variant(**{"spec.workload.distillation": {"teacher": "mlp-large"}}),
     "spec.workload.distillation", "kind: distillation"),
    ("distillation-teacher-is-student", variant(**{"spec.workload.kind": "distillation", "spec.workload.distillation": {"teacher": "mlp"}}),
     "spec.workload.distillation.teacher", "differ"),
    ("distillation-default-teacher-is-student", variant(**{"spec.workload.kind": "distillation", "spec.workload.model": "mlp-large"}),
     "spec.workload.distillation.teacher", "default teacher"),
    ("distillation-alpha-above-one", variant(**{"spec.workload.kind": "distillation", "spec.workload.distillation": {"alpha": 1.5}}),
     "spec.workload.distillation.alpha", "<= 1"),
    ("tpu-block-missing", variant(**{"spec.framework": "tensorflow", "spec.accelerator": {"type": "google-tpu"}, "spec.workers": DELETE}),
     "spec.accelerator.tpu", "required"),
    ("tpu-block-on-gpu", variant(**{"spec.accelerator": {**GPU, "tpu": V5E_4X4["tpu"]}}), "spec.accelerator.tpu", "only allowed"),
    ("tpu-topology-malformed", variant(**{"spec.framework": "tensorflow", "spec.workers": DELETE,
                                          "spec.accelerator": {**V5E_4X4, "tpu": {"type": "tpu-v5-lite-podslice", "topology": "4by4"}}}),
     "spec.accelerator.tpu.topology", "2x4"),
    ("tpu-topology-not-offered", variant(**{"spec.framework": "tensorflow", "spec.workers": DELETE,
                                            "spec.accelerator": {**V5E_4X4, "tpu": {"type": "tpu-v5-lite-podslice", "topology": "3x3"}}}),
     "spec.accelerator.tpu.topology", "use one of 1x1, 2x2, 2x4, 4x4"),
    ("tpu-v4-needs-3d-topology", variant(**{"spec.framework": "tensorflow", "spec.workers": DELETE,
                                            "spec.accelerator": {"type": "google-tpu", "tpu": {"type": "tpu-v4-podslice", "topology": "2x2"}}}),
     "spec.accelerator.tpu.topology", "2x2x1"),
    ("tpu-workers-not-host-count", variant(**{"spec.framework": "tensorflow", "spec.workers": 2, "spec.accelerator": V5E_4X4}),
     "spec.workers", "must be 4"),
    ("tensorflow-on-multi-host-tpu", variant(**{"spec.framework": "tensorflow", "spec.workers": DELETE, "spec.accelerator": V5E_4X4}),
     "spec.accelerator.tpu.topology", "Use a single-host slice: tpu-v5-lite-podslice 1x1, 2x2, 2x4"),
    ("count-on-cpu", variant(**{"spec.accelerator.count": 2}), "spec.accelerator.count", "nvidia-gpu"),
    ("gpu-count-zero", variant(**{"spec.accelerator": {"type": "nvidia-gpu", "count": 0}}), "spec.accelerator.count", ">= 1"),
    ("gpu-product-with-spaces", variant(**{"spec.accelerator": {**GPU, "product": "NVIDIA H100"}}), "spec.accelerator.product", "label value"),
    ("procs-per-worker-word", variant(**{"spec.procsPerWorker": "many"}), "spec.procsPerWorker", "auto"),
    ("procs-per-worker-zero", variant(**{"spec.procsPerWorker": 0}), "spec.procsPerWorker", ">= 1"),
    ("procs-per-worker-tensorflow", variant(**{"spec.framework": "tensorflow", "spec.procsPerWorker": 4}), "spec.procsPerWorker", "TensorFlow"),
    ("procs-per-worker-more-than-gpus", variant(**{"spec.accelerator": GPU, "spec.procsPerWorker": 4}), "spec.procsPerWorker", "accelerator.count"),
    ("workers-zero", variant(**{"spec.workers": 0}), "spec.workers", ">= 1"),
    ("env-reserved-name", variant(**{"spec.env": [{"name": "MASTER_ADDR", "value": "x"}]}), "spec.env", "MASTER_ADDR"),
    ("env-duplicate-name", variant(**{"spec.env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}), "spec.env[1].name", "duplicate"),
    ("env-value-and-value-from", variant(**{"spec.env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}),
     "spec.env[0]", "not both"),
    ("env-bad-name", variant(**{"spec.env": [{"name": "1 bad", "value": "1"}]}), "spec.env[0].name", "environment variable name"),
    ("resources-gpu-in-requests", variant(**{"spec.resources": {"requests": {"nvidia.com/gpu": 1}}}), "spec.resources.requests.nvidia.com/gpu", "spec.accelerator"),
    ("resources-not-a-quantity", variant(**{"spec.resources": {"requests": {"memory": "lots"}}}), "spec.resources.requests.memory", "quantity"),
    ("resources-request-above-limit", variant(**{"spec.resources": {"requests": {"memory": "8Gi"}, "limits": {"memory": "4Gi"}}}),
     "spec.resources.requests.memory", "exceeds limit"),
    ("pytorch-on-tpu-without-image", variant(**{"spec.workers": DELETE, "spec.accelerator": V5E_4X4}), "spec.image", "set spec.image"),
    ("image-with-space", variant(**{"spec.image": "my image:1"}), "spec.image", "image reference"),
    ("metrics-port-privileged", variant(**{"spec.metrics": {"port": 80}}), "spec.metrics.port", ">= 1024"),
    ("metrics-port-collides-with-rendezvous", variant(**{"spec.metrics": {"port": 29499}, "spec.accelerator": GPU}),
     "spec.metrics.port", "29500"),
    ("backoff-limit-negative", variant(**{"spec.runPolicy": {"backoffLimit": -1}}), "spec.runPolicy.backoffLimit", ">= 0"),
    ("queue-name-with-space", variant(**{"spec.scheduling": {"queueName": "team a"}}), "spec.scheduling.queueName", "label value"),
    ("toleration-exists-with-value", variant(**{"spec.scheduling": {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}}),
     "spec.scheduling.tolerations[0]", "Exists"),
    ("toleration-seconds-without-no-execute", variant(**{"spec.scheduling": {"tolerations": [
        {"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}]}}),
     "spec.scheduling.tolerations[0].tolerationSeconds", "NoExecute"),
    ("toleration-empty-key-with-equal", variant(**{"spec.scheduling": {"tolerations": [
        {"operator": "Equal", "value": "v", "effect": "NoSchedule"}]}}),
     "spec.scheduling.tolerations[0].operator", "operator Exists"),
    ("env-field-path-not-offered", variant(**{"spec.env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "status.phase"}}}]}),
     "spec.env[0].valueFrom.fieldRef.fieldPath", "downward API"),
    ("env-resource-not-offered", variant(**{"spec.env": [{"name": "A", "valueFrom": {"resourceFieldRef": {"resource": "limits.gpu"}}}]}),
     "spec.env[0].valueFrom.resourceFieldRef.resource", "limits.cpu"),
    ("node-selector-bad-key", variant(**{"spec.scheduling": {"nodeSelector": {"bad key!": "x"}}}), "spec.scheduling.nodeSelector", "not a label key"),
    ("checkpoint-claim-bad-name", variant(**{"spec.checkpoint": {"claimName": "My_PVC"}}), "spec.checkpoint.claimName", "DNS name"),
    ("name-uppercase", variant(**{"metadata.name": "MyRun"}), "metadata.name", "DNS-1035"),
    ("name-too-long", variant(**{"metadata.name": "r" * 41}), "metadata.name", "at most 40"),
    ("api-version-wrong", variant(**{"apiVersion": "leap.dev/v1"}), "apiVersion", "leap.dev/v1alpha1"),
]


def _cli(tmp_path: Path, capsys, *docs: dict, extra: tuple = ()) -> tuple[int, str]:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump_all(list(docs)))
    code = cli.main(["validate", *extra, str(path)])
    return code, capsys.readouterr().out


def test_there_are_at_least_25_bad_runs():
    assert len(BAD_RUNS) >= 25
    assert len({case[0] for case in BAD_RUNS}) == len(BAD_RUNS)


@pytest.mark.parametrize("run, field, words", [case[1:] for case in BAD_RUNS], ids=[case[0] for case in BAD_RUNS])
def test_leap_validate_rejects_bad_run_naming_the_field(tmp_path, capsys, run, field, words):
    code, out = _cli(tmp_path, capsys, run)
    assert code == EXIT_INVALID, out
    assert "INVALID" in out
    lines = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    matching = [line for line in lines if line.startswith(field + ":")]
    assert matching, f"no problem names {field}:\n{out}"
    assert any(words in line for line in matching), f"{field} problem does not say {words!r}:\n{out}"


def test_base_run_is_valid(tmp_path, capsys):
    code, out = _cli(tmp_path, capsys, BASE)
    assert code == 0, out
    assert out.strip().endswith("TrainingRun/demo: OK")


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_validates(example, capsys):
    assert cli.main(["validate", str(example)]) == 0, capsys.readouterr().out


def test_multi_document_file_reports_each_document(tmp_path, capsys):
    good = copy.deepcopy(BASE)
    bad = variant(**{"metadata.name": "other", "spec.workers": 0})
    code, out = _cli(tmp_path, capsys, good, bad)
    assert code == EXIT_INVALID
    assert "#1 TrainingRun/demo: OK" in out
    assert "#2 TrainingRun/other: INVALID (1 problem)" in out


def test_other_kinds_in_the_file_are_skipped_but_a_file_without_runs_fails(tmp_path, capsys):
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "ckpt"}}
    code, out = _cli(tmp_path, capsys, claim, BASE)
    assert code == 0, out
    assert "PersistentVolumeClaim/ckpt: skipped" in out
    path = tmp_path / "only-claim.yaml"
    path.write_text(yaml.safe_dump(claim))
    assert cli.main(["validate", str(path)]) == EXIT_INVALID
    assert "no TrainingRun found" in capsys.readouterr().err
    typo = variant(**{"kind": "TrainingRunn"})
    code, out = _cli(tmp_path, capsys, typo)
    assert code == EXIT_INVALID and "kind: must be TrainingRun" in out


def test_unreadable_input_is_an_error(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("spec: [unclosed\n")
    assert cli.main(["validate", str(path)]) == EXIT_INVALID
    assert "not valid YAML" in capsys.readouterr().err
    assert cli.main(["validate", str(tmp_path / "missing.yaml")]) == EXIT_INVALID
    assert "cannot read" in capsys.readouterr().err


def test_defaults_are_applied_like_the_api_server():
    run = check_run(BASE)
    spec = run["spec"]
    assert spec["workload"]["batchSize"] == 64 and spec["workload"]["learningRate"] == 0.003
    assert spec["procsPerWorker"] == "auto"
    assert spec["runPolicy"] == {"backoffLimit": 3, "suspend": False,
                                 "stallDetection": {"action": "Report", "minSeconds": 300, "maxPauseSeconds": 3600}}
    assert spec["metrics"] == {"port": 9400} and spec["checkpoint"] == {"everySteps": 500}
    assert "distillation" not in spec["workload"]  # defaults never invent optional blocks


def test_null_fields_are_pruned_then_defaulted_like_the_api_server():
    run = check_run(variant(**{"spec.runPolicy": None, "spec.workload.epochs": None}))
    assert run["spec"]["runPolicy"]["backoffLimit"] == 3
    assert run["spec"]["workload"]["epochs"] == 10


def test_check_run_raises_invalid_run_with_problems():
    with pytest.raises(InvalidRun) as info:
        check_run(variant(**{"spec.workers": 0, "spec.workload.epochs": 0}))
    assert {p.field for p in info.value.problems} == {"spec.workers", "spec.workload.epochs"}
    assert all(isinstance(p, Problem) for p in info.value.problems)


# --- transition rules: the run's shape is fixed once the operator has started it -----------------

def _started(phase: str) -> dict:
    return {**copy.deepcopy(BASE), "status": {"phase": phase}}


@pytest.mark.parametrize("path, value", [
    ("spec.workers", 2), ("spec.framework", "tensorflow"), ("spec.workload.epochs", 9),
    ("spec.accelerator", {"type": "nvidia-gpu"}), ("spec.image", "example.com/other:1"),
])
def test_shape_cannot_change_while_running(tmp_path, capsys, path, value):
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(_started("Running")))
    new = variant(**{path: value})
    code, out = _cli(tmp_path, capsys, new, extra=("--old", str(old)))
    assert code == EXIT_INVALID, out
    field = path if path != "spec.workload.epochs" else "spec.workload"
    assert f"{field}: {field} cannot change once the run has started" in out


def test_shape_may_change_while_suspended_and_policy_always():
    edited = variant(**{"spec.workers": 2})
    assert validate_run(edited, old=_started("Suspended")) == []
    assert validate_run(edited, old=BASE) == []  # not started yet: no status
    suspended = variant(**{"spec.runPolicy": {"suspend": True, "backoffLimit": 5}})
    assert validate_run(suspended, old=_started("Running")) == []


def test_queue_name_is_fixed_once_started():
    old = {**variant(**{"spec.scheduling": {"queueName": "a"}}), "status": {"phase": "Pending"}}
    problems = validate_run(variant(**{"spec.scheduling": {"queueName": "b"}}), old=old)
    assert [p.field for p in problems] == ["spec.scheduling.queueName"]
    assert validate_run(variant(**{"spec.scheduling": {"queueName": "a", "priorityClassName": "high"}}), old=old) == []
