"""The CPU preflight (``python -m finetune_trainer.preflight``) and ``finetune plan``, through the production path:
a tiny model and data on a real S3 endpoint (moto server), a FineTuneJob YAML with s3:// URIs, the preflight as a
subprocess (its peak memory measured) or in process, and its reports and termination message checked.

The data statistics are recomputed here from the same file with the model's tokenizer; the parameter count is
the tiny model's real one (loaded here) or the published Llama-2-7B count for a config.json of that shape.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from finetune_api.reports import Report, ReportKind, parse_reports
from finetune_cli.demo import LLAMA_2_7B_CONFIG
from finetune_trainer.inputs import is_model_file
from finetune_trainer.tiny_models import build_model
from tests.trainer.test_train import MEDICAL_QA, Env, Run, _sigterm_when, assert_interrupted

PEAK_RSS_LIMIT_MIB = 1200  # the operator runs the preflight in a small CPU pod (2 GiB)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

# Llama-2-7B's config.json (published dimensions); its parameter count is 6,738,415,616.
LLAMA_7B = LLAMA_2_7B_CONFIG
LLAMA_7B_PARAMETERS = 6_738_415_616


class PreflightEnv(Env):
    """The trainer tests' harness, running the preflight instead of the trainer."""

    def command(self, config: Path, workdir: str = "wd") -> list[str]:
        return [sys.executable, "-m", "finetune_trainer.preflight", "--config", str(config), "--workdir", workdir]


@pytest.fixture
def env(s3_server: Any, tmp_path: Path) -> Env:
    return PreflightEnv(s3_server, tmp_path)


def _qa_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Questions with answers of varied length (1 to 6 repetitions), so some exceed maxSeqLength."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q, a = rng.choice(MEDICAL_QA)
        rows.append({"question": q, "answer": " ".join([a] * rng.randint(1, 6))})
    return rows


PROMPT = "### Question:\n{question}\n### Answer:\n"


def _preflight_subprocess(env: Env, config: Path, **extra: str) -> tuple[Run, int]:
    """``python -m finetune_trainer.preflight`` as the operator runs it; returns the run and its peak RSS (KiB)."""
    term = env.tmp / "termination-log"
    term.unlink(missing_ok=True)
    out, err = env.tmp / "stdout", env.tmp / "stderr"
    cmd = [sys.executable, "-m", "finetune_trainer.preflight", "--config", str(config)]
    cmd += ["--workdir", str(env.tmp / "wd")]
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env={**env.env(), **extra})
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS, not the test process's
        proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = out.read_text()
    run = Run(
        proc.returncode,
        stdout,
        err.read_text(),
        list(parse_reports(stdout.splitlines())),
        json.loads(term.read_text()) if term.exists() else None,
    )
    return run, int(usage.ru_maxrss)


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_instruction_job_is_measured_and_sized_without_downloading_weights(env: Env, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="werkzeug")  # the S3 server's request log
    rows = _qa_rows(60)
    corpus = [PROMPT.format(question=q) + a for q, a in MEDICAL_QA]
    local_model = build_model("llama", env.tmp / "models" / "llama", corpus * 20)
    model_uri = f"s3://{env.bucket}/models/llama"
    env.store.upload_dir(local_model, model_uri)
    limit = 24
    spec = {
        "model": {"uri": model_uri},
        "task": "instruction",
        "dataset": {
            "train": env.data("qa.jsonl", rows),
            "template": {"prompt": PROMPT, "response": "{answer}"},
            "split": {"validationRatio": 0},
        },
        "method": {"type": "full"},
        "hyperparameters": {"maxSeqLength": limit, "batchSize": 4, "epochs": 2},
        "resources": {"gpus": 1},
    }
    run, peak_kib = _preflight_subprocess(env, env.job(spec), FINETUNE_GPU_TYPE="a100-80gb")
    assert run.rc == 0, run.explain()
    assert not run.of(ReportKind.ERROR), run.explain()
    assert [r.stage for r in run.of(ReportKind.STAGE)] == ["downloading", "preparing", "planning"]

    # The data's numbers, recomputed from the same rows with the model's tokenizer: prompt + response + EOS.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(local_model)
    lengths = [
        len(tok(PROMPT.format(question=r["question"]))["input_ids"])
        + len(tok(r["answer"], add_special_tokens=False)["input_ids"])
        + 1
        for r in rows
    ]
    assert max(lengths) > limit >= min(lengths)  # the data exercises truncation
    plans = run.of(ReportKind.PLAN)
    assert len(plans) == 1 and plans[0] is run.reports[-1], run.explain()
    plan = plans[0]
    stats = plan.metrics
    assert stats["samples"] == len(rows)
    assert stats["tokens"] == sum(min(n, limit) for n in lengths)
    assert stats["truncated"] == sum(n > limit for n in lengths)
    assert stats["max_length"] == max(lengths)
    assert stats["mean_length"] == pytest.approx(sum(lengths) / len(lengths), abs=0.01)
    assert stats["p50_length"] == np.percentile(lengths, 50, method="inverted_cdf")
    assert stats["p95_length"] == np.percentile(lengths, 95, method="inverted_cdf")

    # The estimate: the tiny model's real parameter count, 1 x a100-80gb, this dataset's tokens.
    est = plan.estimate
    assert est is not None
    model: Any = AutoModelForCausalLM.from_pretrained(local_model)
    assert est.parameters == sum(p.numel() for p in model.parameters())
    assert est.trainable_parameters == est.parameters  # full fine-tuning
    assert (est.gpu_type, est.gpus, est.fits) == ("a100-80gb", 1, True)
    assert est.dataset_tokens == stats["tokens"]
    assert plan.message == est.summary

    # The verdict is the termination message too, in the form the operator parses.
    assert run.termination is not None
    assert Report.model_validate(run.termination) == plan
    assert len(json.dumps(run.termination)) < 4096

    # Only config and tokenizer files were fetched: no weights anywhere on this side.
    fetched = _files_under(env.tmp / "cache") + _files_under(env.tmp / "wd")
    assert not [p for p in fetched if p.name.endswith(WEIGHT_SUFFIXES)], fetched
    model_files = {p.name for p in fetched if p.parent.parent.name == "model-files"}
    assert model_files == {p.name for p in local_model.iterdir() if is_model_file(p.name)}
    assert "config.json" in model_files and "tokenizer.json" in model_files
    assert "model.safetensors" in {p.name for p in local_model.iterdir()}  # it was there to be fetched
    gets = [r.getMessage() for r in caplog.records if r.name == "werkzeug" and '"GET ' in r.getMessage()]
    assert any("/models/llama/config.json " in line for line in gets), gets
    assert not any("/models/llama/model.safetensors " in line for line in gets), gets
    print(f"preflight peak RSS: {peak_kib / 1024:.0f} MiB")
    assert peak_kib / 1024 < PEAK_RSS_LIMIT_MIB


def _in_process(env: Env, spec: dict[str, Any], capsys: Any, monkeypatch: Any) -> Run:
    from finetune_trainer.preflight import main

    for key, value in env.env().items():
        if key.startswith("FINETUNE_"):
            monkeypatch.setenv(key, value)
    term = env.tmp / "termination-log"
    term.unlink(missing_ok=True)
    capsys.readouterr()
    rc = main(["--config", str(env.job(spec)), "--workdir", str(env.tmp / "wd")])
    out = capsys.readouterr()
    termination = json.loads(term.read_text()) if term.exists() else None
    return Run(rc, out.out, out.err, list(parse_reports(out.out.splitlines())), termination)


def _assert_user_error(run: Run, reason: str, *words: str) -> None:
    assert run.rc == 2, run.explain()
    assert not run.of(ReportKind.PLAN), run.explain()  # no estimate: nothing is sized, no GPU is asked for
    error = run.reports[-1]
    assert (error.kind, error.reason, error.final) == (ReportKind.ERROR, reason, True), run.explain()
    for word in words:
        assert word in (error.message or ""), error.message
    assert run.termination is not None and Report.model_validate(run.termination) == error


def test_bad_template_labels_and_missing_data_are_user_errors(env: Env, capsys: Any, monkeypatch: Any) -> None:
    corpus = [f"{q} {a}" for q, a in MEDICAL_QA] * 20
    model = env.model("llama", corpus)
    rows = _qa_rows(10)
    spec = {
        "model": {"uri": model},
        "task": "instruction",
        "dataset": {"train": env.data("qa.jsonl", rows), "template": {"prompt": "{questoin}", "response": "{answer}"}},
    }
    run = _in_process(env, spec, capsys, monkeypatch)
    _assert_user_error(run, "DataInvalid", "{questoin}", "question")

    reviews = [{"text": f"the film was {w}", "label": w} for w in ("good", "bad") * 10]
    spec = {
        "model": {"uri": model},
        "task": "classification",
        "method": {"type": "lora"},
        "dataset": {"train": env.data("reviews.jsonl", reviews), "labels": ["positive", "negative"]},
    }
    run = _in_process(env, spec, capsys, monkeypatch)
    _assert_user_error(run, "DataInvalid", "dataset.labels", "'good'")

    spec = {"model": {"uri": model}, "task": "causal-lm", "dataset": {"train": f"s3://{env.bucket}/nope.txt"}}
    run = _in_process(env, spec, capsys, monkeypatch)
    _assert_user_error(run, "DataNotFound", "dataset.train", "nope.txt")


