"""The operator's API client against kmock's emulator with injected faults: retries, adoption."""

from __future__ import annotations

import kmock
import pytest

from leap_operator import opmetrics
from leap_operator.kube import Kube, KubeError


def job(name: str) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": "ns"},
            "spec": {"completions": 1}}


def errors(verb: str, resource: str) -> float:
    return opmetrics.REGISTRY.get_sample_value(
        "leap_operator_api_errors_total", {"verb": verb, "resource": resource}) or 0.0


@pytest.fixture
async def kube(kmock: kmock.KubernetesEmulator):
    kmock.resources["batch/v1/jobs"] = kmock.ResourceInfo(kind="Job", namespaced=True)
    client = Kube(server=str(kmock.url), backoff=0.01)
    yield client
    await client.close()


async def test_create_retries_5xx_and_adopts_what_a_lost_response_created(kmock, kube):
    # The first POST stores the Job but answers 503 (a response lost on the way back); the retry
    # then meets 409 AlreadyExists, and the client adopts the stored Job instead of failing.
    kmock["post /apis/batch/v1/namespaces/ns/jobs"][:1] << 503
    before = errors("post", "jobs")
    created = await kube.create(job("a1"))
    assert created["metadata"]["name"] == "a1"
    posts = [r for r in kmock if str(r.method).upper().endswith("POST")]
    assert len(posts) == 2
    assert len([k for k in kmock.objects if k[2] == "a1"]) == 1  # no duplicate
    assert errors("post", "jobs") == before + 2  # the 503 and the 409 (404s are answers, not errors)
    assert errors("get", "jobs") == 0


async def test_patch_retries_server_errors_then_gives_up_with_a_clear_error(kmock, kube):
    await kube.create(job("a2"))
    kmock["patch /apis/batch/v1/namespaces/ns/jobs/a2"][:2] << 500
    patched = await kube.patch("batch/v1", "jobs", "ns", "a2", {"spec": {"suspend": True}})
    assert patched["spec"]["suspend"] is True
    kmock["patch /apis/batch/v1/namespaces/ns/jobs/a2"] << 500
    kube.retries = 2
    with pytest.raises(KubeError) as info:
        await kube.patch("batch/v1", "jobs", "ns", "a2", {"spec": {"suspend": False}})
    assert info.value.status == 500


async def test_missing_objects_are_none_or_false_not_errors(kmock, kube):
    assert await kube.get("batch/v1", "jobs", "ns", "nope") is None
    assert await kube.delete("batch/v1", "jobs", "ns", "nope") is False
    assert await kube.patch("batch/v1", "jobs", "ns", "nope", {"spec": {}}) is None
    await kube.create(job("a3"))
    assert await kube.delete("batch/v1", "jobs", "ns", "a3") is True
    assert await kube.get("batch/v1", "jobs", "ns", "a3") is None


def test_runs_by_phase_gauge_follows_each_run():
    def value(phase):
        return opmetrics.REGISTRY.get_sample_value("leap_operator_runs", {"phase": phase})
    base_running, base_done = value("Running"), value("Succeeded")
    opmetrics.set_phase(("t", "a"), "Running")
    opmetrics.set_phase(("t", "b"), "Running")
    opmetrics.set_phase(("t", "a"), "Succeeded")
    opmetrics.set_phase(("t", "b"), None)
    opmetrics.set_phase(("t", "b"), None)
    assert value("Running") == base_running and value("Succeeded") == base_done + 1
