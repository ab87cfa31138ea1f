"""The TrainingRun API on a real kube-apiserver: CRD, explain, examples, and bad runs refused at admission.

Real here: the API server's OpenAPI schema validation, defaulting, CEL (x-kubernetes-validations),
strict field validation and discovery (tests/controlplane.py). The operator and pod runner are
not involved except for the runs the CRD cannot judge, which must end as Valid=False.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from conftest import Kubectl
from controlplane import ControlPlane, kubernetes_version
from emulator import wait_for
from leap_operator import names
from leap_operator.status import get_condition
from leap_operator.validation import validate_run
from test_validate import BAD_RUNS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EXAMPLES = sorted(Path(__file__).resolve().parents[1].glob("manifests/examples/*.yaml"))
RUNS = f"/apis/{names.API_VERSION}/namespaces/{{ns}}/{names.PLURAL}"

# Runs the CRD cannot judge, and why: the operator catches them (Valid=False) instead.
CRD_CANNOT_JUDGE = {
    "distillation-default-teacher-is-student":
        "the teacher is defaulted only inside a distillation block; with none, the default teacher is the operator's",
    "procs-per-worker-more-than-gpus": "procsPerWorker: auto resolves against the GPU count in the operator",
    "resources-request-above-limit": "comparing quantities needs CEL's quantity library, which leap validate's CEL lacks",
    "pytorch-on-tpu-without-image": "which images exist is the operator's configuration, not the CRD's",
    "metrics-port-collides-with-rendezvous": "the ports in use depend on procsPerWorker: auto, resolved by the operator",
    "node-selector-bad-key": "label-key syntax of map keys is checked by the operator (a CEL rule over keys is too costly)",
}


@pytest.fixture(scope="module")
def kubectl(control_plane: ControlPlane) -> Kubectl:
    kubectl = Kubectl(control_plane.kubeconfig)
    kubectl("apply", "--server-side", "--force-conflicts", "-f",
            str(Path(__file__).resolve().parents[1] / "manifests" / "crd" / "leap.dev_trainingruns.yaml"))
    kubectl("wait", "--for=condition=Established", "crd/trainingruns.leap.dev", "--timeout=60s")
    return kubectl


def test_server_and_kubectl_versions_are_within_the_supported_skew(kubectl):
    versions = json.loads(kubectl("version", "-o", "json").stdout)
    server, client = versions["serverVersion"], versions["clientVersion"]
    assert server["gitVersion"] == kubernetes_version()
    skew = abs(int(server["minor"].rstrip("+")) - int(client["minor"].rstrip("+")))
    assert server["major"] == client["major"] and skew <= 1, f"kubectl {client['gitVersion']} vs {server['gitVersion']}"


def test_crd_is_established_and_explained(kubectl):
    crd = kubectl.json("get", "crd", "trainingruns.leap.dev")
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"
    # The API server publishes a new CRD's OpenAPI v3 a moment after Established: ask until it has.
    explained = wait_for(lambda: kubectl("explain", "trainingrun.spec.workload", check=False).stdout, 30, 0.5,
                         "kubectl explain trainingrun")
    assert "KIND:       TrainingRun" in explained and "batchSize" in explained and "learningRate" in explained
    resources = kubectl("api-resources", "--api-group=leap.dev").stdout
    assert "trainingruns" in resources


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_passes_server_side_dry_run(kubectl, example):
    namespace = (yaml.safe_load(example.read_text())["metadata"].get("namespace")) or "default"
    if namespace != "default":
        kubectl("create", "namespace", namespace, check=False)  # exists already on a reused control plane
    result = kubectl("apply", "--dry-run=server", "--server-side", "-f", str(example))
    assert "serverside-applied (server dry run)" in result.stdout


def _admit(plane: ControlPlane, run: dict, namespace: str = "default") -> tuple[int, dict]:
    """POST the run as kubectl does with --validate=strict, but stored nowhere (dryRun=All)."""
    api_version = run.get("apiVersion") or names.API_VERSION
    path = f"/apis/{api_version}/namespaces/{namespace}/{names.PLURAL}?fieldValidation=Strict&dryRun=All"
    return plane.rest().request("POST", path, run)


def _named_fields(payload: dict) -> str:
    causes = (payload.get("details") or {}).get("causes") or []
    return " ".join([payload.get("message") or ""] + [f"{c.get('field', '')} {c.get('message', '')}" for c in causes])


ADMISSION_CASES = [case for case in BAD_RUNS if case[0] not in CRD_CANNOT_JUDGE]


@pytest.mark.parametrize("run, field, words", [c[1:] for c in ADMISSION_CASES], ids=[c[0] for c in ADMISSION_CASES])
def test_api_server_refuses_bad_run_naming_the_same_field_as_leap_validate(kubectl, control_plane, run, field, words):
    assert any(p.field == field for p in validate_run(copy.deepcopy(run))), "leap validate must name it too"
    code, payload = _admit(control_plane, copy.deepcopy(run))
    assert code in (400, 404, 422), f"the API server accepted it ({code})"
    if code == 404:  # the version is not served: what kubectl reports as `no matches for kind`
        assert field == "apiVersion", payload
        return
    said = _named_fields(payload)
    assert field in said or field.split(".")[-1] in said, f"the API server's refusal does not name {field}: {said}"


def test_the_list_of_runs_the_crd_cannot_judge_is_exact(kubectl, control_plane):
    """Each listed run passes admission (else it belongs to the admission test above)."""
    cases = {case[0]: case for case in BAD_RUNS}
    for case_id in CRD_CANNOT_JUDGE:
        code, payload = _admit(control_plane, copy.deepcopy(cases[case_id][1]))
        assert code == 201, f"{case_id} is refused by the API server ({code}: {payload.get('message')}): drop it from the list"


def test_runs_the_crd_cannot_judge_end_valid_false_naming_the_field(cluster):
    ns = cluster.namespace("cannot-judge")
    cases = {case[0]: case for case in BAD_RUNS}
    created = {}
    for i, case_id in enumerate(sorted(CRD_CANNOT_JUDGE)):
        run, field, _words = copy.deepcopy(cases[case_id][1]), cases[case_id][2], cases[case_id][3]
        if field != "metadata.name":
            run["metadata"]["name"] = f"bad-{i}"
        run["metadata"]["namespace"] = ns
        cluster.rest.ok("POST", RUNS.format(ns=ns), run)
        created[run["metadata"]["name"]] = field
    for name, field in created.items():
        valid = wait_for(lambda: get_condition(((cluster.run(ns, name) or {}).get("status") or {}).get("conditions"),
                                               "Valid"), 60, message=f"Valid condition of {name}")
        assert valid["status"] == "False" and field in valid["message"], valid
        assert cluster.phase(ns, name) == "Failed"
        assert not cluster.rest.ok("GET", f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]
        wait_for(lambda: [e for e in cluster.events(ns, name) if e["type"] == "Warning" and field in e["message"]],
                 30, message=f"a Warning Event naming {field}")
