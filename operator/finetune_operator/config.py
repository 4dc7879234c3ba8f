"""The platform team's side: operator settings, defaults and limits (rendered from Helm values).

The tenant owns a small FineTuneJob; everything here is owned by whoever installs the operator. It is read
from the YAML file named by FINETUNE_OPERATOR_CONFIG (the chart mounts it from a ConfigMap).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Defaults(_Model):
    """Filled into a job's spec where the tenant left a value unset."""

    image: str = "finetune-trainer:0.1.0"
    image_pull_policy: str = Field(default="IfNotPresent", pattern="^(Always|IfNotPresent|Never)$")
    gpus: int = Field(default=1, ge=0)
    gpu_resource_name: str = "nvidia.com/gpu"
    cpu: str = "4"
    memory: str = "32Gi"
    ephemeral_storage: str = "50Gi"
    storage_endpoint: str | None = None
    storage_region: str | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, object]] = Field(default_factory=list)


class Limits(_Model):
    """Hard limits; a job beyond them fails validation with reason PolicyViolation."""

    max_gpus_per_job: int = Field(default=8, ge=0)
    max_cpu: str | None = "64"
    max_memory: str | None = "512Gi"
    max_active_deadline_seconds: int | None = None
    allowed_methods: list[str] = Field(default_factory=lambda: ["full", "lora", "qlora"])
    allowed_image_prefixes: list[str] = Field(
        default_factory=list, description="When non-empty, spec.image must start with one of these."
    )
    allowed_uri_schemes: list[str] = Field(default_factory=lambda: ["s3", "file", "hf"])


class TenantPolicy(_Model):
    """Per-namespace overrides: only the keys given replace the platform-wide ones."""

    defaults: dict[str, Any] = Field(default_factory=dict)
    limits: dict[str, Any] = Field(default_factory=dict)


class OperatorConfig(_Model):
    defaults: Defaults = Field(default_factory=Defaults)
    limits: Limits = Field(default_factory=Limits)
    # Namespace -> overrides, e.g. a research team gets more GPUs: {"research": {"limits": {"maxGpusPerJob": 16}}}
    tenants: dict[str, TenantPolicy] = Field(default_factory=dict)
    # Progress from a running trainer's log stream is written to its status at most this often (seconds), so 200
    # trainers reporting every second cost ~100 status writes/s, not 200. Pod and Job changes are applied at once.
    poll_seconds: float = Field(default=2.0, gt=0)
    # Lines of trainer log read when the operator (re)attaches to a trainer's log or drains a finished one;
    # reports carry sequence numbers, so overlap is harmless.
    log_tail_lines: int = Field(default=400, ge=10)

    def for_namespace(self, namespace: str | None) -> OperatorConfig:
        """The policy that applies to jobs in `namespace` (tenant overrides merged over the platform's)."""
        tenant = self.tenants.get(namespace or "")
        if tenant is None:
            return self
        return self.model_copy(
            update={
                "defaults": Defaults.model_validate({**self.defaults.model_dump(by_alias=True), **tenant.defaults}),
                "limits": Limits.model_validate({**self.limits.model_dump(by_alias=True), **tenant.limits}),
            }
        )


def load_config(path: str | None = None) -> OperatorConfig:
    path = path or os.environ.get("FINETUNE_OPERATOR_CONFIG")
    if not path:
        return OperatorConfig()
    data = yaml.safe_load(Path(path).read_text()) or {}
    return OperatorConfig.model_validate(data)
