"""The one home of every training default and every cross-field rule of a FineTuneJob spec. Pure functions.

``resolve_spec(spec)`` checks the spec's cross-field rules and returns a :class:`ResolvedJob`:

* ``spec``: the same spec with every training default written into its own fields (learningRate, packing,
  blockSize, groupByLength, evalBatchSize, evaluation.metrics, evaluation.maxSamples, evaluation.bestModelMetric
  when early stopping needs one, evaluation.steps / checkpoints.everySteps on one grid when a best model is
  picked). This is what the operator writes into the ConfigMap the trainer reads, and what the manifest records.
* ``training``: a typed view of those values with nothing optional left to guess (the Trainer's metric name,
  greater-is-better, ...).

Resolution is idempotent: resolving a resolved spec changes nothing, so the trainer, which resolves the file it
is given with this same function, trains exactly what the operator resolved (and a hand-written file gets the
same defaults). Platform-owned defaults (image, resources, storage endpoint) are not here: the operator fills
them from its policy first. Architecture facts (LoRA target modules per ``model_type``, classifier heads, which
architectures pack instruction/chat samples exactly) need the model's config.json and stay table lookups in the
trainer.

Problems are raised as :class:`SpecError`, a list of :class:`Problem` (reason, field path, message).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from finetune_api.spec import (
    ApiModel,
    FineTuneJobSpec,
    MethodType,
    Optimizer,
    Precision,
    Quantization,
    SplitStrategy,
    Task,
)

LR_LORA = 2e-4
LR_FULL = 5e-5
DEFAULT_EVAL_SAMPLES = 200

# Metrics per task; evaluation.metrics may only pick from these. Order = report order.
TASK_METRICS: dict[Task, list[str]] = {
    Task.CAUSAL_LM: ["loss", "perplexity", "exact_match", "token_f1", "bleu", "rouge"],
    Task.INSTRUCTION: ["loss", "perplexity", "exact_match", "token_f1", "bleu", "rouge"],
    Task.CHAT: ["loss", "perplexity", "exact_match", "token_f1", "bleu", "rouge"],
    Task.SEQ2SEQ: ["loss", "rouge", "bleu", "exact_match", "token_f1"],
    Task.CLASSIFICATION: ["loss", "accuracy", "precision", "recall", "f1"],
}
# Metric names as the trainer reports them (eval_<name>), for bestModelMetric.
REPORTED = {"rouge": ["rouge1", "rouge2", "rougeL"]}
# Metrics the Trainer computes at every evaluation during training (generation metrics exist only after it).
TRAINING_EVAL_METRICS: dict[Task, set[str]] = {Task.CLASSIFICATION: {"loss", "accuracy", "precision", "recall", "f1"}}
LOWER_IS_BETTER = {"loss", "perplexity"}
# Tasks whose samples can be packed, and how: causal-lm concatenates and cuts blocks; instruction and chat pack
# whole samples per block, each attending only to itself (position ids restart per sample).
PACKABLE_TASKS = {Task.CAUSAL_LM, Task.INSTRUCTION, Task.CHAT}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec: a CamelCase reason, the field as the tenant wrote it, and what to do."""

    reason: str  # InvalidField, TemplateError, UnsupportedCombination, GPURequired, ...
    field: str  # e.g. spec.dataset.template.prompt
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class SpecError(ValueError):
    """The spec breaks one or more cross-field rules."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = problems


class ResolvedTraining(ApiModel):
    """Every training value the trainer uses that the spec may leave to a default, resolved."""

    learning_rate: float = Field(description="Peak learning rate.")
    packing: bool = Field(description="Whether samples are packed into blocks.")
    block_size: int | None = Field(description="Packing block length in tokens; null without packing.")
    group_by_length: bool = Field(description="Whether training batches are drawn from samples of similar length.")
    eval_batch_size: int = Field(description="Per-device evaluation batch size.")
    eval_max_samples: int = Field(description="Validation rows used for generation metrics and samples.")
    metrics: list[str] = Field(description="Metrics reported after training.")
    best_metric: str | None = Field(description="The Trainer's metric_for_best_model, e.g. eval_loss; null: none.")
    greater_is_better: bool | None = Field(description="Direction of best_metric.")
    eval_steps: int | None = Field(description="Evaluate every N steps; null: once per epoch.")
    save_steps: int | None = Field(description="Save a checkpoint every N steps; null: once per epoch.")
    target_modules: list[str] | str | None = Field(
        description='LoRA target modules as the tenant set them ("all-linear" as a string); null: the trainer '
        "looks them up by the model's architecture; also null for full fine-tuning."
    )


class ResolvedJob(ApiModel):
    """A spec with every training default filled in, and the typed training view of it."""

    spec: FineTuneJobSpec
    training: ResolvedTraining


# ---- rules -----------------------------------------------------------------------------------------------


def _template_fields(field: str, text: str) -> tuple[set[str], list[Problem]]:
    """The column names a template's {placeholders} use. A placeholder is a plain column name: attribute and
    index access ({q.__class__}, {q[0]}), positional fields ({0}, {}), conversions ({q!r}) and format specs
    ({q:>10}) are refused, so filling a template can only ever insert a row's values."""
    names: set[str] = set()
    problems: list[Problem] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        return names, [Problem("TemplateError", field, f"{exc}; write literal braces as {{{{ and }}}}")]
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        if not name.isidentifier():
            problems.append(
                Problem(
                    "TemplateError",
                    field,
                    f"placeholder {shown} is not a column name: write {{column}}; attribute and index access "
                    "and positional fields are not allowed",
                )
            )
        elif spec or conv:
            problems.append(
                Problem(
                    "TemplateError",
                    field,
                    f"placeholder {shown} may not carry a conversion or format; write {{{name}}}",
                )
            )
        else:
            names.add(name)
    return names, problems


def _check_template(spec: FineTuneJobSpec) -> list[Problem]:
    ds = spec.dataset
    problems: list[Problem] = []
    if spec.task == Task.INSTRUCTION and ds.template is None:
        return [
            Problem(
                "TemplateError",
                "spec.dataset.template",
                'instruction tasks need a template, e.g. prompt: "### Question:\\n{question}\\n### Answer:\\n", '
                'response: "{answer}"',
            )
        ]
    if ds.template is None:
        return []
    if spec.task in (Task.CHAT, Task.CLASSIFICATION):
        return [
            Problem(
                "UnsupportedCombination",
                "spec.dataset.template",
                f"{spec.task} tasks take no template (chat uses the tokenizer's chat template; "
                "classification uses fields.text)",
            )
        ]
    used: set[str] = set()
    for part in ("prompt", "response"):
        names, errs = _template_fields(f"spec.dataset.template.{part}", getattr(ds.template, part))
        used |= names
        problems += errs
    if spec.task == Task.INSTRUCTION and not ds.template.response.strip():
        problems.append(
            Problem("TemplateError", "spec.dataset.template.response", "instruction tasks need a response part")
        )
    if not used and not problems:
        problems.append(Problem("TemplateError", "spec.dataset.template", "the template uses no {field}"))
    if spec.task != Task.INSTRUCTION and not ds.template.loss_on_response_only:
        problems.append(
            Problem(
                "UnsupportedCombination",
                "spec.dataset.template.lossOnResponseOnly",
                f"applies to instruction tasks only; {spec.task} computes the loss as it always does",
            )
        )
    # A placeholder must name a column that exists after rename/drop: an old name that was renamed away, or a
    # dropped column, can never be filled.
    for name in sorted(used):
        if name in ds.drop_columns:
            problems.append(
                Problem("TemplateError", "spec.dataset.template", f"{{{name}}} names a column listed in dropColumns")
            )
        elif name in ds.rename and ds.rename[name] != name:
            problems.append(
                Problem(
                    "TemplateError",
                    "spec.dataset.template",
                    f"{{{name}}} was renamed to {ds.rename[name]!r} by dataset.rename; use {{{ds.rename[name]}}}",
                )
            )
    return problems


def needed_field(spec: FineTuneJobSpec) -> str | None:
    """The `dataset.fields` role the task reads when there is no template."""
    if spec.dataset.template is not None:
        return None
    return {
        Task.CAUSAL_LM: "text",
        Task.CLASSIFICATION: "text",
        Task.CHAT: "messages",
        Task.SEQ2SEQ: "input",
    }.get(Task(spec.task))


def _check_data(spec: FineTuneJobSpec) -> list[Problem]:
    ds, problems = spec.dataset, []
    if ds.split.strategy == SplitStrategy.STRATIFIED and spec.task != Task.CLASSIFICATION:
        problems.append(
            Problem(
                "UnsupportedCombination",
                "spec.dataset.split.strategy",
                "stratified splits need class labels (task: classification); use random or tfidf-cluster",
            )
        )
    if ds.labels is not None and spec.task != Task.CLASSIFICATION:
        problems.append(Problem("UnsupportedCombination", "spec.dataset.labels", "only for classification"))
    if ds.labels is not None and len(set(ds.labels)) != len(ds.labels):
        problems.append(Problem("InvalidField", "spec.dataset.labels", "label names must be unique"))
    if ds.labels is not None and len(ds.labels) < 2:
        problems.append(Problem("InvalidField", "spec.dataset.labels", "classification needs at least 2 labels"))
    role = needed_field(spec)
    for col in ds.drop_columns:
        if role and ds.fields.model_dump()[role] == col:
            problems.append(
                Problem("InvalidField", "spec.dataset.dropColumns", f"{col!r} is the {role} column the task needs")
            )
    return problems


def _check_packing(spec: FineTuneJobSpec) -> list[Problem]:
    hp, task, problems = spec.hyperparameters, Task(spec.task), []
    if hp.packing and task not in PACKABLE_TASKS:
        problems.append(
            Problem(
                "UnsupportedCombination",
                "spec.hyperparameters.packing",
                f"packing does not apply to {task}; it applies to causal-lm, instruction and chat",
            )
        )
    packing = _packing(spec)
    if hp.group_by_length and packing:
        problems.append(
            Problem(
                "UnsupportedCombination",
                "spec.hyperparameters.groupByLength",
                "packed rows hold no padding, so grouping them by length saves nothing; it applies only without "
                "packing (set packing: false, or leave groupByLength unset)",
            )
        )
    if hp.block_size is not None and not packing:
        problems.append(
            Problem(
                "UnsupportedCombination",
                "spec.hyperparameters.blockSize",
                "blockSize is the packing block length; it applies only with packing (causal-lm by default, "
                "instruction and chat with packing: true)",
            )
        )
    elif hp.block_size is not None and task != Task.CAUSAL_LM and hp.block_size < hp.max_seq_length:
        problems.append(
            Problem(
                "UnsupportedCombination",
                "spec.hyperparameters.blockSize",
                f"{task} packing puts whole samples (up to maxSeqLength {hp.max_seq_length} tokens) into blocks; "
                "blockSize must be at least maxSeqLength",
            )
        )
    return problems


