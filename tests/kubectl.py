"""The kubectl every test runs: the cluster's own version (v1.20.2), built by scripts/k8s-build.sh from Debian's
Kubernetes source next to kube-apiserver and friends and cached with them, never whatever kubectl the host has
on PATH (a newer client talks to the 1.20 apiserver differently, and differs from machine to machine).

    from tests.kubectl import KUBECTL_VERSION, bin_dir, kubectl_path, use_project_kubectl

    use_project_kubectl()   # idempotent: bin_dir() first on os.environ["PATH"], so subprocesses (the CLI, the
                            # demo functions, helm's plugins) find this kubectl too
    kubectl_path()          # the binary's absolute path (fails the test when it was not built)

tests/conftest.py calls use_project_kubectl() when the test session starts; the integration and e2e fixtures
build the binaries (scripts/k8s-build.sh) when any is missing, kubectl included.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

KUBECTL_VERSION = "v1.20.2"


def bin_dir() -> Path:
    """Where scripts/k8s-build.sh caches the Kubernetes binaries (FINETUNE_CACHE as in the scripts)."""
    cache = os.environ.get("FINETUNE_CACHE") or str(Path.home() / ".cache" / "finetune")
    return Path(cache) / f"k8s-{KUBECTL_VERSION.lstrip('v')}" / "bin"


def use_project_kubectl() -> None:
    """Put the cached binaries first on PATH for this process and everything it starts."""
    first = str(bin_dir())
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != first]
    os.environ["PATH"] = os.pathsep.join([first, *parts])


def kubectl_path() -> str:
    path = bin_dir() / "kubectl"
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run scripts/k8s-build.sh (make k8s-binaries)", pytrace=False)
    return str(path)
