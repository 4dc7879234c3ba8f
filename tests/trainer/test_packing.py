"""Packing for instruction and chat is exact: every sample's loss packed equals its loss alone.

Samples are packed whole into rows with position ids restarting per sample and no attention mask; the model
must keep them apart. Checked on tiny models built locally (random weights are enough: any leak between
samples changes the logits): the data path on a tiny Llama, and every architecture the trainer allows
(``config.PACKING_MODEL_TYPES``), with architectures it refuses as the control that the check can fail.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorForSeq2Seq

from finetune_api.resolve import resolve_spec
from finetune_api.spec import FineTuneJobSpec
from finetune_trainer.config import PACKING_MODEL_TYPES, UserError, architecture
from finetune_trainer.data import IGNORE, PackedCollator, make_collator, prepare_data
from finetune_trainer.tiny_models import build_model

TOL = 1e-5


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position next-token losses (0 where the label is ignored) for one row."""
    return torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE, reduction="none")


def _per_sample_unpacked(model: Any, samples: list[dict[str, list[int]]]) -> list[float]:
    out = []
    for s in samples:
        ids, labels = torch.tensor([s["input_ids"]]), torch.tensor(s["labels"])
        logits = model(input_ids=ids, use_cache=False).logits[0]
        out.append(float(_token_losses(logits, labels).sum() / (labels[1:] != IGNORE).sum()))
    return out


def _per_sample(logits: torch.Tensor, labels: torch.Tensor, lengths: list[int]) -> list[float]:
    """Per-sample mean losses read off one packed row of the given sample lengths."""
    losses, start = [], 0
    for n in lengths:
        seg = labels[start : start + n]
        losses.append(float(_token_losses(logits[start : start + n], seg).sum() / (seg[1:] != IGNORE).sum()))
        start += n
    return losses


def _per_sample_packed(model: Any, batch: dict[str, Any]) -> tuple[list[float], float]:
    """Per-sample losses of one packed forward (samples start where the position ids restart), and the model's
    own loss for the batch."""
    output = model(**batch)
    pos = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    lengths = [b - a for a, b in itertools.pairwise(starts)]
    return _per_sample(output.logits[0], batch["labels"][0], lengths), float(output.loss)


