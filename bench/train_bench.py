"""Training throughput on CPU: real (non-padding) tokens per second, ours vs two plain Trainer baselines.

A benchmark, not a test: it records, never asserts. All variants train the same tiny Llama-architecture model
(random weights, a byte-level BPE tokenizer trained here; `finetune_trainer.tiny_models`) with full fine-tuning
in fp32, from the same initial weights, on the same instruction data (generated deterministically: token
lengths log-normal, mean a quarter of the maximum length, none truncated), for exactly one epoch (so every
variant trains every sample once: the same steps, global batch and real tokens), with the same optimizer
(AdamW), learning rate, seed and torch thread count:

  (a) seeds      a plain transformers Trainer fed the seeds' recipe: `tokenizer(text, padding="max_length",
                 truncation=True, max_length=L)`, labels = input_ids, the Trainer's default collator.
  (b) per-batch  the same plain Trainer on the same text tokenized without padding, padded per batch by
                 `DataCollatorForSeq2Seq` (labels padded with -100), random batches.
  (c) ours       the trainer's own code path with its defaults for an instruction FineTuneJob (full method,
                 no validation split): `finetune_api.resolve`, `data.prepare_data`, `modeling.load_base_model`,
                 `data.make_collator`, `train.training_arguments` and `batching.FineTuneTrainer`, exactly as
                 `finetune_trainer.train.run` builds them (only storage, reports and evaluation are left out).

Time: from calling `trainer.train()` to the end of the last optimizer step (dataloader and sampler setup
included; the checkpoint saved after the last step is not). Real tokens: the Trainer's non-padding token count
(`include_num_input_tokens_seen="non_padding"`), checked against the data. Padding: the share of computed
positions that are padding, from the same dataloader order. Each variant runs --repeats times, interleaved
(a, b, c, a, b, c, ...), and the best run of each is reported. The process's CPU time over the same span is
recorded too: with one torch thread it is the wall time an idle machine would show, and unlike the wall time it
hardly moves when other work shares the cores. The verdicts therefore use real tokens per CPU-second; the
wall-clock tokens/s and their ratios are shown next to them.

    .venv/bin/python bench/train_bench.py            # the recorded run (a few minutes on 2 cores)
    .venv/bin/python bench/train_bench.py --quick    # a smoke run (no docs written)
    make bench-train BENCH_ARGS=--quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "api"), str(REPO / "trainer-image")]

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from bench.benchkit import Row, machine, markdown_table, text_table, write_section  # noqa: E402
from finetune_api.resolve import resolve_spec  # noqa: E402
from finetune_api.spec import FineTuneJobSpec, Task  # noqa: E402
from finetune_trainer.batching import FineTuneTrainer  # noqa: E402
from finetune_trainer.config import architecture  # noqa: E402
from finetune_trainer.data import make_collator, prepare_data  # noqa: E402
from finetune_trainer.modeling import apply_method, load_base_model, load_tokenizer, model_type_of  # noqa: E402
from finetune_trainer.tiny_models import build_model  # noqa: E402
from finetune_trainer.train import training_arguments  # noqa: E402

PROMPT, RESPONSE = "### Question:\n{question}\n### Answer:\n", "{answer}"
LEARNING_RATE = 1e-3
SEED = 42
WORDS = [
    "the",
    "a",
    "model",
    "data",
    "train",
    "test",
    "loss",
    "step",
    "token",
    "text",
    "question",
    "answer",
    "legal",
    "advice",
    "contract",
    "court",
    "tenant",
    "landlord",
    "lease",
    "rent",
    "notice",
    "judge",
    "law",
    "file",
    "claim",
    "doctor",
    "patient",
    "pain",
    "fever",
    "rest",
    "water",
    "sleep",
    "drug",
    "dose",
    "cat",
    "dog",
]


@dataclass
class Setup:
    model_dir: Path
    train_file: Path
    rows: list[dict[str, str]]
    max_length: int
    batch: int
    threads: int
    work: Path
    shape: str


@dataclass
class Result:
    name: str
    seconds: float
    cpu_seconds: float
    real_tokens: int
    padded_tokens: int
    steps: int
    first_loss: float
    mean_loss: float

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.real_tokens / self.cpu_seconds

    @property
    def padding(self) -> float:
        return 1 - self.real_tokens / self.padded_tokens


class StepClock(TrainerCallback):
    """Wall and process CPU time at the last optimizer step's end (train() is timed from its call to this)."""

    def __init__(self) -> None:
        self.last_step_end = 0.0
        self.last_step_cpu = 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last_step_end = time.perf_counter()
        self.last_step_cpu = time.process_time()


