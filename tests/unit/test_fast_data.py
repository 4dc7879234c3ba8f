"""The fast data path (finetune_trainer/tokens.py, the clean-text shortcut) gives exactly what the plain path gave:
the same token ids, the same blocks, the same dataset (features, rows, column order) and the same stats.

The reference here is the previous implementation, kept verbatim: ``tokenizer(texts, add_special_tokens=False)``
in batches of 1000, Python list concatenation and slicing, ``datasets.Dataset.from_dict``.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import datasets
import pytest
from tokenizers import processors

from finetune_api.resolve import resolve_spec
from finetune_api.spec import FineTuneJobSpec
from finetune_trainer import data
from finetune_trainer.formats import _clean, clean_text
from finetune_trainer.tiny_models import build_tokenizer, default_corpus
from finetune_trainer.tokens import _backend, encode_plain, token_stream, tokenizer_threads

BLOCK = 64


def _corpus(n: int, seed: int = 3) -> list[str]:
    """English-like lines plus what tokenizers and cleanup treat specially: unicode, special-token text, runs of
    whitespace of every kind, long lines, lines that clean to nothing."""
    rng = random.Random(seed)
    words = " ".join(default_corpus(200, seed)).split()
    odd = ["<|endoftext|>", "<|user|>", "café", "naïve", "中文字", "🙂", "x\u00a0y", "tab\there", "two  spaces", "1234"]
    lines = []
    for i in range(n):
        picked = [
            rng.choice(words if rng.random() < 0.85 else odd) for _ in range(rng.randint(1, 40 if i % 7 else 400))
        ]
        line = " ".join(picked)
        if i % 11 == 0:
            line = f"  {line}\u2003 \t"
        if i % 37 == 0:
            line = " \u00a0\t "  # empty after cleanup: the row is dropped
        lines.append(line)
    return lines


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "url": f"u{i}"}) + "\n" for i, t in enumerate(lines)))
    return path


def _spec(train: Path, ratio: float = 0.0) -> FineTuneJobSpec:
    raw = {
        "model": {"uri": "file:///models/tiny"},
        "task": "causal-lm",
        "dataset": {"train": str(train), "split": {"validationRatio": ratio}},
        "hyperparameters": {"blockSize": BLOCK, "packing": True},
        "output": {"uri": "file:///out"},
    }
    return resolve_spec(FineTuneJobSpec.model_validate(raw)).spec


def _previous(tok: Any, texts: list[str], block: int) -> tuple[datasets.Dataset, int]:
    """The previous causal-lm packing, verbatim: returns the dataset and the tokens dropped."""
    lead, eos = data._leading_specials(tok), data._eos(tok)
    ids: list[list[int]] = []
    for start in range(0, len(texts), 1000):
        ids.extend(tok(list(texts[start : start + 1000]), add_special_tokens=False)["input_ids"])
    seqs = [lead + x + eos for x in ids]
    stream = [t for x in seqs for t in x]
    usable = len(stream) - len(stream) % block
    blocks = [stream[i : i + block] for i in range(0, usable, block)]
    dropped = len(stream) - usable
    if not blocks and stream:
        blocks, dropped = [stream], 0
    cols = {"input_ids": blocks, "labels": [list(b) for b in blocks], "attention_mask": [[1] * len(b) for b in blocks]}
    return datasets.Dataset.from_dict(cols), dropped


def _llama_like() -> Any:
    """A byte-level BPE whose post-processor puts a BOS first, as Llama's does (so samples get a leading token)."""
    tok = build_tokenizer("gpt2")
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert data._leading_specials(tok) == [bos]
    return tok


TOKENIZERS = {
    "gpt2": lambda: build_tokenizer("gpt2"),
    "t5": lambda: build_tokenizer("t5"),
    "bert": lambda: build_tokenizer("bert"),
    "llama-like": _llama_like,
}


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_causal_packing_gives_the_previous_blocks(kind: str, tmp_path: Path) -> None:
    tok = TOKENIZERS[kind]()
    assert _backend(tok) is not None  # the fast path is the one under test
    lines = _corpus(2500)
    prepared = data.prepare_data(_spec(_write(tmp_path / "train.jsonl", lines)), tok, tmp_path / "train.jsonl")
    texts = [t for t in (_clean(x) for x in lines) if t]
    expected, dropped = _previous(tok, texts, BLOCK)
    assert len(expected) > 100
    assert prepared.train.column_names == expected.column_names
    assert prepared.train.features == expected.features
    assert prepared.train.to_dict() == expected.to_dict()
    assert prepared.stats["tokens_dropped_by_packing"] == dropped
    assert prepared.stats["train_tokens"] == len(expected) * BLOCK
    assert "short_block" not in prepared.stats


