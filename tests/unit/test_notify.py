"""The completion notification: payload, delivery with retries, and the pod that sends it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from finetune_api.status import FineTuneJobStatus, OutputRecord
from finetune_operator.notify import deliver, payload
from finetune_operator.observe import Observation
from finetune_operator.reconcile import CreateNotifier, notify
from tests.unit.test_reconcile import REF, SPEC, job, run


class Hook:
    """A real HTTP endpoint on loopback that answers with the given status codes in turn."""

    def __init__(self, codes: list[int]) -> None:
        self.codes, self.bodies = list(codes), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                code = outer.codes.pop(0) if outer.codes else 200
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=secret-token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def hook_factory() -> Iterator[Any]:
    made: list[Hook] = []

    def make(codes: list[int]) -> Hook:
        made.append(Hook(codes))
        return made[-1]

    yield make
    for h in made:
        h.server.shutdown()


def test_delivery_retries_throttling_and_server_errors(hook_factory: Any) -> None:
    hook = hook_factory([503, 429, 200])
    ok, what = deliver(hook.url, b'{"phase":"Succeeded"}', base_delay=0.01)
    assert ok and what == "HTTP 200" and len(hook.bodies) == 3


def test_a_refusal_is_final_and_a_dead_endpoint_gives_up(hook_factory: Any) -> None:
    hook = hook_factory([404])
    ok, what = deliver(hook.url, b"{}", base_delay=0.01)
    assert not ok and "refused" in what and len(hook.bodies) == 1
    ok, what = deliver("http://127.0.0.1:9/x", b"{}", attempts=2, base_delay=0.01)
    assert not ok and "gave up after 2 attempts" in what


def test_the_notifier_module_posts_the_payload_and_never_prints_the_url(hook_factory: Any) -> None:
    hook = hook_factory([])
    status = FineTuneJobStatus(
        phase="Succeeded", reason="Completed", message="done", output=OutputRecord(uri="s3://o/m/"), metrics={"a": 1}
    )
    doc = payload("team-a", "qa", "uid-1", status)
    env = {"NOTIFY_URL": hook.url, "NOTIFY_PAYLOAD": json.dumps(doc), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_operator.notify"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "secret-token" not in proc.stdout + proc.stderr
    got = json.loads(hook.bodies[0])
    assert got["job"] == {"namespace": "team-a", "name": "qa", "uid": "uid-1"}
    assert (got["phase"], got["output"], got["metrics"]) == ("Succeeded", "s3://o/m/", {"a": 1})


def test_each_terminal_phase_is_notified_once_through_a_secret_ref() -> None:
    spec = {**SPEC, "notification": {"webhook": {"name": "hooks", "key": "slack"}}}
    done = job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    first = run(spec, status=run(spec).status.dump(), obs=Observation(job=done))
    d = notify(first, REF, spec, "op:1", "IfNotPresent")
    sent = [a for a in d.actions if isinstance(a, CreateNotifier)]
    assert len(sent) == 1 and d.status.notified == "Succeeded"
    env = {e["name"]: e for e in sent[0].job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NOTIFY_URL"]["valueFrom"]["secretKeyRef"] == {"name": "hooks", "key": "slack"}
    assert json.loads(env["NOTIFY_PAYLOAD"]["value"])["phase"] == "Succeeded"
    assert sent[0].job["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    again = run(spec, status=d.status.dump(), obs=Observation(job=done))
    assert not [a for a in notify(again, REF, spec, "op:1", "Never").actions if isinstance(a, CreateNotifier)]
    plain = run(status=run().status.dump(), obs=Observation(job=done))
    assert not [a for a in notify(plain, REF, SPEC, "op:1", "Never").actions if isinstance(a, CreateNotifier)]