# ---- data and model ----------------------------------------------------------------------------------------


def make_rows(n: int, max_length: int, seed: int = 0) -> list[dict[str, str]]:
    """Instruction rows whose word counts are log-normal (sigma 0.7) with mean max_length / 4, clipped to
    [12, max_length - 8] (each word of the vocabulary is one token of the tokenizer trained on it, plus a few
    for the template). A quarter of each sample is the question, the rest the answer."""
    rng = random.Random(seed)
    sigma = 0.7
    mu = math.log(max_length / 4) - sigma**2 / 2 - 0.06  # E[lognormal] = exp(mu + sigma^2/2); clipping adds a little
    rows = []
    for _ in range(n):
        words = min(max(12, round(rng.lognormvariate(mu, sigma))), max_length - 8) - 8  # the template's tokens
        q = max(1, words // 4)
        question = " ".join(rng.choice(WORDS) for _ in range(q))
        answer = " ".join(rng.choice(WORDS) for _ in range(words - q))
        rows.append({"question": question, "answer": answer})
    return rows


def setup(args: argparse.Namespace, work: Path) -> Setup:
    rows = make_rows(args.steps * args.batch, args.max_length)
    corpus = [f"{PROMPT.format(**r)}{r['answer']}" for r in rows[:400]]
    model_dir = build_model(
        "llama",
        work / "model",
        corpus,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=max(1, args.hidden // 64),
        vocab_size=1024,
        max_positions=args.max_length,
    )
    train_file = work / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shape = f"hidden {args.hidden}, {args.layers} layers, {max(1, args.hidden // 64)} heads, vocabulary 1024"
    return Setup(model_dir, train_file, rows, args.max_length, args.batch, args.threads, work, shape)


def _texts(s: Setup, eos: str) -> list[str]:
    """The samples as one string each: the same template and end-of-sequence token as ours."""
    return [PROMPT.format(**r) + RESPONSE.format(**r) + eos for r in s.rows]


# ---- the variants -------------------------------------------------------------------------------------------


def _plain_args(s: Setup, out: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        num_train_epochs=1,
        per_device_train_batch_size=s.batch,
        learning_rate=LEARNING_RATE,
        optim="adamw_torch",
        seed=SEED,
        data_seed=SEED,
        logging_steps=10,
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
    )


def seeds_trainer(s: Setup, out: Path) -> Trainer:
    """(a) The seeds' recipe: every sample padded to max_length, labels = input_ids."""
    tok = load_tokenizer(s.model_dir, Task.CAUSAL_LM)
    enc = tok(_texts(s, tok.eos_token), padding="max_length", truncation=True, max_length=s.max_length)
    ds = datasets.Dataset.from_dict({**enc, "labels": [list(ids) for ids in enc["input_ids"]]})
    model = AutoModelForCausalLM.from_pretrained(str(s.model_dir))
    return Trainer(model=model, args=_plain_args(s, out), train_dataset=ds)


def per_batch_trainer(s: Setup, out: Path) -> Trainer:
    """(b) The same plain Trainer, padding per batch (DataCollatorForSeq2Seq), random batches."""
    tok = load_tokenizer(s.model_dir, Task.CAUSAL_LM)
    enc = tok(_texts(s, tok.eos_token), truncation=True, max_length=s.max_length)
    ds = datasets.Dataset.from_dict({**enc, "labels": [list(ids) for ids in enc["input_ids"]]})
    model = AutoModelForCausalLM.from_pretrained(str(s.model_dir))
    collator = DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=-100, padding=True)
    return Trainer(model=model, args=_plain_args(s, out), train_dataset=ds, data_collator=collator)


def ours_spec(s: Setup) -> dict[str, Any]:
    return {
        "model": {"uri": "s3://bench/model/"},
        "task": "instruction",
        "method": {"type": "full"},
        "dataset": {
            "train": "s3://bench/train.jsonl",
            "template": {"prompt": PROMPT, "response": RESPONSE},
            "split": {"validationRatio": 0},
        },
        "hyperparameters": {
            "epochs": 1,
            "batchSize": s.batch,
            "maxSeqLength": s.max_length,
            "learningRate": LEARNING_RATE,
            "seed": SEED,
        },
        "output": {"uri": "s3://bench/out/"},
    }


def ours_trainer(s: Setup, out: Path) -> Trainer:
    """(c) The trainer's own path with its defaults (see finetune_trainer.train.run)."""
    job = resolve_spec(FineTuneJobSpec.model_validate(ours_spec(s)))
    spec, resolved = job.spec, job.training
    tok = load_tokenizer(s.model_dir, Task(spec.task))
    data = prepare_data(spec, tok, s.train_file)
    model = load_base_model(spec, s.model_dir, data.label_names, tok.pad_token_id)
    model = apply_method(model, spec, architecture(spec, resolved, model_type_of(s.model_dir)), False)
    args = training_arguments(spec, resolved, "fp32", out, has_eval=False)
    return FineTuneTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        data_collator=make_collator(spec, tok, model),
        processing_class=tok,
    )


