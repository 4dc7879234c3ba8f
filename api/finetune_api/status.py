"""The FineTuneJob status, written only by the operator."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field

from finetune_api.plan import Estimate
from finetune_api.spec import ApiModel, FineTuneJobSpec


class Phase(StrEnum):
    QUEUED = "Queued"
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    CANCELLED = "Cancelled"


TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED})


class ConditionType(StrEnum):
    VALIDATED = "Validated"
    PLANNED = "Planned"  # the CPU preflight checked the data and sized the job (status.estimate)
    WORKLOAD_CREATED = "WorkloadCreated"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Condition(ApiModel):
    """A condition as the Kubernetes API conventions describe it."""

    type: str = Field(description="Validated, Planned, WorkloadCreated, Running, Suspended, Succeeded or Failed.")
    status: str = Field(pattern="^(True|False|Unknown)$", description="True, False or Unknown.")
    reason: str = Field(description="CamelCase machine-readable reason.")
    message: str = Field(default="", description="Human-readable details: what happened and what to do.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="The spec generation this reflects.")


class Progress(ApiModel):
    """Training progress reported by the trainer."""

    summary: str | None = Field(default=None, description='Short form for printing, e.g. "33% (40/120)".')
    step: int = Field(default=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps planned.")
    epoch: float | None = Field(default=None, description="Epochs done (fractional).")
    percent: float | None = Field(default=None, description="step / totalSteps in percent.")
    eta_seconds: float | None = Field(default=None, description="Estimated seconds left.")
    tokens_per_second: float | None = Field(default=None, description="Training throughput.")
    stage: str | None = Field(
        default=None,
        description="What the trainer is doing: downloading, preparing, training, evaluating, uploading.",
    )
    updated_at: str | None = Field(default=None, description="When the trainer reported this.")


class CheckpointRecord(ApiModel):
    """A checkpoint that is completely uploaded."""

    step: int = Field(description="Optimizer step of the checkpoint.")
    uri: str = Field(description="Where it is stored.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Metrics at that step.")


class OutputRecord(ApiModel):
    """The final model."""

    uri: str = Field(description="Prefix of the uploaded model, report and manifest.")
    manifest: str | None = Field(default=None, description="URI of manifest.json, written last.")


class FineTuneJobStatus(ApiModel):
    """Observed state. Everything here is derived from the workload and the trainer's reports."""

    phase: Phase | None = Field(
        default=None,
        description="Queued (waiting for the namespace's quota or queue), Pending, Running, Succeeded, Failed, "
        "Suspended or Cancelled.",
    )
    reason: str | None = Field(default=None, description="Reason of the current phase.")
    message: str | None = Field(default=None, description="Human-readable explanation of the current phase.")
    conditions: list[Condition] = Field(default_factory=list, description="Conditions (API conventions).")
    observed_generation: int | None = Field(default=None, description="Spec generation last acted on.")
    workload: str | None = Field(default=None, description="Name of the batch Job running the trainer.")
    attempts: int = Field(
        default=0, description="Trainer pods started so far (retries resume); for a gang, gang starts."
    )
    workers: str | None = Field(
        default=None, description='Worker pods running / wanted, e.g. "2/2" (jobs with resources.workers > 1).'
    )
    trainer_pods: list[str] = Field(
        default_factory=list,
        description="Names of the trainer pods seen so far (the newest 32), for counting attempts.",
    )
    failures: int = Field(
        default=0,
        description="Attempts that failed by themselves (crash, OOM kill): these count against runPolicy.backoffLimit.",
    )
    interruptions: int = Field(
        default=0,
        description="Attempts stopped from outside (pod deleted or evicted, node drained, preempted, SIGTERM): "
        "retried from the last checkpoint without counting against runPolicy.backoffLimit.",
    )
    finished_pods: list[str] = Field(
        default_factory=list,
        description="Trainer pods already counted as a failure or interruption (the newest 32).",
    )
    queued_since: str | None = Field(default=None, description="When the job started waiting for quota.")
    active_seconds: int = Field(
        default=0,
        description="Seconds the trainer's Job ran before the last suspension; runPolicy.activeDeadlineSeconds "
        "counts only running time, so a resumed Job gets the rest.",
    )
    start_time: str | None = Field(default=None, description="When the first trainer pod started.")
    completion_time: str | None = Field(default=None, description="When the job reached Succeeded or Failed.")
    progress: Progress | None = Field(default=None, description="Latest training progress.")
    loss: float | None = Field(default=None, description="Latest training loss (a printer column).")
    metrics: dict[str, float] = Field(default_factory=dict, description="Latest metrics (train and eval).")
    checkpoints: list[CheckpointRecord] = Field(default_factory=list, description="Uploaded checkpoints kept.")
    output: OutputRecord | None = Field(default=None, description="The final model, once uploaded.")
    estimate: Estimate | None = Field(
        default=None, description="The preflight planner's estimate, before any GPU is held."
    )
    notified: str | None = Field(
        default=None, description="The terminal phase whose notification pod was started (spec.notification)."
    )


class FineTuneJobMeta(ApiModel):
    """The part of metadata the trainer and the CLI need."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    name: str = Field(default="local", description="Object name.")
    namespace: str | None = Field(default=None, description="Namespace.")
    uid: str | None = Field(default=None, description="Object UID.")
    generation: int | None = Field(default=None, description="Spec generation.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")


class FineTuneJob(ApiModel):
    """A whole FineTuneJob object, as in a YAML file or the resolved config the operator hands the trainer."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    api_version: str = Field(default="finetune.dev/v1alpha1", description="API version.")
    kind: str = Field(default="FineTuneJob", description="Kind.")
    metadata: FineTuneJobMeta = Field(default_factory=FineTuneJobMeta, description="Metadata.")
    spec: FineTuneJobSpec = Field(description="Desired state.")
    status: FineTuneJobStatus | None = Field(default=None, description="Observed state.")

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> FineTuneJob:
        return cls.model_validate(obj)
