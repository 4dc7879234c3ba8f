"""Prometheus metrics of the operator (served on --metrics-port; the chart adds a Service and a ServiceMonitor).

| metric | type | labels | meaning |
|---|---|---|---|
| finetune_jobs | gauge | namespace, phase | FineTuneJobs by phase, computed from memory at scrape time |
| finetune_gpus_in_use | gauge | namespace | GPUs requested by running trainers |
| finetune_transitions_total | counter | namespace, phase | phase changes written to status |
| finetune_retries_total | counter | namespace, cause | retried attempts: cause=failure (counts) or interruption |
| finetune_gpu_seconds_total | counter | namespace | GPUs x seconds of finished trainer pods |
| finetune_queue_wait_seconds | histogram | namespace | from creation to the first trainer start |
| finetune_reconcile_duration_seconds | histogram | | one decision, its actions and its status write |
| finetune_workqueue_depth | gauge | | FineTuneJobs waiting for a worker |
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# (namespace, phase, gpus) of every FineTuneJob the operator holds.
Snapshot = Callable[[], Iterable[tuple[str, str, int]]]

_WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600, float("inf"))


class _JobsCollector(Collector):
    def __init__(self, snapshot: Snapshot, depth: Callable[[], int]) -> None:
        self.snapshot, self.depth = snapshot, depth

    def collect(self) -> Iterator[GaugeMetricFamily]:
        phases: Tally[tuple[str, str]] = Tally()
        gpus: Tally[str] = Tally()
        for namespace, phase, job_gpus in self.snapshot():
            phases[(namespace, phase)] += 1
            if phase == "Running":
                gpus[namespace] += job_gpus
        jobs = GaugeMetricFamily("finetune_jobs", "FineTuneJobs by phase.", labels=["namespace", "phase"])
        for (namespace, phase), n in sorted(phases.items()):
            jobs.add_metric([namespace, phase], n)
        yield jobs
        in_use = GaugeMetricFamily("finetune_gpus_in_use", "GPUs held by running trainers.", labels=["namespace"])
        for namespace, n in sorted(gpus.items()):
            in_use.add_metric([namespace], n)
        yield in_use
        yield GaugeMetricFamily("finetune_workqueue_depth", "FineTuneJobs waiting for a worker.", value=self.depth())


class Metrics:
    def __init__(self, snapshot: Snapshot, depth: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.transitions = Counter(
            "finetune_transitions", "Phase changes.", ["namespace", "phase"], registry=self.registry
        )
        self.retries = Counter(
            "finetune_retries", "Attempts retried, by cause.", ["namespace", "cause"], registry=self.registry
        )
        self.gpu_seconds = Counter(
            "finetune_gpu_seconds", "GPU-seconds of finished trainer pods.", ["namespace"], registry=self.registry
        )
        self.queue_wait = Histogram(
            "finetune_queue_wait_seconds",
            "From creation to the first trainer start.",
            ["namespace"],
            buckets=_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "finetune_reconcile_duration_seconds", "One reconcile, API calls included.", registry=self.registry
        )
        self.registry.register(_JobsCollector(snapshot, depth))

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
