"""One resolved job: every spec field that is accepted changes something, and resolving is idempotent.

The walk visits every leaf field of the pydantic models in ``finetune_api.spec`` (recursively, list items
included). Each one must either have a CASE here, a non-default valid value whose effect is observed in what
the platform really produces from the spec:

* the resolved training values (``finetune_api.resolve``),
* the trainer's batch Job (``builders.build_workload``: image, resources, placement, storage, run policy),
* the trainer's TrainingArguments, DeepSpeed config, LoRA and bitsandbytes arguments, early-stopping callback
  and generation settings,
* the prepared data (``prepare_data`` on a small file, with a locally trained tokenizer),
* the preflight planner's estimate for a small Llama-shaped model (``finetune_api.plan``),

or be in ALLOWED with the reason its effect lies outside these. A new field with neither fails the test.
"""

from __future__ import annotations

import copy
import json
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from finetune_api import plan
from finetune_api.resolve import SpecError, check_spec, resolve_spec
from finetune_api.spec import FineTuneJobSpec
from finetune_operator.builders import build_worker, build_workload
from finetune_operator.config import OperatorConfig
from finetune_operator.validation import validate_spec
from finetune_trainer.config import architecture
from finetune_trainer.data import prepare_data
from finetune_trainer.distributed import deepspeed_config, resolve_precision
from finetune_trainer.modeling import lora_kwargs, quantization_kwargs
from finetune_trainer.tiny_models import build_tokenizer
from finetune_trainer.train import early_stopping, generation_kwargs, training_arguments

META = {"name": "walk", "namespace": "team", "uid": "u-1", "generation": 1}
# The walk observes what each field does, so its policy lets every placement and file:// URI through (what the
# policy refuses is tested in test_validation).
WALK_POLICY = OperatorConfig.model_validate(
    {
        "limits": {
            "allowedUriSchemes": ["s3", "file", "hf"],
            "allowedTolerations": [{"operator": "Exists"}],
            "allowedNodeSelector": {"pool": ["*"]},
            "allowedStorageEndpoints": ["*"],
        }
    }
)
# What the planner sizes in the walk: a small Llama from its config.json alone.
SHAPE = plan.model_shape(
    {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 512,
        "intermediate_size": 128,
    }
)
BASE: dict[str, Any] = {
    "model": {"uri": "s3://models/tiny/"},
    "task": "causal-lm",
    "dataset": {"train": "file:///data/train.jsonl"},
    "output": {"uri": "s3://out/job/"},
    "resources": {"gpus": 0, "cpu": "2", "memory": "4Gi"},
}
INSTRUCTION = {"task": "instruction", "dataset.template": {"prompt": "Q: {question}\nA: ", "response": "{answer}"}}
CLASSIFICATION = {"task": "classification"}
SEQ2SEQ = {"task": "seq2seq"}
LORA_EARLY = {"hyperparameters.earlyStopping": {}}
QLORA = {"method.type": "qlora", "resources.gpus": 1}
TOLERATION = {"resources.tolerations": [{"key": "a", "operator": "Equal", "value": "x", "effect": "NoSchedule"}]}

