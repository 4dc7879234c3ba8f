"""The `finetune` CLI without a cluster: validate/run's checks, report-line rendering, tables and status pages
built from real FineTuneJob objects (statuses produced by the operator's own status code), and model download
from a real S3 endpoint (the moto server fixture)."""

from __future__ import annotations

import datetime as dt
import io
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api.reports import MARKER, Report, ReportKind, format_report
from finetune_api.status import ConditionType, FineTuneJob, FineTuneJobStatus
from finetune_cli import artifacts, local, render
from finetune_cli.kube import CliError
from finetune_cli.main import main
from finetune_operator.observe import fold_reports, set_condition

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOW = dt.datetime(2026, 1, 2, 12, 0, 0, tzinfo=dt.UTC)
T0 = "2026-01-02T11:00:00Z"  # the jobs' creation: an hour before NOW


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def report(seq: int, kind: ReportKind, **fields: Any) -> Report:
    return Report(seq=seq, kind=kind, time="2026-01-02T11:30:05Z", attempt="pod-1", **fields)


def job_from_example(name: str, status: dict[str, Any] | None) -> dict[str, Any]:
    """An example file as the API server returns it: metadata filled in, and a status."""
    obj: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    obj["metadata"].update(namespace="team-a", uid=f"uid-{name}", creationTimestamp=T0, generation=1)
    if status is not None:
        obj["status"] = status
    FineTuneJob.model_validate(obj)  # a real FineTuneJob: spec and status valid against the API models
    return obj


def running_status() -> dict[str, Any]:
    """What the operator writes for a job mid-training, from trainer reports (the operator's fold_reports)."""
    reports = [
        report(1, ReportKind.STAGE, stage="training"),
        report(2, ReportKind.PROGRESS, step=40, total_steps=120, epoch=1.0, loss=2.25, learning_rate=2e-4,
               tokens_per_second=1500.0, eta_seconds=80.0),
        report(3, ReportKind.EVAL, step=40, metrics={"eval_loss": 2.5}),
        report(4, ReportKind.CHECKPOINT, step=40, uri="s3://finetune-demo/outputs/x/checkpoints/step-40/",
               metrics={"eval_loss": 2.5}),
    ]  # fmt: skip
    status = fold_reports(FineTuneJobStatus(), reports, keep=2)
    conds = set_condition([], ConditionType.VALIDATED, "True", "Valid", "spec is valid", 1, "2026-01-02T11:00:01Z")
    conds = set_condition(
        conds, ConditionType.RUNNING, "True", "Training", "attempt 1: training", 1, "2026-01-02T11:01:00Z"
    )
    return status.model_copy(
        update=dict(
            phase="Running", reason="Training", message="attempt 1: training", conditions=conds, attempts=1,
            workload="gpt2-text-lines-trainer", observed_generation=1, start_time="2026-01-02T11:01:00Z",
        )
    ).dump()  # fmt: skip


def failed_status() -> dict[str, Any]:
    message = "spec.model.uri: 'ftp://x/y' must start with one of file://, hf://, s3://"
    conds = set_condition([], ConditionType.VALIDATED, "False", "InvalidURI", message, 1, "2026-01-02T11:00:01Z")
    conds = set_condition(conds, ConditionType.FAILED, "True", "InvalidURI", message, 1, "2026-01-02T11:00:01Z")
    return FineTuneJobStatus(
        phase="Failed", reason="InvalidURI", message=message, conditions=conds, observed_generation=1
    ).dump()


# ---- validate and run (no cluster) --------------------------------------------------------------------------


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_validate_accepts_every_example(example: str) -> None:
    code, out = cli("validate", str(EXAMPLES / example))
    assert (code, out.strip()) == (0, f"{EXAMPLES / example}: valid")


BROKEN = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "broken"},
    "spec": {
        "model": {"uri": "ftp://models/x"},
        "task": "instruction",
        "dataset": {"train": "s3://data-bucket/train.jsonl"},
        "method": {"type": "qlora"},
        "output": {"uri": "s3://out-bucket/broken/"},
    },
}


def write(tmp_path: Path, obj: Any, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(obj))
    return str(path)


def test_validate_prints_every_problem_with_its_field(tmp_path: Path) -> None:
    code, out = cli("validate", write(tmp_path, BROKEN))
    assert code == 2
    assert "3 problem(s)" in out
    assert re.search(r"^  spec\.model\.uri: .*ftp://models/x.* \[InvalidURI\]$", out, re.M), out
    assert re.search(r"^  spec\.dataset\.template: .* \[TemplateError\]$", out, re.M), out
    # The local policy defaults to no GPU, so qlora is caught before anything is scheduled anywhere.
    assert re.search(r"^  spec\.method\.type: .*needs a GPU.* \[GPURequired\]$", out, re.M), out


