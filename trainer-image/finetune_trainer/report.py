"""The report directory uploaded to ``{output.uri}/report/``, and the cost estimates it contains.

Files: metrics.json (everything measured), log_history.json (the Trainer's raw log: the curves' data),
loss.png and learning_rate.png, samples.json + samples.md (base vs tuned outputs side by side) and, for
classification, predictions.jsonl (every validation prediction, so the metrics can be recomputed).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.uint8: 1, torch.int8: 1}
# Optimizer state bytes per trainable parameter (fp32 moments): AdamW keeps 2 moments, 8-bit Adam 2 bytes.
OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8.0, "adamw-8bit": 2.0, "sgd": 0.0}


def flops_estimate(params: int, tokens: int) -> float:
    """Training FLOPs ~ 6 * N * D (forward 2ND + backward 4ND, Kaplan et al. 2020) for N parameters, D tokens."""
    return 6.0 * params * tokens


def memory_estimate(model: torch.nn.Module, optimizer: str) -> dict[str, int]:
    """Bytes for weights, gradients and optimizer state, from the actual parameters (activations excluded).

    Adafactor factorises the second moment of a (rows x cols) matrix into rows + cols values; for the
    others a fixed number of bytes per trainable parameter.
    """
    weights = grads = opt = 0
    for p in model.parameters():
        n = p.numel()
        weights += n * BYTES.get(p.dtype, 4)
        if not p.requires_grad:
            continue
        grads += n * BYTES.get(p.dtype, 4)
        if optimizer == "adafactor":
            opt += 4 * (sum(p.shape[-2:]) if p.dim() >= 2 else n)
        else:
            opt += int(n * OPTIMIZER_BYTES_PER_PARAM.get(optimizer, 8.0))
    return {"weights": weights, "gradients": grads, "optimizer": opt, "total": weights + grads + opt}


def peak_memory() -> dict[str, int]:
    """Measured peaks: GPU (allocator) when CUDA is used, and the process's max resident set size."""
    out: dict[str, int] = {}
    if torch.cuda.is_available():
        out["gpu_peak_allocated"] = int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["cpu_peak_rss"] = int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB
    return out


def curves(log_history: Sequence[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {"loss": [], "eval_loss": [], "learning_rate": []}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for key in out:
            value = entry.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                out[key].append((int(step), float(value)))
    return out


def plot_curves(log_history: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """loss.png (train and eval loss) and learning_rate.png; headless (Agg)."""
    os.environ.setdefault("MPLCONFIGDIR", str(out_dir.parent / ".matplotlib"))  # read-only HOME in pods
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(log_history)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        if data[key]:
            xs, ys = zip(*data[key], strict=True)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    if data["learning_rate"]:
        xs, ys = zip(*data["learning_rate"], strict=True)
        ax.plot(xs, ys)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "learning_rate.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "learning_rate.png")
    return written


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def samples_markdown(samples: Sequence[dict[str, Any]], title: str) -> str:
    """A side-by-side table: prompt, reference, base model, tuned model."""
    lines = [f"# {title}", "", "| # | prompt | reference | base model | tuned model |", "|---|---|---|---|---|"]
    for i, s in enumerate(samples, start=1):
        prompt = s.get("prompt") or s.get("text") or s.get("prompt_messages", "")
        lines.append(
            f"| {i} | {_cell(prompt)} | {_cell(s.get('reference', s.get('label', '')))} | "
            f"{_cell(s.get('base', ''))} | {_cell(s.get('tuned', ''))} |"
        )
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: Path,
    metrics: dict[str, Any],
    log_history: Sequence[dict[str, Any]],
    samples: list[dict[str, Any]],
    prompt_samples: list[dict[str, Any]],
    predictions: list[dict[str, Any]] | None = None,
) -> list[Path]:
    """Write every report file into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []

    def dump(name: str, obj: Any) -> None:
        path = out_dir / name
        path.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
        files.append(path)

    dump("metrics.json", metrics)
    dump("log_history.json", list(log_history))
    dump("samples.json", {"validation": samples, "prompts": prompt_samples})
    md = samples_markdown(samples, "Validation samples: base vs tuned")
    if prompt_samples:
        md += "\n" + samples_markdown(prompt_samples, "Sample prompts: base vs tuned")
    (out_dir / "samples.md").write_text(md, encoding="utf-8")
    files.append(out_dir / "samples.md")
    if predictions is not None:
        path = out_dir / "predictions.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in predictions), encoding="utf-8")
        files.append(path)
    files += plot_curves(log_history, out_dir)
    return files