# leaf path -> (context applied to both specs, change applied on top of it for the second one)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "task": ({}, {"task": "chat"}),
    "dataset.validation": ({}, {"dataset.validation": "file:///data/other.jsonl"}),
    "dataset.fileFormat": ({"dataset.train": "file:///data/lines.txt"}, {"dataset.fileFormat": "jsonl"}),
    "dataset.rename": ({}, {"dataset.rename": {"text": "alt", "alt": "text"}}),
    "dataset.fields.text": ({}, {"dataset.fields.text": "alt"}),
    "dataset.fields.label": (CLASSIFICATION, {"dataset.fields.label": "label2"}),
    "dataset.fields.input": (SEQ2SEQ, {"dataset.fields.input": "alt"}),
    "dataset.fields.target": (SEQ2SEQ, {"dataset.fields.target": "alt"}),
    "dataset.fields.messages": ({"task": "chat"}, {"dataset.fields.messages": "messages2"}),
    "dataset.template.prompt": (INSTRUCTION, {"dataset.template.prompt": "Question: {question}\n"}),
    "dataset.template.response": (INSTRUCTION, {"dataset.template.response": "{answer}!"}),
    "dataset.template.lossOnResponseOnly": (INSTRUCTION, {"dataset.template.lossOnResponseOnly": False}),
    "dataset.labels": (CLASSIFICATION, {"dataset.labels": ["pos", "neg"]}),
    "dataset.cleanWhitespace": ({}, {"dataset.cleanWhitespace": False}),
    "dataset.maxSamples": ({}, {"dataset.maxSamples": 5}),
    "dataset.split.validationRatio": ({}, {"dataset.split.validationRatio": 0.3}),
    "dataset.split.strategy": ({}, {"dataset.split.strategy": "tfidf-cluster"}),
    "dataset.split.clusters": ({"dataset.split.strategy": "tfidf-cluster"}, {"dataset.split.clusters": 3}),
    "dataset.split.seed": ({}, {"dataset.split.seed": 7}),
    "dataset.train": ({}, {"dataset.train": "file:///data/other.jsonl"}),
    "method.type": ({}, {"method.type": "full"}),
    "method.rank": ({}, {"method.rank": 4}),
    "method.alpha": ({}, {"method.alpha": 8}),
    "method.dropout": ({}, {"method.dropout": 0.1}),
    "method.targetModules": ({}, {"method.targetModules": ["q_proj"]}),
    "method.quantization.quantType": (QLORA, {"method.quantization.quantType": "fp4"}),
    "method.quantization.doubleQuant": (QLORA, {"method.quantization.doubleQuant": False}),
    "method.quantization.computeDtype": (QLORA, {"method.quantization.computeDtype": "fp16"}),
    "hyperparameters.epochs": ({}, {"hyperparameters.epochs": 1.5}),
    "hyperparameters.maxSteps": ({}, {"hyperparameters.maxSteps": 10}),
    "hyperparameters.learningRate": ({}, {"hyperparameters.learningRate": 0.01}),
    "hyperparameters.batchSize": ({}, {"hyperparameters.batchSize": 2}),
    "hyperparameters.evalBatchSize": ({}, {"hyperparameters.evalBatchSize": 3}),
    "hyperparameters.gradientAccumulationSteps": ({}, {"hyperparameters.gradientAccumulationSteps": 4}),
    "hyperparameters.maxSeqLength": ({"hyperparameters.packing": False}, {"hyperparameters.maxSeqLength": 8}),
    "hyperparameters.blockSize": ({}, {"hyperparameters.blockSize": 8}),
    "hyperparameters.packing": (INSTRUCTION, {"hyperparameters.packing": True}),
    "hyperparameters.groupByLength": (INSTRUCTION, {"hyperparameters.groupByLength": False}),
    "hyperparameters.warmupRatio": ({}, {"hyperparameters.warmupRatio": 0.1}),
    "hyperparameters.warmupSteps": ({}, {"hyperparameters.warmupSteps": 5}),
    "hyperparameters.weightDecay": ({}, {"hyperparameters.weightDecay": 0.01}),
    "hyperparameters.maxGradNorm": ({}, {"hyperparameters.maxGradNorm": 0.5}),
    "hyperparameters.optimizer": ({}, {"hyperparameters.optimizer": "sgd"}),
    "hyperparameters.scheduler": ({}, {"hyperparameters.scheduler": "cosine"}),
    "hyperparameters.precision": ({}, {"hyperparameters.precision": "bf16"}),
    "hyperparameters.gradientCheckpointing": ({}, {"hyperparameters.gradientCheckpointing": True}),
    "hyperparameters.seed": ({}, {"hyperparameters.seed": 1}),
    "hyperparameters.loggingSteps": ({}, {"hyperparameters.loggingSteps": 3}),
    "hyperparameters.earlyStopping.patience": (LORA_EARLY, {"hyperparameters.earlyStopping.patience": 5}),
    "hyperparameters.earlyStopping.threshold": (LORA_EARLY, {"hyperparameters.earlyStopping.threshold": 0.1}),
    "deepspeed.stage": ({"deepspeed": {}}, {"deepspeed.stage": 3}),
    "deepspeed.offloadOptimizer": ({"deepspeed": {}}, {"deepspeed.offloadOptimizer": True}),
    "deepspeed.offloadParams": ({"deepspeed": {"stage": 3}}, {"deepspeed.offloadParams": True}),
    "resources.gpus": ({}, {"resources.gpus": 1}),
    "resources.gpuType": ({"resources.gpus": 1}, {"resources.gpuType": "a100-40gb"}),
    "resources.workers": ({}, {"resources.workers": 2}),
    "resources.gpuResourceName": ({"resources.gpus": 1}, {"resources.gpuResourceName": "amd.com/gpu"}),
    "resources.cpu": ({}, {"resources.cpu": "3"}),
    "resources.memory": ({}, {"resources.memory": "5Gi"}),
    "resources.ephemeralStorage": ({}, {"resources.ephemeralStorage": "7Gi"}),
    "resources.nodeSelector": ({}, {"resources.nodeSelector": {"pool": "gpu"}}),
    "resources.tolerations[].key": (TOLERATION, {"resources.tolerations": [{"key": "b", "operator": "Exists"}]}),
    "resources.tolerations[].operator": (
        TOLERATION,
        {"resources.tolerations": [{"key": "a", "operator": "Exists", "effect": "NoSchedule"}]},
    ),
    "resources.tolerations[].value": (
        TOLERATION,
        {"resources.tolerations": [{"key": "a", "operator": "Equal", "value": "y", "effect": "NoSchedule"}]},
    ),
    "resources.tolerations[].effect": (
        TOLERATION,
        {"resources.tolerations": [{"key": "a", "operator": "Equal", "value": "x", "effect": "NoExecute"}]},
    ),
    "resources.tolerations[].tolerationSeconds": (
        TOLERATION,
        {"resources.tolerations": [{"key": "a", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}]},
    ),
    "evaluation.metrics": ({}, {"evaluation.metrics": ["loss"]}),
    "evaluation.samplePrompts": ({}, {"evaluation.samplePrompts": ["once upon"]}),
    "evaluation.maxNewTokens": ({}, {"evaluation.maxNewTokens": 9}),
    "evaluation.steps": ({}, {"evaluation.steps": 5}),
    "evaluation.maxSamples": ({}, {"evaluation.maxSamples": 2}),
    "evaluation.bestModelMetric": ({}, {"evaluation.bestModelMetric": "eval_loss"}),
    "checkpoints.everySteps": ({}, {"checkpoints.everySteps": 5}),
    "checkpoints.keep": ({}, {"checkpoints.keep": 4}),
    "storage.secretRef.name": ({"storage.secretRef": {"name": "s3"}}, {"storage.secretRef.name": "s4"}),
    "storage.secretRef.accessKeyIdKey": (
        {"storage.secretRef": {"name": "s3"}},
        {"storage.secretRef.accessKeyIdKey": "K"},
    ),
    "storage.secretRef.secretAccessKeyKey": (
        {"storage.secretRef": {"name": "s3"}},
        {"storage.secretRef.secretAccessKeyKey": "S"},
    ),
    "storage.secretRef.sessionTokenKey": (
        {"storage.secretRef": {"name": "s3"}},
        {"storage.secretRef.sessionTokenKey": "T"},
    ),
    "storage.endpoint": ({}, {"storage.endpoint": "http://minio:9000"}),
    "storage.region": ({}, {"storage.region": "eu-west-1"}),
    "runPolicy.backoffLimit": ({}, {"runPolicy.backoffLimit": 1}),
    "runPolicy.activeDeadlineSeconds": ({}, {"runPolicy.activeDeadlineSeconds": 600}),
    "image": ({}, {"image": "registry.local/trainer:2"}),
}