def test_validate_suggests_the_field_for_a_typo(tmp_path: Path) -> None:
    job = yaml.safe_load((EXAMPLES / "02-gpt2-text-file.yaml").read_text())
    job["spec"]["hyperparameters"]["learningrate"] = job["spec"]["hyperparameters"].pop("learningRate")
    code, out = cli("validate", write(tmp_path, job))
    assert code == 2
    assert "spec.hyperparameters.learningrate: unknown field (did you mean learningRate?) [UnknownField]" in out


def test_validate_against_a_platform_policy(tmp_path: Path) -> None:
    policy = write(tmp_path, {"limits": {"maxGpusPerJob": 0, "allowedMethods": ["lora"]}}, "policy.yaml")
    code, out = cli("validate", str(EXAMPLES / "02-gpt2-text-file.yaml"), "--policy", policy)
    assert code == 2
    assert "spec.method.type: full is not allowed on this platform [PolicyViolation]" in out


def test_a_policy_file_with_an_unknown_key_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = write(tmp_path, {"limits": {"maxGpus": 1}}, "policy.yaml")
    code, _ = cli("validate", str(EXAMPLES / "02-gpt2-text-file.yaml"), "--policy", policy)
    assert code == 1
    assert "maxGpus" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("kind: Pod\nspec: {}\n", "kind is 'Pod', not FineTuneJob"),
        ("kind: FineTuneJob\n", "has no spec"),
        ("a: [\n", "not valid YAML"),
        ("kind: FineTuneJob\nspec: {}\n---\nkind: FineTuneJob\nspec: {}\n", "found 2 YAML documents"),
    ],
)
def test_validate_refuses_what_is_not_one_finetunejob(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(content)
    assert cli("validate", str(path))[0] == 1
    assert message in capsys.readouterr().err


def test_run_refuses_an_invalid_job_before_training(tmp_path: Path) -> None:
    code, out = cli("run", write(tmp_path, BROKEN), "--workdir", str(tmp_path / "wd"))
    assert code == 2
    assert "[InvalidURI]" in out and "Not run" in out
    assert not (tmp_path / "wd").exists()  # the trainer never started


def test_demo_runs_the_demo_module(monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_cli import demo

    monkeypatch.setattr(demo, "run_demo", lambda out: print("demo ran", file=out) or 3)
    assert cli("demo") == (3, "demo ran\n")


def test_demo_progress_line_shows_steps_loss_throughput_and_eta() -> None:
    from finetune_cli import demo

    status = {
        "phase": "Running",
        "loss": 5.1,
        "progress": {
            "step": 20,
            "totalSteps": 40,
            "percent": 50.0,
            "tokensPerSecond": 4300.0,
            "etaSeconds": 4,
            "stage": "training",
        },
    }
    line = demo.progress_text({"status": status})
    for part in ("Running", "step 20/40", "loss 5.1", "4300 tok/s", "ETA 4s", "(training)"):
        assert part in line, line


# ---- report lines ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rep", "expected"),
    [
        (report(1, ReportKind.STAGE, stage="downloading", message="base model"), "11:30:05 == downloading: base model"),
        (
            report(2, ReportKind.PROGRESS, step=40, total_steps=120, epoch=1.0, loss=2.25, learning_rate=2e-4,
                   tokens_per_second=1500.4, eta_seconds=80.0),
            "11:30:05 step 40/120 (33%)  epoch 1.00  loss 2.25  lr 2.00e-04  1500 tok/s  ETA 1m20s",
        ),
        (report(3, ReportKind.EVAL, step=40, metrics={"eval_loss": 2.5, "eval_f1": 0.8123456}),
         "11:30:05 eval at step 40: eval_f1 0.8123  eval_loss 2.5"),
        (report(4, ReportKind.CHECKPOINT, step=40, uri="s3://b/o/checkpoints/step-40/"),
         "11:30:05 checkpoint at step 40 uploaded to s3://b/o/checkpoints/step-40/"),
        (report(5, ReportKind.OUTPUT, uri="s3://b/o/", manifest="s3://b/o/manifest.json", metrics={"eval_loss": 1.5}),
         "11:30:05 model uploaded to s3://b/o/ (manifest s3://b/o/manifest.json)\n           final: eval_loss 1.5"),
        (report(6, ReportKind.ERROR, reason="DataInvalid", message="column 'text' is missing"),
         "11:30:05 ERROR DataInvalid: column 'text' is missing"),
        (report(7, ReportKind.PLAN, message="fits: 61.2 of 80 GiB per h100"),
         "11:30:05 plan: fits: 61.2 of 80 GiB per h100"),
    ],
    ids=[k.value for k in ReportKind],
)  # fmt: skip
def test_report_lines_render_readably(rep: Report, expected: str) -> None:
    line = "2026-01-02 11:30:05 INFO " + format_report(rep)  # reports may follow a log prefix
    assert render.render_log_line(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "Traceback (most recent call last):",
        "",
        MARKER + "{not json",
        MARKER + '{"kind": "progress"}',  # missing seq and time
    ],
)
def test_other_log_lines_pass_through_unchanged(line: str) -> None:
    assert render.render_log_line(line) == line


