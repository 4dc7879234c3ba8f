"""``python -m finetune_trainer.preflight --config FILE``: check a job's data and size it on CPU, before any GPU.

It takes the same resolved FineTuneJob YAML as the trainer, fetches the model's config.json and tokenizer files
(never its weights) and the dataset, runs the trainer's own data preparation (format, fields, template, labels,
split, tokenization), measures the data (:class:`finetune_api.plan.DataStats`) and sizes the job with
:func:`finetune_api.plan.estimate` for the GPUs it will get:

    FINETUNE_GPUS      GPUs of the whole job (every worker's). Default: spec.resources.gpus x workers, else 0
    FINETUNE_GPU_TYPE  the GPU model (a finetune_api.plan.GPU_CATALOG name). Default: spec.resources.gpuType,
                       else h100 with GPUs and cpu without

Its last report is a ``plan`` report carrying the estimate (also the termination message), and it exits 0
whether or not the job fits: the operator decides. A model whose architecture the planner cannot size gets a
``plan`` report without an estimate. Bad data, template, labels, model files or storage access: the trainer's
final ``error`` report and exit 2, exactly as the trainer would fail later. SIGTERM/SIGINT: exit 75.
Memory: the tokenizer and the tokenized dataset, no model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api.reports import EXIT_INTERRUPTED, EXIT_USER_ERROR
from finetune_trainer import interrupt

if TYPE_CHECKING:
    from finetune_api.plan import DataStats, Estimate
    from finetune_api.spec import FineTuneJobSpec
    from finetune_api.status import FineTuneJob
    from finetune_trainer.data import PreparedData
    from finetune_trainer.reporting import Reporter

GPU_TYPE_ENV, GPUS_ENV = "FINETUNE_GPU_TYPE", "FINETUNE_GPUS"
DEFAULT_GPU_TYPE = "h100"  # when GPUs are requested and neither the spec nor the platform names a model


@dataclass
class Preflight:
    """What the preflight found: the data's numbers and, when the model could be sized, the estimate."""

    data: DataStats
    model_type: str
    gpu_type: str
    gpus: int
    estimate: Estimate | None = None
    problem: str | None = None  # why there is no estimate
    fetched: list[str] = field(default_factory=list)  # model files fetched (never weights)


def target(spec: FineTuneJobSpec, gpu_type: str | None = None, gpus: int | None = None) -> tuple[str, int]:
    """(GPU type, GPUs) to size for: the given values, else the spec's, else the defaults (module doc). A GPU
    type named without a count means one GPU of it. The count is the whole job's: GPUs per pod x workers."""
    named = gpu_type or getattr(spec.resources, "gpu_type", None)
    if gpus is None and spec.resources.gpus is not None:
        gpus = spec.resources.gpus * spec.resources.workers
    if gpus is None:
        gpus = 1 if gpu_type and gpu_type != "cpu" else 0
    if gpus == 0:
        return "cpu", 0
    return named or DEFAULT_GPU_TYPE, gpus


def _env_target() -> tuple[str | None, int | None]:
    from finetune_trainer.config import UserError

    raw = os.environ.get(GPUS_ENV) or None
    try:
        gpus = int(raw) if raw is not None else None
    except ValueError:
        raise UserError("InvalidConfig", f"{GPUS_ENV}={raw!r} is not a number of GPUs") from None
    return os.environ.get(GPU_TYPE_ENV) or None, gpus


