"""The preflight planner (finetune_api.plan): parameter counts from config.json equal the real models built from
the same config, LoRA counts equal peft's, and the verdicts on held-out jobs are right.

The memory estimate against measured tensors lives in tests/trainer/test_plan_memory.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    TrainingArguments,
)

from finetune_api import plan
from finetune_api.resolve import resolve_spec
from finetune_api.spec import FineTuneJobSpec
from finetune_cli.demo import LLAMA_2_7B_CONFIG
from finetune_trainer.config import architecture
from finetune_trainer.modeling import apply_method

GIB = 1024**3
SMALL = {"vocab_size": 97}
# Small configs of every supported architecture, with the variants that change the count: grouped-query
# attention, tied and untied embeddings, biases, T5's gated MLP and separate decoder depth, GPT-2's n_inner.
CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64},
    "gpt2-inner": {"model_type": "gpt2", "n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 48, "n_inner": 72},
    "bloom": {"hidden_size": 32, "n_layer": 2, "n_head": 2},
    "gpt_neox": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 80,
        "max_position_embeddings": 64,
    },
    "gpt_neox-tied-nobias": {
        "model_type": "gpt_neox",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 48,
        "max_position_embeddings": 64,
        "attention_bias": False,
        "tie_word_embeddings": True,
    },
    "llama": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 80,
        "max_position_embeddings": 64,
    },
    "llama-bias-tied": {
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "intermediate_size": 40,
        "attention_bias": True,
        "mlp_bias": True,
        "tie_word_embeddings": True,
    },
    "mistral": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 80,
        "max_position_embeddings": 64,
    },
    "qwen2": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 80,
        "tie_word_embeddings": True,
    },
    "qwen3": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 80,
    },
    "t5": {"d_model": 32, "d_kv": 8, "d_ff": 80, "num_layers": 2, "num_decoder_layers": 3, "num_heads": 4},
    "t5-gated": {
        "model_type": "t5",
        "d_model": 32,
        "d_kv": 16,
        "d_ff": 64,
        "num_layers": 2,
        "num_heads": 2,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "relative_attention_num_buckets": 8,
    },
    "bert": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 80,
        "max_position_embeddings": 64,
    },
    "roberta": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 80,
        "max_position_embeddings": 70,
        "type_vocab_size": 1,
    },
    "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 80, "max_position_embeddings": 64},
}
ENCODERS = {"bert", "roberta", "distilbert"}


def _config(name: str, **extra: Any) -> Any:
    kwargs = dict(CONFIGS[name])
    model_type = kwargs.pop("model_type", name)
    return AutoConfig.for_model(model_type, **SMALL, pad_token_id=0, decoder_start_token_id=0, **kwargs, **extra)


def _config_json(config: Any, tmp_path: Path) -> dict[str, Any]:
    """What the preflight reads: config.json as save_pretrained writes it (values equal to the defaults left out)."""
    config.save_pretrained(tmp_path)
    data: dict[str, Any] = json.loads((tmp_path / "config.json").read_text())
    return data


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _spec(**changes: Any) -> FineTuneJobSpec:
    raw: dict[str, Any] = {
        "model": {"uri": "s3://models/m/"},
        "task": "causal-lm",
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/job/"},
        "resources": {"gpus": 1},
    }
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return resolve_spec(FineTuneJobSpec.model_validate(raw)).spec


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_count_equals_the_model_built_from_the_same_config(name: str, tmp_path: Path) -> None:
    config = _config(name)
    torch.manual_seed(0)
    model: PreTrainedModel
    if config.model_type == "t5":
        model = AutoModelForSeq2SeqLM.from_config(config)
    elif config.model_type in ENCODERS:
        model = AutoModel.from_config(config)  # the base model with its pooler, what classification builds on
    else:
        model = AutoModelForCausalLM.from_config(config)
    shape = plan.model_shape(_config_json(config, tmp_path))
    assert shape.parameters == _count(model)
    assert shape.model_type == config.model_type


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "gpt_neox", "bert", "roberta", "distilbert"])
def test_classification_parameters_equal_the_sequence_classification_model(name: str, tmp_path: Path) -> None:
    labels = ["a", "b", "c"]
    config = _config(name, num_labels=len(labels))
    model = AutoModelForSequenceClassification.from_config(config)
    shape = plan.model_shape(_config_json(config, tmp_path))
    spec = _spec(task="classification", **{"method.type": "full"})
    data = plan.DataStats(
        samples=10, tokens=100, mean_length=10, p50_length=10, p95_length=12, max_length=14, truncated=0, labels=labels
    )
    assert plan.parameter_counts(spec, shape, data) == (_count(model), _count(model))


@pytest.mark.parametrize(
    ("name", "task", "targets"),
    [
        ("gpt2", "causal-lm", None),  # c_attn and both c_proj (attention and MLP) get adapters
        ("llama", "causal-lm", None),  # all seven projections, grouped-query k/v
        ("llama", "causal-lm", ["all-linear"]),
        ("llama", "causal-lm", ["q_proj", "v_proj"]),
        ("t5", "seq2seq", None),  # q and v of encoder self-, decoder self- and cross-attention
        ("bert", "classification", None),  # query, value, plus the classifier trained in full
        ("gpt_neox", "causal-lm", None),
        ("distilbert", "classification", None),
    ],
)
def test_lora_counts_equal_peft(name: str, task: str, targets: list[str] | None, tmp_path: Path) -> None:
    extra = {"num_labels": 2} if task == "classification" else {}
    config = _config(name, **extra)
    if task == "classification":
        model = AutoModelForSequenceClassification.from_config(config)
    elif task == "seq2seq":
        model = AutoModelForSeq2SeqLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    changes: dict[str, Any] = {"task": task, "method.rank": 4}
    if targets:
        changes["method.targetModules"] = targets
    spec = _spec(**changes)
    training = resolve_spec(spec).training
    peft_model = apply_method(model, spec, architecture(spec, training, config.model_type), False)
    trainable, total = peft_model.get_nb_trainable_parameters()
    shape = plan.model_shape(_config_json(config, tmp_path))
    data = plan.DataStats(
        samples=1, tokens=1, mean_length=1, p50_length=1, p95_length=1, max_length=1, truncated=0, labels=["x", "y"]
    )
    assert plan.parameter_counts(spec, shape, data) == (total, trainable)


def test_unknown_architectures_and_gpus_are_plan_errors() -> None:
    with pytest.raises(plan.PlanError, match=r"cannot size model_type 'mamba'.*llama"):
        plan.model_shape({"model_type": "mamba", "hidden_size": 8})
    with pytest.raises(plan.PlanError, match="llama"):
        plan.model_shape({"hidden_size": 8})
    with pytest.raises(plan.PlanError, match="no usable hidden_size"):
        plan.model_shape({"model_type": "llama", "hidden_size": "big"})
    with pytest.raises(plan.PlanError, match=r"unknown GPU type 'h1000'.*a100-80gb"):
        plan.gpu_type("h1000")
    assert set(plan.GPU_CATALOG) >= {
        "h200",
        "h100",
        "a100-80gb",
        "a100-40gb",
        "l40s",
        "l4",
        "a10g",
        "t4",
        "v100-32gb",
        "v100-16gb",
        "cpu",
    }


def test_gpu_type_is_validated_in_the_spec() -> None:
    assert _spec(**{"resources.gpuType": "l4"}).resources.gpu_type == "l4"
    for bad in ("h1000", "cpu"):
        with pytest.raises(ValidationError, match="unknown GPU type"):
            _spec(**{"resources.gpuType": bad})
    assert plan.gpu_for(_spec(**{"resources.gpuType": "l4"})).name == "l4"
    assert plan.gpu_for(_spec(**{"resources.gpuType": "l4"}), "h200").name == "h200"  # the preflight's override
    assert plan.gpu_for(_spec()).name == "h100"
    assert plan.gpu_for(_spec(**{"resources.gpus": 0})).name == "cpu"


LLAMA_7B = LLAMA_2_7B_CONFIG
LLAMA_70B = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
}
INSTRUCTION = {"task": "instruction", "dataset.template": {"prompt": "Q: {q}\nA: ", "response": "{a}"}}


def test_published_sizes() -> None:
    assert plan.model_shape(LLAMA_7B).parameters == 6_738_415_616  # Llama-2-7B
    assert plan.model_shape(LLAMA_70B).parameters == 68_976_648_192  # Llama-2-70B


def test_a_7b_full_fine_tune_does_not_fit_one_a100_40gb_and_lora_comes_first() -> None:
    spec = _spec(**INSTRUCTION, **{"method.type": "full", "hyperparameters.precision": "bf16"})
    est = plan.estimate(spec, plan.model_shape(LLAMA_7B), plan.gpu_type("a100-40gb"), 1)
    assert not est.fits
    # fp32 master weights, fp32 gradients, two fp32 Adam moments: 16 bytes per parameter before activations.
    states = est.memory.weights_gib + est.memory.gradients_gib + est.memory.optimizer_gib
    assert states > 16 * 6.7e9 / GIB
    assert est.summary.startswith("does not fit")
    assert est.fixes and est.fixes[0].startswith(("method.type: lora", "method.type: qlora"))
    for fix in est.fixes:
        gib = float(fix.rsplit("-> ", 1)[1].split(" GiB")[0])
        assert gib <= 40.0, fix
    # Each fix is the estimate of the changed spec, re-run.
    if est.fixes[0].startswith("method.type: qlora -> "):
        again = plan.estimate(
            _spec(**INSTRUCTION, **{"method.type": "qlora", "hyperparameters.precision": "bf16"}),
            plan.model_shape(LLAMA_7B),
            plan.gpu_type("a100-40gb"),
            1,
        )
        assert f"-> {again.memory.total_gib:.1f} GiB" in est.fixes[0]


def test_the_same_job_with_qlora_fits_one_l4_with_gradient_checkpointing() -> None:
    shape, l4 = plan.model_shape(LLAMA_7B), plan.gpu_type("l4")
    spec = _spec(**INSTRUCTION, **{"method.type": "qlora", "hyperparameters.gradientCheckpointing": True})
    est = plan.estimate(spec, shape, l4, 1)
    assert est.fits, est.summary
    assert est.summary.startswith("fits:")
    assert est.memory.weights_gib < 6  # 4-bit blocks with their constants, fp32 embeddings and head
    assert est.trainable_parameters == 8 * 32 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # rank x (in + out)
    # Without checkpointing, 8 x 512 tokens of activations through 32 layers do not fit 24 GB (Korthikanti's
    # 34 s b h bytes per layer alone is 18 GB), and checkpointing is the first fix.
    plain = plan.estimate(_spec(**INSTRUCTION, **{"method.type": "qlora"}), shape, l4, 1)
    assert not plain.fits and plain.memory.activations_gib > 34 * 4096 * 4096 * 32 / GIB
    assert plain.fixes[0].startswith("hyperparameters.gradientCheckpointing: true -> ")


def test_a_70b_full_fine_tune_with_zero3_on_16_h100_is_sized_per_gpu() -> None:
    shape = plan.model_shape(LLAMA_70B)
    p = shape.parameters
    spec = _spec(
        **INSTRUCTION,
        **{
            "method.type": "full",
            "deepspeed": {"stage": 3},
            "resources.gpus": 16,
            "hyperparameters.gradientCheckpointing": True,
            "hyperparameters.batchSize": 1,
        },
    )
    est = plan.estimate(spec, shape, plan.gpu_type("h100"), 16)
    mem = est.memory
    # ZeRO-3 in bf16: 16-bit weights and gradients, fp32 master + two Adam moments, each split 16 ways; the
    # weights plus two gathered blocks (the one running and the one prefetched) in 16 bits.
    block = sum(x.fan_in * x.fan_out * x.count for x in shape.linears) / 80
    assert mem.weights_gib == pytest.approx((2 * p / 16 + 2 * 2 * block) / GIB, abs=1e-3)
    assert mem.gradients_gib == pytest.approx(2 * p / 16 / GIB, abs=1e-3)
    assert mem.optimizer_gib == pytest.approx(12 * p / 16 / GIB, abs=1e-3)
    assert est.fits and est.gpus == 16
    one = plan.estimate(spec, shape, plan.gpu_type("h100"), 1)
    assert not one.fits and one.memory.optimizer_gib == pytest.approx(12 * p / GIB, abs=1e-3)
    # Without ZeRO the same 16 GPUs each hold everything: refused, with sharding among the fixes.
    plain = plan.estimate(
        _spec(**INSTRUCTION, **{"method.type": "full", "resources.gpus": 16}), shape, plan.gpu_type("h100"), 16
    )
    assert not plain.fits
    assert any("deepspeed.stage: 3" in f or "method.type" in f for f in plain.fixes)


def test_small_jobs_fit_and_get_time_and_cost() -> None:
    gpt2 = plan.model_shape({"model_type": "gpt2"})
    assert gpt2.parameters == 124_439_808  # GPT-2 small
    data = plan.DataStats(
        samples=10_000,
        tokens=2_000_000,
        mean_length=200.0,
        p50_length=180,
        p95_length=400,
        max_length=900,
        truncated=12,
    )
    spec = _spec(**INSTRUCTION, **{"hyperparameters.epochs": 2})
    est = plan.estimate(spec, gpt2, plan.gpu_type("h100"), 1, data)
    assert est.fits and not est.fixes
    assert est.steps == math.ceil(10_000 / 8) * 2
    assert est.dataset_tokens == 2_000_000
    assert est.total_flops == pytest.approx(est.flops_per_token * 2_000_000 * 2, rel=1e-3)
    assert est.tokens_per_step == 8 * 200  # per-batch padding: about the mean length per sample
    seconds = est.total_flops / (989e12 * plan.DEFAULT_UTILISATION)
    assert est.hours == pytest.approx(seconds / 3600, rel=1e-3) and est.gpu_hours == est.hours
    assert "GPU-hours at 40% MFU" in est.summary


def test_flops_per_token() -> None:
    shape = plan.model_shape(LLAMA_7B)
    n_mm = sum(x.fan_in * x.fan_out * x.count for x in shape.linears) + 32000 * 4096
    attention = 4 * 32 * 512 * 32 * 128  # forward QK^T and AV per token, sequence 512
    full = plan.flops_per_token(_spec(**{"method.type": "full", "hyperparameters.maxSeqLength": 512}), shape, 512)
    assert full == pytest.approx(6 * n_mm + 3 * attention)
    lora_spec = _spec(**{"hyperparameters.maxSeqLength": 512})
    lora = plan.flops_per_token(lora_spec, shape, 512)
    _, trainable = plan.parameter_counts(lora_spec, shape)
    assert lora == pytest.approx(4 * n_mm + 3 * attention + 6 * trainable)
    ckpt = _spec(**{"method.type": "full", "hyperparameters.gradientCheckpointing": True})
    assert plan.flops_per_token(ckpt, shape, 512) == pytest.approx(full + 2 * n_mm + attention)


def test_each_setting_moves_memory_the_way_it_should() -> None:
    shape = plan.model_shape(LLAMA_7B)
    h100 = plan.gpu_type("h100")

    def total(**changes: Any) -> float:
        return plan.memory(_spec(**INSTRUCTION, **changes), shape, h100, 1).total_gib

    base = total(**{"method.type": "full"})
    assert total(**{"method.type": "lora"}) < base
    assert total(**{"method.type": "qlora"}) < total(**{"method.type": "lora"})
    assert total(**{"method.type": "full", "hyperparameters.gradientCheckpointing": True}) < base
    assert total(**{"method.type": "full", "hyperparameters.optimizer": "adamw-8bit"}) < base
    assert (
        total(**{"method.type": "full", "hyperparameters.optimizer": "sgd"})
        < total(**{"method.type": "full", "hyperparameters.optimizer": "adafactor"})
        < base
    )
    assert total(**{"method.type": "full", "hyperparameters.batchSize": 2}) < base
    assert total(**{"method.type": "full", "hyperparameters.maxSeqLength": 128}) < base
    assert total(**{"method.type": "full", "deepspeed": {"stage": 2, "offloadOptimizer": True}}) < base
    assert total(**{"method.type": "full", "hyperparameters.precision": "fp32"}) != base


def test_a_cpu_job_is_sized_against_its_memory() -> None:
    spec = _spec(**{"resources.gpus": 0, "resources.memory": "2Gi"})
    est = plan.estimate(spec, plan.model_shape(LLAMA_7B), plan.GPU_CATALOG["cpu"], 0)
    assert est.gpu_type == "cpu" and est.gpu_memory_gib == 2.0 and not est.fits
    tiny = plan.model_shape(
        {
            **LLAMA_7B,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 512,
        }
    )
    assert plan.estimate(spec, tiny, plan.GPU_CATALOG["cpu"], 0).fits


def test_the_estimate_stays_small_enough_for_a_termination_message() -> None:
    shape = plan.model_shape(LLAMA_70B)
    data = plan.DataStats(
        samples=10**7,
        tokens=10**10,
        mean_length=1000.5,
        p50_length=900,
        p95_length=4000,
        max_length=131072,
        truncated=10**6,
        labels=None,
    )
    for method, gpu in (("lora", "h100"), ("full", "a100-40gb"), ("full", "h200")):
        spec = _spec(
            **INSTRUCTION, **{"method.type": method, "hyperparameters.maxSeqLength": 2048, "resources.gpus": 8}
        )
        est = plan.estimate(spec, shape, plan.gpu_type(gpu), 8, data)
        text = json.dumps(est.dump(), separators=(",", ":"))
        assert len(text.encode()) < 3 * 1024, len(text)
        assert plan.Estimate.model_validate_json(text) == est
    assert len(est.fixes) == plan.MAX_FIXES  # the biggest an estimate gets


def test_a_job_nothing_can_fix_says_so() -> None:
    spec = _spec(
        **INSTRUCTION,
        **{"method.type": "full", "hyperparameters.maxSeqLength": 131072, "hyperparameters.batchSize": 64},
    )
    est = plan.estimate(spec, plan.model_shape(LLAMA_70B), plan.gpu_type("t4"), 1)
    assert not est.fits and est.fixes == []
    assert "none of the planner's fixes fits" in est.summary


@pytest.mark.parametrize("optim", ["adamw", "adafactor", "sgd"])
@pytest.mark.parametrize(
    ("name", "task", "method"),
    [
        ("gpt2", "causal-lm", "full"),  # tied head, position table
        ("llama", "causal-lm", "full"),  # untied head
        ("llama", "causal-lm", "lora"),
        ("t5", "seq2seq", "full"),  # relative-position tables
        ("bert", "classification", "full"),  # position and type tables, classifier
        ("bert", "classification", "lora"),  # adapters plus the classifier trained in full
    ],
)
def test_optimizer_states_equal_the_trainers_optimizer(
    name: str, task: str, method: str, optim: str, tmp_path: Path
) -> None:
    """The optimizer the HF Trainer builds for the spec (Trainer.get_optimizer_cls_and_kwargs), after one step."""
    from transformers import Trainer

    from finetune_trainer.train import OPTIMIZERS

    extra = {"num_labels": 2} if task == "classification" else {}
    config = _config(name, **extra)
    model_cls = {"classification": AutoModelForSequenceClassification, "seq2seq": AutoModelForSeq2SeqLM}.get(
        task, AutoModelForCausalLM
    )
    torch.manual_seed(0)
    model = model_cls.from_config(config)
    spec = _spec(task=task, **{"method.type": method, "hyperparameters.optimizer": optim, "resources.gpus": 0})
    model = apply_method(model, spec, architecture(spec, resolve_spec(spec).training, config.model_type), False)
    args = TrainingArguments(output_dir=str(tmp_path), optim=OPTIMIZERS[spec.hyperparameters.optimizer], report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = cls(trainable, **kwargs)
    for p in trainable:
        p.grad = torch.ones_like(p)
    optimizer.step()
    measured = sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    labels = plan.DataStats(
        samples=1, tokens=1, mean_length=1, p50_length=1, p95_length=1, max_length=1, truncated=0, labels=["x", "y"]
    )
    estimated = plan.memory_bytes(
        spec, plan.model_shape(_config_json(config, tmp_path)), plan.GPU_CATALOG["cpu"], 0, labels
    )["optimizer"]
    assert estimated == pytest.approx(measured, rel=0.01, abs=4 * len(trainable))  # AdamW keeps a 4-byte step
