"""Follow each RUNNING trainer's log stream and hand its reports to the controller.

Why a stream per running trainer (see docs/progress-protocol.md): trainer pods hold no Kubernetes API rights (no
service-account token), so their log is the channel. Following it costs one long-lived connection per running
trainer and nothing per interval: the kubelet pushes each line as it is written. Pending and finished jobs have no
stream at all. A stream that breaks is reopened by the next reconcile of its job (with a tail, and reports already
seen are dropped by their sequence number).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client

from finetune_api.reports import MARKER, Report, parse_reports

log = logging.getLogger(__name__)

# (uid, pod, report) for each report; (uid, pod) when a stream ends by itself (not when stopped).
OnReport = Callable[[str, str, Report], None]
OnEnd = Callable[[str, str], None]

READ_TIMEOUT_S = 600.0  # a trainer that prints nothing for this long gets its stream reopened


@dataclass
class _Stream:
    uid: str
    namespace: str
    pod: str
    thread: threading.Thread | None = None
    response: Any = None
    stopped: bool = False
    started: float = field(default_factory=time.monotonic)


class LogFollower:
    def __init__(self, api: client.ApiClient, on_report: OnReport, on_end: OnEnd, tail_lines: int) -> None:
        self.core = client.CoreV1Api(api)
        self.on_report, self.on_end, self.tail_lines = on_report, on_end, tail_lines
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._lock = threading.Lock()

    def active(self, namespace: str, pod: str) -> bool:
        with self._lock:
            return (namespace, pod) in self._streams

    def count(self) -> int:
        with self._lock:
            return len(self._streams)

    def follow(self, uid: str, namespace: str, pod: str) -> None:
        with self._lock:
            if (namespace, pod) in self._streams:
                return
            stream = _Stream(uid, namespace, pod)
            self._streams[(namespace, pod)] = stream
        stream.thread = threading.Thread(target=self._run, args=(stream,), name=f"log-{namespace}/{pod}", daemon=True)
        stream.thread.start()

    def stop(self, namespace: str, pod: str) -> None:
        with self._lock:
            stream = self._streams.pop((namespace, pod), None)
        if stream is not None:
            stream.stopped = True
            _close(stream.response)

    def stop_all(self) -> None:
        with self._lock:
            keys = list(self._streams)
        for ns, pod in keys:
            self.stop(ns, pod)

    def _run(self, s: _Stream) -> None:
        try:
            s.response = self.core.read_namespaced_pod_log(
                s.pod,
                s.namespace,
                container="trainer",
                follow=True,
                tail_lines=self.tail_lines,
                _preload_content=False,
                _request_timeout=(10, READ_TIMEOUT_S),
            )
            if s.stopped:
                return
            pending = b""
            for chunk in s.response.stream(8192, decode_content=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                # A report whose newline has not arrived yet is complete once it parses; its seq drops the
                # second copy when the newline comes.
                self._emit(s, [*lines, pending] if pending.rstrip().endswith(b"}") else lines)
            self._emit(s, [pending])
        except Exception as exc:  # a broken or refused stream; the next reconcile reopens it if still running
            if not s.stopped:
                log.debug("log stream of %s/%s ended: %s", s.namespace, s.pod, exc)
        finally:
            _close(s.response)
            with self._lock:
                if self._streams.get((s.namespace, s.pod)) is s:
                    del self._streams[(s.namespace, s.pod)]
            if not s.stopped:
                self.on_end(s.uid, s.pod)

    def _emit(self, s: _Stream, lines: list[bytes]) -> None:
        marker = MARKER.encode()
        text = [line.decode(errors="replace") for line in lines if marker in line]
        for report in parse_reports(text):
            self.on_report(s.uid, s.pod, report)


def _close(response: Any) -> None:
    """Close a streaming response, waking a thread blocked reading it (shutdown does; close alone may not)."""
    if response is None:
        return
    sock = getattr(getattr(response, "connection", None), "sock", None)
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        response.close()
        response.release_conn()
    except Exception:  # closing a half-dead connection may raise; it is gone either way
        pass
