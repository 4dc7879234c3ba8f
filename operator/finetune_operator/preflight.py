"""The preflight's verdict, from what is observed of its Job and pod. Pure, like `observe.compute_status`.

Between validation and the trainer's Job, a job passes one small CPU pod of the trainer image
(``python -m finetune_trainer.preflight``, built by `builders.build_preflight`). It reads the model's config.json
(never its weights) and the dataset, prepares the data exactly as the trainer will, and sizes the job with
`finetune_api.plan`: parameters, memory per GPU, tokens, steps, FLOPs, time. Its last report, a ``plan`` or a
final ``error``, is also its termination message, which this module reads. So a typo in a field name, a template
that names a missing column, or a full fine-tune that cannot fit its GPUs fails the job before any GPU is
requested, with the numbers and the cheapest fix; a job that fits gets ``status.estimate`` and its trainer Job.

The preflight is a check, not a gate that can break training: a preflight that crashes by itself (its own bug,
an out-of-memory kill on a huge dataset) lets the job go on without an estimate, with a Warning event; the trainer
still checks everything itself.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

from finetune_api.plan import Estimate
from finetune_api.reports import EXIT_USER_ERROR, ReportKind
from finetune_api.status import ConditionType, FineTuneJobStatus
from finetune_operator.observe import JobView, PodView, never_starts, parse_ts, reports_from_text


class Outcome(StrEnum):
    WAITING = "waiting"  # not started, or still checking
    FITS = "fits"  # planned: create the trainer's Job
    TOO_LARGE = "too-large"  # the job cannot fit its GPUs: fail with the estimate's fixes
    INVALID = "invalid"  # the data, template or model is wrong: fail with the preflight's reason
    CANNOT_START = "cannot-start"  # the pod can never start (missing Secret, image) or missed the start deadline
    SKIPPED = "skipped"  # the preflight failed by itself: go on without an estimate (Warning)


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str
    message: str
    estimate: Estimate | None = None


SKIPPED_REASONS = frozenset({"PreflightFailed", "NotSized"})  # Planned=False, yet the trainer went ahead


def needs_preflight(status: FineTuneJobStatus, generation: int | None) -> bool:
    """Whether the job must pass (again) the preflight before its trainer's Job is created: it never passed, or
    its spec changed before any trainer pod ran. A job that trained already and resumes (unsuspended, its Job
    deleted by hand) is not planned again."""
    planned = next((c for c in status.conditions if c.type == ConditionType.PLANNED), None)
    if planned is None or planned.status == "Unknown":
        return True
    if planned.status == "False" and planned.reason not in SKIPPED_REASONS:
        return True  # it failed there and the spec was edited since (decide only gets here for a revived job)
    return planned.observed_generation != generation and status.attempts == 0


def too_large_message(estimate: Estimate) -> str:
    fixes = "; ".join(estimate.fixes) if estimate.fixes else "request GPUs with more memory (resources.gpuType)"
    return f"{estimate.summary}. Cheapest fixes first: {fixes}"


def verdict(
    job: JobView | None,
    pods: list[PodView],
    now: dt.datetime,
    start_deadline_seconds: float | None,
    secrets: list[str] | None = None,
) -> Verdict:
    """What the preflight decided, or why it has not yet."""
    for pod in reversed(pods):  # newest first: a retried preflight's verdict is its last pod's
        reports = reports_from_text(pod.termination_message)
        plans = [r for r in reports if r.kind == ReportKind.PLAN]
        if pod.phase == "Succeeded" and plans and plans[-1].estimate is None:
            why = plans[-1].message or "an architecture the planner does not know"
            return Verdict(
                Outcome.SKIPPED,
                "NotSized",
                f"the preflight checked the data but could not size the job ({why}); the trainer starts without "
                "an estimate",
            )
        if pod.phase == "Succeeded" and plans:
            estimate = plans[-1].estimate
            assert estimate is not None
            if estimate.fits:
                return Verdict(Outcome.FITS, "Fits", estimate.summary, estimate)
            return Verdict(Outcome.TOO_LARGE, "InsufficientGpuMemory", too_large_message(estimate), estimate)
        errors = [r for r in reports if r.kind == ReportKind.ERROR]
        if pod.exit_code == EXIT_USER_ERROR and errors:
            error = errors[-1]
            return Verdict(
                Outcome.INVALID,
                error.reason or "PreflightError",
                f"the preflight (on CPU, before any GPU was requested) found: {error.message or error.reason}",
            )
    latest = pods[-1] if pods else None
    if job is not None and (job.failed_reason is not None or job.complete):
        why = "no verdict"
        if latest is not None and latest.exit_code is not None:
            why = f"exit code {latest.exit_code}, {latest.reason or 'Error'}"
        elif job.failed_reason:
            why = job.failed_reason
        return Verdict(
            Outcome.SKIPPED,
            "PreflightFailed",
            f"the preflight failed by itself ({why}); the trainer starts without an estimate and checks the "
            "data itself",
        )
    blocked = never_starts(latest, now, secrets)
    if blocked is not None:
        reason, message = blocked
        return Verdict(Outcome.CANNOT_START, reason, message.replace("the trainer pod", "the preflight pod"))
    left = deadline_left(pods, now, start_deadline_seconds)
    if left is not None and left <= 0.5 and latest is not None:
        why = latest.message or latest.reason or "pending"
        return Verdict(
            Outcome.CANNOT_START,
            "StartDeadlineExceeded",
            f"the preflight pod did not start within {start_deadline_seconds:g}s ({why})",
        )
    detail = "checking the data and sizing the job on CPU before requesting GPUs"
    if latest is not None and latest.phase == "Pending" and latest.reason:
        detail += f" (preflight pod: {latest.reason})"
    return Verdict(Outcome.WAITING, "Preflight", detail)


def deadline_left(pods: list[PodView], now: dt.datetime, start_deadline_seconds: float | None) -> float | None:
    """Seconds until a pending preflight pod passes the start deadline (for a timer)."""
    latest = pods[-1] if pods else None
    created = parse_ts(latest.created) if latest is not None and latest.phase == "Pending" else None
    if created is None or start_deadline_seconds is None:
        return None
    return max(0.5, start_deadline_seconds - (now - created).total_seconds() + 0.5)  # 0.5: passed
