"""Pure functions: status computed from what the operator observes (the batch Job, its pods, trainer reports).

Status is always recomputed from observation rather than accumulated from events, so an operator restarted at
any moment reaches the same status and never loses a transition. Only checkpoints and metrics, which come from
trainer reports that may have scrolled out of the log tail, are merged with the previous status.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from finetune_api.reports import Report, ReportKind, parse_reports
from finetune_api.status import ConditionType, Phase

_PODS_REMEMBERED = 32
USER_ERROR_EXIT_CODE = 2  # the trainer's "your config or data is wrong": retrying cannot help
_WAITING_PROBLEMS = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
}


@dataclass
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


@dataclass
class Observation:
    job: dict[str, Any] | None  # the batch Job, or None when it does not exist (yet, or any more)
    pods: list[PodView] = field(default_factory=list)  # oldest first
    reports: list[Report] = field(default_factory=list)  # from the newest pod's log, in order


def _ts(value: str | None) -> str | None:
    """RFC 3339 with Z, as the API server writes it (the client's serializer writes +00:00)."""
    return value.replace("+00:00", "Z") if value else value


def pod_view(pod: dict[str, Any]) -> PodView:
    meta, status = pod.get("metadata", {}), pod.get("status", {}) or {}
    view = PodView(
        name=meta.get("name", ""),
        created=meta.get("creationTimestamp") or "",
        phase=status.get("phase") or "Pending",
    )
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            view.reason, view.message = cond.get("reason") or "Unschedulable", cond.get("message")
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if state.get("waiting"):
            view.reason = state["waiting"].get("reason") or view.reason
            view.message = state["waiting"].get("message") or view.message
        if state.get("running"):
            view.started_at = _ts(state["running"].get("startedAt"))
        term = state.get("terminated")
        if term:
            view.exit_code = term.get("exitCode")
            view.reason = term.get("reason")
            view.termination_message = term.get("message")
            view.started_at = _ts(term.get("startedAt"))
            view.finished_at = _ts(term.get("finishedAt"))
    return view


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
    conditions: list[dict[str, Any]],
    ctype: str,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[dict[str, Any]]:
    """Conditions with one set; lastTransitionTime moves only when the status value changes."""
    out = [dict(c) for c in conditions if c.get("type") != ctype]
    old = next((c for c in conditions if c.get("type") == ctype), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status else now
    out.append(
        {
            "type": str(ctype),
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": since,
            "observedGeneration": generation,
        }
    )
    order = [c.value for c in ConditionType]
    return sorted(out, key=lambda c: order.index(c["type"]) if c["type"] in order else len(order))


def _job_condition(job: dict[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    for cond in ((job or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype and cond.get("status") == "True":
            return dict(cond)
    return None


def fold_reports(status: dict[str, Any], reports: Iterable[Report], keep: int) -> dict[str, Any]:
    """Merge trainer reports into status. Idempotent: folding the same reports twice changes nothing."""
    status = dict(status)
    progress = dict(status.get("progress") or {})
    metrics = dict(status.get("metrics") or {})
    checkpoints = {c["step"]: c for c in status.get("checkpoints") or []}
    for r in sorted(reports, key=lambda r: r.seq):
        if r.kind == ReportKind.STAGE and r.stage:
            progress["stage"] = r.stage
        elif r.kind == ReportKind.PROGRESS:
            progress.update(
                {
                    k: v
                    for k, v in {
                        "step": r.step,
                        "totalSteps": r.total_steps,
                        "epoch": r.epoch,
                        "etaSeconds": r.eta_seconds,
                        "tokensPerSecond": r.tokens_per_second,
                    }.items()
                    if v is not None
                }
            )
            progress["stage"] = "training"
            progress["updatedAt"] = r.time
            if r.loss is not None:
                status["loss"] = round(r.loss, 4)
                metrics["loss"] = r.loss
            if r.learning_rate is not None:
                metrics["learning_rate"] = r.learning_rate
        elif r.kind == ReportKind.EVAL:
            metrics.update(r.metrics)
        elif r.kind == ReportKind.CHECKPOINT and r.step is not None and r.uri:
            checkpoints[r.step] = {"step": r.step, "uri": r.uri, "metrics": dict(r.metrics)}
        elif r.kind == ReportKind.OUTPUT and r.uri:
            status["output"] = {"uri": r.uri, **({"manifest": r.manifest} if r.manifest else {})}
            metrics.update(r.metrics)
    step, total = progress.get("step"), progress.get("totalSteps")
    if step is not None and total:
        pct = min(100.0, round(100.0 * step / total, 1))
        progress["percent"] = pct
        progress["summary"] = f"{pct:g}% ({step}/{total})"
    if progress:
        status["progress"] = progress
    status["metrics"] = metrics
    status["checkpoints"] = [checkpoints[s] for s in sorted(checkpoints)][-keep:]
    return status


def _last_error(reports: list[Report], pod: PodView | None) -> tuple[str, str]:
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


def compute_status(
    prev: dict[str, Any],
    obs: Observation,
    *,
    generation: int | None,
    suspended: bool,
    backoff_limit: int,
    keep_checkpoints: int,
    now: str,
) -> dict[str, Any]:
    """The next status of a validated job whose workload was created."""
    status = fold_reports(prev, obs.reports, keep_checkpoints)
    for pod in obs.pods:  # the termination message outlives a rotated log
        status = fold_reports(status, reports_from_text(pod.termination_message), keep_checkpoints)
    conds = list(status.get("conditions") or [])
    pods, job = obs.pods, obs.job
    latest = pods[-1] if pods else None
    job_status = (job or {}).get("status") or {}
    # Count every trainer pod ever seen, not the ones that exist now: a force-deleted pod vanishes without the
    # Job controller counting it as failed, yet it was an attempt.
    seen = list(prev.get("trainerPods") or [])
    fresh = [p.name for p in pods if p.name not in seen]
    attempts = max(
        int(prev.get("attempts") or 0) + len(fresh),
        len(pods),
        int(job_status.get("failed") or 0) + int(job_status.get("succeeded") or 0) + int(job_status.get("active") or 0),
    )
    status["trainerPods"] = (seen + fresh)[-_PODS_REMEMBERED:]
    status["attempts"] = attempts
    started = [p.started_at for p in pods if p.started_at]
    if started and not status.get("startTime"):
        status["startTime"] = min(started)

    user_error = next((p for p in pods if p.exit_code == USER_ERROR_EXIT_CODE), None)
    complete, failed = _job_condition(job, "Complete"), _job_condition(job, "Failed")
    prev_phase = prev.get("phase")

    if prev_phase in (Phase.SUCCEEDED, Phase.FAILED):
        phase, reason, message = prev_phase, prev.get("reason") or "", prev.get("message") or ""
    elif complete is not None:
        phase, reason = Phase.SUCCEEDED, "Completed"
        out = (status.get("output") or {}).get("uri")
        message = f"model uploaded to {out}" if out else "the trainer completed"
    elif user_error is not None:
        phase = Phase.FAILED
        reason, message = _last_error(obs.reports if user_error is latest else [], user_error)
    elif failed is not None:
        phase = Phase.FAILED
        if failed.get("reason") == "DeadlineExceeded":
            reason, message = (
                "DeadlineExceeded",
                "runPolicy.activeDeadlineSeconds reached; the trainer was stopped",
            )
        else:
            reason, message = _last_error(obs.reports, latest)
            message = f"{message} (gave up after {attempts} attempts; runPolicy.backoffLimit={backoff_limit})"
    elif suspended:
        phase, reason, message = (
            Phase.SUSPENDED,
            "Suspended",
            "runPolicy.suspend is true; no trainer pod runs",
        )
    elif latest is not None and latest.phase == "Running":
        phase, reason = Phase.RUNNING, "Training"
        stage = (status.get("progress") or {}).get("stage")
        message = f"attempt {attempts}: {stage or 'starting'}"
    else:
        phase = Phase.PENDING
        if latest is not None and latest.reason:
            reason, message = latest.reason, latest.message or latest.reason
            if latest.phase == "Failed":
                reason, message = (
                    "Retrying",
                    f"attempt {attempts} failed; a new pod resumes from the last checkpoint",
                )
        else:
            reason, message = "WaitingForPod", "waiting for the trainer pod to start"

    status.update({"phase": phase.value if isinstance(phase, Phase) else phase, "reason": reason, "message": message})
    if phase in (Phase.SUCCEEDED, Phase.FAILED) and not status.get("completionTime"):
        status["completionTime"] = now
    running = "True" if phase == Phase.RUNNING else "False"
    conds = set_condition(conds, ConditionType.RUNNING, running, reason, message, generation, now)
    conds = set_condition(
        conds,
        ConditionType.SUSPENDED,
        "True" if phase == Phase.SUSPENDED else "False",
        reason,
        message,
        generation,
        now,
    )
    if phase == Phase.SUCCEEDED:
        conds = set_condition(conds, ConditionType.SUCCEEDED, "True", reason, message, generation, now)
    if phase == Phase.FAILED:
        conds = set_condition(conds, ConditionType.FAILED, "True", reason, message, generation, now)
    status["conditions"] = conds
    status["observedGeneration"] = generation
    return status
