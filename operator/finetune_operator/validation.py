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
from urllib.parse import unquote, urlparse

from pydantic import ValidationError

from finetune_api.resolve import Problem, SpecError, check_spec, resolve_spec
from finetune_api.spec import FineTuneJobSpec, MethodType, Resources, Toleration
from finetune_operator.config import OperatorConfig, is_vendor_resource
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
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
# Image references (the distribution/reference grammar): [REGISTRY[:PORT]/]PATH[:TAG][@DIGEST].
_REGISTRY = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*(:[0-9]+)?$")
_COMPONENT = re.compile(r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$")


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


def _segments(path: str) -> list[str]:
    """The segments of a URI path: one leading and one trailing slash are not segments."""
    parts = path.split("/")
    if path.startswith("/"):
        parts = parts[1:]
    if parts and parts[-1] == "":
        parts = parts[:-1]
    return parts


def _decoded(segment: str) -> str:
    """A segment with percent-encoding undone, repeatedly (%252e%252e -> %2e%2e -> ..)."""
    for _ in range(4):
        plain = unquote(segment)
        if plain == segment:
            break
        segment = plain
    return segment


def _path_problem(field: str, uri: str, path: str) -> list[Problem]:
    """``..``, ``.`` and empty segments (also percent-encoded, or hidden behind an encoded slash) are refused:
    they would step outside the prefix the policy checked, on S3 keys and file paths alike."""
    for segment in _segments(path):
        plain = _decoded(segment)
        if segment == "":
            what = "an empty path segment (//)"
        elif plain in (".", ".."):
            what = f"the path segment {segment!r}"
        elif "/" in plain or "\\" in plain:
            what = f"an encoded slash in the path segment {segment!r}"
        elif any(ord(c) < 32 or ord(c) == 127 for c in plain):
            what = f"a control character in the path segment {segment!r}"
        else:
            continue
        return [Problem("InvalidURI", field, f"{uri!r} has {what}; . and .. and empty segments are refused")]
    return []


def _under(uri: str, prefix: str) -> bool:
    """Whether ``uri`` lies under ``prefix`` by whole segments: s3://data/ admits s3://data/x, never
    s3://data-evil/x; s3://data/team-a admits s3://data/team-a/x, never s3://data/team-a-b/x. Segments are
    compared as written (an S3 key is not percent-decoded), so an encoded spelling never sneaks past."""
    u, p = urlparse(uri), urlparse(prefix)
    if u.scheme != p.scheme or u.netloc != p.netloc:
        return False
    want = _segments(p.path)
    return _segments(u.path)[: len(want)] == want


def _check_uri(field: str, uri: str | None, schemes: set[str], cfg: OperatorConfig, kind: str) -> list[Problem]:
    """A URI of one ``kind`` (model, data or output): its form, the platform's schemes and its locations."""
    if uri is None:
        return []
    parsed = urlparse(uri)
    scheme = parsed.scheme
    if scheme not in schemes:
        want = ", ".join(f"{s}://" for s in sorted(schemes))
        return [Problem("InvalidURI", field, f"{uri!r} must start with one of {want}")]
    if parsed.query or parsed.fragment or "?" in uri or "#" in uri:
        return [Problem("InvalidURI", field, f"{uri!r} may not contain ? or #")]
    if scheme == "s3" and not parsed.netloc:
        return [Problem("InvalidURI", field, f"{uri!r} names no bucket; write s3://BUCKET/KEY")]
    if scheme == "s3" and not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", parsed.netloc):
        return [Problem("InvalidURI", field, f"{parsed.netloc!r} is not a valid S3 bucket name")]
    if scheme == "file" and (parsed.netloc or not parsed.path.startswith("/")):
        return [Problem("InvalidURI", field, f"{uri!r} must be an absolute path: file:///path")]
    if scheme == "hf" and not (parsed.netloc and parsed.path.strip("/")):
        return [Problem("InvalidURI", field, f"{uri!r} must look like hf://ORG/NAME")]
    bad = _path_problem(field, uri, ("/" + parsed.netloc if scheme == "hf" else "") + parsed.path)
    if bad:
        return bad
    if scheme not in cfg.limits.allowed_uri_schemes:
        why = (
            ": in a trainer pod a file:// path is the pod's own filesystem (an output there is lost when the pod "
            "ends; an input reads the image's files); use s3://"
            if scheme == "file"
            else ""
        )
        return [Problem("PolicyViolation", field, f"{scheme}:// URIs are not allowed on this platform{why}")]
    allowed: list[str] = getattr(cfg.limits.allowed_uris, kind)
    if allowed and not any(_under(uri, prefix) for prefix in allowed):
        return [
            Problem(
                "PolicyViolation",
                field,
                f"{uri!r} is outside the {kind} locations this platform allows: {', '.join(allowed)}",
            )
        ]
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
    if res.workers > cfg.limits.max_workers_per_job:
        problems.append(
            Problem(
                "PolicyViolation",
                "spec.resources.workers",
                f"{res.workers} worker pods exceeds this platform's limit of {cfg.limits.max_workers_per_job}",
            )
        )
    if gpus * res.workers > cfg.limits.max_gpus_per_job:
        total = f"{gpus} GPUs" if res.workers == 1 else f"{gpus} GPUs x {res.workers} workers"
        problems.append(
            Problem(
                "PolicyViolation",
                "spec.resources.gpus",
                f"{total} exceeds this platform's limit of {cfg.limits.max_gpus_per_job} GPUs per job",
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
    rp, limit_deadline = spec.run_policy, cfg.limits.max_active_deadline_seconds
    if limit_deadline and (rp.active_deadline_seconds or limit_deadline + 1) > limit_deadline:
        problems.append(
            Problem(
                "PolicyViolation",
                "spec.runPolicy.activeDeadlineSeconds",
                f"must be set and at most {limit_deadline} on this platform",
            )
        )
    problems += _check_image(spec.image, cfg)
    return problems


def _repository(image: str) -> list[str] | None:
    """The repository path segments of an image reference (tag and digest cut off); None when malformed."""
    name, _, digest = image.partition("@")
    if digest and not _DIGEST.match(digest):
        return None
    head, _, last = name.rpartition("/")
    if ":" in last:
        last, _, tag = last.partition(":")
        if not _TAG.match(tag):
            return None
    segments = [*(head.split("/") if head else []), last]
    first, rest = (segments[0], segments[1:]) if len(segments) > 1 else (None, segments)
    if first is not None and not (_REGISTRY.match(first) or _COMPONENT.match(first)):
        return None
    if not rest or not all(_COMPONENT.match(seg) for seg in rest):
        return None
    return segments


def _image_allowed(segments: list[str], prefix: str) -> bool:
    """Whole segments: registry.corp admits registry.corp/x but neither registry.corp.attacker.io/x nor
    registry.corp:5000/x (list that port to allow it); registry.corp/team/ admits only images below team/;
    registry.corp/team/img admits that repository (any tag) and those below it."""
    want = prefix.removesuffix("/").split("/")
    below = prefix.endswith("/") or len(want) == 1  # one segment names a registry: never an image by itself
    return segments[: len(want)] == want and (len(segments) > len(want) or not below)


def _check_image(image: str | None, cfg: OperatorConfig) -> list[Problem]:
    if not image:
        return []
    segments = _repository(image)
    if segments is None:
        return [Problem("InvalidField", "spec.image", f"{image!r} is not an image reference (REGISTRY/PATH:TAG)")]
    prefixes = cfg.limits.allowed_image_prefixes
    if image != cfg.defaults.image and prefixes and not any(_image_allowed(segments, p) for p in prefixes):
        return [Problem("PolicyViolation", "spec.image", f"images must come from: {', '.join(prefixes)}")]
    return []


def _tolerates_at_least(allowed: Toleration, wanted: Toleration) -> bool:
    """Whether ``allowed`` tolerates every taint that ``wanted`` tolerates (Kubernetes' matching rules)."""
    allowed_op, wanted_op = allowed.operator or "Equal", wanted.operator or "Equal"
    if allowed.key and allowed.key != wanted.key:
        return False
    if not allowed.key and allowed_op != "Exists":
        return False  # an empty key with Equal tolerates nothing useful; never a wildcard
    if allowed_op == "Equal" and (wanted_op != "Equal" or (allowed.value or "") != (wanted.value or "")):
        return False
    if allowed.effect and allowed.effect != wanted.effect:
        return False
    limit = allowed.toleration_seconds
    return limit is None or (wanted.toleration_seconds is not None and wanted.toleration_seconds <= limit)


def _check_placement(tenant: Resources, cfg: OperatorConfig) -> list[Problem]:
    """The tenant's own tolerations, node labels and GPU resource name: only what the policy lists."""
    problems = []
    platform_tolerations = [Toleration.model_validate(t) for t in cfg.defaults.tolerations]
    admitted = [*cfg.limits.allowed_tolerations, *platform_tolerations]
    for i, t in enumerate(tenant.tolerations):
        if not any(_tolerates_at_least(a, t) for a in admitted):
            every = not t.key and t.operator == "Exists"
            shown = "every taint (no key with operator Exists)" if every else _toleration_text(t)
            problems.append(
                Problem(
                    "PolicyViolation",
                    f"spec.resources.tolerations[{i}]",
                    f"this platform does not let jobs tolerate {shown}; allowed: "
                    f"{', '.join(_toleration_text(a) for a in admitted) or 'none'}",
                )
            )
    for key, value in tenant.node_selector.items():
        if not _LABEL_KEY.match(key) or len(key.rpartition("/")[2]) > 63:
            problems.append(
                Problem("InvalidResources", "spec.resources.nodeSelector", f"{key!r} is not a valid label key")
            )
        elif not _LABEL_VALUE.match(value):
            problems.append(
                Problem("InvalidResources", f"spec.resources.nodeSelector.{key}", f"{value!r} is not a label value")
            )
        elif cfg.defaults.node_selector.get(key) != value and not (
            {value, "*"} & set(cfg.limits.allowed_node_selector.get(key, []))
        ):
            problems.append(
                Problem(
                    "PolicyViolation",
                    f"spec.resources.nodeSelector.{key}",
                    f"this platform does not let jobs select nodes by {key}={value}; allowed: "
                    f"{_listed(cfg.limits.allowed_node_selector)}",
                )
            )
    name = tenant.gpu_resource_name
    if name is not None and not is_vendor_resource(name):
        problems.append(
            Problem(
                "InvalidResources",
                "spec.resources.gpuResourceName",
                f"{name!r} is not a GPU: use a device vendor's resource such as nvidia.com/gpu (cpu and memory "
                "are set with resources.cpu and resources.memory)",
            )
        )
    elif (
        name is not None
        and name != cfg.defaults.gpu_resource_name
        and name not in cfg.limits.allowed_gpu_resource_names
    ):
        allowed = sorted({cfg.defaults.gpu_resource_name, *cfg.limits.allowed_gpu_resource_names})
        problems.append(
            Problem(
                "PolicyViolation",
                "spec.resources.gpuResourceName",
                f"{name} is not allowed on this platform; allowed: {', '.join(allowed)}",
            )
        )
    return problems


def _toleration_text(t: Toleration) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in t.dump().items()) + "}"


def _listed(value: object) -> str:
    return str(value) if value else "none"


def _endpoint_allowed(endpoint: str | None, cfg: OperatorConfig) -> bool:
    """The tenant's own storage.endpoint: unset, the platform's, or listed (trailing slashes aside)."""
    allowed = cfg.limits.allowed_storage_endpoints
    if endpoint is None or "*" in allowed:
        return True
    wanted = endpoint.rstrip("/")
    return any(wanted == e.rstrip("/") for e in (cfg.defaults.storage_endpoint, *allowed) if e)


def apply_platform_defaults(spec: FineTuneJobSpec, cfg: OperatorConfig) -> FineTuneJobSpec:
    """Fill the values the platform team owns (image, resources, storage endpoint) where the tenant left them."""
    d = cfg.defaults
    platform = [Toleration.model_validate(t) for t in d.tolerations]
    gpus = d.gpus if spec.resources.gpus is None else spec.resources.gpus
    res = spec.resources.model_copy(
        update={
            "gpus": gpus,
            # What the preflight sizes the job for: the platform's GPU model, unless the tenant named one.
            "gpu_type": spec.resources.gpu_type or (d.gpu_type if gpus else None),
            "gpu_resource_name": spec.resources.gpu_resource_name or d.gpu_resource_name,
            "cpu": spec.resources.cpu if spec.resources.cpu is not None else d.cpu,
            "memory": spec.resources.memory if spec.resources.memory is not None else d.memory,
            "ephemeral_storage": spec.resources.ephemeral_storage or d.ephemeral_storage,
            "node_selector": {**d.node_selector, **spec.resources.node_selector},
            # The platform's tolerations (e.g. for a tainted GPU pool) first, then the tenant's own (only those
            # the policy allows pass validation).
            "tolerations": platform + [t for t in spec.resources.tolerations if t not in platform],
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
    kinds = (
        ("spec.model.uri", spec.model.uri, {"s3", "file", "hf"}, "model"),
        ("spec.model.tokenizerUri", spec.model.tokenizer_uri, {"s3", "file", "hf"}, "model"),
        ("spec.dataset.train", spec.dataset.train, {"s3", "file"}, "data"),
        ("spec.dataset.validation", spec.dataset.validation, {"s3", "file"}, "data"),
        ("spec.output.uri", spec.output.uri, {"s3", "file"}, "output"),
    )
    problems = [
        *(p for field, uri, schemes, kind in kinds for p in _check_uri(field, uri, schemes, cfg, kind)),
        *_check_format(spec),
        *check_spec(spec),
        *_check_compute(spec, cfg),
        *_check_placement(parsed.resources, cfg),
    ]
    if spec.storage.endpoint and urlparse(spec.storage.endpoint).scheme not in ("http", "https"):
        problems.append(Problem("InvalidURI", "spec.storage.endpoint", "must be an http:// or https:// URL"))
    elif not _endpoint_allowed(parsed.storage.endpoint, cfg):
        allowed = [e for e in (cfg.defaults.storage_endpoint, *cfg.limits.allowed_storage_endpoints) if e]
        problems.append(
            Problem(
                "PolicyViolation",
                "spec.storage.endpoint",
                "this platform does not let jobs choose this S3 endpoint (the pod's credentials would be sent to "
                f"it); allowed: {', '.join(allowed) or 'none: leave it unset'}",
            )
        )
    if problems:
        return ValidationResult(None, problems)
    try:
        resolved = resolve_spec(spec)
    except SpecError as err:  # check_spec found nothing above, so this cannot happen; kept typed all the same
        return ValidationResult(None, list(err.problems))
    return ValidationResult(resolved.spec, [])
