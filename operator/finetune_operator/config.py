"""The platform team's side: operator settings, defaults and limits (rendered from Helm values).

The tenant owns a small FineTuneJob; everything here is owned by whoever installs the operator. It is read
from the YAML file named by FINETUNE_OPERATOR_CONFIG (the chart mounts it from a ConfigMap).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from finetune_api.plan import gpu_type
from finetune_api.spec import Toleration

# An extended resource from a device vendor: a DNS domain with at least one dot, a slash, a name. Core resources
# (cpu, memory, ephemeral-storage, hugepages-*, pods) have no domain; kubernetes.io and k8s.io names are reserved.
_VENDOR_RESOURCE = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_RESERVED_DOMAIN = re.compile(r"(^|\.)(kubernetes\.io|k8s\.io)/")
# One segment of an image repository path: a registry host[:port] (first) or a lowercase path component.
_IMAGE_SEGMENT = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9.]*(:[0-9]+)?|[a-z0-9]+([._-]+[a-z0-9]+)*)$")


def is_vendor_resource(name: str) -> bool:
    """Whether ``name`` is a device vendor's extended resource (nvidia.com/gpu), never cpu, memory or the like."""
    return bool(_VENDOR_RESOURCE.match(name)) and not _RESERVED_DOMAIN.search(name)


def _check_vendor_resource(name: str) -> str:
    if not is_vendor_resource(name):
        raise ValueError(f"{name!r} is not a device vendor's extended resource name such as nvidia.com/gpu")
    return name


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Defaults(_Model):
    """Filled into a job's spec where the tenant left a value unset."""

    # The CUDA build (docs/images.md): like gpus=1 below, the built-in defaults are for GPU clusters.
    image: str = "finetune-trainer:0.1.0-cuda"
    image_pull_policy: str = Field(default="IfNotPresent", pattern="^(Always|IfNotPresent|Never)$")
    gpus: int = Field(default=1, ge=0)
    # The platform's own GPU resource: admitted whatever limits.allowedGpuResourceNames says.
    gpu_resource_name: str = "nvidia.com/gpu"
    # The GPU model of the platform's GPU nodes: the preflight sizes jobs for it (memory per GPU, time) unless a
    # job names resources.gpuType. One of finetune_api.plan.GPU_CATALOG.
    gpu_type: str = "h100"
    cpu: str = "4"
    memory: str = "32Gi"
    ephemeral_storage: str = "50Gi"
    storage_endpoint: str | None = None
    storage_region: str | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, object]] = Field(default_factory=list)

    @field_validator("gpu_resource_name")
    @classmethod
    def _gpu_name(cls, value: str) -> str:
        return _check_vendor_resource(value)

    @field_validator("gpu_type")
    @classmethod
    def _gpu_type(cls, value: str) -> str:
        if value == "cpu":
            raise ValueError("gpuType names a GPU model (h100, a100-80gb, ...); CPU-only jobs have gpus: 0")
        return gpu_type(value).name  # PlanError (a ValueError) names the known types

    @field_validator("tolerations")
    @classmethod
    def _tolerations_are_tolerations(cls, value: list[dict[str, object]]) -> list[dict[str, object]]:
        for item in value:
            Toleration.model_validate(item)
        return value


class AllowedUris(_Model):
    """Where jobs may read and write, per kind of URI: each list holds URI prefixes (s3://bucket/ or
    s3://bucket/some/prefix/, file:///mnt/shared/, hf://org/) matched by whole path segments, so s3://data/
    admits s3://data/x.jsonl but not s3://data-evil/x.jsonl. An empty list admits every location (the
    allowed schemes still apply)."""

    model: list[str] = Field(default_factory=list, description="For model.uri and model.tokenizerUri.")
    data: list[str] = Field(default_factory=list, description="For dataset.train and dataset.validation.")
    output: list[str] = Field(default_factory=list, description="For output.uri.")

    @field_validator("model", "data", "output")
    @classmethod
    def _prefixes_are_uris(cls, value: list[str]) -> list[str]:
        for prefix in value:
            parsed = urlparse(prefix)
            if parsed.scheme not in ("s3", "file", "hf") or parsed.query or parsed.fragment or "#" in prefix:
                raise ValueError(f"{prefix!r} must be an s3://, file:// or hf:// URI prefix without ? or #")
            if (parsed.scheme == "file") == bool(parsed.netloc) or not (parsed.netloc or parsed.path):
                raise ValueError(f"{prefix!r}: write s3://BUCKET/[PREFIX], hf://ORG/ or file:///PATH/")
            if any(seg in (".", "..") for seg in parsed.path.split("/")):
                raise ValueError(f"{prefix!r} must not contain . or .. segments")
        return value


