"""Semantic validation: each problem has a precise reason, names the field, and says what to do."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.config import OperatorConfig
from finetune_operator.validation import validate_spec

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
BASE: dict[str, Any] = {
    "model": {"uri": "s3://models/tiny-gpt2/"},
    "task": "instruction",
    "dataset": {
        "train": "s3://data/qa.jsonl",
        "template": {"prompt": "### Question:\n{question}\n### Answer:\n", "response": "{answer}"},
    },
    "output": {"uri": "s3://out/job/"},
    "resources": {"gpus": 0, "cpu": "2", "memory": "4Gi"},
}


def spec_with(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = spec
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return spec


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_valid(path: Path) -> None:
    result = validate_spec(yaml.safe_load(path.read_text())["spec"], OperatorConfig())
    assert result.ok, result.message


def test_defaults_resolved_from_policy() -> None:
    cfg = OperatorConfig.model_validate({"defaults": {"image": "reg/trainer:1", "gpus": 2, "memory": "64Gi"}})
    spec = spec_with(resources={})
    result = validate_spec(spec, cfg)
    assert result.spec is not None
    assert result.spec.image == "reg/trainer:1"
    assert result.spec.resources.gpus == 2
    assert result.spec.resources.memory == "64Gi"
    # finetune_api's training defaults are written into the resolved spec the trainer gets.
    hp = result.spec.hyperparameters
    assert hp.packing is False and hp.block_size is None  # instruction: no packing by default
    assert hp.learning_rate == 2e-4 and hp.eval_batch_size == hp.batch_size
    assert result.spec.evaluation.metrics == ["loss", "perplexity", "exact_match", "token_f1", "bleu", "rouge"]
    assert result.spec.evaluation.max_samples == 200


def test_instruction_packing_is_accepted_and_resolved() -> None:
    result = validate_spec(spec_with(hyperparameters={"packing": True, "maxSeqLength": 128}), OperatorConfig())
    assert result.spec is not None, result.message
    assert result.spec.hyperparameters.packing is True and result.spec.hyperparameters.block_size == 128


CASES = [
    # (changes, reason, field, words in the message)
    ({"hyperparameters": {"learningrate": 0.1}}, "UnknownField", "spec.hyperparameters.learningrate", "learningRate"),
    ({"task": "translation"}, "InvalidField", "spec.task", "causal-lm"),
    ({"model": None}, "MissingField", "spec.model", "required"),
    ({"hyperparameters": {"batchSize": 0}}, "InvalidField", "spec.hyperparameters.batchSize", "greater than"),
    ({"model__uri": "https://example.com/model"}, "InvalidURI", "spec.model.uri", "s3://"),
    ({"dataset__train": "s3:///data.jsonl"}, "InvalidURI", "spec.dataset.train", "bucket"),
    ({"output__uri": "file://relative/path"}, "InvalidURI", "spec.output.uri", "absolute"),
    ({"dataset__train": "hf://org/data"}, "InvalidURI", "spec.dataset.train", "s3://"),
    ({"dataset__template": None}, "TemplateError", "spec.dataset.template", "instruction tasks need a template"),
    ({"dataset__template__prompt": "Q: {question"}, "TemplateError", "spec.dataset.template.prompt", "brace"),
    ({"dataset__template__response": ""}, "TemplateError", "spec.dataset.template.response", "response"),
    ({"dataset__template__prompt": "{q.x}"}, "TemplateError", "spec.dataset.template.prompt", "not a column"),
    (
        {"dataset__rename": {"question": "q"}},
        "TemplateError",
        "spec.dataset.template",
        "renamed to 'q'",
    ),
    ({"dataset__dropColumns": ["answer"]}, "TemplateError", "spec.dataset.template", "dropColumns"),
    ({"task": "chat"}, "UnsupportedCombination", "spec.dataset.template", "chat"),
    ({"method": {"type": "qlora"}}, "GPURequired", "spec.method.type", "resources.gpus"),
    ({"hyperparameters": {"precision": "fp16"}}, "GPURequired", "spec.hyperparameters.precision", "GPU"),
    ({"hyperparameters": {"optimizer": "adamw-8bit"}}, "GPURequired", "spec.hyperparameters.optimizer", "GPU"),
    ({"deepspeed": {"stage": 2, "offloadParams": True}}, "UnsupportedCombination", "spec.deepspeed.offloadParams", "3"),
    ({"dataset__split": {"strategy": "stratified"}}, "UnsupportedCombination", "spec.dataset.split.strategy", "labels"),
    ({"evaluation": {"metrics": ["accuracy"]}}, "InvalidField", "spec.evaluation.metrics", "does not apply"),
    ({"evaluation": {"bestModelMetric": "eval_bogus"}}, "InvalidField", "spec.evaluation.bestModelMetric", "eval_loss"),
    (
        {"evaluation": {"bestModelMetric": "eval_loss", "steps": 10}, "checkpoints": {"everySteps": 15}},
        "UnsupportedCombination",
        "spec.checkpoints.everySteps",
        "multiple",
    ),
    (
        {"evaluation": {"bestModelMetric": "eval_loss"}, "dataset__split": {"validationRatio": 0}},
        "UnsupportedCombination",
        "spec.evaluation",
        "validation",
    ),
    ({"resources__memory": "lots"}, "InvalidResources", "spec.resources.memory", "quantity"),
    ({"resources__memory": "100Mi"}, "InvalidResources", "spec.resources.memory", "512Mi"),
    ({"resources__cpu": "0"}, "InvalidResources", "spec.resources.cpu", "greater than zero"),
    ({"resources__gpus": 64}, "PolicyViolation", "spec.resources.gpus", "limit"),
    ({"resources__nodeSelector": {"bad key!": "x"}}, "InvalidResources", "spec.resources.nodeSelector", "label key"),
    (
        {"hyperparameters": {"packing": True}, "task": "seq2seq"},
        "UnsupportedCombination",
        "spec.hyperparameters.packing",
        "packing",
    ),
    (
        {"hyperparameters": {"packing": True}, "task": "classification", "dataset__template": None},
        "UnsupportedCombination",
        "spec.hyperparameters.packing",
        "packing",
    ),
    ({"hyperparameters": {"blockSize": 64}}, "UnsupportedCombination", "spec.hyperparameters.blockSize", "packing"),
    (
        {"hyperparameters": {"packing": True, "blockSize": 64, "maxSeqLength": 128}},
        "UnsupportedCombination",
        "spec.hyperparameters.blockSize",
        "at least maxSeqLength",
    ),
    ({"method": {"type": "full", "rank": 4}}, "UnsupportedCombination", "spec.method.rank", "lora"),
    ({"method": {"quantization": {"quantType": "fp4"}}}, "UnsupportedCombination", "spec.method.quantization", "qlora"),
    (
        {"task": "causal-lm", "dataset__template__lossOnResponseOnly": False},
        "UnsupportedCombination",
        "spec.dataset.template.lossOnResponseOnly",
        "instruction",
    ),
    (
        {"evaluation": {"steps": 5}, "dataset__split": {"validationRatio": 0}},
        "UnsupportedCombination",
        "spec.evaluation.steps",
        "validation data",
    ),
    (
        {"hyperparameters": {"earlyStopping": {}}, "evaluation": {"steps": 10}, "checkpoints": {"everySteps": 15}},
        "UnsupportedCombination",
        "spec.checkpoints.everySteps",
        "multiple",
    ),
    (
        {"evaluation": {"bestModelMetric": "eval_bleu"}},
        "UnsupportedCombination",
        "spec.evaluation.bestModelMetric",
        "during training",
    ),
    (
        {"hyperparameters": {"warmupSteps": 5, "warmupRatio": 0.1}},
        "UnsupportedCombination",
        "spec.hyperparameters.warmupRatio",
        "not both",
    ),
    ({"storage": {"endpoint": "minio:9000"}}, "InvalidURI", "spec.storage.endpoint", "http"),
    ({"dataset__train": "s3://data/qa.xlsx"}, "InvalidField", "spec.dataset.train", "fileFormat"),
]


@pytest.mark.parametrize(("changes", "reason", "field", "words"), CASES, ids=[c[1] + ":" + c[2] for c in CASES])
def test_each_problem_is_reported_precisely(changes: dict[str, Any], reason: str, field: str, words: str) -> None:
    result = validate_spec(spec_with(**changes), OperatorConfig())
    assert not result.ok
    assert result.spec is None
    matching = [p for p in result.problems if p.field == field]
    assert matching, result.message
    assert matching[0].reason == reason
    assert words in matching[0].message
    assert field in result.message


def test_policy_limits_apply() -> None:
    cfg = OperatorConfig.model_validate(
        {"limits": {"allowedMethods": ["lora"], "allowedImagePrefixes": ["registry.corp/"], "maxMemory": "8Gi"}}
    )
    spec = spec_with(method={"type": "full"}, image="docker.io/evil", resources__memory="16Gi")
    result = validate_spec(spec, cfg)
    fields = {p.field: p.reason for p in result.problems}
    assert fields == {
        "spec.method.type": "PolicyViolation",
        "spec.image": "PolicyViolation",
        "spec.resources.memory": "PolicyViolation",
    }


def test_tenant_overrides_apply_only_to_their_namespace() -> None:
    cfg = OperatorConfig.model_validate(
        {
            "limits": {"maxGpusPerJob": 1},
            "tenants": {"research": {"limits": {"maxGpusPerJob": 8}, "defaults": {"gpus": 4}}},
        }
    )
    spec = spec_with(resources__gpus=None)
    assert validate_spec(spec_with(resources__gpus=4), cfg).problems[0].reason == "PolicyViolation"
    research = validate_spec(spec, cfg.for_namespace("research"))
    assert research.spec is not None and research.spec.resources.gpus == 4
    assert (
        validate_spec(spec_with(resources__gpus=4), cfg.for_namespace("other")).problems[0].reason == "PolicyViolation"
    )


def test_platform_tolerations_are_added_to_the_tenants() -> None:
    gpu_pool = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    cfg = OperatorConfig.model_validate({"defaults": {"tolerations": [gpu_pool]}})
    own = {"key": "team", "operator": "Equal", "value": "a", "effect": "NoSchedule"}
    result = validate_spec(spec_with(resources__tolerations=[own]), cfg)
    assert result.spec is not None
    assert [t.key for t in result.spec.resources.tolerations] == ["nvidia.com/gpu", "team"]
