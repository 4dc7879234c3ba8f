"""Checkpoints and storage (a benchmark: it records, never asserts).

(a) How long a checkpoint blocks training beyond copying weights to host memory: a real transformers Trainer on
    a tiny Llama (CPU) with the trainer's CheckpointUploader (background upload to S3, `_COMPLETE` marker last),
    against the same run with the upload done synchronously in on_save (bench/checkpoint_block.py).
(b) Checkpoint upload and model download through the trainer's storage layer (Storage.upload_dir,
    download_prefix, cached_download) against plain boto3 defaults (a client.upload_file / download_file loop),
    on the same files: one large file and many small ones (bench/storage_transfer.py).

Both use a local S3 server: moto in server mode on loopback, in its own process (bench/s3kit.py).

    .venv/bin/python bench/storage_bench.py            # 200 MB + 50 files, 3 rounds; about 4 minutes
    .venv/bin/python bench/storage_bench.py --quick    # 40 MB + 20 files, 1 round; does not write the docs
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO / "trainer-image"), str(REPO / "api")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchkit import Row, machine, markdown_table, text_table, write_section  # noqa: E402
from s3kit import MotoServer  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def checkpoint_rows(args: argparse.Namespace, work: Path) -> list[Row]:
    import boto3
    import checkpoint_block as cb

    boto3.client("s3").create_bucket(Bucket="ckpt")
    results = {}
    for mode in ("async", "sync"):
        log(f"checkpoint blocking: {mode} upload, {args.steps} steps, a checkpoint every {args.every}")
        results[mode] = cb.run(mode, work, "ckpt", args.steps, args.every, args.hidden, args.layers)
    ours, sync = results["async"], results["sync"]
    scenario = f"checkpoint of {ours.checkpoint_mb:.0f} MB (tiny Llama, weights + AdamW state), CPU"
    return [
        Row(
            scenario,
            "checkpoint blocks training beyond the host copy (ours: background upload)",
            "< 1 s",
            f"{max(ours.beyond_host_copy, 0):.2f} s (gap after a checkpoint step {ours.checkpoint_gap:.2f} s - after "
            f"another step {ours.normal_gap:.3f} s - host copy {ours.host_copy:.2f} s)",
            ours.beyond_host_copy < 1,
        ),
        Row(
            scenario,
            "split: Trainer save to disk / upload waiting (snapshot + queue)",
            "",
            f"{ours.save_to_disk:.2f} s / {ours.uploader_hook:.3f} s",
            None,
        ),
        Row(
            scenario,
            "baseline: the same upload inside on_save (synchronous), beyond the host copy",
            "",
            f"{max(sync.beyond_host_copy, 0):.2f} s (save to disk {sync.save_to_disk:.2f} s, upload waiting "
            f"{sync.uploader_hook:.2f} s); ours blocks {sync.blocking / max(ours.blocking, 1e-3):.1f}x less",
            None,
        ),
        Row(
            scenario,
            "background upload: save -> marker written; wait at the end of training; steps during uploads",
            "",
            f"{ours.upload_wall:.2f} s; {ours.final_wait:.2f} s; {ours.overlapped_step:.3f} s vs "
            f"{ours.normal_step:.3f} s per step",
            None,
        ),
    ]


def transfer_rows(args: argparse.Namespace, work: Path) -> list[Row]:
    import storage_transfer as st

    root = work / "files"
    total = st.make_files(root, args.big_mb, args.small)
    log(f"transfers: {total / 1e6:.0f} MB in {args.small + 1} files, {args.rounds} rounds")
    t = st.run(root, work, args.rounds)
    mb = total / 1e6
    scenario = f"1 file of {args.big_mb} MB + {args.small} files of 1 KB-2 MB, median of {args.rounds}"

    def runs(key: str) -> str:
        return "/".join(f"{x:.1f}" for x in t[key].seconds)

    def row(what: str, ours: str, plain: str) -> Row:
        a, b = t[ours].median, t[plain].median
        ratio = b / a
        return Row(
            scenario,
            what,
            ">= 1.0x plain boto3",
            f"{mb / a:.0f} vs {mb / b:.0f} MB/s = {ratio:.2f}x ({a:.1f} s vs {b:.1f} s; runs {runs(ours)} vs "
            f"{runs(plain)})",
            ratio >= 1.0,
        )

    return [
        row("checkpoint upload: Storage.upload_dir vs client.upload_file loop", "up-ours", "up-plain"),
        row("model download: Storage.download_prefix vs client.download_file loop", "down-ours", "down-plain"),
        row("model download: Storage.cached_download (cold) vs client.download_file loop", "cached", "down-plain"),
    ]


def _commit() -> str:
    out = subprocess.run(["git", "log", "-1", "--format=%h %s"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "trainer-image"], cwd=REPO, capture_output=True)
    return out.stdout.strip()[:60] + (" + uncommitted trainer changes" if dirty.stdout.strip() else "")


def _shown(argv: list[str]) -> list[str]:
    """The arguments that change what is measured (not where results go), for the recorded command."""
    out, skip = [], False
    for a in argv:
        if skip or a == "--no-docs":
            skip = False
            continue
        if a in ("--json", "--docs"):
            skip = True
            continue
        if not a.startswith(("--json=", "--docs=")):
            out.append(a)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--big-mb", type=int, default=200, help="size of the large file, MB")
    p.add_argument("--small", type=int, default=50, help="number of small files")
    p.add_argument("--rounds", type=int, default=3, help="transfer rounds (median)")
    p.add_argument("--steps", type=int, default=100, help="training steps in each checkpoint run")
    p.add_argument("--every", type=int, default=20, help="a checkpoint every N steps")
    p.add_argument("--hidden", type=int, default=256, help="tiny Llama hidden size")
    p.add_argument("--layers", type=int, default=4, help="tiny Llama layers")
    p.add_argument("--parts", default="checkpoint,transfer", help="comma-separated subset")
    p.add_argument("--quick", action="store_true", help="small and one round; does not write docs/benchmarks.md")
    p.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--json", help="also write the rows as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.big_mb, args.small, args.rounds, args.steps, args.every = 40, 20, 1, 50, 20
    shown = _shown(sys.argv[1:] if argv is None else argv)
    command = "make bench-storage" + (f" BENCH_ARGS={shlex.quote(' '.join(shown))}" if shown else "")
    host, date, commit = machine(), dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"), _commit()
    rows: list[Row] = []
    t0 = time.monotonic()
    with MotoServer() as s3, tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        log(f"moto S3 server at {s3.endpoint}")
        if "checkpoint" in args.parts:
            rows += checkpoint_rows(args, Path(tmp))
        if "transfer" in args.parts:
            rows += transfer_rows(args, Path(tmp))
    took = time.monotonic() - t0
    print(f"\nCheckpoints and storage benchmark, {date} UTC, commit {commit}, {host}; {took:.0f} s\n")
    print(text_table(rows))
    print(f"\nReproduce: {command}\n")
    if args.json:
        Path(args.json).write_text(json.dumps([vars(r) for r in rows], indent=2, default=str))
    if not (args.quick or args.no_docs):
        body = (
            "What it runs: `bench/storage_bench.py` starts moto's S3 server on loopback in its own process. "
            "(a) A real transformers `Trainer` trains a tiny Llama on CPU with the trainer's `CheckpointUploader` "
            "(hard-link snapshot in `on_save`, upload in a background thread, `_COMPLETE` marker last); timing "
            "callbacks around it split each checkpoint step into the Trainer's own save to disk (on_step_end -> "
            "on_save) and the uploader's hook (upload waiting). Blocking = median gap between a checkpoint step's "
            "end and the next step's begin - the same gap after other steps; the host copy (weights and "
            "optimizer state copied to fresh host memory, median of 5) is subtracted. The baseline runs the same "
            "upload inside `on_save`. (b) The same files (one large checkpoint-like file and many small ones) go "
            "up and down through `Storage` and through a plain "
            "boto3 client with default settings, rounds alternating which goes first; medians. moto is a Python "
            "server, so absolute MB/s are its, not the network's; the ratios compare the clients. The run shared "
            "its 2 cores with other work (load at start in the machine column).\n\n"
            f"Last run: {date} UTC, commit `{commit}`, {took:.0f} s. Reproduce with `{command}`.\n\n"
            + markdown_table(rows, date, host, command)
        )
        write_section(Path(args.docs), "bench-storage", body, "Checkpoints and storage (`make bench-storage`)")
        log(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