class Limits(_Model):
    """Hard limits; a job beyond them fails validation with reason PolicyViolation."""

    max_gpus_per_job: int = Field(default=8, ge=0)  # all of a job's pods together: gpus x workers
    max_workers_per_job: int = Field(default=4, ge=1)
    max_cpu: str | None = "64"
    max_memory: str | None = "512Gi"
    max_active_deadline_seconds: int | None = None
    allowed_methods: list[str] = Field(default_factory=lambda: ["full", "lora", "qlora"])
    allowed_image_prefixes: list[str] = Field(
        default_factory=list, description="When non-empty, spec.image must start with one of these."
    )
    # file:// is off by default: inside a pod it names the pod's own filesystem, so an output written there is
    # lost when the pod ends and an input reads the image's own files. Allow it only where trainer pods mount
    # shared volumes. (`finetune run` on a workstation allows it: see finetune_cli.local.)
    allowed_uri_schemes: list[str] = Field(default_factory=lambda: ["s3", "hf"])
    allowed_uris: AllowedUris = Field(default_factory=AllowedUris)
    # Placement is the platform's: a tenant may add only the tolerations and node labels listed here (the
    # platform's own defaults.tolerations and defaults.nodeSelector always apply and may be repeated).
    allowed_tolerations: list[Toleration] = Field(
        default_factory=list,
        description="A tenant's toleration is admitted when one of these tolerates every taint it tolerates.",
    )
    allowed_node_selector: dict[str, list[str]] = Field(
        default_factory=dict, description='Node label key -> values a tenant may select ("*": any value).'
    )
    allowed_gpu_resource_names: list[str] = Field(default_factory=lambda: ["nvidia.com/gpu", "amd.com/gpu"])
    # A job's storage.endpoint receives the pod's credentials' signatures and, with ambient credentials (IRSA),
    # their session token: a tenant may name only these endpoints (or defaults.storageEndpoint); "*": any.
    allowed_storage_endpoints: list[str] = Field(
        default_factory=list,
        description='S3 endpoint URLs a job may set in storage.endpoint besides the platform\'s own; "*": any.',
    )

    @field_validator("allowed_storage_endpoints")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        for url in value:
            if url != "*" and not (urlparse(url).scheme in ("http", "https") and urlparse(url).netloc):
                raise ValueError(f"{url!r} must be an http:// or https:// URL, or *")
        return value

    @field_validator("allowed_gpu_resource_names")
    @classmethod
    def _gpu_names(cls, value: list[str]) -> list[str]:
        for name in value:
            _check_vendor_resource(name)
        return value

    @field_validator("allowed_image_prefixes")
    @classmethod
    def _image_prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            segments = prefix.removesuffix("/").split("/")
            if not all(_IMAGE_SEGMENT.match(seg) for seg in segments):
                raise ValueError(f"{prefix!r} is not an image repository prefix such as registry.corp/team/")
        return value


class Preflight(_Model):
    """The CPU preflight that checks a job's data and sizes it (memory per GPU, time) before its GPU pods are
    requested; a job that cannot fit its GPUs, or whose data is wrong, fails there without holding a GPU."""

    enabled: bool = True
    cpu: str = "1"
    memory: str = "4Gi"
    # Where the preflight pod may run: the platform's CPU nodes (it requests no GPU).
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


class TenantPolicy(_Model):
    """Per-namespace overrides: only the keys given replace the platform-wide ones."""

    defaults: dict[str, Any] = Field(default_factory=dict)
    limits: dict[str, Any] = Field(default_factory=dict)


class OperatorConfig(_Model):
    defaults: Defaults = Field(default_factory=Defaults)
    limits: Limits = Field(default_factory=Limits)
    preflight: Preflight = Field(default_factory=Preflight)
    # Namespace -> overrides, e.g. a research team gets more GPUs: {"research": {"limits": {"maxGpusPerJob": 16}}}
    tenants: dict[str, TenantPolicy] = Field(default_factory=dict)
    # Progress from a running trainer's log stream is written to its status at most this often (seconds), so 200
    # trainers reporting every second cost ~100 status writes/s, not 200. Pod and Job changes are applied at once.
    poll_seconds: float = Field(default=2.0, gt=0)
    # A trainer pod that has not started this many seconds after it was created (unschedulable, image pull,
    # quota) fails the job with the reason it was waiting for. Pods that can never start fail at once.
    start_deadline_seconds: float | None = Field(default=1800.0, gt=0)
    # Lines of trainer log read when the operator (re)attaches to a trainer's log or drains a finished one;
    # reports carry sequence numbers, so overlap is harmless.
    log_tail_lines: int = Field(default=400, ge=10)

    @model_validator(mode="after")
    def _tenants_are_valid(self) -> OperatorConfig:
        # A tenant's overrides are merged per job; a bad one fails at start-up, not on that tenant's first job.
        for namespace in self.tenants:
            try:
                self.for_namespace(namespace)
            except ValueError as exc:
                raise ValueError(f"tenants.{namespace}: {exc}") from None
        return self

    def for_namespace(self, namespace: str | None) -> OperatorConfig:
        """The policy that applies to jobs in `namespace` (tenant overrides merged over the platform's)."""
        tenant = self.tenants.get(namespace or "")
        if tenant is None:
            return self
        limits = {**self.limits.model_dump(by_alias=True), **tenant.limits}
        if isinstance(tenant.limits.get("allowedUris"), dict):
            # Per kind: a tenant that lists only its data buckets keeps the platform's model and output lists.
            limits["allowedUris"] = {**self.limits.allowed_uris.model_dump(), **tenant.limits["allowedUris"]}
        return self.model_copy(
            update={
                "defaults": Defaults.model_validate({**self.defaults.model_dump(by_alias=True), **tenant.defaults}),
                "limits": Limits.model_validate(limits),
            }
        )


def load_config(path: str | None = None) -> OperatorConfig:
    path = path or os.environ.get("FINETUNE_OPERATOR_CONFIG")
    if not path:
        return OperatorConfig()
    data = yaml.safe_load(Path(path).read_text()) or {}
    return OperatorConfig.model_validate(data)
