"""Length-grouped batching (hyperparameters.groupByLength) measured on the Trainer's real dataloader.

The Trainer is the trainer's own (FineTuneTrainer with the TrainingArguments, data and collator the trainer
builds from a resolved spec) on a tiny Llama: grouped batches hold far less padding than random ones, every
sample is still seen once per epoch, the order is a function of the seed and the epoch (what resuming
mid-epoch relies on), evaluation is unchanged, and training with it learns.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_api.resolve import resolve_spec
from finetune_api.spec import FineTuneJobSpec, Task
from finetune_trainer.batching import FineTuneTrainer, SeededLengthGroupedSampler
from finetune_trainer.config import architecture
from finetune_trainer.data import make_collator, prepare_data
from finetune_trainer.modeling import apply_method, load_base_model, load_tokenizer
from finetune_trainer.tiny_models import build_model
from finetune_trainer.train import training_arguments

ANSWERS = ["rest and water", "sleep early", "see a doctor", "drink water and rest well"]


def _rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Questions of very different lengths (2 to 40 words) with learnable answers (one per question kind)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % len(ANSWERS)
        words = " ".join(rng.choice(["pain", "fever", "cough", "cold"]) for _ in range(rng.choice([2, 4, 20, 40])))
        rows.append({"question": f"kind {kind} {words}", "answer": ANSWERS[kind]})
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batching")
    train, val = root / "train.jsonl", root / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _rows(128)))
    val.write_text("".join(json.dumps(r) + "\n" for r in _rows(24, seed=1)))
    corpus = [f"{r['question']} {r['answer']}" for r in _rows(200, seed=2)]
    model = build_model("llama", root / "llama", corpus, hidden_size=32, num_heads=2)
    return {"train": train, "val": val, "model": model, "out": root / "out"}


def _trainer(files: dict[str, Path], group: bool | None, out: str = "out", **hp: Any) -> FineTuneTrainer:
    """The trainer's own Trainer for an instruction job, as train.run builds it (without storage)."""
    raw = {
        "model": {"uri": "s3://models/llama/"},
        "task": "instruction",
        "method": {"type": "full"},
        "dataset": {
            "train": "s3://data/train.jsonl",
            "validation": "s3://data/val.jsonl",
            "template": {"prompt": "Q: {question}\nA: ", "response": "{answer}"},
        },
        "hyperparameters": {"batchSize": 8, "maxSeqLength": 128, "groupByLength": group, **hp},
        "checkpoints": {"everySteps": 6},
        "output": {"uri": "s3://out/job/"},
    }
    job = resolve_spec(FineTuneJobSpec.model_validate(raw))
    spec, resolved = job.spec, job.training
    tok = load_tokenizer(files["model"], Task.INSTRUCTION)
    data = prepare_data(spec, tok, files["train"], files["val"])
    torch.manual_seed(spec.hyperparameters.seed)
    model = load_base_model(spec, files["model"], None, tok.pad_token_id)
    model = apply_method(model, spec, architecture(spec, resolved, "llama"), False)
    args = training_arguments(spec, resolved, "fp32", files["out"] / out, has_eval=True)
    return FineTuneTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=make_collator(spec, tok, model),
        processing_class=tok,
    )


def _batches(loader: Any) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def _padding(batches: list[dict[str, torch.Tensor]]) -> float:
    """Fraction of the computed positions that are padding."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    return 1 - real / total


def _samples(batches: list[dict[str, torch.Tensor]]) -> Counter[tuple[int, ...]]:
    """Every sample in the batches, unpadded."""
    return Counter(
        tuple(ids[mask.bool()].tolist())
        for b in batches
        for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True)
    )


def test_grouped_batches_hold_far_less_padding(files: dict[str, Path]) -> None:
    grouped_trainer = _trainer(files, None)  # the default for instruction
    assert grouped_trainer.args.train_sampling_strategy == "group_by_length"
    grouped = _batches(grouped_trainer.get_train_dataloader())
    plain = _batches(_trainer(files, False).get_train_dataloader())
    # Same data, each sample exactly once per epoch, in the same number of batches.
    assert len(grouped) == len(plain) == 16
    assert _samples(grouped) == _samples(plain) and sum(_samples(plain).values()) == 128
    with_grouping, without = _padding(grouped), _padding(plain)
    assert without > 0.4, without  # the data is meant to mix short and long samples
    assert with_grouping < 0.5 * without, (with_grouping, without)


def test_the_grouped_order_is_a_function_of_seed_and_epoch(files: dict[str, Path]) -> None:
    """Every rank, and an attempt resumed mid-epoch, draws exactly the same batches."""
    first = _trainer(files, True)
    order = [list(first._get_train_sampler()) for _ in range(2)]  # type: ignore[arg-type]
    assert order[0] == order[1] == list(_trainer(files, True)._get_train_sampler())  # type: ignore[arg-type]
    sampler = first._get_train_sampler()
    assert isinstance(sampler, SeededLengthGroupedSampler)
    sampler.set_epoch(1)
    assert sorted(sampler) == sorted(order[0]) and list(sampler) != order[0]  # a new shuffle each epoch
    assert list(_trainer(files, True, seed=7)._get_train_sampler()) != order[0]  # type: ignore[arg-type]
    # Grouped per optimizer step: 4 samples x 2 accumulation steps train the same samples per step as 8 x 1.
    accumulated = _trainer(files, True, batchSize=4, gradientAccumulationSteps=2)._get_train_sampler()
    assert list(accumulated) == order[0]  # type: ignore[arg-type]


def test_evaluation_is_the_same_with_and_without_grouping(files: dict[str, Path]) -> None:
    on, off = _trainer(files, True), _trainer(files, False)
    for a, b in zip(on.get_eval_dataloader(), off.get_eval_dataloader(), strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])  # the data's order, batch for batch
    assert on.evaluate()["eval_loss"] == off.evaluate()["eval_loss"]


def test_training_with_grouping_learns(files: dict[str, Path]) -> None:
    trainer = _trainer(files, True, maxSteps=48, learningRate=3e-3, loggingSteps=4, epochs=3)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    assert trainer.evaluate()["eval_loss"] < 0.6 * before


def test_a_run_resumed_mid_epoch_trains_on_exactly_the_remaining_batches(files: dict[str, Path]) -> None:
    """What an attempt after a preemption does: resume from the step-6 checkpoint of a 16-step epoch; the
    Trainer skips the 6 batches already trained, so steps 7-12 see the same batches (hence the same losses)
    as the uninterrupted run's."""
    hp = {"maxSteps": 12, "learningRate": 3e-3, "loggingSteps": 1}
    whole = _trainer(files, True, out="whole", **hp)
    whole.train()
    resumed = _trainer(files, True, out="resumed", **hp)
    resumed.train(resume_from_checkpoint=str(files["out"] / "whole" / "checkpoint-6"))

    def losses(t: FineTuneTrainer) -> dict[int, float]:
        return {int(e["step"]): e["loss"] for e in t.state.log_history if "loss" in e and e["step"] > 6}

    assert sorted(losses(resumed)) == list(range(7, 13))
    # Another order would change these by far more than CPU summation order does.
    assert losses(resumed) == pytest.approx(losses(whole), rel=1e-4)
