"""Status is computed from observations: every phase, attempts, progress and the verdict."""

from __future__ import annotations

from typing import Any

from finetune_api.reports import Report, ReportKind, format_report
from finetune_api.status import ConditionType, FineTuneJobStatus
from finetune_operator.observe import Observation, compute_status, fold_reports, job_view, pod_view, set_condition

NOW = "2026-01-01T00:00:10Z"


def pod(name: str, phase: str, **state: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "creationTimestamp": f"2026-01-01T00:00:0{name[-1]}Z"},
        "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]},
    }


def job(**status: Any) -> Any:
    return job_view({"metadata": {"name": "j-trainer"}, "status": status})


def rep(seq: int, kind: ReportKind, **kw: Any) -> Report:
    return Report(seq=seq, kind=kind, time=NOW, **kw)


def status_of(obs: Observation, prev: dict[str, Any] | None = None) -> dict[str, Any]:
    """The typed computation, shown as the dict the API server stores (camelCase, unset fields left out)."""
    before = FineTuneJobStatus.model_validate(prev or {"phase": "Pending"})
    return compute_status(before, obs, generation=1, backoff_limit=3, keep_checkpoints=2, now=NOW).dump()


def test_pending_explains_why() -> None:
    p = pod("p1", "Pending", waiting={"reason": "ImagePullBackOff", "message": "image not found"})
    s = status_of(Observation(job=job(active=1), pods=[pod_view(p)]))
    assert (s["phase"], s["reason"], s["message"]) == ("Pending", "ImagePullBackOff", "image not found")
    unsched = {
        "metadata": {"name": "p1", "creationTimestamp": "x"},
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes: gpu"}
            ],
        },
    }
    s = status_of(Observation(job=job(active=1), pods=[pod_view(unsched)]))
    assert s["reason"] == "Unschedulable" and "gpu" in s["message"]


def test_running_with_progress() -> None:
    p = pod("p1", "Running", running={"startedAt": "2026-01-01T00:00:02Z"})
    reports = [rep(1, ReportKind.PROGRESS, step=30, total_steps=120, loss=2.5, tokens_per_second=900.0, eta_seconds=60)]
    s = status_of(Observation(job=job(active=1), pods=[pod_view(p)], reports=reports))
    assert s["phase"] == "Running"
    assert s["progress"]["percent"] == 25.0 and s["progress"]["summary"] == "25% (30/120)"
    assert s["loss"] == 2.5 and s["progress"]["tokensPerSecond"] == 900.0
    assert s["startTime"] == "2026-01-01T00:00:02Z"
    running = next(c for c in s["conditions"] if c["type"] == "Running")
    assert running["status"] == "True" and running["observedGeneration"] == 1


def test_succeeded_with_output() -> None:
    p = pod("p1", "Succeeded", terminated={"exitCode": 0, "reason": "Completed"})
    reports = [
        rep(9, ReportKind.OUTPUT, uri="s3://o/j/model/", manifest="s3://o/j/manifest.json", metrics={"eval_loss": 1.0})
    ]
    s = status_of(
        Observation(
            job=job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}]),
            pods=[pod_view(p)],
            reports=reports,
        )
    )
    assert s["phase"] == "Succeeded" and s["completionTime"] == NOW
    assert s["output"]["manifest"] == "s3://o/j/manifest.json" and s["metrics"]["eval_loss"] == 1.0


def test_user_error_fails_at_once_with_the_trainers_reason() -> None:
    err = rep(2, ReportKind.ERROR, reason="DataError", message="train.jsonl line 7: malformed JSON")
    p = pod("p1", "Failed", terminated={"exitCode": 2, "reason": "Error", "message": format_report(err)})
    s = status_of(Observation(job=job(active=0, failed=1), pods=[pod_view(p)]))
    assert (s["phase"], s["reason"]) == ("Failed", "DataError")
    assert "line 7" in s["message"]


def test_retry_then_backoff_limit() -> None:
    p1 = pod("p1", "Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})
    p2 = pod("p2", "Pending", waiting={"reason": "ContainerCreating"})
    s = status_of(Observation(job=job(active=1, failed=1), pods=[pod_view(p1), pod_view(p2)]))
    assert s["phase"] == "Pending" and s["attempts"] == 2
    failed_job = job(failed=4, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}])
    s = status_of(Observation(job=failed_job, pods=[pod_view(p1)]))
    assert s["phase"] == "Failed" and s["attempts"] == 4 and "backoffLimit=3" in s["message"]


def test_deadline() -> None:
    dl = job(failed=1, conditions=[{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}])
    assert status_of(Observation(job=dl))["reason"] == "DeadlineExceeded"


def test_terminal_phase_is_sticky() -> None:
    prev = {"phase": "Succeeded", "reason": "Completed", "message": "done", "completionTime": "t0"}
    s = status_of(Observation(job=None), prev=prev)
    assert s["phase"] == "Succeeded" and s["completionTime"] == "t0"


def test_fold_is_idempotent_and_keeps_last_checkpoints() -> None:
    reports = [rep(i, ReportKind.CHECKPOINT, step=i * 10, uri=f"s3://o/c-{i * 10}/") for i in range(1, 5)]
    once = fold_reports(FineTuneJobStatus(), reports, keep=2)
    twice = fold_reports(once, reports, keep=2)
    assert once == twice
    assert [c.step for c in once.checkpoints] == [30, 40]


