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
    own = {"key": "team", "operator": "Equal", "value": "a", "effect": "NoSchedule"}
    cfg = OperatorConfig.model_validate(
        {"defaults": {"tolerations": [gpu_pool]}, "limits": {"allowedTolerations": [own]}}
    )
    result = validate_spec(spec_with(resources__tolerations=[own]), cfg)
    assert result.spec is not None
    assert [t.key for t in result.spec.resources.tolerations] == ["nvidia.com/gpu", "team"]


# ---- URI policy ----------------------------------------------------------------------------------------------

URI_POLICY = OperatorConfig.model_validate(
    {
        "limits": {
            "allowedUris": {
                "model": ["s3://models/"],
                "data": ["s3://data/", "s3://team-a-data/shared"],
                "output": ["s3://out/"],
            }
        },
        "tenants": {"team-b": {"limits": {"allowedUris": {"data": ["s3://team-b-data/"]}}}},
    }
)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"dataset__train": "s3://data-evil/qa.jsonl"}, "spec.dataset.train"),  # a bucket that merely starts alike
        ({"dataset__train": "s3://team-a-data/shared-evil/qa.jsonl"}, "spec.dataset.train"),  # a key prefix alike
        ({"dataset__train": "s3://team-a-data/qa.jsonl"}, "spec.dataset.train"),  # above the allowed prefix
        ({"dataset__validation": "s3://out/qa.jsonl"}, "spec.dataset.validation"),  # output bucket is not data
        ({"model__uri": "s3://data/tiny/"}, "spec.model.uri"),
        ({"model__tokenizerUri": "s3://elsewhere/tok/"}, "spec.model.tokenizerUri"),
        ({"model__uri": "hf://org/model"}, "spec.model.uri"),
        ({"output__uri": "s3://outside/job/"}, "spec.output.uri"),
    ],
)
def test_uris_outside_the_allowed_locations_are_refused(changes: dict[str, Any], field: str) -> None:
    result = validate_spec(spec_with(**changes), URI_POLICY)
    assert [(p.reason, p.field) for p in result.problems] == [("PolicyViolation", field)], result.message
    assert "locations this platform allows" in result.message


def test_uris_under_the_allowed_locations_pass() -> None:
    spec = spec_with(
        model__uri="s3://models/tiny/",
        model__tokenizerUri="s3://models/tok/",
        dataset__train="s3://team-a-data/shared/deep/qa.jsonl",
        dataset__validation="s3://data/val.jsonl",
        output__uri="s3://out",
    )
    result = validate_spec(spec, URI_POLICY)
    assert result.ok, result.message


def test_a_tenant_overrides_one_kind_of_location_and_keeps_the_others() -> None:
    team_b = URI_POLICY.for_namespace("team-b")
    assert validate_spec(spec_with(dataset__train="s3://team-b-data/qa.jsonl"), team_b).ok
    refused = validate_spec(spec_with(dataset__train="s3://data/qa.jsonl"), team_b)
    assert [p.field for p in refused.problems] == ["spec.dataset.train"]
    # The platform's model and output lists still apply to team-b.
    outside = validate_spec(spec_with(dataset__train="s3://team-b-data/qa.jsonl", output__uri="s3://x/y/"), team_b)
    assert [p.field for p in outside.problems] == ["spec.output.uri"]
    assert not validate_spec(spec_with(dataset__train="s3://team-b-data/qa.jsonl"), URI_POLICY).ok


@pytest.mark.parametrize(
    "uri",
    [
        "s3://data/a/../qa.jsonl",
        "s3://data/../qa.jsonl",
        "s3://data/./qa.jsonl",
        "s3://data/a//qa.jsonl",
        "s3://data/a/%2e%2e/qa.jsonl",
        "s3://data/a/%2E./qa.jsonl",
        "s3://data/a/%252e%252e/qa.jsonl",  # encoded twice
        "s3://data/a%2f..%2fb/qa.jsonl",  # an encoded slash hides a .. segment
        "s3://data/a?b=/qa.jsonl",  # the trainer would read key "a"
        "s3://data/a#/../qa.jsonl",
    ],
)
def test_dot_segments_and_their_encodings_are_refused_in_every_uri(uri: str) -> None:
    for field, key in (
        ("spec.dataset.train", "dataset__train"),
        ("spec.output.uri", "output__uri"),
        ("spec.model.uri", "model__uri"),
    ):
        result = validate_spec(spec_with(**{key: uri}), OperatorConfig())
        assert [(p.reason, p.field) for p in result.problems] == [("InvalidURI", field)], result.message


