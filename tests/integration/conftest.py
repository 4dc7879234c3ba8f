"""Fixtures for the integration tier: a REAL kube-apiserver + etcd + kube-controller-manager.

The control plane is started once per test session by ``scripts/control-plane.sh up``
(Kubernetes v1.20.2 built from Debian's source package by ``scripts/k8s-build.sh`` and
cached outside the repository). There is no kubelet or scheduler: pods stay Pending,
but Jobs create Pods and the garbage collector honours ownerReferences.

If the control plane cannot start, the fixture FAILS (never skips): a silently skipped
integration tier would look green while testing nothing.

Environment:
    FINETUNE_KEEP_CONTROL_PLANE=1   leave the control plane running after the session
                                    (the next session reuses it: ``up`` is idempotent).
    FINETUNE_STATE / FINETUNE_CACHE / FINETUNE_APISERVER_PORT ...  see scripts/control-plane.sh
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.kubectl import bin_dir, use_project_kubectl
from tests.script_runner import log_tails, run_script, tail

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = REPO_ROOT / "scripts"
# kubectl too: every test runs the cluster's own version (tests/kubectl.py).
K8S_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl")

# A cold build took ~7 min on 2 idle cores (longer when the CPU is shared); `up` with
# cached binaries takes ~12 s.
BUILD_TIMEOUT_S = 3600
UP_TIMEOUT_S = 300


def _bin_dir() -> Path:
    return bin_dir()


def _state_dir() -> Path:
    return Path(os.environ.get("FINETUNE_STATE", "/tmp/finetune-control-plane"))


def _binaries_cached() -> bool:
    return all(os.access(_bin_dir() / b, os.X_OK) for b in K8S_BINARIES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give the first control-plane test room for a from-scratch build.

    The session fixture is set up inside the first test that needs it, so pytest-timeout
    would count the (cold: ~7 minute) Kubernetes build against that one test.
    """
    if _binaries_cached() or not config.pluginmanager.hasplugin("timeout"):
        return
    for item in items:
        if "control_plane" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(BUILD_TIMEOUT_S + UP_TIMEOUT_S + 600))
            break


@dataclass(frozen=True)
class ControlPlane:
    kubeconfig: str
    state_dir: str


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """Start (or reuse) the local control plane; export KUBECONFIG for the session."""
    if not _binaries_cached():
        try:
            build = run_script([str(SCRIPTS / "k8s-build.sh")], timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"scripts/k8s-build.sh did not finish within {BUILD_TIMEOUT_S}s", pytrace=False)
        if build.returncode != 0:
            pytest.fail(
                f"scripts/k8s-build.sh failed (rc={build.returncode}):\n{tail(build.stdout)}\n{tail(build.stderr)}",
                pytrace=False,
            )

    try:
        up = run_script([str(SCRIPTS / "control-plane.sh"), "up"], timeout=UP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logs = log_tails(_state_dir(), 30)
        pytest.fail(f"control-plane.sh up did not finish within {UP_TIMEOUT_S}s\n{logs}", pytrace=False)
    match = re.search(r"^export KUBECONFIG=(\S+)$", up.stdout, re.MULTILINE)
    if up.returncode != 0 or not match:
        pytest.fail(
            f"scripts/control-plane.sh up failed (rc={up.returncode}):\n"
            f"{tail(up.stdout)}\n{tail(up.stderr)}\n{log_tails(_state_dir(), 30)}",
            pytrace=False,
        )
    kubeconfig = match.group(1)

    previous = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = kubeconfig
    use_project_kubectl()  # again: a test may have changed PATH since the session started
    try:
        yield ControlPlane(kubeconfig=kubeconfig, state_dir=str(_state_dir()))
    finally:
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous
        if os.environ.get("FINETUNE_KEEP_CONTROL_PLANE") != "1":
            down = run_script([str(SCRIPTS / "control-plane.sh"), "down"], timeout=120)
            if down.returncode != 0:
                # Teardown problems must be visible, but not mask the tests' own outcome.
                print(f"control-plane.sh down failed (rc={down.returncode}):\n{down.stderr}")


@pytest.fixture(scope="session")
def kube_api(control_plane: ControlPlane) -> Iterator[Any]:
    """A ``kubernetes.client.ApiClient`` configured from the control plane's kubeconfig."""
    from kubernetes import config

    api = config.new_client_from_config(config_file=control_plane.kubeconfig)
    try:
        yield api
    finally:
        api.close()


def _namespace_name(request: pytest.FixtureRequest) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")
    return f"it-{base[:45].strip('-')}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def namespace(kube_api: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards.

    Waits until the namespace's ``default`` ServiceAccount has its token secret: on 1.20 the
    ServiceAccount admission plugin rejects pods until then, which would make the first
    Job pods of a test flaky.
    """
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(kube_api)
    name = _namespace_name(request)
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"finetune.test/integration": "true"}))
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            sa = core.read_namespaced_service_account("default", name)
            if sa.secrets:
                break
        except ApiException as exc:
            if exc.status != 404:
                raise
        if time.monotonic() > deadline:
            pytest.fail(f"namespace {name}: default ServiceAccount has no token secret after 60s", pytrace=False)
        time.sleep(0.2)
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise
