#!/usr/bin/env bash
# Check the trainer's GPU-only paths on a real GPU machine: QLoRA 4-bit (causal LM and classification),
# bf16 and fp16 LoRA, full fine-tune with 8-bit AdamW, DeepSpeed ZeRO-2, and torchrun with one process per
# GPU when more than one GPU is visible. Prints a table: path, ok/fail/skip, seconds, tokens/s, peak GPU MiB.
#
#   scripts/gpu-check.sh [--size small|medium] [--paths lora-bf16,qlora-4bit-causal] [--keep DIR]
#
# Needs the trainer's Python dependencies plus bitsandbytes (QLoRA, 8-bit AdamW); uses ./.venv when present,
# else $PYTHON or python3. Nothing is downloaded: the model is a randomly initialised Llama built locally.
# Exit status 0 when no path failed (skipped paths do not count as failures).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT/api:$ROOT/trainer-image${PYTHONPATH:+:$PYTHONPATH}"

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
else
  echo "nvidia-smi not found: GPU paths will be skipped" >&2
fi
"$PYTHON" - <<'EOF'
import importlib
for name in ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:13s} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # a missing optional library is reported, the check goes on
        print(f"{name:13s} MISSING ({type(exc).__name__}: {exc})")
import torch
print(f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}, "
      f"bf16: {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}")
EOF
exec "$PYTHON" "$ROOT/bench/gpu_check.py" "$@"
