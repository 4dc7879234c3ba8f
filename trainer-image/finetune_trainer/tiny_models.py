"""Tiny random-weight models of real architectures, with tokenizers trained locally.

Tests and the demo need models that go through exactly the code paths a real checkpoint does
(``from_pretrained`` on a directory with config.json + safetensors + tokenizer files, peft target modules,
generation, sequence-classification heads) without downloading anything. The weights are random, the
architectures are real (GPT-2, BLOOM, GPT-NeoX, Llama, T5, BERT), and the tokenizers are trained here on a
small corpus with the same tokenizer *family* the real checkpoint uses.

CLI::

    python -m finetune_trainer.tiny_models --arch gpt2 --out DIR [--corpus FILE] [--num-labels N]
"""

from __future__ import annotations

import argparse
import random
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForPreTraining,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

ARCHITECTURES = ("gpt2", "bloom", "gpt-neox", "llama", "t5", "bert")
DECODER_ARCHS = frozenset({"gpt2", "bloom", "gpt-neox", "llama"})

# The tokenizer family each real checkpoint uses: byte-level BPE for the decoder LMs, WordPiece for BERT,
# SentencePiece-style pieces for T5.
TOKENIZER_KIND = {
    "gpt2": "byte-bpe",
    "bloom": "byte-bpe",
    "gpt-neox": "byte-bpe",
    "llama": "byte-bpe",
    "bert": "wordpiece",
    "t5": "sentencepiece-bpe",
}

EOS = "<|endoftext|>"
PAD = "<pad>"

# A simple role-tagged chat template. The {% generation %} markers let `apply_chat_template(...,
# return_assistant_tokens_mask=True)` find the assistant tokens, so chat data can train on replies only.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>\n{% generation %}{{ message['content'] }}" + EOS + "{% endgeneration %}\n"
    "{% else %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}" + EOS + "\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_VOCABULARY = (
    "the a an model data train test loss step epoch token text question answer legal advice contract "
    "court tenant landlord lease rent notice judge law file claim doctor patient pain fever rest "
    "water sleep drug dose cat dog sat ran mat red blue green big small one two three four five yes "
    "no positive negative good bad great poor movie film book story sport game team win lose market "
    "stock price rise fall what why how when where who is are was were do does can should will of to "
    "in on for with and or but"
)


def default_corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """A deterministic English-like corpus, enough for the tokenizer trainers to fill a ~500 vocabulary."""
    rng = random.Random(seed)
    words = _VOCABULARY.split()
    lines = []
    for _ in range(n_lines):
        n = rng.randint(4, 14)
        lines.append(" ".join(rng.choice(words) for _ in range(n)).capitalize() + rng.choice(".?!"))
    return lines


def _kind(kind_or_arch: str) -> str:
    kind = TOKENIZER_KIND.get(kind_or_arch, kind_or_arch)
    if kind not in {"byte-bpe", "wordpiece", "sentencepiece-bpe"}:
        raise ValueError(f"unknown tokenizer kind or architecture {kind_or_arch!r}")
    return kind


def build_tokenizer(
    kind: str, corpus: Iterable[str] | None = None, vocab_size: int = 512, max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a tokenizer of the given family (or architecture name) on ``corpus`` and wrap it for transformers."""
    kind = _kind(kind)
    texts = list(corpus) if corpus is not None else default_corpus()
    if kind == "byte-bpe":
        return _byte_bpe(texts, vocab_size, max_length)
    if kind == "wordpiece":
        return _wordpiece(texts, vocab_size, max_length)
    return _sentencepiece_bpe(texts, vocab_size, max_length)


def _byte_bpe(texts: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [EOS, PAD, "<|user|>", "<|assistant|>", "<|system|>"]
    # The full byte alphabet keeps every input encodable (no unknown tokens), like the real GPT-2 tokenizer.
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, 256 + len(specials) + 1),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=PAD, model_max_length=max_length
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _wordpiece(texts: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


def _sentencepiece_bpe(texts: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE (``▁`` marks word starts). BPE rather than Unigram: on a corpus of a few
    hundred lines the Unigram trainer keeps mostly single characters, BPE learns whole words."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    # Same special-token ids as the real T5 vocabulary: pad=0 (also the decoder start), eos=1, unk=2.
    specials = ["<pad>", "</s>", "<unk>"]
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            # Every printable ASCII character stays encodable even when the corpus lacks it.
            initial_alphabet=list(string.printable.strip()),
            show_progress=False,
        ),
    )
    eos_id = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", model_max_length=max_length
    )


def model_config(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    max_positions: int = 512,
    num_labels: int | None = None,
) -> PretrainedConfig:
    """The config of a small model of ``arch`` whose vocabulary and special ids match ``tokenizer``."""
    ids: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    inter = hidden_size * 4
    per_arch: dict[str, dict[str, Any]] = {
        "gpt2": {"n_embd": hidden_size, "n_layer": num_layers, "n_head": num_heads, "n_positions": max_positions},
        "bloom": {"hidden_size": hidden_size, "n_layer": num_layers, "n_head": num_heads},
        "gpt-neox": {
            "hidden_size": hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "intermediate_size": inter,
            "max_position_embeddings": max_positions,
        },
        "llama": {
            "hidden_size": hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_heads,
            "intermediate_size": inter,
            "max_position_embeddings": max_positions,
        },
        "t5": {
            "d_model": hidden_size,
            "d_ff": inter,
            "d_kv": hidden_size // num_heads,
            "num_layers": num_layers,
            "num_decoder_layers": num_layers,
            "num_heads": num_heads,
            "decoder_start_token_id": tokenizer.pad_token_id,
            "relative_attention_num_buckets": 8,
        },
        "bert": {
            "hidden_size": hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "intermediate_size": inter,
            "max_position_embeddings": max_positions,
        },
    }
    if arch not in per_arch:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    kwargs = {**ids, **per_arch[arch]}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    return AutoConfig.for_model(arch.replace("-", "_"), **kwargs)


def build_model(
    arch: str,
    out_dir: str | Path,
    corpus: Sequence[str] | None = None,
    *,
    num_labels: int | None = None,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    vocab_size: int = 512,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Save a random-weight ``arch`` model plus a tokenizer trained on ``corpus`` as a Hugging Face model dir.

    ``num_labels`` saves a sequence-classification model (head included) instead of the LM.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(arch, corpus, vocab_size=vocab_size, max_length=max_positions)
    config = model_config(
        arch,
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        max_positions=max_positions,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    model: PreTrainedModel
    if num_labels is not None:
        model = AutoModelForSequenceClassification.from_config(config)
    elif arch == "t5":
        model = AutoModelForSeq2SeqLM.from_config(config)
    elif arch == "bert":
        # Like the released BERT checkpoints: MLM + NSP heads AND the pooler that classifiers build on.
        model = AutoModelForPreTraining.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        # Generation stops at (and pads with) this tokenizer's ids, not the library defaults (e.g. GPT-2's 50256).
        generation_config.pad_token_id = tokenizer.pad_token_id
        generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, choices=ARCHITECTURES)
    parser.add_argument("--out", required=True, help="Directory to write the model to.")
    parser.add_argument("--corpus", help="Text file (one sample per line) to train the tokenizer on.")
    parser.add_argument("--num-labels", type=int, help="Save a sequence-classification model with N labels.")
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args(argv)
    corpus = None
    if args.corpus:
        corpus = [line for line in Path(args.corpus).read_text(encoding="utf-8").splitlines() if line.strip()]
    out = build_model(
        args.arch,
        args.out,
        corpus,
        num_labels=args.num_labels,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        vocab_size=args.vocab_size,
    )
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
