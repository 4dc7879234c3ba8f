"""Pure formatting for people: tables, ages, progress bars, status pages and trainer report lines.

Everything takes plain FineTuneJob dicts as the API server returns them (camelCase) rather than the pydantic
models: the CLI must keep working against an operator newer than itself, whose status may carry fields this
version does not know.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

from finetune_api.reports import MARKER, Report, ReportKind, parse_reports

NONE = "-"


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def duration(seconds: float | None) -> str:
    """Compact, like kubectl: 42s, 3m05s, 2h10m, 3d4h."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return NONE
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def age(timestamp: str | None, now: dt.datetime) -> str:
    when = parse_time(timestamp)
    return duration((now - when).total_seconds()) if when else NONE


def number(value: float | None) -> str:
    """Metrics and losses: 4 significant digits, no trailing noise."""
    if value is None:
        return NONE
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A kubectl-style table: upper-case headers, columns padded to their widest cell, 3 spaces apart."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = [[h.upper() for h in headers], *rows]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _status(job: dict[str, Any]) -> dict[str, Any]:
    return job.get("status") or {}


def progress_summary(status: dict[str, Any]) -> str:
    """'33% (40/120)' while training, else the trainer's stage (downloading, ...), else '-'."""
    progress = status.get("progress") or {}
    return str(progress.get("summary") or progress.get("stage") or NONE)


def job_row(job: dict[str, Any], now: dt.datetime, with_namespace: bool = False) -> list[str]:
    meta, status = job.get("metadata") or {}, _status(job)
    row = [
        str(meta.get("name", "")),
        str(status.get("phase") or "Pending"),
        progress_summary(status),
        number(status.get("loss")),
        age(meta.get("creationTimestamp"), now),
    ]
    return [str(meta.get("namespace", "")), *row] if with_namespace else row


def jobs_table(jobs: Sequence[dict[str, Any]], now: dt.datetime, with_namespace: bool = False) -> str:
    headers = ["name", "phase", "progress", "loss", "age"]
    if with_namespace:
        headers = ["namespace", *headers]
    return table(headers, [job_row(j, now, with_namespace) for j in jobs])


def bar(percent: float | None, width: int = 30) -> str:
    """[#########---------------------] for 0..100; an empty bar when the total is not known yet."""
    if percent is None:
        return "[" + " " * width + "]"
    filled = round(width * max(0.0, min(100.0, percent)) / 100)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def progress_line(job: dict[str, Any]) -> str:
    """One line for `status --watch`: phase, bar, steps, loss, then ETA and stage while running, else why."""
    status = _status(job)
    progress = status.get("progress") or {}
    phase = status.get("phase") or "Pending"
    parts = [f"{phase:<9}", bar(progress.get("percent"))]
    if progress.get("summary"):
        parts.append(str(progress["summary"]))
    if status.get("loss") is not None:
        parts.append(f"loss {number(status['loss'])}")
    if phase == "Running":
        if progress.get("etaSeconds") is not None:
            parts.append(f"ETA {duration(progress['etaSeconds'])}")
        if progress.get("stage"):
            parts.append(f"({progress['stage']})")
    elif status.get("reason"):
        parts.append(f"{status['reason']}: {status['message']}" if status.get("message") else str(status["reason"]))
    return "  ".join(parts)


def _metrics_line(metrics: dict[str, Any]) -> str:
    return "  ".join(f"{k} {number(v)}" for k, v in sorted(metrics.items())) or NONE


def _field(label: str, value: object) -> str:
    return f"{label + ':':<14}{value}"


def _indented_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["  " + line for line in table(headers, rows).splitlines()]