def test_a_split_shorter_than_one_block_is_one_short_block(tmp_path: Path) -> None:
    tok = build_tokenizer("gpt2")
    lines = ["a short line", "and another"]
    prepared = data.prepare_data(_spec(_write(tmp_path / "t.jsonl", lines)), tok, tmp_path / "t.jsonl")
    expected, dropped = _previous(tok, lines, BLOCK)
    assert len(expected) == 1 and len(expected[0]["input_ids"]) < BLOCK
    assert prepared.train.to_dict() == expected.to_dict() and prepared.train.features == expected.features
    assert prepared.stats["short_block"] is True and prepared.stats["tokens_dropped_by_packing"] == dropped == 0


def test_validation_split_blocks_match(tmp_path: Path) -> None:
    tok = build_tokenizer("gpt2")
    path = _write(tmp_path / "train.jsonl", _corpus(600, seed=5))
    prepared = data.prepare_data(_spec(path, ratio=0.2), tok, path)
    assert prepared.eval is not None
    for ds in (prepared.train, prepared.eval):
        rows = ds.to_dict()
        assert all(len(r) == BLOCK for r in rows["input_ids"]) and rows["labels"] == rows["input_ids"]
        assert rows["attention_mask"] == [[1] * BLOCK] * len(ds)


def test_encode_plain_equals_the_tokenizer_call_and_falls_back_where_it_must() -> None:
    lines = _corpus(500, seed=9)
    tok = build_tokenizer("gpt2")
    assert encode_plain(tok, lines) == tok(lines, add_special_tokens=False)["input_ids"]
    padded = build_tokenizer("gpt2")
    padded.backend_tokenizer.enable_padding(length=512, pad_id=1, pad_token="<pad>")
    assert _backend(padded) is None  # the call would switch padding off: only the call itself is exact
    assert encode_plain(padded, lines) == build_tokenizer("gpt2")(lines, add_special_tokens=False)["input_ids"]
    split = build_tokenizer("gpt2")
    split.split_special_tokens = True  # "<|endoftext|>" in a text is then plain text
    assert _backend(split) is None
    plain = build_tokenizer("gpt2")
    assert encode_plain(split, lines) == plain(lines, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert encode_plain(split, lines) != encode_plain(plain, lines)  # the corpus holds special-token text


def test_token_stream_is_the_concatenation() -> None:
    ids = [[5, 6], [], [7, 8, 9], [10]]
    for lead, eos in (([], []), ([1], []), ([], [2]), ([1, 3], [2])):
        stream = token_stream(ids, lead, eos)
        assert stream.tokens.tolist() == [t for x in ids for t in [*lead, *x, *eos]]
        assert stream.lengths.tolist() == [len(lead) + len(x) + len(eos) for x in ids]
    blocks, dropped = token_stream(ids, [1], [2]).blocks(4)
    assert blocks.tolist() == [[1, 5, 6, 2], [1, 2, 1, 7], [8, 9, 2, 1]] and dropped == 2
    assert token_stream([], [1], [2]).blocks(4)[0].size == 0


@pytest.mark.parametrize("previous", [None, "false", "true"])
def test_tokenizer_threads_restores_the_setting(previous: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if previous is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", previous)
    with tokenizer_threads():
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    assert os.environ.get("TOKENIZERS_PARALLELISM") == previous


def test_clean_text_shortcut_is_exact() -> None:
    spaces = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    # The shortcut's premise: the ASCII space is the only printable whitespace character.
    assert [c for c in spaces if c.isprintable()] == [" "]
    rng = random.Random(1)
    alphabet = ["a", "b", "é", "中", "🙂", "\r\n", *spaces]
    samples = [*_corpus(300), *("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(5000))]
    samples += [f"x{c}y" for c in spaces] + [f"{c}x" for c in spaces] + [f"x{c}" for c in spaces]
    for text in samples:
        assert clean_text(text) == _clean(text), repr(text)
