"""Validation beyond the CRD schema: the platform's policy, then finetune_api's rules. Pure functions.

The operator owns only platform policy: its limits (GPUs, CPU, memory, deadline), the allowed methods, images
and URI schemes, and the platform-owned defaults (image, resources, storage endpoint and region). Every
training default and cross-field rule lives in ``finetune_api.resolve``; its problems come back as the same
:class:`Problem` type. Every problem names the field (as the tenant wrote it, camelCase) and says what to do.
A job with any problem never gets a pod.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from pydantic import ValidationError

from finetune_api.resolve import Problem, SpecError, check_spec, resolve_spec
from finetune_api.spec import FineTuneJobSpec, MethodType, Toleration
from finetune_operator.config import OperatorConfig
from finetune_operator.quantity import QuantityError, parse_quantity


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


def _check_format(spec: FineTuneJobSpec) -> list[Problem]:
    ds, problems = spec.dataset, []
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
    return problems


def _check_compute(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    res, problems = spec.resources, []
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


def apply_platform_defaults(spec: FineTuneJobSpec, cfg: OperatorConfig) -> FineTuneJobSpec:
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
    return spec.model_copy(update={"resources": res, "storage": storage, "image": spec.image or d.image})


def validate_spec(raw: dict[str, Any], cfg: OperatorConfig) -> ValidationResult:
    """Parse, fill the platform's defaults, check its policy, and resolve the job with finetune_api's rules.

    The returned spec is the resolved one (every training default written into its fields): what the trainer
    gets in its ConfigMap."""
    try:
        parsed = FineTuneJobSpec.model_validate(raw)
    except ValidationError as err:
        return ValidationResult(None, _schema_problems(raw, err))
    spec = apply_platform_defaults(parsed, cfg)
    schemes = set(cfg.limits.allowed_uri_schemes)
    data_schemes = {"s3", "file"}
    problems = [
        *_check_uri("spec.model.uri", spec.model.uri, {"s3", "file", "hf"}, list(schemes)),
        *_check_uri("spec.model.tokenizerUri", spec.model.tokenizer_uri, {"s3", "file", "hf"}, list(schemes)),
        *_check_uri("spec.dataset.train", spec.dataset.train, data_schemes, list(schemes)),
        *_check_uri("spec.dataset.validation", spec.dataset.validation, data_schemes, list(schemes)),
        *_check_uri("spec.output.uri", spec.output.uri, data_schemes, list(schemes)),
        *_check_format(spec),
        *check_spec(spec),
        *_check_compute(spec, cfg),
    ]
    if spec.storage.endpoint and urlparse(spec.storage.endpoint).scheme not in ("http", "https"):
        problems.append(Problem("InvalidURI", "spec.storage.endpoint", "must be an http:// or https:// URL"))
    if problems:
        return ValidationResult(None, problems)
    try:
        resolved = resolve_spec(spec)
    except SpecError as err:  # check_spec found nothing above, so this cannot happen; kept typed all the same
        return ValidationResult(None, list(err.problems))
    return ValidationResult(resolved.spec, [])
