"""`leap render` / render_children: the Service and Job the operator creates for a TrainingRun.

Rendered objects are checked with kubernetes-validate (strict) against Kubernetes 1.31's real
OpenAPI schemas; focused tests check what a user would notice in the pods.
"""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from leap_operator import cli, names
from leap_operator.config import OperatorConfig
from leap_operator.render import job_name, render_children, service_name
from leap_trainer import contract

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(ROOT.glob("manifests/examples/*.yaml"))
K8S_VERSION = "1.31.0"


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "manifests/examples" / f"{name}.yaml").read_text())


def env_of(job: dict) -> dict[str, object]:
    """name -> value (or the downward-API fieldPath) of the trainer container's env."""
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath"))
            for e in container["env"]}


def container_of(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def strict_validate(obj: dict) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:  # keep the failure readable
        raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}") from None


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_leap_render_output_of_every_example_is_valid_kubernetes(example, capsys):
    assert cli.main(["render", str(example)]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [o["kind"] for o in objects] == ["Service", "Job"]
    for obj in objects:
        strict_validate(obj)


def test_render_prints_exactly_what_the_operator_creates(capsys):
    path = ROOT / "manifests/examples/ddp-cpu.yaml"
    assert cli.main(["render", "--attempt", "3", str(path)]) == 0
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    assert printed == render_children(yaml.safe_load(path.read_text()), attempt=3, config=OperatorConfig.from_env())


def test_render_refuses_an_invalid_run(tmp_path, capsys):
    run = load("mnist-cpu")
    run["spec"]["workers"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(run))
    assert cli.main(["render", str(path)]) == contract.EXIT_INVALID
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "spec.workers: must be >= 1" in captured.err


def test_render_children_raises_invalid_run_instead_of_rendering_half_an_object():
    from leap_operator.validation import InvalidRun
    run = load("keras-tpu")
    del run["spec"]["accelerator"]["tpu"]
    with pytest.raises(InvalidRun) as info:
        render_children(run)
    assert [p.field for p in info.value.problems] == ["spec.accelerator.tpu"]


def test_service_is_headless_and_selects_the_runs_pods():
    service, job = render_children(load("ddp-cpu"))
    assert service["metadata"]["name"] == service_name("ddp-cpu")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {names.LABEL_RUN: "ddp-cpu"}
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]


def test_indexed_job_per_attempt_with_standard_labels():
    _, job = render_children(load("ddp-cpu"), attempt=2)
    assert job["metadata"]["name"] == job_name("ddp-cpu", 2) == "ddp-cpu-a2"
    spec = job["spec"]
    assert (spec["completions"], spec["parallelism"], spec["completionMode"], spec["backoffLimit"]) == (2, 2, "Indexed", 0)
    for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
        assert meta["labels"] == {
            names.LABEL_NAME: "leap", names.LABEL_INSTANCE: "ddp-cpu", names.LABEL_COMPONENT: "worker",
            names.LABEL_MANAGED_BY: names.MANAGER, names.LABEL_PART_OF: "leap",
            names.LABEL_RUN: "ddp-cpu", names.LABEL_ATTEMPT: "2"}


def test_owner_references_only_when_the_run_has_a_uid():
    run = load("mnist-cpu")
    assert all("ownerReferences" not in o["metadata"] for o in render_children(run))
    run["metadata"]["uid"] = "1f0e-uid"
    for obj in render_children(run):
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": names.API_VERSION, "kind": names.KIND, "name": "mnist-cpu", "uid": "1f0e-uid",
            "controller": True, "blockOwnerDeletion": True}]


