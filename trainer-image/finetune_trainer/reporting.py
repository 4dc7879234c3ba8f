"""Emits the trainer's report lines (``finetune_api.reports``) on stdout, one JSON object per line.

The operator folds these into the FineTuneJob status, so every stage change, progress tick, evaluation,
uploaded checkpoint, final output and user-facing error goes through here. Reports come from the training
loop and from the checkpoint-upload thread, hence the lock (a line must never interleave with another).
Only the rank-0 process reports: with several processes the operator would see every step N times.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from finetune_api.reports import Report, ReportKind, format_report


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def clean_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric, finite values only: NaN/inf are not JSON and a status field cannot hold them."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class Reporter:
    """Prints report lines for one trainer process start (``seq`` restarts at 1, ``attempt`` tells them apart)."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream
        self.attempt = os.environ.get("FINETUNE_ATTEMPT") or os.environ.get("POD_NAME") or socket.gethostname()
        self._seq = 0
        self._lock = threading.Lock()
        self.last_error: Report | None = None

    def emit(self, kind: ReportKind, **fields: Any) -> Report | None:
        if "metrics" in fields:
            fields["metrics"] = clean_metrics(fields["metrics"] or {})
        for key in ("loss", "learning_rate", "tokens_per_second", "eta_seconds", "epoch"):
            value = fields.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                fields[key] = None
        with self._lock:
            self._seq += 1
            report = Report(seq=self._seq, kind=kind, time=_now(), attempt=self.attempt, **fields)
            if kind == ReportKind.ERROR:
                self.last_error = report
            if self.enabled:
                stream = self.stream or sys.stdout
                stream.write(format_report(report) + "\n")
                stream.flush()  # the operator tails the log: a buffered report is an invisible one
        return report

    def stage(self, stage: str, message: str | None = None) -> None:
        self.emit(ReportKind.STAGE, stage=stage, message=message)

    def progress(self, **fields: Any) -> None:
        self.emit(ReportKind.PROGRESS, **fields)

    def eval(self, step: int, metrics: dict[str, Any], epoch: float | None = None) -> None:
        self.emit(ReportKind.EVAL, step=step, epoch=epoch, metrics=metrics)

    def checkpoint(self, step: int, uri: str, metrics: dict[str, Any]) -> None:
        self.emit(ReportKind.CHECKPOINT, step=step, uri=uri, metrics=metrics)

    def output(self, uri: str, manifest: str, step: int, metrics: dict[str, Any]) -> Report | None:
        return self.emit(ReportKind.OUTPUT, uri=uri, manifest=manifest, step=step, metrics=metrics)

    def error(self, reason: str, message: str, final: bool = False) -> None:
        self.emit(ReportKind.ERROR, reason=reason, message=message, final=final or None)


def write_termination_log(report: Report) -> None:
    """The final report (``output`` or ``error``) as bare JSON in the container's termination message, which
    Kubernetes keeps after the log is gone and the operator parses like a report line. At most 4096 bytes:
    metrics are dropped and the message shortened when needed. Skipped where the file cannot be written
    (outside a pod ``/dev`` is not ours; FINETUNE_TERMINATION_LOG points elsewhere)."""
    path = Path(os.environ.get("FINETUNE_TERMINATION_LOG", "/dev/termination-log"))
    data = report.dump()
    text = json.dumps(data, separators=(",", ":"), sort_keys=True)
    if len(text.encode()) > 4000:
        data.pop("metrics", None)
        if data.get("message"):
            data["message"] = data["message"][:2000]
        text = json.dumps(data, separators=(",", ":"), sort_keys=True)
    writable = os.access(path, os.W_OK) if path.exists() else os.access(path.parent, os.W_OK)
    if not writable:
        return
    with contextlib.suppress(OSError):
        path.write_text(text, encoding="utf-8")
