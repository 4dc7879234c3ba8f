"""The tests run the cluster's own kubectl (tests/kubectl.py), not the host's."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

from tests.kubectl import KUBECTL_VERSION, bin_dir, kubectl_path


def test_kubectl_on_path_is_the_projects_v1_20_2(control_plane: Any) -> None:
    # What a bare "kubectl" in a test, the CLI or the demo resolves to.
    assert shutil.which("kubectl") == kubectl_path() == str(bin_dir() / "kubectl")
    proc = subprocess.run(["kubectl", "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["clientVersion"]["gitVersion"] == KUBECTL_VERSION
    # ... and it is the apiserver's version: no client/server skew.
    proc = subprocess.run(["kubectl", "version", "-o", "json"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["serverVersion"]["gitVersion"] == KUBECTL_VERSION