# Fields whose effect is outside the observers above, and why (each is exercised where its effect is).
ALLOWED: dict[str, str] = {
    "model.uri": "where the trainer downloads the model from (tests/trainer: every run)",
    "model.tokenizerUri": "where the trainer downloads the tokenizer from (fetch_inputs)",
    "output.uri": "where checkpoints, the model and the manifest are uploaded (tests/trainer: every run)",
    "method.mergeAdapter": "an extra upload of merged weights after training (tests/trainer: t5 seq2seq)",
    "dataset.dropColumns": "removes columns nothing downstream reads; its effect is that a template or field naming "
    "a dropped column is refused (test_validation)",
    "runPolicy.suspend": "applied by the operator's reconcile, which suspends the Job (tests/integration)",
    "runPolicy.ttlSecondsAfterFinished": "applied by the operator's reconcile, which deletes the finished workload "
    "(tests/integration)",
    "runPolicy.cancel": "applied by the operator's reconcile, which stops the trainer and ends the job as Cancelled "
    "(tests/unit/test_reconcile.py, tests/integration)",
    "notification.webhook.name": "the Secret of the notification pod's URL (tests/unit/test_notify.py)",
    "notification.webhook.key": "the key of that Secret (tests/unit/test_notify.py)",
}


def _leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, info in model.model_fields.items():
        path = prefix + (info.alias or name)
        ann = info.annotation
        args = typing.get_args(ann) if isinstance(ann, types.UnionType) else (ann,)
        nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        lists = [a for a in args if typing.get_origin(a) is list]
        listed = [i for a in lists for i in typing.get_args(a) if isinstance(i, type) and issubclass(i, BaseModel)]
        if nested:
            out += _leaves(nested[0], path + ".")
        elif listed:
            out += _leaves(listed[0], path + "[].")
        else:
            out.append(path)
    return out


