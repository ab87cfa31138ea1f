"""The operator against real Kubernetes semantics (issue: deadlines, preemption, refusals, ownership).

All on the real control plane: the real Job controller (which sets FailureTarget before Failed,
deletes a suspended Job's pods and reports pods it cannot create only as FailedCreate Events),
real admission (a ValidatingAdmissionPolicy, a ResourceQuota, the Priority plugin) and the real
garbage collector. The test plays Kueue where a queue is involved: it admits and preempts by
setting the Job's spec.suspend, which is what Kueue does.
"""

from __future__ import annotations

import time

import pytest

from conftest import Cluster
from emulator import wait_for
from leap_operator import render
from test_real_operator import condition, create, example, get_tr, jobs, running_pods

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def status(cluster: Cluster, ns: str, name: str) -> dict:
    return (cluster.run(ns, name) or {}).get("status") or {}


def test_deadline_fails_the_run_once_without_a_restart_and_can_be_raised_while_running(cluster):
    ns = cluster.namespace("deadline")
    create(cluster, example("mnist-gpu", ns, runPolicy={"activeDeadlineSeconds": 3, "backoffLimit": 2}))
    job = render.job_name("mnist-gpu", 1)
    running_pods(cluster, ns, job, 1)
    assert "activeDeadlineSeconds" not in cluster.rest.get(f"/apis/batch/v1/namespaces/{ns}/jobs/{job}")["spec"]
    wait_for(lambda: status(cluster, ns, "mnist-gpu").get("phase") == "Failed", 30, message="Failed")
    st = status(cluster, ns, "mnist-gpu")
    assert st["reason"] == "DeadlineExceeded" and st["restarts"] == 0 and st["attempt"] == 1, st
    wait_for(lambda: not [j for j in jobs(cluster, ns) if not j["metadata"].get("deletionTimestamp")], 30,
             message="the Job deleted")
    time.sleep(2)
    assert [j["metadata"]["name"] for j in jobs(cluster, ns)] in ([], [job])  # never an attempt 2

    # The same deadline, raised while the run runs: it keeps running.
    other = cluster.namespace("deadline-raised")
    create(cluster, example("mnist-gpu", other, runPolicy={"activeDeadlineSeconds": 4}))
    running_pods(cluster, other, job, 1)
    cluster.kubectl("-n", other, "patch", "trainingrun", "mnist-gpu", "--type=merge",
                    "-p", '{"spec":{"runPolicy":{"activeDeadlineSeconds":3600}}}')
    time.sleep(6)
    assert status(cluster, other, "mnist-gpu")["phase"] == "Running"


def test_kueue_style_preemption_is_not_a_failure_and_the_run_resumes_when_readmitted(cluster):
    ns = cluster.namespace("preempt")
    create(cluster, example("mnist-gpu", ns, scheduling={"queueName": "team-a"}, runPolicy={"backoffLimit": 1}))
    job = render.job_name("mnist-gpu", 1)
    path = f"/apis/batch/v1/namespaces/{ns}/jobs/{job}"
    queued = wait_for(lambda: cluster.rest.get(path), 30, message="the queued Job")
    assert queued["spec"]["suspend"] is True
    wait_for(lambda: status(cluster, ns, "mnist-gpu").get("reason") == "Queued", 30, message="Queued")

    def set_suspend(value: bool) -> None:
        cluster.rest.ok("PATCH", path, {"spec": {"suspend": value}}, content_type="application/merge-patch+json")

    set_suspend(False)  # Kueue admits the workload
    running_pods(cluster, ns, job, 1)
    wait_for(lambda: status(cluster, ns, "mnist-gpu").get("phase") == "Running", 30, message="Running")
    set_suspend(True)   # Kueue preempts it: the Job controller deletes the pods (they end Failed)
    wait_for(lambda: status(cluster, ns, "mnist-gpu").get("reason") == "Preempted", 30, message="Preempted")
    wait_for(lambda: not cluster.pods(ns), 30, message="the preempted pods gone")
    st = status(cluster, ns, "mnist-gpu")
    assert st["phase"] == "Pending" and st["restarts"] == 0 and st["attempt"] == 1, st
    set_suspend(False)  # readmitted
    running_pods(cluster, ns, job, 1)
    wait_for(lambda: status(cluster, ns, "mnist-gpu").get("phase") == "Running", 30, message="Running again")
    assert status(cluster, ns, "mnist-gpu")["restarts"] == 0


