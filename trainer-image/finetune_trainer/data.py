"""Dataset preparation: files -> cleaned rows -> task samples -> tokenized ``datasets.Dataset``s.

Order of operations (each documented in the spec): read the file, ``dataset.rename``, ``dataset.dropColumns``,
whitespace cleanup (``cleanWhitespace``), drop rows whose task fields are empty (counted in the stats),
``maxSamples`` (first N training rows), then the validation split when there is no validation file, then
tokenization for the task. Bad data raises :class:`DataError` naming the file, line/row and field.

Token layout per task (labels are -100 where no loss is taken):

* causal-lm: ``[bos] text eos`` per sample. Packing (default) concatenates all samples and cuts blocks of
  exactly ``blockSize`` tokens, dropping the remainder (if the whole split is shorter than one block, that
  one shorter block is kept). Without packing each sample is truncated to ``maxSeqLength``.
* instruction: ``[bos] prompt response eos``; the prompt is never truncated and the response is, but a row
  whose prompt alone fills ``maxSeqLength`` is an error (nothing would be learnt from it).
* chat: the tokenizer's chat template (or ``FALLBACK_CHAT_TEMPLATE``); loss on assistant turns only.
* instruction and chat with ``packing: true``: the samples above, whole and in order, are packed into rows of
  at most ``blockSize`` tokens with ``position_ids`` restarting at 0 for each sample and no attention mask;
  the collator flattens a batch into one row. Attention then keeps samples apart (transformers derives a
  block-diagonal causal mask from the restarting positions; flash attention uses them as sequence bounds),
  and the first label of each sample is -100, so every sample's loss is exactly its unpacked loss. Only
  architectures in ``config.PACKING_MODEL_TYPES`` support this; the trainer refuses packing for others.
* seq2seq: source -> ``input_ids``, target -> ``labels`` (``text_target``), each truncated to ``maxSeqLength``.
* classification: text -> ``input_ids``, label id -> ``labels``.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from finetune_api.spec import FineTuneJobSpec, Task
from finetune_trainer.formats import (
    DataError,
    Table,
    check_task_columns,
    load_rows,
    read_table,
    rename_and_drop,
    task_sample,
)
from finetune_trainer.splits import split_rows
from finetune_trainer.tokens import blocks_dataset, encode_plain, token_stream

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "DataError",
    "PackedCollator",
    "PreparedData",
    "load_rows",
    "make_collator",
    "prepare_data",
]

IGNORE = -100
_LENGTHS = "_lengths"  # the current split's sample lengths, while encoding (never left in the stats)

# Used (and stored on the tokenizer, so the saved model and generation use the same format) when a tokenizer
# has no chat template: "<|role|>\ncontent\n" per message, with the end-of-sequence token closing each assistant
# turn so that the model learns where a reply ends.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass
class PreparedData:
    train: datasets.Dataset  # input_ids, attention_mask, labels
    eval: datasets.Dataset | None  # same, or None when there is no validation data
    eval_examples: list[dict[str, Any]]  # raw validation examples for generation/classification metrics
    label_names: list[str] | None  # classification only, in id order
    stats: dict[str, Any]
    # Token length of each training sample before truncation (and packing), in order; seq2seq: the longer of
    # source and target. The preflight planner's length distribution.
    train_lengths: list[int] = field(default_factory=list)


def _packing(spec: FineTuneJobSpec) -> bool:
    """The resolved hyperparameters.packing (finetune_api.resolve fills it; the trainer never guesses)."""
    packing = spec.hyperparameters.packing
    if packing is None:
        raise ValueError("the spec is not resolved: hyperparameters.packing is unset (use finetune_api.resolve)")
    return packing


def _block_size(spec: FineTuneJobSpec) -> int:
    block = spec.hyperparameters.block_size
    if block is None:
        raise ValueError("the spec is not resolved: hyperparameters.blockSize is unset with packing on")
    return block


def _sample_packing(spec: FineTuneJobSpec) -> bool:
    """Whole samples packed per row, kept apart by position ids (instruction and chat)."""
    return _packing(spec) and spec.task in (Task.INSTRUCTION, Task.CHAT)


class PackedCollator:
    """Flattens a batch of packed rows into one row: input_ids, labels and position_ids, no attention mask
    (the restarting position ids are what keeps the samples apart) and no padding at all."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {
            key: torch.tensor([[t for f in features for t in f[key]]], dtype=torch.long)
            for key in ("input_ids", "labels", "position_ids")
        }
        out["use_cache"] = False  # a cache disables transformers' packed-sequence masking
        return out


