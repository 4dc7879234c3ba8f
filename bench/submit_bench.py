"""Submit to first training step on the local cluster, by stage: a FineTuneJob (operator, preflight, trainer)
against the same trainer pod started as a plain batch Job without the operator (the baseline, same image, same
resolved config, same node), in the same run.

    python bench/submit_bench.py [--runs 2] [--no-build] [--docs docs/benchmarks.md]

The cluster is the project's local single-node cluster (scripts/cluster.sh; started and its images built when
needed, as `make demo` does) with the operator installed by Helm exactly as the demo installs it (preflight on).
Images are warm: they are imported into containerd before the first run. Times are first seen by this process,
which polls the API server every 0.1 s, plus the trainer's own report times (same clock, same machine):

    admission      kubectl apply -> the operator's first status (validation, policy)
    preflight      -> the trainer's Job exists (the CPU preflight pod: scheduled, started, data checked, planned)
    scheduling     -> the trainer pod is bound to the node
    container      -> the trainer container runs (sandbox, image, Python start)
    download       -> the trainer reports `preparing` (model and data fetched from S3)
    first step     -> the trainer reports its first training step (tokenise, model load, step 1)

The plain Job has no admission or preflight stage. Leaves the cluster as found: the namespace is deleted, and a
release this bench installed is uninstalled (one that was there before is kept).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from benchkit import Row, machine, markdown_table, text_table, write_section  # noqa: E402

from finetune_api.reports import ReportKind, parse_reports  # noqa: E402
from finetune_cli import demo  # noqa: E402
from finetune_operator import builders  # noqa: E402

EXAMPLE = demo.EXAMPLES / "02-gpt2-text-file.yaml"
NAMESPACE = "bench-submit"
STAGES = ("admission", "preflight", "scheduling", "container", "download", "first step")
POLL_S = 0.1
TIMEOUT_S = 600


@dataclass
class Timeline:
    """Seconds after `kubectl apply` at which each milestone was first seen."""

    start: float
    seen: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str, at: float | None = None) -> None:
        self.seen.setdefault(name, (at if at is not None else time.time()) - self.start)

    def stages(self, plain: bool) -> dict[str, float]:
        order = ["status", "job", "scheduled", "running", "preparing", "step"]
        names = STAGES if not plain else STAGES[2:]
        points = [0.0] + [self.seen[m] for m in (order if not plain else order[2:])]
        return {name: max(0.0, points[i + 1] - points[i]) for i, name in enumerate(names)}

    @property
    def total(self) -> float:
        return self.seen["step"]


def _ts(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class Cluster:
    def __init__(self, target: demo.Target) -> None:
        api = config.new_client_from_config(target.kubeconfig)
        self.core, self.batch, self.custom = client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)

    def trainer_pod(self, selector: str) -> Any:
        pods = self.core.list_namespaced_pod(NAMESPACE, label_selector=selector).items
        return pods[0] if pods else None

    def follow(self, timeline: Timeline, job_name: str, selector: str, ftj: str | None) -> None:
        """Poll until the trainer's first step, marking each milestone when first seen."""
        deadline = time.monotonic() + TIMEOUT_S
        while "step" not in timeline.seen:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{job_name}: no first step within {TIMEOUT_S}s: {timeline.seen}")
            if ftj is not None and "status" not in timeline.seen:
                body: Any = self.custom.get_namespaced_custom_object(
                    "finetune.dev", "v1alpha1", NAMESPACE, "finetunejobs", ftj
                )
                if (body.get("status") or {}).get("phase"):
                    timeline.mark("status")
            if "job" not in timeline.seen and any(
                j.metadata is not None and j.metadata.name == job_name
                for j in self.batch.list_namespaced_job(NAMESPACE).items
            ):
                timeline.mark("job")
            pod = self.trainer_pod(selector)
            if pod is not None:
                if pod.spec.node_name:
                    timeline.mark("scheduled")
                if pod.status.phase == "Running":
                    timeline.mark("running")
                if "running" in timeline.seen:
                    self._reports(timeline, pod.metadata.name)
            time.sleep(POLL_S)

    def _reports(self, timeline: Timeline, pod: str) -> None:
        try:
            text = self.core.read_namespaced_pod_log(pod, NAMESPACE)
        except client.ApiException:
            return
        for report in parse_reports(text.splitlines()):
            if report.kind == ReportKind.STAGE and report.stage == "preparing":
                timeline.mark("preparing", _ts(report.time))
            if report.kind == ReportKind.PROGRESS and (report.step or 0) >= 1:
                timeline.mark("preparing", _ts(report.time))  # (a log whose first lines rotated away)
                timeline.mark("step", _ts(report.time))


@contextmanager
def demo_platform(build_images: bool, models: tuple[str, ...], namespace: str) -> Iterator[demo.Target]:
    """The local cluster with the operator installed as the demo installs it, `models` in its S3 and `namespace`
    ready; afterwards the namespace is deleted and a release installed here is uninstalled (one that was there
    before is kept). bench/gang_bench.py uses it too."""
    target = demo.ensure_cluster(build_images=build_images)
    had_release = demo.helm(target, "status", demo.RELEASE, "-n", demo.OPERATOR_NAMESPACE, check=False).returncode == 0
    demo.install_operator(target)
    demo.seed_storage(target, models=models)
    demo.prepare_namespace(target, namespace)
    try:
        yield target
    finally:
        demo.kubectl(target, "delete", "namespace", namespace, "--wait=false", check=False)
        if not had_release:
            demo.helm(target, "uninstall", demo.RELEASE, "-n", demo.OPERATOR_NAMESPACE, "--wait", check=False)