def _rows(path: Path, n: int) -> Path:
    rows = [
        {
            "question": f"what helps a cough number {i}?" + " really" * (i % 4),
            "answer": "rest and water" + " and sleep" * (i % 3),
            "messages": [
                {"role": "user", "content": f"is the rent due {i}?"},
                {"role": "assistant", "content": "yes on the first day" + " of the month" * (i % 2)},
                {"role": "user", "content": "and the notice?"},
                {"role": "assistant", "content": f"two weeks {i}"},
            ],
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _spec(task: str, train: Path, packing: bool, loss_on_response_only: bool = True) -> FineTuneJobSpec:
    raw: dict[str, Any] = {
        "model": {"uri": "file:///models/llama"},
        "task": task,
        "dataset": {"train": str(train), "split": {"validationRatio": 0}},
        "hyperparameters": {"packing": packing, "maxSeqLength": 64, **({"blockSize": 200} if packing else {})},
        "output": {"uri": "file:///out"},
    }
    if task == "instruction":
        raw["dataset"]["template"] = {
            "prompt": "### Question:\n{question}\n### Answer:\n",
            "response": "{answer}",
            "lossOnResponseOnly": loss_on_response_only,
        }
    return resolve_spec(FineTuneJobSpec.model_validate(raw)).spec


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    path = build_model("llama", tmp_path_factory.mktemp("llama"), hidden_size=64, num_heads=4)
    model = AutoModelForCausalLM.from_pretrained(str(path)).train()  # train mode, as the Trainer runs it
    return model, AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize(("task", "masked"), [("instruction", True), ("instruction", False), ("chat", True)])
def test_packed_losses_equal_unpacked_per_sample_on_tiny_llama(
    task: str, masked: bool, llama: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tok = llama
    train = _rows(tmp_path / "rows.jsonl", 12)
    plain = prepare_data(_spec(task, train, False, masked), tok, train)
    packed = prepare_data(_spec(task, train, True, masked), tok, train)
    samples = plain.train.to_list()
    rows = packed.train.to_list()
    assert len(rows) < len(samples), "nothing was packed"
    assert packed.stats["packing"] is True and packed.stats["train_samples_packed"] == len(samples)
    assert all(len(r["input_ids"]) <= 200 for r in rows)
    assert "attention_mask" not in packed.train.column_names  # a mask would switch off the per-sample masking

    # The whole packed split as the Trainer gets it: batches of rows, flattened by the collator.
    collator = make_collator(_spec(task, train, True, masked), tok)
    assert isinstance(collator, PackedCollator)
    got: list[float] = []
    with torch.no_grad():
        for start in range(0, len(rows), 2):
            losses, _ = _per_sample_packed(model, collator(rows[start : start + 2]))
            got += losses
        want = _per_sample_unpacked(model, samples)
    assert len(got) == len(want)
    assert got == pytest.approx(want, abs=TOL)

    # The batch loss the Trainer optimises is the same too: padded unpacked batch vs flattened packed batch.
    with torch.no_grad():
        pad = DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE, padding=True)(samples)
        unpacked_loss = float(model(**pad, use_cache=False).loss)
        _, packed_loss = _per_sample_packed(model, collator(rows))
    assert packed_loss == pytest.approx(unpacked_loss, abs=TOL)


def _tiny(model_type: str) -> Any:
    common = {"vocab_size": 101, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=128, **common)
    if model_type == "bloom":
        return AutoConfig.for_model("bloom", hidden_size=32, n_layer=2, n_head=2, **common)
    kwargs: dict[str, Any] = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
    }
    if model_type == "opt":
        kwargs = {**kwargs, "ffn_dim": 64, "word_embed_proj_dim": 32}
    if model_type not in ("gpt_neox", "opt"):
        kwargs["num_key_value_heads"] = 2
    if model_type in ("gemma", "qwen3"):
        kwargs["head_dim"] = 16
    return AutoConfig.for_model(model_type, **kwargs, **common)


def _random_samples(seed: int) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, prompt in ((7, 3), (12, 5), (5, 2), (9, 4)):
        ids = torch.randint(3, 101, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def _packed_batch(samples: list[dict[str, list[int]]]) -> dict[str, Any]:
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for s in samples:
        row["input_ids"] += s["input_ids"]
        row["labels"] += [IGNORE, *s["labels"][1:]]
        row["position_ids"] += list(range(len(s["input_ids"])))
    return PackedCollator()([row])


@pytest.mark.parametrize("model_type", sorted(PACKING_MODEL_TYPES))
def test_every_allowed_architecture_packs_exactly(model_type: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny(model_type)).eval()
    samples = _random_samples(1)
    with torch.no_grad():
        got, _ = _per_sample_packed(model, _packed_batch(samples))
        want = _per_sample_unpacked(model, samples)
    assert got == pytest.approx(want, abs=TOL)


@pytest.mark.parametrize("control", ["opt", "llama-positions-running-on"])
def test_the_check_fails_where_samples_leak(control: str) -> None:
    """Controls: OPT derives positions from the attention mask, and plain concatenation (positions running on)
    lets samples see each other: per-sample losses differ, so the equality above is a real check."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny(control.split("-")[0])).eval()
    samples = _random_samples(1)
    batch = _packed_batch(samples)
    if control != "opt":
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
    with torch.no_grad():
        logits = model(**batch).logits[0]
        got = _per_sample(logits, batch["labels"][0], [len(s["input_ids"]) for s in samples])
        want = _per_sample_unpacked(model, samples)
    assert got[0] == pytest.approx(want[0], abs=TOL)  # the first sample sees nothing before it either way
    assert max(abs(a - b) for a, b in zip(got[1:], want[1:], strict=True)) > 1e-3


def test_architectures_that_cannot_pack_samples_are_refused(tmp_path: Path) -> None:
    train = _rows(tmp_path / "rows.jsonl", 4)
    spec = _spec("instruction", train, True)
    training = resolve_spec(spec).training
    with pytest.raises(UserError) as err:
        architecture(spec, training, "bloom")
    assert err.value.reason == "PackingUnsupported" and "packing: false" in err.value.message
    assert architecture(spec, training, "llama").target_modules
    unpacked = _spec("instruction", train, False)
    assert architecture(unpacked, resolve_spec(unpacked).training, "bloom").model_type == "bloom"
