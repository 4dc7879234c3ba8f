"""GPU throughput, model FLOPs utilisation and the planner's memory estimate against the measured peak
(docs/benchmarks.md, "GPU"). Needs a CUDA GPU for its real rows; `--size tiny` runs the same harness on a CPU.

    python bench/gpu_bench.py [--size 1b|tiny] [--steps 30] [--gpu-type h100] [--docs docs/benchmarks.md]

What it runs: a Llama-architecture model built from a config with random weights (`--size 1b`: hidden 2048,
16 layers, 16 heads, vocab 32000, about 1.1 B parameters; nothing is downloaded), trained by the product's own
trainer (`python -m finetune_trainer --config`, as bench/gpu_check.py runs it) as causal-lm with packing into
blocks of `--seq` tokens, in bf16 (fp32 on a CPU): full fine-tuning, then LoRA (rank 16 on every projection), the
same data, steps and batch. Per row:

* tokens/s: the trainer's own last progress report (every token of a packed block is real);
* MFU = tokens/s x model FLOPs per token / (GPUs x the GPU's dense bf16 peak), with model FLOPs per token from
  `finetune_api.plan.flops_per_token` (full: 6 x matmul parameters + the attention's 12 x layers x seq x heads
  x head_dim; LoRA: the frozen weights' backward skips their weight gradients, see docs/planner.md), peak from
  `finetune_api.plan.GPU_CATALOG` (`--gpu-type`, else guessed from the device name);
* peak memory: the torch allocator's peak on rank 0 (the trainer's report/metrics.json) against the planner's
  estimate for the same job without its fixed overhead term (CUDA context, allocator slack), which the
  allocator does not see.

Targets (issue 10): full bf16 >= 45% MFU on an H100/H200; LoRA >= 1.5x full fine-tuning's tokens/s; the memory
estimate within 15% of the measured peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "api"), str(REPO / "trainer-image"), str(REPO / "bench")]

from benchkit import Row, machine, markdown_table, text_table, write_section  # noqa: E402
from gpu_check import gpu_count, make_data, run_path  # noqa: E402

from finetune_api import plan  # noqa: E402
from finetune_api.resolve import resolve_spec  # noqa: E402
from finetune_api.spec import FineTuneJobSpec  # noqa: E402
from finetune_trainer.tiny_models import build_model  # noqa: E402

SIZES: dict[str, dict[str, Any]] = {
    "1b": {"hidden_size": 2048, "num_layers": 16, "num_heads": 16, "vocab_size": 32000, "seq": 2048, "batch": 4},
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "vocab_size": 500, "seq": 128, "batch": 4},
}
LORA = {"type": "lora", "rank": 16, "alpha": 32, "targetModules": [
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}  # fmt: skip


def device_gpu_type() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0).lower()
    for key in ("h200", "h100", "a100", "l40s", "l4", "a10g", "t4", "v100"):
        if key in name:
            if key == "a100":
                return "a100-80gb" if torch.cuda.get_device_properties(0).total_memory > 50 * 2**30 else "a100-40gb"
            if key == "v100":
                return "v100-32gb" if torch.cuda.get_device_properties(0).total_memory > 20 * 2**30 else "v100-16gb"
            return key
    return None


def spec_for(model: Path, text: Path, size: dict[str, Any], steps: int, method: dict[str, Any], precision: str):
    return {
        "model": {"uri": str(model)},
        "task": "causal-lm",
        "dataset": {"train": str(text), "split": {"validationRatio": 0.01}},
        "method": method,
        "hyperparameters": {
            "maxSteps": steps,
            "batchSize": size["batch"],
            "maxSeqLength": size["seq"],
            "blockSize": size["seq"],
            "packing": True,
            "precision": precision,
            "loggingSteps": max(1, steps // 5),
            "learningRate": 1e-4,
        },
        "evaluation": {"maxSamples": 2, "maxNewTokens": 4},
        "checkpoints": {"everySteps": steps},
        "resources": {"gpus": 1 if precision != "fp32" else 0},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--gpu-type", help="GPU catalog name for the peak (default: from the device name)")
    parser.add_argument("--keep", help="Work directory to keep (default: a temporary one)")
    parser.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"), help="'' = do not write")
    args = parser.parse_args(argv)
    size, gpus = SIZES[args.size], gpu_count()
    gpu_name = args.gpu_type or device_gpu_type() or ("cpu" if gpus == 0 else "h100")
    gpu = plan.gpu_type(gpu_name)
    precision = "bf16" if gpus else "fp32"
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    qa, _ = make_data(root, n=20000)
    lines = [json.loads(line) for line in qa.read_text().splitlines()]
    text = root / "corpus.txt"
    text.write_text("".join(f"{r['question']} {r['answer']}\n" for r in lines))
    start = time.monotonic()
    model = build_model(
        "llama", root / "model", text.read_text().splitlines()[:4000], hidden_size=size["hidden_size"],
        num_layers=size["num_layers"], num_heads=size["num_heads"], vocab_size=size["vocab_size"],
        max_positions=size["seq"],
    )  # fmt: skip
    print(f"model built in {time.monotonic() - start:.0f}s; GPUs: {gpus} ({gpu_name}); work dir {root}", flush=True)
    shape = plan.model_shape(json.loads((model / "config.json").read_text()))
    rows: list[Row] = []
    speeds: dict[str, float] = {}
    for label, method in (("full", {"type": "full"}), ("lora", LORA)):
        raw = spec_for(model, text, size, args.steps, method, precision)
        result = run_path(f"{label}-{precision}", raw, root, gpus)
        spec = resolve_spec(FineTuneJobSpec.model_validate({**raw, "output": {"uri": str(root / "x")}})).spec
        what = f"{label} {precision}, {shape.parameters / 1e9:.2f} B params, batch {size['batch']} x {size['seq']}"
        if result.status != "ok" or not result.tokens_per_second:
            rows.append(Row("gpu", what, "", f"failed: {result.note}", False))
            continue
        tps = result.tokens_per_second
        speeds[label] = tps
        flops = plan.flops_per_token(spec, shape, size["seq"])
        peak = gpu.peak_tflops_bf16 if precision == "bf16" else gpu.peak_tflops_fp32
        mfu = tps * flops / (max(1, gpus) * peak * 1e12)
        target = ">= 45% (H100/H200)" if label == "full" and gpu_name in ("h100", "h200") else ""
        ok = mfu >= 0.45 if target else None
        rows.append(Row("gpu", f"{what}: tokens/s, MFU", target, f"{tps:,.0f} tok/s, MFU {mfu:.1%}", ok))
        estimate = plan.memory_bytes(spec, shape, gpu, max(1, gpus))
        predicted = estimate["total"] - estimate["overhead"]
        if result.peak_gpu_bytes:
            error = predicted / result.peak_gpu_bytes - 1
            rows.append(
                Row(
                    "gpu",
                    f"{what}: planner memory (no overhead) vs allocator peak",
                    "within 15%",
                    f"{predicted / 2**30:.2f} vs {result.peak_gpu_bytes / 2**30:.2f} GiB ({error:+.1%})",
                    abs(error) <= 0.15,
                )
            )
    if "full" in speeds and "lora" in speeds:
        ratio = speeds["lora"] / speeds["full"]
        rows.append(Row("gpu", "LoRA vs full tokens/s", ">= 1.5x", f"{ratio:.2f}x", ratio >= 1.5))
    print(text_table(rows))
    if args.docs and gpus:
        date = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        import torch

        device = f"{gpus} x {torch.cuda.get_device_name(0)}; {machine()}"
        command = f"python bench/gpu_bench.py --size {args.size} --steps {args.steps}"
        body = "Recorded on a GPU machine. Definitions: bench/gpu_bench.py.\n\n" + markdown_table(
            rows, date, device, command
        )
        write_section(Path(args.docs), "bench-gpu", body, "GPU throughput and MFU (`python bench/gpu_bench.py`)")
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
