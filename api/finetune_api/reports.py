"""The trainer -> operator report protocol: one JSON object per line on stdout, behind a fixed marker.

Why logs: trainer pods hold no Kubernetes API rights, and a pod's log can only be read through its own pod,
so no job can report into another job's status. The operator reads the trainer pod's log (it needs only
`pods/log get` in namespaces it serves) and folds these reports into status. The final report is also
written to the pod's termination message, so the verdict survives log rotation.

Line format (stable, documented in docs/progress-protocol.md):

    ##finetune {"seq": 12, "kind": "progress", "time": "...", "step": 40, "totalSteps": 120, ...}
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from enum import StrEnum
from typing import Any

from pydantic import Field, ValidationError

from finetune_api.plan import Estimate
from finetune_api.spec import ApiModel

MARKER = "##finetune "

# The trainer's exit codes: the operator's retry policy reads them (docs/progress-protocol.md, "Exit codes").
EXIT_OK = 0  # model, report and manifest uploaded
EXIT_RETRYABLE = 1  # anything else (crash, storage outage past its retry deadline): retry, counted
EXIT_USER_ERROR = 2  # the job itself is wrong (config, data, model, storage access): final, never retried
# Stopped by SIGTERM/SIGINT (pod deletion, eviction, drain, preemption, suspend) after saving a checkpoint
# when it was training: resumable, and not the job's fault. EX_TEMPFAIL from sysexits.h; deliberately not
# 143 (128 + SIGTERM), which is what a process killed by an unhandled SIGTERM reports.
EXIT_INTERRUPTED = 75


class ReportKind(StrEnum):
    STAGE = "stage"  # downloading, preparing, training, evaluating, uploading
    PROGRESS = "progress"  # step, loss, learning rate, tokens/s, ETA
    EVAL = "eval"  # evaluation metrics
    CHECKPOINT = "checkpoint"  # a checkpoint finished uploading
    OUTPUT = "output"  # the final model and manifest are uploaded
    ERROR = "error"  # the trainer is failing, with a reason the user can act on
    PLAN = "plan"  # the preflight's estimate (memory, FLOPs, time), before any GPU is held


class Report(ApiModel):
    """One trainer report. Unused fields are left out of the line."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    seq: int = Field(description="Monotonic per trainer process start; with attempt, used to deduplicate.")
    kind: ReportKind = Field(description="What this report is about.")
    time: str = Field(description="When it was emitted (RFC 3339).")
    attempt: str | None = Field(default=None, description="Identifies the trainer process (pod name).")
    stage: str | None = None
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    uri: str | None = None
    manifest: str | None = None
    reason: str | None = None
    message: str | None = None
    final: bool | None = Field(
        default=None,
        description="On an error: retrying cannot help (a user error). The trainer then waits for the operator "
        "to stop its Job before exiting 2, so no second attempt starts (Kubernetes < 1.26 has no podFailurePolicy).",
    )
    estimate: Estimate | None = Field(default=None, description="A plan report: the planner's estimate.")


def format_report(report: Report) -> str:
    """The single line the trainer prints."""
    return MARKER + json.dumps(report.dump(), separators=(",", ":"), sort_keys=True)


def parse_reports(lines: Iterable[str]) -> Iterator[Report]:
    """Reports found in log text; other lines and malformed reports are skipped (a log is not trusted input)."""
    for line in lines:
        idx = line.find(MARKER)
        if idx < 0:
            continue
        payload = line[idx + len(MARKER) :].strip()
        try:
            data: Any = json.loads(payload)
            yield Report.model_validate(data)
        except (ValueError, ValidationError):
            continue
