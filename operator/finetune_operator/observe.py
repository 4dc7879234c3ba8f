"""Pure functions: status computed from what the operator observes (the batch Job, its pods, trainer reports).

Status is recomputed from observation rather than accumulated from events, so an operator restarted at any moment
reaches the same status and never loses a transition. Only what comes from trainer reports (progress, metrics,
checkpoints, output) is folded into the previous status, because a report is seen once in a log stream.
Everything here works on the typed `FineTuneJobStatus`, never on dicts.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from finetune_api.reports import EXIT_INTERRUPTED, EXIT_USER_ERROR, Report, ReportKind, parse_reports
from finetune_api.status import (
    CheckpointRecord,
    Condition,
    ConditionType,
    FineTuneJobStatus,
    OutputRecord,
    Phase,
    Progress,
)

_PODS_REMEMBERED = 32
USER_ERROR_EXIT_CODE = EXIT_USER_ERROR  # "your config or data is wrong": retrying cannot help
# EXIT_INTERRUPTED: the trainer saved a checkpoint on SIGTERM and stopped; 143: killed by an unhandled SIGTERM
# (an older trainer). Either way stopped from outside: resumable, and not the job's fault.
INTERRUPTED_EXIT_CODES = frozenset({EXIT_INTERRUPTED, 143})
# Pod reasons that mean "stopped from outside": eviction (node pressure, drain), preemption, node shutdown.
_INTERRUPTION_REASONS = frozenset({"Evicted", "Preempting", "Shutdown", "NodeShutdown", "Terminated", "NodeLost"})
# Waiting reasons with which a pod can never start: no retry and no deadline can help.
_NEVER_STARTS = {
    "CreateContainerConfigError": "MissingConfig",  # a Secret, or a key in it, that does not exist
    "ErrImageNeverPull": "ImageNotPresent",  # imagePullPolicy Never and the node lacks the image
    "InvalidImageName": "InvalidImage",
}


@dataclass(frozen=True)
class PodView:
    """What matters about one trainer pod."""

    name: str
    created: str
    phase: str
    reason: str | None = None  # why it is not running (waiting reason, Unschedulable, ...)
    message: str | None = None
    exit_code: int | None = None
    termination_message: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    resource_version: str = ""
    pod_reason: str | None = None  # status.reason of the pod itself, e.g. Evicted
    disrupted: bool = False  # the DisruptionTarget condition (Kubernetes 1.26+: preemption, eviction, drain)
    deleting: bool = False  # deletionTimestamp set: someone (a drain, a preemption, a person) is removing it
    component: str = "trainer"  # its app.kubernetes.io/component label: trainer or preflight
    rank: int | None = None  # a gang worker's rank (finetune.dev/worker-rank); None for a one-pod job
    pod_ip: str | None = None

    @property
    def running(self) -> bool:
        return self.phase == "Running"

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


@dataclass(frozen=True)
class JobView:
    """What matters about the trainer's batch Job."""

    name: str
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    complete: bool = False
    failed_reason: str | None = None  # set when the Job's Failed condition is True
    resource_version: str = ""
    suspended: bool = False  # spec.suspend (Kubernetes 1.21+): a queue such as Kueue has not admitted it yet
    start_time: str | None = None  # status.startTime: when the Job controller started it
    rank: int | None = None  # a gang worker's Job: its rank


@dataclass
class Observation:
    job: JobView | None  # the batch Job, or None when it does not exist (yet, or any more)
    pods: list[PodView] = field(default_factory=list)  # oldest first
    reports: list[Report] = field(default_factory=list)  # trainer reports not yet folded into status, in order
    # Why the Job controller could not create a pod (its FailedCreate event), e.g. "exceeded quota: ...".
    quota_message: str | None = None
    secrets: list[str] = field(default_factory=list)  # the Secrets the trainer pod references (for messages)
    preflight: JobView | None = None  # the CPU preflight's Job (preflight.py), while it exists
    preflight_pods: list[PodView] = field(default_factory=list)  # oldest first
    workers: dict[int, JobView] = field(default_factory=dict)  # a gang's worker Jobs by rank (gang.py)