def ensure_pad_token(tokenizer: Any) -> None:
    """Decoder tokenizers often have no pad token; padding with EOS is safe because labels there are -100."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token


def make_collator(spec: FineTuneJobSpec, tokenizer: Any, model: Any = None) -> Callable[[list[dict[str, Any]]], Any]:
    """The batch collator for the task: equal-length blocks stack as they are, everything else is padded per
    batch (labels with -100, so padding never counts in the loss)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, default_data_collator

    ensure_pad_token(tokenizer)
    if spec.task == Task.CLASSIFICATION:
        return DataCollatorWithPadding(tokenizer)  # type: ignore[no-any-return]
    if _sample_packing(spec):
        return PackedCollator()
    if _packing(spec):
        return default_data_collator
    return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=IGNORE, padding=True)  # type: ignore[no-any-return]


@dataclass
class _Part:
    """One split: the rows it came from (for error messages) and their samples."""

    table: Table
    samples: list[dict[str, Any]]

    def take(self, indices: Sequence[int]) -> _Part:
        return _Part(self.table.select(indices), [self.samples[i] for i in indices])


def _read(path: Path, name: str, spec: FineTuneJobSpec, stats: dict[str, Any], role: str) -> _Part:
    ds = spec.dataset
    table = rename_and_drop(
        read_table(path, str(ds.file_format), name), ds.rename, ds.drop_columns, ds.clean_whitespace
    )
    check_task_columns(table, ds, Task(spec.task))
    kept, samples = [], []
    for i in range(len(table.rows)):
        sample = task_sample(table, i, ds, Task(spec.task))
        if sample is not None:
            kept.append(i)
            samples.append(sample)
    stats[f"{role}_rows_read"] = len(table.rows)
    stats[f"{role}_rows_dropped_empty"] = len(table.rows) - len(kept)
    stats[f"{role}_sha256"] = table.sha256
    return _Part(table.select(kept), samples)


# ---- labels ----------------------------------------------------------------------------------------------


def _natural(label: str) -> tuple[int, int, str]:
    return (0, int(label), "") if re.fullmatch(r"-?\d+", label) else (1, 0, label)


def _label_ids(train: _Part, val: _Part | None, declared: list[str] | None) -> list[str]:
    """Map raw labels to ids in place; returns the label names in id order."""
    raw = [s["label"] for s in train.samples]
    ints = [isinstance(v, int) and not isinstance(v, bool) for v in raw]
    if declared:
        names = list(declared)
    elif all(ints):
        names = [str(i) for i in range(max(raw) + 1)]
    elif not any(ints) and all(isinstance(v, str) for v in raw):
        names = sorted(set(raw), key=_natural)
    else:
        i = next(j for j, v in enumerate(raw) if isinstance(v, str) != isinstance(raw[0], str) or isinstance(v, bool))
        raise DataError(
            f"{train.table.where(i, 'label')}: label {raw[i]!r} mixes types with {raw[0]!r}; use all strings or all "
            "integer ids"
        )
    index = {n: k for k, n in enumerate(names)}
    for part, seen in ((train, None), (val, set(raw))):
        for i, s in enumerate(part.samples if part else []):
            value = s["label"]
            lid = value if isinstance(value, int) and not isinstance(value, bool) else index.get(str(value))
            unseen = seen is not None and not declared and value not in seen
            if lid is None or not 0 <= lid < len(names) or unseen:
                assert part is not None
                what = "not among dataset.labels" if declared else "not seen in the training data"
                raise DataError(
                    f"{part.table.where(i, 'label')}: label {value!r} is {what}; known labels: {', '.join(names[:50])}"
                )
            s["label"] = lid
    return names


# ---- tokenization ----------------------------------------------------------------------------------------


def _encode(tokenizer: Any, texts: Sequence[str], target: bool = False, **kwargs: Any) -> list[list[int]]:
    """Batched tokenization (the fast tokenizers work on a whole batch in Rust)."""
    if not target and kwargs == {"add_special_tokens": False}:
        return encode_plain(tokenizer, texts)  # the same ids, on every core
    out: list[list[int]] = []
    for start in range(0, len(texts), 1000):
        chunk = list(texts[start : start + 1000])
        enc = tokenizer(text_target=chunk, **kwargs) if target else tokenizer(chunk, **kwargs)
        out.extend(enc["input_ids"])
    return out


