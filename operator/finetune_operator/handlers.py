"""kopf handlers: glue between the API server and the pure functions in validation/builders/observe."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import kopf

from finetune_api.spec import API_GROUP, API_VERSION, PLURAL, FineTuneJobSpec
from finetune_api.status import ConditionType, Phase
from finetune_operator import builders, kube
from finetune_operator.config import OperatorConfig, load_config
from finetune_operator.observe import compute_status, set_condition
from finetune_operator.validation import validate_spec

# Loaded at import: the timer's interval (pollSeconds) is fixed when the handlers are registered.
CONFIG: OperatorConfig = load_config()
TERMINAL = (Phase.SUCCEEDED.value, Phase.FAILED.value)


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    global CONFIG
    CONFIG = load_config()
    kube.load_client_config()
    # Keep kopf's bookkeeping in our own annotations, not in status (whose schema we own and prune).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="finetune.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="finetune.dev", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "finetune.dev/cleanup"
    # Only our own Events (validation failures, milestones) reach `kubectl describe`, not handler chatter.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60


def _normal_event(body: kopf.Body, reason: str, message: str) -> None:
    """A Normal Event. kopf.info would be dropped by the WARNING posting level that silences handler chatter."""
    kopf.event(body, type="Normal", reason=reason, message=message)


def _fail_validation(
    body: kopf.Body, status: dict[str, Any], generation: int | None, reason: str, message: str
) -> dict[str, Any]:
    ts = now()
    conds = set_condition(
        status.get("conditions") or [], ConditionType.VALIDATED, "False", reason, message, generation, ts
    )
    conds = set_condition(conds, ConditionType.FAILED, "True", reason, message, generation, ts)
    if status.get("reason") != reason or status.get("message") != message:
        kopf.warn(body, reason=reason, message=message)
    return {
        "phase": Phase.FAILED.value,
        "reason": reason,
        "message": message,
        "conditions": conds,
        "observedGeneration": generation,
        "completionTime": status.get("completionTime") or ts,
    }


def _create_workload(meta: dict[str, Any], spec: FineTuneJobSpec, body: kopf.Body) -> bool:
    """ConfigMap then Job, both adopted (ownerReferences) so deleting the FineTuneJob deletes them."""
    cm = builders.build_config_map(meta, spec)
    job = builders.build_workload(meta, spec, CONFIG.defaults.image_pull_policy)
    kopf.adopt(cm, owner=body)
    kopf.adopt(job, owner=body)
    existing_cm, created_cm = kube.ensure(cm)
    if not created_cm and existing_cm.get("data") != cm["data"]:
        # The spec changed since the config was written: the next attempt uses the new one.
        kube.replace_config_map_data(meta["namespace"], cm["metadata"]["name"], cm["data"])
    _, created = kube.ensure(job)
    return created


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL, retries=10, backoff=5, timeout=300)
@kopf.on.create(API_GROUP, API_VERSION, PLURAL, retries=10, backoff=5, timeout=300)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL, field="spec", retries=10, backoff=5, timeout=300)
def reconcile(
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    generation = meta.get("generation")
    current = dict(status)
    meta_d = {
        "name": meta["name"],
        "namespace": meta["namespace"],
        "uid": meta["uid"],
        "generation": generation,
    }
    if current.get("phase") in TERMINAL and (
        current.get("workload") or current.get("observedGeneration") == generation
    ):
        return  # finished jobs stay finished; a spec edit only revives a job that failed validation
    result = validate_spec(dict(spec), CONFIG.for_namespace(meta["namespace"]))
    if not result.ok or result.spec is None:
        logger.info("invalid FineTuneJob: %s", result.message)
        patch.status.update(_fail_validation(body, current, generation, result.reason, result.message))
        return
    resolved = result.spec
    ts = now()
    conds = set_condition(
        current.get("conditions") or [],
        ConditionType.VALIDATED,
        "True",
        "Valid",
        "spec is valid",
        generation,
        ts,
    )
    # A job that failed validation earlier and was fixed starts over.
    conds = [c for c in conds if c["type"] != ConditionType.FAILED]
    workload = builders.workload_name(meta["name"])
    if resolved.run_policy.suspend:
        if kube.delete_job(meta["namespace"], workload):
            _normal_event(
                body,
                reason="Suspended",
                message="trainer stopped; unsuspend to resume from the last checkpoint",
            )
        patch.status.update(
            {
                "phase": Phase.SUSPENDED.value,
                "reason": "Suspended",
                "message": "runPolicy.suspend is true; no trainer pod runs",
                "conditions": set_condition(
                    conds,
                    ConditionType.SUSPENDED,
                    "True",
                    "Suspended",
                    "runPolicy.suspend is true",
                    generation,
                    ts,
                ),
                "observedGeneration": generation,
                "workload": workload,
            }
        )
        return
    created = _create_workload(meta_d, resolved, body)
    if created:
        _normal_event(body, reason="WorkloadCreated", message=f"created Job {workload}")
    conds = set_condition(conds, ConditionType.WORKLOAD_CREATED, "True", "Created", f"Job {workload}", generation, ts)
    update: dict[str, Any] = {"conditions": conds, "observedGeneration": generation, "workload": workload}
    if current.get("phase") in (None, Phase.FAILED.value, Phase.SUSPENDED.value):
        update.update({"phase": Phase.PENDING.value, "reason": "WorkloadCreated", "message": f"created Job {workload}"})
        update["completionTime"] = None
    patch.status.update(update)


def _has_workload(status: kopf.Status, **_: Any) -> bool:
    return bool(status.get("workload"))


@kopf.timer(
    API_GROUP, API_VERSION, PLURAL, interval=CONFIG.poll_seconds, initial_delay=1.0, idle=None, when=_has_workload
)
def observe_workload(
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Follow the trainer: phase, attempts, progress, checkpoints, the verdict; and TTL cleanup."""
    current = dict(status)
    ns, name, workload = meta["namespace"], meta["name"], current["workload"]
    run_policy = dict(spec.get("runPolicy") or {})
    if current.get("phase") in TERMINAL:
        _cleanup_after_ttl(ns, workload, current, run_policy, logger)
        return
    if current.get("phase") == Phase.SUSPENDED.value:
        return
    obs = kube.observe(ns, name, meta["uid"], workload, CONFIG.log_tail_lines)
    suspended = bool(run_policy.get("suspend"))
    if obs.job is None and not suspended:
        # The Job vanished (deleted by hand, or a restart raced): recreate it; the trainer resumes.
        result = validate_spec(dict(spec), CONFIG.for_namespace(ns))
        if result.spec is not None:
            meta_d = {"name": name, "namespace": ns, "uid": meta["uid"], "generation": meta.get("generation")}
            if _create_workload(meta_d, result.spec, body):
                _normal_event(body, reason="WorkloadRecreated", message=f"Job {workload} was missing; recreated it")
        return
    new = compute_status(
        current,
        obs,
        generation=current.get("observedGeneration"),
        suspended=suspended,
        backoff_limit=int(run_policy.get("backoffLimit", 3)),
        keep_checkpoints=int((spec.get("checkpoints") or {}).get("keep", 2)),
        now=now(),
    )
    if new.get("phase") == Phase.FAILED.value and current.get("phase") != Phase.FAILED.value:
        kube.stop_job(ns, workload)  # no further retries: the failure is final (user error or backoff limit)
        kopf.warn(body, reason=new["reason"], message=new["message"])
    elif new.get("phase") == Phase.SUCCEEDED.value and current.get("phase") != Phase.SUCCEEDED.value:
        _normal_event(body, reason="Succeeded", message=new["message"])
    elif new.get("phase") == Phase.RUNNING.value and current.get("phase") != Phase.RUNNING.value:
        _normal_event(body, reason="TrainerStarted", message=f"attempt {new['attempts']} is running")
    changed = {k: v for k, v in new.items() if current.get(k) != v}
    if changed:
        patch.status.update(changed)


def _cleanup_after_ttl(
    ns: str, workload: str, status: dict[str, Any], run_policy: dict[str, Any], logger: kopf.Logger
) -> None:
    ttl = run_policy.get("ttlSecondsAfterFinished")
    done = status.get("completionTime")
    if ttl is None or not done:
        return
    finished = dt.datetime.strptime(done, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    if (dt.datetime.now(dt.UTC) - finished).total_seconds() >= int(ttl) and kube.delete_job(ns, workload):
        logger.info("deleted workload %s after ttlSecondsAfterFinished=%s", workload, ttl)
