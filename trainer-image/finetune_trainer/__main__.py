"""``python -m finetune_trainer --config FILE``: the trainer container's entry point.

Exit codes (``finetune_api.reports``; the operator's retry policy depends on them):
    0  the model, report and manifest are uploaded
    2  a user error (bad config, bad or missing data/model, unsupported hardware request, an object store
       that cannot be reached, refuses access or lacks the bucket, an output that cannot be written): an
       ``error`` report with a reason is emitted first; retrying cannot help, so the operator does not retry
    75 interrupted by SIGTERM/SIGINT (see ``finetune_trainer.interrupt``): a checkpoint of the step it stopped
       at is uploaded when it was training; resumable, not the job's fault
    1  anything else (crash, storage outage past its retry deadline): retryable, the next attempt resumes
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from finetune_api.reports import EXIT_INTERRUPTED, EXIT_OK, EXIT_RETRYABLE, EXIT_USER_ERROR
from finetune_trainer import interrupt

if TYPE_CHECKING:
    from finetune_trainer.reporting import Reporter


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="FineTuneJob YAML (the operator's resolved config)")
    parser.add_argument(
        "--workdir",
        default=os.environ.get("FINETUNE_WORKDIR") or str(Path.home() / "finetune-run"),
        help="Local scratch directory (checkpoints, final model, report). Default: $FINETUNE_WORKDIR or "
        "~/finetune-run.",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    # First thing: as PID 1 an unhandled SIGTERM is ignored, and the imports below take seconds.
    previous = interrupt.install()
    try:
        return _main(argv, args)
    except interrupt.Interrupted:  # a signal before the trainer proper started: nothing to report yet
        return EXIT_INTERRUPTED
    finally:
        interrupt.restore(previous)


def _main(argv: list[str], args: argparse.Namespace) -> int:
    # Hubs are opt-in (hf:// URIs); nothing else may reach out to one.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workdir = Path(args.workdir)

    # Heavy imports after argument parsing: `--help` stays instant.
    from finetune_trainer.distributed import is_main_process, launch_per_gpu, record_exit_code, should_launch_per_gpu

    if should_launch_per_gpu():  # several GPUs, or one worker of a gang: torchrun, and its ranks' exit code
        code = launch_per_gpu(argv, workdir)
        if code == EXIT_USER_ERROR:
            hold_after_user_error()
        return code

    from finetune_trainer.config import load_job
    from finetune_trainer.reporting import Reporter
    from finetune_trainer.train import run

    quiet_progress_bars()
    main_process = is_main_process()
    reporter = Reporter(enabled=main_process)
    code = run_reported(reporter, lambda: run(load_job(args.config), reporter, workdir), main_process)
    record_exit_code(code, reporter.last_error if code != EXIT_OK else None)
    sys.stdout.flush()
    if code == EXIT_USER_ERROR and main_process:
        hold_after_user_error()
    return code


def quiet_progress_bars() -> None:
    """Pod logs are for report lines and errors; download/map/save progress bars only add noise there."""
    if not sys.stdout.isatty():
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()


def run_reported(reporter: Reporter, body: Callable[[], object], main_process: bool = True) -> int:
    """Run ``body``; what it raises becomes the final ``error`` report (also the termination message) and the
    exit code of the module doc. Shared by the trainer and the preflight planner."""
    from finetune_trainer.config import UserError
    from finetune_trainer.reporting import write_termination_log
    from finetune_trainer.storage import StorageUserError

    code = EXIT_OK
    try:
        body()
    except interrupt.Interrupted as exc:
        reporter.error("Interrupted", exc.message)
        code = EXIT_INTERRUPTED
    except UserError as exc:
        reporter.error(exc.reason, exc.message, final=True)
        code = EXIT_USER_ERROR
    except StorageUserError as exc:
        reporter.error(exc.reason, str(exc), final=True)
        code = EXIT_USER_ERROR
    except KeyboardInterrupt:  # SIGINT before interrupt.install() took over
        reporter.error("Interrupted", "the trainer was interrupted; the next attempt resumes from a checkpoint")
        code = EXIT_INTERRUPTED
    except Exception as exc:
        traceback.print_exc()
        reporter.error("TrainerFailed", f"{type(exc).__name__}: {exc}"[:2000])
        code = EXIT_RETRYABLE
    if code != EXIT_OK and main_process and reporter.last_error is not None:
        write_termination_log(reporter.last_error)
    return code


def hold_after_user_error() -> None:
    """Stay up (idle) until the operator, which read the final error report, stops the Job, or until
    FINETUNE_HOLD_ON_USER_ERROR_SECONDS pass (the operator sets it on its pods; unset: no wait).

    Why: on Kubernetes < 1.26 the Job controller starts a replacement pod the moment this one fails, before
    the operator can say the failure is final. Stopping the Job (parallelism 0) while this pod still runs deletes
    it instead (SIGTERM ends the wait), and no second attempt starts.
    """
    import time

    try:
        seconds = float(os.environ.get("FINETUNE_HOLD_ON_USER_ERROR_SECONDS") or 0)
    except ValueError:
        seconds = 0.0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            interrupt.check()
            time.sleep(0.2)
    except interrupt.Interrupted:
        pass  # the operator stopped the Job: exit with the user error


if __name__ == "__main__":
    raise SystemExit(main())
