"""The trainer's configuration: the FineTuneJob spec itself, plus the few values derived from it.

TRL-style: there is no second config format. The operator writes the resolved FineTuneJob to a YAML file,
the trainer validates it with the shared pydantic models and derives everything that depends on the task,
the method or the model's architecture in ONE place (``resolve``), so the rest of the trainer never guesses
a default of its own.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from finetune_api.spec import FineTuneJobSpec, MethodType, Task
from finetune_api.status import FineTuneJob

LR_LORA = 2e-4
LR_FULL = 5e-5
DEFAULT_EVAL_SAMPLES = 200

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# LoRA target modules per `config.model_type`. Attention projections are the usual choice; for the
# Llama family the MLP projections too (the QLoRA paper's "all linear layers" setting).
TARGET_MODULES: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "opt": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
}

# The freshly initialised classification head must be trained (and saved) in full next to the adapters.
CLASSIFIER_HEADS: dict[str, list[str]] = {
    "bert": ["classifier"],
    "roberta": ["classifier"],
    "xlm-roberta": ["classifier"],
    "distilbert": ["pre_classifier", "classifier"],
    "deberta-v2": ["pooler", "classifier"],
}
DECODER_HEAD = ["score"]  # *ForSequenceClassification of decoder-only models

# Metrics per task; `evaluation.metrics` may only pick from these.
TASK_METRICS: dict[str, list[str]] = {
    Task.CAUSAL_LM: ["loss", "perplexity", "exact_match", "token_f1", "bleu", "rouge"],
    Task.INSTRUCTION: ["loss", "perplexity", "exact_match", "token_f1", "bleu", "rouge"],
    Task.CHAT: ["loss", "perplexity", "exact_match", "token_f1", "bleu", "rouge"],
    Task.SEQ2SEQ: ["loss", "rouge", "bleu", "exact_match", "token_f1"],
    Task.CLASSIFICATION: ["loss", "accuracy", "precision", "recall", "f1"],
}
# Metrics the Trainer can see at each evaluation during training (generation metrics only exist after it).
_TRAINING_EVAL_METRICS = {
    Task.CLASSIFICATION: {"loss", "accuracy", "precision", "recall", "f1"},
}
_LOWER_IS_BETTER = {"loss", "perplexity"}


class UserError(Exception):
    """A problem the user must fix (bad config, missing data or model): retrying cannot help -> exit 2."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class Resolved:
    """Values derived from the spec and the model's architecture. Everything else is read from the spec."""

    model_type: str
    learning_rate: float
    target_modules: list[str] | str | None
    modules_to_save: list[str] | None
    packing: bool
    block_size: int
    eval_batch_size: int
    eval_max_samples: int
    metrics: list[str]
    best_metric: str | None  # Trainer name, e.g. "eval_loss"
    greater_is_better: bool | None
    eval_steps: int | None
    save_steps: int | None

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


def _best_metric(spec: FineTuneJobSpec) -> tuple[str | None, bool | None]:
    """The Trainer's metric_for_best_model and greater_is_better, validated against what the task measures."""
    name = spec.evaluation.best_model_metric
    if name is None and spec.hyperparameters.early_stopping is not None:
        name = "eval_loss"  # early stopping needs a metric; loss is the one every task has
    if name is None:
        return None, None
    short = name.removeprefix("eval_")
    if short == "perplexity":
        short = "loss"  # same ordering as exp(loss), and the Trainer computes loss at every evaluation
    allowed = _TRAINING_EVAL_METRICS.get(Task(spec.task), {"loss"})
    if short not in allowed:
        raise UserError(
            "InvalidConfig",
            f"evaluation.bestModelMetric {name!r} is not computed during training for task {spec.task}; "
            f"use one of {', '.join(sorted('eval_' + m for m in allowed))}",
        )
    return f"eval_{short}", short not in _LOWER_IS_BETTER


def _eval_and_save_steps(spec: FineTuneJobSpec, best: str | None) -> tuple[int | None, int | None]:
    """Evaluation and save intervals (None = per epoch). Picking a best model needs both on the same grid."""
    eval_steps, save_steps = spec.evaluation.steps, spec.checkpoints.every_steps
    if best is None:
        return eval_steps, save_steps
    if eval_steps is None and save_steps is not None:
        eval_steps = save_steps
    elif save_steps is None and eval_steps is not None:
        save_steps = eval_steps
    elif eval_steps is not None and save_steps is not None and save_steps % eval_steps:
        raise UserError(
            "InvalidConfig",
            f"checkpoints.everySteps ({save_steps}) must be a multiple of evaluation.steps ({eval_steps}) "
            "when a best model is selected (evaluation.bestModelMetric or hyperparameters.earlyStopping)",
        )
    return eval_steps, save_steps


def resolve(spec: FineTuneJobSpec, model_type: str) -> Resolved:
    """Every task/method/architecture-dependent default, in one function."""
    task, method, hp = Task(spec.task), MethodType(spec.method.type), spec.hyperparameters
    lr = hp.learning_rate or (LR_FULL if method == MethodType.FULL else LR_LORA)

    target: list[str] | str | None = None
    to_save: list[str] | None = None
    if method != MethodType.FULL:
        target = spec.method.target_modules or TARGET_MODULES.get(model_type) or "all-linear"
        if target == ["all-linear"]:
            target = "all-linear"  # peft's shorthand is a plain string
        if task == Task.CLASSIFICATION:
            to_save = CLASSIFIER_HEADS.get(model_type, DECODER_HEAD)

    allowed = TASK_METRICS[task]
    if spec.evaluation.metrics:
        unknown = [m for m in spec.evaluation.metrics if m not in allowed]
        if unknown:
            raise UserError(
                "InvalidConfig",
                f"evaluation.metrics {unknown} do not apply to task {task}; choose from {', '.join(allowed)}",
            )
        metrics = list(spec.evaluation.metrics)
    else:
        metrics = list(allowed)

    if method == MethodType.QLORA and spec.deepspeed is not None and spec.deepspeed.stage == 3:
        raise UserError("InvalidConfig", "qlora cannot be combined with DeepSpeed ZeRO-3; use stage 2 or lora")
    if spec.deepspeed is not None and spec.deepspeed.offload_params and spec.deepspeed.stage != 3:
        raise UserError("InvalidConfig", "deepspeed.offloadParams needs deepspeed.stage 3")

    best, greater = _best_metric(spec)
    eval_steps, save_steps = _eval_and_save_steps(spec, best)
    packing = hp.packing if hp.packing is not None else task == Task.CAUSAL_LM
    return Resolved(
        model_type=model_type,
        learning_rate=lr,
        target_modules=target,
        modules_to_save=to_save,
        packing=packing,
        block_size=hp.block_size or hp.max_seq_length,
        eval_batch_size=hp.eval_batch_size or hp.batch_size,
        eval_max_samples=spec.evaluation.max_samples or DEFAULT_EVAL_SAMPLES,
        metrics=metrics,
        best_metric=best,
        greater_is_better=greater,
        eval_steps=eval_steps,
        save_steps=save_steps,
    )