def ours_label(s: Setup) -> str:
    training = resolve_spec(FineTuneJobSpec.model_validate(ours_spec(s))).training
    how = "packing" if training.packing else ("group-by-length" if training.group_by_length else "per-batch padding")
    return f"(c) ours (defaults: {how})"


VARIANTS: dict[str, Callable[[Setup, Path], Trainer]] = {
    "(a) plain Trainer, padded to max length (seeds)": seeds_trainer,
    "(b) plain Trainer, per-batch padding": per_batch_trainer,
    "(c) ours": ours_trainer,
}


def real_tokens(ds: datasets.Dataset) -> int:
    """Non-padding tokens of a dataset: its attention masks, or (packed rows, no padding) its lengths."""
    if "attention_mask" in ds.column_names:
        return sum(sum(mask) for mask in ds["attention_mask"])
    return sum(len(ids) for ids in ds["input_ids"])


def run_variant(name: str, build: Callable[[Setup, Path], Trainer], s: Setup, run: int) -> Result:
    torch.manual_seed(SEED)
    trainer = build(s, s.work / f"out-{run}")
    clock = StepClock()
    trainer.add_callback(clock)
    start, start_cpu = time.perf_counter(), time.process_time()
    output = trainer.train()
    seconds, cpu_seconds = clock.last_step_end - start, clock.last_step_cpu - start_cpu
    padded = sum(int(b["input_ids"].numel()) for b in trainer.get_train_dataloader())  # the same epoch-0 order
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    seen = int(trainer.state.num_input_tokens_seen)
    assert isinstance(trainer.train_dataset, datasets.Dataset)
    if seen != real_tokens(trainer.train_dataset):  # one epoch: every real token exactly once
        raise RuntimeError(f"{name}: trained {seen} real tokens, the data holds {real_tokens(trainer.train_dataset)}")
    return Result(
        name,
        seconds,
        cpu_seconds,
        seen,
        padded,
        trainer.state.global_step,
        losses[0],
        output.training_loss,
    )


# ---- report -------------------------------------------------------------------------------------------------