def _leading_specials(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts before any text (e.g. Llama's BOS); GPT-2 style tokenizers have none."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    stop = {tokenizer.eos_token_id, tokenizer.sep_token_id}
    lead = []
    for t in ids:
        if t in stop:
            break
        lead.append(t)
    return lead


def _record_lengths(stats: dict[str, Any], lengths: Sequence[int]) -> None:
    """Each sample's length before truncation, for ``PreparedData.train_lengths`` (taken out of the stats)."""
    stats.setdefault(_LENGTHS, []).extend(lengths)


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _causal(part: _Part, tok: Any, spec: FineTuneJobSpec, stats: dict[str, Any]) -> dict[str, Any]:
    lead, eos = _leading_specials(tok), _eos(tok)
    ids = _encode(tok, [s["text"] for s in part.samples], add_special_tokens=False)
    hp = spec.hyperparameters
    if _packing(spec):  # one stream, cut into equal blocks in numpy (tokens.py); rows of a 2-d array
        stream = token_stream(ids, lead, eos)
        _record_lengths(stats, stream.lengths.tolist())
        blocks, dropped = stream.blocks(_block_size(spec))
        stats["tokens_dropped_by_packing"] = stats.get("tokens_dropped_by_packing", 0) + dropped
        if blocks.shape[1] < _block_size(spec) and blocks.size:  # the whole split is shorter than one block
            stats["short_block"] = True
        return {"input_ids": blocks, "labels": blocks}
    seqs = [lead + x + eos for x in ids]
    _record_lengths(stats, [len(x) for x in seqs])
    stats["truncated"] += sum(len(x) > hp.max_seq_length for x in seqs)
    seqs = [x[: hp.max_seq_length] for x in seqs]
    return {"input_ids": seqs, "labels": [list(x) for x in seqs]}


def _instruction(part: _Part, tok: Any, spec: FineTuneJobSpec, stats: dict[str, Any]) -> dict[str, list[Any]]:
    lead, eos, limit = _leading_specials(tok), _eos(tok), spec.hyperparameters.max_seq_length
    assert spec.dataset.template is not None
    mask_prompt = spec.dataset.template.loss_on_response_only
    prompts = _encode(tok, [s["prompt"] for s in part.samples], add_special_tokens=False)
    responses = _encode(tok, [s["response"] for s in part.samples], add_special_tokens=False)
    out: dict[str, list[Any]] = {"input_ids": [], "labels": []}
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        p, r = lead + p, r + eos
        _record_lengths(stats, [len(p) + len(r)])
        if len(p) >= limit:
            raise DataError(
                f"{part.table.where(i)}: the prompt alone is {len(p)} tokens and maxSeqLength is {limit}, so no "
                "response token would be trained on; shorten the prompt or raise hyperparameters.maxSeqLength"
            )
        if len(p) + len(r) > limit:
            stats["truncated"] += 1
            r = r[: limit - len(p)]  # keep the whole prompt; the response loses its tail
        out["input_ids"].append(p + r)
        out["labels"].append(([IGNORE] * len(p) if mask_prompt else list(p)) + r)
    return out


def _chat_segments(tok: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant) pieces. The prefix rendered with a generation prompt
    ends where a reply starts; the prefix including the reply ends where it ends (its end-of-turn tokens
    included, which the model must learn to emit)."""

    def render_(msgs: list[dict[str, str]], gen: bool) -> str:
        return str(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen))

    full = render_(messages, False)
    pieces, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix, upto = render_(messages[:i], True) if i else "", render_(messages[: i + 1], False)
        if full.startswith(prefix) and full.startswith(upto) and pos <= len(prefix) < len(upto):
            start, end = len(prefix), len(upto)
        else:  # a template that renders earlier turns differently: locate the reply's text instead
            start = full.find(m["content"], pos)
            end = start + len(m["content"])
        if start >= pos:
            pieces += [(full[pos:start], False), (full[start:end], True)]
            pos = end
    return [*pieces, (full[pos:], False)]


def _chat(part: _Part, tok: Any, spec: FineTuneJobSpec, stats: dict[str, Any]) -> dict[str, list[Any]]:
    if not getattr(tok, "chat_template", None):
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    limit = spec.hyperparameters.max_seq_length
    out: dict[str, list[Any]] = {"input_ids": [], "labels": []}
    for i, s in enumerate(part.samples):
        segments = _chat_segments(tok, s["messages"])
        encoded = _encode(tok, [text for text, _ in segments], add_special_tokens=False)
        ids = [t for seg in encoded for t in seg]
        labels = [t if learn else IGNORE for (_, learn), seg in zip(segments, encoded, strict=True) for t in seg]
        _record_lengths(stats, [len(ids)])
        if len(ids) > limit:
            stats["truncated"] += 1
            ids, labels = ids[:limit], labels[:limit]
        if all(t == IGNORE for t in labels):
            raise DataError(
                f"{part.table.where(i, spec.dataset.fields.messages)}: no assistant token fits in maxSeqLength "
                f"{limit}; shorten the conversation or raise hyperparameters.maxSeqLength"
            )
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out


def _truncated(
    tok: Any, texts: list[str], limit: int, stats: dict[str, Any], target: bool = False
) -> tuple[list[list[int]], list[int]]:
    """The texts tokenized and truncated to ``limit``, and their lengths before truncation."""
    full = _encode(tok, texts, target)
    lengths = [len(ids) for ids in full]
    long = [i for i, ids in enumerate(full) if len(ids) > limit]
    stats["truncated"] += len(long)
    # Re-encode the long ones with the tokenizer's own truncation, which keeps closing special tokens (T5's </s>).
    for i, ids in zip(
        long, _encode(tok, [texts[i] for i in long], target, truncation=True, max_length=limit), strict=True
    ):
        full[i] = ids
    return full, lengths


def _seq2seq(part: _Part, tok: Any, spec: FineTuneJobSpec, stats: dict[str, Any]) -> dict[str, list[Any]]:
    limit = spec.hyperparameters.max_seq_length
    sources, source_lengths = _truncated(tok, [s["prompt"] for s in part.samples], limit, stats)
    targets, target_lengths = _truncated(tok, [s["response"] for s in part.samples], limit, stats, True)
    _record_lengths(stats, [max(s, t) for s, t in zip(source_lengths, target_lengths, strict=True)])
    return {"input_ids": sources, "labels": targets}


def _classification(part: _Part, tok: Any, spec: FineTuneJobSpec, stats: dict[str, Any]) -> dict[str, list[Any]]:
    ids, lengths = _truncated(tok, [s["text"] for s in part.samples], spec.hyperparameters.max_seq_length, stats)
    _record_lengths(stats, lengths)
    return {"input_ids": ids, "labels": [s["label"] for s in part.samples]}


def _pack_samples(cols: dict[str, list[Any]], block: int, stats: dict[str, Any]) -> dict[str, list[Any]]:
    """Whole samples, in order, into rows of at most ``block`` tokens (first fit on the current row), with
    position ids restarting per sample and each sample's first label -100 (in a packed row that position would
    be predicted from the previous sample's last token)."""
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "position_ids": []}
    row: dict[str, list[int]] = {k: [] for k in out}
    for ids, labels in zip(cols["input_ids"], cols["labels"], strict=True):
        if row["input_ids"] and len(row["input_ids"]) + len(ids) > block:
            for k in out:
                out[k].append(row[k])
            row = {k: [] for k in out}
        row["input_ids"] += ids
        row["labels"] += [IGNORE, *labels[1:]]
        row["position_ids"] += list(range(len(ids)))
    if row["input_ids"]:
        for k in out:
            out[k].append(row[k])
    stats["packed_rows"] = stats.get("packed_rows", 0) + len(out["input_ids"])
    return out


ENCODERS = {
    Task.CAUSAL_LM: _causal,
    Task.INSTRUCTION: _instruction,
    Task.CHAT: _chat,
    Task.SEQ2SEQ: _seq2seq,
    Task.CLASSIFICATION: _classification,
}


def _eval_example(sample: dict[str, Any], task: Task) -> dict[str, Any] | None:
    if task == Task.CLASSIFICATION:
        return {"text": sample["text"], "label": sample["label"]}
    if task == Task.CHAT:
        msgs = sample["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return {"prompt_messages": msgs[:last], "reference": msgs[last]["content"]}
    if "prompt" in sample:
        return {"prompt": sample["prompt"], "reference": sample["response"]}
    words = sample["text"].split(" ")  # causal-lm without template: continue the first half of the text
    if len(words) < 2:
        return None
    half = len(words) // 2
    return {"prompt": " ".join(words[:half]), "reference": " ".join(words[half:])}


def _split_texts(part: _Part, task: Task) -> list[str]:
    if task == Task.CHAT:
        return [" ".join(m["content"] for m in s["messages"] if m["role"] != "assistant") for s in part.samples]
    return [s.get("prompt") or s["text"] for s in part.samples]


def prepare_data(
    spec: FineTuneJobSpec, tokenizer: Any, train_path: Path, validation_path: Path | None = None
) -> PreparedData:
    """Read, clean, split and tokenize the job's data. ``train_path``/``validation_path`` are local copies of
    ``spec.dataset.train``/``validation``; messages name the URIs from the spec."""
    task, ds = Task(spec.task), spec.dataset
    stats: dict[str, Any] = {"task": str(task), "truncated": 0, "packing": _packing(spec)}
    ensure_pad_token(tokenizer)
    train = _read(Path(train_path), ds.train, spec, stats, "train")
    if ds.max_samples is not None:
        train = train.take(range(min(ds.max_samples, len(train.samples))))
    stats["train_rows_used"] = len(train.samples)
    if not train.samples:
        raise DataError(f"{ds.train}: no usable rows after cleanup ({stats['train_rows_read']} rows read, all empty)")
    val = None
    if validation_path is not None:
        val = _read(Path(validation_path), ds.validation or str(validation_path), spec, stats, "validation")
        if not val.samples:
            raise DataError(f"{ds.validation or validation_path}: no usable rows after cleanup")
    label_names = _label_ids(train, val, ds.labels) if task == Task.CLASSIFICATION else None
    if val is None and ds.split.validation_ratio > 0:
        train_idx, val_idx = split_rows(
            str(ds.split.strategy),
            ds.split.validation_ratio,
            ds.split.seed,
            labels=[s["label"] for s in train.samples] if task == Task.CLASSIFICATION else None,
            texts=_split_texts(train, task),
            clusters=ds.split.clusters,
        )
        train, val = train.take(train_idx), (train.take(val_idx) if val_idx else None)
        stats["split"] = {"strategy": str(ds.split.strategy), "ratio": ds.split.validation_ratio, "seed": ds.split.seed}
    hashes = [stats["train_sha256"], stats.get("validation_sha256", "")]
    stats["dataset_sha256"] = hashlib.sha256("\n".join(hashes).encode()).hexdigest()
    encode = ENCODERS[task]
    out, lengths = {}, {}
    for role, part in (("train", train), ("eval", val)):
        if part is None:
            continue
        cols = encode(part, tokenizer, spec, stats)
        lengths[role] = stats.pop(_LENGTHS, [])
        blocks = cols["input_ids"] if isinstance(cols["input_ids"], np.ndarray) else None  # causal-lm packing
        if _sample_packing(spec):
            stats[f"{role}_samples_packed"] = len(cols["input_ids"])
            cols = _pack_samples(cols, _block_size(spec), stats)
        elif blocks is None:
            cols["attention_mask"] = [[1] * len(ids) for ids in cols["input_ids"]]
        if not len(cols["input_ids"]):
            raise DataError(f"{part.table.name}: no {role} samples left after tokenization")
        stats[f"{role}_rows"] = len(part.samples)
        stats[f"{role}_samples"] = len(cols["input_ids"])
        stats[f"{role}_tokens"] = blocks.size if blocks is not None else sum(len(ids) for ids in cols["input_ids"])
        out[role] = blocks_dataset(blocks) if blocks is not None else datasets.Dataset.from_dict(cols)
    if label_names is not None:
        stats["num_labels"] = len(label_names)
        counts = Counter(s["label"] for s in train.samples)
        stats["train_label_counts"] = {label_names[k]: v for k, v in sorted(counts.items())}
    examples = [e for s in (val.samples if val else []) if (e := _eval_example(s, task)) is not None]
    return PreparedData(out["train"], out.get("eval"), examples, label_names, stats, lengths["train"])
