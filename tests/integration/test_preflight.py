"""The CPU preflight on the real control plane: a new job gets a preflight Job (no GPU) before its trainer's Job;
what the preflight pod reports in its termination message decides between the trainer (with status.estimate)
and a Failed verdict before any GPU is requested.

There is no kubelet in this tier: the test plays the preflight pod by writing its status (phase, exit code and
termination message), as a kubelet would. The report in it is built by the real planner
(`finetune_api.plan.estimate`) on a real model shape; the preflight program itself runs in
tests/trainer/test_preflight.py (a real S3 server, real tokenizer) and in the e2e tier (a real pod).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from finetune_api.plan import Estimate, estimate, gpu_type, model_shape
from finetune_api.reports import Report, ReportKind, format_report
from finetune_api.resolve import resolve_spec
from finetune_api.spec import FineTuneJobSpec
from finetune_cli.demo import LLAMA_2_7B_CONFIG
from finetune_operator.builders import config_name, preflight_name, workload_name
from tests.integration.operator_harness import (
    TEST_PLATFORM_DEFAULTS,
    OperatorProcess,
    running_operator,
    valid_spec,
    wait_for,
)

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
OPERATOR_CONFIG = {
    "defaults": {**TEST_PLATFORM_DEFAULTS, "gpuType": "a100-40gb"},
    "preflight": {"enabled": True, "cpu": "500m", "memory": "1Gi"},
    "pollSeconds": 1.0,
}
LLAMA_7B = LLAMA_2_7B_CONFIG


@pytest.fixture(scope="module")
def operator(control_plane: Any, kube_api: Any) -> Iterator[OperatorProcess]:
    with running_operator(control_plane, kube_api, OPERATOR_CONFIG) as op:
        yield op


@pytest.fixture(autouse=True)
def _log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "operator" in request.fixturenames:  # pytest shows this only for failing tests
        print(request.getfixturevalue("operator").log_tail())


class Cluster:
    def __init__(self, api: Any, ns: str) -> None:
        self.ns = ns
        self.custom, self.core, self.batch = client.CustomObjectsApi(api), client.CoreV1Api(api), client.BatchV1Api(api)

    def create(self, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)

    def status(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name).get("status") or {}

    def job_names(self) -> set[str]:
        return {j.metadata.name for j in self.batch.list_namespaced_job(self.ns).items}

    def preflight_pod(self, name: str) -> Any:
        selector = f"app.kubernetes.io/component=preflight,finetune.dev/job-name={name}"
        return wait_for(
            f"the preflight pod of {name}",
            lambda: self.core.list_namespaced_pod(self.ns, label_selector=selector).items,
            timeout=40,
        )[0]

    def finish(self, pod: Any, exit_code: int, report: Report) -> None:
        """What the kubelet writes when the preflight's container ends."""
        term = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error"}
        term["message"] = format_report(report)
        status = {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [
                {"name": "preflight", "image": "finetune-trainer:test", "imageID": "", "ready": False,
                 "restartCount": 0, "state": {"terminated": term}},
            ],
        }  # fmt: skip
        self.core.patch_namespaced_pod_status(pod.metadata.name, self.ns, {"status": status})

    def events(self, name: str) -> list[tuple[str, str]]:
        items = self.core.list_namespaced_event(self.ns).items
        return [(e.type, e.reason) for e in items if e.involved_object.name == name]


@pytest.fixture
def cluster(kube_api: Any, namespace: str) -> Cluster:
    return Cluster(kube_api, namespace)


def planned(spec: dict[str, Any], gpu: str) -> Estimate:
    typed = FineTuneJobSpec.model_validate({**spec, "resources": {"gpus": 1}})
    return estimate(resolve_spec(typed).spec, model_shape(LLAMA_7B), gpu_type(gpu), 1)


def test_a_job_that_fits_gets_its_estimate_then_its_trainer_and_the_preflight_goes(
    operator: OperatorProcess, cluster: Cluster
) -> None:
    spec = valid_spec(resources={"gpus": 1, "gpuType": "h100"})
    cluster.create("fits", spec)
    pod = cluster.preflight_pod("fits")
    limits = pod.spec.containers[0].resources.limits
    assert "nvidia.com/gpu" not in limits and limits["memory"] == "1Gi"
    assert pod.spec.security_context.run_as_non_root and not pod.spec.automount_service_account_token
    assert wait_for("Pending/Preflight", lambda: cluster.status("fits").get("reason") == "Preflight")
    assert workload_name("fits") not in cluster.job_names()  # no GPU is requested before the verdict

    est = planned(spec, "h100")
    assert est.fits
    cluster.finish(pod, 0, Report(seq=9, kind=ReportKind.PLAN, time="2026-01-01T00:00:00Z", estimate=est))
    wait_for("the trainer Job", lambda: workload_name("fits") in cluster.job_names(), timeout=20)
    status = wait_for("the estimate", lambda: (s := cluster.status("fits")).get("estimate") and s, timeout=20)
    assert Estimate.model_validate(status["estimate"]) == est
    assert {c["type"]: c["status"] for c in status["conditions"]}["Planned"] == "True"
    wait_for("the preflight Job deleted", lambda: preflight_name("fits") not in cluster.job_names(), timeout=20)
    assert ("Normal", "Planned") in cluster.events("fits")


def test_a_job_that_cannot_fit_fails_with_the_fix_and_never_gets_a_gpu_pod(
    operator: OperatorProcess, cluster: Cluster
) -> None:
    spec = copy.deepcopy(valid_spec(method={"type": "full"}, resources={"gpus": 1}))  # gpuType: the platform's
    cluster.create("too-big", spec)
    pod = cluster.preflight_pod("too-big")
    est = planned(spec, "a100-40gb")
    assert not est.fits and est.fixes
    cluster.finish(pod, 0, Report(seq=9, kind=ReportKind.PLAN, time="2026-01-01T00:00:00Z", estimate=est))
    status = wait_for("Failed", lambda: (s := cluster.status("too-big")).get("phase") == "Failed" and s, timeout=20)
    assert status["reason"] == "InsufficientGpuMemory" and est.fixes[0] in status["message"]
    config = cluster.core.read_namespaced_config_map(config_name("too-big"), cluster.ns).data["job.yaml"]
    assert "gpuType: a100-40gb" in config  # the preflight sizes the job for the platform's GPU model
    assert ("Warning", "InsufficientGpuMemory") in cluster.events("too-big")
    wait_for("the preflight Job deleted", lambda: preflight_name("too-big") not in cluster.job_names(), timeout=20)
    assert workload_name("too-big") not in cluster.job_names()


def test_a_data_error_found_by_the_preflight_fails_the_job(operator: OperatorProcess, cluster: Cluster) -> None:
    cluster.create("bad-data", valid_spec())
    pod = cluster.preflight_pod("bad-data")
    error = Report(
        seq=4,
        kind=ReportKind.ERROR,
        time="2026-01-01T00:00:00Z",
        reason="TemplateFieldMissing",
        message="line 3 has no field 'question'",
        final=True,
    )
    cluster.finish(pod, 2, error)
    status = wait_for("Failed", lambda: (s := cluster.status("bad-data")).get("phase") == "Failed" and s, timeout=20)
    assert status["reason"] == "TemplateFieldMissing" and "no field 'question'" in status["message"]
    assert workload_name("bad-data") not in cluster.job_names()
