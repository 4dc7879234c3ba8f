"""The trainer end to end, through the production path: a tiny model and data uploaded to a real S3
endpoint (moto server), a FineTuneJob YAML with s3:// URIs, and ``python -m finetune_trainer --config`` as
a subprocess whose report lines (stdout) and outputs (S3) are checked.

One test per seed workflow (see /work/shared/seeds/README.md), each asserting that the loss falls and that
the metrics come from real predictions (recomputed here from the saved predictions/generations), plus
DeepSpeed ZeRO, kill -9 and resume, user errors (exit 2), and the manifest's integrity. The checkpoint
protocol (marker last, marker deleted first, retention, resume selection) is also tested directly against
the same S3 endpoint without training (fast, not marked slow).

Nothing is mocked. The datasets are synthetic with learnable structure (repeated patterns) so that a
model of ~50K parameters learns them in tens of steps on a CPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api.reports import Report, ReportKind, parse_reports
from finetune_trainer.evaluate import normalize
from finetune_trainer.storage import Storage, parse_uri
from finetune_trainer.tiny_models import build_model

RUN_TIMEOUT_S = 300


# ---- harness -----------------------------------------------------------------------------------------------


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    reports: list[Report]
    termination: dict[str, Any] | None = None
    files: dict[str, Any] = field(default_factory=dict)

    def of(self, kind: ReportKind) -> list[Report]:
        return [r for r in self.reports if r.kind == kind]

    @property
    def losses(self) -> list[tuple[int, float]]:
        return [(r.step or 0, r.loss) for r in self.of(ReportKind.PROGRESS) if r.loss is not None]

    def explain(self) -> str:
        return f"rc={self.rc}\n--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-6000:]}"


class Env:
    """One test's bucket, scratch dir and helpers to stage inputs and run the trainer."""

    def __init__(self, s3_server: Any, tmp_path: Path) -> None:
        self.bucket = s3_server.make_bucket()
        self.tmp = tmp_path
        self.store = Storage()
        self.out = f"s3://{self.bucket}/runs/job"

    def model(self, arch: str, corpus: Sequence[str], **kwargs: Any) -> str:
        local = build_model(arch, self.tmp / "models" / arch, list(corpus), **kwargs)
        uri = f"s3://{self.bucket}/models/{arch}"
        self.store.upload_dir(local, uri)
        return uri

    def data(self, name: str, rows: Sequence[Any]) -> str:
        path = self.tmp / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            path.write_text("".join(f"{r}\n" for r in rows))
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        uri = f"s3://{self.bucket}/data/{name}"
        self.store.upload_file(path, uri)
        return uri

    def job(self, spec: dict[str, Any]) -> Path:
        spec = {"output": {"uri": self.out}, **spec}
        path = self.tmp / "job.yaml"
        path.write_text(
            yaml.safe_dump(
                {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "t"}, "spec": spec}
            )
        )
        return path

    def command(self, config: Path, workdir: str = "wd") -> list[str]:
        return [sys.executable, "-m", "finetune_trainer", "--config", str(config), "--workdir", str(self.tmp / workdir)]

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "FINETUNE_TERMINATION_LOG": str(self.tmp / "termination-log"),
            "FINETUNE_CACHE": str(self.tmp / "cache"),
            "FINETUNE_ATTEMPT": "test-pod",
        }

    def run(self, spec: dict[str, Any], workdir: str = "wd") -> Run:
        return self.run_config(self.job(spec), workdir)

    def run_config(self, config: Path, workdir: str = "wd") -> Run:
        term = self.tmp / "termination-log"
        term.unlink(missing_ok=True)
        proc = subprocess.run(
            self.command(config, workdir), capture_output=True, text=True, env=self.env(), timeout=RUN_TIMEOUT_S
        )
        return Run(
            proc.returncode,
            proc.stdout,
            proc.stderr,
            list(parse_reports(proc.stdout.splitlines())),
            json.loads(term.read_text()) if term.exists() else None,
        )

    def run_in_process(self, spec: dict[str, Any], capsys: Any, monkeypatch: Any) -> Run:
        """The same entry point called in this process: fast for runs that stop before training."""
        from finetune_trainer.__main__ import main

        for key, value in self.env().items():
            if key.startswith("FINETUNE_"):
                monkeypatch.setenv(key, value)
        term = self.tmp / "termination-log"
        term.unlink(missing_ok=True)
        capsys.readouterr()
        rc = main(["--config", str(self.job(spec)), "--workdir", str(self.tmp / "wd")])
        out = capsys.readouterr()
        termination = json.loads(term.read_text()) if term.exists() else None
        return Run(rc, out.out, out.err, list(parse_reports(out.out.splitlines())), termination)

    def json(self, rel: str) -> Any:
        return json.loads(self.store.read_text(f"{self.out}/{rel}"))

    def exists(self, rel: str) -> bool:
        return self.store.exists(f"{self.out}/{rel}")

    def bytes(self, rel: str) -> bytes:
        dest = self.tmp / "fetched" / rel
        self.store.download_file(f"{self.out}/{rel}", dest)
        return dest.read_bytes()


@pytest.fixture
def env(s3_server: Any, tmp_path: Path) -> Env:
    return Env(s3_server, tmp_path)


def assert_succeeded(run: Run) -> None:
    assert run.rc == 0, run.explain()
    assert run.of(ReportKind.OUTPUT), run.explain()
    assert not run.of(ReportKind.ERROR), run.explain()
    # The final report is also the termination message (bare JSON, parsed by the operator like a report).
    assert run.termination is not None and run.termination["kind"] == "output"
    assert run.termination["manifest"] == run.of(ReportKind.OUTPUT)[-1].manifest


def assert_loss_falls(run: Run, factor: float = 0.75) -> None:
    """First logged training loss vs the last: the model must have learnt the data's structure."""
    losses = run.losses
    assert len(losses) >= 3, run.explain()
    first, last = losses[0][1], losses[-1][1]
    assert last < factor * first, f"loss did not fall enough: {losses}"


