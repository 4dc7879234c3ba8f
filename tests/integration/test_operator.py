"""The real operator against a real kube-apiserver + etcd + kube-controller-manager (Job controller, GC).

Each test names one behaviour from the operator's contract and fails when it breaks.
"""

from __future__ import annotations

import copy
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from finetune_api.reports import Report, ReportKind, format_report
from tests.integration.operator_harness import (
    NO_PREFLIGHT,
    TEST_PLATFORM_DEFAULTS,
    FakeKubeletLogs,
    OperatorProcess,
    install_crd,
    register_fake_node,
    valid_spec,
    wait_for,
)

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
NODE = "fake-kubelet"
OPERATOR_CONFIG = {"defaults": TEST_PLATFORM_DEFAULTS, "preflight": NO_PREFLIGHT, "pollSeconds": 1.0}
VALID_SPEC: dict[str, Any] = valid_spec(runPolicy={"backoffLimit": 2})


def kubectl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", *args], capture_output=True, text=True, check=check, timeout=60)


@pytest.fixture(scope="module")
def crd(control_plane: Any, kube_api: Any) -> None:
    install_crd(kube_api)


@pytest.fixture(scope="module")
def kubelet_logs(kube_api: Any) -> Iterator[FakeKubeletLogs]:
    fake = FakeKubeletLogs()
    register_fake_node(kube_api, NODE, fake)
    yield fake
    fake.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


METRICS_PORT = _free_port()


@pytest.fixture(scope="module")
def operator(control_plane: Any, crd: None) -> Iterator[OperatorProcess]:
    op = OperatorProcess(control_plane.kubeconfig, OPERATOR_CONFIG, env={"FINETUNE_METRICS_PORT": str(METRICS_PORT)})
    op.start()
    yield op
    op.stop()


@pytest.fixture(autouse=True)
def _operator_log_in_report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "operator" in request.fixturenames:  # pytest shows this only for failing tests
        print(request.getfixturevalue("operator").log_tail())