def test_condition_transition_time_only_moves_on_change() -> None:
    running = ConditionType.RUNNING
    c1 = set_condition([], running, "True", "Training", "m", 1, "t1")
    c2 = set_condition(c1, running, "True", "Training", "m2", 1, "t2")
    c3 = set_condition(c2, running, "False", "Completed", "m3", 1, "t3")
    assert c2[0].last_transition_time == "t1" and c3[0].last_transition_time == "t3"


def test_a_vanished_pod_still_counts_as_an_attempt() -> None:
    """kubectl delete --force removes the pod without the Job controller counting a failure."""
    first = status_of(Observation(job=job(active=1), pods=[pod_view(pod("p1", "Running", running={}))]))
    assert first["attempts"] == 1
    again = status_of(Observation(job=job(active=1), pods=[pod_view(pod("p1", "Running", running={}))]), prev=first)
    assert again["attempts"] == 1
    second = status_of(Observation(job=job(active=1), pods=[pod_view(pod("p2", "Pending"))]), prev=again)
    assert second["attempts"] == 2 and second["trainerPods"] == ["p1", "p2"]


def statuses(*pod_sets: list[Any], backoff: int = 1, deadline: float | None = None, now: str = NOW) -> Any:
    """Feed successive observations (lists of pods) through compute_status, as the controller does."""
    status = FineTuneJobStatus.model_validate({"phase": "Pending"})
    for pods in pod_sets:
        status = compute_status(
            status,
            Observation(job=job(active=1), pods=[pod_view(p) for p in pods]),
            generation=1,
            backoff_limit=backoff,
            keep_checkpoints=2,
            now=now,
            start_deadline_seconds=deadline,
        )
    return status


def test_interruptions_are_retried_without_counting_against_the_backoff_limit() -> None:
    sigterm = pod("p1", "Failed", terminated={"exitCode": 143, "reason": "Error"})
    evicted = {**pod("p2", "Failed"), "status": {"phase": "Failed", "reason": "Evicted", "message": "node low"}}
    drained = pod("p3", "Failed", terminated={"exitCode": 137, "reason": "Error"})
    drained["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:05Z"
    s = statuses([sigterm], [sigterm, evicted], [sigterm, evicted, drained], backoff=0)
    assert (s.phase, s.failures, s.interruptions) == ("Pending", 0, 3)
    assert s.reason == "Retrying" and "interrupted" in (s.message or "")


def test_crashes_count_once_each_until_the_budget_is_spent() -> None:
    oom = pod("p1", "Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})
    crash = pod("p2", "Failed", terminated={"exitCode": 1, "reason": "Error"})
    s = statuses([oom], [oom], [oom, pod("p2", "Pending")], backoff=1)
    assert (s.phase, s.failures) == ("Pending", 1)  # the same failed pod seen three times counts once
    s = statuses([oom], [oom, crash], backoff=1)
    assert (s.phase, s.failures) == ("Failed", 2) and "backoffLimit=1" in (s.message or "")


def test_a_pod_that_can_never_start_fails_at_once_naming_what_is_missing() -> None:
    waiting = {"reason": "CreateContainerConfigError", "message": 'secret "s3-credentials" not found'}
    s = statuses([pod("p1", "Pending", waiting=waiting)])
    assert (s.phase, s.reason) == ("Failed", "MissingConfig") and "s3-credentials" in (s.message or "")
    never = {"reason": "ErrImageNeverPull", "message": 'Container image "x:1" is not present'}
    assert statuses([pod("p1", "Pending", waiting=never)]).reason == "ImageNotPresent"


def test_a_pod_that_does_not_start_fails_after_the_start_deadline() -> None:
    unsched = pod("p1", "Pending")  # created 00:00:01
    unsched["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes: gpu"}
    ]
    early = statuses([unsched], deadline=60, now="2026-01-01T00:00:50Z")
    assert (early.phase, early.reason) == ("Pending", "Unschedulable")
    late = statuses([unsched], deadline=60, now="2026-01-01T00:01:02Z")
    assert (late.phase, late.reason) == ("Failed", "StartDeadlineExceeded") and "0/1 nodes: gpu" in (late.message or "")


def test_the_trainers_interrupted_exit_code_is_an_interruption() -> None:
    from finetune_api.reports import EXIT_INTERRUPTED

    stopped = pod("p1", "Failed", terminated={"exitCode": EXIT_INTERRUPTED, "reason": "Error"})
    s = statuses([stopped], backoff=0)
    assert (s.phase, s.failures, s.interruptions) == ("Pending", 0, 1)


def test_a_kubelet_that_has_not_looked_the_secret_up_yet_is_not_a_verdict() -> None:
    syncing = {"reason": "CreateContainerConfigError", "message": "failed to sync secret cache: timed out waiting"}
    assert statuses([pod("p1", "Pending", waiting=syncing)]).phase == "Pending"
    # ... but once it lasts, it is final, and the message names the Secret the job references.
    late = compute_status(
        FineTuneJobStatus.model_validate({"phase": "Pending"}),
        Observation(job=job(active=1), pods=[pod_view(pod("p1", "Pending", waiting=syncing))], secrets=["s3-creds"]),
        generation=1,
        backoff_limit=1,
        keep_checkpoints=2,
        now="2026-01-01T00:01:00Z",
    )
    assert (late.phase, late.reason) == ("Failed", "MissingConfig") and "Secret s3-creds" in (late.message or "")
    missing_key = {"reason": "CreateContainerConfigError", "message": "couldn't find key AWS_KEY in Secret ns/s3"}
    assert statuses([pod("p1", "Pending", waiting=missing_key)]).reason == "MissingConfig"
