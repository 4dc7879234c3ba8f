"""Validation beyond the CRD schema, and resolution of policy defaults. Pure functions.

Every problem names the field (as the tenant wrote it, camelCase) and says what to do. A job with any
problem never gets a pod.
"""

from __future__ import annotations

import difflib
import re
import string
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from pydantic import ValidationError

from finetune_api.spec import (
    FineTuneJobSpec,
    MethodType,
    Optimizer,
    Precision,
    SplitStrategy,
    Task,
    Toleration,
)
from finetune_operator.config import OperatorConfig
from finetune_operator.quantity import QuantityError, parse_quantity


@dataclass(frozen=True)
class Problem:
    reason: str  # CamelCase: InvalidField, UnknownField, InvalidURI, UnsupportedCombination, GPURequired, ...
    field: str  # e.g. spec.dataset.template.prompt
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass(frozen=True)
class ValidationResult:
    spec: FineTuneJobSpec | None  # resolved (policy defaults filled in) when there are no problems
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def reason(self) -> str:
        return self.problems[0].reason if self.problems else "Valid"

    @property
    def message(self) -> str:
        return "; ".join(str(p) for p in self.problems)


TASK_METRICS: dict[Task, set[str]] = {
    Task.CAUSAL_LM: {"loss", "perplexity", "exact_match", "token_f1", "bleu", "rouge"},
    Task.INSTRUCTION: {"loss", "perplexity", "exact_match", "token_f1", "bleu", "rouge"},
    Task.CHAT: {"loss", "perplexity", "exact_match", "token_f1", "bleu", "rouge"},
    Task.SEQ2SEQ: {"loss", "rouge", "bleu", "exact_match", "token_f1"},
    Task.CLASSIFICATION: {"loss", "accuracy", "precision", "recall", "f1"},
}
# Metric names as the trainer reports them (eval_<name>), for bestModelMetric.
_REPORTED = {"rouge": ["rouge1", "rouge2", "rougeL"]}
_DATA_EXTENSIONS = re.compile(r"\.(jsonl|ndjson|json|csv|tsv|txt)(\.gz)?$|\.(parquet|pq)$", re.IGNORECASE)
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(["spec", *(str(p) for p in loc)])


def _schema_problems(raw: dict[str, Any], err: ValidationError) -> list[Problem]:
    problems = []
    for e in err.errors():
        field = _loc(e["loc"])
        if e["type"] == "extra_forbidden":
            known = _known_siblings(e["loc"])
            hint = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            extra = f" (did you mean {hint[0]}?)" if hint else f" (known fields: {', '.join(sorted(known))})"
            problems.append(Problem("UnknownField", field, "unknown field" + extra))
        elif e["type"] == "missing":
            problems.append(Problem("MissingField", field, "required field is missing"))
        else:
            problems.append(Problem("InvalidField", field, f"{e['msg']} (got {e.get('input')!r})"))
    return problems


def _known_siblings(loc: tuple[int | str, ...]) -> list[str]:
    """Field aliases allowed next to an unknown key, for the did-you-mean hint."""
    model: Any = FineTuneJobSpec
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return []
        ann = field.annotation
        model = next((a for a in getattr(ann, "__args__", (ann,)) if hasattr(a, "model_fields")), None)
        if model is None and hasattr(ann, "__args__"):  # list[Model]
            inner = ann.__args__[0]
            model = inner if hasattr(inner, "model_fields") else None
    if model is None:
        return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _check_uri(field: str, uri: str | None, schemes: set[str], allowed: list[str]) -> list[Problem]:
    if uri is None:
        return []
    parsed = urlparse(uri)
    scheme = parsed.scheme
    if scheme not in schemes:
        want = ", ".join(f"{s}://" for s in sorted(schemes))
        return [Problem("InvalidURI", field, f"{uri!r} must start with one of {want}")]
    if scheme not in allowed:
        return [Problem("PolicyViolation", field, f"{scheme}:// URIs are not allowed on this platform")]
    if scheme == "s3" and not parsed.netloc:
        return [Problem("InvalidURI", field, f"{uri!r} names no bucket; write s3://BUCKET/KEY")]
    if scheme == "s3" and not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", parsed.netloc):
        return [Problem("InvalidURI", field, f"{parsed.netloc!r} is not a valid S3 bucket name")]
    if scheme == "file" and (parsed.netloc or not parsed.path.startswith("/")):
        return [Problem("InvalidURI", field, f"{uri!r} must be an absolute path: file:///path")]
    if scheme == "hf" and not (parsed.netloc and parsed.path.strip("/")):
        return [Problem("InvalidURI", field, f"{uri!r} must look like hf://ORG/NAME")]
    return []


