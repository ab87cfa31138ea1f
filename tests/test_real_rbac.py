"""Least privilege, decided by the real API server: what the operator asks for against what the
install grants.

The API server's audit log records every request of the operator's ServiceAccount
(tests/controlplane.py, AUDIT_POLICY). A fresh operator, logged in with the token of the
ServiceAccount that manifests/install.yaml creates, takes one run through a representative
lifecycle (created suspended, resumed, a worker fails and the gang restarts, it succeeds, its TTL
deletes it, its children go). Then:
- no request was refused (a 403 is a missing grant);
- every (group, resource, verb) it used is granted by the install's ClusterRole;
- every grant was used, or is listed below with the reason the lifecycle cannot show it.
The API server runs with the OwnerReferencesPermissionEnforcement admission plugin (as OpenShift
does), so the one grant that is an authorization check rather than a request is enforced too.
"""

from __future__ import annotations

import time

import pytest
import yaml

from conftest import INSTALL, OPERATOR_NAMESPACE, OPERATOR_SA, Cluster
from emulator import OperatorProcess, wait_for
from leap_operator import names, render
from test_real_operator import create, example, jobs, running_pods

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}"

# Granted, but not a request the lifecycle makes; each with why it is needed.
UNSEEN_BUT_NEEDED = {
    ("leap.dev", "trainingruns/finalizers", "update"):
        "not a request: the OwnerReferencesPermissionEnforcement admission plugin checks it when the "
        "operator creates children whose ownerReference sets blockOwnerDeletion",
    ("batch", "jobs", "get"): "a create answered 409 (the Job exists): the operator reads it back",
    ("", "services", "get"): "a create answered 409 (the Service exists): the operator reads it back",
    ("", "events", "list"): "a Job that cannot create its pods: the operator reads the Job controller's "
                            "FailedCreate Events (test_real_semantics.py shows that case)",
    ("kueue.x-k8s.io", "workloads", "list"): "a queued run suspended by its user (needs Kueue's Workload API; "
                                             "test_real_semantics.py shows it with Kueue's Workload CRD)",
    ("kueue.x-k8s.io", "workloads", "patch"): "the same: the Workload's spec.active is set false, then true",
}


def granted_rules() -> set[tuple[str, str, str]]:
    """(group, resource, verb) the ClusterRole of manifests/install.yaml grants."""
    docs = [d for d in yaml.safe_load_all(INSTALL.read_text()) if d]
    roles = [d for d in docs if d["kind"] == "ClusterRole"]
    assert len(roles) == 1, [r["metadata"]["name"] for r in roles]
    return {(group, resource, verb) for rule in roles[0]["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def called(events: list[dict]) -> dict[tuple[str, str, str], list[int]]:
    """(group, resource[/subresource], verb) -> response codes, for the operator's resource requests."""
    out: dict[tuple[str, str, str], list[int]] = {}
    for event in events:
        if (event.get("user") or {}).get("username") != OPERATOR_USER:
            continue
        ref = event.get("objectRef")
        if not ref or not ref.get("resource"):
            continue  # discovery (/api, /apis): open to every authenticated user
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        key = (ref.get("apiGroup") or "", resource, event["verb"])
        out.setdefault(key, []).append(int((event.get("responseStatus") or {}).get("code") or 0))
    return out


def test_operator_calls_exactly_what_the_install_grants(cluster: Cluster, tmp_path):
    ns = cluster.namespace("rbac")
    cluster.operator.stop()  # the session's operator is the same ServiceAccount: one at a time
    since = time.time()
    operator = OperatorProcess(None, tmp_path, [], kubeconfig=cluster.operator.kubeconfig).start()
    try:
        operator.wait_ready()
        run = example("ddp-cpu", ns, workers=2, runPolicy={"backoffLimit": 3, "ttlSecondsAfterFinished": 1})
        name = run["metadata"]["name"]
        create(cluster, run)

        def running() -> list[dict]:  # the current attempt's pods, once the run is Running
            wait_for(lambda: cluster.phase(ns, name) == "Running", 90, message="Running")
            attempt = cluster.run(ns, name)["status"]["attempt"]
            return running_pods(cluster, ns, render.job_name(name, attempt), 2)

        pods = running()
        suspend = lambda on: cluster.kubectl("-n", ns, "patch", "trainingrun", name, "--type=merge",
                                             "-p", '{"spec":{"runPolicy":{"suspend":%s}}}' % str(on).lower())
        suspend(True)  # the Job is suspended (patch), its pods go
        wait_for(lambda: cluster.phase(ns, name) == "Suspended" and not [
            p for p in cluster.pods(ns) if not p["metadata"].get("deletionTimestamp")], 60, message="Suspended")
        suspend(False)  # and resumed
        pods = running()
        cluster.runner.finish(ns, pods[1]["metadata"]["name"], 1)  # a worker fails: gang restart
        wait_for(lambda: cluster.run(ns, name)["status"]["restarts"] >= 1, 60, message="a gang restart")
        for pod in running():
            cluster.runner.finish(ns, pod["metadata"]["name"], 0)
        wait_for(lambda: cluster.run(ns, name) is None, 90, message="the run deleted by its TTL")
        wait_for(lambda: not jobs(cluster, ns) and cluster.rest.get(
            f"/api/v1/namespaces/{ns}/services/{render.service_name(name)}") is None, 60, message="children gone")
        assert operator.stop() == 0
        time.sleep(2.5)  # the audit log is written in batches of at most 1 s
    except AssertionError:
        time.sleep(2.5)
        refused = {k: c for k, c in called(cluster.plane.audited(since)).items() if 403 in c}
        if refused:  # the lifecycle stalled on a missing grant: say which
            raise AssertionError(f"the operator was refused (missing grants): {refused}")
        raise
    finally:
        operator.stop()
        old = cluster.operator
        cluster.operator = OperatorProcess(None, old.tmp, [], kubeconfig=old.kubeconfig).start().wait_ready()

    requests = called(cluster.plane.audited(since))
    assert requests, "no audited request of the operator"
    refused = {key: codes for key, codes in requests.items() if 403 in codes}
    assert not refused, f"the operator was refused (missing grants): {refused}"
    granted = granted_rules()
    assert set(requests) <= granted, f"called without a grant: {set(requests) - granted}"
    unused = granted - set(requests) - set(UNSEEN_BUT_NEEDED)
    assert not unused, f"granted but never called (remove them from helm/leap-operator/templates/_rbac.tpl): {sorted(unused)}"
    for key in UNSEEN_BUT_NEEDED:
        assert key in granted, key
    # The lifecycle reached every part of the operator's work.
    for key in [(names.GROUP, "trainingruns", "delete"), (names.GROUP, "trainingruns/status", "patch"),
                ("batch", "jobs", "patch"), ("batch", "jobs", "delete"), ("", "services", "delete"),
                ("", "events", "create")]:
        assert key in requests, key
