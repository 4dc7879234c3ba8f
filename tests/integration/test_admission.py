"""The admission webhook on a real kube-apiserver: the operator serves it over HTTPS on loopback, and a
ValidatingWebhookConfiguration (created here with this test's own CA, `clientConfig.url`) makes the API server
call it on every CREATE and UPDATE of a FineTuneJob in the test namespaces (selected by a label, so no other
test is affected; the configurations are deleted afterwards).
"""

from __future__ import annotations

import base64
import copy
import os
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from finetune_operator.admission import WEBHOOK_PATH
from tests.integration.operator_harness import (
    NO_PREFLIGHT,
    TEST_PLATFORM_DEFAULTS,
    OperatorProcess,
    install_crd,
    valid_spec,
    wait_for,
)

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
SELECTOR_LABEL = "finetune.test/admission"
OPERATOR_CONFIG = {
    "defaults": TEST_PLATFORM_DEFAULTS,
    "limits": {"maxGpusPerJob": 2},
    "preflight": NO_PREFLIGHT,
    "pollSeconds": 1.0,
}
SPEC: dict[str, Any] = valid_spec()


def kubectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True, check=False, timeout=60)


def manifest(name: str, namespace: str, spec: dict[str, Any]) -> str:
    meta = {"name": name, "namespace": namespace}
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": meta, "spec": spec}
    return yaml.safe_dump(body)


