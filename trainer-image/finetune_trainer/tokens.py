"""The fast path of data preparation: batched calls into the Rust tokenizer on every core, token streams and
equal-length blocks in numpy, and blocks straight into Arrow (no per-token Python, no Python lists of tokens).

Each function gives exactly what the plain path gives (``tokenizer(texts, add_special_tokens=False)``, list
concatenation and slicing, ``datasets.Dataset.from_dict``); tests/unit/test_fast_data.py compares them.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
from datasets.fingerprint import generate_random_fingerprint

CHUNK = 4096  # texts per call into the tokenizer: large enough to keep every core busy, small enough for memory
_ARROW_ROWS = 1 << 16  # rows per Arrow chunk of a blocks column (its int32 offsets never overflow)
_PARALLELISM = "TOKENIZERS_PARALLELISM"


@contextmanager
def tokenizer_threads() -> Iterator[None]:
    """Let the Rust tokenizer use its thread pool (one thread per available core, cgroup quotas respected)
    for the batches inside. The trainer turns it off process-wide (TOKENIZERS_PARALLELISM=false) so that a
    forked process never inherits a busy pool; the previous setting is back afterwards, for later forks."""
    previous = os.environ.get(_PARALLELISM)
    os.environ[_PARALLELISM] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_PARALLELISM, None)
        else:
            os.environ[_PARALLELISM] = previous


def _backend(tokenizer: Any) -> Any | None:
    """The Rust tokenizer, when calling it directly gives what ``tokenizer(texts, add_special_tokens=False)``
    gives: a plain transformers fast tokenizer (no subclass that overrides the call), with no truncation or
    padding configured on the backend (the call would switch those off) and its ``split_special_tokens``."""
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tokenizer, "backend_tokenizer", None)
    kind = type(tokenizer)
    plain = all(
        getattr(kind, name, None) is getattr(PreTrainedTokenizerFast, name) for name in ("__call__", "_encode_plus")
    )
    if backend is None or not plain or not hasattr(backend, "encode_batch_fast"):
        return None
    if backend.truncation is not None or backend.padding is not None:
        return None
    if bool(backend.encode_special_tokens) != bool(getattr(tokenizer, "split_special_tokens", False)):
        return None
    return backend


def encode_plain(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """The token ids of each text without special tokens: ``tokenizer(texts, add_special_tokens=False)``, in
    batches of CHUNK on every core (straight into the Rust tokenizer where that gives the same ids)."""
    backend = _backend(tokenizer)
    out: list[list[int]] = []
    with tokenizer_threads():
        for start in range(0, len(texts), CHUNK):
            chunk = list(texts[start : start + CHUNK])
            if backend is not None:
                out.extend(enc.ids for enc in backend.encode_batch_fast(chunk, add_special_tokens=False))
            else:
                out.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return out


@dataclass
class TokenStream:
    """Every sample's tokens one after the other (``lead + ids + eos`` each), and each sample's length."""

    tokens: np.ndarray
    lengths: np.ndarray

    def blocks(self, block: int) -> tuple[np.ndarray, int]:
        """Blocks of exactly ``block`` tokens, the remainder dropped (returned as a count); a stream shorter than
        one block is kept whole as one shorter block."""
        total = len(self.tokens)
        usable = total - total % block
        if usable == 0:
            return self.tokens.reshape(1 if total else 0, total), 0
        return self.tokens[:usable].reshape(-1, block), total - usable


def token_stream(ids: Sequence[Sequence[int]], lead: Sequence[int], eos: Sequence[int]) -> TokenStream:
    """``[t for x in ids for t in [*lead, *x, *eos]]`` as int64 numpy, with each sample's length."""
    extra = len(lead) + len(eos)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + extra
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    tokens = np.empty(total, dtype=np.int64)
    body = np.ones(total, dtype=bool)
    starts = ends - lengths
    marks = [(starts + j, t) for j, t in enumerate(lead)] + [(ends - len(eos) + j, t) for j, t in enumerate(eos)]
    for where, token in marks:
        tokens[where] = token
        body[where] = False
    tokens[body] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total - extra * len(ids))
    return TokenStream(tokens, lengths)


def _list_column(rows: np.ndarray, dtype: type[np.integer[Any]]) -> pa.ChunkedArray:
    width = rows.shape[1]
    chunks = []
    for start in range(0, len(rows), _ARROW_ROWS):
        part = rows[start : start + _ARROW_ROWS]
        offsets = pa.array(np.arange(0, (len(part) + 1) * width, width, dtype=np.int32))
        chunks.append(pa.ListArray.from_arrays(offsets, pa.array(part.reshape(-1).astype(dtype, copy=False))))
    return pa.chunked_array(chunks, type=pa.list_(pa.from_numpy_dtype(dtype)))


def blocks_dataset(blocks: np.ndarray) -> datasets.Dataset:
    """``Dataset.from_dict({"input_ids": rows, "labels": rows, "attention_mask": ones})`` for equal-length rows,
    built from the numpy buffers, with the column types from_dict picks: int32 input ids (int64 if one does not
    fit), int64 labels, int8 attention mask."""
    fits = not blocks.size or (blocks.min() >= np.iinfo(np.int32).min and blocks.max() <= np.iinfo(np.int32).max)
    table = pa.table(
        {
            "input_ids": _list_column(blocks, np.int32 if fits else np.int64),
            "labels": _list_column(blocks, np.int64),
            "attention_mask": _list_column(np.ones(blocks.shape, dtype=np.int8), np.int8),
        }
    )
    # A random fingerprint, as from_dict's in-memory datasets have (hashing would serialise every token).
    return datasets.Dataset(table, fingerprint=generate_random_fingerprint())
