"""`python -m finetune_operator.notify`: POST a job's verdict to a webhook, then exit.

Runs in a short-lived pod that the operator creates once per terminal phase (spec.notification). The URL comes
from the tenant's Secret as an environment variable (secretKeyRef): the operator never reads Secrets, and the
URL (which often carries a token) is never printed. The payload (NOTIFY_PAYLOAD, JSON) is documented in
docs/notifications.md. Delivery is retried with exponential backoff and jitter on connection errors, 429 and 5xx;
any other 4xx is final (exit 2) since repeating the same request cannot succeed.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from finetune_api.status import FineTuneJobStatus

ATTEMPTS = 6
TIMEOUT_S = 10.0


def payload(namespace: str, name: str, uid: str, status: FineTuneJobStatus) -> dict[str, Any]:
    """The document a webhook receives (stable; see docs/notifications.md)."""
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJobNotification",
        "job": {"namespace": namespace, "name": name, "uid": uid},
        "phase": status.phase,
        "reason": status.reason,
        "message": status.message,
        "metrics": dict(status.metrics),
        "output": status.output.uri if status.output else None,
        "manifest": status.output.manifest if status.output else None,
        "attempts": status.attempts,
        "startTime": status.start_time,
        "completionTime": status.completion_time,
    }


def deliver(url: str, body: bytes, attempts: int = ATTEMPTS, base_delay: float = 1.0) -> tuple[bool, str]:
    """(delivered, what happened) after at most `attempts` tries."""
    last = ""
    for attempt in range(attempts):
        request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return True, f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
            if exc.code != 429 and exc.code < 500:
                return False, f"{last}: the webhook refused the notification"
        except (urllib.error.URLError, OSError) as exc:
            last = f"unreachable ({getattr(exc, 'reason', exc)})"
        if attempt + 1 < attempts:
            time.sleep(base_delay * 2**attempt * (0.5 + random.random()))
    return False, f"gave up after {attempts} attempts: {last}"


def main() -> int:
    url, body = os.environ.get("NOTIFY_URL", ""), os.environ.get("NOTIFY_PAYLOAD", "{}").encode()
    if not url.startswith(("http://", "https://")):
        print("notification: the Secret's value is not an http(s) URL", file=sys.stderr)
        return 2
    doc = json.loads(body)
    ok, what = deliver(url, body)
    print(f"notification for {doc.get('job', {}).get('name')} ({doc.get('phase')}): {what}")
    return 0 if ok else (2 if "refused" in what else 1)


if __name__ == "__main__":
    sys.exit(main())
