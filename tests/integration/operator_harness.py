"""Helpers for driving the real operator against the real control plane.

No kubelet runs in this tier, so tests play the kubelet's part through the API, as envtest-based suites do:
they bind trainer pods to a registered Node and write pod status. For pod *logs* (how the trainer reports
progress) the apiserver proxies to the node's kubelet endpoint; `FakeKubeletLogs` serves only that one
endpoint (`/containerLogs/...`) over HTTPS on loopback. It is the one stand-in here, for a kubelet that
cannot run in this tier; the e2e tier runs a real kubelet.
"""

from __future__ import annotations

import bisect
import copy
import os
import select
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from kubernetes import client

REPO = Path(__file__).resolve().parents[2]

# The platform defaults every operator in these tests (and the benchmark) runs with: trainer pods that fit a CPU-only
# node, and the platform's S3 endpoint (a job may not name its own: that is policy).
TEST_PLATFORM_DEFAULTS: dict[str, Any] = {
    "image": "finetune-trainer:test",
    "imagePullPolicy": "Never",
    "gpus": 0,
    "cpu": "1",
    "memory": "1Gi",
    "storageEndpoint": "http://198.18.0.1:9000",
}
# The operator's own tiers (fake kubelet) play the trainer pod; tests/integration/test_preflight.py and the e2e
# tier cover the preflight pod, which these settings switch off.
NO_PREFLIGHT: dict[str, Any] = {"enabled": False}
# A valid instruction-tuning job; tests copy it (copy.deepcopy) and change what they need.
VALID_SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/tiny-gpt2/"},
    "task": "instruction",
    "dataset": {
        "train": "s3://data/qa.jsonl",
        "template": {"prompt": "### Question:\n{question}\n### Answer:\n", "response": "{answer}"},
    },
    "method": {"type": "lora"},
    "output": {"uri": "s3://out/job/"},
    "storage": {"secretRef": {"name": "s3-credentials"}},
}


def valid_spec(**top_level: Any) -> dict[str, Any]:
    """A fresh copy of VALID_SPEC with top-level fields replaced (e.g. runPolicy={"backoffLimit": 1})."""
    return {**copy.deepcopy(VALID_SPEC), **copy.deepcopy(top_level)}


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

    def __init__(self, kubeconfig: str, config: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.env = dict(env or {})
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
            **self.env,
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


class _PodLog:
    """One container log: its append history (for sinceTime/timestamps) and whether the container ended."""

    def __init__(self, lock: threading.Lock) -> None:
        self.marks: list[tuple[int, float]] = []  # (offset where a write started, wall-clock time of the write)
        self.closed = False
        self.changed = threading.Condition(lock)  # shares the store's lock; wakes only this log's followers


class _LogStore(dict[tuple[str, str], str]):
    """`fake.logs[(ns, pod)] = text` (and `+=`) as a plain dict; every write also wakes that log's followers.

    A write that extends the current text is an append; any other write replaces the text (followers then go on
    from the same offset, or from the new end if it is shorter: real container logs only grow).
    """

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.state: dict[tuple[str, str], _PodLog] = {}
        self.closing = False

    def pod_log(self, key: tuple[str, str]) -> _PodLog:
        """The state of `key` (call with `lock` held)."""
        if key not in self.state:
            self.state[key] = _PodLog(self.lock)
        return self.state[key]

    def __setitem__(self, key: tuple[str, str], value: str) -> None:
        with self.lock:
            old = dict.get(self, key)
            super().__setitem__(key, value)
            log = self.pod_log(key)
            if old is not None and value.startswith(old):
                if len(value) > len(old):
                    log.marks.append((len(old), time.time()))
            else:
                log.marks = [(0, time.time())]
            log.changed.notify_all()

    def __delitem__(self, key: tuple[str, str]) -> None:
        with self.lock:
            super().__delitem__(key)
            log = self.state.pop(key, None)
            if log is not None:
                log.closed = True
                log.changed.notify_all()


def _rfc3339_nano(ts: float) -> str:
    whole = int(ts)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((ts - whole) * 1e9):09d}Z"