def _template_fields(field: str, text: str) -> tuple[set[str], list[Problem]]:
    names: set[str] = set()
    try:
        for _, name, spec, conv in string.Formatter().parse(text):
            if name is None:
                continue
            if not name.isidentifier():
                return names, [Problem("TemplateError", field, f"placeholder {{{name}}} is not a column name")]
            if spec or conv:
                return names, [Problem("TemplateError", field, f"placeholder {{{name}}} may not carry a format")]
            names.add(name)
    except ValueError as exc:
        return names, [Problem("TemplateError", field, f"{exc}; write literal braces as {{{{ and }}}}")]
    return names, []


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
    # A placeholder must name a column that exists after rename/drop: an old name that was renamed away, or a
    # dropped column, can never be filled.
    for name in sorted(used):
        if name in ds.drop_columns:
            problems.append(
                Problem(
                    "TemplateError",
                    "spec.dataset.template",
                    f"{{{name}}} names a column listed in dropColumns",
                )
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
    for col in ds.drop_columns:
        fields = ds.fields.model_dump()
        role = _needed_field(spec)
        if role and fields[role] == col:
            problems.append(
                Problem("InvalidField", "spec.dataset.dropColumns", f"{col!r} is the {role} column the task needs")
            )
    if ds.file_format == "auto":
        for name in ("train", "validation"):
            uri = getattr(ds, name)
            if uri and not _DATA_EXTENSIONS.search(uri):
                problems.append(
                    Problem(
                        "InvalidField",
                        f"spec.dataset.{name}",
                        f"cannot tell the format of {uri!r} from its extension; use .jsonl, .json, .csv, .tsv, "
                        ".parquet or .txt (optionally .gz), or set dataset.fileFormat",
                    )
                )
    hp = spec.hyperparameters
    if hp.packing and spec.task in (Task.SEQ2SEQ, Task.CLASSIFICATION):
        problems.append(
            Problem(
                "UnsupportedCombination",
                "spec.hyperparameters.packing",
                f"packing does not apply to {spec.task}",
            )
        )
    if hp.block_size and spec.task != Task.CAUSAL_LM:
        problems.append(
            Problem(
                "UnsupportedCombination",
                "spec.hyperparameters.blockSize",
                "blockSize applies to causal-lm only",
            )
        )
    return problems


def _needed_field(spec: FineTuneJobSpec) -> str | None:
    if spec.dataset.template is not None:
        return None
    return {
        Task.CAUSAL_LM: "text",
        Task.CLASSIFICATION: "text",
        Task.CHAT: "messages",
        Task.SEQ2SEQ: "input",
    }.get(Task(spec.task))


def _check_evaluation(spec: FineTuneJobSpec) -> list[Problem]:
    ev, problems = spec.evaluation, []
    allowed = TASK_METRICS[Task(spec.task)]
    for m in ev.metrics or []:
        if m not in allowed:
            problems.append(
                Problem(
                    "InvalidField",
                    "spec.evaluation.metrics",
                    f"{m!r} does not apply to {spec.task}; choose from {', '.join(sorted(allowed))}",
                )
            )
    has_eval = spec.dataset.validation is not None or spec.dataset.split.validation_ratio > 0
    if ev.best_model_metric:
        chosen = set(ev.metrics or allowed)
        names = {"eval_loss"} | {f"eval_{r}" for m in chosen for r in _REPORTED.get(m, [m])}
        if ev.best_model_metric not in names:
            problems.append(
                Problem(
                    "InvalidField",
                    "spec.evaluation.bestModelMetric",
                    f"{ev.best_model_metric!r} is not reported; choose from {', '.join(sorted(names))}",
                )
            )
        # Generation metrics are computed once after training, not at every evaluation.
        if spec.task != Task.CLASSIFICATION and ev.best_model_metric.removeprefix("eval_") not in (
            "loss",
            "perplexity",
        ):
            problems.append(
                Problem(
                    "UnsupportedCombination",
                    "spec.evaluation.bestModelMetric",
                    f"for {spec.task} only eval_loss is computed during training",
                )
            )
    if (ev.best_model_metric or spec.hyperparameters.early_stopping) and not has_eval:
        problems.append(
            Problem(
                "UnsupportedCombination",
                "spec.evaluation",
                "bestModelMetric and earlyStopping need validation data: set dataset.validation or "
                "dataset.split.validationRatio > 0",
            )
        )
    every, steps = spec.checkpoints.every_steps, ev.steps
    if (ev.best_model_metric or spec.hyperparameters.early_stopping) and (every is None) != (steps is None):
        problems.append(
            Problem(
                "UnsupportedCombination",
                "spec.checkpoints.everySteps",
                "with bestModelMetric or earlyStopping set both checkpoints.everySteps and evaluation.steps, "
                "or neither (then both happen once per epoch)",
            )
        )
    elif ev.best_model_metric and every and steps and every % steps:
        problems.append(
            Problem(
                "UnsupportedCombination",
                "spec.checkpoints.everySteps",
                f"must be a multiple of evaluation.steps ({steps}) when bestModelMetric is set",
            )
        )
    return problems


def _check_compute(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    res, hp, problems = spec.resources, spec.hyperparameters, []
    gpus = res.gpus or 0
    method = MethodType(spec.method.type)
    if method.value not in cfg.limits.allowed_methods:
        problems.append(Problem("PolicyViolation", "spec.method.type", f"{method} is not allowed on this platform"))
    if gpus > cfg.limits.max_gpus_per_job:
        problems.append(
            Problem(
                "PolicyViolation",
                "spec.resources.gpus",
                f"{gpus} GPUs exceeds this platform's limit of {cfg.limits.max_gpus_per_job}",
            )
        )
    needs_gpu = {
        "spec.method.type": method == MethodType.QLORA and "qlora (4-bit bitsandbytes)",
        "spec.hyperparameters.precision": hp.precision == Precision.FP16 and "fp16 mixed precision",
        "spec.hyperparameters.optimizer": hp.optimizer == Optimizer.ADAMW_8BIT and "the 8-bit AdamW optimizer",
    }
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
            Problem(
                "UnsupportedCombination",
                "spec.deepspeed.stage",
                "qlora cannot shard 4-bit weights; use 0 or 2",
            )
        )
    for name, value, limit in (
        ("cpu", res.cpu, cfg.limits.max_cpu),
        ("memory", res.memory, cfg.limits.max_memory),
        ("ephemeralStorage", res.ephemeral_storage, None),
    ):
        try:
            amount = parse_quantity(value)
        except QuantityError as exc:
            problems.append(Problem("InvalidResources", f"spec.resources.{name}", str(exc)))
            continue
        if amount <= 0:
            problems.append(Problem("InvalidResources", f"spec.resources.{name}", "must be greater than zero"))
        elif name == "memory" and amount < 512 * 2**20:
            problems.append(
                Problem(
                    "InvalidResources",
                    "spec.resources.memory",
                    f"{value} is too little for a trainer; >= 512Mi",
                )
            )
        elif limit is not None and amount > parse_quantity(limit):
            problems.append(
                Problem(
                    "PolicyViolation",
                    f"spec.resources.{name}",
                    f"{value} exceeds this platform's limit {limit}",
                )
            )
    if res.gpu_resource_name and not _LABEL_KEY.match(res.gpu_resource_name):
        problems.append(Problem("InvalidResources", "spec.resources.gpuResourceName", "must look like vendor.com/gpu"))
    for key in res.node_selector:
        if not _LABEL_KEY.match(key):
            problems.append(
                Problem("InvalidResources", "spec.resources.nodeSelector", f"{key!r} is not a valid label key")
            )
    rp, limit_deadline = spec.run_policy, cfg.limits.max_active_deadline_seconds
    if limit_deadline and (rp.active_deadline_seconds or limit_deadline + 1) > limit_deadline:
        problems.append(
            Problem(
                "PolicyViolation",
                "spec.runPolicy.activeDeadlineSeconds",
                f"must be set and at most {limit_deadline} on this platform",
            )
        )
    prefixes = cfg.limits.allowed_image_prefixes
    if spec.image and prefixes and not any(spec.image.startswith(p) for p in prefixes):
        problems.append(Problem("PolicyViolation", "spec.image", f"images must come from: {', '.join(prefixes)}"))
    return problems


def resolve(spec: FineTuneJobSpec, cfg: OperatorConfig) -> FineTuneJobSpec:
    """Fill the values the platform team owns (image, resources, storage endpoint) where the tenant left them."""
    d = cfg.defaults
    res = spec.resources.model_copy(
        update={
            "gpus": d.gpus if spec.resources.gpus is None else spec.resources.gpus,
            "gpu_resource_name": spec.resources.gpu_resource_name or d.gpu_resource_name,
            "cpu": spec.resources.cpu if spec.resources.cpu is not None else d.cpu,
            "memory": spec.resources.memory if spec.resources.memory is not None else d.memory,
            "ephemeral_storage": spec.resources.ephemeral_storage or d.ephemeral_storage,
            "node_selector": {**d.node_selector, **spec.resources.node_selector},
            # The platform's tolerations (e.g. for a tainted GPU pool) first, then the tenant's own.
            "tolerations": [Toleration.model_validate(t) for t in d.tolerations] + list(spec.resources.tolerations),
        }
    )
    storage = spec.storage.model_copy(
        update={
            "endpoint": spec.storage.endpoint or d.storage_endpoint,
            "region": spec.storage.region or d.storage_region,
        }
    )
    hp = spec.hyperparameters
    if hp.packing is None:
        hp = hp.model_copy(update={"packing": spec.task == Task.CAUSAL_LM})
    return spec.model_copy(
        update={"resources": res, "storage": storage, "hyperparameters": hp, "image": spec.image or d.image}
    )


def validate_spec(raw: dict[str, Any], cfg: OperatorConfig) -> ValidationResult:
    """Parse, resolve defaults, and check everything the CRD schema cannot express."""
    try:
        parsed = FineTuneJobSpec.model_validate(raw)
    except ValidationError as err:
        return ValidationResult(None, _schema_problems(raw, err))
    spec = resolve(parsed, cfg)
    schemes = set(cfg.limits.allowed_uri_schemes)
    data_schemes = {"s3", "file"}
    problems = [
        *_check_uri("spec.model.uri", spec.model.uri, {"s3", "file", "hf"}, list(schemes)),
        *_check_uri("spec.model.tokenizerUri", spec.model.tokenizer_uri, {"s3", "file", "hf"}, list(schemes)),
        *_check_uri("spec.dataset.train", spec.dataset.train, data_schemes, list(schemes)),
        *_check_uri("spec.dataset.validation", spec.dataset.validation, data_schemes, list(schemes)),
        *_check_uri("spec.output.uri", spec.output.uri, data_schemes, list(schemes)),
        *_check_template(spec),
        *_check_data(spec),
        *_check_evaluation(spec),
        *_check_compute(spec, cfg),
    ]
    if spec.storage.endpoint and urlparse(spec.storage.endpoint).scheme not in ("http", "https"):
        problems.append(Problem("InvalidURI", "spec.storage.endpoint", "must be an http:// or https:// URL"))
    return ValidationResult(spec if not problems else None, problems)
