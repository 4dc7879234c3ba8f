"""Fixtures for the e2e tier: a REAL single-node Kubernetes cluster (kubelet, containerd, kube-proxy)
with the project's images loaded and an S3 server that pods reach.

The ``cluster`` session fixture runs ``scripts/cluster.sh up`` (see docs/local-cluster.md) and
``scripts/images/build.sh`` (pause + ``finetune-trainer:<version>`` + ``finetune-operator:<version>``,
imported into containerd), exports KUBECONFIG for the session, puts the project's kubectl (v1.20.2,
tests/kubectl.py) first on PATH and yields a :class:`Cluster`::

    def test_something(cluster):
        cluster.kubeconfig      # path; also in os.environ["KUBECONFIG"] during the session
        cluster.s3_endpoint     # S3 URL as PODS see it (http://198.18.100.1:9000 locally; this
                                # machine reaches the same URL)
        cluster.s3_env          # AWS_* variables for a pod (endpoint, test credentials, region)
        cluster.image           # the trainer image, e.g. "finetune-trainer:0.1.0"
                                # (use imagePullPolicy: Never locally: nothing can be pulled)
        cluster.operator_image  # the slim operator image, e.g. "finetune-operator:0.1.0"
        cluster.kubectl("get", "nodes")                 # CompletedProcess; check=True by default
        cluster.kubectl("apply", "-f", "-", input=yaml_text)
        cluster.wait_for_job(namespace, "my-job", timeout=300)  # fails with pod state + logs
        cluster.s3_client()     # boto3 S3 client against s3_endpoint

    def test_other(cluster, e2e_namespace):  # a fresh namespace (SA token ready), deleted afterwards
        ...

If the cluster cannot come up the fixture FAILS (never skips): a silently skipped e2e tier would look
green while testing nothing.

Environment:
    FINETUNE_KEEP_CLUSTER=1      leave the cluster running after the session (the next session reuses
                                 it; ``up`` is idempotent). A cluster that was already running when the
                                 session started is never torn down.
    FINETUNE_E2E_BUILD_IMAGES=0  do not (re)build/import images (they must already be in containerd)
    KUBECONFIG                   if it points at another reachable cluster with a Ready node, that
                                 cluster is used as is (no local cluster, no image import, no teardown);
                                 FINETUNE_S3_ENDPOINT must then say where its pods reach S3, and
                                 FINETUNE_TRAINER_IMAGE / FINETUNE_OPERATOR_IMAGE which images they run.
    FINETUNE_CLUSTER_STATE / FINETUNE_CACHE   see scripts/cluster.sh
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from tests.kubectl import bin_dir, kubectl_path, use_project_kubectl
from tests.script_runner import log_tails, run_script, tail

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = REPO_ROOT / "scripts"
K8S_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl")

S3_REGION = "us-east-1"
S3_ACCESS_KEY = "testing"  # moto accepts any credentials
S3_SECRET_KEY = "testing"

# Cached: `up` ~25 s, image build ~15 s (app layer only). Cold: Kubernetes build ~10-15 min,
# base image layer ~3-10 min, first import into containerd ~45 s.
UP_TIMEOUT_S = 600
IMAGES_TIMEOUT_S = 2400
BUILD_TIMEOUT_S = 3600


def _cache() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune")


def _state_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CLUSTER_STATE", "/tmp/finetune-cluster"))


def _cold() -> bool:
    """True when the first `up` + image build will need the long (uncached) builds."""
    if not all(os.access(bin_dir() / b, os.X_OK) for b in K8S_BINARIES):
        return True
    images = _cache() / "images"
    return not any(images.glob("base-*/layer.tar")) or not any(images.glob("operator-base-*/layer.tar"))


def _version() -> str:
    return str(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"])


def _default_image() -> str:
    return os.environ.get("FINETUNE_TRAINER_IMAGE", f"finetune-trainer:{_version()}")


def _default_operator_image() -> str:
    return os.environ.get("FINETUNE_OPERATOR_IMAGE", f"finetune-operator:{_version()}")


def _exports(text: str) -> dict[str, str]:
    return dict(re.findall(r"^export ([A-Z_][A-Z0-9_]*)=(\S*)$", text, re.MULTILINE))


@dataclass(frozen=True)
class Cluster:
    """A running cluster for e2e tests. See the module docstring."""

    kubeconfig: str
    s3_endpoint: str
    image: str
    operator_image: str = ""
    local: bool = True
    kubectl_cache: str | None = field(default=None, repr=False)

    @property
    def s3_env(self) -> dict[str, str]:
        """Environment for a pod (or process) that talks to this cluster's S3 server with boto3."""
        return {
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_REGION": S3_REGION,
        }

    def kubectl(
        self, *args: str, input: str | None = None, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster. With check=True a non-zero exit fails the test with its output."""
        cmd = [kubectl_path(), "--kubeconfig", self.kubeconfig]
        if self.kubectl_cache:
            cmd.append(f"--cache-dir={self.kubectl_cache}")  # not ~/.kube/cache
        proc = subprocess.run([*cmd, *args], input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def wait_for_job(self, namespace: str, name: str, timeout: float = 300) -> dict[str, Any]:
        """Wait until Job ``name`` has succeeded and return it (as a dict); fail the test with its pods'
        description and logs if it fails or does not succeed within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            job = json.loads(self.kubectl("-n", namespace, "get", "job", name, "-o", "json").stdout)
            status = job.get("status", {})
            if status.get("succeeded"):
                return dict(job)
            failed = any(c.get("type") == "Failed" and c.get("status") == "True" for c in status.get("conditions", []))
            if failed or time.monotonic() > deadline:
                pods = self.kubectl("-n", namespace, "describe", "pods", "-l", f"job-name={name}", check=False)
                logs = self.kubectl("-n", namespace, "logs", f"job/{name}", "--tail=50", check=False)
                what = "failed" if failed else f"did not succeed within {timeout}s"
                pytest.fail(
                    f"Job {namespace}/{name} {what}:\n{pods.stdout}\n---- logs ----\n{logs.stdout}{logs.stderr}"
                )
            time.sleep(1)

    def s3_client(self) -> S3Client:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name=S3_REGION,
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give the first test that sets up ``cluster`` room for from-scratch builds (pytest-timeout
    would otherwise count them against that one test)."""
    if not config.pluginmanager.hasplugin("timeout"):
        return
    budget = UP_TIMEOUT_S + IMAGES_TIMEOUT_S + (BUILD_TIMEOUT_S if _cold() else 0) + 600
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(budget))
            break


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """Start (or reuse) the local single-node cluster with the project's image; see the module docstring."""
    state = _state_dir()
    ours = state / "kubeconfig"
    use_project_kubectl()
    if not all(os.access(bin_dir() / b, os.X_OK) for b in K8S_BINARIES):
        # `cluster.sh up` builds what the cluster runs; this also adds kubectl to an older cache.
        try:
            build = run_script([str(SCRIPTS / "k8s-build.sh")], timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"scripts/k8s-build.sh did not finish within {BUILD_TIMEOUT_S}s", pytrace=False)
        if build.returncode != 0:
            pytest.fail(f"scripts/k8s-build.sh failed:\n{tail(build.stdout)}\n{tail(build.stderr)}", pytrace=False)
    already_running = run_script([str(SCRIPTS / "cluster.sh"), "status"], timeout=60).returncode == 0

    def fail_and_clean_up(message: str) -> NoReturn:
        message += f"\n{log_tails(_state_dir(), 25)}"  # before `down` removes the logs
        if not already_running and os.environ.get("FINETUNE_KEEP_CLUSTER") != "1":
            run_script([str(SCRIPTS / "cluster.sh"), "down"], timeout=300)  # no half-started cluster left behind
        pytest.fail(message, pytrace=False)

    try:
        up = run_script([str(SCRIPTS / "cluster.sh"), "up"], timeout=UP_TIMEOUT_S + BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        fail_and_clean_up("scripts/cluster.sh up did not finish in time")
    env = _exports(up.stdout)
    if up.returncode != 0 or "KUBECONFIG" not in env:
        fail_and_clean_up(f"scripts/cluster.sh up failed (rc={up.returncode}):\n{tail(up.stdout)}\n{tail(up.stderr)}")
    kubeconfig = env["KUBECONFIG"]
    local = Path(kubeconfig) == ours
    s3_endpoint = env.get("FINETUNE_S3_ENDPOINT") or os.environ.get("FINETUNE_S3_ENDPOINT", "")
    if not s3_endpoint:
        pytest.fail(
            f"using the cluster of KUBECONFIG={kubeconfig}, "
            "but FINETUNE_S3_ENDPOINT (S3 as its pods see it) is not set",
            pytrace=False,
        )

    if local and os.environ.get("FINETUNE_E2E_BUILD_IMAGES", "1") != "0":
        try:
            images = run_script([str(SCRIPTS / "images" / "build.sh")], timeout=IMAGES_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            fail_and_clean_up(f"scripts/images/build.sh did not finish within {IMAGES_TIMEOUT_S}s")
        if images.returncode != 0:
            fail_and_clean_up(
                f"scripts/images/build.sh failed (rc={images.returncode}):\n"
                f"{tail(images.stdout)}\n{tail(images.stderr)}"
            )

    previous = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = kubeconfig
    try:
        yield Cluster(
            kubeconfig=kubeconfig,
            s3_endpoint=s3_endpoint,
            image=_default_image(),
            operator_image=_default_operator_image(),
            local=local,
            kubectl_cache=str(state / "kubectl-cache") if local else None,
        )
    finally:
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous
        if local and not already_running and os.environ.get("FINETUNE_KEEP_CLUSTER") != "1":
            down = run_script([str(SCRIPTS / "cluster.sh"), "down"], timeout=300)
            if down.returncode != 0:
                # Visible, but must not mask the tests' own outcome.
                print(f"scripts/cluster.sh down failed (rc={down.returncode}):\n{down.stdout}\n{down.stderr}")


@pytest.fixture
def e2e_namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted (in the background) afterwards.

    Yields once its ``default`` ServiceAccount has a token secret: 1.20's ServiceAccount admission
    rejects pods until then.
    """
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")
    name = f"e2e-{base[:45].strip('-')}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    try:
        deadline = time.monotonic() + 60
        while True:
            sa = cluster.kubectl("-n", name, "get", "serviceaccount", "default", "-o", "json", check=False)
            if sa.returncode == 0 and json.loads(sa.stdout).get("secrets"):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"namespace {name}: default ServiceAccount has no token secret after 60s", pytrace=False)
            time.sleep(0.5)
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
