"""Smoke test of the local control plane itself (scripts/control-plane.sh).

Proves what the operator's integration tests rely on: a 1.20 apiserver, the Job
controller creating Pods, and the garbage collector cascading deletes through
ownerReferences.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def _wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def test_apiserver_is_1_20(kube_api: Any) -> None:
    from kubernetes import client

    info = client.VersionApi(kube_api).get_code()
    assert info.major == "1"
    assert info.minor.rstrip("+") == "20"
    assert info.git_version.startswith("v1.20."), info.git_version


def test_job_creates_pod_and_gc_removes_it(kube_api: Any, namespace: str) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    batch = client.BatchV1Api(kube_api)
    core = client.CoreV1Api(kube_api)

    job = client.V1Job(
        metadata=client.V1ObjectMeta(name="smoke"),
        spec=client.V1JobSpec(
            backoff_limit=0,
            template=client.V1PodTemplateSpec(
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    # No kubelet in this tier: the pod is never pulled or run.
                    containers=[client.V1Container(name="main", image="busybox", command=["true"])],
                )
            ),
        ),
    )
    created: Any = batch.create_namespaced_job(namespace, job)

    def job_pods() -> list[Any]:
        return core.list_namespaced_pod(namespace, label_selector="job-name=smoke").items

    # The Job controller (kube-controller-manager) creates the pod.
    pods = _wait_for("the Job controller to create a pod", job_pods)
    assert len(pods) == 1
    owners = pods[0].metadata.owner_references or []
    assert [(o.kind, o.name, o.uid) for o in owners] == [("Job", "smoke", created.metadata.uid)]

    # Background propagation: the Job goes at once, the garbage collector removes its pod.
    batch.delete_namespaced_job("smoke", namespace, propagation_policy="Background")

    def job_gone() -> bool:
        try:
            batch.read_namespaced_job("smoke", namespace)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    _wait_for("the Job to be deleted", job_gone)
    _wait_for("the garbage collector to delete the Job's pod", lambda: not job_pods())
