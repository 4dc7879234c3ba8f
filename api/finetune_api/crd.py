"""Generates the FineTuneJob CustomResourceDefinition from the pydantic models.

Kubernetes wants a *structural* OpenAPI v3 schema: no $ref, no anyOf-with-null, no titles or consts.
Unknown fields are not preserved: 1.20 leaves schemas with x-kubernetes-preserve-unknown-fields out of the
published OpenAPI, which would break `kubectl explain` and kubectl's own check that rejects a misspelt field.

Run `python -m finetune_api.crd` (or `make generate`) to rewrite manifests/ and the chart's CRD.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from finetune_api.spec import API_GROUP, API_VERSION, KIND, PLURAL, FineTuneJobSpec
from finetune_api.status import FineTuneJobStatus

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_TARGETS = (
    REPO_ROOT / "manifests" / "crd.yaml",
    REPO_ROOT / "charts" / "finetune-operator" / "crds" / "finetunejobs.finetune.dev.yaml",
)

_DROP_KEYS = {"title", "$defs", "examples"}


def _structural(node: Any, defs: dict[str, Any], preserve_unknown: bool) -> Any:
    """Inline $refs and rewrite pydantic's JSON Schema into what the apiserver accepts."""
    if isinstance(node, list):
        return [_structural(n, defs, preserve_unknown) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        if "description" in node:  # the field's description wins over the class docstring
            target["description"] = node["description"]
        target.update({k: v for k, v in node.items() if k != "description"})
        return _structural(target, defs, preserve_unknown)
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        non_null = [s for s in any_of if s.get("type") != "null"]
        if len(any_of) != len(non_null):
            node["nullable"] = True
        if len(non_null) == 1:
            merged = _structural(non_null[0], defs, preserve_unknown)
            merged.update({k: v for k, v in node.items()})
            node = merged
        elif node.get("x-kubernetes-int-or-string"):
            pass  # int-or-string carries no type of its own
        else:
            raise ValueError(f"cannot express anyOf in a structural schema: {any_of}")
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node.pop("nullable", None)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS or key == "default":
            continue  # defaults are applied (and documented) by the operator, not the apiserver
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            # JSON Schema 2019 numbers -> OpenAPI 3.0 booleans beside minimum/maximum.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
            continue
        if key == "additionalProperties" and isinstance(value, bool):
            continue  # structural schemas forbid it; extra="forbid" is enforced by the operator
        if key == "properties":
            out[key] = {k: _structural(v, defs, preserve_unknown) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _structural(value, defs, preserve_unknown)
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" in out and preserve_unknown:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def openapi_schema(model: type, preserve_unknown: bool) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")  # type: ignore[attr-defined]
    defs = schema.pop("$defs", {})
    result: dict[str, Any] = _structural(schema, defs, preserve_unknown)
    return result


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Task", "type": "string", "jsonPath": ".spec.task", "priority": 1},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method.type", "priority": 1},
    {
        "name": "Progress",
        "type": "string",
        "jsonPath": ".status.progress.summary",
        "description": "Percent done.",
    },
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "priority": 1},
    {"name": "Loss", "type": "number", "jsonPath": ".status.loss"},
    {"name": "ETA", "type": "integer", "jsonPath": ".status.progress.etaSeconds", "priority": 1},
    {"name": "Workers", "type": "string", "jsonPath": ".status.workers", "priority": 1},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
    # The preflight's estimate, known before any GPU is held: GiB per GPU and GPU-hours.
    {"name": "GiB/GPU", "type": "number", "jsonPath": ".status.estimate.memory.totalGib", "priority": 1},
    {"name": "GPU-h", "type": "number", "jsonPath": ".status.estimate.gpuHours", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    spec_schema = openapi_schema(FineTuneJobSpec, preserve_unknown=False)
    status_schema = openapi_schema(FineTuneJobStatus, preserve_unknown=False)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["ftj"],
                "categories": ["finetune"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A FineTuneJob fine-tunes a base model on a dataset and uploads the "
                            "result to object storage.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "API version."},
                                "kind": {"type": "string", "description": "Kind."},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated by `python -m finetune_api.crd` from api/finetune_api. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=110)


def main(argv: list[str]) -> int:
    text = render()
    check = "--check" in argv
    stale = []
    for target in CRD_TARGETS:
        if check:
            if not target.exists() or target.read_text() != text:
                stale.append(str(target))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    if stale:
        print("stale generated CRD (run `make generate`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
