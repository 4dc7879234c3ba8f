"""A gang whose second worker never starts fails at the start deadline with what it waits for, and holds
nothing afterwards: every worker Job is deleted. The real control plane with a deliberately short deadline; no
scheduler runs in this tier, so worker 1's pod stays Pending as an unschedulable one would (the test plays the
kubelet only for worker 0: it binds that pod, gives it an IP and marks it Running)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from tests.integration.operator_harness import (
    NO_PREFLIGHT,
    TEST_PLATFORM_DEFAULTS,
    OperatorProcess,
    fake_node,
    running_operator,
    valid_spec,
    wait_for,
)

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
NODE = "fake-kubelet-gang"
DEADLINE_S = 8
OPERATOR_CONFIG = {
    "defaults": TEST_PLATFORM_DEFAULTS,
    "preflight": NO_PREFLIGHT,
    "pollSeconds": 1.0,
    "startDeadlineSeconds": DEADLINE_S,
}


@pytest.fixture(scope="module")
def operator(control_plane: Any, kube_api: Any) -> Iterator[OperatorProcess]:
    with running_operator(control_plane, kube_api, OPERATOR_CONFIG) as op:
        yield op


@pytest.fixture(scope="module")
def node(kube_api: Any) -> Iterator[None]:
    with fake_node(kube_api, NODE):
        yield


def test_a_gang_that_cannot_start_fails_at_the_deadline_and_releases_every_worker(
    operator: OperatorProcess, node: None, kube_api: Any, namespace: str
) -> None:
    core, batch, custom = client.CoreV1Api(kube_api), client.BatchV1Api(kube_api), client.CustomObjectsApi(kube_api)
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": "stuck"}}
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, {**body, "spec": valid_spec(resources={"workers": 2})}
    )

    def pods_of(job: str) -> list[Any]:
        return core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items

    leader = wait_for("worker 0's pod", lambda: pods_of("stuck-worker-0"), timeout=40)[0]
    binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": leader.metadata.name},
               "target": {"apiVersion": "v1", "kind": "Node", "name": NODE}}  # fmt: skip
    core.create_namespaced_pod_binding(leader.metadata.name, namespace, binding, _preload_content=False)
    running = {"phase": "Running", "podIP": "198.18.100.41", "containerStatuses": [
        {"name": "trainer", "image": "x", "imageID": "", "ready": True, "restartCount": 0,
         "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}  # fmt: skip
    core.patch_namespaced_pod_status(leader.metadata.name, namespace, {"status": running})
    wait_for("worker 1's pod (never scheduled here)", lambda: pods_of("stuck-worker-1"), timeout=40)

    def status() -> dict[str, Any]:
        return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "stuck").get("status") or {}

    waiting = wait_for("WaitingForWorkers", lambda: (s := status()).get("workers") == "1/2" and s, timeout=20)
    assert waiting["reason"] == "WaitingForWorkers" and "worker 1" in waiting["message"]
    failed = wait_for("Failed", lambda: (s := status()).get("phase") == "Failed" and s, timeout=DEADLINE_S + 30)
    assert failed["reason"] == "WaitingForWorkers" and "1 of 2 pods" in failed["message"], failed
    wait_for("every worker Job deleted", lambda: not batch.list_namespaced_job(namespace).items, timeout=30)