def test_sigterm_exits_at_once_with_the_interrupted_code(env: Env) -> None:
    corpus = [f"{q} {a}" for q, a in MEDICAL_QA] * 20
    spec = {
        "model": {"uri": env.model("llama", corpus)},
        "task": "instruction",
        "dataset": {
            "train": env.data("qa.jsonl", _qa_rows(5000)),
            "template": {"prompt": PROMPT, "response": "{answer}"},
        },
    }
    stopped = _sigterm_when(env, env.job(spec), str(env.tmp / "wd"), lambda r: r.kind == ReportKind.STAGE)
    assert_interrupted(stopped)
    assert not stopped.run.of(ReportKind.PLAN)
    assert stopped.seconds_to_exit < 10, stopped.seconds_to_exit


def test_gpu_target_defaults() -> None:
    from finetune_api.spec import FineTuneJobSpec
    from finetune_trainer.preflight import target

    def spec(**resources: Any) -> FineTuneJobSpec:
        raw = {"model": {"uri": "s3://b/m"}, "task": "causal-lm", "dataset": {"train": "s3://b/d.txt"}}
        raw["output"] = {"uri": "s3://b/o"}
        return FineTuneJobSpec.model_validate({**raw, "resources": resources})

    assert target(spec()) == ("cpu", 0)
    assert target(spec(gpus=2)) == ("h100", 2)
    assert target(spec(gpus=2, gpuType="l4")) == ("l4", 2)
    assert target(spec(gpus=2, gpuType="l4"), "a100-80gb") == ("a100-80gb", 2)
    assert target(spec(), "h200") == ("h200", 1)  # a GPU type alone means one GPU of it
    assert target(spec(gpus=4), None, 0) == ("cpu", 0)


def _big_model(env: Env) -> str:
    """A 7B Llama as config.json plus a (tiny) tokenizer, and no weights at all: the planner needs no more."""
    local = build_model("llama", env.tmp / "models" / "small", [f"{q} {a}" for q, a in MEDICAL_QA] * 20)
    uri = f"s3://{env.bucket}/models/llama-7b"
    for path in local.iterdir():
        if path.name.startswith("tokenizer") or path.name == "chat_template.jinja":
            env.store.upload_file(path, f"{uri}/{path.name}")
    env.store.write_text(f"{uri}/config.json", json.dumps(LLAMA_7B))
    return uri


def _manifest(env: Env, spec: dict[str, Any], name: str) -> Path:
    path = env.tmp / name
    job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "big"}, "spec": spec}
    path.write_text(yaml.safe_dump(job))
    return path


def _cli(*args: str) -> tuple[int, str]:
    from finetune_cli.main import main

    out = io.StringIO()
    return main(["plan", *args], out=out), out.getvalue()


def test_cli_plan_full_7b_on_a100_40gb_does_not_fit_and_lora_on_h200_does(env: Env) -> None:
    rows = _qa_rows(40)
    spec: dict[str, Any] = {
        "model": {"uri": _big_model(env)},
        "task": "instruction",
        "dataset": {"train": env.data("qa.jsonl", rows), "template": {"prompt": PROMPT, "response": "{answer}"}},
        "method": {"type": "full"},
        "hyperparameters": {"maxSeqLength": 512},
        "output": {"uri": env.out},
    }
    full = _manifest(env, spec, "full.yaml")
    rc, text = _cli(str(full), "--gpu-type", "a100-40gb", "--gpus", "1")
    assert rc == 1, text
    assert "DOES NOT FIT" in text and "a100-40gb" in text
    rc, raw = _cli(str(full), "--gpu-type", "a100-40gb", "--gpus", "1", "--json")
    assert rc == 1, raw
    result = json.loads(raw)
    est, data = result["estimate"], result["data"]
    assert est["parameters"] == LLAMA_7B_PARAMETERS
    assert est["fits"] is False and est["memory"]["totalGib"] > est["gpuMemoryGib"] == pytest.approx(40, abs=1)
    assert est["fixes"] and all(fix in text for fix in est["fixes"])  # the table prints every fix
    assert data["samples"] == len(rows) - len(rows) // 10  # the default split holds out 10% for validation
    assert data["truncated"] == 0 and data["maxLength"] < 512

    spec["method"] = {"type": "lora"}
    lora = _manifest(env, spec, "lora.yaml")
    rc, text = _cli(str(lora), "--gpu-type", "h200")
    assert rc == 0, text
    assert "1 x h200" in text and "DOES NOT FIT" not in text
    rc, raw = _cli(str(lora), "--gpu-type", "h200", "--json")
    est = json.loads(raw)["estimate"]
    assert est["fits"] is True and 0 < est["trainableParameters"] < est["parameters"] // 100


def test_cli_plan_invalid_job_exits_2(env: Env) -> None:
    spec = {
        "model": {"uri": f"s3://{env.bucket}/none"},
        "task": "instruction",
        "dataset": {"train": "x.jsonl"},
        "output": {"uri": env.out},
    }
    rc, text = _cli(str(_manifest(env, spec, "bad.yaml")))
    assert rc == 2 and "template" in text, text
    rc, text = _cli(str(_manifest(env, spec, "bad.yaml")), "--gpu-type", "tpu-v9")
    assert rc == 2 and "tpu-v9" in text, text
