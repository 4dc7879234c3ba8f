"""A gang (resources.workers > 1) in the one decision: worker Jobs with stable ranks, the rendezvous address from
worker 0's pod, all-or-nothing restarts counted once, a start deadline that releases everything, and a user error
on any worker that names it."""

from __future__ import annotations

import copy
import datetime as dt
import re
from typing import Any

from finetune_api.reports import Report, ReportKind, format_report
from finetune_api.status import FineTuneJobStatus
from finetune_operator import builders
from finetune_operator.config import OperatorConfig
from finetune_operator.observe import Observation, job_view, pod_view
from finetune_operator.reconcile import CreateWorkload, Decision, DeleteWorkload, JobRef, PostEvent, decide
from finetune_operator.validation import validate_spec

NOW = dt.datetime(2026, 1, 1, 0, 1, 0, tzinfo=dt.UTC)
REF = JobRef("team-a", "gang", "uid-1", 1)
SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/tiny-llama/"},
    "task": "causal-lm",
    "dataset": {"train": "s3://data/lines.txt"},
    "method": {"type": "full"},
    "resources": {"gpus": 0, "workers": 2},
    "output": {"uri": "s3://out/gang/"},
    "runPolicy": {"backoffLimit": 1},
}
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def run(
    status: FineTuneJobStatus | None = None,
    obs: Observation | None = None,
    spec: dict[str, Any] = SPEC,
    now: dt.datetime = NOW,
    ref: JobRef = REF,
) -> Decision:
    return decide(
        ref,
        spec,
        status or FineTuneJobStatus(),
        obs or Observation(job=None),
        validate_spec(copy.deepcopy(spec), OperatorConfig()),
        image_pull_policy="IfNotPresent",
        now=now,
        start_deadline_seconds=600,
    )


def worker_job(rank: int, **status: Any) -> Any:
    labels = {"finetune.dev/worker-rank": str(rank)}
    return job_view({"metadata": {"name": f"gang-worker-{rank}", "labels": labels}, "status": status})


def worker_pod(rank: int, phase: str, n: int = 1, ip: str | None = None, created: str = "2026-01-01T00:00:30Z",
               deleting: bool = False, **state: Any) -> Any:  # fmt: skip
    meta: dict[str, Any] = {
        "name": f"gang-worker-{rank}-{n}",
        "creationTimestamp": created,
        "labels": {"finetune.dev/worker-rank": str(rank), "app.kubernetes.io/component": "trainer"},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    status: dict[str, Any] = {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]}
    if ip:
        status["podIP"] = ip
    return pod_view({"metadata": meta, "status": status})


def running(rank: int, ip: str | None = None, n: int = 1) -> Any:
    return worker_pod(rank, "Running", n=n, ip=ip or f"198.18.100.{20 + rank}", running={"startedAt": "t"})


def created(d: Decision) -> list[dict[str, Any]]:
    return [a.job for a in d.actions if isinstance(a, CreateWorkload)]


