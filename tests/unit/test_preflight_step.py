"""The preflight step of the one decision: a new job first gets a CPU preflight pod (no GPU), then, by what that
pod reported in its termination message, its trainer's Job with `status.estimate`, or a Failed verdict that
names the numbers and the cheapest fix, or the preflight's own data error. The estimates here come from the real
planner (`finetune_api.plan.estimate`) on real model shapes, not from hand-written numbers."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest

from finetune_api.plan import Estimate, estimate, gpu_type, model_shape
from finetune_api.reports import Report, ReportKind, format_report
from finetune_api.resolve import resolve_spec
from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import FineTuneJobStatus
from finetune_cli.demo import LLAMA_2_7B_CONFIG
from finetune_operator.config import OperatorConfig, Preflight
from finetune_operator.observe import Observation, job_view, pod_view
from finetune_operator.reconcile import CreateWorkload, Decision, DeleteWorkload, JobRef, PostEvent, decide
from finetune_operator.validation import validate_spec

NOW = dt.datetime(2026, 1, 1, 0, 1, 0, tzinfo=dt.UTC)
REF = JobRef("team-a", "qa", "uid-1", 1)
SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/llama/"},
    "task": "instruction",
    "dataset": {
        "train": "s3://data/qa.jsonl",
        "template": {"prompt": "### Question:\n{question}\n### Answer:\n", "response": "{answer}"},
    },
    "method": {"type": "full"},
    "resources": {"gpus": 1},
    "output": {"uri": "s3://out/job/"},
}
# A Llama-2-7B-shaped config.json (the planner needs the config alone, never the weights).
LLAMA_7B = LLAMA_2_7B_CONFIG


def run(status: dict[str, Any] | None = None, obs: Observation | None = None, spec: dict[str, Any] = SPEC, **kw: Any):
    validation = validate_spec(copy.deepcopy(spec), OperatorConfig())
    return decide(
        kw.get("ref", REF),
        spec,
        FineTuneJobStatus.model_validate(status or {}),
        obs or Observation(job=None),
        validation,
        image_pull_policy="IfNotPresent",
        now=kw.get("now", NOW),
        start_deadline_seconds=600,
        preflight_settings=Preflight(),
    )


def plan_for(method: str, gpu: str) -> Estimate:
    spec = FineTuneJobSpec.model_validate({**SPEC, "method": {"type": method}})
    return estimate(resolve_spec(spec).spec, model_shape(LLAMA_7B), gpu_type(gpu), 1)


def preflight_job(**status: Any) -> Any:
    return job_view({"metadata": {"name": "qa-preflight"}, "status": status})


def preflight_pod(phase: str, created: str = "2026-01-01T00:00:30Z", **state: Any) -> Any:
    return pod_view(
        {
            "metadata": {
                "name": "qa-preflight-x",
                "creationTimestamp": created,
                "labels": {"app.kubernetes.io/component": "preflight"},
            },
            "status": {"phase": phase, "containerStatuses": [{"name": "preflight", "state": state}]},
        }
    )


def finished_with(report: Report, exit_code: int) -> Observation:
    phase = "Succeeded" if exit_code == 0 else "Failed"
    done = {"succeeded": 1} if exit_code == 0 else {"failed": 1, "active": 1}
    term = {"exitCode": exit_code, "message": format_report(report)}
    return Observation(
        job=None, preflight=preflight_job(**done), preflight_pods=[preflight_pod(phase, terminated=term)]
    )


def plan_report(est: Estimate) -> Report:
    return Report(seq=5, kind=ReportKind.PLAN, time="t", estimate=est)


def conditions(d: Decision) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in d.status.conditions}


def test_a_new_job_gets_a_cpu_preflight_first_and_no_trainer() -> None:
    d = run()
    creates = [a for a in d.actions if isinstance(a, CreateWorkload)]
    assert len(creates) == 1 and creates[0].job["metadata"]["name"] == "qa-preflight"
    pod_spec = creates[0].job["spec"]["template"]["spec"]
    limits = pod_spec["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits and limits["cpu"] == "1"
    assert "finetune_trainer.preflight" in pod_spec["containers"][0]["command"]
    assert creates[0].job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert (d.status.phase, d.status.reason) == ("Pending", "Preflight")
    assert conditions(d)["Planned"] == ("Unknown", "Preflight")
    # While it runs nothing more is created, and the wait is shown.
    waiting = run(
        d.status.dump(),
        Observation(
            job=None,
            preflight=preflight_job(active=1),
            preflight_pods=[preflight_pod("Pending", waiting={"reason": "ContainerCreating"})],
        ),
    )
    assert waiting.actions == [] and "ContainerCreating" in (waiting.status.message or "")


def test_a_job_that_fits_gets_its_estimate_and_then_its_trainer() -> None:
    est = plan_for("lora", "h100")
    assert est.fits
    d = run(run().status.dump(), finished_with(plan_report(est), 0))
    assert d.status.estimate == est and conditions(d)["Planned"] == ("True", "Fits")
    assert d.actions[0] == DeleteWorkload("qa-preflight")
    create = next(a for a in d.actions if isinstance(a, CreateWorkload))
    assert create.job["metadata"]["name"] == "qa-trainer"
    assert create.job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert (d.status.phase, d.status.reason) == ("Pending", "WorkloadCreated")
    # Planned once: a later decision with the trainer's Job (or its Job deleted by hand) does not plan again.
    again = run(d.status.dump(), Observation(job=None))
    assert [a.job["metadata"]["name"] for a in again.actions if isinstance(a, CreateWorkload)] == ["qa-trainer"]


def test_a_job_that_cannot_fit_fails_before_any_gpu_with_the_numbers_and_the_cheapest_fix() -> None:
    est = plan_for("full", "a100-40gb")
    assert not est.fits and est.fixes
    d = run(run().status.dump(), finished_with(plan_report(est), 0))
    assert (d.status.phase, d.status.reason) == ("Failed", "InsufficientGpuMemory")
    assert f"{est.memory.total_gib:g}" in (d.status.message or "") or est.summary in (d.status.message or "")
    assert est.fixes[0] in (d.status.message or "")
    assert d.status.estimate == est and conditions(d)["Planned"] == ("False", "InsufficientGpuMemory")
    assert not any(isinstance(a, CreateWorkload) for a in d.actions) and DeleteWorkload("qa-preflight") in d.actions
    assert ("Warning", "InsufficientGpuMemory") in [(a.type, a.reason) for a in d.actions if isinstance(a, PostEvent)]
    # The tenant applies the first fix: the job is planned again (a new generation) and goes on.
    fixed = run(
        d.status.dump(),
        Observation(job=None),
        ref=JobRef("team-a", "qa", "uid-1", 2),
        spec={**SPEC, "method": {"type": "lora"}},
    )
    assert [a.job["metadata"]["name"] for a in fixed.actions if isinstance(a, CreateWorkload)] == ["qa-preflight"]


def test_a_data_error_found_by_the_preflight_is_final() -> None:
    err = Report(
        seq=3,
        kind=ReportKind.ERROR,
        time="t",
        reason="TemplateFieldMissing",
        message="dataset.template.prompt uses {question}; the data has prompt, completion",
        final=True,
    )
    d = run(run().status.dump(), finished_with(err, 2))
    assert (d.status.phase, d.status.reason) == ("Failed", "TemplateFieldMissing")
    assert "before any GPU" in (d.status.message or "") and "{question}" in (d.status.message or "")
    assert not any(isinstance(a, CreateWorkload) for a in d.actions)


def test_a_preflight_that_crashes_by_itself_does_not_block_training() -> None:
    obs = Observation(
        job=None,
        preflight=preflight_job(failed=2, conditions=[{"type": "Failed", "status": "True"}]),
        preflight_pods=[preflight_pod("Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})],
    )
    d = run(run().status.dump(), obs)
    assert conditions(d)["Planned"] == ("False", "PreflightFailed")
    assert ("Warning", "PreflightFailed") in [(a.type, a.reason) for a in d.actions if isinstance(a, PostEvent)]
    assert [a.job["metadata"]["name"] for a in d.actions if isinstance(a, CreateWorkload)] == ["qa-trainer"]
    assert "OOMKilled" in next(a.message for a in d.actions if isinstance(a, PostEvent))


@pytest.mark.parametrize("minutes", [5, 11])
def test_a_preflight_pod_that_cannot_schedule_fails_at_the_start_deadline(minutes: int) -> None:
    waiting = preflight_pod("Pending", created="2026-01-01T00:00:00Z")
    obs = Observation(job=None, preflight=preflight_job(active=1), preflight_pods=[waiting])
    d = run(run().status.dump(), obs, now=dt.datetime(2026, 1, 1, 0, minutes, tzinfo=dt.UTC))
    if minutes < 10:
        assert d.status.phase == "Pending" and d.requeue_after is not None and d.requeue_after > 0
    else:
        assert (d.status.phase, d.status.reason) == ("Failed", "StartDeadlineExceeded")
        assert "preflight pod" in (d.status.message or "")


def test_suspend_and_cancel_remove_a_running_preflight() -> None:
    obs = Observation(job=None, preflight=preflight_job(active=1), preflight_pods=[preflight_pod("Running")])
    suspended = run(run().status.dump(), obs, spec={**SPEC, "runPolicy": {"suspend": True}})
    assert suspended.status.phase == "Suspended" and DeleteWorkload("qa-preflight") in suspended.actions
    cancelled = run(run().status.dump(), obs, spec={**SPEC, "runPolicy": {"cancel": True}})
    assert cancelled.status.phase == "Cancelled" and DeleteWorkload("qa-preflight") in cancelled.actions


def test_disabled_preflight_creates_the_trainer_at_once() -> None:
    validation = validate_spec(copy.deepcopy(SPEC), OperatorConfig())
    d = decide(
        REF,
        SPEC,
        FineTuneJobStatus(),
        Observation(job=None),
        validation,
        image_pull_policy="IfNotPresent",
        now=NOW,
        preflight_settings=Preflight(enabled=False),
    )
    assert [a.job["metadata"]["name"] for a in d.actions if isinstance(a, CreateWorkload)] == ["qa-trainer"]


def test_a_model_the_planner_cannot_size_still_trains_after_the_data_check() -> None:
    plan = Report(seq=7, kind=ReportKind.PLAN, time="t", message="cannot size this job: unknown model_type 'mamba'")
    d = run(run().status.dump(), finished_with(plan, 0))
    assert conditions(d)["Planned"] == ("False", "NotSized") and d.status.estimate is None
    assert [a.job["metadata"]["name"] for a in d.actions if isinstance(a, CreateWorkload)] == ["qa-trainer"]
    assert "mamba" in next(a.message for a in d.actions if isinstance(a, PostEvent))
    # and it is not planned again when its Job is recreated
    again = run(d.status.dump(), Observation(job=None))
    assert [a.job["metadata"]["name"] for a in again.actions if isinstance(a, CreateWorkload)] == ["qa-trainer"]