def rows_of(results: dict[str, list[Result]], label: str) -> list[Row]:
    best = {name: max(rs, key=lambda r: r.tokens_per_s) for name, rs in results.items()}
    cpu = {name: max(r.tokens_per_cpu_s for r in rs) for name, rs in results.items()}
    rows = []
    for name, r in best.items():
        shown = label if name.startswith("(c)") else name
        rows.append(
            Row(
                shown,
                f"real tokens per second ({r.real_tokens} real tokens in {r.steps} steps; {r.padding:.0%} of computed "
                f"positions are padding; first loss {r.first_loss:.2f}, epoch mean {r.mean_loss:.2f})",
                "",
                f"{cpu[name]:,.0f} tok per CPU-s (wall clock: {r.tokens_per_s:,.0f} tok/s, {r.seconds:.1f} s)",
                None,
            )
        )
    a, b, c = (r.tokens_per_s for r in best.values())
    ca, cb, cc = cpu.values()
    what = "ratio of real tokens per CPU-second, same run (wall-clock tokens/s in brackets)"
    rows.append(Row("ours vs (a)", what, ">= 2x", f"{cc / ca:.2f}x (wall clock: {c / a:.2f}x)", cc / ca >= 2))
    rows.append(Row("ours vs (b)", what, ">= 1.3x", f"{cc / cb:.2f}x (wall clock: {c / b:.2f}x)", cc / cb >= 1.3))
    return rows


def describe(s: Setup, params: int, lengths: list[int], repeats: int) -> str:
    mean = sum(lengths) / len(lengths)
    return (
        f"Model: tiny Llama, {params / 1e6:.1f} M parameters ({s.shape}), fp32, "
        f"full fine-tuning, AdamW lr {LEARNING_RATE}. Data: {len(s.rows)} instruction samples, token lengths "
        f"mean {mean:.1f} / max {max(lengths)} with maxSeqLength {s.max_length} (mean = {mean / s.max_length:.2f} "
        f"of the maximum), one epoch = {len(s.rows) // s.batch} steps of {s.batch} samples; "
        f"torch threads {s.threads}; best of {repeats} interleaved runs per variant (CPU time and wall clock each)."
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small smoke run; docs are not written")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (= one epoch); default 64, quick 12")
    p.add_argument("--batch", type=int, default=8, help="samples per step (one process, no accumulation)")
    p.add_argument("--max-length", type=int, default=128, help="maxSeqLength; the mean sample is a quarter of it")
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for every variant")
    p.add_argument("--repeats", type=int, default=None, help="interleaved runs per variant; default 3, quick 1")
    p.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    args.steps = args.steps or (12 if args.quick else 64)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


def _commit() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shown = sys.argv[1:] if argv is None else argv
    command = "make bench-train" + (f" BENCH_ARGS={shlex.quote(' '.join(shown))}" if shown else "")
    host, date = machine(), dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        s = setup(args, Path(tmp))
        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(s.model_dir)).parameters())
        tok = load_tokenizer(s.model_dir, Task.INSTRUCTION)
        data = prepare_data(resolve_spec(FineTuneJobSpec.model_validate(ours_spec(s))).spec, tok, s.train_file)
        lengths = [len(ids) for ids in data.train["input_ids"]]
        results: dict[str, list[Result]] = {name: [] for name in VARIANTS}
        for run in range(args.repeats):
            for name, build in VARIANTS.items():
                r = run_variant(name, build, s, run)
                results[name].append(r)
                print(
                    f"run {run + 1}: {name}: {r.tokens_per_s:,.0f} tok/s, {r.seconds:.1f} s, CPU {r.cpu_seconds:.1f} s",
                    flush=True,
                )
        rows = rows_of(results, ours_label(s))
        about = describe(s, params, lengths, args.repeats)
    print(f"\nTraining throughput, {date} UTC, commit {_commit()}, {host}; {time.monotonic() - t0:.0f} s\n{about}\n")
    print(text_table(rows))
    print(f"\nReproduce: {command}\n")
    if not (args.quick or args.no_docs):
        body = (
            f"Last run: {date} UTC, commit `{_commit()}`, {time.monotonic() - t0:.0f} s, on a machine shared with "
            f"other work (the ratios compare runs of the same invocation). Reproduce with `{command}`. "
            f"What it runs: see `bench/train_bench.py`.\n\n{about}\n\n" + markdown_table(rows, date, host, command)
        )
        write_section(Path(args.docs), "bench-train", body, "Training throughput on CPU (`make bench-train`)")
        print(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
