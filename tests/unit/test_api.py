"""The typed API: examples parse, the generated CRD is structural and in sync with the models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api import crd, docs
from finetune_api.reports import Report, ReportKind, format_report, parse_reports
from finetune_api.status import FineTuneJob

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_parse(path: Path) -> None:
    job = FineTuneJob.model_validate(yaml.safe_load(path.read_text()))
    assert job.spec.output.uri.startswith("s3://")


def test_generated_crd_and_reference_are_in_sync() -> None:
    assert crd.main(["--check"]) == 0, "run `make generate`"
    assert docs.main(["--check"]) == 0, "run `make generate`"


def _walk(node: Any, path: str = "") -> list[str]:
    bad: list[str] = []
    if isinstance(node, dict):
        for key in ("$ref", "anyOf", "oneOf", "allOf", "title", "default", "const"):
            if key in node:
                bad.append(f"{path}.{key}")
        if node.get("type") == "object" and node.get("additionalProperties") is False:
            bad.append(f"{path}.additionalProperties")
        if "properties" in node and "type" not in node:
            bad.append(f"{path}: object without type")
        for k, v in node.items():
            bad += _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            bad += _walk(v, f"{path}[{i}]")
    return bad


def test_crd_schema_is_structural_and_documented() -> None:
    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _walk(schema) == []
    undocumented = []

    def visit(node: dict[str, Any], path: str) -> None:
        for name, prop in (node.get("properties") or {}).items():
            in_api = path.startswith((".spec", ".status")) or name in ("spec", "status")
            if in_api and not prop.get("description"):
                undocumented.append(f"{path}.{name}")
            visit(prop, f"{path}.{name}")
            if isinstance(prop.get("items"), dict):
                visit(prop["items"], f"{path}.{name}[]")

    visit(schema, "")
    assert undocumented == []


def test_report_roundtrip_and_garbage_is_ignored() -> None:
    r = Report(seq=3, kind=ReportKind.PROGRESS, time="2026-01-01T00:00:00Z", step=5, total_steps=10, loss=1.5)
    lines = ["noise", format_report(r), "##finetune {not json", '##finetune {"kind": "bogus"}']
    parsed = list(parse_reports(lines))
    assert parsed == [r]
    assert '"totalSteps":10' in format_report(r)
