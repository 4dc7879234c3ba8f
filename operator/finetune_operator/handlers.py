"""kopf registration: watch streams in, the controller's work queue out. No decisions here.

- FineTuneJobs, trainer Jobs and trainer pods are watched; Jobs and pods with a server-side label selector, so the
  operator never sees the cluster's other pods. kopf keeps Jobs and pods in indexes, and holds every handler back
  until all three initial listings are complete, so the first decision after a restart sees the whole world.
- Only `on.event` handlers: kopf stores nothing on the objects (no last-handled-configuration annotation, which
  breaks on large specs, and no finalizer: deleting a FineTuneJob or its namespace never waits for the operator,
  and removing the operator strands nothing). A finalizer left by an older version is removed by kopf.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf
from kopf._core.intents.filters import MetaFilterToken

from finetune_api.spec import API_GROUP, API_VERSION, PLURAL
from finetune_operator import kube
from finetune_operator.builders import LABEL_COMPONENT, LABEL_MANAGED_BY, LABEL_UID, MANAGER
from finetune_operator.config import load_config
from finetune_operator.controller import Controller
from finetune_operator.logfollow import LogFollower
from finetune_operator.observe import JobView, PodView, job_view, pod_view

OLD_FINALIZER = "finetune.dev/cleanup"  # added by versions before 0.2; kopf removes it now that nothing needs it
CHILD_LABELS: dict[str, str | MetaFilterToken] = {LABEL_MANAGED_BY: MANAGER, LABEL_UID: kopf.PRESENT}
POD_COMPONENTS = ("trainer", "preflight")  # the notifier's pod is watched by nobody: its Job says enough


def _pod_component(value: str | None, **_: Any) -> bool:
    return value in POD_COMPONENTS


POD_LABELS: dict[str, Any] = {**CHILD_LABELS, LABEL_COMPONENT: _pod_component}

CONTROLLER: Controller | None = None


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, **_: Any) -> None:
    global CONTROLLER
    cfg = load_config()
    kube.load_client_config()
    settings.persistence.finalizer = OLD_FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="finetune.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="finetune.dev", key="last-handled-configuration"
    )
    settings.watching.label_selectors["batch", "v1", "jobs"] = f"{LABEL_MANAGED_BY}={MANAGER}"
    settings.watching.label_selectors["v1", "pods"] = (
        f"{LABEL_MANAGED_BY}={MANAGER},{LABEL_COMPONENT} in ({','.join(POD_COMPONENTS)})"
    )
    # Only the Job controller's "could not create a pod" events (quota), not the cluster's event stream.
    settings.watching.field_selectors["v1", "events"] = "involvedObject.kind=Job,reason=FailedCreate"
    settings.posting.level = logging.WARNING  # our own Events carry the milestones; not kopf's chatter
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    follower_api = kube.new_api_client(pool_size=1024)  # one streaming connection per running trainer

    def follower(**callbacks: Any) -> LogFollower:
        return LogFollower(follower_api, tail_lines=cfg.log_tail_lines, **callbacks)

    client = kube.Kube(kube.new_api_client(pool_size=32))
    CONTROLLER = Controller(cfg, client, follower)
    CONTROLLER.pod_failure_policy = client.server_version() >= (1, 26)
    CONTROLLER.start()
    port = os.environ.get("FINETUNE_METRICS_PORT")
    if port:  # Prometheus metrics (see metrics.py); the chart sets the port and adds a Service
        CONTROLLER.metrics.serve(int(port))


@kopf.on.cleanup()
async def stop(**_: Any) -> None:
    if CONTROLLER is not None:
        await CONTROLLER.stop()


@kopf.index("batch", "v1", "jobs", labels=CHILD_LABELS)
def trainer_jobs(body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, JobView]:
    return {labels[LABEL_UID]: job_view(body)}


@kopf.index("v1", "pods", labels=POD_LABELS)
def trainer_pods(body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, PodView]:
    return {labels[LABEL_UID]: pod_view(body)}


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)  # type: ignore[arg-type]  # kopf adds the index kwargs
async def finetunejob_changed(
    type: str,
    body: kopf.Body,
    trainer_jobs: kopf.Index[str, JobView],
    trainer_pods: kopf.Index[str, PodView],
    **_: Any,
) -> None:
    if CONTROLLER is not None:
        CONTROLLER.bind_indexes(trainer_pods, trainer_jobs)
        CONTROLLER.ftj_event(type, body)


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
async def trainer_job_changed(type: str, labels: kopf.Labels, name: str, namespace: str | None, **_: Any) -> None:
    if CONTROLLER is not None:
        CONTROLLER.child_event(labels.get(LABEL_UID), job=(namespace or "", name), gone=type == "DELETED")


@kopf.on.event("v1", "events")
async def job_event(body: kopf.Body, type: str, **_: Any) -> None:
    involved = body.get("involvedObject") or {}
    if CONTROLLER is not None and type != "DELETED" and involved.get("kind") == "Job":
        CONTROLLER.pod_creation_failed(
            involved.get("namespace", ""), involved.get("name", ""), str(body.get("message") or "")
        )


@kopf.on.event("v1", "resourcequotas")
async def quota_changed(namespace: str | None, **_: Any) -> None:
    if CONTROLLER is not None and namespace:
        CONTROLLER.quota_changed(namespace)


@kopf.on.event("v1", "pods", labels=POD_LABELS)
async def trainer_pod_changed(labels: kopf.Labels, **_: Any) -> None:
    if CONTROLLER is not None:
        CONTROLLER.child_event(labels.get(LABEL_UID))
