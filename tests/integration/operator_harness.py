"""Helpers for driving the real operator against the real control plane.

No kubelet runs in this tier, so tests play the kubelet's part through the API, as envtest-based suites do:
they bind trainer pods to a registered Node and write pod status. For pod *logs* (how the trainer reports
progress) the apiserver proxies to the node's kubelet endpoint; `FakeKubeletLogs` serves only that one
endpoint (`/containerLogs/...`) over HTTPS on loopback. It is the one stand-in here, for a kubelet that
cannot run in this tier; the e2e tier runs a real kubelet.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

REPO = Path(__file__).resolve().parents[2]
CRD_NAME = "finetunejobs.finetune.dev"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class OperatorProcess:
    """`python -m finetune_operator` as a subprocess, as it runs in its Deployment."""

    def __init__(self, kubeconfig: str, config: dict[str, Any]) -> None:
        self.kubeconfig = kubeconfig
        self.dir = Path(tempfile.mkdtemp(prefix="ftj-operator-"))
        self.config_path = self.dir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = self.dir / "operator.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "FINETUNE_OPERATOR_CONFIG": str(self.config_path),
        }
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "finetune_operator", "--verbose"], env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, as when a node dies under the operator."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, n: int = 80) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(lines[-n:])


class FakeKubeletLogs:
    """Serves `/containerLogs/<ns>/<pod>/<container>` over HTTPS so `kubectl logs` works without a kubelet."""

    def __init__(self) -> None:
        self.logs: dict[tuple[str, str], str] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = self.path.split("?")[0].strip("/").split("/")
                text = None
                if len(parts) >= 3 and parts[0] == "containerLogs":
                    text = outer.logs.get((parts[1], parts[2]))
                body = (text or "").encode()
                self.send_response(200 if text is not None else 404)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        certdir = Path(tempfile.mkdtemp(prefix="fake-kubelet-"))
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                "-keyout", str(certdir / "key.pem"), "-out", str(certdir / "cert.pem"),
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certdir / "cert.pem", certdir / "key.pem")
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def install_crd(kube_api: Any) -> None:
    """kubectl apply the generated CRD and wait until the apiserver serves it."""
    subprocess.run(["kubectl", "apply", "-f", str(REPO / "manifests" / "crd.yaml")], check=True, capture_output=True)
    ext: Any = client.ApiextensionsV1Api(kube_api)

    def established() -> bool:
        conds = ext.read_custom_resource_definition(CRD_NAME).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conds)

    wait_for("CRD established", established)


def register_fake_node(kube_api: Any, name: str, fake: FakeKubeletLogs) -> None:
    """A Node whose kubelet endpoint is `fake`, so the apiserver proxies pod logs of pods bound to it there."""
    core: Any = client.CoreV1Api(kube_api)
    if name in [n.metadata.name for n in core.list_node().items]:
        core.delete_node(name)
        wait_for("old node gone", lambda: name not in [n.metadata.name for n in core.list_node().items])
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    core.create_node(
        {
            "metadata": {"name": name},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": fake.port}},
                "conditions": [
                    {"type": "Ready", "status": "True", "reason": "Fake", "lastHeartbeatTime": now,
                     "lastTransitionTime": now},
                ],
            },
        }
    )  # fmt: skip
