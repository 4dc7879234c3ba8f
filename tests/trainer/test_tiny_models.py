"""Tiny random-weight models of real architectures: they must load through the same Auto* classes, with
the same tokenizer families, as the real checkpoints the seed workflows use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from finetune_trainer.tiny_models import ARCHITECTURES, build_model, build_tokenizer, default_corpus

MODEL_TYPES = {"gpt2": "gpt2", "bloom": "bloom", "gpt-neox": "gpt_neox", "llama": "llama", "t5": "t5", "bert": "bert"}
AUTO = {
    "gpt2": AutoModelForCausalLM,
    "bloom": AutoModelForCausalLM,
    "gpt-neox": AutoModelForCausalLM,
    "llama": AutoModelForCausalLM,
    "t5": AutoModelForSeq2SeqLM,
    "bert": AutoModelForMaskedLM,
}
TEXT = "The tenant gave notice to the landlord."


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_build_model_loads_with_auto_classes(arch: str, tmp_path: Path) -> None:
    out = build_model(arch, tmp_path / arch)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPES[arch]
    assert (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    model = AUTO[arch].from_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    assert 10_000 < n_params < 200_000  # tiny, but a real network
    assert len(tok) <= model.config.vocab_size
    assert tok.pad_token_id is not None

    enc = tok([TEXT], return_tensors="pt")
    with torch.no_grad():
        if arch == "t5":
            out_ids = model.generate(**enc, max_new_tokens=4)
            assert out_ids.shape[0] == 1
            logits = model(**enc, decoder_input_ids=out_ids).logits
        else:
            logits = model(**enc).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["gpt2", "bloom", "gpt-neox", "llama"])
def test_decoder_tokenizer_is_lossless_byte_bpe_with_chat_template(arch: str, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(build_model(arch, tmp_path / arch))
    # Byte-level BPE: any text, even characters the corpus never had, round-trips exactly.
    text = "Zürich costs 12€ — ok?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.eos_token == "<|endoftext|>"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rendered = str(tok.apply_chat_template(messages, tokenize=False))
    assert rendered.startswith("<|user|>\nhi") and "<|assistant|>\nhello<|endoftext|>" in rendered
    enc: Any = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    learned = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tok.decode(learned) == "hello<|endoftext|>"


def test_bert_wordpiece_and_t5_sentencepiece_special_tokens(tmp_path: Path) -> None:
    bert = AutoTokenizer.from_pretrained(build_model("bert", tmp_path / "bert"))
    ids = bert(TEXT)["input_ids"]
    assert ids[0] == bert.cls_token_id and ids[-1] == bert.sep_token_id
    assert bert.mask_token == "[MASK]"
    assert bert.decode(ids, skip_special_tokens=True) == TEXT.lower()

    t5 = AutoTokenizer.from_pretrained(build_model("t5", tmp_path / "t5"))
    ids = t5(TEXT)["input_ids"]
    assert ids[-1] == t5.eos_token_id  # T5 closes every sequence with </s>
    assert (t5.pad_token_id, t5.eos_token_id) == (0, 1)  # the real T5 ids (pad is the decoder start)
    assert t5.decode(ids, skip_special_tokens=True) == TEXT


def test_classification_head_is_saved(tmp_path: Path) -> None:
    out = build_model("bert", tmp_path / "cls", num_labels=3)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 3
    fresh = AutoModelForSequenceClassification.from_pretrained(out)
    # A saved head loads identically; a missing one would be re-initialised randomly each time.
    assert torch.equal(model.classifier.weight, fresh.classifier.weight)


def test_tokenizer_trained_on_corpus_prefers_its_words() -> None:
    corpus = ["habeas corpus petition"] * 50 + default_corpus(100)
    tok = build_tokenizer("gpt2", corpus)
    assert len(tok("habeas corpus petition", add_special_tokens=False)["input_ids"]) <= 3
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        build_tokenizer("sentencepiece-xyz")


def test_cli_writes_a_loadable_model(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(default_corpus(50)))
    out = tmp_path / "llama"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_trainer.tiny_models",
            "--arch",
            "llama",
            "--out",
            str(out),
            "--corpus",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 2