def _parse_rfc3339(value: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class FakeKubeletLogs:
    """Serves `/containerLogs/<ns>/<pod>/<container>` over HTTPS so `kubectl logs` works without a kubelet.

    Query parameters as the kubelet reads them: `follow=true` streams the current text and then every appended
    line as it arrives (chunked, one chunk per line) until `close_log` (the container ended), the client goes
    away or `close()`; `tailLines=N`, `sinceSeconds`, `sinceTime` (RFC 3339; lines written at or after it),
    `timestamps=true` (each line prefixed with its write time, RFC 3339 with nanoseconds) and `limitBytes`.
    The container name is not checked (a trainer pod has one). Writes: `append(ns, pod, text)` (thread-safe) or
    `logs[(ns, pod)] = text`.
    """

    def __init__(self) -> None:
        self.logs = _LogStore()
        store = self.logs

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # chunked transfer for follow; keep-alive otherwise

            def _reply(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                if len(parts) < 3 or parts[0] != "containerLogs":
                    self._reply(404, b"not found")
                    return
                key = (parts[1], parts[2])
                try:
                    tail = int(query["tailLines"]) if "tailLines" in query else None
                    limit = int(query["limitBytes"]) if "limitBytes" in query else None
                    since = (
                        _parse_rfc3339(query["sinceTime"])
                        if "sinceTime" in query
                        else time.time() - int(query["sinceSeconds"])
                        if "sinceSeconds" in query
                        else None
                    )
                except ValueError as exc:
                    self._reply(400, f"bad query: {exc}".encode())
                    return
                stamps = query.get("timestamps") == "true"
                with store.lock:
                    if key not in store:
                        text = None
                    else:
                        text = dict.__getitem__(store, key)
                        log = store.pod_log(key)
                        marks = list(log.marks)
                        start = _start_offset(text, marks, since, tail)
                if text is None:
                    self._reply(404, f'container log of pod "{key[1]}" in "{key[0]}" not found'.encode())
                    return
                if query.get("follow") != "true":
                    body = _render(text, start, len(text), marks, stamps, at_line_start=True).encode()
                    self._reply(200, body[:limit] if limit is not None else body)
                    return
                self._follow(key, log, start, stamps, limit)

            def _follow(self, key: tuple[str, str], log: _PodLog, pos: int, stamps: bool, limit: int | None) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
                self.close_connection = True
                at_line_start, sent = True, 0
                while True:
                    with store.lock:
                        text = dict.get(store, key, "")
                        pos = min(pos, len(text))
                        while len(text) == pos and not (log.closed or store.closing):
                            if not log.changed.wait(timeout=1.0) and self._client_gone():
                                return
                            text = dict.get(store, key, "")
                            pos = min(pos, len(text))
                        out = _render(text, pos, len(text), log.marks, stamps, at_line_start)
                        at_line_start = text.endswith("\n")
                        pos, done = len(text), log.closed or store.closing
                    try:
                        for line in out.splitlines(keepends=True):
                            data = line.encode()
                            if limit is not None:
                                data = data[: max(0, limit - sent)]
                            if data:
                                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                                self.wfile.flush()
                                sent += len(data)
                        if done or (limit is not None and sent >= limit):
                            self.wfile.write(b"0\r\n\r\n")
                            self.wfile.flush()
                            return
                    except (OSError, ssl.SSLError):
                        return  # the client went away

            def _client_gone(self) -> bool:
                """While idle nothing should arrive from the client: readable means it closed the connection."""
                try:
                    readable, _, _ = select.select([self.connection], [], [], 0)
                except (OSError, ValueError):
                    return True
                return bool(readable)

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
        self.server.request_queue_size = 1024
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certdir / "cert.pem", certdir / "key.pem")
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def append(self, ns: str, pod: str, text: str) -> None:
        """Append to a container's log (creating it); followers get the new lines at once. Thread-safe."""
        key = (ns, pod)
        with self.logs.lock:
            old = dict.get(self.logs, key)
            dict.__setitem__(self.logs, key, (old or "") + text)
            log = self.logs.pod_log(key)
            if old is None:
                log.marks = [(0, time.time())]
            elif text:
                log.marks.append((len(old), time.time()))
            log.changed.notify_all()

    def close_log(self, ns: str, pod: str) -> None:
        """The container ended: followers get what is left and then the end of the stream."""
        with self.logs.lock:
            log = self.logs.pod_log((ns, pod))
            log.closed = True
            log.changed.notify_all()

    def close(self) -> None:
        with self.logs.lock:
            self.logs.closing = True
            for log in self.logs.state.values():
                log.changed.notify_all()
        self.server.shutdown()
        self.server.server_close()


def _start_offset(text: str, marks: list[tuple[int, float]], since: float | None, tail: int | None) -> int:
    """Where a read starts: the first write at or after `since`, then at most `tail` lines before the end."""
    start = 0
    if since is not None:
        start = next((offset for offset, ts in marks if ts >= since), len(text))
    if tail is not None:
        if tail <= 0:
            return len(text)
        end = len(text) - 1 if text.endswith("\n") else len(text)  # a final newline ends the last line
        cut = end
        for _ in range(tail):
            cut = text.rfind("\n", start, cut)
            if cut < 0:
                return start
        start = max(start, cut + 1)
    return start


def _render(text: str, start: int, end: int, marks: list[tuple[int, float]], stamps: bool, at_line_start: bool) -> str:
    """text[start:end], each line prefixed with the time of the write it began in when `stamps`."""
    if not stamps:
        return text[start:end]
    out, pos, fresh = [], start, at_line_start
    offsets = [m[0] for m in marks]
    while pos < end:
        nl = text.find("\n", pos, end)
        stop = end if nl < 0 else nl + 1
        if fresh:
            idx = max(0, bisect.bisect_right(offsets, pos) - 1)
            out.append(_rfc3339_nano(marks[idx][1] if marks else time.time()) + " ")
        out.append(text[pos:stop])
        fresh, pos = nl >= 0, stop
    return "".join(out)


def install_crd(kube_api: Any) -> None:
    """kubectl apply the generated CRD and wait until the apiserver serves it and publishes its schema."""
    from tests.kubectl import kubectl_path

    kubectl = kubectl_path()  # the cluster's own version, never the host's
    subprocess.run([kubectl, "apply", "-f", str(REPO / "manifests" / "crd.yaml")], check=True, capture_output=True)
    ext: Any = client.ApiextensionsV1Api(kube_api)

    def established() -> bool:
        conds = ext.read_custom_resource_definition(CRD_NAME).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conds)

    wait_for("CRD established", established)

    # /openapi/v2 (what `kubectl explain` reads) gets the schema a few seconds after Established.
    def published() -> bool:
        probe = [kubectl, "explain", "finetunejobs.spec.dataset"]
        return subprocess.run(probe, capture_output=True, timeout=30, check=False).returncode == 0

    wait_for("the CRD's schema in /openapi/v2", published, timeout=60, interval=0.5)


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


@contextmanager
def running_operator(
    control_plane: Any, kube_api: Any, config: dict[str, Any], env: dict[str, str] | None = None
) -> Iterator[OperatorProcess]:
    """The CRD installed and the operator running with `config` (a module's own platform policy); stopped after."""
    install_crd(kube_api)
    op = OperatorProcess(control_plane.kubeconfig, config, env=env)
    op.start()
    try:
        yield op
    finally:
        op.stop()


@contextmanager
def fake_node(kube_api: Any, name: str) -> Iterator[FakeKubeletLogs]:
    """A Node whose kubelet the test plays (its log endpoint is a FakeKubeletLogs); the Node is deleted after."""
    fake = FakeKubeletLogs()
    register_fake_node(kube_api, name, fake)
    try:
        yield fake
    finally:
        fake.close()
        client.CoreV1Api(kube_api).delete_node(name)