def test_dot_segments_are_refused_in_file_and_hf_uris_too() -> None:
    policy = OperatorConfig.model_validate({"limits": {"allowedUriSchemes": ["s3", "file", "hf"]}})
    for key, uri in (("output__uri", "file:///scratch/../etc/"), ("model__uri", "hf://org/../other")):
        result = validate_spec(spec_with(**{key: uri}), policy)
        assert [p.reason for p in result.problems] == ["InvalidURI"], result.message


def test_file_uris_are_refused_on_clusters_by_default() -> None:
    for key in ("model__uri", "dataset__train", "output__uri"):
        result = validate_spec(spec_with(**{key: "file:///scratch/x.jsonl"}), OperatorConfig())
        assert [p.reason for p in result.problems] == ["PolicyViolation"], result.message
        assert "file://" in result.message and "pod" in result.message
    allowed = OperatorConfig.model_validate({"limits": {"allowedUriSchemes": ["s3", "file"]}})
    assert validate_spec(spec_with(output__uri="file:///mnt/shared/out/"), allowed).ok


def test_the_local_run_policy_allows_file_uris_and_keeps_every_other_rule() -> None:
    from finetune_cli.local import allowing_local_files, local_policy

    spec = spec_with(
        model__uri="file:///models/tiny/", dataset__train="file:///data/qa.jsonl", output__uri="file:///tmp/out/"
    )
    assert validate_spec(spec, local_policy(None)).ok
    local = allowing_local_files(URI_POLICY)
    assert validate_spec(spec, local).ok
    assert validate_spec(spec, local.for_namespace("team-b")).ok
    # ... but the platform's s3 locations and every other limit still apply.
    assert not validate_spec(spec_with(dataset__train="s3://data-evil/x.jsonl"), local).ok
    assert not validate_spec(spec_with(model__uri="file:///models/../etc/"), local).ok
    assert not validate_spec(spec_with(resources__gpus=64), local).ok


def test_uri_prefixes_in_the_policy_must_be_uris() -> None:
    for bad in ("data/", "ftp://x/", "s3://", "s3://data/../x/", "file://host/x/"):
        with pytest.raises(ValueError, match="allowedUris"):
            OperatorConfig.model_validate({"limits": {"allowedUris": {"data": [bad]}}})


# ---- placement -----------------------------------------------------------------------------------------------


def test_a_toleration_of_every_taint_is_refused_by_default() -> None:
    result = validate_spec(spec_with(resources__tolerations=[{"operator": "Exists"}]), OperatorConfig())
    assert [(p.reason, p.field) for p in result.problems] == [("PolicyViolation", "spec.resources.tolerations[0]")]
    assert "every taint" in result.message