class Jobs:
    def __init__(self, api: Any, ns: str) -> None:
        self.ns = ns
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)

    def create(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}
        result: dict[str, Any] = self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)
        return result

    def get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)
        return result

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec})

    def wait_phase(self, name: str, phase: str, timeout: float = 20.0) -> dict[str, Any]:
        return wait_for(  # type: ignore[no-any-return]
            f"{name} phase {phase}", lambda: (s := self.status(name)).get("phase") == phase and s, timeout
        )

    def k8s_jobs(self) -> list[Any]:
        return self.batch.list_namespaced_job(self.ns).items

    def pods(self) -> list[Any]:
        return sorted(self.core.list_namespaced_pod(self.ns).items, key=lambda p: p.metadata.creation_timestamp)

    def events(self, name: str) -> list[Any]:
        return [
            e
            for e in self.core.list_namespaced_event(self.ns).items
            if e.involved_object.name == name and e.involved_object.kind == "FineTuneJob"
        ]

    def new_pod(self, known: int = 0) -> Any:
        """Wait for the Job controller's next pod (one not yet bound to the node) and bind it."""
        unbound = wait_for(
            f"trainer pod #{known + 1}",
            lambda: len(p := self.pods()) > known and [x for x in p if not x.spec.node_name],
            timeout=40,
        )
        return self.bind(unbound[0])

    def bind(self, pod: Any) -> Any:
        """Play the scheduler: bind the pod to the fake node (whose log endpoint the test controls)."""
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": pod.metadata.name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": NODE},
        }
        self.core.create_namespaced_pod_binding(pod.metadata.name, self.ns, binding, _preload_content=False)
        return pod

    def set_pod(self, pod: Any, phase: str, pod_ip: str | None = None, **state: Any) -> None:
        status: dict[str, Any] = {
            "phase": phase,
            "containerStatuses": [
                {"name": "trainer", "image": "finetune-trainer:test", "imageID": "", "ready": phase == "Running",
                 "restartCount": 0, "state": state},
            ],
        }  # fmt: skip
        if phase == "Running":
            status["startTime"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if pod_ip:
            status["podIP"] = pod_ip
        self.core.patch_namespaced_pod_status(pod.metadata.name, self.ns, {"status": status})

    def pod_of(self, job: str) -> Any:
        """The pod of Job `job` (bound to the fake node)."""
        pods = wait_for(
            f"the pod of {job}",
            lambda: self.core.list_namespaced_pod(self.ns, label_selector=f"job-name={job}").items,
            timeout=40,
        )
        return self.bind(pods[0]) if not pods[0].spec.node_name else pods[0]

    def force_delete_pods(self) -> None:
        """Play the kubelet confirming that stopped pods are gone."""
        for pod in self.pods():
            if pod.metadata.deletion_timestamp:
                self.core.delete_namespaced_pod(pod.metadata.name, self.ns, grace_period_seconds=0)


@pytest.fixture
def jobs(kube_api: Any, namespace: str) -> Jobs:
    return Jobs(kube_api, namespace)


def report(seq: int, kind: ReportKind, **kw: Any) -> str:
    return format_report(Report(seq=seq, kind=kind, time="2026-01-01T00:00:00Z", **kw))


# --- the API itself ---------------------------------------------------------------------------------------------


def test_crd_installs_and_kubectl_explain_documents_fields(crd: None) -> None:
    out = kubectl("explain", "ftj.spec.dataset").stdout
    assert "Training and validation data" in out
    assert "validation" in out and "template" in out
    out = kubectl("explain", "finetunejobs.spec.hyperparameters.learningRate").stdout
    assert "2e-4" in out
    names = kubectl("api-resources", "--api-group", GROUP, "-o", "name").stdout
    assert "finetunejobs.finetune.dev" in names


def test_schema_rejects_wrong_types_with_422(crd: None, jobs: Jobs) -> None:
    spec = copy.deepcopy(VALID_SPEC)
    spec["hyperparameters"] = {"batchSize": "eight"}
    with pytest.raises(ApiException) as err:
        jobs.create("wrong-type", spec)
    assert err.value.status == 422
    assert "batchSize" in err.value.body
    spec = copy.deepcopy(VALID_SPEC)
    spec["task"] = "translation"
    with pytest.raises(ApiException) as err:
        jobs.create("wrong-enum", spec)
    assert err.value.status == 422 and "task" in err.value.body


# --- validation -------------------------------------------------------------------------------------------------

INVALID = {
    "chat-template": ({"task": "chat"}, "UnsupportedCombination", "spec.dataset.template"),
    "qlora-no-gpu": ({"method": {"type": "qlora"}, "resources": {"gpus": 0}}, "GPURequired", "resources.gpus"),
    "bad-uri": ({"output": {"uri": "gs://bucket/x"}}, "InvalidURI", "spec.output.uri"),
    "template-field": ({"dataset": {**VALID_SPEC["dataset"], "dropColumns": ["answer"]}}, "TemplateError", "answer"),
    "bad-memory": ({"resources": {"memory": "64"}}, "InvalidResources", "512Mi"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_job_fails_with_reason_event_and_no_pod(operator: OperatorProcess, jobs: Jobs, case: str) -> None:
    change, reason, words = INVALID[case]
    jobs.create(case, {**copy.deepcopy(VALID_SPEC), **change})
    status = jobs.wait_phase(case, "Failed")
    assert status["reason"] == reason and words in status["message"]
    validated = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert (validated["status"], validated["reason"]) == ("False", reason)
    assert validated["observedGeneration"] == 1
    events = wait_for("warning event", lambda: jobs.events(case))
    assert any(e.reason == reason and words in e.message and e.type == "Warning" for e in events)
    time.sleep(1.5)  # give a wrongly created workload the time to show up
    assert jobs.k8s_jobs() == [] and jobs.pods() == []


def test_fixing_an_invalid_job_starts_it(operator: OperatorProcess, jobs: Jobs) -> None:
    jobs.create("fixme", {**copy.deepcopy(VALID_SPEC), "resources": {"memory": "64"}})
    jobs.wait_phase("fixme", "Failed")
    jobs.patch_spec("fixme", {"resources": {"memory": "2Gi"}})
    status = jobs.wait_phase("fixme", "Pending")
    assert status["observedGeneration"] == 2
    assert [j.metadata.name for j in jobs.k8s_jobs()] == ["fixme-trainer"]


# --- workload ---------------------------------------------------------------------------------------------------


def test_valid_job_gets_its_workload_within_two_seconds(operator: OperatorProcess, jobs: Jobs) -> None:
    wait_for("operator ready", lambda: "Watching" in operator.log_tail(400) or "Starting" in operator.log_tail(400))
    start = time.monotonic()
    ftj = jobs.create("fast", copy.deepcopy(VALID_SPEC))
    wait_for("Job", lambda: jobs.k8s_jobs(), timeout=10, interval=0.05)
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, f"workload took {elapsed:.2f}s"
    job = jobs.k8s_jobs()[0]
    assert job.metadata.name == "fast-trainer"
    owner = job.metadata.owner_references[0]
    assert (owner.kind, owner.uid, owner.controller) == ("FineTuneJob", ftj["metadata"]["uid"], True)
    pod = job.spec.template.spec
    assert pod.automount_service_account_token is False
    assert pod.security_context.run_as_non_root is True
    container = pod.containers[0]
    assert container.security_context.capabilities.drop == ["ALL"]
    env = {e.name: e for e in container.env}
    assert env["AWS_SECRET_ACCESS_KEY"].value is None
    assert env["AWS_SECRET_ACCESS_KEY"].value_from.secret_key_ref.name == "s3-credentials"
    cm = jobs.core.read_namespaced_config_map("fast-config", jobs.ns)
    assert "tiny-gpt2" in cm.data["job.yaml"] and cm.metadata.owner_references[0].uid == ftj["metadata"]["uid"]
    status = jobs.wait_phase("fast", "Pending")
    assert status["workload"] == "fast-trainer"


def test_lifecycle_progress_and_verdict(operator: OperatorProcess, kubelet_logs: FakeKubeletLogs, jobs: Jobs) -> None:
    jobs.create("life", copy.deepcopy(VALID_SPEC))
    pod = jobs.new_pod()
    key = (jobs.ns, pod.metadata.name)
    kubelet_logs.logs[key] = "starting\n" + report(1, ReportKind.STAGE, stage="downloading") + "\n"
    jobs.set_pod(pod, "Running", running={"startedAt": "2026-01-01T00:00:00Z"})
    status = jobs.wait_phase("life", "Running", timeout=15)
    assert status["startTime"] == "2026-01-01T00:00:00Z"
    wait_for("TrainerStarted event", lambda: any(e.reason == "TrainerStarted" for e in jobs.events("life")))

    kubelet_logs.logs[key] += "\n".join(
        [
            report(
                2, ReportKind.PROGRESS, step=40, total_steps=160, loss=2.25, tokens_per_second=1234.5, eta_seconds=90
            ),
            report(3, ReportKind.CHECKPOINT, step=40, uri="s3://out/job/checkpoints/checkpoint-40/"),
            report(4, ReportKind.EVAL, step=40, metrics={"eval_loss": 2.5}),
        ]
    )
    t0 = time.monotonic()
    status = wait_for("progress", lambda: (s := jobs.status("life")).get("progress", {}).get("step") == 40 and s)
    assert time.monotonic() - t0 < 15
    assert status["progress"]["summary"] == "25% (40/160)" and status["loss"] == 2.25
    assert status["progress"]["tokensPerSecond"] == 1234.5 and status["metrics"]["eval_loss"] == 2.5
    assert status["checkpoints"] == [{"step": 40, "uri": "s3://out/job/checkpoints/checkpoint-40/", "metrics": {}}]
    printed = kubectl("get", "ftj", "life", "-n", jobs.ns).stdout
    assert "Running" in printed and "25% (40/160)" in printed and "2.25" in printed

    final = report(9, ReportKind.OUTPUT, uri="s3://out/job/model/", manifest="s3://out/job/manifest.json")
    jobs.set_pod(pod, "Succeeded", terminated={"exitCode": 0, "reason": "Completed", "message": final})
    status = jobs.wait_phase("life", "Succeeded", timeout=20)
    assert status["output"] == {"uri": "s3://out/job/model/", "manifest": "s3://out/job/manifest.json"}
    assert status["completionTime"] and status["attempts"] == 1
    assert {c["type"]: c["status"] for c in status["conditions"]}["Succeeded"] == "True"


def test_retry_then_user_error_is_final(operator: OperatorProcess, kubelet_logs: FakeKubeletLogs, jobs: Jobs) -> None:
    jobs.create("retry", copy.deepcopy(VALID_SPEC))
    first = jobs.new_pod()
    kubelet_logs.logs[(jobs.ns, first.metadata.name)] = ""
    jobs.set_pod(first, "Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})
    second = jobs.new_pod(known=1)  # the Job controller retries (after its backoff)
    status = wait_for("attempt 2", lambda: (s := jobs.status("retry")).get("attempts") == 2 and s)
    assert status["phase"] == "Pending"
    error = report(5, ReportKind.ERROR, reason="DataError", message="qa.jsonl line 7: Expecting value")
    kubelet_logs.logs[(jobs.ns, second.metadata.name)] = error
    jobs.set_pod(second, "Failed", terminated={"exitCode": 2, "reason": "Error", "message": error})
    status = jobs.wait_phase("retry", "Failed")
    assert status["reason"] == "DataError" and "line 7" in status["message"]
    job = jobs.batch.read_namespaced_job("retry-trainer", jobs.ns)
    assert job.spec.parallelism == 0  # no third attempt for an error that retrying cannot fix
    assert any(e.reason == "DataError" for e in jobs.events("retry"))


def test_delete_removes_everything_it_created(operator: OperatorProcess, jobs: Jobs) -> None:
    jobs.create("gone", copy.deepcopy(VALID_SPEC))
    wait_for("pod", lambda: jobs.pods())
    jobs.custom.delete_namespaced_custom_object(GROUP, VERSION, jobs.ns, PLURAL, "gone")
    wait_for("children gone", lambda: not jobs.k8s_jobs() and not jobs.pods(), timeout=40)
    assert jobs.core.list_namespaced_config_map(jobs.ns, label_selector="finetune.dev/job-name=gone").items == []


def test_suspend_and_resume(operator: OperatorProcess, jobs: Jobs) -> None:
    jobs.create("pause", copy.deepcopy(VALID_SPEC))
    wait_for("Job", lambda: jobs.k8s_jobs())
    jobs.patch_spec("pause", {"runPolicy": {"suspend": True}})
    jobs.wait_phase("pause", "Suspended")
    wait_for("Job deleted", lambda: not jobs.k8s_jobs(), timeout=20)
    jobs.patch_spec("pause", {"runPolicy": {"suspend": False}})
    jobs.wait_phase("pause", "Pending")
    assert [j.metadata.name for j in wait_for("Job again", lambda: jobs.k8s_jobs())] == ["pause-trainer"]


def test_operator_killed_mid_flight_makes_no_duplicate_and_loses_nothing(
    control_plane: Any, crd: None, kubelet_logs: FakeKubeletLogs, jobs: Jobs, operator: OperatorProcess
) -> None:
    operator.kill()
    try:
        for i in range(3):
            jobs.create(f"crash-{i}", copy.deepcopy(VALID_SPEC))
        operator.start()
        time.sleep(0.3)  # kill it again while it is handling the creations
        operator.kill()
        operator.start()
        for i in range(3):
            jobs.wait_phase(f"crash-{i}", "Pending", timeout=30)
        operator.kill()
        # A transition while no operator runs: the pod starts, then succeeds.
        of_crash0 = [p for p in jobs.pods() if p.metadata.labels["finetune.dev/job-name"] == "crash-0"]
        pod = jobs.bind(of_crash0[0])
        kubelet_logs.logs[(jobs.ns, pod.metadata.name)] = report(1, ReportKind.PROGRESS, step=5, total_steps=5)
        jobs.set_pod(pod, "Succeeded", terminated={"exitCode": 0, "reason": "Completed"})
        operator.start()
        status = jobs.wait_phase("crash-0", "Succeeded", timeout=30)
        assert status["progress"]["step"] == 5
        time.sleep(2)
        names = sorted(j.metadata.name for j in jobs.k8s_jobs())
        assert names == ["crash-0-trainer", "crash-1-trainer", "crash-2-trainer"]
        assert len([p for p in jobs.pods() if p.metadata.labels["finetune.dev/job-name"] == "crash-1"]) == 1
    finally:
        if operator.proc is None or operator.proc.poll() is not None:
            operator.start()


# --- every job gets a verdict; nothing stored on the object; nothing stranded ----------------------------------


def test_long_name_gets_a_workload_with_valid_labels(operator: OperatorProcess, jobs: Jobs) -> None:
    name = "medical-question-answering-with-a-very-long-descriptive-name-" + "x" * 40
    ftj = jobs.create(name, copy.deepcopy(VALID_SPEC))
    status = jobs.wait_phase(name, "Pending")
    job = jobs.batch.read_namespaced_job(status["workload"], jobs.ns)
    assert job.metadata.labels["finetune.dev/job-uid"] == ftj["metadata"]["uid"]
    assert all(len(v) <= 63 for v in job.metadata.labels.values())
    assert len(wait_for("pod", lambda: jobs.pods())) == 1


def test_large_spec_runs_and_leaves_no_bookkeeping_on_the_object(
    operator: OperatorProcess, kubelet_logs: FakeKubeletLogs, jobs: Jobs
) -> None:
    """~200 KB of samplePrompts: over kopf's 256 KiB annotation budget when copied into an annotation."""
    spec = copy.deepcopy(VALID_SPEC)
    spec["evaluation"] = {"samplePrompts": [f"prompt {i}: " + "y" * 2000 for i in range(100)]}
    jobs.create("big", spec)
    pod = jobs.new_pod()
    kubelet_logs.logs[(jobs.ns, pod.metadata.name)] = report(1, ReportKind.STAGE, stage="training")
    jobs.set_pod(pod, "Running", running={"startedAt": "2026-01-01T00:00:00Z"})
    jobs.wait_phase("big", "Running", timeout=15)
    meta = jobs.get("big")["metadata"]
    assert not meta.get("finalizers")
    assert not [k for k in meta.get("annotations") or {} if "finetune.dev" in k or "kopf" in k]


def test_spec_over_the_size_limit_fails_validation(operator: OperatorProcess, jobs: Jobs) -> None:
    spec = copy.deepcopy(VALID_SPEC)
    spec["evaluation"] = {"samplePrompts": ["z" * 4000] * 80}
    jobs.create("huge", spec)
    status = jobs.wait_phase("huge", "Failed")
    assert status["reason"] == "SpecTooLarge" and "KiB" in status["message"]
    assert jobs.k8s_jobs() == []


def test_a_child_the_api_server_refuses_ends_as_failed_with_its_reason(operator: OperatorProcess, jobs: Jobs) -> None:
    spec = copy.deepcopy(VALID_SPEC)
    spec["storage"]["secretRef"] = {"name": "s3-credentials", "accessKeyIdKey": "not a valid key!"}
    jobs.create("refused", spec)
    status = jobs.wait_phase("refused", "Failed")
    assert status["reason"] in ("WorkloadRejected", "InvalidField"), status
    if status["reason"] == "WorkloadRejected":  # validation may catch it first; either way a verdict, not silence
        assert "refused" in status["message"] and "key" in status["message"].lower()
    assert any(
        e.type == "Warning" and e.reason == status["reason"] for e in wait_for("event", lambda: jobs.events("refused"))
    )
    assert jobs.k8s_jobs() == []


def test_deleting_a_namespace_does_not_wait_for_the_operator(
    kube_api: Any, crd: None, operator: OperatorProcess
) -> None:
    core = client.CoreV1Api(kube_api)
    ns = f"it-ns-delete-{int(time.time() * 1000) % 100000}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    jobs = Jobs(kube_api, ns)
    for i in range(5):
        jobs.create(f"j{i}", copy.deepcopy(VALID_SPEC))
    for i in range(5):
        jobs.wait_phase(f"j{i}", "Pending")
    operator.stop()  # not even a running operator is needed to delete them
    try:
        start = time.monotonic()
        core.delete_namespace(ns)

        def gone() -> bool:
            try:
                core.read_namespace(ns)
                return False
            except ApiException as exc:
                return exc.status == 404

        wait_for("namespace deleted", gone, timeout=60)
        assert time.monotonic() - start < 60
    finally:
        operator.start()


# --- quota: Kubernetes' own ResourceQuota, reported as Queued ----------------------------------------------------


def _quota(jobs: Jobs, hard: dict[str, str]) -> None:
    body = {"metadata": {"name": "tenant-quota"}, "spec": {"hard": hard}}
    try:
        jobs.core.replace_namespaced_resource_quota("tenant-quota", jobs.ns, body)
    except ApiException as exc:
        if exc.status != 404:
            raise
        jobs.core.create_namespaced_resource_quota(jobs.ns, body)
    # Quota admission enforces only what the quota controller has published in status.hard.
    wait_for(
        "quota status",
        lambda: (jobs.core.read_namespaced_resource_quota("tenant-quota", jobs.ns).status.hard or {}) == hard,
    )


def test_a_job_over_the_pod_quota_is_queued_with_the_reason_then_starts(operator: OperatorProcess, jobs: Jobs) -> None:
    _quota(jobs, {"pods": "0"})
    jobs.create("q-pods", copy.deepcopy(VALID_SPEC))
    status = jobs.wait_phase("q-pods", "Queued", timeout=30)
    assert status["reason"] == "ExceededQuota" and "exceeded quota" in status["message"] and status["queuedSince"]
    assert jobs.pods() == []
    _quota(jobs, {"pods": "1"})
    wait_for("pod after quota grew", lambda: jobs.pods(), timeout=60)
    status = jobs.wait_phase("q-pods", "Pending", timeout=30)
    assert "queuedSince" not in status


def test_a_job_over_the_job_count_quota_is_queued_until_the_quota_changes(
    operator: OperatorProcess, jobs: Jobs
) -> None:
    _quota(jobs, {"count/jobs.batch": "0"})
    jobs.create("q-jobs", copy.deepcopy(VALID_SPEC))
    status = jobs.wait_phase("q-jobs", "Queued", timeout=30)
    assert status["reason"] == "ExceededQuota" and "count/jobs.batch" in status["message"]
    assert jobs.k8s_jobs() == []
    assert any(e.reason == "Queued" for e in wait_for("Queued event", lambda: jobs.events("q-jobs")))
    _quota(jobs, {"count/jobs.batch": "1"})
    jobs.wait_phase("q-jobs", "Pending", timeout=30)
    assert [j.metadata.name for j in jobs.k8s_jobs()] == ["q-jobs-trainer"]


# --- observability ------------------------------------------------------------------------------------------


def scrape() -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_metrics_count_jobs_by_phase_and_retries_by_cause(
    operator: OperatorProcess, kubelet_logs: FakeKubeletLogs, jobs: Jobs
) -> None:
    jobs.create("m-bad", {**copy.deepcopy(VALID_SPEC), "output": {"uri": "gs://x/y"}})
    jobs.create("m-retry", copy.deepcopy(VALID_SPEC))
    jobs.wait_phase("m-bad", "Failed")
    first = jobs.new_pod()
    kubelet_logs.logs[(jobs.ns, first.metadata.name)] = ""
    jobs.set_pod(first, "Failed", terminated={"exitCode": 143, "reason": "Error"})  # SIGTERM: an interruption
    status = wait_for("interruption counted", lambda: (s := jobs.status("m-retry")).get("interruptions") == 1 and s)
    assert status["failures"] == 0
    ns = jobs.ns
    got = wait_for(
        "metrics",
        lambda: (m := scrape()).get(f'finetune_retries_total{{cause="interruption",namespace="{ns}"}}') == 1.0 and m,
    )
    assert got[f'finetune_jobs{{namespace="{ns}",phase="Failed"}}'] == 1.0
    assert got[f'finetune_transitions_total{{namespace="{ns}",phase="Failed"}}'] == 1.0
    assert f'finetune_retries_total{{cause="failure",namespace="{ns}"}}' not in got
    assert got["finetune_reconcile_duration_seconds_count"] >= 3


def test_a_finished_job_starts_one_notification_pod(
    operator: OperatorProcess, kubelet_logs: FakeKubeletLogs, jobs: Jobs
) -> None:
    spec = {**copy.deepcopy(VALID_SPEC), "notification": {"webhook": {"name": "hooks"}}}
    jobs.create("notified", spec)
    pod = jobs.new_pod()
    final = report(9, ReportKind.OUTPUT, uri="s3://out/job/model/", manifest="s3://out/job/manifest.json")
    kubelet_logs.logs[(jobs.ns, pod.metadata.name)] = final + "\n"
    jobs.set_pod(pod, "Succeeded", terminated={"exitCode": 0, "reason": "Completed", "message": final})
    status = jobs.wait_phase("notified", "Succeeded", timeout=20)
    notifier = wait_for("notify Job", lambda: [j for j in jobs.k8s_jobs() if j.metadata.name == "notified-notify"])
    container = notifier[0].spec.template.spec.containers[0]
    env = {e.name: e for e in container.env}
    assert env["NOTIFY_URL"].value is None and env["NOTIFY_URL"].value_from.secret_key_ref.name == "hooks"
    assert '"output": "s3://out/job/model/"' in env["NOTIFY_PAYLOAD"].value
    assert wait_for("notified", lambda: jobs.status("notified").get("notified")) == "Succeeded"
    time.sleep(1.5)
    assert len([j for j in jobs.k8s_jobs() if j.metadata.name.endswith("-notify")]) == 1
    assert status["phase"] == "Succeeded"


def test_a_reported_user_error_stops_the_job_before_the_pod_exits(
    operator: OperatorProcess, kubelet_logs: FakeKubeletLogs, jobs: Jobs
) -> None:
    """The trainer reports a final error and waits: the operator fails the job and sets parallelism 0 while the
    pod still runs, so the Job controller deletes it instead of starting a second attempt."""
    jobs.create("final", copy.deepcopy(VALID_SPEC))
    pod = jobs.new_pod()
    key = (jobs.ns, pod.metadata.name)
    kubelet_logs.logs[key] = report(1, ReportKind.STAGE, stage="preparing") + "\n"
    jobs.set_pod(pod, "Running", running={"startedAt": "2026-01-01T00:00:00Z"})
    jobs.wait_phase("final", "Running", timeout=15)
    error = Report(seq=2, kind=ReportKind.ERROR, time="t", reason="DataError", message="qa.jsonl line 3", final=True)
    kubelet_logs.append(jobs.ns, pod.metadata.name, format_report(error) + "\n")
    status = jobs.wait_phase("final", "Failed", timeout=15)
    assert status["reason"] == "DataError" and "line 3" in status["message"] and status["attempts"] == 1
    job = wait_for(
        "parallelism 0",
        lambda: (j := jobs.batch.read_namespaced_job("final-trainer", jobs.ns)).spec.parallelism == 0 and j,
    )
    assert job.spec.parallelism == 0
    time.sleep(2)
    assert len(jobs.pods()) == 1  # no second attempt


def test_a_gang_starts_worker_zero_first_restarts_as_one_and_succeeds(
    operator: OperatorProcess, kubelet_logs: FakeKubeletLogs, jobs: Jobs
) -> None:
    """resources.workers: 2 on the real control plane (the test plays the kubelet): worker 0's Job first; the
    other worker once worker 0's pod has an IP, which is its rendezvous address; a failed worker deletes the
    whole gang, which starts again (one more attempt, one failure) once its pods are gone."""
    jobs.create("gang", valid_spec(resources={"workers": 2}, runPolicy={"backoffLimit": 1}))
    wait_for("worker 0's Job", lambda: [j.metadata.name for j in jobs.k8s_jobs()] == ["gang-worker-0"])
    leader = jobs.pod_of("gang-worker-0")
    kubelet_logs.logs[(jobs.ns, leader.metadata.name)] = ""
    jobs.set_pod(leader, "Running", pod_ip="198.18.100.31", running={"startedAt": "2026-01-01T00:00:00Z"})
    wait_for("worker 1's Job", lambda: "gang-worker-1" in {j.metadata.name for j in jobs.k8s_jobs()})
    worker = jobs.batch.read_namespaced_job("gang-worker-1", jobs.ns)
    env = {e.name: e.value for e in worker.spec.template.spec.containers[0].env}
    assert (env["FINETUNE_RDZV_HOST"], env["FINETUNE_WORKER_RANK"], env["FINETUNE_WORKERS"]) == (
        "198.18.100.31",
        "1",
        "2",
    )
    assert worker.metadata.owner_references[0].kind == "FineTuneJob"
    assert jobs.status("gang")["workers"] == "1/2"
    follower = jobs.pod_of("gang-worker-1")
    jobs.set_pod(follower, "Running", pod_ip="198.18.100.32", running={"startedAt": "2026-01-01T00:00:01Z"})
    status = jobs.wait_phase("gang", "Running", timeout=15)
    assert status["workers"] == "2/2" and status["attempts"] == 1
    printed = kubectl("get", "ftj", "gang", "-n", jobs.ns, "-o", "wide").stdout
    assert "2/2" in printed

    jobs.set_pod(follower, "Failed", terminated={"exitCode": 1, "reason": "Error"})
    status = wait_for("restart", lambda: (s := jobs.status("gang")).get("reason") == "Restarting" and s, timeout=15)
    assert status["failures"] == 1 and "worker 1 failed" in status["message"]
    wait_for("every worker Job deleted", lambda: not jobs.k8s_jobs(), timeout=20)
    wait_for("pods stopping", lambda: all(p.metadata.deletion_timestamp for p in jobs.pods()), timeout=30)
    jobs.force_delete_pods()
    status = wait_for("attempt 2", lambda: (s := jobs.status("gang")).get("attempts") == 2 and s, timeout=30)
    assert status["failures"] == 1
    leader = jobs.pod_of("gang-worker-0")
    kubelet_logs.logs[(jobs.ns, leader.metadata.name)] = ""
    final = report(9, ReportKind.OUTPUT, uri="s3://out/job/model/", manifest="s3://out/job/manifest.json")
    jobs.set_pod(leader, "Succeeded", terminated={"exitCode": 0, "reason": "Completed", "message": final})
    status = jobs.wait_phase("gang", "Succeeded", timeout=30)
    assert status["output"]["uri"] == "s3://out/job/model/" and (status["attempts"], status["failures"]) == (2, 1)