def test_a_job_the_api_server_rejects_fails_the_run_with_its_message(cluster):
    ns = cluster.namespace("rejected", labels={"leap-test/no-jobs": "true"})
    policy = f"no-jobs-{ns}"
    cluster.rest.ok("POST", "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies", {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": policy},
        "spec": {"failurePolicy": "Fail",
                 "matchConstraints": {"resourceRules": [{"apiGroups": ["batch"], "apiVersions": ["v1"],
                                                         "operations": ["CREATE"], "resources": ["jobs"]}]},
                 "validations": [{"expression": "false", "reason": "Invalid",
                                  "message": "training Jobs are not allowed in this namespace"}]}})
    cluster.rest.ok("POST", "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings", {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": policy},
        "spec": {"policyName": policy, "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}}})
    try:
        # A policy takes effect once the API server has loaded it: probe with a dry-run Job.
        probe = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "probe"},
                 "spec": {"template": {"spec": {"restartPolicy": "Never",
                                                "containers": [{"name": "c", "image": "x"}]}}}}
        wait_for(lambda: cluster.rest.request("POST", f"/apis/batch/v1/namespaces/{ns}/jobs?dryRun=All", probe)[0] >= 400,
                 30, message="the policy in force")
        create(cluster, example("mnist-gpu", ns))
        wait_for(lambda: status(cluster, ns, "mnist-gpu").get("phase") == "Failed", 30, message="Failed")
        st = status(cluster, ns, "mnist-gpu")
        assert st["reason"] == "Rejected" and "training Jobs are not allowed in this namespace" in st["message"], st
        assert condition(cluster, ns, "mnist-gpu", "Created")["status"] == "False"
        assert get_tr(cluster, ns, "mnist-gpu", wide=True)["REASON"] == "Rejected"
        wait_for(lambda: [e for e in cluster.events(ns, "mnist-gpu")
                          if e["type"] == "Warning" and e["reason"] == "Rejected"], 30, message="a Warning Event")
    finally:
        cluster.rest.request("DELETE", f"/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings/{policy}")
        cluster.rest.request("DELETE", f"/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies/{policy}")


def test_a_quota_refusal_is_shown_and_retried_until_the_quota_allows_it(cluster):
    ns = cluster.namespace("quota")
    quota = f"/api/v1/namespaces/{ns}/resourcequotas"
    cluster.rest.ok("POST", quota, {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "jobs"},
                                    "spec": {"hard": {"count/jobs.batch": "0"}}})
    wait_for(lambda: (cluster.rest.get(f"{quota}/jobs").get("status") or {}).get("hard"), 30,
             message="the quota counted")
    create(cluster, example("mnist-gpu", ns))
    wait_for(lambda: status(cluster, ns, "mnist-gpu").get("reason") == "CreateRefused", 30, message="CreateRefused")
    st = status(cluster, ns, "mnist-gpu")
    assert st["phase"] == "Pending" and "exceeded quota" in st["message"], st
    assert condition(cluster, ns, "mnist-gpu", "Created")["reason"] == "CreateRefused"
    cluster.rest.ok("PATCH", f"{quota}/jobs", {"spec": {"hard": {"count/jobs.batch": "5"}}},
                    content_type="application/merge-patch+json")
    running_pods(cluster, ns, render.job_name("mnist-gpu", 1), 1)
    wait_for(lambda: status(cluster, ns, "mnist-gpu").get("phase") == "Running", 90, message="Running after the quota")


def test_pods_the_job_controller_cannot_create_are_shown_on_the_run(cluster):
    ns = cluster.namespace("failed-create")
    create(cluster, example("mnist-gpu", ns, scheduling={"priorityClassName": "no-such-class"}))
    cond = wait_for(lambda: (lambda c: c if c.get("status") == "False" else None)(
        condition(cluster, ns, "mnist-gpu", "PodsCreated")), 60, message="PodsCreated=False")
    assert cond["reason"] == "FailedCreate" and "no-such-class" in cond["message"], cond
    st = status(cluster, ns, "mnist-gpu")
    assert st["phase"] == "Pending" and st["reason"] == "FailedCreate" and "no-such-class" in st["message"]