def _ts(value: str | None) -> str | None:
    """RFC 3339 with Z, as the API server writes it (the client's serializer writes +00:00)."""
    return value.replace("+00:00", "Z") if value else value


def pod_view(pod: Mapping[str, Any]) -> PodView:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    reason = message = termination = started = finished = None
    exit_code: int | None = None
    disrupted = False
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            reason, message = cond.get("reason") or "Unschedulable", cond.get("message")
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            disrupted = True
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if state.get("waiting"):
            reason = state["waiting"].get("reason") or reason
            message = state["waiting"].get("message") or message
        if state.get("running"):
            started = _ts(state["running"].get("startedAt"))
        term = state.get("terminated")
        if term:
            exit_code, reason, termination = term.get("exitCode"), term.get("reason"), term.get("message")
            started, finished = _ts(term.get("startedAt")), _ts(term.get("finishedAt"))
    return PodView(
        name=meta.get("name", ""),
        created=_ts(meta.get("creationTimestamp")) or "",
        phase=status.get("phase") or "Pending",
        reason=reason,
        message=message,
        exit_code=exit_code,
        termination_message=termination,
        started_at=started,
        finished_at=finished,
        resource_version=str(meta.get("resourceVersion") or ""),
        pod_reason=status.get("reason"),
        disrupted=disrupted,
        deleting=bool(meta.get("deletionTimestamp")),
        component=(meta.get("labels") or {}).get("app.kubernetes.io/component") or "trainer",
        rank=_rank(meta),
        pod_ip=status.get("podIP") or None,
    )


def _rank(meta: Mapping[str, Any]) -> int | None:
    value = (meta.get("labels") or {}).get("finetune.dev/worker-rank")
    return int(value) if value is not None and str(value).isdigit() else None


def job_view(job: Mapping[str, Any]) -> JobView:
    meta, status = job.get("metadata") or {}, job.get("status") or {}
    complete, failed_reason = False, None
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            complete = True
        elif cond.get("type") == "Failed":
            failed_reason = cond.get("reason") or "Failed"
    return JobView(
        name=meta.get("name", ""),
        active=int(status.get("active") or 0),
        succeeded=int(status.get("succeeded") or 0),
        failed=int(status.get("failed") or 0),
        complete=complete,
        failed_reason=failed_reason,
        resource_version=str(meta.get("resourceVersion") or ""),
        suspended=bool((job.get("spec") or {}).get("suspend")),
        start_time=_ts(status.get("startTime")),
        rank=_rank(meta),
    )


def reports_from_text(text: str | None) -> list[Report]:
    """Reports in a log or a termination message (which may also be one bare JSON report)."""
    if not text:
        return []
    found = list(parse_reports(text.splitlines()))
    if found:
        return found
    try:
        return [Report.model_validate(json.loads(text))]
    except ValueError:
        return []