def _check_evaluation(spec: FineTuneJobSpec) -> list[Problem]:
    ev, task, problems = spec.evaluation, Task(spec.task), []
    allowed = TASK_METRICS[task]
    for m in ev.metrics or []:
        if m not in allowed:
            problems.append(
                Problem(
                    "InvalidField",
                    "spec.evaluation.metrics",
                    f"{m!r} does not apply to {task}; choose from {', '.join(sorted(allowed))}",
                )
            )
    if ev.metrics is not None and len(set(ev.metrics)) != len(ev.metrics):
        problems.append(Problem("InvalidField", "spec.evaluation.metrics", "metrics must be unique"))
    has_eval = spec.dataset.validation is not None or spec.dataset.split.validation_ratio > 0
    if ev.best_model_metric:
        chosen = set(ev.metrics or allowed)
        names = {"eval_loss"} | {f"eval_{r}" for m in chosen for r in REPORTED.get(m, [m])}
        training = TRAINING_EVAL_METRICS.get(task, LOWER_IS_BETTER)
        if ev.best_model_metric not in names:
            problems.append(
                Problem(
                    "InvalidField",
                    "spec.evaluation.bestModelMetric",
                    f"{ev.best_model_metric!r} is not reported; choose from {', '.join(sorted(names))}",
                )
            )
        elif ev.best_model_metric.removeprefix("eval_") not in training:
            # Generation metrics are computed once after training, not at every evaluation.
            problems.append(
                Problem(
                    "UnsupportedCombination",
                    "spec.evaluation.bestModelMetric",
                    f"for {task} only {', '.join(sorted('eval_' + m for m in training))} are computed during training",
                )
            )
    best = ev.best_model_metric or spec.hyperparameters.early_stopping
    if best and not has_eval:
        problems.append(
            Problem(
                "UnsupportedCombination",
                "spec.evaluation",
                "bestModelMetric and earlyStopping need validation data: set dataset.validation or "
                "dataset.split.validationRatio > 0",
            )
        )
    every, steps = spec.checkpoints.every_steps, ev.steps
    if best and (every is None) != (steps is None):
        problems.append(
            Problem(
                "UnsupportedCombination",
                "spec.checkpoints.everySteps",
                "with bestModelMetric or earlyStopping set both checkpoints.everySteps and evaluation.steps, "
                "or neither (then both happen once per epoch)",
            )
        )
    elif best and every and steps and every % steps:
        problems.append(
            Problem(
                "UnsupportedCombination",
                "spec.checkpoints.everySteps",
                f"must be a multiple of evaluation.steps ({steps}) when bestModelMetric or earlyStopping is set",
            )
        )
    if steps is not None and not has_eval:
        problems.append(
            Problem(
                "UnsupportedCombination",
                "spec.evaluation.steps",
                "there is no validation data to evaluate: set dataset.validation or dataset.split.validationRatio > 0",
            )
        )
    return problems


def _check_method(spec: FineTuneJobSpec) -> list[Problem]:
    method, m, problems = MethodType(spec.method.type), spec.method, []
    if method == MethodType.FULL:
        lora_only = {"rank": 8, "alpha": 16, "dropout": 0.05, "target_modules": None, "merge_adapter": False}
        for name, default in lora_only.items():
            if getattr(m, name) != default:
                alias = type(m).model_fields[name].alias or name
                problems.append(
                    Problem(
                        "UnsupportedCombination",
                        f"spec.method.{alias}",
                        "applies to lora and qlora only (method.type full trains every weight)",
                    )
                )
    if method != MethodType.QLORA and m.quantization != Quantization():
        problems.append(
            Problem("UnsupportedCombination", "spec.method.quantization", "applies to method.type qlora only")
        )
    return problems


def _check_compute(spec: FineTuneJobSpec) -> list[Problem]:
    hp, problems = spec.hyperparameters, []
    method = MethodType(spec.method.type)
    gpus = spec.resources.gpus
    needs_gpu = {
        "spec.method.type": method == MethodType.QLORA and "qlora (4-bit bitsandbytes)",
        "spec.hyperparameters.precision": hp.precision == Precision.FP16 and "fp16 mixed precision",
        "spec.hyperparameters.optimizer": hp.optimizer == Optimizer.ADAMW_8BIT and "the 8-bit AdamW optimizer",
    }
    # gpus unset: the platform's default is not known here (the operator fills it first); the trainer then
    # checks its own machine.
    for field, what in needs_gpu.items():
        if what and gpus == 0:
            problems.append(Problem("GPURequired", field, f"{what} needs a GPU; set spec.resources.gpus >= 1"))
    ds = spec.deepspeed
    if ds is not None and ds.offload_params and ds.stage != 3:
        problems.append(
            Problem("UnsupportedCombination", "spec.deepspeed.offloadParams", "parameter offload needs stage 3")
        )
    if ds is not None and method == MethodType.QLORA and ds.stage == 3:
        problems.append(
            Problem("UnsupportedCombination", "spec.deepspeed.stage", "qlora cannot shard 4-bit weights; use 0 or 2")
        )
    if hp.warmup_steps and hp.warmup_ratio:
        problems.append(
            Problem(
                "UnsupportedCombination",
                "spec.hyperparameters.warmupRatio",
                "set warmupSteps or warmupRatio, not both (warmupSteps would win)",
            )
        )
    return problems


