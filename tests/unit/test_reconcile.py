"""The one decision function: (spec, status, observation) -> (status, actions), for every lifecycle step."""

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
from finetune_operator.reconcile import (
    MAX_SPEC_BYTES,
    CreateWorkload,
    Decision,
    DeleteWorkload,
    JobRef,
    PostEvent,
    StopWorkload,
    SyncConfig,
    decide,
    rejected,
    spec_size_problem,
)
from finetune_operator.validation import validate_spec

NOW = dt.datetime(2026, 1, 1, 0, 1, 0, tzinfo=dt.UTC)
REF = JobRef("team-a", "qa", "uid-1", 1)
SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/tiny-gpt2/"},
    "task": "instruction",
    "dataset": {
        "train": "s3://data/qa.jsonl",
        "template": {"prompt": "### Question:\n{question}\n### Answer:\n", "response": "{answer}"},
    },
    "method": {"type": "lora"},
    "output": {"uri": "s3://out/job/"},
    "runPolicy": {"backoffLimit": 2},
}
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def run(
    spec: dict[str, Any] = SPEC,
    status: dict[str, Any] | None = None,
    obs: Observation | None = None,
    ref: JobRef = REF,
    now: dt.datetime = NOW,
) -> Decision:
    validation = validate_spec(copy.deepcopy(spec), OperatorConfig())
    return decide(
        ref,
        spec,
        FineTuneJobStatus.model_validate(status or {}),
        obs or Observation(job=None),
        validation,
        image_pull_policy="IfNotPresent",
        now=now,
    )


def job(**status: Any) -> Any:
    return job_view({"metadata": {"name": "qa-trainer"}, "status": status})


def pod(name: str, phase: str, **state: Any) -> Any:
    return pod_view(
        {
            "metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]},
        }
    )


def events(d: Decision) -> list[tuple[str, str]]:
    return [(a.type, a.reason) for a in d.actions if isinstance(a, PostEvent)]