def set_condition(
    conditions: list[Condition],
    ctype: ConditionType,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[Condition]:
    """Conditions with one set; lastTransitionTime moves only when the status value changes."""
    old = next((c for c in conditions if c.type == ctype), None)
    since = old.last_transition_time if old is not None and old.status == status else now
    new = Condition(
        type=str(ctype),
        status=status,
        reason=reason,
        message=message[:1024],
        last_transition_time=since,
        observed_generation=generation,
    )
    out = [c for c in conditions if c.type != ctype] + [new]
    order = [c.value for c in ConditionType]
    return sorted(out, key=lambda c: order.index(c.type) if c.type in order else len(order))


def phase_conditions(
    conditions: list[Condition], phase: Phase, reason: str, message: str, generation: int | None, now: str
) -> list[Condition]:
    """The conditions that follow from a trainer's phase (one pod or a gang): Running, Suspended=False, and
    Succeeded or Failed once it has ended."""
    running = "True" if phase == Phase.RUNNING else "False"
    conds = set_condition(conditions, ConditionType.RUNNING, running, reason, message, generation, now)
    conds = set_condition(conds, ConditionType.SUSPENDED, "False", reason, message, generation, now)
    if phase == Phase.SUCCEEDED:
        conds = set_condition(conds, ConditionType.SUCCEEDED, "True", reason, message, generation, now)
    if phase == Phase.FAILED:
        conds = set_condition(conds, ConditionType.FAILED, "True", reason, message, generation, now)
    return conds


def drop_condition(conditions: list[Condition], ctype: ConditionType) -> list[Condition]:
    return [c for c in conditions if c.type != ctype]


def fold_reports(status: FineTuneJobStatus, reports: Iterable[Report], keep: int) -> FineTuneJobStatus:
    """Merge trainer reports into status. Idempotent: folding the same reports twice changes nothing."""
    progress = (status.progress or Progress()).model_copy()
    metrics = dict(status.metrics)
    checkpoints = {c.step: c for c in status.checkpoints}
    loss, output = status.loss, status.output
    touched = status.progress is not None
    for r in sorted(reports, key=lambda r: r.seq):
        if r.kind == ReportKind.STAGE and r.stage:
            progress.stage, touched = r.stage, True
        elif r.kind == ReportKind.PROGRESS:
            for attr, value in (
                ("step", r.step),
                ("total_steps", r.total_steps),
                ("epoch", r.epoch),
                ("eta_seconds", r.eta_seconds),
                ("tokens_per_second", r.tokens_per_second),
            ):
                if value is not None:
                    setattr(progress, attr, value)
            progress.stage, progress.updated_at, touched = "training", r.time, True
            if r.loss is not None:
                loss = round(r.loss, 4)
                metrics["loss"] = r.loss
            if r.learning_rate is not None:
                metrics["learning_rate"] = r.learning_rate
        elif r.kind == ReportKind.EVAL:
            metrics.update(r.metrics)
        elif r.kind == ReportKind.CHECKPOINT and r.step is not None and r.uri:
            checkpoints[r.step] = CheckpointRecord(step=r.step, uri=r.uri, metrics=dict(r.metrics))
        elif r.kind == ReportKind.OUTPUT and r.uri:
            output = OutputRecord(uri=r.uri, manifest=r.manifest)
            metrics.update(r.metrics)
    if progress.total_steps:
        progress.percent = min(100.0, round(100.0 * progress.step / progress.total_steps, 1))
        progress.summary = f"{progress.percent:g}% ({progress.step}/{progress.total_steps})"
    return status.model_copy(
        update={
            "progress": progress if touched else None,
            "metrics": metrics,
            "loss": loss,
            "output": output,
            "checkpoints": [checkpoints[s] for s in sorted(checkpoints)][-keep:],
        }
    )


def last_error(reports: list[Report], pod: PodView | None) -> tuple[str, str]:
    errors = [r for r in reports if r.kind == ReportKind.ERROR]
    if pod is not None:
        errors += [r for r in reports_from_text(pod.termination_message) if r.kind == ReportKind.ERROR]
    if errors:
        e = errors[-1]
        return e.reason or "TrainerError", e.message or "the trainer reported an error"
    if pod is not None and pod.termination_message:
        return "TrainerFailed", pod.termination_message.strip()[-1000:]
    if pod is not None and pod.exit_code is not None:
        return "TrainerFailed", f"trainer exited with code {pod.exit_code} ({pod.reason or 'Error'})"
    return "TrainerFailed", "the trainer failed"


def interrupted(pod: PodView) -> bool:
    """Stopped from outside (and resumable), as opposed to failing by itself."""
    return (
        pod.exit_code in INTERRUPTED_EXIT_CODES
        or pod.disrupted
        or pod.deleting
        or (pod.pod_reason or "") in _INTERRUPTION_REASONS
        or (pod.phase == "Failed" and pod.exit_code is None)  # killed before its container ran
    )


@dataclass(frozen=True)
class Tally:
    failures: int
    interruptions: int
    finished_pods: list[str]


def tally(prev: FineTuneJobStatus, pods: list[PodView]) -> Tally:
    """Count each finished pod once: a failure (counts against backoffLimit) or an interruption (does not)."""
    failures, interruptions, counted = prev.failures, prev.interruptions, list(prev.finished_pods)
    for pod in pods:
        if pod.phase != "Failed" or pod.name in counted or pod.exit_code == USER_ERROR_EXIT_CODE:
            continue
        counted.append(pod.name)
        if interrupted(pod):
            interruptions += 1
        else:
            failures += 1
    return Tally(failures, interruptions, counted[-_PODS_REMEMBERED:])


_MISSING = re.compile(r"not found|couldn't find key", re.IGNORECASE)
# A config error whose message names nothing (e.g. "failed to sync secret cache: timed out waiting for the
# condition", what a 1.20 kubelet says about a Secret that does not exist) is final once it lasts this long.
CONFIG_ERROR_GRACE_S = 45.0


def never_starts(pod: PodView | None, now: dt.datetime | None = None, secrets: list[str] | None = None):
    """(reason, message) when this pending pod cannot start whatever happens; None otherwise."""
    if pod is None or pod.phase != "Pending" or pod.reason not in _NEVER_STARTS:
        return None
    detail = pod.message or pod.reason or ""
    if pod.reason == "CreateContainerConfigError" and not _MISSING.search(detail):
        created = parse_ts(pod.created)
        if now is None or created is None or (now - created).total_seconds() < CONFIG_ERROR_GRACE_S:
            return None  # the kubelet may still be looking the Secret up
        named = f"; check that Secret {', '.join(secrets)} and its keys exist" if secrets else ""
        detail = f"{detail} (for {CONFIG_ERROR_GRACE_S:g}s{named})"
    return _NEVER_STARTS[pod.reason or ""], f"the trainer pod cannot start: {detail}"


def config_error_left(obs: Observation, now: dt.datetime) -> float | None:
    """Seconds until an unexplained config error of the newest pod becomes final (for a timer)."""
    latest = obs.pods[-1] if obs.pods else None
    if latest is None or latest.phase != "Pending" or latest.reason != "CreateContainerConfigError":
        return None
    created = parse_ts(latest.created)
    return None if created is None else max(0.5, CONFIG_ERROR_GRACE_S - (now - created).total_seconds() + 0.5)


def parse_ts(value: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(value or "", "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def waiting_since(status: FineTuneJobStatus, obs: Observation) -> dt.datetime | None:
    """Since when the current attempt has been waiting to start; None when a trainer runs or is done."""
    latest = obs.pods[-1] if obs.pods else None
    if latest is not None:
        return parse_ts(latest.created) if latest.phase == "Pending" else None
    created = next((c for c in status.conditions if c.type == ConditionType.WORKLOAD_CREATED), None)
    return parse_ts(created.last_transition_time) if created is not None else None


def _attempts(prev: FineTuneJobStatus, obs: Observation) -> tuple[int, list[str]]:
    """Every trainer pod ever seen counts, not only those that exist now: a force-deleted pod vanishes without the
    Job controller counting it as failed, yet it was an attempt."""
    seen = list(prev.trainer_pods)
    fresh = [p.name for p in obs.pods if p.name not in seen]
    job = obs.job
    counted = (job.failed + job.succeeded + job.active) if job is not None else 0
    attempts = max(prev.attempts + len(fresh), len(obs.pods), counted)
    return attempts, (seen + fresh)[-_PODS_REMEMBERED:]


def compute_status(
    prev: FineTuneJobStatus,
    obs: Observation,
    *,
    generation: int | None,
    backoff_limit: int,
    keep_checkpoints: int,
    now: str,
    start_deadline_seconds: float | None = None,
) -> FineTuneJobStatus:
    """The next status of a validated, unsuspended job whose workload exists."""
    status = fold_reports(prev, obs.reports, keep_checkpoints)
    for pod in obs.pods:  # the termination message outlives a rotated log
        status = fold_reports(status, reports_from_text(pod.termination_message), keep_checkpoints)
    pods, job = obs.pods, obs.job
    latest = pods[-1] if pods else None
    attempts, trainer_pods = _attempts(prev, obs)
    counts = tally(prev, pods)
    started = [p.started_at for p in pods if p.started_at]
    start_time = status.start_time or (min(started) if started else None)
    user_error = next((p for p in pods if p.exit_code == USER_ERROR_EXIT_CODE), None)
    final_error = next((r for r in reversed(obs.reports) if r.kind == ReportKind.ERROR and r.final), None)
    since, now_dt = waiting_since(status, obs), parse_ts(now)
    blocked = never_starts(latest, now_dt, obs.secrets)
    waited = (now_dt - since).total_seconds() if since is not None and now_dt is not None else 0.0

    phase: Phase
    if prev.phase in (Phase.SUCCEEDED, Phase.FAILED):
        phase, reason, message = Phase(prev.phase), prev.reason or "", prev.message or ""
    elif job is not None and job.complete:
        phase, reason = Phase.SUCCEEDED, "Completed"
        message = f"model uploaded to {status.output.uri}" if status.output else "the trainer completed"
    elif user_error is not None:
        phase = Phase.FAILED
        reason, message = last_error(obs.reports if user_error is latest else [], user_error)
    elif final_error is not None:  # the trainer reported a user error and waits for the Job to be stopped
        phase = Phase.FAILED
        reason, message = final_error.reason or "TrainerError", final_error.message or "the trainer reported an error"
    elif counts.failures > backoff_limit:
        failed_pod = next((p for p in reversed(pods) if p.phase == "Failed" and not interrupted(p)), latest)
        phase, (reason, message) = Phase.FAILED, last_error(obs.reports, failed_pod)
        message = f"{message} (gave up after {counts.failures} failed attempts; runPolicy.backoffLimit={backoff_limit})"
    elif job is not None and job.failed_reason is not None:
        phase = Phase.FAILED
        if job.failed_reason == "DeadlineExceeded":
            reason, message = "DeadlineExceeded", "runPolicy.activeDeadlineSeconds reached; the trainer was stopped"
        else:
            reason, message = last_error(obs.reports, latest)
            message = f"{message} (gave up after {attempts} attempts; runPolicy.backoffLimit={backoff_limit})"
    elif latest is None and job is not None and job.suspended:
        phase, reason, message = Phase.QUEUED, "WaitingForQueue", "the Job waits for its queue (Kueue) to admit it"
    elif blocked is not None:
        phase, (reason, message) = Phase.FAILED, blocked
    elif start_deadline_seconds is not None and waited > start_deadline_seconds:
        phase, reason = Phase.FAILED, "StartDeadlineExceeded"
        why = (latest.message or latest.reason) if latest is not None else None
        message = f"the trainer did not start within {start_deadline_seconds:g}s ({why or 'no pod was created'})"
    elif latest is not None and latest.running:
        phase, reason = Phase.RUNNING, "Training"
        stage = status.progress.stage if status.progress else None
        message = f"attempt {attempts}: {stage or 'starting'}"
    elif latest is None and obs.quota_message:
        phase, reason, message = Phase.QUEUED, "ExceededQuota", obs.quota_message
    else:
        phase = Phase.PENDING
        if latest is not None and latest.phase == "Failed":
            cause = "was interrupted" if interrupted(latest) else "failed"
            reason, message = "Retrying", f"attempt {attempts} {cause}; a new pod resumes from the last checkpoint"
        elif latest is not None and latest.reason:
            reason, message = latest.reason, latest.message or latest.reason
        else:
            reason, message = "WaitingForPod", "waiting for the trainer pod to start"

    conds = phase_conditions(status.conditions, phase, reason, message, generation, now)
    terminal = phase in (Phase.SUCCEEDED, Phase.FAILED)
    return status.model_copy(
        update={
            "phase": phase.value,
            "reason": reason,
            "message": message[:4096],
            "attempts": attempts,
            "trainer_pods": trainer_pods,
            "failures": counts.failures,
            "interruptions": counts.interruptions,
            "finished_pods": counts.finished_pods,
            "start_time": start_time,
            "queued_since": (status.queued_since or now) if phase == Phase.QUEUED else None,
            "completion_time": (status.completion_time or now) if terminal else None,
            "conditions": conds,
            "observed_generation": generation,
        }
    )


def start_deadline_left(
    status: FineTuneJobStatus, obs: Observation, now: str, start_deadline_seconds: float | None
) -> float | None:
    """Seconds until a waiting attempt passes its start deadline (for a timer); None when nothing waits."""
    since, now_dt = waiting_since(status, obs), parse_ts(now)
    if start_deadline_seconds is None or since is None or now_dt is None:
        return None
    return max(0.5, start_deadline_seconds - (now_dt - since).total_seconds() + 0.5)
