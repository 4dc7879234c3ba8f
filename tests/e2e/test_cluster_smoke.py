"""Smoke tests of the e2e cluster itself (scripts/cluster.sh + scripts/images/build.sh).

They prove what every other e2e test relies on: the project's image runs as a real container under
the restrictive security context the operator uses (non-root uid 1000, all capabilities dropped,
seccomp RuntimeDefault, read-only root filesystem, no service-account token), its Python environment
imports, the slim operator image holds the operator and none of the trainer's stack, pods reach the S3
server (the same one this machine sees) and the apiserver through the `kubernetes` Service, `kubectl logs`
works, and the tier runs the cluster's own kubectl.
"""

from __future__ import annotations

import json
import shutil
import uuid
from typing import Any

import pytest

from tests.e2e.conftest import Cluster
from tests.kubectl import KUBECTL_VERSION, kubectl_path

pytestmark = pytest.mark.e2e

RESULT_PREFIX = "SMOKE-RESULT "

# Runs inside the container; prints one JSON line the test parses from `kubectl logs`.
POD_PROGRAM = r"""
import json, os, sys, time
t0 = time.time()
import torch, transformers, finetune_trainer, finetune_operator
out = {"imports_s": round(time.time() - t0, 1), "torch": torch.__version__, "transformers": transformers.__version__}
out.update(uid=os.getuid(), gid=os.getgid(), cwd=os.getcwd(), python=sys.executable)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
for key in ("CapEff", "Seccomp", "NoNewPrivs"):
    out[key] = status[key].strip()
def writable(path):
    try:
        with open(os.path.join(path, ".probe"), "w") as f:
            f.write("x")
        return True
    except OSError:
        return False
out["writable"] = {p: writable(p) for p in ("/", "/opt/venv", "/workspace", "/tmp")}
out["sa_token_mounted"] = os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount")
import boto3
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name=os.environ["AWS_REGION"])
bucket = os.environ["SMOKE_BUCKET"]
s3.put_object(Bucket=bucket, Key="from-pod.txt", Body=b"hello from the pod")
out["s3_keys"] = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))
print("SMOKE-RESULT " + json.dumps(out), flush=True)
"""

APISERVER_PROGRAM = r"""
import json, os, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
ctx = ssl.create_default_context(cafile=f"{sa}/ca.crt")
token = open(f"{sa}/token").read()
req = urllib.request.Request(f"https://{host}:{port}/version", headers={"Authorization": "Bearer " + token})
with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
    version = json.load(r)
print("SMOKE-RESULT " + json.dumps({"host": host, "gitVersion": version["gitVersion"]}), flush=True)
"""