def test_a_strangers_object_with_the_runs_name_is_neither_adopted_nor_deleted(cluster):
    ns = cluster.namespace("stranger")
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mnist-gpu", "labels": {"owner": "someone"}},
               "spec": {"ports": [{"port": 80}], "selector": {"app": "web"}}}
    cluster.rest.ok("POST", f"/api/v1/namespaces/{ns}/services", service)
    create(cluster, example("mnist-gpu", ns))
    wait_for(lambda: status(cluster, ns, "mnist-gpu").get("reason") == "NameTaken", 30, message="NameTaken")
    assert condition(cluster, ns, "mnist-gpu", "Created")["status"] == "False"
    assert "Service mnist-gpu exists and is not this run's" in status(cluster, ns, "mnist-gpu")["message"]
    wait_for(lambda: [e for e in cluster.events(ns, "mnist-gpu") if e["reason"] == "NameTaken"], 30,
             message="a Warning Event")
    assert jobs(cluster, ns) == []  # nothing started on a name it does not own
    cluster.kubectl("-n", ns, "delete", "trainingrun", "mnist-gpu", "--timeout=60s")
    kept = cluster.rest.get(f"/api/v1/namespaces/{ns}/services/mnist-gpu")
    assert kept is not None and not kept["metadata"].get("ownerReferences") and kept["spec"]["selector"] == {"app": "web"}


