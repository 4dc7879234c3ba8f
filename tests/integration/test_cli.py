"""`finetune` against a real kube-apiserver: FineTuneJobs created through the API, statuses written through
the status subresource (as the operator writes them), trainer pod logs served through the API server's log
proxy (the harness's FakeKubeletLogs plays the kubelet's log endpoint), models on a real S3 endpoint."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from finetune_api.reports import Report, ReportKind, format_report
from finetune_cli.main import main
from finetune_operator.builders import LABEL_COMPONENT, LABEL_UID
from tests.integration.operator_harness import FakeKubeletLogs, install_crd, register_fake_node, wait_for

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
NODE = "fake-kubelet-cli"  # not the operator tests' node: each module owns its own
SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/tiny-gpt2/"},
    "task": "causal-lm",
    "dataset": {"train": "s3://data/lines.txt"},
    "output": {"uri": "s3://outputs/job/"},
    "runPolicy": {"backoffLimit": 2},
}


@pytest.fixture(scope="module")
def crd(control_plane: Any, kube_api: Any) -> None:
    install_crd(kube_api)


@pytest.fixture(scope="module")
def kubelet_logs(kube_api: Any) -> Iterator[FakeKubeletLogs]:
    fake = FakeKubeletLogs()
    register_fake_node(kube_api, NODE, fake)
    yield fake
    fake.close()


class Cli:
    """Runs `finetune` in-process against the control plane and one namespace."""

    def __init__(self, kubeconfig: str, namespace: str, api: Any) -> None:
        self.kubeconfig, self.ns = kubeconfig, namespace
        self.custom: Any = client.CustomObjectsApi(api)
        self.core: Any = client.CoreV1Api(api)

    def __call__(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        code = main([*argv, "-n", self.ns, "--kubeconfig", self.kubeconfig], out=out)
        return code, out.getvalue()

    def create(self, name: str, status: dict[str, Any] | None = None, spec: dict[str, Any] = SPEC) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}
        job: dict[str, Any] = self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)
        if status is not None:
            self.set_status(name, status)
        return job

    def set_status(self, name: str, status: dict[str, Any]) -> None:
        """Through the status subresource, as the operator does (a plain update would drop status)."""
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.ns, PLURAL, name, {"status": status})

    def get(self, name: str) -> dict[str, Any]:
        job: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)
        return job

    def names(self) -> list[str]:
        items = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL)["items"]
        return [i["metadata"]["name"] for i in items]

    def trainer_pod(self, job: dict[str, Any], name: str) -> None:
        """A Running trainer pod of `job` on the fake node, labelled as the operator's Jobs label theirs."""
        labels = {LABEL_UID: job["metadata"]["uid"], LABEL_COMPONENT: "trainer"}
        pod = {
            "metadata": {"name": name, "labels": labels},
            "spec": {"nodeName": NODE, "containers": [{"name": "trainer", "image": "finetune-trainer:test"}]},
        }
        self.core.create_namespaced_pod(self.ns, pod)
        self.core.patch_namespaced_pod_status(name, self.ns, {"status": {"phase": "Running"}})


@pytest.fixture
def cli(control_plane: Any, kube_api: Any, crd: None, namespace: str) -> Cli:
    return Cli(control_plane.kubeconfig, namespace, kube_api)


RUNNING = {
    "phase": "Running",
    "reason": "Training",
    "message": "attempt 1: training",
    "progress": {"step": 40, "totalSteps": 120, "percent": 33.3, "summary": "33.3% (40/120)", "stage": "training"},
    "loss": 2.25,
    "metrics": {"loss": 2.25, "eval_loss": 2.5},
    "checkpoints": [{"step": 40, "uri": "s3://outputs/job/checkpoints/checkpoint-40", "metrics": {}}],
    "conditions": [
        {"type": "Validated", "status": "True", "reason": "Valid", "message": "spec is valid",
         "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1},
    ],
    "attempts": 1,
}  # fmt: skip


def test_list_shows_phase_progress_and_loss(cli: Cli) -> None:
    cli.create("training", RUNNING)
    cli.create("fresh")  # no status yet
    code, out = cli("list")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "AGE"]
    rows = {line.split()[0]: line.split()[1:-1] for line in lines[1:]}  # the age varies
    assert rows == {"training": ["Running", "33.3%", "(40/120)", "2.25"], "fresh": ["Pending", "-", "-"]}


def test_list_in_an_empty_namespace_says_so(cli: Cli) -> None:
    assert cli("list") == (0, f"No FineTuneJobs in namespace {cli.ns}.\n")


def test_list_all_namespaces_adds_the_namespace_column(cli: Cli) -> None:
    cli.create("everywhere", RUNNING)
    code, out = cli("list", "-A")
    assert code == 0
    assert [cli.ns, "everywhere", "Running"] in [line.split()[:3] for line in out.splitlines()]


def test_namespace_defaults_to_the_kubeconfig_context(cli: Cli, tmp_path: Path) -> None:
    cli.create("in-context", RUNNING)
    config = yaml.safe_load(Path(cli.kubeconfig).read_text())
    for ctx in config["contexts"]:
        ctx["context"]["namespace"] = cli.ns
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    out = io.StringIO()
    assert main(["list", "--kubeconfig", str(kubeconfig)], out=out) == 0
    assert "in-context" in out.getvalue()


def test_status_shows_reason_conditions_progress_and_checkpoints(cli: Cli) -> None:
    cli.create("training", RUNNING)
    code, out = cli("status", "training")
    assert code == 0
    assert "Phase:        Running (Training)" in out
    assert "33.3% (40/120)" in out and "stage training" in out
    assert "Metrics:      eval_loss 2.5  loss 2.25" in out
    assert "s3://outputs/job/checkpoints/checkpoint-40" in out
    assert "Validated" in out and "spec is valid" in out


