"""A gang: one job trained by `resources.workers` pods together (torch.distributed across pods). Pure.

The workers are batch Jobs of one pod each, one per stable rank (`NAME-worker-R`), not one Job of N pods:
Kubernetes 1.20 has no Indexed Jobs, and per-rank Jobs behave the same on every version, so there is one path to
test. Worker 0 hosts torchrun's static rendezvous (port 29500); the other workers are created once worker 0's
pod has an IP, which becomes their `FINETUNE_RDZV_HOST`. A pod IP needs neither cluster DNS (the local cluster has
none) nor a Service (nor operator rights on Services); the price is that workers 1..N-1 start a few seconds after
worker 0 has been scheduled, which a gang pays anyway while its slowest pod starts.

Gang semantics, all or nothing:

* When any worker fails or is stopped, every worker Job is deleted; once all their pods are gone (worker 0 saves
  a checkpoint on SIGTERM first), the gang starts again and resumes from the newest complete checkpoint. That is
  one attempt, counted once in `status.failures` or `status.interruptions`, as for a one-pod job.
* A worker that cannot start within the platform's start deadline fails the job with what it waits for, e.g.
  `WaitingForWorkers: 1 of 2 pods Unschedulable`, and every worker Job is deleted, so the gang holds nothing.
* A user error on any worker (exit 2) is final and names the worker.
* Only worker 0 reports (progress, checkpoints, the model): its log is followed, its verdict is the job's.

Gang schedulers compose with this without being required: the workers are plain Jobs, so Volcano or the
coscheduling plugin can gate them by a PodGroup label the platform adds, and Kueue admits each worker Job on its
own (use quotas large enough for a whole gang, or the start deadline frees a partial one).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from finetune_api.reports import ReportKind
from finetune_api.status import FineTuneJobStatus, Phase
from finetune_operator.observe import (
    USER_ERROR_EXIT_CODE,
    Observation,
    PodView,
    fold_reports,
    interrupted,
    last_error,
    never_starts,
    parse_ts,
    phase_conditions,
    reports_from_text,
)

_PODS_REMEMBERED = 32


@dataclass
class GangStep:
    status: FineTuneJobStatus
    create: list[int] = field(default_factory=list)  # ranks whose worker Job to create now
    rdzv_host: str = ""  # worker 0's pod IP, for the ranks created now
    delete: list[str] = field(default_factory=list)  # worker Jobs to delete
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    requeue_after: float | None = None


def _newest_per_rank(pods: list[PodView]) -> dict[int, PodView]:
    newest: dict[int, PodView] = {}
    for pod in pods:  # oldest first
        if pod.rank is not None:
            newest[pod.rank] = pod
    return newest


def _waiting(pod: PodView | None) -> str:
    if pod is None:
        return "no pod yet"
    return pod.reason or pod.phase


def step(
    prev: FineTuneJobStatus,
    obs: Observation,
    *,
    job_name: str,
    workers: int,
    backoff_limit: int,
    keep_checkpoints: int,
    generation: int | None,
    now: str,
    start_deadline_seconds: float | None,
) -> GangStep:
    """The gang's next status and what to create or delete (see the module doc)."""
    status = fold_reports(prev, obs.reports, keep_checkpoints)
    current = _newest_per_rank(obs.pods)
    leader = current.get(0)
    if leader is not None:  # worker 0's termination message outlives a rotated log
        status = fold_reports(status, reports_from_text(leader.termination_message), keep_checkpoints)
    seen = list(status.trainer_pods)
    seen += [p.name for p in obs.pods if p.name not in seen]
    status = status.model_copy(update={"trainer_pods": seen[-_PODS_REMEMBERED:]})
    existing = [job.name for job in obs.workers.values()]
    running = sum(1 for r, pod in current.items() if r in obs.workers and pod.running)

    def result(
        phase: Phase, reason: str, message: str, *, delete: list[str] | None = None, **fields: object
    ) -> GangStep:
        """The status for `phase` (fields: more status fields to set), with this step's deletions and event."""
        conds = phase_conditions(status.conditions, phase, reason, message, generation, now)
        terminal = phase in (Phase.SUCCEEDED, Phase.FAILED)
        new = status.model_copy(
            update={
                "phase": phase.value,
                "reason": reason,
                "message": message[:4096],
                "conditions": conds,
                "observed_generation": generation,
                "workers": f"{running}/{workers}",
                "completion_time": (status.completion_time or now) if terminal else None,
                **fields,
            }
        )
        out = GangStep(new, delete=delete or [])
        if phase != prev.phase and phase in (Phase.FAILED, Phase.SUCCEEDED, Phase.RUNNING):
            event = {
                Phase.FAILED: ("Warning", reason, message),
                Phase.SUCCEEDED: ("Normal", "Succeeded", message),
                Phase.RUNNING: ("Normal", "TrainerStarted", f"attempt {status.attempts}: all {workers} workers run"),
            }
            out.events.append(event[phase])
        return out

    def fail(reason: str, message: str) -> GangStep:
        return result(Phase.FAILED, reason, message, delete=existing)

    # A verdict from any worker: a user error is final and names the worker (also one seen only after the
    # gang was already told to restart: the workers stop within moments of each other).
    for rank, pod in sorted(current.items()):
        if pod.exit_code == USER_ERROR_EXIT_CODE:
            reason, message = last_error(obs.reports if rank == 0 else [], pod)
            return fail(reason, f"worker {rank}: {message}")
    if not obs.workers:
        if obs.pods:  # the last attempt's pods are stopping (worker 0 uploads a checkpoint first)
            message = f"restarting: waiting for {len(obs.pods)} pod(s) of attempt {status.attempts} to stop"
            if prev.reason == "Restarting" and prev.message:
                message = prev.message  # what made the gang restart stays readable while its pods stop
            return result(Phase.PENDING, "Restarting", message)
        attempt = status.attempts + 1
        message = f"attempt {attempt}: starting worker 0 of {workers}"
        started = result(Phase.PENDING, "WaitingForWorkers", message, attempts=attempt)
        started.create = [0]
        return started

    final = next((r for r in reversed(obs.reports) if r.kind == ReportKind.ERROR and r.final), None)
    if final is not None:
        return fail(final.reason or "TrainerError", f"worker 0: {final.message or 'the trainer reported an error'}")
    chief = obs.workers.get(0)
    if chief is not None and chief.complete:
        message = f"model uploaded to {status.output.uri}" if status.output else "the trainer completed"
        # The other workers end by themselves (torchrun's exit barrier); their pods and logs stay for inspection.
        return result(Phase.SUCCEEDED, "Completed", message)
    if chief is not None and chief.failed_reason == "DeadlineExceeded":
        return fail("DeadlineExceeded", "runPolicy.activeDeadlineSeconds reached; the workers were stopped")

    # A worker that failed or was stopped restarts the whole gang (one attempt, counted once).
    stopped = [
        (rank, pod)
        for rank, pod in sorted(current.items())
        if rank in obs.workers and (pod.phase == "Failed" or pod.deleting)
    ]
    gone = [r for r, job in obs.workers.items() if job.failed_reason and r not in dict(stopped)]
    if stopped or gone:
        counted = list(status.finished_pods)
        failures, interruptions = status.failures, status.interruptions
        pods = [pod for _, pod in stopped]
        # Once per attempt: the first decision that sees it counts it (the others see a stopped pod counted).
        keys = [pod.name for pod in pods] or [f"{job_name}-worker-{r}-attempt-{status.attempts}" for r in gone]
        # A peer lost from outside (eviction, drain) makes the others fail too: the interruption is the cause.
        was_interrupted = bool(gone) or any(interrupted(pod) for pod in pods)
        if not any(key in counted for key in keys):
            counted.append(keys[0])
            if was_interrupted:
                interruptions += 1
            else:
                failures += 1
        rank = stopped[0][0] if stopped else gone[0]
        failed = next(((r, p) for r, p in stopped if not interrupted(p)), None)
        if failed is not None and not was_interrupted:
            rank, detail = failed[0], last_error(obs.reports if failed[0] == 0 else [], failed[1])[1]
        else:
            detail = "stopped from outside"
        counts = {"failures": failures, "interruptions": interruptions, "finished_pods": counted[-_PODS_REMEMBERED:]}
        if failures > backoff_limit:
            message = (
                f"worker {rank}: {detail} (gave up after {failures} failed attempts; "
                f"runPolicy.backoffLimit={backoff_limit})"
            )
            return result(Phase.FAILED, "TrainerFailed", message, delete=existing, **counts)
        cause = "was interrupted" if was_interrupted else "failed"
        message = f"worker {rank} {cause} ({detail}); the gang restarts from the newest checkpoint"
        return result(Phase.PENDING, "Restarting", message, delete=existing, **counts)

    # Starting: every worker must start within the deadline; none may be unable to start at all.
    now_dt = parse_ts(now) or dt.datetime.now(dt.UTC)
    for rank, pod in sorted(current.items()):
        blocked = never_starts(pod, now_dt, obs.secrets)
        if blocked is not None:
            return fail(blocked[0], f"worker {rank}: {blocked[1]}")
    waiting = {r: current.get(r) for r in range(workers) if not (current.get(r) and current[r].running)}
    created = [parse_ts(p.created) for p in current.values() if not p.running]
    if leader is not None and any(current.get(r) is None for r in waiting):
        created.append(parse_ts(leader.created))
    since = min((c for c in created if c is not None), default=None)
    waited = (now_dt - since).total_seconds() if since is not None else 0.0
    if waiting and start_deadline_seconds is not None and waited > start_deadline_seconds:
        reasons: dict[str, int] = {}
        for waiter in waiting.values():
            reasons[_waiting(waiter)] = reasons.get(_waiting(waiter), 0) + 1
        summary = ", ".join(f"{n} of {workers} pods {why}" for why, n in sorted(reasons.items()))
        detail = next((p.message for p in waiting.values() if p is not None and p.message), "")
        message = f"not all workers started within {start_deadline_seconds:g}s: {summary}" + (
            f" ({detail})" if detail else ""
        )
        return fail("WaitingForWorkers", message)
    create: list[int] = []
    host = leader.pod_ip if leader is not None and leader.pod_ip else ""
    if host:
        create = [r for r in range(1, workers) if r not in obs.workers]
    timer = None
    if waiting and since is not None and start_deadline_seconds is not None:
        timer = max(0.5, start_deadline_seconds - waited + 0.5)
    if running == workers:
        stage = status.progress.stage if status.progress else None
        out = result(Phase.RUNNING, "Training", f"attempt {status.attempts}: {stage or 'starting'} ({workers} workers)")
    else:
        detail = "; ".join(f"worker {r}: {_waiting(p)}" for r, p in sorted(waiting.items()))
        out = result(Phase.PENDING, "WaitingForWorkers", f"{running} of {workers} workers running; {detail}")
        out.requeue_after = timer
    out.create, out.rdzv_host = create, host
    return out
