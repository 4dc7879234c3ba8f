"""`finetune plan JOB.yaml`: the preflight planner on this machine, before a job is submitted.

It runs the trainer image's preflight (``finetune_trainer.preflight``) in this process: the model's config.json
and tokenizer files (never its weights) and the dataset are fetched with the job's storage settings and the usual
AWS_* environment, the data is prepared exactly as the trainer will, and ``finetune_api.plan`` sizes the job.
Exit codes: 0 it fits, 1 it does not fit (the fixes are printed), 2 the job, its data or its model is invalid.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, cast

from finetune_cli.local import ReportStream
from finetune_cli.render import duration, number

if TYPE_CHECKING:
    from finetune_api.plan import DataStats, Estimate
    from finetune_trainer.preflight import Preflight

EXIT_FITS, EXIT_TOO_LARGE, EXIT_INVALID = 0, 1, 2
GiB = "GiB"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="FineTuneJob YAML file")
    parser.add_argument("--gpu-type", help="GPU model to size for (h100, a100-80gb, l4, ...). Default: the job's.")
    parser.add_argument("--gpus", type=int, help="GPUs per pod. Default: the job's, else 1 with --gpu-type, else 0.")
    parser.add_argument("--json", action="store_true", help="Print the estimate and the data statistics as JSON.")


def _count(value: float) -> str:
    """12,345 below a million; 6.74 B, 12.3 M above."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:,.0f}"


def _gib(value: float) -> str:
    return f"{value:.1f} {GiB}"


def plan_text(result: Preflight) -> str:
    """The estimate and the data statistics as a readable table."""
    lines = [f"Model          {result.model_type}"]
    est = result.estimate
    if est is not None:
        share = 100 * est.trainable_parameters / est.parameters if est.parameters else 0.0
        lines[0] += (
            f", {_count(est.parameters)} parameters, {_count(est.trainable_parameters)} trainable ({share:.3g}%)"
        )
        lines += _memory_lines(est)
    lines += _data_lines(result.data)
    if est is not None:
        lines += _compute_lines(est)
        lines.append(f"Summary        {est.summary}")
    else:
        lines.append(f"Estimate       none: {result.problem}")
    return "\n".join(lines)


def _memory_lines(est: Estimate) -> list[str]:
    hardware = "CPU" if est.gpus == 0 else f"{est.gpus} x {est.gpu_type}"
    mem = est.memory
    verdict = "fits" if est.fits else "DOES NOT FIT"
    lines = [
        f"Hardware       {hardware}, {_gib(est.gpu_memory_gib)} each",
        "Memory per GPU" if est.gpus else "Memory (CPU job)",
        f"  weights      {_gib(mem.weights_gib):>10}",
        f"  gradients    {_gib(mem.gradients_gib):>10}",
        f"  optimizer    {_gib(mem.optimizer_gib):>10}",
        f"  activations  {_gib(mem.activations_gib):>10}",
        f"  overhead     {_gib(mem.overhead_gib):>10}",
        f"  total        {_gib(mem.total_gib):>10} of {_gib(est.gpu_memory_gib)}: {verdict}",
    ]
    if not est.fits:
        lines.append("Fixes (cheapest first)")
        lines += [f"  - {fix}" for fix in est.fixes] or ["  - none found: request GPUs with more memory"]
    return lines


def _data_lines(data: DataStats) -> list[str]:
    lines = [
        f"Dataset        {data.samples:,} samples, {data.tokens:,} tokens per epoch",
        f"  length       mean {number(data.mean_length)}, p50 {data.p50_length:,}, p95 {data.p95_length:,}, "
        f"max {data.max_length:,} tokens; {data.truncated:,} truncated at maxSeqLength",
    ]
    if data.labels is not None:
        shown = ", ".join(data.labels[:20]) + (f", ... ({len(data.labels)} labels)" if len(data.labels) > 20 else "")
        lines.append(f"  labels       {shown}")
    return lines


def _compute_lines(est: Estimate) -> list[str]:
    steps = f"{est.steps:,} steps" if est.steps is not None else "steps unknown"
    lines = [
        f"Training       {steps}, {est.tokens_per_step:,} tokens per step",
        f"Compute        {est.flops_per_token:.3g} FLOPs per token"
        + (f", {est.total_flops:.3g} in total" if est.total_flops is not None else ""),
    ]
    if est.hours is not None:
        gpu_hours = f", {est.gpu_hours:.3g} GPU-hours" if est.gpu_hours is not None else ""
        wall = f"{duration(est.hours * 3600)} ({est.hours:.3g} hours)"
        lines.append(f"Time           {wall}{gpu_hours} at {est.utilisation:.0%} utilisation")
    return lines


def plan_json(result: Preflight) -> str:
    return json.dumps(
        {
            "estimate": result.estimate.dump() if result.estimate is not None else None,
            "data": result.data.dump(),
            "modelType": result.model_type,
            "problem": result.problem,
        },
        indent=2,
    )


def cmd_plan(args: argparse.Namespace, out: TextIO) -> int:
    try:
        from finetune_api.plan import PlanError, gpu_type
        from finetune_trainer.config import UserError, load_job
        from finetune_trainer.preflight import run_preflight
        from finetune_trainer.reporting import Reporter
        from finetune_trainer.storage import StorageUserError
    except ImportError as exc:
        print(f"error: the trainer is not installed ({exc}): pip install 'finetune-platform[trainer]'", file=out)
        return EXIT_INVALID
    if args.gpus is not None and args.gpus < 0:
        print("error: --gpus must be 0 or more", file=out)
        return EXIT_INVALID
    if args.gpu_type:
        try:
            gpu_type(args.gpu_type)
        except PlanError as exc:
            print(f"error: --gpu-type: {exc}", file=out)
            return EXIT_INVALID
    progress = ReportStream(sys.stderr, live=False)  # stage lines on stderr: stdout holds the table or JSON
    reporter = Reporter(stream=cast(TextIO, progress))
    try:
        with tempfile.TemporaryDirectory(prefix="finetune-plan-") as tmp:
            result = run_preflight(load_job(args.file), reporter, Path(tmp), args.gpu_type, args.gpus)
    except UserError as exc:
        print(f"error ({exc.reason}): {exc.message}", file=out)
        return EXIT_INVALID
    except StorageUserError as exc:
        print(f"error ({exc.reason}): {exc}", file=out)
        return EXIT_INVALID
    finally:
        progress.finish()
    print(plan_json(result) if args.json else plan_text(result), file=out)
    if result.estimate is None:
        return EXIT_INVALID
    return EXIT_FITS if result.estimate.fits else EXIT_TOO_LARGE
