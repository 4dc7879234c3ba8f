"""The admission webhook's decision (pure): the operator's own checks at apply time, and immutability after start."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from finetune_operator.admission import WebhookOptions, changed_fields, refusal, review, started
from finetune_operator.config import OperatorConfig
from finetune_operator.reconcile import MAX_SPEC_BYTES
from finetune_operator.validation import validate_spec

SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/tiny-gpt2/"},
    "task": "instruction",
    "dataset": {
        "train": "s3://data/qa.jsonl",
        "template": {"prompt": "### Question:\n{question}\n### Answer:\n", "response": "{answer}"},
    },
    "output": {"uri": "s3://out/job/"},
    "resources": {"gpus": 0, "cpu": "2", "memory": "4Gi"},
    "runPolicy": {"backoffLimit": 2},
}
CFG = OperatorConfig()
RUNNING = {"phase": "Running", "workload": "j-trainer"}


def job(spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None, ns: str = "team-a") -> dict:
    body: dict[str, Any] = {"metadata": {"name": "j", "namespace": ns}, "spec": copy.deepcopy(spec or SPEC)}
    if status is not None:
        body["status"] = status
    return body


def edited(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = copy.deepcopy(base or SPEC)
    node = spec
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return spec


def test_valid_create_is_admitted() -> None:
    assert review("CREATE", job(), None, CFG) == []


@pytest.mark.parametrize(
    ("path", "value", "reason", "field"),
    [
        ("output.uri", "ftp://x/y/", "InvalidURI", "spec.output.uri"),
        ("resources.gpus", 9, "PolicyViolation", "spec.resources.gpus"),
        ("method", {"type": "lora", "lorRank": 8}, "UnknownField", "spec.method.lorRank"),
        ("resources.memory", "lots", "InvalidResources", "spec.resources.memory"),
    ],
)
def test_create_refused_with_the_operators_reason_and_field(path: str, value: Any, reason: str, field: str) -> None:
    spec = edited(path, value)
    problems = review("CREATE", job(spec), None, CFG)
    assert problems, "a bad job must be refused"
    # The same verdict the operator writes into the status of a job that got past a missing webhook.
    expected = validate_spec(spec, CFG).problems
    assert [(p.reason, p.field) for p in problems] == [(p.reason, p.field) for p in expected]
    assert (problems[0].reason, problems[0].field) == (reason, field)
    assert refusal(problems).startswith(f"{reason}: {field}: ")


def test_tenant_policy_of_the_jobs_namespace_applies() -> None:
    cfg = OperatorConfig.model_validate({"tenants": {"research": {"limits": {"maxGpusPerJob": 16}}}})
    spec = edited("resources.gpus", 12)
    assert [p.reason for p in review("CREATE", job(spec, ns="team-a"), None, cfg)] == ["PolicyViolation"]
    assert review("CREATE", job(spec, ns="research"), None, cfg) == []


def test_too_large_spec_refused() -> None:
    spec = edited("evaluation", {"samplePrompts": ["x" * 1000] * (MAX_SPEC_BYTES // 1000 + 1)})
    problems = review("CREATE", job(spec), None, CFG)
    assert [(p.reason, p.field) for p in problems] == [("SpecTooLarge", "spec")]


def test_started() -> None:
    assert not started(None) and not started({})
    assert started({"workload": "x"}) and started({"phase": "Pending"}) and started({"phase": "Succeeded"})
    invalid = {"phase": "Failed", "conditions": [{"type": "Validated", "status": "False", "reason": "InvalidURI"}]}
    assert not started(invalid)
    crashed = {"phase": "Failed", "conditions": [{"type": "Validated", "status": "True", "reason": "Valid"}]}
    assert started(crashed)


def test_edit_of_started_job_refused_naming_the_fields() -> None:
    new = edited("output.uri", "s3://elsewhere/out/", edited("hyperparameters", {"epochs": 9}))
    problems = review("UPDATE", job(new), job(status=RUNNING), CFG)
    assert len(problems) == 1
    p = problems[0]
    assert p.reason == "SpecImmutable"
    assert p.field == "spec.hyperparameters.epochs"
    assert "spec.output.uri" in p.message and "spec.hyperparameters.epochs" in p.message
    assert "spec.runPolicy.suspend" in p.message


@pytest.mark.parametrize(
    ("path", "value"),
    [("runPolicy.suspend", True), ("runPolicy.activeDeadlineSeconds", 3600), ("runPolicy.ttlSecondsAfterFinished", 60)],
)
def test_suspend_and_deadlines_may_change_after_start(path: str, value: Any) -> None:
    assert review("UPDATE", job(edited(path, value)), job(status=RUNNING), CFG) == []


def test_suspend_added_to_a_spec_without_run_policy() -> None:
    old = copy.deepcopy(SPEC)
    del old["runPolicy"]
    assert review("UPDATE", job(edited("runPolicy.suspend", True, old)), job(old, status=RUNNING), CFG) == []


def test_other_run_policy_fields_are_frozen_after_start() -> None:
    problems = review("UPDATE", job(edited("runPolicy.backoffLimit", 5)), job(status=RUNNING), CFG)
    assert [(p.reason, p.field) for p in problems] == [("SpecImmutable", "spec.runPolicy.backoffLimit")]


def test_mutable_field_change_still_checked_against_policy() -> None:
    cfg = OperatorConfig.model_validate({"limits": {"maxActiveDeadlineSeconds": 600}})
    old = edited("runPolicy.activeDeadlineSeconds", 300)
    new = edited("runPolicy.activeDeadlineSeconds", 7200)
    problems = review("UPDATE", job(new), job(old, status=RUNNING), cfg)
    assert [(p.reason, p.field) for p in problems] == [("PolicyViolation", "spec.runPolicy.activeDeadlineSeconds")]


def test_policy_tightened_after_start_does_not_block_suspend() -> None:
    cfg = OperatorConfig.model_validate({"limits": {"maxGpusPerJob": 0}})
    old = edited("resources.gpus", 1)
    new = edited("runPolicy.suspend", True, old)
    assert review("CREATE", job(old), None, cfg)  # would not be admitted today
    assert review("UPDATE", job(new), job(old, status=RUNNING), cfg) == []


def test_metadata_only_update_always_admitted() -> None:
    cfg = OperatorConfig.model_validate({"limits": {"maxGpusPerJob": 0}})
    old = job(edited("resources.gpus", 1), status=RUNNING)
    new = copy.deepcopy(old)
    new["metadata"]["labels"] = {"team": "x"}
    assert review("UPDATE", new, old, cfg) == []


def test_edit_before_start_is_validated_like_create() -> None:
    invalid = {"phase": "Failed", "conditions": [{"type": "Validated", "status": "False", "reason": "InvalidURI"}]}
    old = job(edited("output.uri", "ftp://x/"), status=invalid)
    assert review("UPDATE", job(), old, CFG) == []  # the fix is admitted
    problems = review("UPDATE", job(edited("output.uri", "gopher://x/")), old, CFG)
    assert [(p.reason, p.field) for p in problems] == [("InvalidURI", "spec.output.uri")]


def test_changed_fields() -> None:
    assert changed_fields({"a": {"b": 1, "c": [1]}}, {"a": {"b": 2, "c": [1, 2]}, "d": 1}) == [
        "spec.a.b",
        "spec.a.c",
        "spec.d",
    ]
    assert changed_fields(SPEC, copy.deepcopy(SPEC)) == []


def test_webhook_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FINETUNE_WEBHOOK_PORT", raising=False)
    assert WebhookOptions.from_env() is None
    assert WebhookOptions.from_env("0") is None
    monkeypatch.setenv("FINETUNE_WEBHOOK_PORT", "9443")
    monkeypatch.setenv("FINETUNE_WEBHOOK_CERT_DIR", "/certs")
    opts = WebhookOptions.from_env()
    assert opts is not None and opts.port == 9443 and str(opts.cert_dir) == "/certs"


def test_refusals_are_logged_as_info_not_errors() -> None:
    import logging

    from finetune_operator.admission import _RefusalsAreNotErrors

    def record(msg: str, level: int = logging.ERROR) -> logging.LogRecord:
        rec = logging.LogRecord("kopf.objects", level, __file__, 1, msg, None, None)
        assert _RefusalsAreNotErrors().filter(rec)
        return rec

    refused = record("Webhook 'validate' failed permanently: InvalidURI: spec.output.uri: ...")
    assert (refused.levelno, refused.levelname) == (logging.INFO, "INFO")
    other = record("Handler 'x' failed permanently: boom")
    assert other.levelno == logging.ERROR