def test_a_run_edited_while_suspended_resumes_in_its_new_shape_as_a_new_attempt(cluster):
    ns = cluster.namespace("reshape")
    create(cluster, example("mnist-gpu", ns))
    first = render.job_name("mnist-gpu", 1)
    running_pods(cluster, ns, first, 1)
    wait_for(lambda: status(cluster, ns, "mnist-gpu").get("phase") == "Running", 30, message="Running")
    cluster.kubectl("-n", ns, "patch", "trainingrun", "mnist-gpu", "--type=merge",
                    "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    wait_for(lambda: status(cluster, ns, "mnist-gpu").get("phase") == "Suspended", 30, message="Suspended")
    wait_for(lambda: not cluster.pods(ns), 30, message="the pods gone while suspended")
    # Allowed while Suspended (the CRD's transition rules), refused while Running.
    cluster.kubectl("-n", ns, "patch", "trainingrun", "mnist-gpu", "--type=merge",
                    "-p", '{"spec":{"workload":{"epochs":7}}}')
    cluster.kubectl("-n", ns, "patch", "trainingrun", "mnist-gpu", "--type=merge",
                    "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    second = render.job_name("mnist-gpu", 2)
    pods = running_pods(cluster, ns, second, 1)
    args = pods[0]["spec"]["containers"][0]["args"]
    assert args[args.index("--epochs") + 1] == "7", args
    wait_for(lambda: status(cluster, ns, "mnist-gpu").get("phase") == "Running", 30, message="Running in the new shape")
    st = status(cluster, ns, "mnist-gpu")
    assert st["attempt"] == 2 and st["restarts"] == 0, st
    wait_for(lambda: [j["metadata"]["name"] for j in jobs(cluster, ns) if not j["metadata"].get("deletionTimestamp")]
             == [second], 30, message="only the new shape's Job")
    refused = cluster.kubectl("-n", ns, "patch", "trainingrun", "mnist-gpu", "--type=merge",
                              "-p", '{"spec":{"workload":{"epochs":9}}}', check=False)
    assert refused.returncode != 0 and "cannot change once the run has started" in refused.stderr


def test_two_multi_host_tpu_gangs_each_land_on_one_whole_slice(cluster):
    """Two node pools of the same TPU type and topology: each gang takes one slice, never parts of both."""
    from podrunner import tpu_slice
    for pool in ("tpu-v5e-b", "tpu-v5e-c"):  # beside tpu-v5e-a, which other tests may hold
        for host in tpu_slice(pool):
            cluster.runner.add_node(host)
    ns = cluster.namespace("two-slices")
    for name in ("xla-a", "xla-b"):
        create(cluster, {"apiVersion": "leap.dev/v1alpha1", "kind": "TrainingRun",
                         "metadata": {"name": name, "namespace": ns},
                         "spec": {"framework": "pytorch", "image": "registry.example/team/xla-train:1",
                                  "command": ["python", "train.py"],
                                  "accelerator": {"type": "google-tpu",
                                                  "tpu": {"type": "tpu-v5-lite-podslice", "topology": "4x4"}}}})
    pools = {}
    for name in ("xla-a", "xla-b"):
        pods = running_pods(cluster, ns, render.job_name(name, 1), 4)
        pools[name] = {p["spec"]["nodeName"].rsplit("-", 1)[0] for p in pods}
    assert all(len(p) == 1 for p in pools.values()), pools  # each gang on one slice
    assert pools["xla-a"] != pools["xla-b"], pools


WORKLOAD_CRD = {
    # Kueue's Workload API as far as Leap uses it: the real CRD is Kueue's; Kueue itself is played
    # by the test (it creates the Workload, admits and suspends the Job), which is what this tier
    # cannot show: Kueue's own admission decisions.
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "workloads.kueue.x-k8s.io"},
    "spec": {"group": "kueue.x-k8s.io", "scope": "Namespaced",
             "names": {"plural": "workloads", "singular": "workload", "kind": "Workload", "listKind": "WorkloadList"},
             "versions": [{"name": "v1beta1", "served": True, "storage": True,
                           "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
}


def test_a_queued_run_is_suspended_through_its_kueue_workload_not_the_jobs_suspend(cluster):
    """With queueName, runPolicy.suspend sets the Workload's spec.active (Kueue's documented way to
    stop a workload) and leaves the Job's spec.suspend to Kueue; resuming sets it back."""
    cluster.rest.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", WORKLOAD_CRD)
    cluster.kubectl("wait", "--for=condition=Established", "crd/workloads.kueue.x-k8s.io", "--timeout=60s")
    ns = cluster.namespace("kueue-stop")
    create(cluster, example("mnist-gpu", ns, scheduling={"queueName": "team-a"}))
    job_name = render.job_name("mnist-gpu", 1)
    job_path = f"/apis/batch/v1/namespaces/{ns}/jobs/{job_name}"
    job = wait_for(lambda: cluster.rest.get(job_path), 30, message="the queued Job")
    workloads = f"/apis/kueue.x-k8s.io/v1beta1/namespaces/{ns}/workloads"
    cluster.rest.ok("POST", workloads, {  # what Kueue creates for the Job
        "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
        "metadata": {"name": f"job-{job_name}-1a2b3", "labels": {"kueue.x-k8s.io/job-uid": job["metadata"]["uid"]},
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                                          "uid": job["metadata"]["uid"], "controller": True}]},
        "spec": {"active": True, "queueName": "team-a"}})
    workload = f"{workloads}/job-{job_name}-1a2b3"

    def kueue_sets_suspend(value: bool) -> None:
        cluster.rest.ok("PATCH", job_path, {"spec": {"suspend": value}}, content_type="application/merge-patch+json")

    kueue_sets_suspend(False)  # admitted
    running_pods(cluster, ns, job_name, 1)
    wait_for(lambda: status(cluster, ns, "mnist-gpu").get("phase") == "Running", 30, message="Running")

    cluster.kubectl("-n", ns, "patch", "trainingrun", "mnist-gpu", "--type=merge",
                    "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    wait_for(lambda: cluster.rest.get(workload)["spec"]["active"] is False, 30, message="the Workload deactivated")
    time.sleep(1)
    assert cluster.rest.get(job_path)["spec"]["suspend"] is False  # the Job's suspend is Kueue's to set
    kueue_sets_suspend(True)  # Kueue evicts the deactivated workload
    wait_for(lambda: status(cluster, ns, "mnist-gpu").get("phase") == "Suspended", 30, message="Suspended")

    cluster.kubectl("-n", ns, "patch", "trainingrun", "mnist-gpu", "--type=merge",
                    "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    wait_for(lambda: cluster.rest.get(workload)["spec"]["active"] is True, 30, message="the Workload active again")
    assert cluster.rest.get(job_path)["spec"]["suspend"] is True  # still Kueue's: it readmits
    kueue_sets_suspend(False)
    running_pods(cluster, ns, job_name, 1)
    wait_for(lambda: status(cluster, ns, "mnist-gpu").get("phase") == "Running", 30, message="Running again")
    st = status(cluster, ns, "mnist-gpu")
    assert st["restarts"] == 0 and st["attempt"] == 1, st
