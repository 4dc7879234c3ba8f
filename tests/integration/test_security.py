"""Security checks on the real control plane: what a tenant can put into a trainer pod, what the operator's
ServiceAccount may do (the chart's own RBAC), and where a Secret's value can end up.

The operator runs here without the admission webhook (tests/integration/test_admission.py covers that), so
these checks hold for clusters without it too.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from finetune_operator.builders import workload_name
from tests.integration.operator_harness import (
    NO_PREFLIGHT,
    TEST_PLATFORM_DEFAULTS,
    FakeKubeletLogs,
    OperatorProcess,
    fake_node,
    running_operator,
    valid_spec,
    wait_for,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
NODE = "fake-kubelet-security"
OPERATOR_CONFIG = {"defaults": TEST_PLATFORM_DEFAULTS, "preflight": NO_PREFLIGHT, "pollSeconds": 1.0}
SPEC: dict[str, Any] = valid_spec(runPolicy={"backoffLimit": 1})
HOST_PATH_VOLUME = [{"name": "root", "hostPath": {"path": "/"}}]
ROOT_CONTEXT = {"privileged": True, "runAsUser": 0, "capabilities": {"add": ["SYS_ADMIN", "NET_ADMIN"]}}
POD_OVERRIDES = {
    "hostNetwork": True,
    "hostPID": True,
    "hostIPC": True,
    "serviceAccountName": "admin",
    "serviceAccount": "admin",
    "automountServiceAccountToken": True,
    "volumes": HOST_PATH_VOLUME,
    "securityContext": ROOT_CONTEXT,
    "initContainers": [{"name": "x", "image": "busybox", "securityContext": ROOT_CONTEXT}],
}
# Unknown fields a tenant might try, at the levels of the spec where a pod setting could plausibly be read.
HOSTILE: dict[str, dict[str, Any]] = {
    "top-level": POD_OVERRIDES,
    "pod-template": {"podTemplate": {"spec": POD_OVERRIDES}, "template": {"spec": POD_OVERRIDES}},
    "resources": {"resources": {"gpus": 0, **POD_OVERRIDES, "volumeMounts": [{"name": "root", "mountPath": "/h"}]}},
    "run-policy": {"runPolicy": {"backoffLimit": 1, **POD_OVERRIDES}},
    "storage": {
        "storage": {**SPEC["storage"], **POD_OVERRIDES, "secretRef": {"name": "s3-credentials", **POD_OVERRIDES}}
    },
    "model-and-output": {
        "model": {"uri": "s3://models/tiny-gpt2/", "hostPath": "/", **POD_OVERRIDES},
        "output": {"uri": "s3://out/job/", "volumes": HOST_PATH_VOLUME, "privileged": True},
        "dataset": {**SPEC["dataset"], "securityContext": ROOT_CONTEXT, "capabilities": {"add": ["ALL"]}},
    },
}


def kubectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True, check=False, timeout=60)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def body_of(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    meta = {"name": name, "namespace": namespace}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": meta, "spec": spec}


@pytest.fixture(scope="module")
def operator(control_plane: Any, kube_api: Any) -> Iterator[OperatorProcess]:
    with running_operator(control_plane, kube_api, OPERATOR_CONFIG) as op:
        yield op


@pytest.fixture(scope="module")
def kubelet_logs(kube_api: Any) -> Iterator[FakeKubeletLogs]:
    with fake_node(kube_api, NODE) as fake:
        yield fake


def trainer_job(kube_api: Any, namespace: str, name: str) -> Any:
    batch: Any = client.BatchV1Api(kube_api)

    def created() -> Any:
        jobs = [j for j in batch.list_namespaced_job(namespace).items if j.metadata.name == workload_name(name)]
        return jobs[0] if jobs else None

    return wait_for(f"the trainer Job of {name}", created, timeout=30)


def pod_of(kube_api: Any, namespace: str, job: Any) -> Any:
    core: Any = client.CoreV1Api(kube_api)
    selector = ",".join(f"{k}={v}" for k, v in job.spec.selector.match_labels.items())
    return wait_for("the trainer pod", lambda: core.list_namespaced_pod(namespace, label_selector=selector).items)[0]


def security_view(pod_spec: dict[str, Any]) -> dict[str, Any]:
    """Everything in a pod spec that decides what the pod can reach on its node and in the cluster."""
    containers = [
        {k: c.get(k) for k in ("securityContext", "volumeMounts", "ports")} for c in pod_spec.get("containers") or []
    ]
    volumes = [{k: v for k, v in vol.items() if k != "configMap"} for vol in pod_spec.get("volumes") or []]
    keys = ("hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace", "serviceAccountName", "serviceAccount",
            "automountServiceAccountToken", "securityContext", "initContainers", "ephemeralContainers", "hostAliases",
            "nodeName", "priorityClassName", "runtimeClassName")  # fmt: skip
    return {**{k: pod_spec.get(k) for k in keys}, "containers": containers, "volumes": volumes}


def assert_confined(pod_spec: dict[str, Any]) -> None:
    """The invariants, stated on their own (not only as 'same as a plain job')."""
    assert not pod_spec.get("hostNetwork") and not pod_spec.get("hostPID") and not pod_spec.get("hostIPC")
    assert pod_spec.get("serviceAccountName") in (None, "default")
    assert pod_spec.get("automountServiceAccountToken") is False
    assert not pod_spec.get("initContainers") and not pod_spec.get("ephemeralContainers")
    for volume in pod_spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        assert kinds <= {"configMap", "emptyDir"}, volume
    for container in pod_spec["containers"]:
        ctx = container["securityContext"]
        assert not ctx.get("privileged") and ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert ctx["runAsNonRoot"] is True and ctx.get("runAsUser") in (None, 1000)


def status_of(custom: Any, namespace: str, name: str) -> dict[str, Any]:
    return dict(custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status") or {})


def phase_of(custom: Any, namespace: str, name: str) -> str | None:
    return status_of(custom, namespace, name).get("phase")


def sanitized(api: Any, obj: Any) -> dict[str, Any]:
    result: dict[str, Any] = api.sanitize_for_serialization(obj)
    return result


# ---- (a) no field, known or unknown, widens a trainer pod ---------------------------------------------------------


def test_no_field_known_or_unknown_widens_the_trainer_pod(
    operator: OperatorProcess, kube_api: Any, namespace: str
) -> None:
    custom: Any = client.CustomObjectsApi(kube_api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body_of("plain", namespace, SPEC))
    baseline_job = trainer_job(kube_api, namespace, "plain")
    baseline = security_view(sanitized(kube_api, baseline_job.spec.template.spec))
    assert_confined(sanitized(kube_api, baseline_job.spec.template.spec))

    names = []
    for level, extra in HOSTILE.items():
        spec = deep_merge(SPEC, extra)
        # A raw API client ...
        raw = f"raw-{level}"
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body_of(raw, namespace, spec))
        # ... and kubectl with its client-side validation off (with it on, kubectl refuses unknown fields).
        applied = f"kubectl-{level}"
        proc = kubectl("apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump(body_of(applied, namespace, spec)))
        assert proc.returncode == 0, proc.stderr
        strict = kubectl("apply", "-f", "-", stdin=yaml.safe_dump(body_of(f"strict-{level}", namespace, spec)))
        assert strict.returncode != 0 and "unknown field" in strict.stderr, strict.stderr
        names += [raw, applied]

    core: Any = client.CoreV1Api(kube_api)
    for name in names:
        job = trainer_job(kube_api, namespace, name)
        template = sanitized(kube_api, job.spec.template.spec)
        assert_confined(template)
        assert security_view(template) == baseline, name
        # The pod the Job controller made from it (after the API server's own admission and defaulting).
        pod = sanitized(kube_api, pod_of(kube_api, namespace, job).spec)
        assert_confined(pod)
        assert pod["serviceAccountName"] == "default"
        stored = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)["spec"]
        assert "hostNetwork" not in json.dumps(stored) and "privileged" not in json.dumps(stored), stored
    assert core.read_namespace(namespace)  # the namespace (and the test) ran to here


def test_known_fields_cannot_widen_the_trainer_pod(operator: OperatorProcess, kube_api: Any, namespace: str) -> None:
    """Every example job (together they set every field a tenant has) gets a confined pod."""
    custom: Any = client.CustomObjectsApi(kube_api)
    names = []
    for path in sorted((REPO / "examples").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())["spec"]
        spec["resources"] = {**spec.get("resources", {}), "gpus": 0, "cpu": "1", "memory": "1Gi"}
        spec.get("storage", {}).pop("endpoint", None)
        spec["image"] = "finetune-trainer:test"
        name = path.stem.split("-", 1)[1][:40].strip("-")
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body_of(name, namespace, spec))
        names.append(name)
    started = 0
    for name in names:
        verdict: Any = wait_for(f"{name}'s verdict", functools.partial(phase_of, custom, namespace, name))
        if verdict == "Failed":
            continue  # refused by validation or policy on this CPU test platform: no pod at all
        template = sanitized(kube_api, trainer_job(kube_api, namespace, name).spec.template.spec)
        assert_confined(template)
        started += 1
    assert started >= len(names) // 2, f"only {started} of {len(names)} examples started"


# ---- (b) the chart's RBAC, asked of the API server ----------------------------------------------------------------

FORBIDDEN = [
    ("get", "secrets"), ("list", "secrets"), ("watch", "secrets"), ("create", "secrets"),
    ("create", "pods"), ("delete", "pods"), ("create", "pods/exec"), ("get", "pods/exec"),
    ("create", "pods/attach"), ("create", "pods/portforward"), ("create", "serviceaccounts/token"),
    ("create", "roles.rbac.authorization.k8s.io"), ("update", "roles.rbac.authorization.k8s.io"),
    ("create", "rolebindings.rbac.authorization.k8s.io"), ("patch", "rolebindings.rbac.authorization.k8s.io"),
    ("create", "clusterroles.rbac.authorization.k8s.io"), ("delete", "clusterroles.rbac.authorization.k8s.io"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"), ("bind", "clusterroles.rbac.authorization.k8s.io"),
    ("escalate", "roles.rbac.authorization.k8s.io"), ("impersonate", "serviceaccounts"), ("impersonate", "users"),
    ("create", "validatingwebhookconfigurations.admissionregistration.k8s.io"),
    ("patch", "validatingwebhookconfigurations.admissionregistration.k8s.io"),
    ("create", "mutatingwebhookconfigurations.admissionregistration.k8s.io"),
    ("patch", "customresourcedefinitions.apiextensions.k8s.io"),
]  # fmt: skip
ALLOWED = [
    ("create", "jobs.batch"),
    ("watch", "finetunejobs.finetune.dev"),
    ("patch", "finetunejobs.finetune.dev/status"),
]


def helm_template(release: str, namespace: str, *flags: str) -> str:
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "helm.sh"), "template", release, str(REPO / "charts" / "finetune-operator"),
         "--namespace", namespace, "--show-only", "templates/serviceaccount.yaml", "--show-only",
         "templates/rbac.yaml", *flags],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def can_i(verb: str, resource: str, sa: str, *where: str) -> bool:
    proc = kubectl("auth", "can-i", verb, resource, f"--as={sa}", *where)
    assert proc.stdout.strip() in ("yes", "no"), proc.stdout + proc.stderr
    return proc.stdout.strip() == "yes"


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_operator_service_account_cannot_read_secrets_exec_or_touch_rbac(
    control_plane: Any, namespace: str, mode: str
) -> None:
    release = f"sec{uuid.uuid4().hex[:6]}"
    flags = ["--set", f"watchNamespaces={{{namespace}}}"] if mode == "namespaced" else []
    rendered = helm_template(release, namespace, *flags)
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    (sa,) = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    assert {d["kind"] for d in docs} >= {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    applied = kubectl("apply", "-f", "-", stdin=rendered)
    assert applied.returncode == 0, applied.stderr
    try:
        user = f"system:serviceaccount:{namespace}:{sa}"
        # The grants are in force (so every "no" below is the RBAC's answer, not a missing binding).
        wait_for("the operator's RBAC", lambda: can_i("create", "jobs.batch", user, "-n", namespace), timeout=30)
        for verb, resource in ALLOWED:
            assert can_i(verb, resource, user, "-n", namespace), (verb, resource)
        for verb, resource in FORBIDDEN:
            assert not can_i(verb, resource, user, "-n", namespace), (verb, resource, "in", namespace)
            assert not can_i(verb, resource, user, "--all-namespaces"), (verb, resource, "cluster-wide")
        assert not can_i("get", "secrets", user, "-n", "kube-system")
        if mode == "namespaced":
            assert not can_i("create", "jobs.batch", user, "-n", "default")
    finally:
        kubectl("delete", "--ignore-not-found", "-f", "-", stdin=rendered)


# ---- (c) a Secret's value never leaves the Secret -----------------------------------------------------------------


def test_a_secret_value_appears_nowhere_after_runs(
    operator: OperatorProcess, kubelet_logs: FakeKubeletLogs, kube_api: Any, namespace: str
) -> None:
    sentinel = f"SENTINEL{uuid.uuid4().hex}"
    key_id = f"AKIA{uuid.uuid4().hex[:16].upper()}"
    core: Any = client.CoreV1Api(kube_api)
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3-credentials"},
            "stringData": {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": sentinel},
        },
    )
    custom: Any = client.CustomObjectsApi(kube_api)
    # One job that runs to a verdict (its pod played through the API, as a kubelet would), one refused by
    # validation, one whose secretRef names a key that does not exist.
    runs = deep_merge(SPEC, {"storage": {"secretRef": {"name": "s3-credentials"}}})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body_of("runs", namespace, runs))
    bad = deep_merge(SPEC, {"output": {"uri": "ftp://x/y/"}})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body_of("refused", namespace, bad))
    odd = deep_merge(SPEC, {"storage": {"secretRef": {"accessKeyIdKey": "nope"}}})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body_of("odd-key", namespace, odd))

    job = trainer_job(kube_api, namespace, "runs")
    pod = pod_of(kube_api, namespace, job)
    binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod.metadata.name},
               "target": {"apiVersion": "v1", "kind": "Node", "name": NODE}}  # fmt: skip
    core.create_namespaced_pod_binding(pod.metadata.name, namespace, binding, _preload_content=False)
    kubelet_logs.logs[(namespace, pod.metadata.name)] = "starting\n"
    state = {"terminated": {"exitCode": 1, "reason": "Error", "message": "boom"}}
    status = {"phase": "Failed", "containerStatuses": [{"name": "trainer", "image": "finetune-trainer:test",
              "imageID": "", "ready": False, "restartCount": 0, "state": state}]}  # fmt: skip
    core.patch_namespaced_pod_status(pod.metadata.name, namespace, {"status": status})

    wait_for("the refused job's verdict", lambda: status_of(custom, namespace, "refused").get("phase") == "Failed")
    wait_for("the pod failure to be counted", lambda: status_of(custom, namespace, "runs").get("failures"), timeout=30)
    time.sleep(2)  # let the operator write whatever it would write about these

    # The trainer pod gets the value from the kubelet (secretKeyRef); nothing the operator wrote holds it.
    env = {e.name: e for e in pod.spec.containers[0].env}
    assert env["AWS_SECRET_ACCESS_KEY"].value_from.secret_key_ref.name == "s3-credentials"
    forms = [sentinel, base64.b64encode(sentinel.encode()).decode(), key_id]
    places = {
        "FineTuneJobs and their status": kubectl("get", "finetunejobs", "-n", namespace, "-o", "yaml").stdout,
        "Events": kubectl("get", "events", "-n", namespace, "-o", "yaml").stdout,
        "ConfigMaps": kubectl("get", "configmaps", "-n", namespace, "-o", "yaml").stdout,
        "trainer Jobs": kubectl("get", "jobs", "-n", namespace, "-o", "yaml").stdout,
        "trainer pods": kubectl("get", "pods", "-n", namespace, "-o", "yaml").stdout,
        "describe": kubectl("describe", "finetunejobs", "-n", namespace).stdout,
        "the operator's log": operator.log_path.read_text(errors="replace"),
    }
    assert "runs" in places["FineTuneJobs and their status"] and "s3-credentials" in places["trainer Jobs"]
    for where, text in places.items():
        for form in forms:
            assert form not in text, f"a Secret value leaked into {where}"
    # The control: the value is really there to be found, in the Secret.
    assert base64.b64encode(sentinel.encode()).decode() in kubectl("get", "secret", "s3-credentials", "-n",
                                                                   namespace, "-o", "yaml").stdout  # fmt: skip