def env(job: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def events(d: Decision) -> list[tuple[str, str]]:
    return [(a.type, a.reason) for a in d.actions if isinstance(a, PostEvent)]


def test_worker_zero_first_then_the_others_with_its_pod_ip_as_rendezvous() -> None:
    first = run()
    (job,) = created(first)
    assert job["metadata"]["name"] == "gang-worker-0" and env(job)["FINETUNE_WORKER_RANK"] == "0"
    assert env(job)["FINETUNE_WORKERS"] == "2" and job["spec"]["backoffLimit"] == 0
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert (first.status.phase, first.status.reason, first.status.attempts) == ("Pending", "WaitingForWorkers", 1)
    # Worker 0's pod has no IP yet: nobody else is created.
    waiting = run(
        first.status,
        Observation(
            job=None,
            workers={0: worker_job(0, active=1)},
            pods=[worker_pod(0, "Pending", waiting={"reason": "ContainerCreating"})],
        ),
    )
    assert created(waiting) == [] and waiting.status.workers == "0/2"
    ip = run(
        first.status, Observation(job=None, workers={0: worker_job(0, active=1)}, pods=[running(0, "198.18.100.21")])
    )
    (other,) = created(ip)
    assert other["metadata"]["name"] == "gang-worker-1"
    assert env(other)["FINETUNE_RDZV_HOST"] == "198.18.100.21" and env(other)["FINETUNE_WORKER_RANK"] == "1"
    assert ip.status.workers == "1/2" and "worker 1" in (ip.status.message or "")


def test_all_workers_running_is_running_once() -> None:
    obs = Observation(job=None, workers={r: worker_job(r, active=1) for r in (0, 1)}, pods=[running(0), running(1)])
    d = run(FineTuneJobStatus(attempts=1, phase="Pending"), obs)
    assert (d.status.phase, d.status.workers) == ("Running", "2/2") and events(d) == [("Normal", "TrainerStarted")]
    assert created(d) == []  # every worker's Job exists: nothing is created again
    assert events(run(d.status, obs)) == []


def test_a_failed_worker_restarts_the_whole_gang_counted_once_then_resumes() -> None:
    jobs = {r: worker_job(r, active=1) for r in (0, 1)}
    crashed = worker_pod(1, "Failed", terminated={"exitCode": 1, "reason": "Error"})
    d = run(
        FineTuneJobStatus(attempts=1, phase="Running"), Observation(job=None, workers=jobs, pods=[running(0), crashed])
    )
    assert set(a for a in d.actions if isinstance(a, DeleteWorkload)) == {
        DeleteWorkload("gang-worker-0"),
        DeleteWorkload("gang-worker-1"),
    }
    assert (d.status.phase, d.status.reason, d.status.failures) == ("Pending", "Restarting", 1)
    assert "worker 1 failed" in (d.status.message or "")
    # The same failure seen again (worker 0 now stopping too) is not counted again.
    stopping = worker_pod(0, "Running", ip="198.18.100.20", deleting=True, running={"startedAt": "t"})
    again = run(d.status, Observation(job=None, workers=jobs, pods=[stopping, crashed]))
    assert (again.status.failures, again.status.interruptions) == (1, 0)
    # Jobs gone, pods still stopping: wait; nothing is created.
    wait = run(again.status, Observation(job=None, pods=[stopping]))
    assert created(wait) == [] and wait.status.reason == "Restarting"
    # All gone: the next attempt starts with worker 0.
    restart = run(wait.status, Observation(job=None))
    assert [j["metadata"]["name"] for j in created(restart)] == ["gang-worker-0"] and restart.status.attempts == 2


def test_an_evicted_worker_is_an_interruption_and_failures_past_the_limit_end_the_job() -> None:
    jobs = {r: worker_job(r, active=1) for r in (0, 1)}
    evicted = worker_pod(1, "Failed", **{"terminated": {"exitCode": 137}})
    evicted = pod_view({"metadata": {"name": "gang-worker-1-1", "creationTimestamp": "2026-01-01T00:00:30Z",
                                     "labels": {"finetune.dev/worker-rank": "1"}},
                        "status": {"phase": "Failed", "reason": "Evicted"}})  # fmt: skip
    d = run(
        FineTuneJobStatus(attempts=1, phase="Running"), Observation(job=None, workers=jobs, pods=[running(0), evicted])
    )
    assert (d.status.failures, d.status.interruptions, d.status.phase) == (0, 1, "Pending")
    crashed = worker_pod(0, "Failed", n=2, terminated={"exitCode": 1})
    tired = FineTuneJobStatus(attempts=3, phase="Running", failures=1)
    end = run(tired, Observation(job=None, workers=jobs, pods=[crashed, running(1, n=2)]))
    assert (end.status.phase, end.status.reason) == ("Failed", "TrainerFailed") and "gave up" in (
        end.status.message or ""
    )
    assert DeleteWorkload("gang-worker-1") in end.actions


def test_a_user_error_on_any_worker_is_final_and_names_it() -> None:
    err = Report(seq=2, kind=ReportKind.ERROR, time="t", reason="DataInvalid", message="line 3 is not JSON", final=True)
    jobs = {r: worker_job(r, active=1) for r in (0, 1)}
    bad = worker_pod(1, "Failed", terminated={"exitCode": 2, "message": format_report(err)})
    d = run(FineTuneJobStatus(attempts=1, phase="Running"), Observation(job=None, workers=jobs, pods=[running(0), bad]))
    assert (d.status.phase, d.status.reason) == ("Failed", "DataInvalid")
    assert (d.status.message or "").startswith("worker 1: line 3") and ("Warning", "DataInvalid") in events(d)
    assert {a for a in d.actions if isinstance(a, DeleteWorkload)} == {DeleteWorkload("gang-worker-0"),
                                                                       DeleteWorkload("gang-worker-1")}  # fmt: skip


def test_a_worker_that_cannot_schedule_fails_the_job_at_the_deadline_and_releases_the_gang() -> None:
    jobs = {r: worker_job(r, active=1) for r in (0, 1)}
    unschedulable = pod_view({
        "metadata": {"name": "gang-worker-1-1", "creationTimestamp": "2026-01-01T00:00:30Z",
                     "labels": {"finetune.dev/worker-rank": "1"}},
        "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                   "reason": "Unschedulable", "message": "0/1 nodes are available: 1 Insufficient cpu."}]},
    })  # fmt: skip
    obs = Observation(job=None, workers=jobs, pods=[running(0), unschedulable])
    before = run(FineTuneJobStatus(attempts=1, phase="Pending"), obs, now=NOW + dt.timedelta(minutes=5))
    assert before.status.reason == "WaitingForWorkers" and "worker 1: Unschedulable" in (before.status.message or "")
    assert before.requeue_after is not None and 0 < before.requeue_after <= 331
    after = run(before.status, obs, now=NOW + dt.timedelta(minutes=11))
    assert (after.status.phase, after.status.reason) == ("Failed", "WaitingForWorkers")
    assert "1 of 2 pods Unschedulable" in (after.status.message or "") and "Insufficient cpu" in (
        after.status.message or ""
    )
    assert {a for a in after.actions if isinstance(a, DeleteWorkload)} == {DeleteWorkload("gang-worker-0"),
                                                                           DeleteWorkload("gang-worker-1")}  # fmt: skip


def test_worker_zero_completing_is_success_with_its_output() -> None:
    out = Report(seq=9, kind=ReportKind.OUTPUT, time="t", uri="s3://out/gang/model/", manifest="s3://out/gang/m.json")
    done = worker_pod(0, "Succeeded", terminated={"exitCode": 0, "message": format_report(out)})
    jobs = {0: worker_job(0, succeeded=1, conditions=[{"type": "Complete", "status": "True"}]), 1: worker_job(1)}
    d = run(FineTuneJobStatus(attempts=1, phase="Running"), Observation(job=None, workers=jobs, pods=[done]))
    assert (d.status.phase, d.status.output and d.status.output.uri) == ("Succeeded", "s3://out/gang/model/")
    assert events(d) == [("Normal", "Succeeded")]


def test_suspend_deletes_every_worker() -> None:
    jobs = {r: worker_job(r, active=1) for r in (0, 1)}
    spec = {**SPEC, "runPolicy": {"suspend": True}}
    d = run(FineTuneJobStatus(attempts=1, phase="Running"), Observation(job=None, workers=jobs), spec=spec)
    assert d.status.phase == "Suspended"
    assert {a for a in d.actions if isinstance(a, DeleteWorkload)} == {DeleteWorkload("gang-worker-0"),
                                                                       DeleteWorkload("gang-worker-1")}  # fmt: skip


def test_worker_names_and_labels_fit_for_long_job_names() -> None:
    name = "a" * 200
    for rank in (0, 63):
        job = builders.build_worker({"name": name, "namespace": "ns", "uid": "u"},
                                    validate_spec(copy.deepcopy(SPEC), OperatorConfig()).spec,  # type: ignore[arg-type]
                                    "IfNotPresent", rank, "198.18.100.20")  # fmt: skip
        assert len(job["metadata"]["name"]) <= 52 and job["metadata"]["name"].endswith(f"worker-{rank}")
        for value in job["spec"]["template"]["metadata"]["labels"].values():
            assert len(value) <= 63 and LABEL_VALUE.match(value)


def test_policy_counts_every_worker() -> None:
    over = {**SPEC, "resources": {"gpus": 4, "workers": 3}}
    problems = validate_spec(copy.deepcopy(over), OperatorConfig()).problems
    assert any(p.field == "spec.resources.gpus" and "4 GPUs x 3 workers" in p.message for p in problems)
    many = {**SPEC, "resources": {"gpus": 0, "workers": 5}}
    assert any(
        p.field == "spec.resources.workers" for p in validate_spec(copy.deepcopy(many), OperatorConfig()).problems
    )


def test_a_user_error_seen_after_the_restart_began_still_ends_the_job() -> None:
    """Worker 0 fails first (its peer is gone), the gang is told to restart; then worker 1's exit 2 arrives."""
    err = Report(seq=2, kind=ReportKind.ERROR, time="t", reason="DataNotFound", message="rank 1: no data", final=True)
    restarting = FineTuneJobStatus(attempts=1, phase="Pending", reason="Restarting", failures=1)
    bad = worker_pod(1, "Failed", deleting=True, terminated={"exitCode": 2, "message": format_report(err)})
    d = run(restarting, Observation(job=None, pods=[worker_pod(0, "Failed", terminated={"exitCode": 1}), bad]))
    assert (d.status.phase, d.status.reason) == ("Failed", "DataNotFound") and created(d) == []
    assert (d.status.message or "").startswith("worker 1:")


def test_workers_do_not_hold_after_a_user_error() -> None:
    job = builders.build_worker({"name": "gang", "namespace": "ns", "uid": "u"},
                                validate_spec(copy.deepcopy(SPEC), OperatorConfig()).spec,  # type: ignore[arg-type]
                                "IfNotPresent", 1, "198.18.100.20")  # fmt: skip
    assert "FINETUNE_HOLD_ON_USER_ERROR_SECONDS" not in env(job)