def status_text(job: dict[str, Any], now: dt.datetime) -> str:
    """`finetune status NAME`: everything the operator knows about one job, most useful first."""
    meta, spec, status = job.get("metadata") or {}, job.get("spec") or {}, _status(job)
    progress, output = status.get("progress") or {}, status.get("output") or {}
    phase = status.get("phase") or "Pending"
    lines = [
        _field("Name", meta.get("name")),
        _field("Namespace", meta.get("namespace")),
        _field("Task", f"{spec.get('task', NONE)} ({(spec.get('method') or {}).get('type', 'lora')})"),
        _field("Phase", phase + (f" ({status['reason']})" if status.get("reason") else "")),
    ]
    if status.get("message"):
        lines.append(_field("Message", status["message"]))
    if progress:
        detail = [progress_summary(status)]
        if progress.get("epoch") is not None:
            detail.append(f"epoch {number(progress['epoch'])}")
        if progress.get("tokensPerSecond") is not None:
            detail.append(f"{progress['tokensPerSecond']:.0f} tokens/s")
        if progress.get("etaSeconds") is not None and phase == "Running":
            detail.append(f"ETA {duration(progress['etaSeconds'])}")
        if progress.get("stage"):
            detail.append(f"stage {progress['stage']}")
        lines.append(_field("Progress", f"{bar(progress.get('percent'), 20)} " + "  ".join(detail)))
    if status.get("loss") is not None:
        lines.append(_field("Loss", number(status["loss"])))
    if status.get("metrics"):
        lines.append(_field("Metrics", _metrics_line(status["metrics"])))
    workload = f" (Job {status['workload']})" if status.get("workload") else ""
    lines.append(_field("Attempts", f"{status.get('attempts', 0)}{workload}"))
    lines.append(_field("Age", age(meta.get("creationTimestamp"), now)))
    start = parse_time(status.get("startTime"))
    if start is not None:
        end = parse_time(status.get("completionTime")) or now
        lines.append(_field("Ran for", duration((end - start).total_seconds())))
    lines.append(_field("Output", output.get("uri") or (spec.get("output") or {}).get("uri", NONE)))
    if output.get("manifest"):
        lines.append(_field("Manifest", output["manifest"]))
    if status.get("checkpoints"):
        rows = [
            [str(c.get("step")), str(c.get("uri")), _metrics_line(c.get("metrics") or {})]
            for c in status["checkpoints"]
        ]
        lines += ["Checkpoints:", *_indented_table(["step", "uri", "metrics"], rows)]
    if status.get("conditions"):
        rows = [
            [
                str(c.get("type")),
                str(c.get("status")),
                str(c.get("reason")),
                age(c.get("lastTransitionTime"), now),
                str(c.get("message") or ""),
            ]
            for c in status["conditions"]
        ]
        lines += ["Conditions:", *_indented_table(["type", "status", "reason", "age", "message"], rows)]
    return "\n".join(lines)


# ---- trainer report lines ----------------------------------------------------------------------------------


def _clock(report: Report) -> str:
    when = parse_time(report.time)
    return when.strftime("%H:%M:%S") if when else "--:--:--"


def render_report(report: Report) -> str:
    """One `##finetune {...}` report as a line a person reads."""
    kind = report.kind
    if kind == ReportKind.STAGE:
        text = f"== {report.stage}" + (f": {report.message}" if report.message else "")
    elif kind == ReportKind.PROGRESS:
        step = f"step {report.step}" + (f"/{report.total_steps}" if report.total_steps else "")
        if report.step is not None and report.total_steps:
            step += f" ({100 * report.step / report.total_steps:.0f}%)"
        parts = [step]
        if report.epoch is not None:
            parts.append(f"epoch {report.epoch:.2f}")
        if report.loss is not None:
            parts.append(f"loss {number(report.loss)}")
        if report.learning_rate is not None:
            parts.append(f"lr {report.learning_rate:.2e}")
        if report.tokens_per_second is not None:
            parts.append(f"{report.tokens_per_second:.0f} tok/s")
        if report.eta_seconds is not None:
            parts.append(f"ETA {duration(report.eta_seconds)}")
        text = "  ".join(parts)
    elif kind == ReportKind.EVAL:
        at = f" at step {report.step}" if report.step is not None else ""
        text = f"eval{at}: {_metrics_line(report.metrics)}"
    elif kind == ReportKind.CHECKPOINT:
        text = f"checkpoint at step {report.step} uploaded to {report.uri}"
    elif kind == ReportKind.OUTPUT:
        text = f"model uploaded to {report.uri}" + (f" (manifest {report.manifest})" if report.manifest else "")
        if report.metrics:
            text += f"\n           final: {_metrics_line(report.metrics)}"
    elif kind == ReportKind.PLAN:  # the preflight's verdict
        text = f"plan: {report.message or 'no estimate'}"
    else:  # ReportKind.ERROR
        text = f"ERROR {report.reason or 'TrainerError'}: {report.message or ''}"
    return f"{_clock(report)} {text}"


def report_of(line: str) -> Report | None:
    """The report on a log line, or None for an ordinary line (or a malformed report)."""
    if MARKER not in line:
        return None
    return next(parse_reports([line]), None)


def render_log_line(line: str) -> str:
    """Report lines become readable; every other line (warnings, tracebacks) is shown as it is."""
    report = report_of(line)
    return render_report(report) if report is not None else line
