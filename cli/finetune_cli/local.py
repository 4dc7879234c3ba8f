"""`finetune validate` and `finetune run`: a FineTuneJob file checked, and trained, without Kubernetes.

Both apply the operator's own validation (`finetune_operator.validation.validate_spec`), so a file that passes
here passes in the cluster under the same policy. The local policy is the operator's built-in one with
`gpus: 0` as the default (a laptop has no GPU to assume) and file:// URIs allowed (they name this machine's
files; clusters refuse them by default); `--policy FILE` checks against a platform's real policy instead (the
operator's config file, e.g. from the Helm chart's ConfigMap).

`run` hands the trainer exactly what the operator would: the job with every default resolved, as a file.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any, TextIO, cast

import yaml

from finetune_api.reports import ReportKind
from finetune_api.spec import KIND, FineTuneJobSpec
from finetune_cli.kube import CliError
from finetune_cli.render import bar, duration, number, render_report, report_of
from finetune_operator.builders import resolved_job_yaml
from finetune_operator.config import Defaults, Limits, OperatorConfig, load_config
from finetune_operator.validation import ValidationResult, validate_spec


def local_policy(path: str | None) -> OperatorConfig:
    """The policy file's, exactly as the cluster applies it; without one, the operator's built-in policy for a
    workstation: no GPU assumed, any S3 endpoint, and file:// allowed (see :func:`allowing_local_files`)."""
    if path:
        try:
            return load_config(path)
        except (OSError, ValueError) as exc:
            raise CliError(f"policy file {path}: {exc}") from None
    # A workstation's own S3 endpoint (a local MinIO) is the user's business: any endpoint is allowed.
    policy = OperatorConfig(defaults=Defaults(gpus=0), limits=Limits(allowed_storage_endpoints=["*"]))
    return allowing_local_files(policy)


def _with_file(limits: dict[str, Any]) -> dict[str, Any]:
    out = dict(limits)
    if "allowedUriSchemes" in out and "file" not in out["allowedUriSchemes"]:
        out["allowedUriSchemes"] = [*out["allowedUriSchemes"], "file"]
    if isinstance(out.get("allowedUris"), dict):
        out["allowedUris"] = {k: [*v, "file:///"] if v else v for k, v in out["allowedUris"].items()}
    return out


def allowing_local_files(policy: OperatorConfig) -> OperatorConfig:
    """``policy`` with file:// URIs allowed everywhere, for training on this machine (`finetune run`).

    Clusters refuse file:// by default because inside a pod it names the pod's own filesystem; here it names
    this machine's files, which is the point of a local run. Every other rule of the policy still applies."""
    data = policy.model_dump(by_alias=True)
    data["limits"] = _with_file(data["limits"])
    for tenant in data["tenants"].values():
        tenant["limits"] = _with_file(tenant["limits"])
    return OperatorConfig.model_validate(data)


def load_job_file(path: str | Path) -> dict[str, Any]:
    """The one FineTuneJob in a YAML file, as a dict."""
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise CliError(f"{path}: not valid YAML: {exc}") from None
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise CliError(f"{path}: expected exactly one FineTuneJob object, found {len(docs)} YAML documents")
    job: dict[str, Any] = docs[0]
    if job.get("kind", KIND) != KIND:
        raise CliError(f"{path}: kind is {job.get('kind')!r}, not {KIND}")
    if not isinstance(job.get("spec"), dict):
        raise CliError(f"{path}: the FineTuneJob has no spec")
    return job


def validate_file(path: str | Path, policy: OperatorConfig) -> tuple[dict[str, Any], ValidationResult]:
    job = load_job_file(path)
    namespace = (job.get("metadata") or {}).get("namespace")
    return job, validate_spec(job["spec"], policy.for_namespace(namespace))


def problems_text(path: str | Path, result: ValidationResult) -> str:
    lines = [f"{path}: {len(result.problems)} problem(s):"]
    lines += [f"  {p.field}: {p.message} [{p.reason}]" for p in result.problems]
    return "\n".join(lines)


class ReportStream(io.TextIOBase):
    """Stands in for stdout while the trainer runs: its report lines become people's lines.

    On a terminal, progress reports redraw one progress-bar line in place and every other line is printed
    above it; elsewhere (a pipe, CI logs) each report becomes one readable line. Other output passes through.
    """

    def __init__(self, out: TextIO, live: bool) -> None:
        self.out, self.live = out, live
        self._pending = ""
        self._bar_shown = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def finish(self) -> None:
        if self._pending:
            self._line(self._pending)
            self._pending = ""
        if self._bar_shown:
            self.out.write("\n")
            self._bar_shown = False
        self.out.flush()

    def _line(self, line: str) -> None:
        report = report_of(line)
        if self.live and report is not None and report.kind == ReportKind.PROGRESS:
            pct = 100 * report.step / report.total_steps if report.step is not None and report.total_steps else None
            eta = f"  ETA {duration(report.eta_seconds)}" if report.eta_seconds is not None else ""
            steps = f"{report.step}/{report.total_steps}" if report.total_steps else f"{report.step}"
            self.out.write(f"\r\033[K{bar(pct)} {steps}  loss {number(report.loss)}{eta}")
            self._bar_shown = True
            return
        if self._bar_shown:
            self.out.write("\r\033[K")  # clear the bar; it is redrawn by the next progress report
            self._bar_shown = False
        self.out.write((render_report(report) if report is not None else line) + "\n")


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Environment variables for the trainer, restored afterwards (the CLI may run in a longer-lived process)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def run_trainer(job: dict[str, Any], spec: FineTuneJobSpec, workdir: str | None, out: TextIO) -> int:
    """The trainer's own entry point, in this process, on the resolved job; returns its exit code."""
    try:
        from finetune_trainer.__main__ import main as trainer_main
    except ImportError as exc:
        raise CliError(f"the trainer is not installed ({exc}): pip install 'finetune-platform[trainer]'") from None
    meta = job.get("metadata") or {}
    meta = {"name": meta.get("name", "local"), "namespace": meta.get("namespace"), "generation": 1}
    with tempfile.TemporaryDirectory(prefix="finetune-run-") as tmp:
        config = Path(tmp) / "job.yaml"
        config.write_text(resolved_job_yaml(meta, spec))
        argv = ["--config", str(config)] + (["--workdir", workdir] if workdir else [])
        stream = ReportStream(out, live=out.isatty())
        # Outside a pod there is no /dev/termination-log for the verdict (and as root it would be created).
        env = {"FINETUNE_TERMINATION_LOG": str(Path(tmp) / "termination-log"), "FINETUNE_ATTEMPT": "local"}
        try:
            with _environ(**env), redirect_stdout(cast(TextIO, stream)):
                return trainer_main(argv)
        except ImportError as exc:  # torch, transformers, ... are imported once training starts
            raise CliError(
                f"the trainer's dependencies are missing ({exc}): pip install 'finetune-platform[trainer]'"
            ) from None
        finally:
            stream.finish()