def _apply(spec: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    for dotted, value in changes.items():
        node = spec
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = copy.deepcopy(value)
    return spec


ROWS = [
    {
        "text": f"the  cat number {i} sat on the mat  and looked at bird {i % 3}",
        "alt": f"a dog called rex {i} ran far away",
        "label": "pos" if i % 2 else "neg",
        "label2": "neg" if i % 3 else "pos",
        "input": f"translate {i} please",
        "target": f"done {i}",
        "question": f"what is {i}?",
        "answer": f"it is {i}",
        "messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}],
        "messages2": [{"role": "user", "content": f"bye {i}"}, {"role": "assistant", "content": f"see you {i}"}],
    }
    for i in range(20)
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(ROWS)))
    (root / "lines.txt").write_text("".join(json.dumps({"text": r["alt"]}) + "\n" for r in ROWS))
    return root


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer("gpt2")


def _local(uri: str | None, root: Path) -> Path | None:
    return root / uri.rsplit("/", 1)[-1] if uri else None  # the trainer's download, for file:///data/NAME


def observe(raw: dict[str, Any], root: Path, tok: Any) -> dict[str, Any]:
    """Everything the platform derives from a spec, as plain data."""
    result = validate_spec(raw, WALK_POLICY)
    assert result.ok and result.spec is not None, result.message
    job = resolve_spec(result.spec)
    spec, training = job.spec, job.training
    precision = resolve_precision(spec.hyperparameters.precision)
    args = training_arguments(spec.model_copy(update={"deepspeed": None}), training, precision, root / "out", True)
    stopper = early_stopping(spec)
    train_path = _local(spec.dataset.train, root)
    assert train_path is not None
    data = prepare_data(spec, tok, train_path, _local(spec.dataset.validation, root))
    return {
        "training": training.dump(),
        # The Jobs the operator creates: one, or one per worker of a gang (worker 0's pod IP as rendezvous).
        "workload": (
            build_workload(META, spec)
            if spec.resources.workers == 1
            else [build_worker(META, spec, "IfNotPresent", r, "198.18.100.20") for r in range(spec.resources.workers)]
        ),
        "args": {k: v for k, v in args.to_dict().items() if k not in ("output_dir", "logging_dir")},
        "deepspeed": deepspeed_config(spec.deepspeed) if spec.deepspeed else None,
        "lora": lora_kwargs(spec, architecture(spec, training, "llama")),
        "bnb": quantization_kwargs(spec) if spec.method.type == "qlora" else None,
        "early_stopping": vars(stopper) if stopper else None,
        "estimate": plan.estimate(
            spec, SHAPE, plan.gpu_for(spec), (spec.resources.gpus or 0) * spec.resources.workers
        ).dump(),
        "generation": {**generation_kwargs(spec, training), "prompts": spec.evaluation.sample_prompts},
        "data": {
            "train": data.train.to_dict(),
            "eval": data.eval.to_dict() if data.eval is not None else None,
            "examples": data.eval_examples,
            "labels": data.label_names,
            "stats": data.stats,
        },
    }