def test_status_of_a_missing_job_is_an_error(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("status", "nope")[0] == 1
    assert f"FineTuneJob {cli.ns}/nope: not found" in capsys.readouterr().err


def test_watch_follows_the_job_until_it_finishes(cli: Cli) -> None:
    cli.create("finishing", RUNNING)

    def finish() -> None:
        time.sleep(1.0)
        cli.set_status("finishing", {**RUNNING, "phase": "Succeeded", "reason": "Completed", "message": "done"})

    thread = threading.Thread(target=finish)
    thread.start()
    code, out = cli("status", "finishing", "--watch", "--interval", "0.2")
    thread.join()
    assert code == 0
    lines = out.splitlines()  # not a terminal: one line per change
    assert lines[0].startswith("Running") and "33.3% (40/120)" in lines[0]
    assert lines[-1].startswith("Succeeded") and "Completed: done" in lines[-1]


def test_watch_of_a_failed_job_exits_1(cli: Cli) -> None:
    cli.create("bad", {"phase": "Failed", "reason": "InvalidURI", "message": "spec.model.uri: use s3://"})
    code, out = cli("status", "bad", "--watch")
    assert code == 1
    assert "InvalidURI: spec.model.uri: use s3://" in out


def test_cancel_sets_run_policy_cancel_and_keeps_the_job(cli: Cli) -> None:
    cli.create("stopped", RUNNING)
    code, out = cli("cancel", "stopped")
    assert code == 0 and "cancelled" in out
    assert cli.get("stopped")["spec"]["runPolicy"] == {"backoffLimit": 2, "cancel": True}


def test_cancel_delete_deletes_the_job(cli: Cli) -> None:
    cli.create("doomed", RUNNING)
    code, out = cli("cancel", "doomed", "--delete")
    assert code == 0 and "deleted" in out
    wait_for("doomed gone", lambda: "doomed" not in cli.names())


def test_cancel_keep_suspends_and_keeps_the_rest_of_run_policy(cli: Cli) -> None:
    cli.create("paused", RUNNING)
    code, out = cli("cancel", "paused", "--keep")
    assert code == 0 and "suspended" in out
    assert cli.get("paused")["spec"]["runPolicy"] == {"backoffLimit": 2, "suspend": True}


def test_logs_render_the_newest_trainer_pods_reports(cli: Cli, kubelet_logs: FakeKubeletLogs) -> None:
    job = cli.create("logged", RUNNING)
    cli.trainer_pod(job, "logged-trainer-aaaaa")
    time.sleep(1.1)  # creationTimestamp has one-second resolution: make the retry strictly newer
    cli.trainer_pod(job, "logged-trainer-bbbbb")
    progress = Report(seq=2, kind=ReportKind.PROGRESS, time="2026-01-01T10:00:00Z", step=5, total_steps=10, loss=1.5)
    kubelet_logs.logs[(cli.ns, "logged-trainer-aaaaa")] = "first attempt\n"
    kubelet_logs.logs[(cli.ns, "logged-trainer-bbbbb")] = f"starting\n{format_report(progress)}\n"
    kubelet_logs.close_log(cli.ns, "logged-trainer-bbbbb")  # the container ended: `logs -f` reaches the end
    for flags in ((), ("-f",)):
        code, out = cli("logs", "logged", *flags)
        assert code == 0, out
        assert out == "starting\n10:00:00 step 5/10 (50%)  loss 1.5\n"
    code, out = cli("logs", "logged", "--raw")
    assert out.splitlines()[1] == format_report(progress)


def test_logs_without_a_pod_explain_the_phase(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    cli.create("unstarted", {"phase": "Failed", "reason": "InvalidURI", "message": "spec.model.uri: use s3://"})
    assert cli("logs", "unstarted")[0] == 1
    assert "unstarted has no trainer pod (phase Failed: spec.model.uri: use s3://)" in capsys.readouterr().err


def test_report_and_download_from_the_jobs_output(cli: Cli, s3_server: Any, tmp_path: Path) -> None:
    bucket = s3_server.make_bucket()
    out_uri = f"s3://{bucket}/outputs/job"
    s3 = s3_server.client()
    for key in ("model/config.json", "model/model.safetensors", "report/metrics.json"):
        s3.put_object(Bucket=bucket, Key=f"outputs/job/{key}", Body=key.encode())
    spec = {**SPEC, "output": {"uri": out_uri}}
    status = {
        "phase": "Succeeded",
        "reason": "Completed",
        "message": f"model uploaded to {out_uri}",
        "metrics": {"eval_loss": 1.25},
        "output": {"uri": out_uri, "manifest": f"{out_uri}/manifest.json"},
    }
    cli.create("done", status, spec=spec)

    code, out = cli("report", "done", "--files")
    assert code == 0, out
    assert f"Report:    {out_uri}/report/" in out and "eval_loss  1.25" in out
    assert f"  {out_uri}/report/metrics.json" in out

    code, out = cli("download", "done", str(tmp_path / "model"))
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]
    assert (tmp_path / "model" / "config.json").read_bytes() == b"model/config.json"


def test_console_scripts_run_as_finetune_and_kubectl_finetune(cli: Cli) -> None:
    cli.create("scripted", RUNNING)
    bindir = Path(sys.executable).parent
    proc = subprocess.run(
        [str(bindir / "finetune"), "list", "-n", cli.ns, "--kubeconfig", cli.kubeconfig],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "scripted" in proc.stdout
    proc = subprocess.run([str(bindir / "kubectl-finetune"), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.stdout.startswith("usage: kubectl finetune")