def rouge_f(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
    return {k: sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")}


def assert_generation_metrics_match_samples(metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
    """The reported generation metrics are a function of the saved generations (recomputed independently)."""
    preds, refs = [s["tuned"] for s in samples], [s["reference"] for s in samples]
    assert samples and all(isinstance(p, str) for p in preds)
    if "exact_match" in metrics:
        em = sum(normalize(p) == normalize(r) for p, r in zip(preds, refs, strict=True)) / len(preds)
        assert metrics["exact_match"] == pytest.approx(em)
    if "rouge1" in metrics:
        for key, value in rouge_f(preds, refs).items():
            assert metrics[key] == pytest.approx(value)
    if "bleu" in metrics:
        import sacrebleu

        assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)


# ---- synthetic data with learnable structure ---------------------------------------------------------------

COLORS = ["red", "blue", "green", "yellow"]
ANIMALS = ["cat", "dog", "bird", "fox"]


def pattern_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        c, a = rng.choice(COLORS), rng.choice(ANIMALS)
        out.append(f"the {c} {a} sat on the {c} mat and the {a} was happy")
    return out


LEGAL_QA = [
    ("Can my landlord keep my deposit?", "Only for unpaid rent or damage."),
    ("How much notice must a tenant give?", "Thirty days in writing."),
    ("Can I break my lease early?", "Yes, but you may owe rent."),
    ("Who pays for repairs?", "The landlord pays for repairs."),
]

MEDICAL_QA = [
    ("What helps a fever?", "rest and water"),
    ("What helps a cough?", "warm tea and honey"),
    ("What helps a headache?", "sleep in a dark room"),
    ("What helps a sore throat?", "salt water gargle"),
    ("What helps back pain?", "gentle stretching daily"),
]


# ---- seed workflows ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bloom_causal_lm_packing_from_jsonl_with_dropped_columns(env: Env) -> None:
    """Seed 000: BLOOM causal LM on legal Q&A text, extra columns dropped, packed into fixed blocks."""
    texts = [f"Question: {q} Answer #1: {a}" for q, a in LEGAL_QA] * 30
    rows = [
        {"text": t, "url": f"https://example.com/{i}", "created_timestamp": "2020-01-01"} for i, t in enumerate(texts)
    ]
    spec = {
        "model": {"uri": env.model("bloom", texts)},
        "task": "causal-lm",
        "dataset": {
            "train": env.data("legal.jsonl", rows),
            "dropColumns": ["url", "created_timestamp"],
            "split": {"validationRatio": 0.1},
        },
        "method": {"type": "full"},
        "hyperparameters": {
            "maxSteps": 40,
            "batchSize": 8,
            "learningRate": 3e-3,
            "blockSize": 32,
            "loggingSteps": 5,
            "warmupSteps": 2,
        },
        "evaluation": {
            "maxSamples": 8,
            "maxNewTokens": 12,
            "samplePrompts": ["Question: Who pays for repairs? Answer #1:"],
        },
        "checkpoints": {"everySteps": 20},
    }
    run = env.run(spec)

    assert_succeeded(run)
    assert_loss_falls(run, 0.6)
    metrics = env.json("report/metrics.json")
    stats = metrics["dataset"]
    assert stats["packing"] is True
    # Packing: every training sample is exactly one block of blockSize tokens.
    assert stats["train_tokens"] == stats["train_samples"] * 32
    assert metrics["metrics"]["perplexity"] == pytest.approx(math.exp(metrics["metrics"]["eval_loss"]))
    samples = env.json("report/samples.json")
    assert_generation_metrics_match_samples(metrics["metrics"], samples["validation"])
    assert samples["prompts"][0]["prompt"].startswith("Question: Who pays")


@pytest.mark.slow
def test_gpt2_txt_file_80_20_split_full_finetune_and_manifest(env: Env) -> None:
    """Seed 001: GPT-2 on a plain text file (one sample per line), 80/20 split, full fine-tune, then reload.
    Also: the manifest lists every uploaded output file with its real size and sha256."""
    lines = pattern_lines(150)
    spec = {
        "model": {"uri": env.model("gpt2", lines)},
        "task": "causal-lm",
        "dataset": {"train": env.data("lines.txt", lines), "split": {"validationRatio": 0.2}},
        "method": {"type": "full"},
        "hyperparameters": {
            "maxSteps": 40,
            "batchSize": 8,
            "learningRate": 3e-3,
            "packing": False,
            "maxSeqLength": 32,
            "loggingSteps": 5,
        },
        "evaluation": {"maxSamples": 10, "maxNewTokens": 10},
        "checkpoints": {"everySteps": 20, "keep": 1},
    }
    run = env.run(spec)

    assert_succeeded(run)
    assert_loss_falls(run, 0.7)
    stats = env.json("report/metrics.json")["dataset"]
    assert (stats["train_rows"], stats["eval_rows"]) == (120, 30)  # 80/20 of 150 lines
    assert stats["packing"] is False

    manifest = env.json("manifest.json")
    listed = {f["path"]: f for f in manifest["files"]}
    uploaded = [
        rel for rel in env.store.list_prefix(env.out) if not rel.startswith("checkpoints/") and rel != "manifest.json"
    ]
    assert sorted(listed) == sorted(uploaded)
    for rel in uploaded:
        data = env.bytes(rel)
        assert listed[rel]["size"] == len(data)
        assert listed[rel]["sha256"] == hashlib.sha256(data).hexdigest(), rel
    assert {"model/model.safetensors", "model/tokenizer.json", "model/config.json"} <= set(listed)
    assert manifest["step"] == 40
    assert manifest["config"]["spec"]["task"] == "causal-lm"
    assert manifest["dataset"]["sha256"] == manifest["dataset"]["stats"]["dataset_sha256"]
    assert {"torch", "transformers", "peft", "deepspeed", "datasets"} <= set(manifest["versions"])
    # keep=1: only the newest complete checkpoint remains.
    assert [c["step"] for c in manifest["checkpoints"]] == [40]
    out = run.of(ReportKind.OUTPUT)[-1]
    assert out.manifest == f"{env.out}/manifest.json" and out.step == 40

    # The uploaded model reloads and generates (save and reload, as in the tutorial).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = env.tmp / "reloaded"
    env.store.download_prefix(f"{env.out}/model", local)
    tok = AutoTokenizer.from_pretrained(local)
    model: Any = AutoModelForCausalLM.from_pretrained(local)
    ids = model.generate(**tok(["the red"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert ids.shape[1] > 2


@pytest.mark.slow
def test_gpt_neox_instruction_tuning_side_by_side(env: Env) -> None:
    """Seed 002: pythia-style instruction tuning: renamed columns, whitespace cleanup, first N rows,
    "### Question / ### Answer" template, adafactor, gradient accumulation, eval/save steps, best model by
    eval_loss, FLOPs/memory estimate, loss and LR curves, base vs tuned answers, EM/F1/BLEU."""
    rows = [{"Description": f"  {q}  ", "Doctor": a, "Patient": "x"} for q, a in MEDICAL_QA] * 40
    corpus = [f"### Question:\n{q}\n### Answer:\n{a}" for q, a in MEDICAL_QA]
    spec = {
        "model": {"uri": env.model("gpt-neox", corpus * 20)},
        "task": "instruction",
        "dataset": {
            "train": env.data("medical.jsonl", rows),
            "rename": {"Description": "question", "Doctor": "answer"},
            "dropColumns": ["Patient"],
            "maxSamples": 150,
            "template": {"prompt": "### Question:\n{question}\n### Answer:\n", "response": "{answer}"},
            "split": {"validationRatio": 0.1},
        },
        "method": {"type": "full"},
        "hyperparameters": {
            "maxSteps": 60,
            "batchSize": 4,
            "gradientAccumulationSteps": 2,
            "optimizer": "adafactor",
            "learningRate": 1e-2,
            "loggingSteps": 5,
            "maxSeqLength": 48,
        },
        "evaluation": {
            "steps": 20,
            "bestModelMetric": "eval_loss",
            "maxNewTokens": 8,
            "metrics": ["loss", "perplexity", "exact_match", "token_f1", "bleu"],
            "samplePrompts": ["### Question:\nWhat helps a cough?\n### Answer:\n"],
        },
        "checkpoints": {"everySteps": 20, "keep": 1},
    }
    run = env.run(spec)

    assert_succeeded(run)
    assert_loss_falls(run, 0.5)
    metrics = env.json("report/metrics.json")
    assert metrics["dataset"]["train_rows_used"] == 150
    assert len(run.of(ReportKind.EVAL)) >= 3  # at steps 20, 40, 60
    assert metrics["best_checkpoint_step"] in (20, 40, 60)
    # The best checkpoint is never rotated away, even with keep=1.
    steps = [c["step"] for c in env.json("manifest.json")["checkpoints"]]
    assert metrics["best_checkpoint_step"] in steps and 60 in steps
    tuned, base = metrics["metrics"], metrics["base_metrics"]
    assert set(tuned) >= {"eval_loss", "perplexity", "exact_match", "token_f1", "bleu"}
    assert "rouge1" not in tuned  # evaluation.metrics restricts what is computed
    assert tuned["token_f1"] > base["token_f1"]
    samples = env.json("report/samples.json")
    assert_generation_metrics_match_samples(tuned, samples["validation"])
    assert all({"prompt", "reference", "base", "tuned"} <= set(s) for s in samples["validation"])
    assert samples["prompts"][0]["base"] != samples["prompts"][0]["tuned"]
    md = env.bytes("report/samples.md").decode()
    assert "| base model | tuned model |" in md
    for png in ("loss.png", "learning_rate.png"):
        assert env.bytes(f"report/{png}").startswith(b"\x89PNG\r\n\x1a\n")
    est = metrics["estimates"]
    assert est["flops"] == 6 * metrics["parameters"]["total"] * est["tokens_trained"] > 0
    # Adafactor's factored state is far smaller than AdamW's 8 bytes per parameter.
    assert 0 < est["memory_bytes"]["optimizer"] < 8 * metrics["parameters"]["trainable"]
    assert set(metrics["durations_seconds"]) >= {"downloading", "preparing", "training", "evaluating"}


def test_llama_instruction_packing_trains_packed_rows(env: Env) -> None:
    """The measured bug: instruction with packing: true was recorded as packing and trained unpacked. Now the
    samples are packed into rows (position ids restart per sample; tests/trainer/test_packing.py proves the loss
    is exactly the unpacked one) and the manifest records what was done."""
    rows = [{"question": q, "answer": a} for q, a in MEDICAL_QA] * 12
    corpus = [f"### Question:\n{q}\n### Answer:\n{a}" for q, a in MEDICAL_QA]
    spec = {
        "model": {"uri": env.model("llama", corpus * 20)},
        "task": "instruction",
        "dataset": {
            "train": env.data("medical.jsonl", rows),
            "template": {"prompt": "### Question:\n{question}\n### Answer:\n", "response": "{answer}"},
            "split": {"validationRatio": 0.1},
        },
        "method": {"type": "full"},
        "hyperparameters": {
            "maxSteps": 20,
            "batchSize": 2,
            "learningRate": 1e-2,
            "loggingSteps": 2,
            "packing": True,
            "maxSeqLength": 48,
            "blockSize": 160,
        },
        "evaluation": {"maxNewTokens": 4, "maxSamples": 2},
    }
    run = env.run(spec)

    assert_succeeded(run)
    assert_loss_falls(run, 0.75)
    manifest = env.json("manifest.json")
    stats = manifest["dataset"]["stats"]
    assert stats["packing"] is True
    assert stats["train_samples"] < stats["train_samples_packed"] == stats["train_rows"]
    assert manifest["resolved"]["packing"] is True and manifest["resolved"]["blockSize"] == 160
    assert manifest["config"]["spec"]["hyperparameters"]["packing"] is True


def test_instruction_packing_on_an_architecture_that_cannot_is_a_user_error(
    env: Env, capsys: Any, monkeypatch: Any
) -> None:
    rows = [{"question": q, "answer": a} for q, a in MEDICAL_QA]
    spec = {
        "model": {"uri": env.model("bloom", [f"{q} {a}" for q, a in MEDICAL_QA] * 20)},
        "task": "instruction",
        "dataset": {"train": env.data("qa.jsonl", rows), "template": {"prompt": "{question}", "response": "{answer}"}},
        "hyperparameters": {"packing": True, "maxSteps": 1},
    }
    run = env.run_in_process(spec, capsys, monkeypatch)
    assert run.rc == 2, run.explain()
    assert [e.reason for e in run.of(ReportKind.ERROR)] == ["PackingUnsupported"]
    assert not env.exists("manifest.json")


def _sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    topics = {"movie": "the film plot actor", "food": "the meal chef taste", "book": "the novel author pages"}
    pos, neg = ["great", "excellent", "wonderful", "good"], ["awful", "terrible", "poor", "bad"]
    rows = []
    for i in range(n):
        topic = rng.choice(list(topics))
        label = "positive" if i % 2 else "negative"
        words = rng.sample(pos if label == "positive" else neg, 2)
        rows.append({"review": f"{topics[topic]} was {words[0]} and {words[1]}", "sentiment": label})
    return rows


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "lr"), [("bert", 2e-2), ("llama", 5e-3)])
def test_classification_lora_tfidf_split_early_stopping(env: Env, arch: str, lr: float) -> None:
    """Seed 003: sequence classification with LoRA (QLoRA needs a GPU: see scripts/gpu-check.sh), split
    stratified by label x TF-IDF cluster, early stopping on eval loss, accuracy/F1 from real predictions."""
    rows = _sentiment_rows(160)
    spec = {
        "model": {"uri": env.model(arch, [r["review"] for r in rows])},
        "task": "classification",
        "dataset": {
            "train": env.data("reviews.jsonl", rows),
            "fields": {"text": "review", "label": "sentiment"},
            "split": {"validationRatio": 0.25, "strategy": "tfidf-cluster", "clusters": 3},
        },
        "method": {"type": "lora", "rank": 8, "alpha": 16, "dropout": 0.0},
        "hyperparameters": {
            "maxSteps": 300,
            "batchSize": 16,
            "learningRate": lr,
            "loggingSteps": 5,
            "warmupSteps": 5,
            "earlyStopping": {"patience": 3, "threshold": 0.01},
        },
        "evaluation": {
            "steps": 10,
            "bestModelMetric": "eval_loss",
            "samplePrompts": ["the film plot actor was great and good"],
        },
        "checkpoints": {"everySteps": 10, "keep": 1},
    }
    run = env.run(spec)

    assert_succeeded(run)
    assert_loss_falls(run, 0.5)
    metrics = env.json("report/metrics.json")
    final_step = metrics["step"]
    assert final_step < 300, "early stopping never stopped training"
    stats = metrics["dataset"]
    assert stats["split"]["strategy"] == "tfidf-cluster" and stats["eval_rows"] == 40
    preds = [json.loads(line) for line in env.bytes("report/predictions.jsonl").decode().splitlines()]
    assert len(preds) == 40
    accuracy = sum(p["tuned_id"] == p["label_id"] for p in preds) / len(preds)
    assert metrics["metrics"]["accuracy"] == pytest.approx(accuracy)
    assert accuracy >= 0.9  # chance is 0.5
    from sklearn.metrics import f1_score

    f1 = f1_score([p["label_id"] for p in preds], [p["tuned_id"] for p in preds], average="macro")
    assert metrics["metrics"]["f1"] == pytest.approx(f1)
    cm = metrics["confusion_matrix"]
    assert sum(map(sum, cm)) == 40 and cm[0][0] + cm[1][1] == round(accuracy * 40)
    assert metrics["labels"] == ["negative", "positive"]
    assert env.json("report/samples.json")["prompts"][0]["tuned"] == "positive"
    # LoRA: the adapter (and the trained classifier head) is the model output, not full weights.
    files = {f["path"] for f in env.json("manifest.json")["files"]}
    assert "model/adapter_config.json" in files and "model/adapter_model.safetensors" in files
    adapter = env.json("model/adapter_config.json")
    head = ["classifier"] if arch == "bert" else ["score"]
    assert set(adapter["modules_to_save"]) >= set(head)


@pytest.mark.slow
def test_t5_seq2seq_lora_rouge(env: Env) -> None:
    """Seed 004: Flan-T5 style text2text QA with LoRA, ROUGE-1/2/L from real generations."""
    pairs = [
        ("question: what color is the sky", "the sky is blue"),
        ("question: what color is grass", "grass is green"),
        ("question: what color is snow", "snow is white"),
        ("question: what color is coal", "coal is black"),
    ]
    rows = [{"input": q, "target": a} for q, a in pairs] * 40
    spec = {
        "model": {"uri": env.model("t5", [f"{q} {a}" for q, a in pairs] * 10)},
        "task": "seq2seq",
        "dataset": {"train": env.data("qa.jsonl", rows), "split": {"validationRatio": 0.1}},
        "method": {"type": "lora", "rank": 16, "alpha": 32, "dropout": 0.0, "mergeAdapter": True},
        "hyperparameters": {"maxSteps": 60, "batchSize": 8, "learningRate": 2e-2, "loggingSteps": 5},
        "evaluation": {"maxNewTokens": 8, "metrics": ["loss", "rouge"]},
        "checkpoints": {"everySteps": 30},
    }
    run = env.run(spec)

    assert_succeeded(run)
    assert_loss_falls(run, 0.6)
    metrics = env.json("report/metrics.json")
    tuned = metrics["metrics"]
    assert set(tuned) == {"eval_loss", "rouge1", "rouge2", "rougeL", "train_loss"}
    samples = env.json("report/samples.json")["validation"]
    assert_generation_metrics_match_samples(tuned, samples)
    assert tuned["rouge1"] > metrics["base_metrics"]["rouge1"]

    # mergeAdapter: merged/ is a plain T5 (no peft needed) that answers like the adapter-wrapped model did.
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    local = env.tmp / "merged"
    env.store.download_prefix(f"{env.out}/merged", local)
    assert not (local / "adapter_config.json").exists()
    tok, model = AutoTokenizer.from_pretrained(local), AutoModelForSeq2SeqLM.from_pretrained(local)
    enc = tok([s["prompt"] for s in samples], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    merged = [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
    assert merged == [s["tuned"] for s in samples]


# ---- DeepSpeed, resume, errors -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cpu(env: Env, stage: int) -> None:
    """DeepSpeed ZeRO-2/3 in one CPU process (the first run compiles DeepSpeed's CPU comm op, ~2 min)."""
    lines = pattern_lines(100)
    spec = {
        "model": {"uri": env.model("gpt2", lines)},
        "task": "causal-lm",
        "dataset": {"train": env.data("lines.txt", lines), "split": {"validationRatio": 0.1}},
        "method": {"type": "full"},
        "deepspeed": {"stage": stage},
        "hyperparameters": {"maxSteps": 30, "batchSize": 8, "learningRate": 3e-3, "blockSize": 32, "loggingSteps": 5},
        "evaluation": {"maxSamples": 4, "maxNewTokens": 4},
        "checkpoints": {"everySteps": 15},
    }
    run = env.run(spec)

    assert_succeeded(run)
    assert_loss_falls(run, 0.7)
    ckpt = env.store.list_prefix(f"{env.out}/checkpoints/checkpoint-30")
    assert any(p.startswith("global_step30/") for p in ckpt), ckpt  # DeepSpeed's own sharded state
    # The final model holds real (gathered) weights even under ZeRO-3 and reloads as a normal model.
    from transformers import AutoModelForCausalLM

    local = env.tmp / "reloaded"
    env.store.download_prefix(f"{env.out}/model", local)
    model = AutoModelForCausalLM.from_pretrained(local)
    assert all(p.numel() > 0 for p in model.parameters())


def _kill_after_first_checkpoint(env: Env, config: Path) -> tuple[list[Report], int]:
    proc = subprocess.Popen(
        env.command(config, "attempt-1"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env.env()
    )
    assert proc.stdout is not None
    lines = []
    checkpoint_step = None
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for line in proc.stdout:
        lines.append(line)
        reports = list(parse_reports([line]))
        if reports and reports[0].kind == ReportKind.CHECKPOINT:
            checkpoint_step = reports[0].step
        # Killed at the first step logged after the first complete checkpoint (the upload runs in the background
        # and may finish before training logs another step), so both attempts log some steps in common.
        logged = reports[0].step if reports and reports[0].kind == ReportKind.PROGRESS else None
        if checkpoint_step is not None and logged is not None and logged > checkpoint_step:
            os.kill(proc.pid, signal.SIGKILL)  # no cleanup, no chance to finish anything
            break
        assert time.monotonic() < deadline
    proc.wait(timeout=60)
    assert checkpoint_step is not None, "".join(lines)
    return list(parse_reports(lines)), checkpoint_step


@pytest.mark.slow
def test_kill_minus_9_then_resume_continues_from_checkpoint(env: Env) -> None:
    """Kill the trainer right after its first checkpoint is uploaded (at the next logged step); a new attempt
    (fresh workdir, like a new pod) resumes from the newest complete checkpoint: the global step, learning-rate
    schedule and loss continue."""
    lines = pattern_lines(200)
    lr, max_steps = 3e-3, 80
    spec = {
        "model": {"uri": env.model("gpt2", lines)},
        "task": "causal-lm",
        "dataset": {"train": env.data("lines.txt", lines), "split": {"validationRatio": 0.1}},
        "method": {"type": "full"},
        "hyperparameters": {
            "maxSteps": max_steps,
            "batchSize": 8,
            "learningRate": lr,
            "blockSize": 32,
            "loggingSteps": 2,
            "scheduler": "linear",
        },
        "evaluation": {"maxSamples": 4, "maxNewTokens": 4},
        "checkpoints": {"everySteps": 10, "keep": 2},
    }
    config = env.job(spec)
    first, ckpt_step = _kill_after_first_checkpoint(env, config)
    first_losses = [(r.step or 0, r.loss or 0.0) for r in first if r.kind == ReportKind.PROGRESS]
    assert ckpt_step == 10 and first_losses
    initial_loss = first_losses[0][1]
    assert first_losses[-1][0] < max_steps  # it really was killed mid-training

    second = env.run_config(config, "attempt-2")
    assert_succeeded(second)
    training = [r for r in second.of(ReportKind.STAGE) if r.stage == "training"]
    message = training[0].message or ""
    assert message.startswith("resuming from checkpoint "), "the second attempt did not resume"
    resumed_at = int(message.rsplit(" ", 1)[-1])
    assert resumed_at >= ckpt_step and resumed_at % 10 == 0  # a complete checkpoint, never a partial one
    progress = second.of(ReportKind.PROGRESS)
    assert progress[0].step == resumed_at + 2  # the global step continues (loggingSteps 2)
    assert progress[-1].step == max_steps
    assert second.of(ReportKind.OUTPUT)[0].step == max_steps
    # The linear schedule continues where it was, not from the top.
    for r in progress:
        step = r.step or 0
        assert r.learning_rate == pytest.approx(lr * (max_steps - step + 1) / max_steps, rel=1e-6)
    # The loss continues near where it stopped instead of starting over from the untrained model's.
    loss_at_ckpt = dict(first_losses).get(resumed_at, first_losses[-1][1])
    resumed_loss = progress[0].loss
    assert resumed_loss is not None
    assert resumed_loss < initial_loss - 0.5 * (initial_loss - loss_at_ckpt)
    # Optimizer state, data order and RNG are restored too: steps logged by both attempts agree. Not bit for
    # bit: CPU kernels sum in thread-dependent order, and under load runs drift by a few tenths of a percent
    # (seen: 0.3%); a lost optimizer state or another data order moves the loss by far more than 1%.
    before = dict(first_losses)
    both = [(r.step, r.loss, before[r.step]) for r in progress if r.step in before]
    assert both
    assert all(a == pytest.approx(b, rel=1e-2) for _, a, b in both), both
    # The curves in the report include the steps before the kill (trainer state came with the checkpoint).
    history = env.json("report/log_history.json")
    assert min(e["step"] for e in history if "loss" in e) == 1
    assert env.json("report/metrics.json")["resumed_from_step"] == resumed_at


# ---- SIGTERM: pod deletion, eviction, drain, preemption, suspend --------------------------------------------


def _pid1_prefix() -> list[str]:
    """Run the trainer as PID 1 of a new PID namespace, as in its pod (where the kernel drops a SIGTERM that
    has no handler), when this machine allows it (root with unshare); otherwise as a plain child."""
    if (
        os.geteuid() == 0
        and subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode == 0
    ):
        return ["unshare", "--pid", "--fork", "--kill-child"]
    return []


def _trainer_pid(proc: subprocess.Popen[str], prefix: list[str]) -> int:
    """The trainer's host PID: unshare's only child when it runs under unshare, else the process itself."""
    if not prefix:
        return proc.pid
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("unshare started no child")


def _ns_pid(pid: int) -> int:
    """The PID the process has in its own (innermost) PID namespace."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise AssertionError("no NSpid")


@dataclass
class Stopped:
    run: Run
    signalled_at_step: int | None
    seconds_to_exit: float
    ns_pid: int


def _sigterm_when(env: Env, config: Path, workdir: str, when: Any) -> Stopped:
    """Start the trainer (as PID 1 where possible), send SIGTERM when ``when(report)`` first holds, and
    collect everything it printed until it exits."""
    prefix = _pid1_prefix()
    term = env.tmp / "termination-log"
    term.unlink(missing_ok=True)
    with (env.tmp / f"{workdir}.stderr").open("w") as err:
        proc = subprocess.Popen(
            [*prefix, *env.command(config, workdir)], stdout=subprocess.PIPE, stderr=err, text=True, env=env.env()
        )
    assert proc.stdout is not None
    pid = _trainer_pid(proc, prefix)
    ns_pid = _ns_pid(pid)
    lines: list[str] = []
    sent_at, step = None, None
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for line in proc.stdout:
        lines.append(line)
        if sent_at is None:
            for report in parse_reports([line]):
                if when(report):
                    os.kill(pid, signal.SIGTERM)
                    sent_at, step = time.monotonic(), report.step
        assert time.monotonic() < deadline, "".join(lines)
    rc = proc.wait(timeout=60)
    assert sent_at is not None, "".join(lines)
    seconds = time.monotonic() - sent_at
    stderr = (env.tmp / f"{workdir}.stderr").read_text()
    reports = list(parse_reports(lines))
    termination = json.loads(term.read_text()) if term.exists() else None
    return Stopped(Run(rc, "".join(lines), stderr, reports, termination), step, seconds, ns_pid)


def _output_listing(env: Env) -> dict[str, tuple[int, str]]:
    return {rel: (size, etag) for rel, size, etag in env.store._objects(parse_uri(env.out), "list")}


def assert_interrupted(stopped: Stopped) -> Report:
    from finetune_api.reports import EXIT_INTERRUPTED

    run = stopped.run
    assert run.rc == EXIT_INTERRUPTED, run.explain()
    errors = run.of(ReportKind.ERROR)
    assert [e.reason for e in errors] == ["Interrupted"], run.explain()
    assert "SIGTERM received" in (errors[0].message or "")
    assert run.reports[-1] == errors[0]  # nothing after the verdict
    assert run.termination is not None and Report.model_validate(run.termination) == errors[0]
    return errors[0]


@pytest.mark.slow
def test_sigterm_mid_training_saves_a_checkpoint_and_the_resumed_run_ends_like_an_uninterrupted_one(
    env: Env,
) -> None:
    """SIGTERM in the middle of training (the trainer as PID 1 where the machine allows): it stops at the next
    step boundary, uploads a complete checkpoint of that step, writes nothing else, exits "interrupted"; the
    next attempt resumes from that step and ends with the loss of a run that was never interrupted."""
    from finetune_trainer.checkpoints import MARKER, remote_steps

    lines = pattern_lines(200)
    max_steps, signal_at = 40, 13
    spec = {
        "model": {"uri": env.model("gpt2", lines)},
        "task": "causal-lm",
        "dataset": {"train": env.data("lines.txt", lines), "split": {"validationRatio": 0.1}},
        "method": {"type": "full"},
        "hyperparameters": {
            "maxSteps": max_steps,
            "batchSize": 8,
            "learningRate": 3e-3,
            "blockSize": 32,
            "loggingSteps": 1,
            "scheduler": "linear",
        },
        "evaluation": {"maxSamples": 4, "maxNewTokens": 4},
        "checkpoints": {"everySteps": 10, "keep": 2},
    }
    reference_out = f"s3://{env.bucket}/runs/reference"
    reference_config = env.job({**spec, "output": {"uri": reference_out}}).rename(env.tmp / "reference.yaml")
    config = env.job(spec)

    stopped = _sigterm_when(
        env, config, "attempt-1", lambda r: r.kind == ReportKind.PROGRESS and (r.step or 0) >= signal_at
    )
    first = stopped.run
    error = assert_interrupted(stopped)
    if _pid1_prefix():
        assert stopped.ns_pid == 1  # it really ran as PID 1, where an unhandled SIGTERM is ignored
    stops = [r for r in first.of(ReportKind.STAGE) if r.stage == "stopping"]
    assert len(stops) == 1, first.explain()
    stop_step = max(s for s, _ in first.losses)
    assert stopped.signalled_at_step is not None
    assert stopped.signalled_at_step <= stop_step <= stopped.signalled_at_step + 2 and stop_step < max_steps
    assert f"stopped at step {stop_step}" in (stops[0].message or "")
    assert f"checkpoint-{stop_step} is uploaded" in (error.message or "")
    # The checkpoint of that step is complete (marker written after its files) and reported; nothing newer.
    assert [r.step for r in first.of(ReportKind.CHECKPOINT)] == [10, stop_step]
    assert remote_steps(env.store, env.out) == ([10, stop_step], [])
    marker = env.json(f"checkpoints/checkpoint-{stop_step}/{MARKER}")
    assert marker["step"] == stop_step and any(f["path"] == "optimizer.pt" for f in marker["files"])
    # Nothing but checkpoints was written: no evaluation, no final model, report or manifest.
    listing = _output_listing(env)
    assert {rel.split("/")[0] for rel in listing} == {"checkpoints"}, sorted(listing)
    assert (
        not first.of(ReportKind.OUTPUT) and not [r for r in first.of(ReportKind.STAGE) if r.stage == "evaluating"][1:]
    )
    # ... and nothing after the exit either.
    time.sleep(2)
    assert _output_listing(env) == listing
    print(f"SIGTERM at step {stopped.signalled_at_step}: stopped at {stop_step}, {stopped.seconds_to_exit:.1f} s")
    assert stopped.seconds_to_exit < 60

    second = env.run_config(config, "attempt-2")
    assert_succeeded(second)
    training = [r for r in second.of(ReportKind.STAGE) if r.stage == "training"]
    assert training[0].message == f"resuming from checkpoint {stop_step}"
    assert second.losses[0][0] == stop_step + 1 and second.losses[-1][0] == max_steps

    reference = env.run_config(reference_config, "reference")
    assert_succeeded(reference)
    assert not [r for r in reference.of(ReportKind.STAGE) if r.stage == "training" and r.message]
    expected = dict(reference.losses)
    # The loss curve continues exactly where it stopped: every step after the resume, and the final loss, as
    # in the uninterrupted run (the tolerance of the kill -9 resume test: CPU kernels sum in thread-dependent
    # order; a lost optimizer/scheduler/RNG state moves the loss by far more than 1%).
    assert all(loss == pytest.approx(expected[step], rel=1e-2) for step, loss in second.losses), (
        second.losses,
        expected,
    )
    assert second.losses[-1][1] == pytest.approx(reference.losses[-1][1], rel=1e-2)
    assert [loss for _, loss in first.losses] == pytest.approx([expected[s] for s, _ in first.losses], rel=1e-2)


def test_sigterm_before_training_exits_at_once_and_writes_nothing(env: Env) -> None:
    """SIGTERM while downloading/preparing (here: right at the first stage report): nothing to save, so the
    trainer exits promptly with the interrupted code and the output stays empty."""
    lines = pattern_lines(40)
    config = env.job(
        {
            "model": {"uri": env.model("gpt2", lines)},
            "task": "causal-lm",
            "dataset": {"train": env.data("lines.txt", lines)},
            "hyperparameters": {"maxSteps": 5},
        }
    )
    stopped = _sigterm_when(env, config, "wd", lambda r: r.kind == ReportKind.STAGE)
    assert_interrupted(stopped)
    if _pid1_prefix():
        assert stopped.ns_pid == 1
    assert [r.stage for r in stopped.run.of(ReportKind.STAGE)] in (["downloading"], ["downloading", "preparing"])
    assert stopped.seconds_to_exit < 10, stopped.seconds_to_exit
    assert _output_listing(env) == {}


@pytest.mark.slow
def test_sigterm_while_evaluating_after_training_exits_at_once_without_final_outputs(env: Env) -> None:
    """SIGTERM in the evaluation after training: exit at once (interrupted), and no final model, report or
    manifest appears; only the checkpoints written during training are there."""
    from finetune_trainer.checkpoints import remote_steps

    lines = pattern_lines(60)
    config = env.job(
        {
            "model": {"uri": env.model("gpt2", lines)},
            "task": "causal-lm",
            "dataset": {"train": env.data("lines.txt", lines), "split": {"validationRatio": 0.2}},
            "hyperparameters": {"maxSteps": 6, "batchSize": 4, "blockSize": 32},
            "evaluation": {"maxSamples": 8, "maxNewTokens": 16},
            "checkpoints": {"everySteps": 3},
        }
    )
    stopped = _sigterm_when(
        env, config, "wd", lambda r: r.kind == ReportKind.STAGE and r.stage == "evaluating" and not r.message
    )
    assert_interrupted(stopped)
    assert not [r for r in stopped.run.of(ReportKind.STAGE) if r.stage in ("stopping", "uploading")]
    assert stopped.seconds_to_exit < 10, stopped.seconds_to_exit
    assert remote_steps(env.store, env.out) == ([3, 6], [])
    assert {rel.split("/")[0] for rel in _output_listing(env)} == {"checkpoints"}


def test_unusable_output_is_a_user_error_before_any_download(env: Env, capsys: Any, monkeypatch: Any) -> None:
    """An output the trainer cannot write fails at once as a user error (exit 2), not at the first checkpoint
    and not as a retry: a missing bucket, a key with '..' segments."""
    lines = pattern_lines(20)
    spec = {"model": {"uri": env.model("gpt2", lines)}, "task": "causal-lm", "dataset": {"train": "x.txt"}}
    for output, reason in (
        ("s3://no-such-bucket-out/runs/job", "NoSuchBucket"),
        (f"s3://{env.bucket}/runs/../job", "InvalidStorageKey"),
    ):
        run = env.run_in_process({**spec, "output": {"uri": output}}, capsys, monkeypatch)
        assert run.rc == 2, run.explain()
        errors = run.of(ReportKind.ERROR)
        assert len(errors) == 1 and errors[0].reason in (reason, "InvalidConfig"), run.explain()
        assert output in (errors[0].message or "")
        assert [r.stage for r in run.of(ReportKind.STAGE)] in ([], ["downloading"])  # before any download
    assert env.store.list_prefix(f"s3://{env.bucket}/runs/") == []


def test_unreachable_storage_endpoint_is_a_user_error_within_a_minute(env: Env, capsys: Any, monkeypatch: Any) -> None:
    """spec.storage.endpoint where nothing listens: exit 2 with StorageUnreachable, the endpoint named, in well
    under the 2 minutes a job may take to reach this verdict (it took 10 min 35 s with 4 retried pods)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free a moment ago: nothing listens there
    spec = {
        "model": {"uri": f"s3://{env.bucket}/models/gpt2"},
        "task": "causal-lm",
        "dataset": {"train": f"s3://{env.bucket}/data/lines.txt"},
        "storage": {"endpoint": f"http://127.0.0.1:{port}"},
    }
    start = time.monotonic()
    run = env.run_in_process(spec, capsys, monkeypatch)
    elapsed = time.monotonic() - start
    assert run.rc == 2, run.explain()
    errors = run.of(ReportKind.ERROR)
    assert [e.reason for e in errors] == ["StorageUnreachable"], run.explain()
    assert f"http://127.0.0.1:{port}" in (errors[0].message or "") and env.out in (errors[0].message or "")
    assert run.termination is not None and run.termination["reason"] == "StorageUnreachable"
    assert elapsed < 60, elapsed


def test_qlora_on_cpu_is_a_user_error(env: Env, capsys: Any, monkeypatch: Any) -> None:
    """QLoRA needs CUDA + bitsandbytes; without a GPU the trainer must fail fast with exit 2 (not retried)
    and say why, in an error report and in the termination log. (The real QLoRA path needs a GPU:
    scripts/gpu-check.sh runs it.)"""
    lines = pattern_lines(20)
    spec = {
        "model": {"uri": env.model("llama", lines)},
        "task": "causal-lm",
        "dataset": {"train": env.data("lines.txt", lines)},
        "method": {"type": "qlora"},
        "hyperparameters": {"maxSteps": 2},
    }
    run = env.run_in_process(spec, capsys, monkeypatch)

    assert run.rc == 2, run.explain()
    errors = run.of(ReportKind.ERROR)
    assert [e.reason for e in errors] == ["QLoRARequiresGPU"]
    assert "GPU" in (errors[0].message or "")
    # The error report is the termination message too, in the form the operator parses.
    assert run.termination is not None
    assert Report.model_validate(run.termination) == errors[0]
    assert not env.exists("manifest.json")


def test_missing_data_and_bad_config_are_user_errors(env: Env, capsys: Any, monkeypatch: Any) -> None:
    lines = pattern_lines(20)
    model = env.model("gpt2", lines)
    spec = {"model": {"uri": model}, "task": "causal-lm", "dataset": {"train": f"s3://{env.bucket}/nope.txt"}}
    run = env.run_in_process(spec, capsys, monkeypatch)
    assert run.rc == 2, run.explain()
    assert [e.reason for e in run.of(ReportKind.ERROR)] == ["DataNotFound"]

    spec = {"model": {"uri": model}, "task": "causal-lm", "dataset": {"train": "x.txt"}, "hyperparameters": {"lr": 1}}
    run = env.run_in_process(spec, capsys, monkeypatch)
    assert run.rc == 2, run.explain()
    assert [e.reason for e in run.of(ReportKind.ERROR)] == ["InvalidConfig"]
    assert "hyperparameters.lr" in (run.of(ReportKind.ERROR)[0].message or "")
    assert run.termination is not None and run.termination["reason"] == "InvalidConfig"


# ---- checkpoint protocol against the real S3 endpoint (fast, no training) ---------------------------------


def _fake_checkpoint(root: Path, step: int, best: str | None = None) -> Path:
    """A checkpoint dir as the Trainer writes it (content is irrelevant to the storage protocol)."""
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(2048))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "best_model_checkpoint": best}))
    return path


class RecordingStorage(Storage):
    """The real storage (S3 calls go through), recording the order of writes and deletes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, str]] = []

    def upload_file(self, path: str | Path, uri: str) -> Any:
        self.ops.append(("put", uri))
        return super().upload_file(path, uri)

    def write_text(self, uri: str, text: str, encoding: str = "utf-8") -> Any:
        self.ops.append(("put", uri))
        return super().write_text(uri, text, encoding)

    def delete_prefix(self, uri: str) -> int:
        self.ops.append(("delete", uri))
        return super().delete_prefix(uri)


def test_uploader_marks_complete_last_and_keeps_newest_and_best(env: Env) -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from finetune_trainer.checkpoints import MARKER, CheckpointUploader, remote_steps
    from finetune_trainer.reporting import Reporter

    local = env.tmp / "trainer-out"
    args = TrainingArguments(output_dir=str(local), report_to="none", use_cpu=True)
    out = io.StringIO()
    store = RecordingStorage()
    uploader = CheckpointUploader(store, env.out, 1, Reporter(stream=out), env.tmp / "staging")
    # A partial upload of step 5 left by a killed attempt (no marker): it must never count, and is cleaned up.
    env.store.write_text(f"{env.out}/checkpoints/checkpoint-5/model.safetensors", "partial")
    for step in (10, 20, 30):
        _fake_checkpoint(local, step)
        state = TrainerState(global_step=step, best_model_checkpoint=str(local / "checkpoint-10"))
        uploader.on_save(args, state, TrainerControl())
    uploader.wait()

    complete, incomplete = remote_steps(env.store, env.out)
    assert complete == [10, 30]  # keep=1: the newest, plus the best (step 10)
    assert incomplete == []  # the stale partial upload was removed
    reports = list(parse_reports(out.getvalue().splitlines()))
    assert [(r.kind, r.step) for r in reports] == [(ReportKind.CHECKPOINT, s) for s in (10, 20, 30)]
    for step in (10, 20, 30):
        prefix = f"{env.out}/checkpoints/checkpoint-{step}"
        puts = [uri for op, uri in store.ops if op == "put" and uri.startswith(prefix + "/")]
        assert puts[-1] == f"{prefix}/{MARKER}" and len(puts) == 3  # the marker after every file
    marker = json.loads(env.store.read_text(f"{env.out}/checkpoints/checkpoint-30/{MARKER}"))
    listed = {f["path"]: f["sha256"] for f in marker["files"]}
    data = env.bytes("checkpoints/checkpoint-30/model.safetensors")
    assert listed["model.safetensors"] == hashlib.sha256(data).hexdigest()


def test_a_half_deleted_checkpoint_is_never_complete(env: Env) -> None:
    from finetune_trainer.checkpoints import MARKER, delete_checkpoint, remote_steps

    path = _fake_checkpoint(env.tmp / "src", 10)
    env.store.upload_dir(path, f"{env.out}/checkpoints/checkpoint-10")
    env.store.write_text(f"{env.out}/checkpoints/checkpoint-10/{MARKER}", "{}")
    assert remote_steps(env.store, env.out) == ([10], [])

    class KilledWhileDeleting(Storage):
        def delete_prefix(self, uri: str) -> int:
            raise RuntimeError("killed")  # the pod dies before the files are gone

    with pytest.raises(RuntimeError, match="killed"):
        delete_checkpoint(KilledWhileDeleting(), env.out, 10)
    assert remote_steps(env.store, env.out) == ([], [10])  # files remain, but nobody will resume from them


def test_resume_takes_newest_complete_checkpoint_and_fetches_the_best(env: Env) -> None:
    from finetune_trainer.checkpoints import MARKER, download_latest

    old = "/old-pod/workdir/checkpoints"
    src = env.tmp / "src"
    for step in (10, 20, 30):
        path = _fake_checkpoint(src, step, best=f"{old}/checkpoint-10")
        env.store.upload_dir(path, f"{env.out}/checkpoints/checkpoint-{step}")
        if step != 30:  # 30 was being uploaded when the pod died: no marker
            env.store.write_text(f"{env.out}/checkpoints/checkpoint-{step}/{MARKER}", "{}")

    local = env.tmp / "new-pod" / "checkpoints"
    resume = download_latest(env.store, env.out, local)

    assert resume == local / "checkpoint-20"
    state = json.loads((resume / "trainer_state.json").read_text())
    # The best checkpoint is fetched too, and the state points at this pod's copy, not the dead pod's path.
    assert state["best_model_checkpoint"] == str(local / "checkpoint-10")
    assert (local / "checkpoint-10" / "model.safetensors").is_file()
    assert not (local / "checkpoint-30").exists()
    assert not (resume / MARKER).exists()
    assert download_latest(env.store, f"s3://{env.bucket}/elsewhere", env.tmp / "empty") is None


def test_resume_ignores_checkpoints_of_another_job(env: Env) -> None:
    """A new job reusing a deleted job's output.uri starts afresh; its own (and owner-less) checkpoints count."""
    from finetune_trainer.checkpoints import MARKER, download_latest

    src = env.tmp / "src"
    for step, owner in ((10, "uid-new"), (20, None), (30, "uid-old")):
        path = _fake_checkpoint(src, step)
        env.store.upload_dir(path, f"{env.out}/checkpoints/checkpoint-{step}")
        env.store.write_text(f"{env.out}/checkpoints/checkpoint-{step}/{MARKER}", json.dumps({"owner": owner}))

    assert download_latest(env.store, env.out, env.tmp / "a", owner="uid-new") == env.tmp / "a" / "checkpoint-20"
    assert download_latest(env.store, env.out, env.tmp / "b", owner="uid-old") == env.tmp / "b" / "checkpoint-30"
    assert download_latest(env.store, env.out, env.tmp / "c") == env.tmp / "c" / "checkpoint-30"
    env.store.write_text(f"{env.out}/checkpoints/checkpoint-20/{MARKER}", json.dumps({"owner": "uid-old"}))
    assert download_latest(env.store, env.out, env.tmp / "d", owner="uid-new") == env.tmp / "d" / "checkpoint-10"