def test_report_stream_renders_lines_split_across_writes() -> None:
    out = io.StringIO()
    stream = local.ReportStream(out, live=False)
    text = "loading\n" + format_report(report(1, ReportKind.STAGE, stage="training")) + "\nlast words"
    for i in range(0, len(text), 7):  # the trainer's writes do not align with lines
        stream.write(text[i : i + 7])
    stream.finish()
    assert out.getvalue() == "loading\n11:30:05 == training\nlast words\n"


def test_report_stream_on_a_terminal_redraws_one_progress_bar() -> None:
    out = io.StringIO()
    stream = local.ReportStream(out, live=True)
    for step in (10, 20):
        stream.write(format_report(report(step, ReportKind.PROGRESS, step=step, total_steps=40, loss=1.0)) + "\n")
    stream.write("a warning\n")
    stream.finish()
    text = out.getvalue()
    assert "\n" not in text.split("a warning")[0].replace("\r\033[K", "")  # progress stayed on one line
    assert "[" + "#" * 15 + "-" * 15 + "] 20/40  loss 1" in text  # 50%
    assert text.endswith("a warning\n")


# ---- tables and status pages --------------------------------------------------------------------------------


def test_list_table_from_real_jobs() -> None:
    jobs = [
        job_from_example("02-gpt2-text-file.yaml", running_status()),
        job_from_example("05-distilbert-classification.yaml", failed_status()),
        job_from_example("07-chat.yaml", None),  # just created: the operator has not written a status yet
    ]
    lines = render.jobs_table(jobs, NOW).splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "AGE"]
    rows = [line.split() for line in lines[1:]]
    assert rows == [
        ["gpt2-text-lines", "Running", "33.3%", "(40/120)", "2.25", "1h00m"],
        ["bert-legal-arguments", "Failed", "-", "-", "1h00m"],
        [jobs[2]["metadata"]["name"], "Pending", "-", "-", "1h00m"],
    ]
    # Columns line up: every cell of a column starts at its header's offset.
    for header in ("PHASE", "PROGRESS", "LOSS", "AGE"):
        col = lines[0].index(header)
        assert all(line[col - 1] == " " and line[col] != " " for line in lines[1:]), header


def test_list_table_with_namespaces() -> None:
    table = render.jobs_table([job_from_example("02-gpt2-text-file.yaml", running_status())], NOW, True)
    assert table.splitlines()[1].split()[:2] == ["team-a", "gpt2-text-lines"]


def test_status_page_shows_what_the_operator_knows() -> None:
    text = render.status_text(job_from_example("02-gpt2-text-file.yaml", running_status()), NOW)
    for expected in (
        "Phase:        Running (Training)",
        "Message:      attempt 1: training",
        "33.3% (40/120)  epoch 1  1500 tokens/s  ETA 1m20s  stage training",
        "Loss:         2.25",
        "eval_loss 2.5  learning_rate 0.0002  loss 2.25",
        "Attempts:     1 (Job gpt2-text-lines-trainer)",
        "Ran for:      59m00s",
        "Output:       s3://finetune-demo/outputs/gpt2-text-lines/",
    ):
        assert expected in text, f"{expected!r} not in:\n{text}"
    assert re.search(r"^  40 +s3://finetune-demo/outputs/x/checkpoints/step-40/ +eval_loss 2.5$", text, re.M), text
    assert re.search(r"^  Running +True +Training +59m00s +attempt 1: training$", text, re.M), text


def test_status_page_of_a_failed_job_gives_the_reason() -> None:
    text = render.status_text(job_from_example("05-distilbert-classification.yaml", failed_status()), NOW)
    assert "Phase:        Failed (InvalidURI)" in text
    assert "Message:      spec.model.uri: 'ftp://x/y' must start with" in text
    assert re.search(r"^  Failed +True +InvalidURI ", text, re.M)


