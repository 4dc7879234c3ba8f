"""FineTuneJobs end to end on the real cluster: the operator installed with Helm exactly as `finetune demo`
installs it (finetune_cli.demo), S3 seeded with the tiny models and the sample data, then every CPU example
trained to Succeeded, the GPU example left Pending, a killed trainer resumed, a malformed job failed, a deleted
job cleaned up, `helm test` and `helm uninstall`.

The CPU examples are all submitted first (module fixture) and waited on afterwards: the node runs two trainers
at a time, so they queue without further help. Outputs go under a fresh prefix per session, because the trainer
resumes from whatever complete checkpoint lies under output.uri.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_cli import demo
from tests.e2e.conftest import Cluster

pytestmark = pytest.mark.e2e

CPU_EXAMPLES = sorted(
    p.name for p in demo.EXAMPLES.glob("*.yaml") if (yaml.safe_load(p.read_text())["spec"]["resources"]["gpus"] == 0)
)
GPU_EXAMPLE = "04-llama-qlora-classification.yaml"
RUN = uuid.uuid4().hex[:8]
JOB_TIMEOUT_S = 420
# The local policy forbids GPUs and QLoRA outright (a PolicyViolation); the GPU example is meant to be accepted
# and wait for a GPU, so the tests widen the limits, through the very install path the demo uses.
GPU_POLICY = (
    "policy.limits.maxGpusPerJob=1",
    "policy.limits.maxMemory=64Gi",
    "policy.limits.allowedMethods={full,lora,qlora}",
)


# ---- helpers -----------------------------------------------------------------------------------------------


def target_of(cluster: Cluster) -> demo.Target:
    return demo.Target(cluster.kubeconfig, cluster.s3_endpoint, cluster.local)


def example(name: str, *, output: str | None = None, **hyperparameters: Any) -> dict[str, Any]:
    """An example as a dict, its outputs moved under this session's prefix (or `output`)."""
    job = yaml.safe_load((demo.EXAMPLES / name).read_text())
    job["spec"]["output"]["uri"] = output or f"s3://{demo.BUCKET}/e2e-{RUN}/{job['metadata']['name']}/"
    job["spec"]["hyperparameters"].update(hyperparameters)
    return dict(job)


def fresh_namespace(cluster: Cluster, prefix: str) -> str:
    name = f"e2e-{prefix}-{uuid.uuid4().hex[:6]}"
    demo.prepare_namespace(target_of(cluster), name)
    return name


def apply(cluster: Cluster, namespace: str, job: dict[str, Any]) -> str:
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(job))
    return str(job["metadata"]["name"])