def test_every_field_is_covered_once() -> None:
    leaves = set(_leaves(FineTuneJobSpec))
    assert len(leaves) > 80, sorted(leaves)
    uncovered = leaves - CASES.keys() - ALLOWED.keys()
    assert not uncovered, f"new spec fields without a CASE (or a documented ALLOWED reason): {sorted(uncovered)}"
    stale = (CASES.keys() | ALLOWED.keys()) - leaves
    assert not stale, f"CASES/ALLOWED name fields the spec no longer has: {sorted(stale)}"
    assert not CASES.keys() & ALLOWED.keys()


@pytest.mark.parametrize("path", sorted(CASES))
def test_each_accepted_field_changes_what_is_built(path: str, data_dir: Path, tok: Any) -> None:
    context, change = CASES[path]
    base = _apply(BASE, context)
    changed = _apply(base, change)
    before, after = observe(base, data_dir, tok), observe(changed, data_dir, tok)
    assert before != after, f"{path}: accepted, but nothing the platform builds changed"


@pytest.mark.parametrize(
    "change",
    [{"dataset.dropColumns": ["label2"]}, {"hyperparameters.precision": "auto"}, {"evaluation.metrics": None}],
)
def test_the_walk_detects_a_change_that_changes_nothing(change: dict[str, Any], data_dir: Path, tok: Any) -> None:
    """The observation is not trivially different: values that really change nothing compare equal."""
    base = _apply(BASE, {"hyperparameters.precision": "fp32"} if "hyperparameters.precision" in change else {})
    assert observe(base, data_dir, tok) == observe(_apply(base, change), data_dir, tok)


@pytest.mark.parametrize("path", sorted(CASES))
def test_resolving_is_idempotent(path: str) -> None:
    """The trainer resolves the operator's resolved spec again and must get exactly the same job."""
    context, change = CASES[path]
    result = validate_spec(_apply(_apply(BASE, context), change), WALK_POLICY)
    assert result.spec is not None, result.message
    once = resolve_spec(result.spec)
    again = resolve_spec(FineTuneJobSpec.model_validate(once.spec.dump()))
    assert again == once


def test_instruction_packing_is_resolved_and_kept() -> None:
    """The measured bug: packing: true for instruction was accepted, recorded, and not done."""
    raw = _apply(BASE, {**INSTRUCTION, "hyperparameters.packing": True})
    result = validate_spec(raw, WALK_POLICY)
    assert result.spec is not None, result.message
    training = resolve_spec(result.spec).training
    assert training.packing is True and training.block_size == 512
    default = resolve_spec(FineTuneJobSpec.model_validate(_apply(BASE, INSTRUCTION))).training
    assert default.packing is False and default.block_size is None