def _job(name: str, image: str, program: str, env: dict[str, str], *, restricted: bool) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main",
        "image": image,
        "imagePullPolicy": "Never",
        "command": ["python", "-c", program],
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}},
    }
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if restricted:
        pod_spec |= {
            "automountServiceAccountToken": False,
            "securityContext": {
                "runAsUser": 1000,
                "runAsGroup": 1000,
                "runAsNonRoot": True,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "volumes": [{"name": "workspace", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
        }
        container |= {
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [
                {"name": "workspace", "mountPath": "/workspace"},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {"spec": pod_spec}},
    }


def _result_from_logs(cluster: Cluster, namespace: str, job: str) -> dict[str, Any]:
    logs = cluster.kubectl("-n", namespace, "logs", f"job/{job}").stdout
    lines = [line for line in logs.splitlines() if line.startswith(RESULT_PREFIX)]
    assert lines, f"no {RESULT_PREFIX.strip()} line in `kubectl logs job/{job}`:\n{logs}"
    return dict(json.loads(lines[-1][len(RESULT_PREFIX) :]))


def test_restricted_pod_imports_stack_and_reaches_s3(cluster: Cluster, e2e_namespace: str) -> None:
    s3 = cluster.s3_client()
    bucket = f"smoke-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="from-host.txt", Body=b"hello from the host")

    job = _job("smoke", cluster.image, POD_PROGRAM, {**cluster.s3_env, "SMOKE_BUCKET": bucket}, restricted=True)
    cluster.kubectl("-n", e2e_namespace, "apply", "-f", "-", input=json.dumps(job))
    cluster.wait_for_job(e2e_namespace, "smoke", timeout=300)
    result = _result_from_logs(cluster, e2e_namespace, "smoke")

    # The image: torch (CPU build locally), the project's packages, `python` from the venv.
    assert result["torch"].startswith("2.13.0"), result
    assert result["python"] == "/opt/venv/bin/python", result
    assert result["cwd"] == "/workspace", result
    # The security context took effect.
    assert (result["uid"], result["gid"]) == (1000, 1000), result
    assert int(result["CapEff"], 16) == 0, result
    assert result["Seccomp"] == "2", result  # 2 = filter mode: RuntimeDefault applied
    assert result["NoNewPrivs"] == "1", result
    assert result["writable"] == {"/": False, "/opt/venv": False, "/workspace": True, "/tmp": True}, result
    assert result["sa_token_mounted"] is False, result
    # Pod and host talk to the same S3 server.
    assert result["s3_keys"] == ["from-host.txt", "from-pod.txt"], result
    body = s3.get_object(Bucket=bucket, Key="from-pod.txt")["Body"].read()
    assert body == b"hello from the pod"


def test_pod_reaches_apiserver_through_kubernetes_service(cluster: Cluster, e2e_namespace: str) -> None:
    """What the operator's pod does: in-cluster config = the `kubernetes` Service + its SA token."""
    job = _job("apiserver", cluster.image, APISERVER_PROGRAM, {}, restricted=False)
    cluster.kubectl("-n", e2e_namespace, "apply", "-f", "-", input=json.dumps(job))
    cluster.wait_for_job(e2e_namespace, "apiserver", timeout=300)
    result = _result_from_logs(cluster, e2e_namespace, "apiserver")
    service_ip = cluster.kubectl("-n", "default", "get", "service", "kubernetes", "-o", "jsonpath={.spec.clusterIP}")
    assert result["host"] == service_ip.stdout.strip(), result
    if cluster.local:
        assert result["gitVersion"].startswith("v1.20."), result


OPERATOR_IMAGE_PROGRAM = r"""
import importlib.util, json, os, sys, time
t0 = time.time()
import finetune_operator.handlers, finetune_operator.__main__, kopf, kubernetes
out = {"imports_s": round(time.time() - t0, 1), "uid": os.getuid(), "python": sys.executable}
out["absent"] = {m: importlib.util.find_spec(m) is None
                 for m in ("torch", "transformers", "datasets", "finetune_trainer", "finetune_cli")}
out["heavy_loaded"] = sorted(m for m in ("torch", "transformers", "datasets", "numpy") if m in sys.modules)
print("SMOKE-RESULT " + json.dumps(out), flush=True)
"""


def test_operator_image_is_slim_and_runs_the_operator(cluster: Cluster, e2e_namespace: str) -> None:
    """The chart's operator image: the operator imports under the restricted context, and torch, transformers,
    datasets and the trainer/CLI packages are not in it at all."""
    assert cluster.operator_image and cluster.operator_image != cluster.image
    job = _job("operator-image", cluster.operator_image, OPERATOR_IMAGE_PROGRAM, {}, restricted=True)
    cluster.kubectl("-n", e2e_namespace, "apply", "-f", "-", input=json.dumps(job))
    cluster.wait_for_job(e2e_namespace, "operator-image", timeout=180)
    result = _result_from_logs(cluster, e2e_namespace, "operator-image")
    assert result["absent"] == dict.fromkeys(result["absent"], True), result
    assert result["heavy_loaded"] == [], result
    assert (result["uid"], result["python"]) == (1000, "/opt/venv/bin/python"), result


def test_tests_run_the_clusters_own_kubectl(cluster: Cluster) -> None:
    """Every kubectl of this tier (and of the demo functions it calls) is the project's v1.20.2 build."""
    assert shutil.which("kubectl") == kubectl_path()
    client = json.loads(cluster.kubectl("version", "--client", "-o", "json").stdout)["clientVersion"]
    assert client["gitVersion"] == KUBECTL_VERSION, client