def finetunejob(run: str) -> dict[str, Any]:
    job = yaml.safe_load(EXAMPLE.read_text())
    job["metadata"] = {"name": f"submit-{run}", "namespace": NAMESPACE}
    job["spec"]["output"]["uri"] = f"s3://{demo.BUCKET}/bench-submit/{run}/"
    job["spec"]["hyperparameters"]["loggingSteps"] = 1
    return dict(job)


def plain_job(resolved_config: dict[str, Any], run: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The operator's ConfigMap and trainer Job for a job named plain-RUN, without the operator: no owner, and
    none of the labels the operator watches."""
    meta = {"name": f"plain-{run}", "namespace": NAMESPACE, "uid": ""}
    data = copy.deepcopy(resolved_config)
    spec_yaml = yaml.safe_load(data[builders.CONFIG_FILE])
    spec_yaml["metadata"]["name"] = meta["name"]
    spec_yaml["spec"]["output"]["uri"] = f"s3://{demo.BUCKET}/bench-submit/plain-{run}/"
    from finetune_api.spec import FineTuneJobSpec

    spec = FineTuneJobSpec.model_validate(spec_yaml["spec"])
    cm = builders.build_config_map(meta, spec)
    job = builders.build_workload(meta, spec, "Never")
    for obj in (cm, job, job["spec"]["template"]):
        labels = obj["metadata"]["labels"]
        labels.pop(builders.LABEL_MANAGED_BY, None)
        labels.pop(builders.LABEL_UID, None)
        labels["bench"] = "submit-plain"
    return cm, job


def run_ftj(cluster: Cluster, target: demo.Target, run: str) -> tuple[Timeline, dict[str, Any]]:
    job = finetunejob(run)
    timeline = Timeline(time.time())
    demo.kubectl(target, "apply", "-f", "-", input=json.dumps(job))
    name = job["metadata"]["name"]
    selector = f"{builders.LABEL_COMPONENT}=trainer,{builders.LABEL_JOB}={name}"
    cluster.follow(timeline, builders.workload_name(name), selector, name)
    resolved = cluster.core.read_namespaced_config_map(builders.config_name(name), NAMESPACE).data or {}
    demo.kubectl(target, "-n", NAMESPACE, "delete", "finetunejob", name, "--wait=false")
    return timeline, dict(resolved)


def run_plain(cluster: Cluster, target: demo.Target, resolved: dict[str, Any], run: str) -> Timeline:
    cm, job = plain_job(resolved, run)
    timeline = Timeline(time.time())
    demo.kubectl(target, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [cm, job]}))
    name = job["metadata"]["name"]
    cluster.follow(timeline, name, f"job-name={name}", None)
    demo.kubectl(target, "-n", NAMESPACE, "delete", "job,configmap", "-l", "bench=submit-plain", "--wait=false")
    return timeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="Jobs of each kind (default 2); the median is shown.")
    parser.add_argument("--quick", action="store_true", help="One run of each kind; does not write --docs.")
    parser.add_argument("--no-build", action="store_true", help="Do not (re)build the images.")
    parser.add_argument(
        "--docs", default=str(REPO / "docs" / "benchmarks.md"), help="Where the table goes ('' = none)."
    )
    args = parser.parse_args()
    if args.quick:
        args.runs, args.docs = 1, ""

    ours: list[Timeline] = []
    plain: list[Timeline] = []
    with demo_platform(not args.no_build, ("tiny-gpt2",), NAMESPACE) as target:
        cluster = Cluster(target)
        for i in range(args.runs):
            run = f"{uuid.uuid4().hex[:6]}"
            timeline, resolved = run_ftj(cluster, target, run)
            ours.append(timeline)
            plain.append(run_plain(cluster, target, resolved, run))
            print(f"run {i + 1}: FineTuneJob {timeline.total:.1f}s, plain Job {plain[-1].total:.1f}s", flush=True)

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    rows = []
    for stage in STAGES:
        our = median([t.stages(plain=False)[stage] for t in ours])
        base = [t.stages(plain=True).get(stage) for t in plain]
        baseline = f"{median([b for b in base if b is not None]):.1f} s" if all(b is not None for b in base) else "-"
        rows.append(Row("submit -> first step", stage, f"plain Job: {baseline}", f"{our:.1f} s", None))
    total, base_total = median([t.total for t in ours]), median([t.total for t in plain])
    rows.append(
        Row(
            "submit -> first step",
            "total (apply -> step 1)",
            f"plain Job: {base_total:.1f} s",
            f"{total:.1f} s ({total / base_total:.2f}x the plain Job; +{total - base_total:.1f} s)",
            None,
        )
    )
    print(text_table(rows))
    if args.docs:
        command = f"python bench/submit_bench.py --runs {args.runs}"
        date = time.strftime("%Y-%m-%d", time.gmtime())
        body = (
            f"Median of {args.runs} runs of `{EXAMPLE.name}` (tiny GPT-2, 1 CPU) on the local single-node cluster, "
            "warm images; the plain Job is the same trainer pod (same image, resolved config and node) created "
            "directly, without the operator. Stages as `bench/submit_bench.py` defines them. Milestones are first "
            "seen by polling (0.1 s, slower on a loaded machine), so a short stage can be absorbed by its "
            "neighbour (here the FineTuneJob's pod is often already bound when its Job is first seen); the totals "
            "do not depend on that. The difference is the CPU preflight: a pod of the trainer image that imports "
            "the libraries, reads the data and sizes the job before any GPU is requested (on this cluster with "
            "`policy.preflight.cpu: 500m`); for a GPU job it is paid once, before minutes of model download.\n\n"
            + markdown_table(rows, date, machine(), command)
        )
        write_section(Path(args.docs), "bench-submit", body, "Submit to first step (`make bench-submit`)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
