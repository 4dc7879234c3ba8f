"""Thin, idempotent calls to the Kubernetes API (the kubernetes client), used by the handlers."""

from __future__ import annotations

import logging
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from finetune_operator.builders import LABEL_COMPONENT, LABEL_UID
from finetune_operator.observe import Observation, PodView, pod_view, reports_from_text

log = logging.getLogger(__name__)


def load_client_config() -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def _api() -> client.ApiClient:
    return client.ApiClient()


def ensure(manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Create the object unless one of that name exists. Returns (object, created).

    Deterministic names make this safe to repeat: a second call (a retried handler, a restarted operator)
    finds the first object instead of making a duplicate.
    """
    kind, ns, name = manifest["kind"], manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    api = _api()
    obj: Any
    try:
        if kind == "ConfigMap":
            obj = client.CoreV1Api(api).create_namespaced_config_map(ns, manifest)  # type: ignore[arg-type]
        elif kind == "Job":
            obj = client.BatchV1Api(api).create_namespaced_job(ns, manifest)  # type: ignore[arg-type]
        else:  # pragma: no cover - only the two kinds above are built
            raise ValueError(kind)
        return api.sanitize_for_serialization(obj), True
    except ApiException as exc:
        if exc.status != 409:
            raise
    existing = read(kind, ns, name)
    assert existing is not None
    return existing, False


def read(kind: str, ns: str, name: str) -> dict[str, Any] | None:
    api = _api()
    obj: Any
    try:
        if kind == "ConfigMap":
            obj = client.CoreV1Api(api).read_namespaced_config_map(name, ns)
        else:
            obj = client.BatchV1Api(api).read_namespaced_job(name, ns)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    result: dict[str, Any] = api.sanitize_for_serialization(obj)
    return result


def replace_config_map_data(ns: str, name: str, data: dict[str, str]) -> None:
    client.CoreV1Api(_api()).patch_namespaced_config_map(name, ns, {"data": data})


def delete_job(ns: str, name: str) -> bool:
    """Delete the trainer Job and (in the background) its pods. False when it was already gone."""
    try:
        client.BatchV1Api(_api()).delete_namespaced_job(
            name, ns, body=client.V1DeleteOptions(propagation_policy="Background")
        )
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def stop_job(ns: str, name: str) -> None:
    """Stop retries but keep the Job and its pods (and their logs) for inspection: parallelism 0."""
    try:
        client.BatchV1Api(_api()).patch_namespaced_job(name, ns, {"spec": {"parallelism": 0}})
    except ApiException as exc:
        if exc.status != 404:
            raise


def observe(ns: str, job_name: str, job_uid: str, workload: str, tail_lines: int) -> Observation:
    """Read the Job, its pods and the newest pod's trainer reports."""
    api = _api()
    job = read("Job", ns, workload)
    core = client.CoreV1Api(api)
    selector = f"{LABEL_UID}={job_uid},{LABEL_COMPONENT}=trainer"
    raw = core.list_namespaced_pod(ns, label_selector=selector).items
    pods: list[PodView] = sorted(
        (pod_view(api.sanitize_for_serialization(p)) for p in raw), key=lambda p: (p.created, p.name)
    )
    reports = []
    newest = pods[-1] if pods else None
    if newest is not None and newest.phase in ("Running", "Succeeded", "Failed"):
        try:
            text = core.read_namespaced_pod_log(newest.name, ns, container="trainer", tail_lines=tail_lines)
            reports = reports_from_text(text)
        except ApiException as exc:  # logs can be briefly unavailable while a container starts or is removed
            log.debug("no log for %s/%s yet: %s", ns, newest.name, exc.reason)
    return Observation(job=job, pods=pods, reports=reports)