def test_pods_meet_pod_security_restricted():
    for example in EXAMPLES:
        _, job = render_children(yaml.safe_load(example.read_text()))
        pod = job["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert "hostNetwork" not in pod and "hostPath" not in str(pod["volumes"])
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert not sc.get("privileged")


def test_multinode_gpu_pytorch_env_and_resources():
    _, job = render_children(load("ddp-multinode-gpu"))
    env = env_of(job)
    master = "ddp-multinode-gpu-a1-0.ddp-multinode-gpu.default.svc.cluster.local"
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env[contract.ENV_MASTER_ADDR] == env[contract.ENV_PET_MASTER_ADDR] == master
    assert env[contract.ENV_MASTER_PORT] == str(contract.DEFAULT_MASTER_PORT)
    assert env[contract.ENV_NNODES] == env[contract.ENV_PET_NNODES] == "2"
    assert env[contract.ENV_NPROC_PER_NODE] == env[contract.ENV_PET_NPROC_PER_NODE] == "8"  # auto = GPUs per worker
    assert env[contract.ENV_WORLD_SIZE] == "16"
    assert env[contract.ENV_NODE_RANK] == env[contract.ENV_RANK] == env[contract.ENV_WORKER_INDEX] == index
    assert env[contract.ENV_WORKER_HOSTS] == (
        f"{master}:29500,ddp-multinode-gpu-a1-1.ddp-multinode-gpu.default.svc.cluster.local:29500")
    assert env[contract.ENV_RUN] == "ddp-multinode-gpu" and env[contract.ENV_ATTEMPT] == "1"
    assert env[contract.ENV_CHECKPOINT_EVERY] == "200"
    pod = job["spec"]["template"]["spec"]
    container = container_of(job)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["requests"] == {"cpu": "32", "memory": "128Gi"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["checkpoint"]["persistentVolumeClaim"] == {"claimName": "leap-checkpoints"}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    # one metrics port per local process (local rank r serves port + r)
    ports = [p["containerPort"] for p in container["ports"] if p["name"].startswith("metrics")]
    assert ports == list(range(9400, 9408))
    assert "activeDeadlineSeconds" not in job["spec"]  # the operator keeps the run's one deadline


def test_builtin_workload_becomes_leap_train_arguments():
    _, job = render_children(load("distillation-gpu"))
    container = container_of(job)
    assert container["command"] == ["leap-train"]
    assert container["args"] == [
        "--framework", "pytorch", "--workload", "distillation", "--model", "mlp", "--dataset", "digits",
        "--epochs", "10", "--batch-size", "64", "--lr", "0.003",
        "--teacher", "mlp-large", "--temperature", "4.0", "--alpha", "0.9"]
    assert container["image"] == OperatorConfig().default_image("pytorch", "nvidia-gpu")


def test_custom_command_and_image_pass_through():
    run = load("mnist-cpu")
    run["spec"].pop("workload")
    run["spec"].update(image="example.com/me/train:2", command=["python", "-m", "mytrain"], args=["--steps", "10"],
                       env=[{"name": "WANDB_MODE", "value": "offline"}])
    _, job = render_children(run)
    container = container_of(job)
    assert (container["image"], container["command"], container["args"]) == (
        "example.com/me/train:2", ["python", "-m", "mytrain"], ["--steps", "10"])
    assert env_of(job)["WANDB_MODE"] == "offline"
    strict_validate(job)


def multi_host_tpu_program(name: str = "tpu-multihost") -> dict:
    """A user's own program (e.g. JAX or PyTorch/XLA in their image) on a multi-host v5e 4x4 slice:
    4 VMs x 4 chips. (TensorFlow is refused on multi-host slices; see test_api/test_validate.)"""
    run = load("keras-tpu")
    run["metadata"]["name"] = name
    run["spec"].pop("workload")
    run["spec"].update(framework="pytorch", image="example.com/me/jax-tpu:1", command=["python", "-m", "train"])
    run["spec"]["accelerator"]["tpu"]["topology"] = "4x4"
    return run


def test_tpu_multihost_slice():
    _, job = render_children(multi_host_tpu_program())
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4  # derived: 16 chips / 4 per host
    pod = job["spec"]["template"]["spec"]
    container = container_of(job)
    assert container["resources"]["limits"]["google.com/tpu"] == "4"
    assert container["resources"]["requests"]["google.com/tpu"] == "4"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                   "cloud.google.com/gke-tpu-topology": "4x4"}
    assert {"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    env = env_of(job)
    hosts = [f"tpu-multihost-a1-{i}.tpu-multihost.default.svc.cluster.local" for i in range(4)]
    assert env[contract.ENV_TPU_WORKER_HOSTNAMES] == ",".join(hosts)
    assert env[contract.ENV_TPU_WORKER_ID] == env[contract.ENV_WORKER_INDEX]
    assert env[contract.ENV_TPU_TYPE] == "tpu-v5-lite-podslice"  # leap-train's peak FLOP/s reads it
    strict_validate(job)


def test_tpu_single_host_slice_takes_all_chips():
    _, job = render_children(load("keras-tpu"))
    assert job["spec"]["completions"] == 1
    assert container_of(job)["resources"]["limits"]["google.com/tpu"] == "8"
    assert env_of(job)[contract.ENV_TPU_WORKER_HOSTNAMES] == "keras-tpu-a1-0.keras-tpu.default.svc.cluster.local"


def test_kueue_queued_job_is_labelled_and_created_suspended():
    _, job = render_children(load("kueue-queued"))
    assert job["metadata"]["labels"][names.KUEUE_QUEUE_LABEL] == "team-a-gpus"
    assert names.KUEUE_QUEUE_LABEL not in job["spec"]["template"]["metadata"]["labels"]
    assert job["spec"]["suspend"] is True  # Kueue admits it by unsuspending
    assert job["metadata"]["namespace"] == "team-a"
    pod = job["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "training-low"
    assert pod["nodeSelector"]["cloud.google.com/gke-nodepool"] == "a100-pool"
    assert {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"} in pod["tolerations"]
    assert env_of(job)[contract.ENV_MASTER_ADDR].endswith(".team-a.svc.cluster.local")


def test_scheduler_name_suspend_and_metrics_annotations():
    run = load("mnist-cpu")
    run["spec"]["scheduling"] = {"schedulerName": "volcano"}
    run["spec"]["runPolicy"] = {"suspend": True}
    run["spec"]["metrics"] = {"port": 9500}
    _, job = render_children(run)
    assert job["spec"]["suspend"] is True
    assert job["spec"]["template"]["spec"]["schedulerName"] == "volcano"
    assert job["spec"]["template"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "9500", "prometheus.io/path": "/metrics"}
    assert env_of(job)[contract.ENV_METRICS_PORT] == "9500"
    assert {"name": "metrics", "containerPort": 9500, "protocol": "TCP"} in container_of(job)["ports"]


def test_checkpoint_defaults_to_empty_dir_at_the_contract_path():
    _, job = render_children(load("mnist-cpu"))
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "checkpoint", "emptyDir": {}}]
    assert container_of(job)["volumeMounts"] == [{"name": "checkpoint", "mountPath": contract.DEFAULT_CHECKPOINT_DIR}]
    assert env_of(job)[contract.ENV_CHECKPOINT_DIR] == contract.DEFAULT_CHECKPOINT_DIR


def test_pods_chown_the_checkpoint_volume_only_on_a_root_mismatch():
    """fsGroup on a large checkpoint PVC: without OnRootMismatch the kubelet chowns every file on
    every pod start (minutes for a big checkpoint directory)."""
    for name in ("mnist-cpu", "ddp-multinode-gpu", "keras-tpu"):
        _, job = render_children(load(name))
        security = job["spec"]["template"]["spec"]["securityContext"]
        assert security["fsGroup"] and security["fsGroupChangePolicy"] == "OnRootMismatch"


def test_leap_render_takes_the_image_registry_from_flags_or_env(capsys, monkeypatch):
    path = str(ROOT / "manifests/examples/mnist-gpu.yaml")
    monkeypatch.setenv("LEAP_IMAGE_REGISTRY", "env.example.com/leap")
    assert cli.main(["render", path]) == 0
    job = list(yaml.safe_load_all(capsys.readouterr().out))[1]
    assert container_of(job)["image"].startswith("env.example.com/leap/leap-torch-gpu:")
    assert cli.main(["render", "--image-registry", "registry.example.com/ml", "--image-tag", "1.2.3", path]) == 0
    job = list(yaml.safe_load_all(capsys.readouterr().out))[1]
    assert container_of(job)["image"] == "registry.example.com/ml/leap-torch-gpu:1.2.3"


def test_operator_config_from_env_changes_images_and_domain():
    config = OperatorConfig.from_env({"LEAP_IMAGE_REGISTRY": "registry.local/ml", "LEAP_IMAGE_TAG": "dev",
                                      "LEAP_IMAGE_TF_TPU": "example.com/tf-tpu:7", "LEAP_CLUSTER_DOMAIN": "corp.internal",
                                      "LEAP_DEFAULT_MEMORY_REQUEST": "3Gi"})
    _, job = render_children(load("ddp-cpu"), config=config)
    assert container_of(job)["image"] == "registry.local/ml/leap-torch-gpu:dev"
    assert container_of(job)["resources"]["requests"]["memory"] == "1Gi"  # the run's own request wins
    assert env_of(job)[contract.ENV_MASTER_ADDR] == "ddp-cpu-a1-0.ddp-cpu.default.svc.corp.internal"
    _, tpu_job = render_children(load("keras-tpu"), config=config)
    assert container_of(tpu_job)["image"] == "example.com/tf-tpu:7"
    assert container_of(tpu_job)["resources"]["requests"]["memory"] == "3Gi"


def test_render_does_not_modify_its_input():
    run = load("ddp-multinode-gpu")
    before = copy.deepcopy(run)
    render_children(run, attempt=4)
    assert run == before


def pod_env(job: dict, index: int) -> dict[str, str]:
    """The env a worker pod sees: what the kubelet resolves from the downward API for pod `index`."""
    out = {}
    for item in container_of(job)["env"]:
        if "value" in item:
            out[item["name"]] = item["value"]
        else:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == \
                f"metadata.annotations['{contract.JOB_COMPLETION_INDEX_ANNOTATION}']"
            out[item["name"]] = str(index)
    return out


def test_tensorflow_workers_get_a_consistent_cluster_from_the_trainers_own_parser():
    from leap_trainer.tf_strategy import MULTI_WORKER, choose_strategy
    run = load("ddp-cpu")
    run["metadata"]["name"] = "tf-cpu"
    run["spec"]["framework"] = "tensorflow"
    _, job = render_children(run)
    plans = [choose_strategy(pod_env(job, i)) for i in range(2)]
    assert [p.kind for p in plans] == [MULTI_WORKER, MULTI_WORKER]
    assert [p.worker_index for p in plans] == [0, 1]
    assert plans[0].tf_config["cluster"] == plans[1].tf_config["cluster"] == {"worker": [
        f"tf-cpu-a1-{i}.tf-cpu.default.svc.cluster.local:{contract.DEFAULT_TF_PORT}" for i in range(2)]}
    assert [p.is_chief for p in plans] == [True, False]


def test_tensorflow_on_a_multi_host_slice_is_refused_by_render_and_by_the_trainer_on_every_host():
    from leap_operator.validation import InvalidRun
    from leap_trainer.tf_strategy import StrategyConfigError, choose_strategy
    run = multi_host_tpu_program("tf-multihost")
    for key in ("image", "command"):
        run["spec"].pop(key)
    run["spec"].update(framework="tensorflow", workload={"model": "mlp-large"})
    with pytest.raises(InvalidRun, match="multi-host TPU slice is not supported"):
        render_children(run)
    # Started on such a slice by other means (a hand-written Job), leap-train refuses on every host
    # instead of training one unsynchronised model per host. The TPU env is the one Leap renders.
    _, job = render_children(multi_host_tpu_program())
    for index in range(4):
        env = pod_env(job, index)
        assert env[contract.ENV_TPU_WORKER_ID] == str(index)
        with pytest.raises(StrategyConfigError, match="multi-host TPU slice is not supported"):
            choose_strategy(env)


def test_tpu_pods_of_a_single_host_slice_are_recognised_as_tpu_hosts_by_the_trainer():
    from leap_trainer.tf_strategy import TPU, choose_strategy
    _, job = render_children(load("keras-tpu"))
    plan = choose_strategy(pod_env(job, 0))
    assert (plan.kind, plan.workers, plan.is_chief) == (TPU, 1, True)


def test_a_limit_below_the_default_request_lowers_the_request():
    run = load("mnist-cpu")
    run["spec"]["resources"] = {"limits": {"memory": "512Mi", "cpu": "4"}}
    _, job = render_children(run, config=OperatorConfig())
    resources = container_of(job)["resources"]
    assert resources["requests"] == {"cpu": OperatorConfig().default_cpu_request, "memory": "512Mi"}
    assert resources["limits"] == {"memory": "512Mi", "cpu": "4"}
    strict_validate(job)


def test_longest_allowed_name_still_gives_valid_hostnames():
    from leap_operator import api
    run = load("ddp-cpu")
    run["metadata"]["name"] = "r" * api.MAX_RUN_NAME
    run["spec"]["workers"] = 4096  # the schema's maximum
    run["spec"]["workload"]["dataset"] = "synthetic"  # digits' 4,000 samples cannot feed 4,096 processes
    run["spec"]["runPolicy"] = {"backoffLimit": 100}  # attempts up to 101
    _, job = render_children(run, attempt=101)
    hostnames = env_of(job)[contract.ENV_WORKER_HOSTS].split(",")
    longest = max((h.split(".")[0] for h in hostnames), key=len)
    assert len(longest) <= 63 and len(job["metadata"]["name"]) <= 63


def test_a_multi_host_tpu_gang_is_pinned_to_one_node_pool_and_single_hosts_are_not():
    """As JobSet's exclusive placement: affinity to its own gang and away from other runs' gangs,
    by node pool (one GKE TPU slice). The real scheduler applies it in test_real_semantics.py."""
    multi = {"apiVersion": "leap.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": "xla", "namespace": "ns"},
             "spec": {"framework": "pytorch", "image": "r.example/x:1", "command": ["python", "t.py"],
                      "accelerator": {"type": "google-tpu", "tpu": {"type": "tpu-v5-lite-podslice", "topology": "4x4"}}}}
    affinity = render_children(multi, 2)[1]["spec"]["template"]["spec"]["affinity"]
    own = affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert own["topologyKey"] == "cloud.google.com/gke-nodepool"
    assert own["labelSelector"]["matchLabels"] == {"leap.dev/run": "xla", "leap.dev/attempt": "2"}
    away = affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert away["topologyKey"] == "cloud.google.com/gke-nodepool"
    assert {"key": "leap.dev/run", "operator": "NotIn", "values": ["xla"]} in away["labelSelector"]["matchExpressions"]
    single = copy.deepcopy(multi)
    single["spec"]["accelerator"]["tpu"]["topology"] = "2x2"
    assert "affinity" not in render_children(single, 1)[1]["spec"]["template"]["spec"]
