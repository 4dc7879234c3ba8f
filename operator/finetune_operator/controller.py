"""The glue between watch events and the pure decision in `reconcile.py`.

Inputs (all on kopf's event loop): FineTuneJob events, trainer Job and pod events (watched with a server-side label
selector and kept in kopf indexes), and reports from the log streams of running trainers. Each input only marks its
FineTuneJob's UID in a work queue; workers take a UID, observe it from memory (no API reads), decide, apply the
actions and write the status when it changed. A Pending or finished job therefore costs nothing at steady state,
and the API calls made grow with the number of changes, not with the number of jobs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from finetune_api.reports import Report, ReportKind
from finetune_api.status import FineTuneJobStatus, Phase
from finetune_operator import builders
from finetune_operator.builders import KUEUE_QUEUE_LABEL
from finetune_operator.config import OperatorConfig
from finetune_operator.kube import REJECTED_STATUSES, Kube, api_message
from finetune_operator.logfollow import LogFollower
from finetune_operator.metrics import Metrics
from finetune_operator.observe import JobView, Observation, PodView, parse_ts, reports_from_text
from finetune_operator.reconcile import (
    TERMINAL,
    CreateNotifier,
    CreateWorkload,
    Decision,
    DeleteWorkload,
    JobRef,
    PostEvent,
    StopWorkload,
    SyncConfig,
    decide,
    notify,
    queued,
    rejected,
    spec_size_problem,
)
from finetune_operator.validation import Problem, ValidationResult, validate_spec
from finetune_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)
T = TypeVar("T")
WORKERS = 8
FOLLOW_RETRY_S = 5.0  # a log stream that ended while its pod still runs is reopened no sooner than this


@dataclass
class Record:
    """The part of a FineTuneJob the controller keeps in memory (no managedFields, no annotations)."""

    namespace: str
    name: str
    uid: str
    generation: int | None
    resource_version: str
    spec: dict[str, Any]
    status: dict[str, Any]
    deleting: bool
    created: str = ""
    queue_name: str | None = None

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Record:
        meta = body.get("metadata") or {}
        return cls(
            namespace=meta.get("namespace", ""),
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            generation=meta.get("generation"),
            resource_version=str(meta.get("resourceVersion") or ""),
            spec=dict(body.get("spec") or {}),
            status=dict(body.get("status") or {}),
            deleting=bool(meta.get("deletionTimestamp")),
            created=str(meta.get("creationTimestamp") or ""),
            queue_name=(meta.get("labels") or {}).get(KUEUE_QUEUE_LABEL),
        )

    @property
    def ref(self) -> JobRef:
        return JobRef(self.namespace, self.name, self.uid, self.generation, self.queue_name)


def _newer(a: str, b: str) -> bool:
    """Whether resourceVersion a is at least b. They are etcd revisions (integers) on every real API server."""
    try:
        return int(a) >= int(b)
    except ValueError:
        return True


def _seconds_between(start: str, end: str) -> float | None:
    begin, finish = parse_ts(start), parse_ts(end)
    return (finish - begin).total_seconds() if begin is not None and finish is not None else None


def parse_status(raw: Mapping[str, Any]) -> FineTuneJobStatus:
    try:
        return FineTuneJobStatus.model_validate(dict(raw))
    except ValidationError:
        log.warning("unreadable status replaced: %s", raw)
        return FineTuneJobStatus()


class Controller:
    def __init__(self, cfg: OperatorConfig, kube: Kube, follower: Callable[..., LogFollower]) -> None:
        self.cfg = cfg
        self.pod_failure_policy = False  # set at start-up when the API server has Job.spec.podFailurePolicy (1.26+)
        self.metrics = Metrics(self._snapshot, lambda: len(self.queue))
        self.gpu_accounted: set[tuple[str, str]] = set()
        self.kube = kube
        self.queue = WorkQueue()
        self.records: dict[str, Record] = {}
        self.pods: Mapping[str, Iterable[PodView]] = {}
        self.jobs: Mapping[str, Iterable[JobView]] = {}
        self.pending: dict[str, dict[str, list[Report]]] = {}  # uid -> pod -> reports not yet in status
        self.errors: dict[str, dict[str, Report]] = {}  # uid -> pod -> its last error report (kept)
        self.seen_seq: dict[tuple[str, str], int] = {}
        self.drained: set[tuple[str, str]] = set()
        self.followed: dict[str, set[str]] = {}
        self.follow_started: dict[tuple[str, str], float] = {}
        self.written_rv: dict[str, str] = {}
        self.last_write: dict[str, float] = {}
        self.validations: dict[str, tuple[int | None, ValidationResult]] = {}
        self.job_owner: dict[tuple[str, str], str] = {}  # (namespace, Job name) -> FineTuneJob UID
        self.quota_messages: dict[str, str] = {}  # UID -> why its Job controller could not create a pod
        self.queued: dict[str, set[str]] = {}  # namespace -> UIDs whose Job the namespace's quota refused
        self.executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kube")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.follower = follower(on_report=self._report_from_thread, on_end=self._end_from_thread)
        self._workers: list[asyncio.Task[None]] = []

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._workers = [asyncio.create_task(self._worker(), name=f"reconcile-{i}") for i in range(WORKERS)]

    async def stop(self) -> None:
        self.follower.stop_all()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)

    def notifier_image(self) -> str:
        """The operator's own image (the chart sets FINETUNE_OPERATOR_IMAGE); the trainer image also has it."""
        return os.environ.get("FINETUNE_OPERATOR_IMAGE") or self.cfg.defaults.image

    def _snapshot(self) -> list[tuple[str, str, int]]:
        out = []
        for uid, record in list(self.records.items()):
            validation = self.validations.get(uid)
            spec = validation[1].spec if validation is not None else None
            gpus = (spec.resources.gpus or 0) if spec is not None else 0
            out.append((record.namespace, str(record.status.get("phase") or "New"), gpus))
        return out

    def bind_indexes(self, pods: Mapping[str, Iterable[PodView]], jobs: Mapping[str, Iterable[JobView]]) -> None:
        self.pods, self.jobs = pods, jobs

    # --- inputs (event loop) ------------------------------------------------------------------------------------

    def ftj_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        record = Record.of(body)
        if event_type == "DELETED":
            self._forget(record.uid)
            return
        old = self.records.get(record.uid)
        if old is not None and not _newer(record.resource_version, old.resource_version):
            return  # an event older than what our own status write already returned
        self.records[record.uid] = record
        if self.written_rv.get(record.uid) == record.resource_version:
            return  # the echo of our own status write: nothing new to decide
        self.queue.add(record.uid)

    def child_event(self, uid: str | None, job: tuple[str, str] | None = None, gone: bool = False) -> None:
        if job is not None and uid:
            if gone:
                self.job_owner.pop(job, None)
            else:
                self.job_owner[job] = uid
        if uid and uid in self.records:
            self.queue.add(uid)

    def pod_creation_failed(self, namespace: str, job_name: str, message: str) -> None:
        """A FailedCreate event of a trainer Job: the namespace's quota (or a policy) refused its pod."""
        uid = self.job_owner.get((namespace, job_name))
        if uid is not None and uid in self.records:
            self.quota_messages[uid] = message
            self.queue.add(uid)

    def quota_changed(self, namespace: str) -> None:
        """A ResourceQuota changed: jobs whose Job it refused may fit now."""
        for uid in self.queued.get(namespace, set()):
            self.queue.add(uid)

    def _report_from_thread(self, uid: str, pod: str, report: Report) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._add_report, uid, pod, report)

    def _end_from_thread(self, uid: str, pod: str) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._stream_ended, uid, pod)

    def _add_report(self, uid: str, pod: str, report: Report) -> None:
        if uid not in self.records or report.seq <= self.seen_seq.get((uid, pod), -1):
            return
        self.seen_seq[(uid, pod)] = report.seq
        self.pending.setdefault(uid, {}).setdefault(pod, []).append(report)
        if report.kind == ReportKind.ERROR:
            self.errors.setdefault(uid, {})[pod] = report
        # Status writes for progress are throttled per job; pod and Job changes are not.
        due = self.last_write.get(uid, 0.0) + self.cfg.poll_seconds - time.monotonic()
        self.queue.add_after(uid, due)

    def _stream_ended(self, uid: str, pod: str) -> None:
        # Never marks the pod drained, even at the log's end: only a pod seen finished is drained (by one last
        # read in `_drain`); a stream that ended while its pod runs is reopened by this reconcile.
        self.followed.get(uid, set()).discard(pod)
        self.child_event(uid)

    def _forget(self, uid: str) -> None:
        record = self.records.pop(uid, None)
        self.queue.forget(uid)
        for pod in self.followed.pop(uid, set()):
            if record is not None:
                self.follower.stop(record.namespace, pod)
        if record is not None:
            self.queued.get(record.namespace, set()).discard(uid)
        for d in (self.pending, self.errors, self.written_rv, self.last_write, self.validations, self.quota_messages):
            d.pop(uid, None)  # type: ignore[attr-defined]
        self.drained = {k for k in self.drained if k[0] != uid}
        self.gpu_accounted = {k for k in self.gpu_accounted if k[0] != uid}
        for key in [k for k in self.seen_seq if k[0] == uid]:
            del self.seen_seq[key]
            self.follow_started.pop(key, None)

    # --- work ---------------------------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            uid = await self.queue.get()
            try:
                with self.metrics.reconcile_seconds.time():
                    await self.reconcile(str(uid))
                self.queue.succeeded(uid)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = self.queue.retry(uid)
                record = self.records.get(str(uid))
                where = f"{record.namespace}/{record.name}" if record else uid
                log.warning("reconcile of %s failed, retrying in %.1fs: %s", where, delay, exc)
            finally:
                self.queue.done(uid)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        assert self.loop is not None
        return await self.loop.run_in_executor(self.executor, fn, *args)

    def _validate(self, record: Record) -> ValidationResult:
        cached = self.validations.get(record.uid)
        if cached is not None and cached[0] == record.generation:
            return cached[1]
        too_large = spec_size_problem(record.spec)
        if too_large:
            result = ValidationResult(None, [Problem("SpecTooLarge", "spec", too_large)])
        else:
            result = validate_spec(record.spec, self.cfg.for_namespace(record.namespace))
        self.validations[record.uid] = (record.generation, result)
        return result

    def _observe(self, uid: str, workload: str, preflight: str) -> Observation:
        record = self.records.get(uid)
        name = record.name if record is not None else ""
        jobs = {j.name: j for j in self.jobs.get(uid, ()) if j.name in (workload, preflight)}
        workers = {
            j.rank: j
            for j in self.jobs.get(uid, ())
            if j.rank is not None and j.name == builders.worker_name(name, j.rank)
        }
        children = sorted(self.pods.get(uid, ()), key=lambda p: (p.created, p.name))
        pods = [p for p in children if p.component != "preflight"]
        reports: list[Report] = []
        for pod in pods:
            reports += self.pending.get(uid, {}).get(pod.name, [])
        reports += self.errors.get(uid, {}).values()
        if children:
            self.quota_messages.pop(uid, None)  # a pod exists: whatever refused one before is past
        return Observation(
            job=jobs.get(workload),
            pods=pods,
            reports=reports,
            quota_message=self.quota_messages.get(uid),
            preflight=jobs.get(preflight),
            preflight_pods=[p for p in children if p.component == "preflight"],
            workers=workers,
        )

    async def _drain(self, record: Record, pods: list[PodView]) -> None:
        """Read what a finished trainer wrote after its stream was last read (or while no operator ran)."""
        for pod in pods:
            key = (record.uid, pod.name)
            if not pod.finished or key in self.drained or pod.rank not in (None, 0):
                continue
            self.follower.stop(record.namespace, pod.name)
            self.followed.get(record.uid, set()).discard(pod.name)
            text = await self._run(self.kube.read_log, record.namespace, pod.name, self.cfg.log_tail_lines)
            for report in reports_from_text(text):
                self._add_report(record.uid, pod.name, report)
            self.drained.add(key)

    def _manage_streams(self, record: Record, status: FineTuneJobStatus, pods: list[PodView]) -> None:
        followed = self.followed.setdefault(record.uid, set())
        # A gang's worker 0 speaks for it; the other workers print no reports.
        live = {p.name for p in pods if p.running and p.rank in (None, 0) and (record.uid, p.name) not in self.drained}
        if status.phase in TERMINAL or status.phase == Phase.SUSPENDED:
            live = set()
        for pod in followed - live:
            self.follower.stop(record.namespace, pod)
            followed.discard(pod)
        now = time.monotonic()
        for pod in live - followed:
            key = (record.uid, pod)
            wait = self.follow_started.get(key, -FOLLOW_RETRY_S) + FOLLOW_RETRY_S - now
            if wait > 0:
                self.queue.add_after(record.uid, wait)
                continue
            self.follow_started[key] = now
            followed.add(pod)
            self.follower.follow(record.uid, record.namespace, pod)

    async def reconcile(self, uid: str) -> None:
        record = self.records.get(uid)
        if record is None or record.deleting:
            return
        status = parse_status(record.status)
        workload, preflight = builders.workload_name(record.name), builders.preflight_name(record.name)
        obs = self._observe(uid, workload, preflight)
        if status.phase not in TERMINAL:
            await self._drain(record, obs.pods)
            obs = self._observe(uid, workload, preflight)
        # What this decision folds in; reports arriving while it is applied stay pending for the next one.
        included = {pod.name: len(self.pending.get(uid, {}).get(pod.name, [])) for pod in obs.pods}
        decision = decide(
            record.ref,
            record.spec,
            status,
            obs,
            self._validate(record),
            image_pull_policy=self.cfg.defaults.image_pull_policy,
            now=dt.datetime.now(dt.UTC),
            start_deadline_seconds=self.cfg.start_deadline_seconds,
            pod_failure_policy=self.pod_failure_policy,
            preflight_settings=self.cfg.for_namespace(record.namespace).preflight,
        )
        decision = notify(decision, record.ref, record.spec, self.notifier_image(), self.cfg.defaults.image_pull_policy)
        decision = await self._apply(record, status, decision)
        waiting = self.queued.setdefault(record.namespace, set())
        if decision.status.phase == Phase.QUEUED and obs.job is None:
            waiting.add(uid)
        else:
            waiting.discard(uid)
        await self._write_status(record, status, decision.status)
        self._account(record, status, decision.status, obs.pods)
        for pod, n in included.items():
            left = self.pending.get(uid, {}).get(pod)
            if left is not None:
                del left[:n]  # folded into the status just written; later arrivals stay
        self._manage_streams(record, decision.status, obs.pods)
        if decision.requeue_after is not None:
            self.queue.add_after(uid, decision.requeue_after)

    def _account(
        self, record: Record, before: FineTuneJobStatus, after: FineTuneJobStatus, pods: list[PodView]
    ) -> None:
        """Metrics from one decision: transitions, retries by cause, queue wait, GPU-seconds."""
        m, ns = self.metrics, record.namespace
        if after.phase != before.phase and after.phase:
            m.transitions.labels(ns, after.phase).inc()
        if after.failures > before.failures:
            m.retries.labels(ns, "failure").inc(after.failures - before.failures)
        if after.interruptions > before.interruptions:
            m.retries.labels(ns, "interruption").inc(after.interruptions - before.interruptions)
        if after.start_time and not before.start_time:
            waited = _seconds_between(record.created, after.start_time)
            if waited is not None:
                m.queue_wait.labels(ns).observe(max(0.0, waited))
        validation = self.validations.get(record.uid)
        gpus = (validation[1].spec.resources.gpus or 0) if validation and validation[1].spec else 0
        for pod in pods:
            key = (record.uid, pod.name)
            if gpus and pod.finished and key not in self.gpu_accounted:
                ran = _seconds_between(pod.started_at or "", pod.finished_at or "")
                if ran is not None:
                    m.gpu_seconds.labels(ns).inc(gpus * max(0.0, ran))
                self.gpu_accounted.add(key)

    async def _apply(self, record: Record, before: FineTuneJobStatus, decision: Decision) -> Decision:
        ns, ref = record.namespace, record.ref
        for action in decision.actions:
            try:
                if isinstance(action, CreateWorkload):
                    if action.config_map is not None and not await self._run(self.kube.create, action.config_map):
                        await self._run(
                            self.kube.replace_config_map_data,
                            ns,
                            action.config_map["metadata"]["name"],
                            action.config_map["data"],
                        )
                    if await self._run(self.kube.create, action.job):
                        await self._event(record, "Normal", action.event_reason, action.event_message)
                elif isinstance(action, SyncConfig):
                    name = action.config_map["metadata"]["name"]
                    await self._run(self.kube.replace_config_map_data, ns, name, action.config_map["data"])
                elif isinstance(action, DeleteWorkload):
                    await self._run(self.kube.delete_job, ns, action.name)
                elif isinstance(action, StopWorkload):
                    await self._run(self.kube.stop_job, ns, action.name)
                elif isinstance(action, PostEvent):
                    await self._event(record, action.type, action.reason, action.message)
                elif isinstance(action, CreateNotifier):
                    try:
                        if await self._run(self.kube.create, action.job):
                            await self._event(record, "Normal", "Notifying", "started the notification pod")
                    except ApiException as exc:  # a notification never changes the verdict
                        if exc.status not in REJECTED_STATUSES and exc.status != 403:
                            raise
                        await self._event(record, "Warning", "NotificationFailed", api_message(exc))
            except ApiException as exc:
                if exc.status == 403 and isinstance(action, CreateWorkload) and "exceeded quota" in str(exc.body):
                    # count/jobs.batch (or similar) quota: wait for a ResourceQuota change, not a retry loop.
                    return await self._posted(record, queued(before, ref, api_message(exc), dt.datetime.now(dt.UTC)))
                if exc.status not in REJECTED_STATUSES or not isinstance(action, CreateWorkload | SyncConfig):
                    raise
                what = "Job" if isinstance(action, CreateWorkload) and "job" in str(exc.body).lower() else "config"
                return await self._posted(
                    record, rejected(before, ref, what, api_message(exc), dt.datetime.now(dt.UTC))
                )
        return decision

    async def _posted(self, record: Record, decision: Decision) -> Decision:
        """A decision that replaces the one being applied (its only actions are Events): post them."""
        for event in decision.actions:
            if isinstance(event, PostEvent):
                await self._event(record, event.type, event.reason, event.message)
        return decision

    async def _event(self, record: Record, type_: str, reason: str, message: str) -> None:
        await self._run(self.kube.post_event, record.namespace, record.name, record.uid, type_, reason, message)

    async def _write_status(self, record: Record, before: FineTuneJobStatus, after: FineTuneJobStatus) -> None:
        old, new = before.dump(), after.dump()
        if old == new:
            return
        patch: dict[str, Any] = {key: new.get(key) for key in {*old, *new}}  # None deletes a key (merge patch)
        try:
            body = await self._run(self.kube.patch_status, record.namespace, record.name, patch)
        except ApiException as exc:
            if exc.status not in REJECTED_STATUSES:
                raise
            # Even a status the API server refuses must end in a verdict the tenant can read.
            message = f"the API server refused the job's status: {api_message(exc)}"
            verdict = {"phase": Phase.FAILED.value, "reason": "StatusRejected", "message": message[:4096]}
            body = await self._run(self.kube.patch_status, record.namespace, record.name, verdict)
            await self._event(record, "Warning", "StatusRejected", message)
        self.last_write[record.uid] = time.monotonic()
        if body is not None:
            fresh = Record.of(body)
            self.written_rv[record.uid] = fresh.resource_version
            current = self.records.get(record.uid)
            if current is not None and _newer(fresh.resource_version, current.resource_version):
                self.records[record.uid] = fresh
