"""The one level-based decision: (spec, status, observation) -> (new status, actions).

Pure: no API calls, no clock reads, no globals. The controller observes, calls `decide`, applies the actions and
writes the status; when the API server refuses an action, `rejected` turns that into the job's verdict. Because the
decision depends only on what is observed now (never on which event woke it up), an operator restarted at any
moment reaches the same status, and replaying a decision is harmless.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from finetune_api.spec import API_GROUP, API_VERSION, KIND, FineTuneJobSpec, NotificationSpec
from finetune_api.status import Condition, ConditionType, FineTuneJobStatus, Phase
from finetune_operator import builders, gang, preflight
from finetune_operator.config import Preflight
from finetune_operator.notify import payload
from finetune_operator.observe import (
    Observation,
    compute_status,
    config_error_left,
    drop_condition,
    set_condition,
    start_deadline_left,
)
from finetune_operator.validation import ValidationResult

TERMINAL = frozenset({Phase.SUCCEEDED.value, Phase.FAILED.value, Phase.CANCELLED.value})
# The whole spec must fit, resolved, in the trainer's ConfigMap (1 MiB) and in one etcd object with its status.
MAX_SPEC_BYTES = 256 * 1024


@dataclass(frozen=True)
class JobRef:
    namespace: str
    name: str
    uid: str
    generation: int | None
    queue_name: str | None = None  # the FineTuneJob's kueue.x-k8s.io/queue-name label, passed to its Job

    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
            "generation": self.generation,
        }
        if self.queue_name:
            meta["queueName"] = self.queue_name
        return meta


@dataclass(frozen=True)
class CreateWorkload:
    """Create the ConfigMap and the batch Job (both adopted); an existing one of the same name is kept."""

    config_map: dict[str, Any] | None  # None: it exists already (the other workers of a gang)
    job: dict[str, Any]
    event_reason: str
    event_message: str


@dataclass(frozen=True)
class SyncConfig:
    """Replace the ConfigMap's data: the spec changed while the Job exists, so the next attempt uses the new one."""

    config_map: dict[str, Any]


@dataclass(frozen=True)
class DeleteWorkload:
    name: str


@dataclass(frozen=True)
class StopWorkload:
    """parallelism 0: no further attempt, but the Job and its pods (and their logs) stay for inspection."""

    name: str


@dataclass(frozen=True)
class PostEvent:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class CreateNotifier:
    """Start the pod that POSTs the verdict to the tenant's webhook (once per terminal phase)."""

    job: dict[str, Any]


Action = CreateWorkload | SyncConfig | DeleteWorkload | StopWorkload | PostEvent | CreateNotifier


@dataclass
class Decision:
    status: FineTuneJobStatus
    actions: list[Action] = field(default_factory=list)
    requeue_after: float | None = None  # seconds until the decision may change without any event (TTL)


def adopt(manifest: dict[str, Any], ref: JobRef) -> dict[str, Any]:
    """The child with its controller owner reference: deleting the FineTuneJob deletes it (garbage collector)."""
    owner = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    return {**manifest, "metadata": {**manifest["metadata"], "ownerReferences": [owner]}}