def test_a_new_valid_job_gets_its_adopted_workload_and_pending() -> None:
    d = run()
    create = next(a for a in d.actions if isinstance(a, CreateWorkload))
    for child in (create.config_map, create.job):
        owner = child["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["uid"], owner["controller"]) == ("FineTuneJob", "uid-1", True)
    assert create.job["metadata"]["name"] == "qa-trainer" and create.event_reason == "WorkloadCreated"
    s = d.status.dump()
    assert (s["phase"], s["workload"], s["observedGeneration"]) == ("Pending", "qa-trainer", 1)
    assert {c["type"]: c["status"] for c in s["conditions"]}["Validated"] == "True"


def test_invalid_job_fails_once_with_one_warning() -> None:
    bad = {**SPEC, "output": {"uri": "gs://bucket/x"}}
    d = run(bad)
    assert d.status.phase == "Failed" and d.status.reason == "InvalidURI"
    assert events(d) == [("Warning", "InvalidURI")] and not any(isinstance(a, CreateWorkload) for a in d.actions)
    again = run(bad, status=d.status.dump())
    assert again.status == d.status.model_copy(update={"conditions": again.status.conditions}) and events(again) == []


def test_a_fixed_spec_revives_a_job_that_failed_validation() -> None:
    failed = run({**SPEC, "output": {"uri": "gs://bucket/x"}}).status.dump()
    d = run(status=failed, ref=JobRef("team-a", "qa", "uid-1", 2))
    assert d.status.phase == "Pending" and any(isinstance(a, CreateWorkload) for a in d.actions)
    assert "Failed" not in {c.type for c in d.status.conditions}


def test_running_pod_gives_running_and_one_event() -> None:
    pending = run().status.dump()
    obs = Observation(job=job(active=1), pods=[pod("qa-trainer-x", "Running", running={"startedAt": "t"})])
    d = run(status=pending, obs=obs)
    assert d.status.phase == "Running" and events(d) == [("Normal", "TrainerStarted")]
    assert events(run(status=d.status.dump(), obs=obs)) == []


def test_user_error_is_final_and_stops_the_job() -> None:
    err = Report(seq=3, kind=ReportKind.ERROR, time="t", reason="DataError", message="qa.jsonl line 7")
    obs = Observation(
        job=job(failed=1), pods=[pod("p1", "Failed", terminated={"exitCode": 2, "message": format_report(err)})]
    )
    d = run(status=run().status.dump(), obs=obs)
    assert (d.status.phase, d.status.reason) == ("Failed", "DataError")
    assert StopWorkload("qa-trainer") in d.actions and ("Warning", "DataError") in events(d)


def test_suspend_deletes_the_job_and_resume_recreates_it() -> None:
    running = run(status=run().status.dump(), obs=Observation(job=job(active=1), pods=[pod("p", "Running")]))
    suspended_spec = {**SPEC, "runPolicy": {"suspend": True}}
    d = run(suspended_spec, status=running.status.dump(), obs=Observation(job=job(active=1)))
    assert d.status.phase == "Suspended" and DeleteWorkload("qa-trainer") in d.actions
    assert events(d) == [("Normal", "Suspended")]
    resumed = run(status=d.status.dump(), ref=JobRef("team-a", "qa", "uid-1", 3))
    assert resumed.status.phase == "Pending" and any(isinstance(a, CreateWorkload) for a in resumed.actions)


def test_a_job_deleted_by_hand_is_recreated() -> None:
    running = run(status=run().status.dump(), obs=Observation(job=job(active=1), pods=[pod("p", "Running")]))
    d = run(status=running.status.dump(), obs=Observation(job=None))
    create = next(a for a in d.actions if isinstance(a, CreateWorkload))
    assert create.event_reason == "WorkloadRecreated"


def test_spec_edit_while_pending_rewrites_the_config() -> None:
    pending = run(status=run().status.dump(), obs=Observation(job=job(active=1))).status.dump()
    edited = {**SPEC, "hyperparameters": {"epochs": 5}}
    d = run(edited, status=pending, obs=Observation(job=job(active=1)), ref=JobRef("team-a", "qa", "uid-1", 2))
    sync = next(a for a in d.actions if isinstance(a, SyncConfig))
    assert "epochs: 5" in sync.config_map["data"]["job.yaml"] and d.status.observed_generation == 2


def test_finished_job_waits_for_ttl_then_deletes_its_job() -> None:
    spec = {**SPEC, "runPolicy": {"ttlSecondsAfterFinished": 60}}
    done = job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    d = run(spec, status=run(spec).status.dump(), obs=Observation(job=done, pods=[pod("p", "Succeeded")]))
    assert d.status.phase == "Succeeded" and d.requeue_after == 60
    later = run(spec, status=d.status.dump(), obs=Observation(job=done), now=NOW + dt.timedelta(seconds=59))
    assert later.actions == [] and later.requeue_after is not None and 0 < later.requeue_after <= 1
    gone = run(spec, status=d.status.dump(), obs=Observation(job=done), now=NOW + dt.timedelta(seconds=61))
    assert gone.actions == [DeleteWorkload("qa-trainer")]
    assert run(spec, status=d.status.dump(), obs=Observation(job=None), now=NOW + dt.timedelta(hours=1)).actions == []


def test_finished_job_ignores_spec_edits() -> None:
    done = job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    d = run(status=run().status.dump(), obs=Observation(job=done))
    edited = run({**SPEC, "method": {"type": "full"}}, status=d.status.dump(), ref=JobRef("team-a", "qa", "uid-1", 2))
    assert edited.status == d.status and edited.actions == []


def test_rejected_child_becomes_a_failed_verdict() -> None:
    d = rejected(run().status, REF, "Job", 'metadata.labels: Invalid value: "x"', NOW)
    assert (d.status.phase, d.status.reason) == ("Failed", "WorkloadRejected") and "Invalid value" in d.status.message
    assert events(d) == [("Warning", "WorkloadRejected")] and d.status.workload is None


def test_long_names_make_valid_labels_and_children() -> None:
    name = "a" * 120 + ".b" * 60
    d = run(ref=JobRef("team-a", name, "uid-1", 1))
    create = next(a for a in d.actions if isinstance(a, CreateWorkload))
    for child in (create.config_map, create.job, create.job["spec"]["template"]):
        for value in child["metadata"]["labels"].values():
            assert len(value) <= 63 and LABEL_VALUE.match(value), value
    assert len(create.job["metadata"]["name"]) <= 52 and len(create.config_map["metadata"]["name"]) <= 52
    other = builders.label_value("a" * 120 + ".b" * 59 + ".c")
    assert other != create.job["metadata"]["labels"][builders.LABEL_JOB]


def test_spec_size_limit() -> None:
    assert spec_size_problem(SPEC) is None
    huge = {**SPEC, "evaluation": {"samplePrompts": ["x" * 1000] * (MAX_SPEC_BYTES // 1000 + 1)}}
    problem = spec_size_problem(huge)
    assert problem is not None and "KiB" in problem


def test_a_kueue_queue_label_passes_to_a_suspended_job_shown_as_queued() -> None:
    ref = JobRef("team-a", "qa", "uid-1", 1, queue_name="gpu-queue")
    create = next(a for a in run(ref=ref).actions if isinstance(a, CreateWorkload))
    assert create.job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert create.job["spec"]["suspend"] is True
    assert "suspend" not in next(a for a in run().actions if isinstance(a, CreateWorkload)).job["spec"]
    waiting = job_view({"metadata": {"name": "qa-trainer"}, "spec": {"suspend": True}, "status": {}})
    d = run(status=run(ref=ref).status.dump(), obs=Observation(job=waiting), ref=ref)
    assert (d.status.phase, d.status.reason) == ("Queued", "WaitingForQueue") and d.status.queued_since


def test_a_pending_job_is_woken_when_its_start_deadline_passes() -> None:
    unsched = pod_view(
        {
            "metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:30Z"},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False"}]},
        }
    )
    obs = Observation(job=job(active=1), pods=[unsched])
    validation = validate_spec(copy.deepcopy(SPEC), OperatorConfig())
    status = FineTuneJobStatus.model_validate(run().status.dump())
    d = decide(REF, SPEC, status, obs, validation, image_pull_policy="Never", now=NOW, start_deadline_seconds=60)
    assert d.status.phase == "Pending" and d.requeue_after is not None and 30 < d.requeue_after <= 31


def test_suspended_time_does_not_count_against_the_active_deadline() -> None:
    spec = {**SPEC, "runPolicy": {"activeDeadlineSeconds": 3600}}
    started = job_view(
        {"metadata": {"name": "qa-trainer"}, "status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}}
    )
    running = run(spec, status=run(spec).status.dump(), obs=Observation(job=started, pods=[pod("p", "Running")]))
    paused_spec = {**spec, "runPolicy": {"activeDeadlineSeconds": 3600, "suspend": True}}
    paused = run(paused_spec, status=running.status.dump(), obs=Observation(job=started))  # 60 s after the start
    assert paused.status.active_seconds == 60
    again = run(paused_spec, status=paused.status.dump(), obs=Observation(job=started), now=NOW + dt.timedelta(hours=5))
    assert again.status.active_seconds == 60  # the Job is still being deleted: counted once
    resumed = run(
        spec, status=again.status.dump(), now=NOW + dt.timedelta(hours=9), ref=JobRef("team-a", "qa", "uid-1", 3)
    )
    create = next(a for a in resumed.actions if isinstance(a, CreateWorkload))
    assert create.job["spec"]["activeDeadlineSeconds"] == 3600 - 60


def test_cancel_stops_the_trainer_and_ends_as_cancelled_for_good() -> None:
    running = run(status=run().status.dump(), obs=Observation(job=job(active=1), pods=[pod("p", "Running")]))
    spec = {**SPEC, "runPolicy": {"cancel": True}}
    d = run(
        spec, status=running.status.dump(), obs=Observation(job=job(active=1)), ref=JobRef("team-a", "qa", "uid-1", 2)
    )
    assert (d.status.phase, d.status.reason) == ("Cancelled", "Cancelled") and d.status.completion_time
    assert DeleteWorkload("qa-trainer") in d.actions and ("Normal", "Cancelled") in events(d)
    later = run({**SPEC}, status=d.status.dump(), ref=JobRef("team-a", "qa", "uid-1", 3))  # un-cancelling: no
    assert later.status.phase == "Cancelled" and later.actions == []


def test_on_current_clusters_the_job_controller_applies_the_failure_rules_itself() -> None:
    validation = validate_spec(copy.deepcopy(SPEC), OperatorConfig())
    new = decide(
        REF, SPEC, FineTuneJobStatus(), Observation(job=None), validation, image_pull_policy="Never", now=NOW,
        pod_failure_policy=True,
    )  # fmt: skip
    create = next(a for a in new.actions if isinstance(a, CreateWorkload))
    rules = create.job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]},
    }
    assert {r["action"] for r in rules[1:]} == {"Ignore"}
    old = next(a for a in run().actions if isinstance(a, CreateWorkload))
    assert "podFailurePolicy" not in old.job["spec"]  # Kubernetes 1.20 would drop it anyway
