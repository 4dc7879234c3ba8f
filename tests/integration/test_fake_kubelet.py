"""The fake kubelet log endpoint behind the REAL apiserver's pods/log proxy: what the operator and the benchmark
rely on when they follow a trainer's log (`follow=true`, `tailLines`, `sinceSeconds`, `timestamps`, `limitBytes`)."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from tests.integration.operator_harness import FakeKubeletLogs, register_fake_node

pytestmark = pytest.mark.integration

NODE = "fake-kubelet-follow"  # each module owns its node


@pytest.fixture(scope="module")
def fake(kube_api: Any) -> Iterator[FakeKubeletLogs]:
    logs = FakeKubeletLogs()
    register_fake_node(kube_api, NODE, logs)
    yield logs
    logs.close()


@pytest.fixture
def pod(kube_api: Any, namespace: str) -> str:
    core = client.CoreV1Api(kube_api)
    body = {
        "metadata": {"name": "trainer-x"},
        "spec": {"nodeName": NODE, "containers": [{"name": "trainer", "image": "finetune-trainer:test"}]},
    }
    core.create_namespaced_pod(namespace, body)
    return "trainer-x"


def follow(kube_api: Any, ns: str, pod: str, **kw: Any) -> tuple[Any, queue.Queue[str | None]]:
    """Follow the log through the apiserver; every chunk received goes to the queue, None at the end."""
    resp = client.CoreV1Api(kube_api).read_namespaced_pod_log(
        pod, ns, container="trainer", follow=True, _preload_content=False, **kw
    )
    chunks: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        try:
            for chunk in resp.stream(1024, decode_content=False):
                chunks.put(chunk.decode())
        except Exception:  # the test closed the stream under the reader: that ends it too
            pass
        finally:
            chunks.put(None)

    threading.Thread(target=read, daemon=True).start()
    return resp, chunks


def received_until(chunks: queue.Queue[str | None], want: str, timeout: float) -> str:
    got, deadline = "", time.monotonic() + timeout
    while want not in got:
        got += chunks.get(timeout=max(0.01, deadline - time.monotonic())) or ""
    return got


def test_follow_streams_appended_lines_promptly_and_ends_when_the_log_closes(
    kube_api: Any, fake: FakeKubeletLogs, namespace: str, pod: str
) -> None:
    fake.logs[(namespace, pod)] = "one\ntwo\n"  # the dict interface the other tests use keeps working
    resp, chunks = follow(kube_api, namespace, pod, tail_lines=1)
    assert received_until(chunks, "two\n", 10) == "two\n"  # tailLines=1: only the last line of what was there
    for i in range(5):
        t0 = time.monotonic()
        fake.append(namespace, pod, f"step {i}\n")
        assert received_until(chunks, f"step {i}\n", 5) == f"step {i}\n"
        assert time.monotonic() - t0 < 1.0, "an appended line must reach a follower at once, not on a poll"
    fake.logs[(namespace, pod)] += "last\n"
    assert received_until(chunks, "last\n", 5) == "last\n"
    fake.close_log(namespace, pod)
    assert chunks.get(timeout=5) is None  # the stream ends when the container's log does
    resp.release_conn()


def test_plain_reads_tail_since_time_and_timestamps(
    kube_api: Any, fake: FakeKubeletLogs, namespace: str, pod: str
) -> None:
    core = client.CoreV1Api(kube_api)
    fake.append(namespace, pod, "old 1\nold 2\n")
    time.sleep(1.1)
    fake.append(namespace, pod, "new 1\nnew 2\n")
    assert core.read_namespaced_pod_log(pod, namespace, container="trainer") == "old 1\nold 2\nnew 1\nnew 2\n"
    assert core.read_namespaced_pod_log(pod, namespace, container="trainer", tail_lines=3) == "old 2\nnew 1\nnew 2\n"
    assert core.read_namespaced_pod_log(pod, namespace, container="trainer", since_seconds=1) == "new 1\nnew 2\n"
    stamped = core.read_namespaced_pod_log(pod, namespace, container="trainer", timestamps=True).splitlines()
    stamps = [line.split(" ", 1)[0] for line in stamped]
    assert [line.split(" ", 1)[1] for line in stamped] == ["old 1", "old 2", "new 1", "new 2"]
    assert stamps[0] == stamps[1] < stamps[2] == stamps[3]  # one write, one time; RFC 3339 sorts as text
    resp = core.read_namespaced_pod_log(
        pod, namespace, container="trainer", _preload_content=False, _request_timeout=10, limit_bytes=5
    )
    assert resp.data == b"old 1"


def test_follower_that_disconnects_is_released(kube_api: Any, fake: FakeKubeletLogs, namespace: str, pod: str) -> None:
    fake.append(namespace, pod, "hello\n")
    before = threading.active_count()
    resp, chunks = follow(kube_api, namespace, pod)
    assert received_until(chunks, "hello\n", 10) == "hello\n"
    assert threading.active_count() > before  # a handler thread in the fake kubelet (and our reader) serve it
    # The client goes away; the apiserver closes its side to the kubelet. Shut the socket down first: a plain
    # close() can block on the reader thread's buffer lock (the operator's log follower does the same).
    resp.connection.sock.shutdown(socket.SHUT_RDWR)
    resp.close()
    deadline = time.monotonic() + 10
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert threading.active_count() <= before, "the fake kubelet kept serving a follower that left"