def get_job(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return dict(json.loads(cluster.kubectl("-n", namespace, "get", "finetunejob", name, "-o", "json").stdout))


def trainer_pods(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    pods = cluster.kubectl("-n", namespace, "get", "pods", "-l", "app.kubernetes.io/component=trainer", "-o", "json")
    return list(json.loads(pods.stdout)["items"])


def diagnose(cluster: Cluster, namespace: str, name: str) -> str:
    job = cluster.kubectl("-n", namespace, "get", "finetunejob", name, "-o", "yaml", check=False)
    pods = cluster.kubectl("-n", namespace, "get", "pods", "-o", "wide", check=False)
    logs = cluster.kubectl(
        "-n", namespace, "logs", "-l", "app.kubernetes.io/component=trainer", "--tail=40", check=False
    )
    operator = cluster.kubectl(
        "-n", demo.OPERATOR_NAMESPACE, "logs", "deploy/finetune-finetune-operator", "--tail=30", check=False
    )
    return (
        f"---- job ----\n{job.stdout}{job.stderr}\n---- pods ----\n{pods.stdout}\n---- trainer logs ----\n"
        f"{logs.stdout}{logs.stderr}\n---- operator logs ----\n{operator.stdout}{operator.stderr}"
    )


def wait_for(cluster: Cluster, namespace: str, name: str, until: Any, timeout: float, what: str) -> dict[str, Any]:
    """Poll the FineTuneJob until `until(status)` is true; fail with the job, pods and logs otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        job = get_job(cluster, namespace, name)
        status = job.get("status") or {}
        if until(status):
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"{namespace}/{name}: not {what} within {timeout:.0f}s\n{diagnose(cluster, namespace, name)}")
        time.sleep(1)


def wait_terminal(cluster: Cluster, namespace: str, name: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    return wait_for(
        cluster, namespace, name, lambda s: s.get("phase") in ("Succeeded", "Failed"), timeout, "Succeeded/Failed"
    )


def assert_succeeded(cluster: Cluster, namespace: str, job: dict[str, Any]) -> dict[str, Any]:
    status = job.get("status") or {}
    name = job["metadata"]["name"]
    assert status.get("phase") == "Succeeded", diagnose(cluster, namespace, name)
    assert status.get("metrics"), status
    assert status.get("loss") is not None, status
    manifest_uri = (status.get("output") or {}).get("manifest")
    assert manifest_uri, status
    from finetune_trainer.storage import parse_uri

    loc = parse_uri(manifest_uri)
    manifest = json.loads(cluster.s3_client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read())
    assert manifest.get("files"), manifest
    return dict(status)


# ---- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def platform(cluster: Cluster) -> demo.Target:
    """The operator (Helm, as the demo installs it) and S3 seeded with every tiny model and the sample data."""
    target = target_of(cluster)
    demo.install_operator(target, extra_values=GPU_POLICY)
    demo.seed_storage(target, models=tuple(demo.MODELS))
    return target


@pytest.fixture(scope="module")
def cpu_jobs(cluster: Cluster, platform: demo.Target) -> Iterator[dict[str, tuple[str, str]]]:
    """Every CPU example submitted at once, each in its own namespace: {example: (namespace, job name)}."""
    submitted = {}
    for name in CPU_EXAMPLES:
        namespace = fresh_namespace(cluster, "-".join(Path(name).stem.split("-")[:2]))
        submitted[name] = (namespace, apply(cluster, namespace, example(name)))
    yield submitted
    for namespace, _ in submitted.values():
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture
def namespace(cluster: Cluster, platform: demo.Target, request: pytest.FixtureRequest) -> Iterator[str]:
    ns = fresh_namespace(cluster, request.node.name.split("[")[0].removeprefix("test_")[:30].replace("_", "-"))
    yield ns
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


# ---- tests -------------------------------------------------------------------------------------------------


def test_malformed_job_fails_with_reason_and_no_pod(cluster: Cluster, namespace: str) -> None:
    job = example("02-gpt2-text-file.yaml")
    job["metadata"]["name"] = "malformed"
    job["spec"]["model"]["uri"] = "ftp://nowhere/model/"  # the CRD admits it, the operator's validation never does
    apply(cluster, namespace, job)
    failed = wait_for(cluster, namespace, "malformed", lambda s: s.get("phase") == "Failed", 60, "Failed")
    assert failed["status"]["reason"] == "InvalidURI", failed["status"]
    assert "model.uri" in failed["status"]["message"], failed["status"]
    time.sleep(3)  # a pod would have been created by now
    assert trainer_pods(cluster, namespace) == []
    assert cluster.kubectl("-n", namespace, "get", "jobs", "-o", "name").stdout.strip() == ""


def test_gpu_example_waits_unschedulable(cluster: Cluster, namespace: str) -> None:
    name = apply(cluster, namespace, example(GPU_EXAMPLE))
    job = wait_for(cluster, namespace, name, lambda s: s.get("reason") == "Unschedulable", 90, "Pending/Unschedulable")
    status = job["status"]
    assert status["phase"] == "Pending", status
    assert "nvidia.com/gpu" in (status.get("message") or ""), status
    time.sleep(5)  # and it stays there
    assert get_job(cluster, namespace, name)["status"]["phase"] == "Pending"


@pytest.mark.parametrize("name", CPU_EXAMPLES)
def test_cpu_example_succeeds(cluster: Cluster, cpu_jobs: dict[str, tuple[str, str]], name: str) -> None:
    namespace, job_name = cpu_jobs[name]
    status = assert_succeeded(cluster, namespace, wait_terminal(cluster, namespace, job_name))
    max_steps = example(name)["spec"]["hyperparameters"].get("maxSteps")
    if max_steps:
        assert status["progress"]["step"] == max_steps, status["progress"]


def test_killed_trainer_resumes_from_checkpoint(cluster: Cluster, namespace: str) -> None:
    max_steps = 150  # long enough to kill the pod after its first checkpoint, well before the end
    name = apply(cluster, namespace, example("03-pythia-instruction-medical.yaml", maxSteps=max_steps))
    wait_for(cluster, namespace, name, lambda s: s.get("checkpoints"), 240, "checkpointed")
    pods = [p["metadata"]["name"] for p in trainer_pods(cluster, namespace)]
    assert len(pods) == 1, pods
    cluster.kubectl("-n", namespace, "delete", "pod", pods[0], "--grace-period=0", "--force")
    status = assert_succeeded(cluster, namespace, wait_terminal(cluster, namespace, name))
    assert status["progress"]["step"] == max_steps, status["progress"]
    assert pods[0] not in [p["metadata"]["name"] for p in trainer_pods(cluster, namespace)]
    assert status["attempts"] == 2, status


def test_deleting_a_running_job_removes_its_pods_and_config(cluster: Cluster, namespace: str) -> None:
    name = apply(cluster, namespace, example("02-gpt2-text-file.yaml", maxSteps=100000))
    wait_for(cluster, namespace, name, lambda s: s.get("phase") == "Running", 180, "Running")
    assert trainer_pods(cluster, namespace)
    assert cluster.kubectl("-n", namespace, "get", "configmap", f"{name}-config", check=False).returncode == 0
    cluster.kubectl("-n", namespace, "delete", "finetunejob", name, "--wait=true", "--timeout=60s")
    deadline = time.monotonic() + 90
    while (
        trainer_pods(cluster, namespace)
        or cluster.kubectl("-n", namespace, "get", "configmap", f"{name}-config", check=False).returncode == 0
    ):
        if time.monotonic() > deadline:
            pytest.fail(
                f"pods or ConfigMap of {name} still there 90s after deletion\n{diagnose(cluster, namespace, name)}"
            )
        time.sleep(1)
    assert cluster.kubectl("-n", namespace, "get", "jobs", "-o", "name").stdout.strip() == ""


def test_helm_test_passes(cluster: Cluster, platform: demo.Target) -> None:
    proc = demo.helm(
        platform, "test", demo.RELEASE, "-n", demo.OPERATOR_NAMESPACE, "--timeout", "3m", check=False, timeout=240
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_helm_uninstall_leaves_only_the_crd(cluster: Cluster, platform: demo.Target) -> None:
    demo.helm(platform, "uninstall", demo.RELEASE, "-n", demo.OPERATOR_NAMESPACE, "--wait", timeout=180)
    selector = f"app.kubernetes.io/instance={demo.RELEASE}"
    kinds = "deployments,replicasets,pods,services,configmaps,serviceaccounts,roles,rolebindings"
    deadline = time.monotonic() + 90
    while True:
        left = cluster.kubectl("get", kinds, "-A", "-l", selector, "-o", "name").stdout.split()
        left += cluster.kubectl("get", "clusterroles,clusterrolebindings", "-l", selector, "-o", "name").stdout.split()
        if not left:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"left behind by helm uninstall: {left}")
        time.sleep(1)
    assert cluster.kubectl("get", "crd", "finetunejobs.finetune.dev", check=False).returncode == 0
    assert (
        cluster.kubectl("-n", demo.OPERATOR_NAMESPACE, "get", "secrets", "-l", "owner=helm", "-o", "name").stdout == ""
    )