def _stamp(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(ts: str) -> dt.datetime:
    return dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def spec_size_problem(raw_spec: dict[str, Any]) -> str | None:
    size = len(json.dumps(raw_spec, separators=(",", ":")).encode())
    if size > MAX_SPEC_BYTES:
        return (
            f"the spec is {size // 1024} KiB; at most {MAX_SPEC_BYTES // 1024} KiB is accepted (store long "
            "evaluation.samplePrompts or templates in the dataset instead)"
        )
    return None


def fail(
    status: FineTuneJobStatus, generation: int | None, reason: str, message: str, now: str, *, validated: bool
) -> Decision:
    """The Failed verdict with its Warning event (posted once per distinct reason and message)."""
    conds = status.conditions
    if not validated:
        conds = set_condition(conds, ConditionType.VALIDATED, "False", reason, message, generation, now)
    conds = set_condition(conds, ConditionType.RUNNING, "False", reason, message, generation, now)
    conds = set_condition(conds, ConditionType.FAILED, "True", reason, message, generation, now)
    new = status.model_copy(
        update={
            "phase": Phase.FAILED.value,
            "reason": reason,
            "message": message[:4096],
            "conditions": conds,
            "observed_generation": generation,
            "completion_time": status.completion_time or now,
        }
    )
    actions: list[Action] = []
    if status.phase != Phase.FAILED or status.reason != reason or status.message != new.message:
        actions.append(PostEvent("Warning", reason, message))
    return Decision(new, actions)


def rejected(status: FineTuneJobStatus, ref: JobRef, what: str, api_message: str, now: dt.datetime) -> Decision:
    """The API server refused to store a child (a value too long, an object too large, an invalid key)."""
    message = f"the API server refused the trainer's {what}: {api_message}"
    decision = fail(status, ref.generation, "WorkloadRejected", message, _stamp(now), validated=True)
    decision.status = decision.status.model_copy(update={"workload": None})
    return decision


def queued(status: FineTuneJobStatus, ref: JobRef, api_message: str, now: dt.datetime) -> Decision:
    """The namespace's ResourceQuota refused the trainer's Job: wait (a quota change wakes the job up)."""
    stamp = _stamp(now)
    message = f"waiting for quota: {api_message}"
    conds = set_condition(
        status.conditions, ConditionType.RUNNING, "False", "ExceededQuota", message, ref.generation, stamp
    )
    new = status.model_copy(
        update={
            "phase": Phase.QUEUED.value,
            "reason": "ExceededQuota",
            "message": message[:4096],
            "conditions": conds,
            "observed_generation": ref.generation,
            "queued_since": status.queued_since or stamp,
        }
    )
    actions: list[Action] = []
    if status.phase != Phase.QUEUED:
        actions.append(PostEvent("Normal", "Queued", message))
    return Decision(new, actions)


def _finished(
    ref: JobRef, spec: dict[str, Any], status: FineTuneJobStatus, obs: Observation, now: dt.datetime
) -> Decision:
    """A finished job only waits for runPolicy.ttlSecondsAfterFinished to delete its Job."""
    ttl = (spec.get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    jobs = [job.name for job in (obs.job, *obs.workers.values()) if job is not None]
    if ttl is None or not status.completion_time or not jobs:
        return Decision(status)
    left = (_parse(status.completion_time) - now).total_seconds() + int(ttl)
    if left > 0:
        return Decision(status, requeue_after=left)
    return Decision(status, [DeleteWorkload(name) for name in jobs])


def notify(decision: Decision, ref: JobRef, raw_spec: dict[str, Any], image: str, pull_policy: str) -> Decision:
    """Add the notification of a terminal phase that has not been notified yet (spec.notification)."""
    status = decision.status
    if status.phase not in TERMINAL or status.notified == status.phase or not raw_spec.get("notification"):
        return decision
    try:
        notification = NotificationSpec.model_validate(raw_spec["notification"])
    except ValueError:
        return decision  # an invalid spec has failed validation already; nothing to notify through
    body = payload(ref.namespace, ref.name, ref.uid, status)
    job = adopt(builders.build_notifier(ref.meta(), notification, body, image, pull_policy), ref)
    decision.actions.append(CreateNotifier(job))
    decision.status = status.model_copy(update={"notified": status.phase})
    return decision


def _cancel(status: FineTuneJobStatus, gen: int | None, obs: Observation, stamp: str) -> Decision:
    """runPolicy.cancel: stop the trainer (it checkpoints on SIGTERM) and end as Cancelled; outputs stay."""
    message = "runPolicy.cancel is true: the trainer was stopped; its checkpoints and outputs stay"
    conds = set_condition(status.conditions, ConditionType.RUNNING, "False", "Cancelled", message, gen, stamp)
    new = status.model_copy(
        update={
            "phase": Phase.CANCELLED.value,
            "reason": "Cancelled",
            "message": message,
            "conditions": conds,
            "observed_generation": gen,
            "completion_time": stamp,
        }
    )
    actions: list[Action] = [PostEvent("Normal", "Cancelled", message)]
    for child in (obs.job, obs.preflight, *obs.workers.values()):
        if child is not None:
            actions.insert(0, DeleteWorkload(child.name))
    return Decision(new, actions)


def _preflight(
    ref: JobRef,
    spec: FineTuneJobSpec,
    status: FineTuneJobStatus,
    conds: list[Condition],
    obs: Observation,
    config_map: dict[str, Any],
    settings: Preflight,
    image_pull_policy: str,
    now: dt.datetime,
    start_deadline_seconds: float | None,
) -> Decision | tuple[FineTuneJobStatus, list[Condition], list[Action]]:
    """The preflight step (see preflight.py): a Decision while it runs or when it failed the job; once the job is
    planned, the status and conditions to go on with, and the actions so far (deleting the preflight's Job)."""
    stamp, gen = _stamp(now), ref.generation
    name = builders.preflight_name(ref.name)
    if obs.preflight is None:
        if obs.quota_message:
            return queued(status, ref, obs.quota_message, now)
        job = adopt(builders.build_preflight(ref.meta(), spec, image_pull_policy, settings), ref)
        message = "checking the data and sizing the job on CPU before requesting GPUs"
        create = CreateWorkload(config_map, job, "Preflight", f"started the preflight: {message}")
        conds = set_condition(conds, ConditionType.PLANNED, "Unknown", "Preflight", message, gen, stamp)
        update = {"phase": Phase.PENDING.value, "reason": "Preflight", "message": message, "completion_time": None}
        new = status.model_copy(update={**update, "conditions": conds, "observed_generation": gen})
        return Decision(new, [create])
    secrets = [spec.storage.secret_ref.name] if spec.storage.secret_ref else []
    verdict = preflight.verdict(obs.preflight, obs.preflight_pods, now, start_deadline_seconds, secrets)
    outcome = preflight.Outcome
    if verdict.outcome == outcome.WAITING:
        if not obs.preflight_pods and obs.quota_message:
            return queued(status, ref, obs.quota_message, now)
        conds = set_condition(conds, ConditionType.PLANNED, "Unknown", verdict.reason, verdict.message, gen, stamp)
        update = {"phase": Phase.PENDING.value, "reason": verdict.reason, "message": verdict.message}
        new = status.model_copy(update={**update, "conditions": conds, "observed_generation": gen})
        left = preflight.deadline_left(obs.preflight_pods, now, start_deadline_seconds)
        return Decision(new, requeue_after=left)
    planned = "True" if verdict.outcome == outcome.FITS else "False"
    conds = set_condition(conds, ConditionType.PLANNED, planned, verdict.reason, verdict.message, gen, stamp)
    status = status.model_copy(update={"conditions": conds, "estimate": verdict.estimate or status.estimate})
    actions: list[Action] = [DeleteWorkload(name)]
    if verdict.outcome in (outcome.FITS, outcome.SKIPPED):
        if verdict.outcome == outcome.SKIPPED:
            actions.append(PostEvent("Warning", verdict.reason, verdict.message))
        else:
            actions.append(PostEvent("Normal", "Planned", verdict.message))
        return status, conds, actions
    decision = fail(status, gen, verdict.reason, verdict.message, stamp, validated=True)
    decision.actions[:0] = actions
    return decision


def _gang(
    ref: JobRef,
    spec: FineTuneJobSpec,
    status: FineTuneJobStatus,
    conds: list[Condition],
    obs: Observation,
    config_map: dict[str, Any],
    actions: list[Action],
    image_pull_policy: str,
    now: dt.datetime,
    start_deadline_seconds: float | None,
) -> Decision:
    """A job with resources.workers > 1: its worker Jobs, created, restarted and judged as one (gang.py)."""
    stamp, gen, workers = _stamp(now), ref.generation, spec.resources.workers
    if obs.workers and status.observed_generation != gen:
        actions.append(SyncConfig(config_map))
    if obs.workers:
        conds = set_condition(
            conds, ConditionType.WORKLOAD_CREATED, "True", "Created", f"{workers} workers", gen, stamp
        )
    if spec.storage.secret_ref is not None:
        obs = dataclasses.replace(obs, secrets=[spec.storage.secret_ref.name])
    step = gang.step(
        status.model_copy(update={"conditions": conds, "workload": builders.worker_name(ref.name, 0)}),
        obs,
        job_name=ref.name,
        workers=workers,
        backoff_limit=spec.run_policy.backoff_limit,
        keep_checkpoints=spec.checkpoints.keep,
        generation=gen,
        now=stamp,
        start_deadline_seconds=start_deadline_seconds,
    )
    meta = ref.meta()
    deadline = spec.run_policy.active_deadline_seconds
    if deadline and status.active_seconds:  # suspended time does not count against the deadline
        meta["activeDeadlineSeconds"] = max(1, deadline - status.active_seconds)
    for rank in step.create:
        job = adopt(builders.build_worker(meta, spec, image_pull_policy, rank, step.rdzv_host), ref)
        message = f"created Job {job['metadata']['name']} (worker {rank} of {workers})"
        actions.append(CreateWorkload(config_map if rank == 0 else None, job, "WorkloadCreated", message))
    actions += [DeleteWorkload(name) for name in step.delete]
    actions += [PostEvent(kind, reason, message) for kind, reason, message in step.events]
    decision = Decision(step.status, actions, requeue_after=step.requeue_after)
    if step.status.phase in TERMINAL:
        ttl = _finished(ref, spec.dump(), step.status, obs, now)
        decision.requeue_after = ttl.requeue_after or (0.5 if ttl.actions else None)
    return decision


def decide(
    ref: JobRef,
    raw_spec: dict[str, Any],
    status: FineTuneJobStatus,
    obs: Observation,
    validation: ValidationResult,
    *,
    image_pull_policy: str,
    now: dt.datetime,
    start_deadline_seconds: float | None = None,
    pod_failure_policy: bool = False,
    preflight_settings: Preflight | None = None,
) -> Decision:
    """The next status and the actions that make the world match the spec."""
    stamp, gen = _stamp(now), ref.generation
    if status.phase in TERMINAL and (status.workload or status.observed_generation == gen):
        # Finished jobs stay finished; a spec edit only revives a job that failed before it had a workload.
        return _finished(ref, raw_spec, status, obs, now)
    if (raw_spec.get("runPolicy") or {}).get("cancel") is True:
        return _cancel(status, gen, obs, stamp)
    if not validation.ok or validation.spec is None:
        return fail(status, gen, validation.reason, validation.message, stamp, validated=False)
    spec: FineTuneJobSpec = validation.spec
    conds = set_condition(status.conditions, ConditionType.VALIDATED, "True", "Valid", "spec is valid", gen, stamp)
    conds = drop_condition(conds, ConditionType.FAILED)  # a job that failed validation and was fixed starts over
    workload = builders.workload_name(ref.name)
    actions: list[Action] = []

    if obs.preflight is not None and (spec.run_policy.suspend or status.phase in TERMINAL):
        actions.append(DeleteWorkload(obs.preflight.name))  # a preflight of a suspended or finished job is moot
    if spec.run_policy.suspend:
        active = status.active_seconds
        for job in (obs.job, *obs.workers.values()):
            if job is None:
                continue
            actions.append(DeleteWorkload(job.name))
            if status.phase != Phase.SUSPENDED and job.start_time and job.rank in (None, 0):
                active += max(0, int((now - _parse(job.start_time)).total_seconds()))
        if status.phase != Phase.SUSPENDED:
            actions.append(
                PostEvent("Normal", "Suspended", "trainer stopped; unsuspend to resume from the last checkpoint")
            )
        message = "runPolicy.suspend is true; no trainer pod runs"
        conds = set_condition(conds, ConditionType.RUNNING, "False", "Suspended", message, gen, stamp)
        conds = set_condition(conds, ConditionType.SUSPENDED, "True", "Suspended", message, gen, stamp)
        conds = set_condition(conds, ConditionType.WORKLOAD_CREATED, "False", "Suspended", message, gen, stamp)
        new = status.model_copy(
            update={
                "phase": Phase.SUSPENDED.value,
                "reason": "Suspended",
                "message": message,
                "conditions": conds,
                "observed_generation": gen,
                "workload": workload,
                "completion_time": None,
                "active_seconds": active,
            }
        )
        return Decision(new, actions)

    config_map = adopt(builders.build_config_map(ref.meta(), spec), ref)
    if obs.job is None and status.phase == Phase.QUEUED and status.queued_since and start_deadline_seconds:
        waited = (now - _parse(status.queued_since)).total_seconds()
        if waited > start_deadline_seconds:
            message = f"the trainer did not start within {start_deadline_seconds:g}s ({status.message})"
            return fail(status, gen, "StartDeadlineExceeded", message, stamp, validated=True)
    planning = preflight_settings is not None and preflight_settings.enabled and preflight.needs_preflight(status, gen)
    if obs.job is None and planning and preflight_settings is not None:
        args = (config_map, preflight_settings, image_pull_policy, now, start_deadline_seconds)
        step = _preflight(ref, spec, status, conds, obs, *args)
        if isinstance(step, Decision):
            return step
        status, conds, actions = step
    if spec.resources.workers > 1:
        return _gang(ref, spec, status, conds, obs, config_map, actions, image_pull_policy, now, start_deadline_seconds)
    if obs.job is None:
        # No Job: a new or unsuspended job, a revived one, or one whose Job was deleted by hand (the trainer resumes).
        recreated = status.workload is not None and status.phase in (Phase.PENDING, Phase.RUNNING)
        reason = "WorkloadRecreated" if recreated else "WorkloadCreated"
        message = f"Job {workload} was missing; recreated it" if recreated else f"created Job {workload}"
        meta = ref.meta()
        meta["podFailurePolicy"] = pod_failure_policy
        deadline = spec.run_policy.active_deadline_seconds
        if deadline and status.active_seconds:  # suspended time does not count against the deadline
            meta["activeDeadlineSeconds"] = max(1, deadline - status.active_seconds)
        actions.append(
            CreateWorkload(
                config_map, adopt(builders.build_workload(meta, spec, image_pull_policy), ref), reason, message
            )
        )
        conds = set_condition(conds, ConditionType.WORKLOAD_CREATED, "True", "Created", f"Job {workload}", gen, stamp)
        conds = set_condition(conds, ConditionType.SUSPENDED, "False", "Created", message, gen, stamp)
        update: dict[str, Any] = {"conditions": conds, "observed_generation": gen, "workload": workload}
        if status.phase in (None, Phase.FAILED, Phase.SUSPENDED) or status.reason == "Preflight":
            update.update({"phase": Phase.PENDING.value, "reason": reason, "message": message, "completion_time": None})
        return Decision(status.model_copy(update=update), actions)

    if status.observed_generation != gen:
        actions.append(SyncConfig(config_map))
    conds = set_condition(conds, ConditionType.WORKLOAD_CREATED, "True", "Created", f"Job {workload}", gen, stamp)
    trainer_job = obs.job
    if spec.storage.secret_ref is not None:
        obs = dataclasses.replace(obs, secrets=[spec.storage.secret_ref.name])
    new = compute_status(
        status.model_copy(update={"conditions": conds, "workload": workload}),
        obs,
        generation=gen,
        backoff_limit=spec.run_policy.backoff_limit,
        keep_checkpoints=spec.checkpoints.keep,
        now=stamp,
        start_deadline_seconds=start_deadline_seconds,
    )
    if new.phase != status.phase:
        if new.phase == Phase.FAILED:
            actions += [StopWorkload(trainer_job.name), PostEvent("Warning", new.reason or "Failed", new.message or "")]
        elif new.phase == Phase.SUCCEEDED:
            actions.append(PostEvent("Normal", "Succeeded", new.message or ""))
        elif new.phase == Phase.RUNNING:
            actions.append(PostEvent("Normal", "TrainerStarted", f"attempt {new.attempts} is running"))
    decision = Decision(new, actions)
    if new.phase == Phase.PENDING:  # wake up when the start deadline passes, even if nothing else happens
        timers = [start_deadline_left(new, obs, stamp, start_deadline_seconds), config_error_left(obs, now)]
        decision.requeue_after = min((t for t in timers if t is not None), default=None)
    if new.phase in TERMINAL:
        ttl = _finished(ref, raw_spec, new, obs, now)
        decision.requeue_after = ttl.requeue_after or (0.5 if ttl.actions else None)
    return decision
