"""The validating admission webhook: the operator's own checks, run by the API server at `kubectl apply`.

A FineTuneJob that the operator would fail (invalid, against the platform's policy, too large) is refused before
it is stored, with the same reason and field as the status it would get (`InvalidURI: spec.output.uri: ...`).
After a job has started, its spec is immutable except `runPolicy.suspend` and the deadlines.

`review()` is the whole decision (pure); kopf only serves it over HTTPS. The server is started only when the
webhook is enabled (`--webhook-port`, FINETUNE_WEBHOOK_PORT), with the certificate the chart mounts from a Secret
(tls.crt, tls.key in `--webhook-cert-dir`); kopf re-reads those files when they change. The operator never
writes the ValidatingWebhookConfiguration (the chart renders it), so it needs no RBAC for it. Without the
webhook, the operator still validates every job itself and fails the bad ones (docs/admission.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf

from finetune_api.spec import API_GROUP, API_VERSION, PLURAL
from finetune_api.status import ConditionType, Phase
from finetune_operator.config import OperatorConfig, load_config
from finetune_operator.reconcile import spec_size_problem
from finetune_operator.validation import Problem, validate_spec

log = logging.getLogger(__name__)

HANDLER_ID = "validate"  # kopf serves a handler at /<id>: the chart's webhook configuration calls this path
WEBHOOK_PATH = f"/{HANDLER_ID}"
DEFAULT_CERT_DIR = "/etc/finetune-webhook"
# What may still change once a job has started: pausing it and its deadlines. Anything else would make the
# running trainer, its ConfigMap and the status disagree with the spec.
MUTABLE_AFTER_START: tuple[tuple[str, ...], ...] = (
    ("runPolicy", "suspend"),
    ("runPolicy", "cancel"),
    ("runPolicy", "activeDeadlineSeconds"),
    ("runPolicy", "ttlSecondsAfterFinished"),
)
MAX_FIELDS_NAMED = 10


@dataclass(frozen=True)
class WebhookOptions:
    port: int
    cert_dir: Path = Path(DEFAULT_CERT_DIR)
    addr: str = "0.0.0.0"

    @classmethod
    def from_env(
        cls, port: str | None = None, cert_dir: str | None = None, addr: str | None = None
    ) -> WebhookOptions | None:
        """The options given (flags) or else from the environment; None when the webhook is disabled."""
        port = port or os.environ.get("FINETUNE_WEBHOOK_PORT") or ""
        if not port or int(port) == 0:
            return None
        return cls(
            port=int(port),
            cert_dir=Path(cert_dir or os.environ.get("FINETUNE_WEBHOOK_CERT_DIR") or DEFAULT_CERT_DIR),
            addr=addr or os.environ.get("FINETUNE_WEBHOOK_ADDR") or "0.0.0.0",
        )


# --- the decision (pure) ------------------------------------------------------------------------------------------


def started(status: Mapping[str, Any] | None) -> bool:
    """Whether a job has started: it has a workload, or any phase but a validation failure."""
    status = status or {}
    if status.get("workload"):
        return True
    phase = status.get("phase")
    if not phase:
        return False
    if phase == Phase.FAILED.value:
        validated = [c for c in status.get("conditions") or [] if c.get("type") == ConditionType.VALIDATED.value]
        return not (validated and validated[-1].get("status") == "False")
    return True


def _strip(spec: Mapping[str, Any], paths: tuple[tuple[str, ...], ...]) -> dict[str, Any]:
    out = dict(spec)
    for path in paths:
        node: Any = out
        for key in path[:-1]:
            child = node.get(key) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                node = None
                break
            node[key] = child = dict(child)
            node = child
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return out


def changed_fields(old: Any, new: Any, prefix: str = "spec") -> list[str]:
    """The paths (as the tenant writes them) where two specs differ; lists count as one value.

    An absent object and an empty one are the same (`runPolicy: {suspend: true}` added to a spec without
    runPolicy changes only runPolicy.suspend)."""
    if isinstance(old, Mapping) or isinstance(new, Mapping):
        old = {} if old is None else old
        new = {} if new is None else new
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in sorted({*old, *new}):
            out += changed_fields(old.get(key), new.get(key), f"{prefix}.{key}")
        return out
    return [] if old == new else [prefix]


def _within(field: str, changed: list[str]) -> bool:
    return any(field == c or field.startswith(c + ".") or c.startswith(field + ".") for c in changed)


def review(
    operation: str,
    new: Mapping[str, Any] | None,
    old: Mapping[str, Any] | None,
    cfg: OperatorConfig,
) -> list[Problem]:
    """Why the API server must refuse this CREATE or UPDATE of a FineTuneJob (empty: admit it).

    - CREATE: every check the operator runs (size, schema, policy, finetune_api's rules).
    - UPDATE that leaves the spec alone (labels, annotations, finalizers, deletion): always admitted, even when
      the policy changed since, so a job can always be relabelled and deleted.
    - UPDATE of a started job: only the fields in MUTABLE_AFTER_START may change, and only problems in what
      changed are reported (a policy tightened after the job started does not block suspending it).
    - UPDATE of a job not yet started: as CREATE.
    """
    if new is None or operation not in ("CREATE", "UPDATE"):
        return []
    meta = new.get("metadata") or {}
    new_spec = dict(new.get("spec") or {})
    old_spec = dict((old or {}).get("spec") or {})
    changed: list[str] | None = None
    if operation == "UPDATE" and old is not None:
        if new_spec == old_spec or meta.get("deletionTimestamp"):
            return []
        if started(old.get("status")):
            frozen = changed_fields(_strip(old_spec, MUTABLE_AFTER_START), _strip(new_spec, MUTABLE_AFTER_START))
            if frozen:
                named = ", ".join(frozen[:MAX_FIELDS_NAMED]) + (" ..." if len(frozen) > MAX_FIELDS_NAMED else "")
                allowed = ", ".join("spec." + ".".join(p) for p in MUTABLE_AFTER_START)
                return [
                    Problem(
                        "SpecImmutable",
                        frozen[0],
                        f"the job has started, so its spec cannot change ({named}); only {allowed} may. "
                        "Delete the job and create it again to change anything else",
                    )
                ]
            changed = changed_fields(old_spec, new_spec)
    too_large = spec_size_problem(new_spec)
    if too_large:
        return [Problem("SpecTooLarge", "spec", too_large)]
    problems = validate_spec(new_spec, cfg.for_namespace(meta.get("namespace"))).problems
    if changed is not None:
        problems = [p for p in problems if _within(p.field, changed)]
    return problems


def refusal(problems: list[Problem]) -> str:
    """The message the API server shows: `REASON: FIELD: what to do` for each problem."""
    return "; ".join(f"{p.reason}: {p.field}: {p.message}" for p in problems)


# --- kopf glue ----------------------------------------------------------------------------------------------------


class _RefusalsAreNotErrors(logging.Filter):
    """kopf logs every refused request as an ERROR ("Webhook 'validate' failed permanently: ..."); a tenant's
    mistake is not the operator's error, so it is logged at INFO (alerts on operator errors stay meaningful)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and str(record.msg).startswith(f"Webhook {HANDLER_ID!r} failed"):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def enable(options: WebhookOptions) -> None:
    """Register the webhook handler and the start-up that configures kopf's HTTPS server.

    Called only when the webhook is enabled: kopf refuses to run with admission handlers and no server."""
    config: dict[str, OperatorConfig] = {}
    logging.getLogger("kopf.objects").addFilter(_RefusalsAreNotErrors())

    @kopf.on.startup(id="admission-server")
    async def _configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        config["cfg"] = load_config()
        settings.admission.server = kopf.WebhookServer(
            addr=options.addr,
            port=options.port,
            certfile=str(options.cert_dir / "tls.crt"),
            pkeyfile=str(options.cert_dir / "tls.key"),
        )
        settings.admission.managed = None  # the chart owns the ValidatingWebhookConfiguration
        log.info("admission webhook: https://%s:%d%s", options.addr, options.port, WEBHOOK_PATH)

    @kopf.on.validate(API_GROUP, API_VERSION, PLURAL, id=HANDLER_ID, operations=["CREATE", "UPDATE"])
    def _validate(body: kopf.Body, **kwargs: Any) -> None:
        operation, old = kwargs.get("operation") or "", kwargs.get("old")
        problems = review(operation, body, old, config.get("cfg") or load_config())
        if problems:  # kopf logs the refusal
            raise kopf.AdmissionError(refusal(problems), code=422)
