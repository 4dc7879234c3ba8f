"""Checkpoint upload and model download through the trainer's storage layer vs plain boto3 defaults, on the
same files and the same local S3 server (part (b) of bench/storage_bench.py)."""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import boto3

from finetune_trainer.storage import Storage

BUCKET = "bench"


def make_files(root: Path, big_mb: int, small: int) -> int:
    """One big file (a checkpoint's weights) and ``small`` files of 1 KB .. 2 MB (configs, tokenizer, states).
    Returns the total bytes."""
    root.mkdir(parents=True, exist_ok=True)
    total = 0
    with (root / "model.safetensors").open("wb") as fh:
        for _ in range(big_mb):
            fh.write(os.urandom(1 << 20))
    total += big_mb << 20
    for i in range(small):
        size = 1024 * (1 + (i * 97) % 2048)
        (root / f"part-{i:03d}.json").write_bytes(os.urandom(size))
        total += size
    return total


@dataclass
class Timing:
    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def plain_client() -> object:
    return boto3.client("s3")  # boto3 defaults: endpoint and credentials from the environment


def plain_upload(client: object, root: Path, prefix: str) -> None:
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(root).as_posix()}")  # type: ignore[attr-defined]


def plain_download(client: object, prefix: str, dest: Path) -> None:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):  # type: ignore[attr-defined]
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    for key in keys:
        target = dest / key[len(prefix) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(target))  # type: ignore[attr-defined]


def _timed(fn: Callable[..., object], *args: object) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _round(storage: Storage, client: object, root: Path, work: Path, r: int, t: dict[str, Timing]) -> None:
    ours, plain = f"s3://{BUCKET}/ours/{r}", f"plain/{r}"
    order = ["ours", "plain"] if r % 2 == 0 else ["plain", "ours"]  # which goes first alternates
    for who in order:
        if who == "ours":
            t["up-ours"].seconds.append(_timed(storage.upload_dir, root, ours))
        else:
            t["up-plain"].seconds.append(_timed(plain_upload, client, root, plain))
    for who in order:
        dest = work / f"{who}-{r}"
        if who == "ours":
            t["down-ours"].seconds.append(_timed(storage.download_prefix, ours, dest))
            t["cached"].seconds.append(_timed(storage.cached_download, ours, work / f"cache-{r}"))
            shutil.rmtree(work / f"cache-{r}")
        else:
            t["down-plain"].seconds.append(_timed(plain_download, client, plain, dest))
        shutil.rmtree(dest)
    storage.delete_prefix(ours)
    storage.delete_prefix(f"s3://{BUCKET}/{plain}")


def run(root: Path, work: Path, repeat: int) -> dict[str, Timing]:
    """Each operation ``repeat`` times, ours and plain alternating which goes first."""
    storage, client = Storage(), plain_client()
    client.create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
    t: dict[str, Timing] = {k: Timing(k, []) for k in ("up-ours", "up-plain", "down-ours", "down-plain", "cached")}
    for r in range(repeat):
        _round(storage, client, root, work, r, t)
    return t