def edited(path: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    node = spec
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return spec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_certs(directory: Path) -> None:
    """A CA and a serving certificate for 127.0.0.1, with openssl as scripts/control-plane.sh makes its own."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "1", "-subj", "/CN=admission-ca",
            "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-sha256", "-subj", "/CN=127.0.0.1",
            "-keyout", "tls.key", "-out", "tls.csr")  # fmt: skip
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-sha256", "-days", "1", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-extfile", "san.cnf", "-out", "tls.crt")  # fmt: skip


class Webhooks:
    """ValidatingWebhookConfigurations made by this module: every one is deleted at the end."""

    def __init__(self, kube_api: Any, ca: bytes) -> None:
        self.api: Any = client.AdmissionregistrationV1Api(kube_api)
        self.ca = base64.b64encode(ca).decode()
        self.names: list[str] = []

    def create(self, url: str, selector: str, failure_policy: str = "Fail") -> str:
        name = f"finetune-admission-test-{uuid.uuid4().hex[:8]}"
        body = {
            "metadata": {"name": name, "labels": {"finetune.test/integration": "true"}},
            "webhooks": [
                {
                    "name": "validate.finetunejobs.finetune.dev",
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "failurePolicy": failure_policy,
                    "timeoutSeconds": 5,
                    "namespaceSelector": {"matchLabels": {SELECTOR_LABEL: selector}},
                    "rules": [
                        {
                            "apiGroups": [GROUP],
                            "apiVersions": ["*"],
                            "resources": [PLURAL],
                            "operations": ["CREATE", "UPDATE"],
                        }
                    ],
                    "clientConfig": {"url": url, "caBundle": self.ca},
                }
            ],
        }
        self.api.create_validating_webhook_configuration(body)
        self.names.append(name)
        return name

    def cleanup(self) -> None:
        for name in self.names:
            try:
                self.api.delete_validating_webhook_configuration(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise


@pytest.fixture(scope="module")
def certs() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="admission-certs-"))
    make_certs(directory)
    yield directory


@pytest.fixture(scope="module")
def webhooks(kube_api: Any, certs: Path) -> Iterator[Webhooks]:
    hooks = Webhooks(kube_api, (certs / "ca.crt").read_bytes())
    try:
        yield hooks
    finally:
        hooks.cleanup()
    left = [w.metadata.name for w in hooks.api.list_validating_webhook_configuration().items]
    assert not [n for n in left if n in hooks.names], "webhook configurations left behind"


@pytest.fixture(scope="module")
def webhook_url(control_plane: Any, kube_api: Any, certs: Path) -> Iterator[str]:
    """The operator, with its webhook on a free loopback port; yields the URL the API server calls."""
    install_crd(kube_api)
    port = free_port()
    op = OperatorProcess(control_plane.kubeconfig, OPERATOR_CONFIG)
    env = {"FINETUNE_WEBHOOK_PORT": str(port), "FINETUNE_WEBHOOK_CERT_DIR": str(certs)}
    env["FINETUNE_WEBHOOK_ADDR"] = "127.0.0.1"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        op.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for("the webhook server", listening, timeout=60)
        yield f"https://127.0.0.1:{port}{WEBHOOK_PATH}"
    finally:
        op.stop()
        print(op.log_tail(120))


@pytest.fixture
def guarded(namespace: str, kube_api: Any, webhooks: Webhooks, webhook_url: str) -> str:
    """A test namespace whose FineTuneJobs go through the operator's webhook (failurePolicy Fail)."""
    label = uuid.uuid4().hex[:12]
    client.CoreV1Api(kube_api).patch_namespace(namespace, {"metadata": {"labels": {SELECTOR_LABEL: label}}})
    webhooks.create(webhook_url, label)
    return namespace


def objects(kube_api: Any, namespace: str) -> list[str]:
    found: Any = client.CustomObjectsApi(kube_api).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    return [o["metadata"]["name"] for o in found["items"]]


def status_of(kube_api: Any, namespace: str, name: str) -> dict[str, Any]:
    body: Any = client.CustomObjectsApi(kube_api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return dict(body.get("status") or {})


BAD = [
    ("output.uri", "ftp://out/job/", "InvalidURI", "spec.output.uri"),
    ("resources.gpus", 3, "PolicyViolation", "spec.resources.gpus"),
    ("dataset.template.prompt", "Q: {question.__class__}", "TemplateError", "spec.dataset.template.prompt"),
]


@pytest.mark.parametrize(("path", "value", "reason", "field"), BAD, ids=[b[2] for b in BAD])
def test_bad_job_refused_at_apply_with_the_operators_reason_and_never_stored(
    guarded: str, kube_api: Any, namespace: str, path: str, value: Any, reason: str, field: str
) -> None:
    text = manifest("bad", guarded, edited(path, value))
    dry = kubectl("apply", "--dry-run=server", "-f", "-", stdin=text)
    assert dry.returncode != 0 and f"denied the request: {reason}: {field}: " in dry.stderr, dry.stderr
    proc = kubectl("apply", "-f", "-", stdin=text)
    assert proc.returncode != 0, proc.stdout
    assert f"denied the request: {reason}: {field}: " in proc.stderr, proc.stderr
    assert objects(kube_api, guarded) == []


def test_refusal_matches_the_status_the_operator_gives_without_the_webhook(
    guarded: str, kube_api: Any, webhooks: Webhooks, webhook_url: str
) -> None:
    # The same bad job in a namespace the webhook does not cover is stored, and the operator fails it itself.
    unguarded = f"{guarded}-open"[:63]
    core: Any = client.CoreV1Api(kube_api)
    core.create_namespace({"metadata": {"name": unguarded, "labels": {"finetune.test/integration": "true"}}})
    try:
        spec = edited("output.uri", "ftp://out/job/")
        refused = kubectl("apply", "-f", "-", stdin=manifest("bad", guarded, spec))
        assert refused.returncode != 0
        stored = kubectl("apply", "-f", "-", stdin=manifest("bad", unguarded, spec))
        assert stored.returncode == 0, stored.stderr
        status: dict[str, Any] = wait_for(
            "the operator's verdict",
            lambda: (s := status_of(kube_api, unguarded, "bad")).get("phase") == "Failed" and s,
        )
        assert status["reason"] == "InvalidURI"
        refusal = refused.stderr.split("denied the request: ", 1)[1].strip()
        assert refusal == f"{status['reason']}: {status['message']}"
    finally:
        core.delete_namespace(unguarded)


def test_good_job_admitted_and_started_job_is_immutable_except_suspend(guarded: str, kube_api: Any) -> None:
    proc = kubectl("apply", "-f", "-", stdin=manifest("good", guarded, SPEC))
    assert proc.returncode == 0, proc.stderr
    assert objects(kube_api, guarded) == ["good"]
    wait_for("the job to start", lambda: status_of(kube_api, guarded, "good").get("workload"))

    edit = kubectl("patch", "ftj", "good", "-n", guarded, "--type", "merge", "-p",
                   '{"spec": {"output": {"uri": "s3://elsewhere/x/"}, "method": {"rank": 64}}}')  # fmt: skip
    assert edit.returncode != 0
    assert "denied the request: SpecImmutable: spec.method.rank: " in edit.stderr, edit.stderr
    assert "spec.output.uri" in edit.stderr
    body: Any = client.CustomObjectsApi(kube_api).get_namespaced_custom_object(GROUP, VERSION, guarded, PLURAL, "good")
    assert body["spec"]["output"]["uri"] == SPEC["output"]["uri"]

    suspend = kubectl("patch", "ftj", "good", "-n", guarded, "--type", "merge", "-p",
                      '{"spec": {"runPolicy": {"suspend": true, "activeDeadlineSeconds": 7200}}}')  # fmt: skip
    assert suspend.returncode == 0, suspend.stderr
    label = kubectl("label", "ftj", "good", "-n", guarded, "team=a")
    assert label.returncode == 0, label.stderr
    wait_for("Suspended", lambda: status_of(kube_api, guarded, "good").get("phase") == "Suspended")


def test_a_job_failed_by_validation_can_be_fixed(
    namespace: str, kube_api: Any, webhooks: Webhooks, webhook_url: str
) -> None:
    # Stored while no webhook covered its namespace, and failed by the operator: it never started, so its spec
    # may still change, and the change is checked like a new job.
    proc = kubectl("apply", "-f", "-", stdin=manifest("fixme", namespace, edited("output.uri", "ftp://x/y/")))
    assert proc.returncode == 0, proc.stderr
    wait_for("the verdict", lambda: status_of(kube_api, namespace, "fixme").get("reason") == "InvalidURI")
    label = uuid.uuid4().hex[:12]
    client.CoreV1Api(kube_api).patch_namespace(namespace, {"metadata": {"labels": {SELECTOR_LABEL: label}}})
    webhooks.create(webhook_url, label)
    still_bad = manifest("fixme", namespace, edited("output.uri", "gopher://x/y/"))
    refused = wait_for("the webhook to cover the namespace", lambda: (
        p := kubectl("apply", "-f", "-", stdin=still_bad)).returncode != 0 and p)  # fmt: skip
    assert "denied the request: InvalidURI: spec.output.uri: " in refused.stderr, refused.stderr
    fixed = kubectl("apply", "-f", "-", stdin=manifest("fixme", namespace, SPEC))
    assert fixed.returncode == 0, fixed.stderr


def test_raw_api_unknown_fields_are_pruned_before_the_webhook_sees_them(guarded: str, kube_api: Any) -> None:
    """Kubernetes 1.20 prunes unknown fields while decoding the request, before admission: the webhook gets the
    pruned object and cannot refuse them (docs/admission.md). They are dropped, never stored or used."""
    body = yaml.safe_load(manifest("raw", guarded, SPEC))
    body["spec"]["hostNetwork"] = True
    body["spec"]["storage"]["privileged"] = True
    created: Any = client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        GROUP, VERSION, guarded, PLURAL, body
    )
    assert "hostNetwork" not in created["spec"] and "privileged" not in created["spec"]["storage"]
    # kubectl (client-side validation against the published schema) refuses them before any request is sent.
    proc = kubectl(
        "apply", "-f", "-", stdin=yaml.safe_dump({**body, "metadata": {"name": "raw2", "namespace": guarded}})
    )
    assert proc.returncode != 0 and "unknown field" in proc.stderr, proc.stderr


@pytest.mark.parametrize(("policy", "admitted"), [("Fail", False), ("Ignore", True)])
def test_failure_policy_when_the_webhook_is_down(
    namespace: str, kube_api: Any, webhooks: Webhooks, webhook_url: str, policy: str, admitted: bool
) -> None:
    label = uuid.uuid4().hex[:12]
    client.CoreV1Api(kube_api).patch_namespace(namespace, {"metadata": {"labels": {SELECTOR_LABEL: label}}})
    webhooks.create(f"https://127.0.0.1:{free_port()}{WEBHOOK_PATH}", label, failure_policy=policy)  # nobody there
    proc = kubectl("apply", "-f", "-", stdin=manifest("job", namespace, SPEC))
    if admitted:
        assert proc.returncode == 0, proc.stderr
        assert objects(kube_api, namespace) == ["job"]
    else:
        assert proc.returncode != 0 and "failed calling webhook" in proc.stderr, proc.stderr
        assert objects(kube_api, namespace) == []


def test_chart_reuses_the_webhook_certificate_on_upgrade(control_plane: Any, kube_api: Any, namespace: str) -> None:
    """`helm upgrade` must not rotate the CA under a running operator: the chart looks its Secret up (a lookup
    needs the API server, hence this tier) and renders the same certificate and caBundle again."""
    secret = {"ca.crt": "CA-OF-THIS-INSTALL", "tls.crt": "CERT-OF-THIS-INSTALL", "tls.key": "KEY-OF-THIS-INSTALL"}
    name = "r-finetune-operator-webhook-tls"
    core: Any = client.CoreV1Api(kube_api)
    core.create_namespaced_secret(namespace, {"metadata": {"name": name}, "stringData": secret})

    def render(ns: str) -> dict[str, Any]:
        proc = subprocess.run(
            ["bash", str(Path(__file__).resolve().parents[2] / "scripts" / "helm.sh"), "template", "r",
             str(Path(__file__).resolve().parents[2] / "charts" / "finetune-operator"), "--namespace", ns,
             "--dry-run=server", "--show-only", "templates/webhook.yaml"],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return {d["kind"]: d for d in yaml.safe_load_all(proc.stdout) if d}

    docs = render(namespace)
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in secret.items()}
    assert docs["Secret"]["data"] == encoded
    assert docs["ValidatingWebhookConfiguration"]["webhooks"][0]["clientConfig"]["caBundle"] == encoded["ca.crt"]
    # Where there is no Secret yet, a new CA and certificate are generated.
    fresh = render(f"{namespace}-none"[:63])
    assert base64.b64decode(fresh["Secret"]["data"]["ca.crt"]).startswith(b"-----BEGIN CERTIFICATE-----")
