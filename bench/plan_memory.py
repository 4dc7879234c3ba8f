"""The planner's memory estimate against what tiny real models hold on CPU (fp32). Prints the table that
docs/planner.md shows; tests/trainer/test_plan_memory.py asserts the same rows.

    .venv/bin/python bench/plan_memory.py

What is measured is what the estimate claims to model, component by component:

* weights + gradients + optimizer states: the bytes of every tensor in ``model.parameters()``, their ``.grad``
  and ``optimizer.state`` after one real AdamW step (the trainer's own model loading and LoRA wrapping);
* activations: the unique storages autograd saves during one training forward (loss included), seen through
  ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded (they are weights).

The fixed overhead term (CUDA context, allocator slack) has no CPU counterpart and is left out of both sides.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)

from finetune_api import plan
from finetune_api.resolve import resolve_spec
from finetune_api.spec import FineTuneJobSpec
from finetune_trainer.config import architecture
from finetune_trainer.modeling import apply_method

MIB = 1024**2
VOCAB = 512

# Small but not degenerate: the blocks, not only the vocabulary head, carry the activations.
CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": {"n_embd": 128, "n_layer": 2, "n_head": 4, "n_positions": 512},
    "llama": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 352,
        "max_position_embeddings": 512,
    },
    # Held out from the derivation of the rules: grouped-query attention and a deeper model.
    "llama-gqa": {
        "model_type": "llama",
        "hidden_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 320,
        "max_position_embeddings": 512,
    },
    "gpt2-deep": {"model_type": "gpt2", "n_embd": 96, "n_layer": 4, "n_head": 3, "n_positions": 512},
    "t5": {"d_model": 128, "d_kv": 32, "d_ff": 512, "num_layers": 2, "num_heads": 4, "decoder_start_token_id": 0},
    "gpt_neox": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "max_position_embeddings": 512,
    },
    "bloom": {"hidden_size": 128, "n_layer": 2, "n_head": 4},
    "distilbert": {"dim": 128, "n_layers": 2, "n_heads": 4, "hidden_dim": 512, "max_position_embeddings": 512},
    "bert": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "max_position_embeddings": 512,
    },
}
TASKS = {
    "gpt2": "causal-lm",
    "gpt2-deep": "causal-lm",
    "llama": "causal-lm",
    "llama-gqa": "causal-lm",
    "gpt_neox": "causal-lm",
    "bloom": "causal-lm",
    "t5": "seq2seq",
    "bert": "classification",
    "distilbert": "classification",
}
# (model, method, sequence length, per-device batch, precision)
CASES: list[tuple[str, str, int, int, str]] = [
    (arch, method, seq, batch, "fp32")
    for arch in CONFIGS
    for method in ("full", "lora")
    for seq, batch in ((64, 4), (256, 2))
]
# bf16 as the HF Trainer runs it (autocast over fp32 weights), on CPU: the 16-bit weight copies the backward
# pass keeps, fp32 norms, 16-bit linear inputs. Models without dropout (CPU dropout masks are full elements where
# GPUs keep one byte), LoRA with lora dropout 0; token counts that no weight shape shares (see ``measure``).
BF16_CASES: list[tuple[str, str, int, int, str]] = [
    (arch, method, seq, batch, "bf16")
    for arch in ("llama", "llama-gqa", "gpt_neox")
    for method in ("full", "lora")
    for seq, batch in ((64, 4), (224, 2))
]


@dataclass(frozen=True)
class Row:
    model: str
    method: str
    seq: int
    batch: int
    precision: str
    estimated: dict[str, float]  # bytes: weights, gradients, optimizer, states (their sum), activations, total
    measured: dict[str, float]

    def error(self, key: str) -> float:
        return (self.estimated[key] - self.measured[key]) / self.measured[key]


def job_spec(arch: str, method: str, seq: int, batch: int, precision: str = "fp32") -> FineTuneJobSpec:
    task = TASKS[arch]
    raw: dict[str, Any] = {
        "model": {"uri": "s3://models/tiny/"},
        "task": task,
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/job/"},
        "method": {"type": method},
        "hyperparameters": {"batchSize": batch, "maxSeqLength": seq, "precision": precision, "optimizer": "adamw"},
        "resources": {"gpus": 0},
    }
    if method == "lora" and precision != "fp32":
        raw["method"]["dropout"] = 0.0
    if task == "causal-lm":
        raw["hyperparameters"]["packing"] = False
    return resolve_spec(FineTuneJobSpec.model_validate(raw)).spec


def build(arch: str, spec: FineTuneJobSpec) -> tuple[Any, dict[str, Any]]:
    settings = dict(CONFIGS[arch])
    model_type = settings.pop("model_type", arch)
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, pad_token_id=0, **settings)
    torch.manual_seed(0)
    model: PreTrainedModel
    if TASKS[arch] == "classification":
        model = AutoModelForSequenceClassification.from_config(
            config.__class__(**{**config.to_dict(), "num_labels": 2})
        )
    elif TASKS[arch] == "seq2seq":
        model = AutoModelForSeq2SeqLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    training = resolve_spec(spec).training
    wrapped = apply_method(model, spec, architecture(spec, training, model_type), False)
    return wrapped, config.to_diff_dict() | {"model_type": model_type}


def _inputs(arch: str, seq: int, batch: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=gen)
    if TASKS[arch] == "classification":
        return {"input_ids": ids, "labels": torch.randint(0, 2, (batch,), generator=gen)}
    if TASKS[arch] == "seq2seq":
        return {"input_ids": ids, "labels": torch.randint(1, VOCAB, (batch, seq), generator=gen)}
    return {"input_ids": ids, "labels": ids}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure(arch: str, method: str, seq: int, batch: int, precision: str = "fp32") -> Row:
    spec = job_spec(arch, method, seq, batch, precision)
    model, config = build(arch, spec)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # Under autocast the saved 16-bit copies of 2-D weights are weights (the estimate counts them there); the
    # cases' token counts differ from every weight dimension, so no activation has a weight's shape.
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    shapes |= {s[::-1] for s in shapes}
    saved: dict[int, int] = {}
    copies: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes():
            weight_copy = t.dtype == torch.bfloat16 and tuple(t.shape) in shapes
            (copies if weight_copy else saved)[storage.data_ptr()] = storage.nbytes()
        return t

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss = model(**_inputs(arch, seq, batch)).loss
    loss.backward()
    optimizer.step()
    measured = {
        "weights": float(sum(_nbytes(p) for p in model.parameters()) + sum(copies.values())),
        "gradients": float(sum(_nbytes(p.grad) for p in trainable if p.grad is not None)),
        "optimizer": float(
            sum(_nbytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
        ),
        "activations": float(sum(saved.values())),
    }
    estimated = plan.memory_bytes(spec, plan.model_shape(config), plan.GPU_CATALOG["cpu"], 0)
    for side in (measured, estimated):
        side["states"] = side["weights"] + side["gradients"] + side["optimizer"]
        side["total"] = side["states"] + side["activations"]  # no overhead term on either side
    return Row(arch, method, seq, batch, precision, estimated, measured)


def table(rows: list[Row]) -> str:
    """Markdown: estimated / measured MiB per component, and the errors (estimate - measured) / measured."""
    head = (
        "| model | method | precision | seq x batch | weights + grads + optimizer, MiB | activations, MiB "
        "| total, MiB | error (states / activations / total) |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        cells = [f"{r.estimated[k] / MIB:.2f} / {r.measured[k] / MIB:.2f}" for k in ("states", "activations", "total")]
        errors = " / ".join(f"{r.error(k):+.1%}" for k in ("states", "activations", "total"))
        lines.append(
            f"| {r.model} | {r.method} | {r.precision} | {r.seq} x {r.batch} | {' | '.join(cells)} | {errors} |"
        )
    return "\n".join(lines)


LLAMA_2_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 32000,
}
LLAMA_2_70B = {**LLAMA_2_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80}
LLAMA_2_70B |= {"num_attention_heads": 64, "num_key_value_heads": 8}
EXAMPLES: list[tuple[str, dict[str, Any], dict[str, Any], str, int]] = [
    ("Llama-2-7B full, bf16, 1 x a100-40gb", LLAMA_2_7B, {"method": {"type": "full"}}, "a100-40gb", 1),
    ("Llama-2-7B qlora, 1 x l4", LLAMA_2_7B, {"method": {"type": "qlora"}}, "l4", 1),
    (
        "Llama-2-70B full, ZeRO-3, checkpointing, batch 1, 16 x h100",
        LLAMA_2_70B,
        {
            "method": {"type": "full"},
            "deepspeed": {"stage": 3},
            "hyperparameters": {"gradientCheckpointing": True, "batchSize": 1},
        },
        "h100",
        16,
    ),
]


def examples() -> str:
    """The planner on three well-known jobs (instruction data: 50k samples, 15M tokens, maxSeqLength 512)."""
    data = plan.DataStats(
        samples=50_000,
        tokens=15_000_000,
        mean_length=300.0,
        p50_length=280,
        p95_length=510,
        max_length=900,
        truncated=700,
    )
    out = []
    for title, config, changes, gpu, gpus in EXAMPLES:
        raw: dict[str, Any] = {
            "model": {"uri": "s3://models/m/"},
            "task": "instruction",
            "dataset": {"train": "s3://data/train.jsonl", "template": {"prompt": "{q}", "response": "{a}"}},
            "output": {"uri": "s3://out/job/"},
            "hyperparameters": {"precision": "bf16"},
            "resources": {"gpus": gpus},
        }
        for key, value in changes.items():
            raw[key] = {**raw.get(key, {}), **value}
        spec = resolve_spec(FineTuneJobSpec.model_validate(raw)).spec
        est = plan.estimate(spec, plan.model_shape(config), plan.gpu_type(gpu), gpus, data)
        m = est.memory
        out.append(
            f"{title}: weights {m.weights_gib:.1f} + gradients {m.gradients_gib:.1f} + optimizer "
            f"{m.optimizer_gib:.1f} + activations {m.activations_gib:.1f} + overhead {m.overhead_gib:.1f} GiB\n"
            f"  {est.summary}\n" + "".join(f"  fix: {f}\n" for f in est.fixes)
        )
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if "--examples" in argv:
        print(examples())
        return 0
    torch.set_num_threads(1)
    rows = [measure(*case) for case in CASES + BF16_CASES]
    print(table(rows))
    worst = max(abs(r.error("total")) for r in rows)
    print(f"\n{len(rows)} cases; worst total error {worst:.1%} (estimated / measured, overhead term excluded)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main(sys.argv[1:]))