def percentile(ordered: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of an ascending sequence: the smallest value with at least q% at or below it."""
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def data_stats(spec: FineTuneJobSpec, data: PreparedData) -> DataStats:
    """The training split's numbers: per-sample lengths before truncation, tokens as the trainer feeds them."""
    from finetune_api.plan import DataStats
    from finetune_api.spec import Task

    lengths = sorted(data.train_lengths)
    hp = spec.hyperparameters
    # Packed causal-lm concatenates and cuts blocks: no sample is truncated at maxSeqLength.
    cut = not (spec.task == Task.CAUSAL_LM and hp.packing)
    return DataStats(
        samples=len(lengths),
        tokens=int(data.stats["train_tokens"]),
        mean_length=round(sum(lengths) / len(lengths), 2),
        p50_length=percentile(lengths, 50),
        p95_length=percentile(lengths, 95),
        max_length=lengths[-1],
        truncated=sum(n > hp.max_seq_length for n in lengths) if cut else 0,
        labels=data.label_names,
    )


@contextmanager
def _stage(reporter: Reporter, name: str, message: str) -> Iterator[None]:
    interrupt.check()  # a signal some library swallowed still stops before the next stage
    reporter.stage(name, message)
    yield


def run_preflight(
    job: FineTuneJob, reporter: Reporter, workdir: Path, gpu_type: str | None = None, gpus: int | None = None
) -> Preflight:
    """Fetch, prepare and size ``job``; raises the trainer's UserError for anything the user must fix."""
    from finetune_api import plan
    from finetune_api.spec import Task
    from finetune_trainer.config import UserError, architecture, resolve_job
    from finetune_trainer.data import DataError, prepare_data
    from finetune_trainer.inputs import fetch, fetch_model_files
    from finetune_trainer.modeling import load_tokenizer, model_type_of
    from finetune_trainer.storage import storage_for

    resolved = resolve_job(job.spec)
    spec = resolved.spec
    storage = storage_for(spec.storage.endpoint, spec.storage.region)
    cache = Path(os.environ.get("FINETUNE_CACHE") or workdir / "cache")
    gpu_name, count = target(spec, gpu_type, gpus)

    with _stage(reporter, "downloading", "model config and tokenizer files (no weights) and the dataset"):
        model_dir, fetched = fetch_model_files(storage, spec.model.uri, "model.uri", cache)
        tokenizer_dir = model_dir
        if spec.model.tokenizer_uri:
            tokenizer_dir, more = fetch_model_files(storage, spec.model.tokenizer_uri, "model.tokenizerUri", cache)
            fetched += more
        train = fetch(storage, spec.dataset.train, "dataset.train", "DataNotFound", cache)
        validation = (
            fetch(storage, spec.dataset.validation, "dataset.validation", "DataNotFound", cache)
            if spec.dataset.validation
            else None
        )

    with _stage(reporter, "preparing", "the trainer's data preparation, on CPU"):
        model_type = model_type_of(model_dir)
        architecture(spec, resolved.training, model_type)  # e.g. packing on an architecture that cannot
        tokenizer = load_tokenizer(tokenizer_dir, Task(spec.task))
        try:
            prepared = prepare_data(spec, tokenizer, train, validation)
        except DataError as exc:
            raise UserError("DataInvalid", str(exc)) from None
        stats = data_stats(spec, prepared)
        del prepared, tokenizer  # the tokenized data is not needed any more

    result = Preflight(stats, model_type, gpu_name, count, fetched=fetched)
    with _stage(reporter, "planning", f"{count} x {gpu_name}" if count else "CPU only"):
        config: dict[str, Any] = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        try:
            shape = plan.model_shape(config)
            result.estimate = plan.estimate(spec, shape, plan.gpu_type(gpu_name), count, stats)
        except plan.PlanError as exc:
            result.problem = f"cannot size this job: {exc}"
    return result


def plan_metrics(data: DataStats) -> dict[str, float]:
    """The dataset's numbers for the ``plan`` report's metrics."""
    values = data.model_dump(exclude={"labels"})
    return {key: float(value) for key, value in values.items()}


def report_plan(result: Preflight, reporter: Reporter) -> None:
    """The final ``plan`` report, also written as the termination message."""
    from finetune_api.reports import ReportKind
    from finetune_trainer.reporting import write_termination_log

    message = result.estimate.summary if result.estimate is not None else result.problem
    report = reporter.emit(
        ReportKind.PLAN, estimate=result.estimate, message=message, metrics=plan_metrics(result.data)
    )
    if report is not None:
        write_termination_log(report)


# ---- entry point -----------------------------------------------------------------------------------------------


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_trainer.preflight", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--config", required=True, help="FineTuneJob YAML (the operator's resolved config)")
    parser.add_argument(
        "--workdir",
        default=os.environ.get("FINETUNE_WORKDIR") or str(Path.home() / "finetune-run"),
        help="Local scratch directory (the download cache). Default: $FINETUNE_WORKDIR or ~/finetune-run.",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    previous = interrupt.install()  # first: as PID 1 an unhandled SIGTERM is ignored
    try:
        return _main(args)
    except interrupt.Interrupted:  # a signal before the preflight proper started: nothing to report
        return EXIT_INTERRUPTED
    finally:
        interrupt.restore(previous)


def _main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from finetune_trainer.__main__ import hold_after_user_error, quiet_progress_bars, run_reported
    from finetune_trainer.config import load_job
    from finetune_trainer.reporting import Reporter

    quiet_progress_bars()
    reporter = Reporter()

    def body() -> None:
        gpu_type, gpus = _env_target()
        report_plan(run_preflight(load_job(args.config), reporter, Path(args.workdir), gpu_type, gpus), reporter)

    code = run_reported(reporter, body)
    sys.stdout.flush()
    if code == EXIT_USER_ERROR:
        hold_after_user_error()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
