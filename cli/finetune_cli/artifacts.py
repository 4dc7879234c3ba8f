"""Where a job's results are in object storage, and fetching them.

The trainer writes `model/`, `report/`, `checkpoints/` and `manifest.json` under `spec.output.uri`; the status
records that URI once the model is uploaded. Storage goes through `finetune_trainer.storage` (boto3 with the
standard AWS environment), the same code the trainer uploads with, using the job's `spec.storage` endpoint and
region and the caller's own credentials.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_cli.kube import CliError
from finetune_cli.render import NONE, number
from finetune_trainer import storage


def output_uri(job: dict[str, Any]) -> str:
    """The uploaded output's prefix (status), or where it will be (spec) while the job runs."""
    status_out = ((job.get("status") or {}).get("output") or {}).get("uri")
    return str(status_out or job["spec"]["output"]["uri"])


def _storage(job: dict[str, Any]) -> storage.Storage:
    st = job["spec"].get("storage") or {}
    return storage.storage_for(st.get("endpoint"), st.get("region"))


def report_text(job: dict[str, Any]) -> str:
    """`finetune report NAME`: the metrics, and where the report files and the model are."""
    status = job.get("status") or {}
    name, phase = job["metadata"]["name"], status.get("phase") or "Pending"
    out = output_uri(job)
    lines = [f"{name}: {phase}"]
    metrics = status.get("metrics") or {}
    if metrics:
        width = max(len(k) for k in metrics)
        lines += ["", "Metrics:"] + [f"  {k.ljust(width)}  {number(v)}" for k, v in sorted(metrics.items())]
    lines.append("")
    if status.get("output"):
        lines += [
            f"Report:    {storage.join_uri(out, 'report')}/  (metrics.json, loss and learning-rate plots, samples.md)",
            f"Model:     {storage.join_uri(out, 'model')}/",
            f"Manifest:  {status['output'].get('manifest') or NONE}",
        ]
    else:
        lines.append(f"No report yet: it is written to {storage.join_uri(out, 'report')}/ when the job succeeds.")
    return "\n".join(lines)


def report_files(job: dict[str, Any]) -> list[str]:
    """URIs of the report's files (needs read access to the bucket)."""
    uri = storage.join_uri(output_uri(job), "report")
    try:
        return [storage.join_uri(uri, rel) for rel in _storage(job).list_prefix(uri)]
    except storage.StorageError as exc:
        raise CliError(str(exc)) from None


def download_model(job: dict[str, Any], dest: Path) -> list[Path]:
    """Copy `{output}/model/` into dest; refuses until the job has uploaded its model."""
    status = job.get("status") or {}
    if not status.get("output"):
        phase = status.get("phase") or "Pending"
        raise CliError(f"{job['metadata']['name']} has no model yet (phase {phase}); download works once it Succeeded")
    uri = storage.join_uri(output_uri(job), "model")
    try:
        return _storage(job).download_prefix(uri, dest)
    except storage.StorageError as exc:
        raise CliError(str(exc)) from None