def check_spec(spec: FineTuneJobSpec) -> list[Problem]:
    """Every cross-field rule; an empty list means the spec can be resolved."""
    return [
        *_check_template(spec),
        *_check_data(spec),
        *_check_packing(spec),
        *_check_evaluation(spec),
        *_check_method(spec),
        *_check_compute(spec),
    ]


# ---- defaults --------------------------------------------------------------------------------------------


def _packing(spec: FineTuneJobSpec) -> bool:
    """Default: on for causal-lm (concatenate and cut blocks), off for every other task."""
    packing = spec.hyperparameters.packing
    return packing if packing is not None else spec.task == Task.CAUSAL_LM


def _best_metric(spec: FineTuneJobSpec) -> str | None:
    if spec.evaluation.best_model_metric is not None:
        return spec.evaluation.best_model_metric
    # Early stopping needs a metric; loss is the one every task computes at each evaluation.
    return "eval_loss" if spec.hyperparameters.early_stopping is not None else None


def _trainer_metric(name: str | None) -> tuple[str | None, bool | None]:
    """The Trainer's metric_for_best_model and greater_is_better for a bestModelMetric."""
    if name is None:
        return None, None
    short = name.removeprefix("eval_")
    if short == "perplexity":
        short = "loss"  # same ordering as exp(loss), and the Trainer computes loss at every evaluation
    return f"eval_{short}", short not in LOWER_IS_BETTER


def _fill(spec: FineTuneJobSpec) -> FineTuneJobSpec:
    hp, ev = spec.hyperparameters, spec.evaluation
    task, method = Task(spec.task), MethodType(spec.method.type)
    packing = _packing(spec)
    hp = hp.model_copy(
        update={
            "learning_rate": hp.learning_rate or (LR_FULL if method == MethodType.FULL else LR_LORA),
            "packing": packing,
            "block_size": (hp.block_size or hp.max_seq_length) if packing else None,
            # Per-batch padding wastes least when a batch's samples have similar lengths; packing has no padding.
            "group_by_length": (hp.group_by_length if hp.group_by_length is not None else True) and not packing,
            "eval_batch_size": hp.eval_batch_size or hp.batch_size,
        }
    )
    ev = ev.model_copy(
        update={
            "metrics": list(ev.metrics) if ev.metrics else list(TASK_METRICS[task]),
            "max_samples": ev.max_samples or DEFAULT_EVAL_SAMPLES,
            "best_model_metric": _best_metric(spec),
        }
    )
    return spec.model_copy(update={"hyperparameters": hp, "evaluation": ev})


def _training(spec: FineTuneJobSpec) -> ResolvedTraining:
    hp, ev, m = spec.hyperparameters, spec.evaluation, spec.method
    assert hp.learning_rate is not None and hp.eval_batch_size is not None and hp.packing is not None
    assert hp.group_by_length is not None
    assert ev.max_samples is not None and ev.metrics is not None
    best, greater = _trainer_metric(ev.best_model_metric)
    target: list[str] | str | None = None
    if MethodType(m.type) != MethodType.FULL and m.target_modules:
        target = "all-linear" if m.target_modules == ["all-linear"] else list(m.target_modules)
    return ResolvedTraining(
        learning_rate=hp.learning_rate,
        packing=hp.packing,
        block_size=hp.block_size,
        group_by_length=hp.group_by_length,
        eval_batch_size=hp.eval_batch_size,
        eval_max_samples=ev.max_samples,
        metrics=list(ev.metrics),
        best_metric=best,
        greater_is_better=greater,
        eval_steps=ev.steps,
        save_steps=spec.checkpoints.every_steps,
        target_modules=target,
    )


def resolve_spec(spec: FineTuneJobSpec) -> ResolvedJob:
    """Check every cross-field rule and fill every training default; raises SpecError listing all problems."""
    problems = check_spec(spec)
    if problems:
        raise SpecError(problems)
    filled = _fill(spec)
    return ResolvedJob(spec=filled, training=_training(filled))


def field_path(loc: tuple[Any, ...]) -> str:
    """spec.a.b from a pydantic error location."""
    return ".".join(["spec", *(str(p) for p in loc)])
