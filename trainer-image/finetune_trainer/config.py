"""The trainer's configuration: the resolved FineTuneJob, plus the facts of the model's architecture.

There is no second config format and no default of the trainer's own. The operator writes the FineTuneJob
resolved by ``finetune_api.resolve`` (every training default filled in) to a YAML file; the trainer reads it,
resolves it again with the same function (idempotent: a resolved spec stays as it is; a hand-written file gets
the same defaults and the same rules) and uses the values as they are. What the trainer adds needs the model's
config.json: table lookups by ``model_type`` (LoRA target modules, classifier heads, and which architectures
pack instruction/chat samples exactly), in :func:`architecture`; the tables live in ``finetune_api.architectures``
(the preflight planner counts LoRA parameters with the same ones).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from finetune_api.architectures import (
    CLASSIFIER_HEADS,
    DECODER_HEAD,
    PACKING_MODEL_TYPES,
    default_targets,
)
from finetune_api.resolve import ResolvedJob, ResolvedTraining, SpecError, resolve_spec
from finetune_api.spec import FineTuneJobSpec, MethodType, Task
from finetune_api.status import FineTuneJob


class UserError(Exception):
    """A problem the user must fix (bad config, missing data or model): retrying cannot help -> exit 2."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Architecture:
    """What the model's architecture decides (from config.json's model_type), by table lookup."""

    model_type: str
    target_modules: list[str] | str | None  # None: full fine-tuning
    modules_to_save: list[str] | None  # classification heads trained in full next to the adapters

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_job(path: str | os.PathLike[str]) -> FineTuneJob:
    """Read and validate the FineTuneJob YAML; any problem is a UserError naming the file and the field."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError("ConfigNotFound", f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise UserError("InvalidConfig", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError("InvalidConfig", f"{path} must hold a FineTuneJob object (a YAML mapping)")
    if "spec" not in raw and "model" in raw:
        raw = {"spec": raw}  # a bare spec is accepted too (handy for local runs)
    try:
        return FineTuneJob.from_obj(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise UserError("InvalidConfig", f"{path}: {problems}") from None


def resolve_job(spec: FineTuneJobSpec) -> ResolvedJob:
    """finetune_api's resolution of the spec; a rule it breaks is a user error naming every problem."""
    try:
        return resolve_spec(spec)
    except SpecError as err:
        raise UserError("InvalidConfig", "; ".join(f"{p} [{p.reason}]" for p in err.problems)) from None


def architecture(spec: FineTuneJobSpec, training: ResolvedTraining, model_type: str) -> Architecture:
    """Table lookups by ``model_type``; refuses (user error) what this architecture cannot do correctly."""
    task, method = Task(spec.task), MethodType(spec.method.type)
    if training.packing and task in (Task.INSTRUCTION, Task.CHAT) and model_type not in PACKING_MODEL_TYPES:
        raise UserError(
            "PackingUnsupported",
            f"hyperparameters.packing for {task} needs an architecture whose attention keeps packed samples apart "
            f"(one of {', '.join(sorted(PACKING_MODEL_TYPES))}); {model_type} is not one: set packing: false",
        )
    if method == MethodType.FULL:
        return Architecture(model_type, None, None)
    # peft's "all-linear" when the architecture is not in the table: every linear layer but the output head.
    target = training.target_modules or default_targets(model_type)
    to_save = CLASSIFIER_HEADS.get(model_type, DECODER_HEAD) if task == Task.CLASSIFICATION else None
    return Architecture(model_type, target, to_save)