def test_watch_line_shows_bar_loss_and_eta() -> None:
    line = render.progress_line(job_from_example("02-gpt2-text-file.yaml", running_status()))
    assert line == "Running    [##########--------------------]  33.3% (40/120)  loss 2.25  ETA 1m20s  (training)"
    failed = render.progress_line(job_from_example("05-distilbert-classification.yaml", failed_status()))
    assert failed.startswith("Failed") and "InvalidURI: spec.model.uri" in failed


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59, "59s"), (60, "1m00s"), (3599, "59m59s"), (3600, "1h00m"), (90061, "1d1h"), (None, "-")],
)
def test_durations(seconds: float | None, text: str) -> None:
    assert render.duration(seconds) == text


# ---- report and download (real S3 endpoint) -----------------------------------------------------------------


def succeeded_job(bucket: str) -> dict[str, Any]:
    out = f"s3://{bucket}/outputs/gpt2-text-lines"
    status = fold_reports(
        FineTuneJobStatus(),
        [report(9, ReportKind.OUTPUT, uri=out, manifest=f"{out}/manifest.json", metrics={"eval_loss": 1.25})],
        2,
    )
    status = status.model_copy(update=dict(phase="Succeeded", reason="Completed", message=f"model uploaded to {out}"))
    job = job_from_example("02-gpt2-text-file.yaml", status.dump())
    job["spec"]["output"]["uri"] = out
    return job


def test_download_fetches_the_model_prefix(s3_server: Any, tmp_path: Path) -> None:
    bucket = s3_server.make_bucket()
    s3 = s3_server.client()
    files = {"model/config.json": b"{}", "model/sub/weights.bin": b"\x00" * 1000, "report/metrics.json": b"{}"}
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=f"outputs/gpt2-text-lines/{key}", Body=body)
    got = artifacts.download_model(succeeded_job(bucket), tmp_path / "model")
    assert sorted(p.relative_to(tmp_path / "model").as_posix() for p in got) == ["config.json", "sub/weights.bin"]
    assert (tmp_path / "model" / "sub" / "weights.bin").read_bytes() == files["model/sub/weights.bin"]


def test_download_refuses_a_job_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(CliError, match=r"has no model yet \(phase Running\)"):
        artifacts.download_model(job_from_example("02-gpt2-text-file.yaml", running_status()), tmp_path)


def test_report_names_metrics_and_locations(s3_server: Any) -> None:
    bucket = s3_server.make_bucket()
    job = succeeded_job(bucket)
    s3_server.client().put_object(Bucket=bucket, Key="outputs/gpt2-text-lines/report/loss.png", Body=b"png")
    text = artifacts.report_text(job)
    out = f"s3://{bucket}/outputs/gpt2-text-lines"
    assert re.search(r"^  eval_loss +1\.25$", text, re.M), text
    assert f"Report:    {out}/report/" in text and f"Model:     {out}/model/" in text
    assert f"Manifest:  {out}/manifest.json" in text
    assert artifacts.report_files(job) == [f"{out}/report/loss.png"]


def test_report_of_a_running_job_says_where_it_will_be() -> None:
    text = artifacts.report_text(job_from_example("02-gpt2-text-file.yaml", running_status()))
    assert "No report yet: it is written to s3://finetune-demo/outputs/gpt2-text-lines/report/" in text


# ---- run: the real trainer, in process ----------------------------------------------------------------------


@pytest.mark.slow
def test_run_trains_a_tiny_model_locally_and_renders_progress(tmp_path: Path) -> None:
    from finetune_trainer.tiny_models import build_model

    lines = [f"the {c} cat sat on the {c} mat" for c in ("red", "blue", "green", "black")] * 30
    model = build_model("gpt2", tmp_path / "model", lines)
    data = tmp_path / "lines.txt"
    data.write_text("\n".join(lines) + "\n")
    job = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "local-gpt2"},
        "spec": {
            "model": {"uri": f"file://{model}"},
            "task": "causal-lm",
            "dataset": {"train": f"file://{data}", "split": {"validationRatio": 0.2}},
            "method": {"type": "full"},
            "hyperparameters": {"maxSteps": 6, "batchSize": 8, "maxSeqLength": 16, "loggingSteps": 2},
            "evaluation": {"maxSamples": 4, "maxNewTokens": 4},
            "output": {"uri": f"file://{tmp_path / 'out'}"},
        },
    }
    code, out = cli("run", write(tmp_path, job), "--workdir", str(tmp_path / "wd"))
    assert code == 0, out
    assert MARKER not in out  # every report was rendered
    assert re.search(r"^\d\d:\d\d:\d\d step 6/6 \(100%\) .*loss ", out, re.M), out
    assert f"model uploaded to file://{tmp_path / 'out'}" in out
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert (tmp_path / "out" / "report" / "metrics.json").is_file()