TOLERATING = OperatorConfig.model_validate(
    {
        "defaults": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        "limits": {
            "allowedTolerations": [
                {"key": "team", "operator": "Equal", "value": "a"},
                {"key": "spot", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            ]
        },
    }
)


@pytest.mark.parametrize(
    ("toleration", "ok"),
    [
        ({"key": "team", "operator": "Equal", "value": "a", "effect": "NoSchedule"}, True),  # narrower effect
        ({"key": "team", "value": "a"}, True),  # operator defaults to Equal
        ({"key": "team", "operator": "Equal", "value": "b"}, False),
        ({"key": "team", "operator": "Exists"}, False),  # every value of the key: broader
        ({"key": "spot", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60}, True),
        ({"key": "spot", "operator": "Exists", "effect": "NoExecute"}, False),  # forever: broader
        ({"key": "spot", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 3600}, False),
        ({"key": "spot", "operator": "Exists"}, False),  # every effect: broader
        ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, True),  # the platform's own
        ({"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}, False),
        ({"operator": "Exists"}, False),
        ({"operator": "Exists", "effect": "NoSchedule"}, False),
    ],
)
def test_tenant_tolerations_must_be_within_the_allowed_list(toleration: dict[str, Any], ok: bool) -> None:
    result = validate_spec(spec_with(resources__tolerations=[toleration]), TOLERATING)
    assert result.ok is ok, result.message
    if ok:
        assert result.spec is not None
        assert result.spec.resources.tolerations[0].key == "nvidia.com/gpu"  # the platform's first, once
        assert len({t.key for t in result.spec.resources.tolerations}) == len(result.spec.resources.tolerations)


def test_node_selector_keys_and_values_come_from_the_policy() -> None:
    cfg = OperatorConfig.model_validate(
        {
            "defaults": {"nodeSelector": {"pool": "gpu"}},
            "limits": {"allowedNodeSelector": {"gpu-type": ["a100", "h100"], "zone": ["*"]}},
        }
    )
    ok = validate_spec(spec_with(resources__nodeSelector={"gpu-type": "h100", "zone": "z1", "pool": "gpu"}), cfg)
    assert ok.spec is not None, ok.message
    assert ok.spec.resources.node_selector == {"pool": "gpu", "gpu-type": "h100", "zone": "z1"}
    for selector in ({"gpu-type": "t4"}, {"pool": "system"}, {"kubernetes.io/hostname": "control-plane"}):
        result = validate_spec(spec_with(resources__nodeSelector=selector), cfg)
        key = next(iter(selector))
        assert [(p.reason, p.field) for p in result.problems] == [
            ("PolicyViolation", f"spec.resources.nodeSelector.{key}")
        ], result.message
    assert not validate_spec(spec_with(resources__nodeSelector={"zone": "bad value!"}), cfg).ok
    assert not validate_spec(spec_with(resources__nodeSelector={"anything": "x"}), OperatorConfig()).ok


@pytest.mark.parametrize("name", ["cpu", "memory", "ephemeral-storage", "hugepages-2Mi", "pods", "gpu"])
def test_gpu_resource_name_is_never_a_core_resource(name: str) -> None:
    result = validate_spec(spec_with(resources__gpuResourceName=name, resources__gpus=8), OperatorConfig())
    assert [(p.reason, p.field) for p in result.problems] == [("InvalidResources", "spec.resources.gpuResourceName")], (
        result.message
    )


def test_gpu_resource_name_comes_from_the_allowed_list() -> None:
    assert validate_spec(spec_with(resources__gpuResourceName="amd.com/gpu"), OperatorConfig()).ok
    result = validate_spec(spec_with(resources__gpuResourceName="example.com/fpga"), OperatorConfig())
    assert [(p.reason, p.field) for p in result.problems] == [("PolicyViolation", "spec.resources.gpuResourceName")]
    intel = OperatorConfig.model_validate(
        {"tenants": {"hw": {"limits": {"allowedGpuResourceNames": ["gpu.intel.com/i915"]}}}}
    )
    assert validate_spec(spec_with(resources__gpuResourceName="gpu.intel.com/i915"), intel.for_namespace("hw")).ok
    for bad in ({"limits": {"allowedGpuResourceNames": ["cpu"]}}, {"defaults": {"gpuResourceName": "memory"}}):
        with pytest.raises(ValueError, match="vendor"):
            OperatorConfig.model_validate(bad)
    with pytest.raises(ValueError, match=r"tenants\.t"):
        OperatorConfig.model_validate({"tenants": {"t": {"limits": {"allowedGpuResourceNames": ["kubernetes.io/x"]}}}})


@pytest.mark.parametrize(
    ("prefixes", "image", "ok"),
    [
        (["registry.corp"], "registry.corp/x", True),
        (["registry.corp"], "registry.corp/team/x:1@sha256:" + "a" * 64, True),
        (["registry.corp"], "registry.corp.attacker.io/x", False),
        (["registry.corp"], "registry.corp:5000/x", False),  # another port is another registry: list it
        (["registry.corp:5000"], "registry.corp:5000/x", True),
        (["registry.corp"], "registry.corp", False),  # a Docker Hub image called registry.corp
        (["registry.corp/team/"], "registry.corp/team/img:tag", True),
        (["registry.corp/team/"], "registry.corp/team:tag", False),
        (["registry.corp/team/"], "registry.corp/team-evil/img:tag", False),
        (["registry.corp/team"], "registry.corp/team-evil/img", False),
        (["registry.corp/team/img"], "registry.corp/team/img:2", True),
        (["registry.corp/team/img"], "registry.corp/team/img2:2", False),
        (["registry.corp/"], "registry.corp/../x", False),
    ],
)
def test_image_prefixes_match_whole_segments(prefixes: list[str], image: str, ok: bool) -> None:
    cfg = OperatorConfig.model_validate({"limits": {"allowedImagePrefixes": prefixes}})
    result = validate_spec(spec_with(image=image), cfg)
    assert result.ok is ok, result.message
    if not ok:
        assert result.problems[0].field == "spec.image"


def test_the_platforms_own_image_is_admitted_whatever_the_prefixes() -> None:
    cfg = OperatorConfig.model_validate(
        {"defaults": {"image": "finetune-trainer:0.1.0"}, "limits": {"allowedImagePrefixes": ["registry.corp/"]}}
    )
    assert validate_spec(spec_with(image=None), cfg).ok
    assert not validate_spec(spec_with(image="finetune-trainer:0.2.0"), cfg).ok


def test_image_prefixes_in_the_policy_must_be_repository_paths() -> None:
    with pytest.raises(ValueError, match="allowedImagePrefixes"):
        OperatorConfig.model_validate({"limits": {"allowedImagePrefixes": ["registry.corp/../x"]}})


# ---- templates -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "placeholder", ["{question.__class__}", "{0}", "{}", "{question[0]}", "{question!r}", "{question:>10}"]
)
def test_template_placeholders_are_plain_field_names(placeholder: str) -> None:
    result = validate_spec(spec_with(dataset__template__prompt=f"Q: {placeholder} {{question}}"), OperatorConfig())
    assert [(p.reason, p.field) for p in result.problems] == [("TemplateError", "spec.dataset.template.prompt")]
    assert placeholder in result.message


# ---- storage endpoint ------------------------------------------------------------------------------------------


def test_a_tenant_may_not_send_the_pods_credentials_to_an_endpoint_of_its_choosing() -> None:
    cfg = OperatorConfig.model_validate(
        {
            "defaults": {"storageEndpoint": "http://minio.storage:9000"},
            "tenants": {"lab": {"limits": {"allowedStorageEndpoints": ["https://ceph.lab.corp/"]}}},
        }
    )
    result = validate_spec(spec_with(storage={"endpoint": "https://attacker.example.com"}), cfg)
    assert [(p.reason, p.field) for p in result.problems] == [("PolicyViolation", "spec.storage.endpoint")]
    assert "credentials" in result.message and "http://minio.storage:9000" in result.message
    for endpoint in (None, "http://minio.storage:9000", "http://minio.storage:9000/"):
        ok = validate_spec(spec_with(storage={"endpoint": endpoint} if endpoint else {}), cfg)
        assert ok.spec is not None and ok.spec.storage.endpoint == (endpoint or "http://minio.storage:9000")
    lab = cfg.for_namespace("lab")
    assert validate_spec(spec_with(storage={"endpoint": "https://ceph.lab.corp"}), lab).ok
    assert not validate_spec(spec_with(storage={"endpoint": "https://ceph.lab.corp"}), cfg).ok
    anything = OperatorConfig.model_validate({"limits": {"allowedStorageEndpoints": ["*"]}})
    assert validate_spec(spec_with(storage={"endpoint": "https://attacker.example.com"}), anything).ok
    with pytest.raises(ValueError, match="allowedStorageEndpoints"):
        OperatorConfig.model_validate({"limits": {"allowedStorageEndpoints": ["minio:9000"]}})
