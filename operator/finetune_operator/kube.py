"""Thin, idempotent calls to the Kubernetes API (the kubernetes client). Blocking: the controller runs them in a
thread pool, never on kopf's event loop."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from finetune_api.spec import API_GROUP, API_VERSION, KIND, PLURAL

log = logging.getLogger(__name__)

# 4xx answers that no retry can change: the object itself is unacceptable (too long, too large, invalid).
REJECTED_STATUSES = frozenset({400, 413, 422})


def load_client_config() -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def new_api_client(pool_size: int) -> client.ApiClient:
    cfg = client.Configuration.get_default_copy()
    cfg.connection_pool_maxsize = pool_size
    return client.ApiClient(cfg)


def api_message(exc: ApiException) -> str:
    """The API server's own explanation (its Status.message), not the HTTP boilerplate around it."""
    import json

    try:
        body = json.loads(exc.body or "{}")
        return str(body.get("message") or exc.reason)
    except ValueError:
        return str(exc.body or exc.reason)[:1000]


class Kube:
    """The operator's writes and its few reads. Every call is safe to repeat."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def server_version(self) -> tuple[int, int]:
        """(major, minor) of the API server, e.g. (1, 20); GKE-style minors like "26+" are read as 26."""
        info = client.VersionApi(self.api).get_code()
        digits = "".join(c for c in str(info.minor) if c.isdigit()) or "0"
        return int(info.major), int(digits)

    def create(self, manifest: dict[str, Any]) -> bool:
        """Create the object unless one of that name exists. True when this call created it.

        Deterministic names make this safe to repeat: a second call (a retried reconcile, a restarted operator)
        finds the first object instead of making a duplicate.
        """
        ns = manifest["metadata"]["namespace"]
        try:
            if manifest["kind"] == "ConfigMap":
                self.core.create_namespaced_config_map(ns, manifest, _preload_content=False)  # type: ignore[arg-type]
            elif manifest["kind"] == "Job":
                self.batch.create_namespaced_job(ns, manifest, _preload_content=False)  # type: ignore[arg-type]
            else:  # pragma: no cover - only the two kinds above are built
                raise ValueError(manifest["kind"])
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise

    def replace_config_map_data(self, ns: str, name: str, data: dict[str, str]) -> None:
        self.core.patch_namespaced_config_map(name, ns, {"data": data}, _preload_content=False)

    def delete_job(self, ns: str, name: str) -> bool:
        """Delete the trainer Job and (in the background) its pods. False when it was already gone."""
        try:
            self.batch.delete_namespaced_job(
                name, ns, body=client.V1DeleteOptions(propagation_policy="Background"), _preload_content=False
            )
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def stop_job(self, ns: str, name: str) -> None:
        """Stop retries but keep the Job and its pods (and their logs) for inspection: parallelism 0."""
        try:
            self.batch.patch_namespaced_job(name, ns, {"spec": {"parallelism": 0}}, _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def patch_status(self, ns: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the FineTuneJob's status subresource; None when the object is gone."""
        try:
            result: Any = self.custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, ns, PLURAL, name, {"status": status}
            )
            return dict(result)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def read_log(self, ns: str, pod: str, tail_lines: int) -> str:
        try:
            text: str = self.core.read_namespaced_pod_log(
                pod, ns, container="trainer", tail_lines=tail_lines, _request_timeout=30
            )
            return text
        except ApiException as exc:  # logs can be unavailable while a container starts or after the node is gone
            log.debug("no log for %s/%s: %s", ns, pod, exc.reason)
            return ""

    def post_event(self, ns: str, name: str, uid: str, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on the FineTuneJob, so `kubectl describe ftj` shows it."""
        now = dt.datetime.now(dt.UTC)
        body = {
            "metadata": {"name": f"{name[:200]}.{uuid.uuid4().hex[:16]}", "namespace": ns},
            "involvedObject": {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": KIND,
                "name": name,
                "namespace": ns,
                "uid": uid,
            },
            "type": type_,
            "reason": reason[:128],
            "message": message[:1024],
            "source": {"component": "finetune-operator"},
            "reportingComponent": "finetune.dev/operator",
            "reportingInstance": "finetune-operator",
            "firstTimestamp": now.isoformat(),
            "lastTimestamp": now.isoformat(),
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(ns, body, _preload_content=False)  # type: ignore[arg-type]
        except ApiException as exc:  # an event is best effort; the status carries the same reason
            log.warning("could not post event %s on %s/%s: %s", reason, ns, name, exc.reason)
