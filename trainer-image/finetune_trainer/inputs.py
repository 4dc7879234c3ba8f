"""Local copies of a job's inputs; a storage problem becomes a user error that names the spec field.

The trainer fetches everything (:func:`fetch`); the preflight planner fetches a model's config.json and
tokenizer files only, never its weights (:func:`fetch_model_files`), plus the data. Imports nothing heavy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from finetune_trainer.config import UserError
from finetune_trainer.storage import Storage, StorageNotFound, StorageUserError, join_uri, parse_uri

HUB_PREFIX = "hf://"
# hf:// downloads: safetensors, config and tokenizer files; never code (trust_remote_code is always off).
HUB_ALL = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
HUB_NO_WEIGHTS = ["*.json", "*.model", "*.txt", "*.jinja", "tokenizer*"]
# What a model directory holds besides its weights: config.json, generation_config.json, tokenizer.json,
# tokenizer_config.json, special_tokens_map.json, vocab.json/.txt, merges.txt, sentencepiece *.model,
# chat_template.jinja. Weights (*.safetensors, *.bin, *.pt, *.gguf, ...) have none of these suffixes.
NON_WEIGHT_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


@contextmanager
def user_errors(what: str, uri: str, not_found_reason: str) -> Iterator[None]:
    """Storage problems while fetching ``uri`` (the spec's ``what``) as user errors (exit 2)."""
    try:
        yield
    except StorageUserError as exc:  # unreachable store, access denied, no such bucket: name the field
        raise UserError(exc.reason, f"{what}: {exc}") from None
    except StorageNotFound as exc:
        raise UserError(not_found_reason, f"{what} {uri} not found: {exc}") from None


def fetch(storage: Storage, uri: str, what: str, not_found_reason: str, cache: Path) -> Path:
    """A local copy of the file or directory at ``uri`` (cached across attempts on the same node)."""
    if uri.startswith(HUB_PREFIX):
        return hub_download(uri[len(HUB_PREFIX) :], cache, HUB_ALL)
    with user_errors(what, uri, not_found_reason):
        return storage.cached_download(uri, cache)


def is_model_file(rel: str) -> bool:
    """A top-level config or tokenizer file of a model directory (not weights, not a subdirectory)."""
    return "/" not in rel and rel.lower().endswith(NON_WEIGHT_SUFFIXES) and ".safetensors" not in rel.lower()


def fetch_model_files(storage: Storage, uri: str, what: str, cache: Path) -> tuple[Path, list[str]]:
    """A local directory with the config and tokenizer files of the model directory at ``uri``, and the names
    fetched. Local directories are used in place (nothing is copied)."""
    if uri.startswith(HUB_PREFIX):
        path = hub_download(uri[len(HUB_PREFIX) :], cache, HUB_NO_WEIGHTS)
        return path, sorted(p.name for p in path.iterdir())
    loc = parse_uri(uri)
    if loc.local is not None:
        if not loc.local.is_dir():
            raise UserError("ModelNotFound", f"{what} {uri} must be a directory holding a Hugging Face model")
        return loc.local, []
    dest = cache / "model-files" / hashlib.sha256(uri.encode()).hexdigest()[:24]
    with user_errors(what, uri, "ModelNotFound"):
        names = [rel for rel in storage.list_prefix(uri) if is_model_file(rel)]
        if not names:
            raise StorageNotFound(
                f"no config or tokenizer files under {uri}; it must be a Hugging Face model directory"
            )
        for name in names:
            storage.download_file(join_uri(uri, name), dest / name)
    return dest, names


def hub_download(repo: str, cache: Path, patterns: Sequence[str]) -> Path:
    """hf://org/name, for clusters that can reach a hub: only the files matching ``patterns``, no code."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo, cache_dir=str(cache / "hub"), allow_patterns=list(patterns))
    except Exception as exc:  # offline, unknown repo, gated: the user must fix the URI or the cluster
        raise UserError("ModelNotFound", f"cannot fetch hf://{repo}: {type(exc).__name__}: {exc}") from None
    return Path(path)
