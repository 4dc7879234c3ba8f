"""Process topology, precision and DeepSpeed: how the training processes are laid out.

* More than one visible GPU and not yet under a launcher: run ``torch.distributed.run`` with one process
  per GPU and wait for it (``launch_per_gpu``). Only rank 0 reports and uploads.
* DeepSpeed always initialises ``torch.distributed``; a single process (CPU or one GPU) needs the rendezvous
  variables a launcher would have set (``ensure_single_process_env``).
* The DeepSpeed JSON is generated from ``spec.deepspeed``; batch sizes, clipping and precision are "auto"
  so the HF Trainer fills them from the TrainingArguments and the two can never disagree.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from finetune_api.spec import DeepSpeedSpec, Precision
from finetune_trainer.config import UserError

EXIT_CODE_FILE_ENV = "FINETUNE_EXIT_CODE_FILE"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_single_process_env() -> None:
    """The env a launcher would set, for DeepSpeed in one process (it initialises torch.distributed)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)


def resolve_precision(requested: Precision | str) -> str:
    """fp32/fp16/bf16 for this machine. auto: bf16 where the GPU supports it, else fp32 (never fp16: it
    needs loss scaling and silently diverges on some models; users must ask for it)."""
    requested = Precision(requested)
    cuda = torch.cuda.is_available()
    if requested == Precision.AUTO:
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if requested == Precision.FP16 and not cuda:
        raise UserError("PrecisionUnsupported", "hyperparameters.precision fp16 needs a CUDA GPU; use fp32 or auto")
    if requested == Precision.BF16 and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("PrecisionUnsupported", "this GPU does not support bf16; use fp16, fp32 or auto")
    return str(requested)


def deepspeed_config(ds: DeepSpeedSpec) -> dict[str, Any]:
    """A ZeRO config for TrainingArguments(deepspeed=...). No optimizer/scheduler blocks: the Trainer's own
    (from hyperparameters) are used, so switching DeepSpeed on does not change the optimisation."""
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "contiguous_gradients": True,
        "overlap_comm": torch.cuda.is_available(),  # overlapping needs CUDA streams
        "reduce_bucket_size": "auto",
    }
    if ds.stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                # Checkpoints and the final model must hold real weights, not ZeRO-3 shards.
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        # The Trainer's optimizer (adamw_torch, adafactor, ...) is a "client optimizer" to DeepSpeed.
        "zero_allow_untested_optimizer": True,
    }


def should_launch_per_gpu() -> bool:
    """True in the parent process of a multi-GPU pod: not yet under a launcher and more than one GPU."""
    if "LOCAL_RANK" in os.environ or "RANK" in os.environ:
        return False
    return torch.cuda.is_available() and torch.cuda.device_count() > 1


def launch_per_gpu(argv: Sequence[str], workdir: Path) -> int:
    """Run this trainer under torch.distributed.run, one process per GPU, and return its exit code.

    torchrun turns any child failure into its own exit code 1, which would make a user error (exit 2,
    non-retryable) retryable; rank 0 therefore writes its intended exit code to a file we read back.
    SIGTERM (pod deletion, preemption) is forwarded so the children can stop cleanly.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    code_file = workdir / "exit-code"
    code_file.unlink(missing_ok=True)
    n = torch.cuda.device_count()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n}",
        "-m",
        "finetune_trainer",
        *argv,
    ]
    env = {**os.environ, EXIT_CODE_FILE_ENV: str(code_file)}
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum: int, _frame: FrameType | None) -> None:
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = proc.wait()
    if code_file.is_file():
        try:
            return int(code_file.read_text().strip())
        except ValueError:
            pass
    return 0 if rc == 0 else 1


def record_exit_code(code: int) -> None:
    """Rank 0 tells a launching parent (launch_per_gpu) which exit code it meant."""
    path = os.environ.get(EXIT_CODE_FILE_ENV)
    if path and is_main_process():
        with contextlib.suppress(OSError):
            Path(path).write_text(str(code))
