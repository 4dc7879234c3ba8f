"""Exercise the trainer's GPU-only paths on a tiny-but-not-trivial Llama and print a table.

Paths: QLoRA (4-bit NF4, double quant, bf16 compute) for causal LM and for classification, bf16 LoRA,
fp16 LoRA, full fine-tune with 8-bit AdamW, DeepSpeed ZeRO-2 on one GPU, and one process per GPU under
torchrun when more than one GPU is visible. Each path is a real ``python -m finetune_trainer --config``
run on local files (no object store or network needed); a path is ok when the trainer exits 0, emits its
output report and the training loss fell.

Columns: path, ok/fail/skip, wall seconds, tokens/s (the trainer's own last progress report), peak GPU
memory (torch allocator peak of rank 0, from the run's report/metrics.json).

    python bench/gpu_check.py [--size small|medium] [--paths a,b] [--keep DIR]

``--size small`` (and the fp32 baseline path) also runs on a CPU, to check this harness itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "api"), str(REPO / "trainer-image")]

from finetune_api.reports import ReportKind, parse_reports  # noqa: E402
from finetune_trainer.tiny_models import build_model  # noqa: E402

SIZES = {
    # ~20M parameters: big enough that 4-bit, 8-bit optimizers and bf16 matter, small enough for minutes.
    "medium": {"hidden_size": 512, "num_layers": 4, "num_heads": 8, "vocab_size": 4000, "steps": 60, "seq": 256},
    "small": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "vocab_size": 500, "steps": 12, "seq": 64},
}


@dataclass
class Result:
    path: str
    status: str
    seconds: float = 0.0
    tokens_per_second: float | None = None
    peak_gpu_bytes: int | None = None
    note: str = ""


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def make_data(root: Path, n: int = 2000) -> tuple[Path, Path]:
    rng = random.Random(0)
    colors, animals = ["red", "blue", "green", "yellow", "black"], ["cat", "dog", "bird", "fox", "horse"]
    lm, cls = [], []
    for i in range(n):
        c, a = rng.choice(colors), rng.choice(animals)
        lm.append({"question": f"What color is the {a} on the {c} mat?", "answer": f"The {a} is {c}."})
        label = "positive" if i % 2 else "negative"
        word = rng.choice(["great", "excellent", "good"] if label == "positive" else ["awful", "poor", "bad"])
        cls.append({"text": f"the {c} {a} story was {word} overall", "label": label})
    paths = root / "instruct.jsonl", root / "reviews.jsonl"
    for path, rows in zip(paths, (lm, cls), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def paths_for(size: dict[str, Any], data: tuple[Path, Path], model: Path, n_gpus: int) -> dict[str, dict[str, Any]]:
    """FineTuneJob specs per path (without output), keyed by path name."""
    instruct = {
        "model": {"uri": str(model)},
        "task": "instruction",
        "dataset": {
            "train": str(data[0]),
            "template": {"prompt": "Question: {question}\nAnswer: ", "response": "{answer}"},
            "split": {"validationRatio": 0.05},
        },
        "hyperparameters": {
            "maxSteps": size["steps"],
            "batchSize": 16,
            "maxSeqLength": size["seq"],
            "loggingSteps": 5,
            "learningRate": 1e-3,
        },
        "evaluation": {"maxSamples": 16, "maxNewTokens": 16},
        "checkpoints": {"everySteps": size["steps"]},
    }

    def variant(**over: Any) -> dict[str, Any]:
        spec = json.loads(json.dumps(instruct))
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(spec.get(key), dict):
                spec[key].update(value)
            else:
                spec[key] = value
        return spec

    qlora = {
        "type": "qlora",
        "rank": 16,
        "alpha": 32,
        "quantization": {"quantType": "nf4", "doubleQuant": True, "computeDtype": "bf16"},
    }
    out = {
        "lora-fp32-baseline": variant(method={"type": "lora"}, hyperparameters={"precision": "fp32"}),
        "lora-bf16": variant(method={"type": "lora"}, hyperparameters={"precision": "bf16"}),
        "lora-fp16": variant(method={"type": "lora"}, hyperparameters={"precision": "fp16"}),
        "full-bf16-adamw-8bit": variant(
            method={"type": "full"},
            hyperparameters={"precision": "bf16", "optimizer": "adamw-8bit", "learningRate": 3e-4},
        ),
        "qlora-4bit-causal": variant(
            method=qlora, hyperparameters={"precision": "bf16", "gradientCheckpointing": True}
        ),
        "qlora-4bit-classification": {
            "model": {"uri": str(model)},
            "task": "classification",
            "dataset": {"train": str(data[1]), "split": {"validationRatio": 0.1, "strategy": "stratified"}},
            "method": qlora,
            "hyperparameters": {
                "maxSteps": size["steps"],
                "batchSize": 16,
                "precision": "bf16",
                "loggingSteps": 5,
                "maxSeqLength": size["seq"],
                "learningRate": 1e-3,
            },
            "checkpoints": {"everySteps": size["steps"]},
        },
        "deepspeed-zero2-bf16": variant(
            method={"type": "full"}, deepspeed={"stage": 2}, hyperparameters={"precision": "bf16", "learningRate": 3e-4}
        ),
    }
    if n_gpus > 1:
        out[f"torchrun-{n_gpus}gpu-lora-bf16"] = variant(method={"type": "lora"}, hyperparameters={"precision": "bf16"})
    return out


def needs(path: str) -> tuple[bool, bool]:
    """(needs CUDA, needs bitsandbytes)."""
    return path != "lora-fp32-baseline", "qlora" in path or "8bit" in path


def run_path(name: str, spec: dict[str, Any], root: Path, n_gpus: int) -> Result:
    out_dir = root / "out" / name
    spec = {**spec, "output": {"uri": str(out_dir)}}
    config = root / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}
        )
    )
    env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(root / f"{name}.termination")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "api"), str(REPO / "trainer-image"), env.get("PYTHONPATH", "")])
    if not name.startswith("torchrun") and n_gpus > 1:
        env["CUDA_VISIBLE_DEVICES"] = "0"  # single-GPU paths must not fan out to every GPU
    cmd = [sys.executable, "-m", "finetune_trainer", "--config", str(config), "--workdir", str(root / "wd" / name)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    seconds = time.monotonic() - start
    (root / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    reports = list(parse_reports(proc.stdout.splitlines()))
    progress = [r for r in reports if r.kind == ReportKind.PROGRESS and r.loss is not None]
    errors = [r for r in reports if r.kind == ReportKind.ERROR]
    tps = next((r.tokens_per_second for r in reversed(progress) if r.tokens_per_second), None)
    peak = None
    metrics_file = out_dir / "report" / "metrics.json"
    if metrics_file.is_file():
        peak = json.loads(metrics_file.read_text()).get("peak_memory_bytes", {}).get("gpu_peak_allocated")
    fell = (
        len(progress) >= 2
        and progress[-1].loss is not None
        and progress[0].loss is not None
        and (progress[-1].loss < progress[0].loss)
    )
    ok = proc.returncode == 0 and any(r.kind == ReportKind.OUTPUT for r in reports) and fell
    if ok:
        note = f"loss {progress[0].loss:.3f} -> {progress[-1].loss:.3f}"
    elif errors:
        note = f"{errors[-1].reason}: {errors[-1].message}"[:160]
    else:
        note = f"exit {proc.returncode}; see {root / (name + '.log')}"
    return Result(name, "ok" if ok else "fail", seconds, tps, peak, note)


def table(results: list[Result]) -> str:
    rows = [("path", "status", "seconds", "tokens/s", "peak GPU MiB", "note")]
    for r in results:
        rows.append(
            (
                r.path,
                r.status,
                f"{r.seconds:.1f}",
                f"{r.tokens_per_second:.0f}" if r.tokens_per_second else "-",
                f"{r.peak_gpu_bytes / 2**20:.0f}" if r.peak_gpu_bytes else "-",
                r.note,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:5], widths, strict=True)) + "  " + row[5] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--paths", help="Comma-separated subset of paths to run (default: all).")
    parser.add_argument("--keep", help="Work directory to keep (logs, outputs); default: a temporary one.")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    n_gpus, bnb = gpu_count(), has_bitsandbytes()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    data = make_data(root)
    corpus = [line for p in data for line in p.read_text().splitlines()][:4000]
    model = build_model(
        "llama",
        root / "llama",
        corpus,
        hidden_size=size["hidden_size"],
        num_layers=size["num_layers"],
        num_heads=size["num_heads"],
        vocab_size=size["vocab_size"],
        max_positions=1024,
    )
    specs = paths_for(size, data, model, n_gpus)
    wanted = args.paths.split(",") if args.paths else list(specs)
    print(f"GPUs: {n_gpus}, bitsandbytes: {bnb}, model: llama {size}, work dir: {root}", flush=True)
    results = []
    for name in wanted:
        if name not in specs:
            results.append(Result(name, "skip", note="unknown path (or needs more than one GPU)"))
            continue
        cuda, needs_bnb = needs(name)
        if cuda and n_gpus == 0:
            results.append(Result(name, "skip", note="no CUDA GPU"))
        elif needs_bnb and not bnb:
            results.append(Result(name, "fail", note="bitsandbytes is not installed"))
        else:
            results.append(run_path(name, specs[name], root, n_gpus))
        r = results[-1]
        print(f"  {r.path}: {r.status} ({r.seconds:.1f}s) {r.note}", flush=True)
    print()
    print(table(results))
    return 0 if all(r.status != "fail" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