def test_problems_are_typed_and_all_reported() -> None:
    raw = _apply(
        BASE,
        {"hyperparameters.blockSize": 64, "hyperparameters.packing": False, "method.type": "full", "method.rank": 4},
    )
    with pytest.raises(SpecError) as err:
        resolve_spec(FineTuneJobSpec.model_validate(raw))
    got = {(p.field, p.reason) for p in err.value.problems}
    assert got == {
        ("spec.hyperparameters.blockSize", "UnsupportedCombination"),
        ("spec.method.rank", "UnsupportedCombination"),
    }


@pytest.mark.parametrize(
    "placeholder",
    [
        "{question.__class__}",
        "{question.__init__.__globals__}",
        "{0}",
        "{}",
        "{q[0]}",
        "{question!r}",
        "{question:>10}",
    ],
)
def test_template_placeholders_are_plain_column_names(placeholder: str) -> None:
    """Attribute and index access, positional fields, conversions and format specs: TemplateError naming it."""
    raw = _apply(BASE, {**INSTRUCTION, "dataset.template": {"prompt": f"Q: {placeholder}\n", "response": "{answer}"}})
    problems = check_spec(FineTuneJobSpec.model_validate(raw))
    assert [(p.reason, p.field) for p in problems] == [("TemplateError", "spec.dataset.template.prompt")]
    assert placeholder in problems[0].message
    with pytest.raises(SpecError):
        resolve_spec(FineTuneJobSpec.model_validate(raw))


def test_every_bad_placeholder_is_reported_and_plain_names_pass() -> None:
    template = {"prompt": "{a.b} {c[1]} {question} {{literal}}", "response": "{answer!s}"}
    problems = check_spec(FineTuneJobSpec.model_validate(_apply(BASE, {**INSTRUCTION, "dataset.template": template})))
    assert sorted(p.message.split(" ")[1] for p in problems) == ["{a.b}", "{answer!s}", "{c[1]}"]
    fine = {"prompt": "{question} {{literal}} {_x1}", "response": "{answer}"}
    assert check_spec(FineTuneJobSpec.model_validate(_apply(BASE, {**INSTRUCTION, "dataset.template": fine}))) == []


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        (INSTRUCTION, True),  # padded per batch: grouped by default
        ({"task": "chat"}, True),
        (CLASSIFICATION, True),
        (SEQ2SEQ, True),
        ({"hyperparameters.packing": False}, True),
        ({}, False),  # causal-lm packs by default: no padding to save
        ({**INSTRUCTION, "hyperparameters.packing": True}, False),
        ({**INSTRUCTION, "hyperparameters.groupByLength": False}, False),
        ({"hyperparameters.packing": True, "hyperparameters.groupByLength": False}, False),
    ],
)
def test_group_by_length_defaults_to_on_without_packing(context: dict[str, Any], expected: bool) -> None:
    job = resolve_spec(FineTuneJobSpec.model_validate(_apply(BASE, context)))
    assert job.training.group_by_length is expected
    assert job.spec.hyperparameters.group_by_length is expected  # written into the spec the trainer reads
    args = training_arguments(job.spec, job.training, "fp32", Path("/tmp/out"), False)
    assert args.train_sampling_strategy == ("group_by_length" if expected else "random")


@pytest.mark.parametrize(
    "context", [{}, {**INSTRUCTION, "hyperparameters.packing": True}, {"task": "chat", "hyperparameters.packing": True}]
)
def test_group_by_length_with_packing_is_refused(context: dict[str, Any]) -> None:
    spec = FineTuneJobSpec.model_validate(_apply(BASE, {**context, "hyperparameters.groupByLength": True}))
    problems = check_spec(spec)
    assert [(p.reason, p.field) for p in problems] == [
        ("UnsupportedCombination", "spec.hyperparameters.groupByLength")
    ], problems
    with pytest.raises(SpecError):
        resolve_spec(spec)
    result = validate_spec(_apply(BASE, {**context, "hyperparameters.groupByLength": True}), WALK_POLICY)
    assert not result.ok and "groupByLength" in (result.message or "")
