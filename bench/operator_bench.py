"""The operator at platform scale, on the real control plane: a benchmark, not a test (it records, never asserts).

Runs a fresh Kubernetes 1.20 control plane (scripts/control-plane.sh: etcd, kube-apiserver,
kube-controller-manager; no kubelet, no scheduler) with its own state dir and ports, and the operator as it runs
in its Deployment (`python -m finetune_operator` with FINETUNE_OPERATOR_CONFIG). The bench plays the scheduler
and the kubelet where a scenario needs pods to run: it binds trainer pods to a fake Node, writes their status,
and serves their logs through `FakeKubeletLogs` (which the apiserver proxies `pods/log` to, `follow=true`
included). It uses only the FineTuneJob API (status.phase, status.workload, status.progress.step) and the
children's ownerReferences, never the operator's internals.

Scenarios, each in its own fresh set of namespaces that is deleted afterwards:

  create    N plain batch Jobs, then N FineTuneJobs, each created at --rate per second: create -> Job and
            create -> pod latencies (the plain Jobs are the baseline for the pod ratio); exactly one Job and
            one ConfigMap per FineTuneJob.
  pending   the same N FineTuneJobs, pods Pending, once settled: CPU of the operator, kube-apiserver and etcd
            over --window seconds, against the idle cluster measured at the start of the same run.
  running   M FineTuneJobs whose trainers run and print a progress report (finetune_api.reports protocol)
            every second: lag from a line being appended to the log to the status showing that step; the
            operator's peak RSS and CPU.
  finished  F FineTuneJobs whose pods exit 0 (the real Job controller marks the Jobs Complete): operator CPU
            once all are Succeeded, against the idle operator.

CPU is utime+stime from /proc/<pid>/stat, in percent of one core. The bench's own watches are stopped during
the idle, pending and finished windows; the machine may be shared, so idle is measured in the same run.

    .venv/bin/python bench/operator_bench.py                       # full scale: 500 / 200 / 2000 (long)
    .venv/bin/python bench/operator_bench.py --quick               # a small smoke run (a few minutes)
    make bench-operator BENCH_ARGS="--jobs 300 --scenarios create,pending"

Leaves nothing behind: its namespaces are deleted, the operator stopped and the control plane taken down
(FINETUNE_KEEP_CONTROL_PLANE=1 keeps the control plane). Writes docs/benchmarks.md unless --quick/--no-docs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import faulthandler
import json
import math
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "api")]

from bench.benchkit import (  # noqa: E402
    CpuWindow,
    Row,
    RssSampler,
    Watch,
    fmt_s,
    list_all,
    machine,
    markdown_table,
    measure_cpu,
    paced,
    percentile,
    raw_get,
    text_table,
    write_section,
)
from finetune_api.reports import Report, ReportKind, format_report  # noqa: E402
from tests.integration.operator_harness import (  # noqa: E402
    NO_PREFLIGHT,
    TEST_PLATFORM_DEFAULTS,
    FakeKubeletLogs,
    register_fake_node,
    valid_spec,
)

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
FTJ_PATH = f"/apis/{GROUP}/{VERSION}/{PLURAL}"
NODE = "bench-kubelet"
RUN_LABEL = "bench.finetune.dev/run"
SCENARIOS = ("create", "pending", "running", "finished")
# Own state dir and ports, so a bench never meets the test tier's control plane (override through the env).
CONTROL_PLANE_ENV = {
    "FINETUNE_STATE": "/tmp/cp-bench",
    "FINETUNE_APISERVER_PORT": "6650",
    "FINETUNE_ETCD_CLIENT_PORT": "2650",
    "FINETUNE_ETCD_PEER_PORT": "2651",
    "FINETUNE_KCM_PORT": "10650",
}
# The platform policy (the chart's `policy` values): only defaults that make trainer pods fit a CPU-only node.
OPERATOR_CONFIG: dict[str, Any] = {
    "defaults": {**TEST_PLATFORM_DEFAULTS, "image": "finetune-trainer:bench"},
    "preflight": NO_PREFLIGHT,  # the bench measures the operator core; a preflight adds one pod per job
}
SPEC: dict[str, Any] = valid_spec(runPolicy={"backoffLimit": 2})  # the endpoint is the platform's
IDLE_MARGIN_PTS = 1.0  # "at idle level": within this many percentage points of a core of the idle operator


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def owner(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((r for r in obj["metadata"].get("ownerReferences") or [] if r.get("kind") == kind), None)


def latencies(starts: dict[str, float], seen: dict[str, float]) -> list[float]:
    """seen - start per key; a key never seen counts as infinitely slow."""
    return [seen[k] - t if k in seen else math.inf for k, t in starts.items()]


def wait_until(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.5) -> float | None:
    """Seconds until check() held, or None after `timeout` (logged; the bench records what it got)."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            log(f"gave up waiting for {what} after {timeout:.0f}s")
            return None
        time.sleep(interval)
    return time.monotonic() - t0


class ControlPlane:
    def __init__(self) -> None:
        self.env = {**os.environ, **{k: os.environ.get(k) or v for k, v in CONTROL_PLANE_ENV.items()}}
        self.state = Path(self.env["FINETUNE_STATE"])
        self.script = REPO / "scripts" / "control-plane.sh"

    def up(self) -> str:
        out = subprocess.run(
            ["bash", str(self.script), "up"], env=self.env, capture_output=True, text=True, timeout=600, check=False
        )
        match = re.search(r"^export KUBECONFIG=(\S+)$", out.stdout, re.MULTILINE)
        if out.returncode != 0 or not match:
            raise SystemExit(f"control-plane.sh up failed (rc={out.returncode}):\n{out.stderr[-3000:]}")
        return match.group(1)

    def down(self) -> None:
        subprocess.run(["bash", str(self.script), "down"], env=self.env, capture_output=True, timeout=300, check=False)

    def pids(self) -> dict[str, int]:
        return {
            name: int((self.state / "pids" / f"{name}.pid").read_text())
            for name in ("kube-apiserver", "etcd", "kube-controller-manager")
        }


class Operator:
    """`python -m finetune_operator` with FINETUNE_OPERATOR_CONFIG, as tests/integration/operator_harness.py
    `OperatorProcess` starts it (without --verbose unless asked: DEBUG logging is not what a cluster runs)."""

    def __init__(self, kubeconfig: str, cfg: dict[str, Any], verbose: bool) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-operator-"))
        (self.dir / "config.yaml").write_text(yaml.safe_dump(cfg))
        self.log_path = self.dir / "operator.log"
        env = {**os.environ, "KUBECONFIG": kubeconfig, "FINETUNE_OPERATOR_CONFIG": str(self.dir / "config.yaml")}
        cmd = [sys.executable, "-m", "finetune_operator", *(["--verbose"] if verbose else [])]
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = uuid.uuid4().hex[:5]
        self.rows: list[tuple[str, Row]] = []
        self.cp = ControlPlane()
        self.kubeconfig = ""
        self.api: Any = None
        self.fake: FakeKubeletLogs | None = None
        self.kubelet: Watch | None = None
        self.operator: Operator | None = None
        self.idle: dict[str, float] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- plumbing ----------------------------------------------------------------------------------------------

    def record(self, section: str, what: str, target: str, measured: str, ok: bool | None = None) -> None:
        row = Row(section, what, target, measured, ok)
        self.rows.append((section, row))
        log(f"ROW {what}: {measured} (target {target or '-'}) {row.verdict}")

    @property
    def core(self) -> Any:
        return client.CoreV1Api(self.api)

    @property
    def batch(self) -> Any:
        return client.BatchV1Api(self.api)

    @property
    def custom(self) -> Any:
        return client.CustomObjectsApi(self.api)

    def pids(self) -> dict[str, int]:
        assert self.operator is not None
        return {"operator": self.operator.proc.pid, **self.cp.pids()}

    def setup(self) -> None:
        log(f"control plane up (state {self.cp.state}, apiserver port {self.cp.env['FINETUNE_APISERVER_PORT']})")
        self.kubeconfig = self.cp.up()
        cfg = client.Configuration()
        config.load_kube_config(config_file=self.kubeconfig, client_configuration=cfg)
        cfg.connection_pool_maxsize = 64
        self.api = client.ApiClient(cfg)
        self.install_crd()
        self.fake = FakeKubeletLogs()
        register_fake_node(self.api, NODE, self.fake)
        self._spawn(self._heartbeat)
        self.kubelet = Watch(
            self.api, "/api/v1/pods", self._kubelet_on_pod, [("fieldSelector", f"spec.nodeName={NODE}")]
        )
        self.kubelet.start()
        self.check_log_follow()
        cfg_doc = yaml.safe_load(Path(self.args.operator_config).read_text()) if self.args.operator_config else None
        self.operator = Operator(self.kubeconfig, cfg_doc or OPERATOR_CONFIG, self.args.operator_verbose)
        self.warm_up()
        time.sleep(self.args.settle)
        log(f"idle: measuring {self.args.idle_window:.0f}s")
        self.idle = measure_cpu(self.pids(), self.args.idle_window)
        for name, pct in self.idle.items():
            self.record("idle", f"idle {name} CPU (no FineTuneJobs)", "", f"{pct:.1f}% of a core")
        self.record("idle", "idle operator RSS", "", f"{self._rss():.0f} MB")

    def _spawn(self, fn: Callable[[], None]) -> None:
        t = threading.Thread(target=fn, daemon=True)
        t.start()
        self._threads.append(t)

    def _heartbeat(self) -> None:
        """Play the kubelet's heartbeat so the node lifecycle controller never taints the node and evicts pods."""
        while not self._stop.wait(10):
            ts = now_rfc3339()
            cond = {"type": "Ready", "status": "True", "reason": "Fake", "lastHeartbeatTime": ts}
            with contextlib.suppress(Exception):
                self.core.patch_node_status(NODE, {"status": {"conditions": [cond]}})

    def _kubelet_on_pod(self, kind: str, obj: dict[str, Any], t: float) -> None:
        """Play the kubelet's side of pod deletion: a pod bound to the node that is being deleted gets its
        containers stopped (its log closed) and is then removed for good (grace period 0), as a kubelet does."""
        meta = obj["metadata"]
        if kind == "DELETED" or not meta.get("deletionTimestamp"):
            return
        if self.fake is not None:
            self.fake.close_log(meta["namespace"], meta["name"])
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                # In the body: with a body, the apiserver ignores the gracePeriodSeconds query parameter.
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"])
                ),
                _preload_content=False,
            )

    def _rss(self) -> float:
        from bench.benchkit import rss_mb

        assert self.operator is not None
        return rss_mb(self.operator.proc.pid)

    def install_crd(self) -> None:
        ext = client.ApiextensionsV1Api(self.api)
        crd = yaml.safe_load((REPO / "manifests" / "crd.yaml").read_text())
        try:
            ext.create_custom_resource_definition(crd)
        except ApiException as exc:
            if exc.status != 409:
                raise
            current: Any = ext.read_custom_resource_definition(crd["metadata"]["name"])
            crd["metadata"]["resourceVersion"] = current.metadata.resource_version
            ext.replace_custom_resource_definition(crd["metadata"]["name"], crd)

        def established() -> bool:
            current: Any = ext.read_custom_resource_definition(crd["metadata"]["name"])
            conds = current.status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conds)

        if wait_until("CRD established", established, 60) is None:
            raise SystemExit("the FineTuneJob CRD was not established")

    def fmt_took(self, took: float | None) -> str:
        return fmt_s(took) if took is not None else f"> {self.args.delete_timeout:.0f} s (gave up waiting)"

    def make_namespaces(self, scenario: str, count: int | None = None) -> list[str]:
        names = [f"bench-{self.run_id}-{scenario}-{i}" for i in range(count or self.args.namespaces)]
        for name in names:
            self.core.create_namespace({"metadata": {"name": name, "labels": {RUN_LABEL: self.run_id}}})

        def has_token(ns: str) -> bool:  # 1.20 admits a pod only once its namespace's default SA has a token secret
            try:
                return bool(raw_get(self.api, f"/api/v1/namespaces/{ns}/serviceaccounts/default").get("secrets"))
            except ApiException as exc:
                if exc.status == 404:
                    return False
                raise

        def tokens() -> bool:
            return all(has_token(n) for n in names)

        wait_until("service account tokens", tokens, 120)
        return names

    def _exists(self, path: str) -> bool:
        try:
            raw_get(self.api, path)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def delete_namespaces(self, names: list[str]) -> float | None:
        """Delete and wait until gone; returns the seconds it took (None: still there after --delete-timeout)."""
        for name in names:
            with contextlib.suppress(ApiException):
                self.core.delete_namespace(name, propagation_policy="Background")
        left = set(names)

        def gone() -> bool:
            existing = {n["metadata"]["name"] for n in list_all(self.api, "/api/v1/namespaces")}
            left.intersection_update(existing)
            return not left

        return wait_until(f"{len(names)} namespaces deleted", gone, self.args.delete_timeout, interval=1.0)

    def create_ftj(self, ns: str, name: str) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": copy.deepcopy(SPEC),
        }
        resp = self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body, _preload_content=False)
        result: dict[str, Any] = json.loads(resp.data)
        return result

    def create_many(self, names: list[str], prefix: str, i: int) -> None:
        """The i-th FineTuneJob of a scenario, its namespaces taken in turn."""
        self.create_ftj(names[i % len(names)], f"{prefix}-{i:05d}")

    def bind(self, ns: str, pod: str) -> None:
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": pod},
            "target": {"apiVersion": "v1", "kind": "Node", "name": NODE},
        }
        self.core.create_namespaced_pod_binding(pod, ns, binding, _preload_content=False)

    def set_pod(self, ns: str, pod: str, phase: str, **state: Any) -> None:
        status: dict[str, Any] = {
            "phase": phase,
            "containerStatuses": [
                {"name": "trainer", "image": "finetune-trainer:bench", "imageID": "", "ready": phase == "Running",
                 "restartCount": 0, "state": state},
            ],
        }  # fmt: skip
        if phase == "Running":
            status["startTime"] = now_rfc3339()
        self.core.patch_namespaced_pod_status(pod, ns, {"status": status}, _preload_content=False)

    def check_log_follow(self) -> None:
        """Preflight: a line appended to a fake-kubelet log reaches a `follow=true` reader through the apiserver."""
        assert self.fake is not None
        ns = self.make_namespaces("preflight", 1)[0]
        pod = {
            "metadata": {"name": "follow-check"},
            "spec": {"nodeName": NODE, "containers": [{"name": "trainer", "image": "finetune-trainer:bench"}]},
        }
        self.core.create_namespaced_pod(ns, pod)
        self.fake.append(ns, "follow-check", "first\n")
        resp = self.core.read_namespaced_pod_log(
            "follow-check", ns, container="trainer", follow=True, _preload_content=False
        )
        got: queue.Queue[tuple[float, str | None]] = queue.Queue()

        def reader() -> None:
            try:
                for chunk in resp.stream(1024, decode_content=False):
                    got.put((time.monotonic(), chunk.decode()))
            finally:
                got.put((time.monotonic(), None))

        threading.Thread(target=reader, daemon=True).start()
        delays = []
        ended = False
        with contextlib.suppress(queue.Empty):
            got.get(timeout=10)  # the text that was there before
            for i in range(5):
                t0 = time.monotonic()
                self.fake.append(ns, "follow-check", f"line {i}\n")
                t, _ = got.get(timeout=10)
                delays.append(t - t0)
            self.fake.close_log(ns, "follow-check")  # the container ends: so does the stream
            ended = got.get(timeout=10)[1] is None
        if ended:
            resp.release_conn()
        else:
            resp.close()  # never hand a half-read stream back to the connection pool
        measured = f"{max(delays) * 1000:.0f} ms (worst of 5)" if len(delays) == 5 else "lines did not arrive"
        measured += "; the stream ends with the log" if ended else "; the stream did NOT end with the log"
        self.record("preflight", "fake kubelet: appended line -> follow=true reader via apiserver", "", measured)
        self.delete_namespaces([ns])

    def warm_up(self) -> None:
        """Wait until the operator acts on a FineTuneJob (API only), then remove it: the operator is ready."""
        ns = self.make_namespaces("warmup", 1)[0]
        self.create_ftj(ns, "warmup")

        def has_workload() -> bool:
            assert self.operator is not None
            if not self.operator.alive():
                raise SystemExit(f"the operator exited:\n{self.operator.tail()}")
            status = raw_get(self.api, f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}/warmup").get("status") or {}
            if status.get("phase") == "Failed":
                raise SystemExit(f"the operator refused the bench's FineTuneJob: {status.get('message')}")
            return bool(status.get("workload"))

        took = wait_until("operator ready", has_workload, 180)
        if took is None:
            assert self.operator is not None
            raise SystemExit(f"the operator never gave a FineTuneJob a workload:\n{self.operator.tail()}")
        log(f"operator ready ({took:.1f}s after the first FineTuneJob)")
        self.delete_namespaces([ns])

    # --- scenarios ---------------------------------------------------------------------------------------------

    def scenario_create(self, n: int, rate: float, tag: str = "", judged: bool = True) -> list[str]:
        """Plain Jobs (baseline), then FineTuneJobs; returns the FineTuneJobs' namespaces (kept for `pending`).

        `judged`: the pod ratio is held to issue 7's 1.2x (at the scenario's scale); otherwise only recorded.
        """
        # Baseline: plain batch Jobs with the same pod shape, same count and rate.
        plain_ns = self.make_namespaces(f"plain{tag}")
        plain_set = set(plain_ns)
        pod_seen: dict[str, float] = {}  # owner Job uid -> first pod seen

        def on_pod(kind: str, obj: dict[str, Any], t: float) -> None:
            ref = owner(obj, "Job")
            if kind == "ADDED" and obj["metadata"]["namespace"] in plain_set and ref:
                pod_seen.setdefault(ref["uid"], t)

        started: dict[str, float] = {}
        lock = threading.Lock()

        def create_plain(i: int) -> None:
            ns = plain_ns[i % len(plain_ns)]
            t = time.monotonic()
            resp = self.batch.create_namespaced_job(ns, plain_job(f"plain-{i:05d}"), _preload_content=False)
            with lock:
                started[json.loads(resp.data)["metadata"]["uid"]] = t

        with self._watching("/api/v1/pods", on_pod):
            log(f"create: {n} plain Jobs at {rate}/s")
            achieved, errors = paced(n, rate, create_plain)
            wait_until("plain Job pods", lambda: len(started.keys() & pod_seen.keys()) >= len(started), 120)
        plain = latencies(started, pod_seen)
        if errors:
            log(f"{len(errors)} plain Job creates failed, e.g. {errors[0]}")
        took = self.delete_namespaces(plain_ns)
        log(f"plain Jobs: pod p50 {fmt_s(percentile(plain, 50))}; namespaces deleted in {self.fmt_took(took)}")

        # FineTuneJobs.
        ftj_ns = self.make_namespaces(f"create{tag}")
        ftj_set = set(ftj_ns)
        ftj_start: dict[str, float] = {}
        job_seen: dict[str, float] = {}  # FineTuneJob uid -> its Job first seen
        job_owner: dict[str, str] = {}  # Job uid -> FineTuneJob uid
        tpod_seen: dict[str, float] = {}  # FineTuneJob uid -> its trainer pod first seen
        early_pods: dict[str, float] = {}  # Job uid -> pod seen (before its Job's event, in theory)
        phases: dict[str, str] = {}
        phase_seen: dict[str, float] = {}  # FineTuneJob uid -> first status with a phase

        def on_job(kind: str, obj: dict[str, Any], t: float) -> None:
            ref = owner(obj, "FineTuneJob")
            if kind == "ADDED" and obj["metadata"]["namespace"] in ftj_set and ref:
                with lock:
                    job_seen.setdefault(ref["uid"], t)
                    job_owner[obj["metadata"]["uid"]] = ref["uid"]
                    if obj["metadata"]["uid"] in early_pods:
                        tpod_seen.setdefault(ref["uid"], early_pods[obj["metadata"]["uid"]])

        def on_tpod(kind: str, obj: dict[str, Any], t: float) -> None:
            ref = owner(obj, "Job")
            if kind == "ADDED" and obj["metadata"]["namespace"] in ftj_set and ref:
                with lock:
                    if ref["uid"] in job_owner:
                        tpod_seen.setdefault(job_owner[ref["uid"]], t)
                    else:
                        early_pods.setdefault(ref["uid"], t)

        def on_ftj(kind: str, obj: dict[str, Any], t: float) -> None:
            if obj["metadata"]["namespace"] in ftj_set:
                phase = (obj.get("status") or {}).get("phase") or ""
                phases[obj["metadata"]["uid"]] = phase
                if phase:
                    phase_seen.setdefault(obj["metadata"]["uid"], t)

        def create(i: int) -> None:
            ns = ftj_ns[i % len(ftj_ns)]
            t = time.monotonic()
            uid = self.create_ftj(ns, f"ftj-{i:05d}")["metadata"]["uid"]
            with lock:
                ftj_start[uid] = t

        with (
            self._watching("/apis/batch/v1/jobs", on_job),
            self._watching("/api/v1/pods", on_tpod),
            self._watching(FTJ_PATH, on_ftj),
        ):
            log(f"create: {n} FineTuneJobs at {rate}/s")
            achieved, errors = paced(n, rate, create)
            if errors:
                log(f"{len(errors)} FineTuneJob creates failed, e.g. {errors[0]}")
            wait_until(
                "every FineTuneJob's Job and pod",
                lambda: len(ftj_start.keys() & tpod_seen.keys() & job_seen.keys()) >= len(ftj_start),
                self.args.settle_timeout,
            )
            settled = wait_until(
                "every FineTuneJob Pending",
                lambda: sum(phases.get(u) == "Pending" for u in list(ftj_start)) >= len(ftj_start),
                self.args.settle_timeout,
            )
        to_job, to_pod = latencies(ftj_start, job_seen), latencies(ftj_start, tpod_seen)
        section = f"create ({n} FineTuneJobs at {rate:g}/s)"
        self.record(section, "achieved creation rate", f"{rate:g}/s", f"{achieved:.1f}/s, {len(errors)} errors")
        p50, p99 = percentile(to_job, 50), percentile(to_job, 99)
        self.record(section, "create -> trainer Job p50", "< 0.5 s", fmt_s(p50), p50 < 0.5)
        self.record(section, "create -> trainer Job p99", "< 2 s", fmt_s(p99), p99 < 2)
        missing = sum(math.isinf(x) for x in to_job)
        self.record(
            section, "create -> trainer Job max", "", f"{fmt_s(max(to_job, default=math.nan))}, {missing} never"
        )
        pod50, plain50 = percentile(to_pod, 50), percentile(plain, 50)
        ratio = pod50 / plain50 if plain50 > 0 else math.inf
        self.record(
            section,
            "create -> trainer pod p50 vs plain batch Job create -> pod p50",
            "<= 1.2x" if judged else "(recorded: no Job controller queue)",
            f"{fmt_s(pod50)} vs {fmt_s(plain50)} = {ratio:.2f}x (p99 {fmt_s(percentile(to_pod, 99))} vs "
            f"{fmt_s(percentile(plain, 99))}); the operator adds {fmt_s(pod50 - plain50)} at p50",
            ratio <= 1.2 if judged else None,
        )
        to_phase = latencies(ftj_start, phase_seen)
        self.record(
            section,
            "create -> status shows a phase: p50 / p99 / max",
            "",
            " / ".join(fmt_s(percentile(to_phase, q)) for q in (50, 99, 100))
            + ("" if settled is not None else " (not all Pending in time)"),
        )
        return ftj_ns

    def duplicates(self, names: list[str], expected: int) -> tuple[str, bool]:
        """Children per FineTuneJob (by ownerReference): exactly one Job and one ConfigMap each."""
        jobs: dict[str, int] = {}
        cms: dict[str, int] = {}
        ftjs: set[str] = set()
        for ns in names:
            ftjs.update(
                o["metadata"]["uid"] for o in list_all(self.api, f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}")
            )
            for path, counts in (
                (f"/apis/batch/v1/namespaces/{ns}/jobs", jobs),
                (f"/api/v1/namespaces/{ns}/configmaps", cms),
            ):
                for obj in list_all(self.api, path):
                    ref = owner(obj, "FineTuneJob")
                    if ref:
                        counts[ref["uid"]] = counts.get(ref["uid"], 0) + 1
        exact = sum(jobs.get(u) == 1 and cms.get(u) == 1 for u in ftjs)
        dup = sum(jobs.get(u, 0) > 1 or cms.get(u, 0) > 1 for u in ftjs)
        miss = sum(not jobs.get(u) or not cms.get(u) for u in ftjs)
        text = f"{exact}/{len(ftjs)} exactly one Job + one ConfigMap; {dup} duplicated, {miss} missing"
        return text, exact == expected == len(ftjs)

    def steady_cpu(self, section: str, label: str) -> dict[str, float]:
        time.sleep(self.args.settle)
        log(f"{section}: measuring CPU for {self.args.window:.0f}s")
        cpu = measure_cpu(self.pids(), self.args.window)
        op, api, etcd = cpu["operator"], cpu["kube-apiserver"], cpu["etcd"]
        self.record(section, f"operator CPU, {label}", "< 5% of a core", f"{op:.1f}%", op < 5)
        above = api - self.idle["kube-apiserver"]
        self.record(
            section,
            f"kube-apiserver CPU above idle, {label}",
            "< 10% of a core",
            f"{above:+.1f}% ({api:.1f}% vs idle {self.idle['kube-apiserver']:.1f}%)",
            above < 10,
        )
        self.record(section, f"etcd CPU, {label}", "", f"{etcd:.1f}% (idle {self.idle['etcd']:.1f}%)")
        kcm = cpu["kube-controller-manager"]
        self.record(
            section,
            f"kube-controller-manager CPU, {label}",
            "",
            f"{kcm:.1f}% (idle {self.idle['kube-controller-manager']:.1f}%)",
        )
        self.record(section, f"operator RSS, {label}", "", f"{self._rss():.0f} MB")
        return cpu

    def scenario_pending(self, ftj_ns: list[str]) -> None:
        n = self.args.jobs
        section = f"pending ({n} FineTuneJobs, pods Pending)"
        self.steady_cpu(section, f"{n} jobs Pending, steady state")
        text, ok = self.duplicates(ftj_ns, n)
        self.record(section, "none duplicated (after the window)", "exactly 1 Job + 1 ConfigMap each", text, ok)

    def scenario_running(self) -> None:
        assert self.fake is not None
        fake = self.fake
        m, seconds = self.args.running, self.args.report_seconds
        names = self.make_namespaces("running")
        ns_set = set(names)
        section = f"running ({m} trainers, one progress report per second)"
        pods: queue.Queue[dict[str, Any]] = queue.Queue()
        trainers: dict[str, tuple[str, str]] = {}  # FineTuneJob uid -> (namespace, pod)
        steps: dict[str, list[tuple[float, int]]] = {}  # FineTuneJob uid -> (time seen, step) as it rises
        phases: dict[str, str] = {}
        lock = threading.Lock()

        def on_pod(kind: str, obj: dict[str, Any], t: float) -> None:
            if kind == "ADDED" and obj["metadata"]["namespace"] in ns_set:
                pods.put(obj)

        def on_ftj(kind: str, obj: dict[str, Any], t: float) -> None:
            if obj["metadata"]["namespace"] not in ns_set:
                return
            uid, status = obj["metadata"]["uid"], obj.get("status") or {}
            phases[uid] = status.get("phase") or ""
            step = (status.get("progress") or {}).get("step")
            if isinstance(step, int):
                with lock:
                    seen = steps.setdefault(uid, [])
                    if not seen or step > seen[-1][1]:
                        seen.append((t, step))

        def start_trainer() -> None:
            while not self._stop.is_set():
                try:
                    pod = pods.get(timeout=0.5)
                except queue.Empty:
                    continue
                ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
                ref = owner(pod, "Job")
                if ref is None:
                    continue
                try:
                    ftj = owner(raw_get(self.api, f"/apis/batch/v1/namespaces/{ns}/jobs/{ref['name']}"), "FineTuneJob")
                    fake.append(ns, name, "starting\n" + report(1, ReportKind.STAGE, name, stage="training") + "\n")
                    self.bind(ns, name)
                    self.set_pod(ns, name, "Running", running={"startedAt": now_rfc3339()})
                    if ftj:
                        with lock:
                            trainers[ftj["uid"]] = (ns, name)
                except Exception as exc:
                    log(f"could not start trainer {ns}/{name}: {exc}")

        rss = RssSampler(self.pids()["operator"])
        rss.start()
        workers = [threading.Thread(target=start_trainer, daemon=True) for _ in range(4)]
        for w in workers:
            w.start()
        appended: dict[tuple[str, int], float] = {}
        with self._watching("/api/v1/pods", on_pod), self._watching(FTJ_PATH, on_ftj):
            log(f"running: {m} FineTuneJobs at {self.args.rate}/s")
            t0 = time.monotonic()
            _, errors = paced(m, self.args.rate, lambda i: self.create_many(names, "run", i))
            if errors:
                log(f"{len(errors)} creates failed, e.g. {errors[0]}")
            wait_until("trainers started", lambda: len(trainers) >= m - len(errors), self.args.settle_timeout)
            all_running = wait_until(
                "every FineTuneJob Running",
                lambda: sum(phases.get(u) == "Running" for u in list(trainers)) >= len(trainers),
                self.args.settle_timeout,
            )
            self.record(
                section,
                "every FineTuneJob shows phase Running",
                "",
                f"{fmt_s(time.monotonic() - t0) if all_running is not None else 'not all'} after the first create",
            )
            order = sorted(trainers.items())
            log(f"running: {len(order)} trainers report a step per second for {seconds:.0f}s")
            window: CpuWindow | None = None
            start = time.monotonic()
            for s in range(1, int(seconds) + 1):
                if window is None and s > min(10, seconds / 3):
                    window = CpuWindow(self.pids()).start()
                for j, (uid, (ns, pod)) in enumerate(order):
                    delay = start + (s - 1) + j / len(order) - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    line = report(
                        s + 1, ReportKind.PROGRESS, pod, step=s, total_steps=100000, loss=2.0, tokens_per_second=1000.0
                    )
                    appended[(uid, s)] = time.monotonic()
                    fake.append(ns, pod, line + "\n")
            cpu = window.stop() if window else {}
            last = int(seconds)
            wait_until(
                "the last step in every status",
                lambda: all(steps.get(u, [(0.0, 0)])[-1][1] >= last for u, _ in order),
                self.args.grace,
            )
        peak = rss.stop()
        self._stop_workers(workers)
        lags = []
        for (uid, s), t_app in appended.items():
            seen = steps.get(uid, [])
            t_seen = next((t for t, step in seen if step >= s), None)
            lags.append(t_seen - t_app if t_seen is not None else math.inf)
        unseen = sum(math.isinf(x) for x in lags)
        p50, p99 = percentile(lags, 50), percentile(lags, 99)
        extra = f" ({unseen} of {len(lags)} steps never shown within {self.args.grace:.0f}s)" if unseen else ""
        self.record(
            section,
            "progress lag p50 (log line appended -> status shows the step)",
            "< 3 s",
            fmt_s(p50) + extra,
            p50 < 3,
        )
        self.record(section, "progress lag p99", "< 10 s", fmt_s(p99), p99 < 10)
        self.record(section, "operator peak RSS", "< 250 MB", f"{peak:.0f} MB", peak < 250)
        if cpu:
            self.record(section, "operator CPU while reporting", "(recorded)", f"{cpu['operator']:.1f}% of a core")
            self.record(
                section,
                "kube-apiserver / etcd CPU while reporting (incl. the bench's own status watch)",
                "",
                f"{cpu['kube-apiserver']:.1f}% / {cpu['etcd']:.1f}% (idle {self.idle['kube-apiserver']:.1f}% / "
                f"{self.idle['etcd']:.1f}%)",
            )
        # The logs stay open while the pods run; the node's deletion handler closes each when its pod goes.
        took = self.delete_namespaces(names)
        self.record(section, f"delete the namespaces holding {m} running FineTuneJobs", "", self.fmt_took(took))

    def scenario_finished(self) -> None:
        assert self.fake is not None
        fake = self.fake
        k = self.args.finished
        names = self.make_namespaces("finished")
        ns_set = set(names)
        section = f"finished ({k} FineTuneJobs, trainers exited 0)"
        pods: queue.Queue[dict[str, Any]] = queue.Queue()
        phases: dict[str, str] = {}
        done: list[str] = []

        def on_pod(kind: str, obj: dict[str, Any], t: float) -> None:
            if kind == "ADDED" and obj["metadata"]["namespace"] in ns_set:
                pods.put(obj)

        def on_ftj(kind: str, obj: dict[str, Any], t: float) -> None:
            if obj["metadata"]["namespace"] in ns_set:
                phases[obj["metadata"]["uid"]] = (obj.get("status") or {}).get("phase") or ""

        def finish_trainer() -> None:
            while not self._stop.is_set():
                try:
                    pod = pods.get(timeout=0.5)
                except queue.Empty:
                    continue
                ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
                final = report(
                    3, ReportKind.OUTPUT, name, uri="s3://out/job/model/", manifest="s3://out/job/manifest.json"
                )
                try:
                    fake.append(ns, name, report(1, ReportKind.STAGE, name, stage="training") + "\n" + final + "\n")
                    self.bind(ns, name)
                    ts = now_rfc3339()
                    term = {"exitCode": 0, "reason": "Completed", "message": final, "startedAt": ts, "finishedAt": ts}
                    self.set_pod(ns, name, "Succeeded", terminated=term)
                    fake.close_log(ns, name)
                    done.append(name)
                except Exception as exc:
                    log(f"could not finish trainer {ns}/{name}: {exc}")

        workers = [threading.Thread(target=finish_trainer, daemon=True) for _ in range(4)]
        for w in workers:
            w.start()
        with self._watching("/api/v1/pods", on_pod), self._watching(FTJ_PATH, on_ftj):
            log(f"finished: {k} FineTuneJobs at {self.args.finished_rate}/s")
            t0 = time.monotonic()
            _, errors = paced(k, self.args.finished_rate, lambda i: self.create_many(names, "done", i))
            if errors:
                log(f"{len(errors)} creates failed, e.g. {errors[0]}")
            target = k - len(errors)
            wait_until("trainers finished", lambda: len(done) >= target, self.args.settle_timeout)
            ok = wait_until(
                "every FineTuneJob Succeeded",
                lambda: sum(p == "Succeeded" for p in list(phases.values())) >= target,
                self.args.settle_timeout,
                interval=1.0,
            )
            elapsed = time.monotonic() - t0
            succeeded = sum(p == "Succeeded" for p in list(phases.values()))
        self._stop_workers(workers)
        self.record(
            section,
            "every FineTuneJob shows phase Succeeded",
            "",
            f"{fmt_s(elapsed)} after the first create"
            if ok is not None
            else f"only {succeeded}/{k} in {fmt_s(elapsed)}",
        )
        time.sleep(self.args.settle)
        log(f"{section}: measuring CPU for {self.args.window:.0f}s")
        cpu = measure_cpu(self.pids(), self.args.window)
        op, idle = cpu["operator"], self.idle["operator"]
        state = "every job finished" if ok is not None else f"only {succeeded}/{k} Succeeded (still converging)"
        self.record(
            section,
            f"operator CPU, {state}",
            f"idle level (<= idle + {IDLE_MARGIN_PTS:g} pt)",
            f"{op:.1f}% vs idle {idle:.1f}%",
            op <= idle + IDLE_MARGIN_PTS,
        )
        api = cpu["kube-apiserver"] - self.idle["kube-apiserver"]
        self.record(section, f"kube-apiserver CPU above idle, {state}", "", f"{api:+.1f}%")
        self.record(section, f"operator RSS, {state}", "", f"{self._rss():.0f} MB")
        took = self.delete_namespaces(names)
        self.record(section, f"delete the namespaces holding {k} finished FineTuneJobs", "", self.fmt_took(took))

    def _stop_workers(self, workers: list[threading.Thread]) -> None:
        self._stop.set()
        for w in workers:
            w.join(5)
        self._stop.clear()

    @contextlib.contextmanager
    def _watching(self, path: str, on_event: Callable[[str, dict[str, Any], float], None]) -> Iterator[Watch]:
        watch = Watch(self.api, path, on_event)
        watch.start()
        if not watch.ready.wait(30):
            raise SystemExit(f"could not watch {path}: {watch.errors[-1:]}")
        try:
            yield watch
        finally:
            watch.stop()
            if watch.errors or watch.relists:
                log(f"watch {path}: {len(watch.errors)} reconnects after errors, {watch.relists} relists")

    # --- teardown ----------------------------------------------------------------------------------------------

    def teardown(self) -> None:
        self._stop.set()
        if self.api is not None:
            try:
                mine = [
                    n["metadata"]["name"]
                    for n in list_all(self.api, "/api/v1/namespaces", [("labelSelector", f"{RUN_LABEL}={self.run_id}")])
                ]
                if mine and self.delete_namespaces(mine) is None:
                    self._strip_finalizers(mine)
            except Exception as exc:
                log(f"teardown: {exc}")
        if self.operator is not None:
            self.operator.stop()
        if self.kubelet is not None:
            self.kubelet.stop()
        if self.fake is not None:
            self.fake.close()
        if self.api is not None:
            with contextlib.suppress(Exception):
                self.core.delete_node(NODE)
        if os.environ.get("FINETUNE_KEEP_CONTROL_PLANE") == "1":
            log(f"control plane kept (FINETUNE_KEEP_CONTROL_PLANE=1): KUBECONFIG={self.kubeconfig}")
        else:
            log("control plane down")
            self.cp.down()

    def _strip_finalizers(self, names: list[str]) -> None:
        """Last resort, only for the bench's own objects: namespaces still Terminating after --delete-timeout."""
        stripped = 0
        for ns in names:
            with contextlib.suppress(ApiException):
                for obj in list_all(self.api, f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"):
                    if obj["metadata"].get("finalizers"):
                        self.custom.patch_namespaced_custom_object(
                            GROUP, VERSION, ns, PLURAL, obj["metadata"]["name"], {"metadata": {"finalizers": None}}
                        )
                        stripped += 1
        log(f"teardown: removed the finalizers of {stripped} FineTuneJobs the operator had not released")
        wait_until("namespaces deleted", lambda: not any(self._exists(f"/api/v1/namespaces/{n}") for n in names), 120)


def plain_job(name: str) -> dict[str, Any]:
    """A batch Job shaped like the trainer's (one container, 1 CPU / 1 GiB, restartPolicy Never)."""
    container = {
        "name": "trainer",
        "image": "finetune-trainer:bench",
        "imagePullPolicy": "Never",
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 2,
            "template": {
                "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False, "containers": [container]}
            },
        },
    }


def report(seq: int, kind: ReportKind, attempt: str, **fields: Any) -> str:
    return format_report(Report(seq=seq, kind=kind, time=now_rfc3339(), attempt=attempt, **fields))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=500, help="FineTuneJobs (and plain Jobs) in create/pending")
    p.add_argument("--running", type=int, default=200, help="trainers reporting progress in `running`")
    p.add_argument("--finished", type=int, default=2000, help="finished FineTuneJobs in `finished`")
    p.add_argument("--rate", type=float, default=20.0, help="creations per second (create, running)")
    p.add_argument("--ratio-jobs", type=int, default=50, help="create: also a low-load round of this many (0: none)")
    p.add_argument("--ratio-rate", type=float, default=5.0, help="creations per second in the low-load round")
    p.add_argument("--finished-rate", type=float, default=50.0, help="creations per second in `finished`")
    p.add_argument("--namespaces", type=int, default=10, help="namespaces (tenants) per scenario")
    p.add_argument("--window", type=float, default=60.0, help="steady-state CPU window, seconds")
    p.add_argument("--idle-window", type=float, default=30.0, help="idle CPU window, seconds")
    p.add_argument("--settle", type=float, default=10.0, help="pause before a CPU window, seconds")
    p.add_argument("--report-seconds", type=float, default=90.0, help="how long trainers report in `running`")
    p.add_argument("--grace", type=float, default=20.0, help="how long a reported step may take to show")
    p.add_argument("--settle-timeout", type=float, default=600.0, help="max wait for a scenario to settle")
    p.add_argument("--delete-timeout", type=float, default=600.0, help="max wait for namespace deletion")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {SCENARIOS}")
    p.add_argument("--operator-config", help="operator config file (default: image/resources defaults only)")
    p.add_argument("--operator-verbose", action="store_true", help="run the operator with --verbose")
    p.add_argument("--quick", action="store_true", help="small smoke run (40/20/60 jobs, short windows)")
    p.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"), help="where to write the table")
    p.add_argument("--no-docs", action="store_true", help="do not write --docs (--quick never writes)")
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        given = {a.split("=", 1)[0] for a in (argv if argv is not None else sys.argv[1:])}
        quick = {
            "--jobs": 40, "--ratio-jobs": 20, "--running": 20, "--finished": 60, "--window": 15.0,
            "--idle-window": 10.0, "--settle": 5.0, "--report-seconds": 20.0, "--grace": 15.0, "--namespaces": 4,
            "--settle-timeout": 180.0, "--delete-timeout": 180.0,
        }  # fmt: skip
        for flag, value in quick.items():
            if flag not in given:
                setattr(args, flag.lstrip("-").replace("-", "_"), value)
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {sorted(unknown)}")
    return args


def _scale_args(argv: list[str]) -> list[str]:
    """The arguments that shape the measurement (not where results are written), to reproduce it."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--json", "--docs"):
            skip = True
        elif not arg.startswith(("--json=", "--docs=", "--no-docs")):
            shown.append(arg)
    return shown


def _commit() -> str:
    """The commit measured, and whether the operator or API code differs from it in the working tree."""
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not head:
        return "unknown (not a git checkout)"
    dirty = subprocess.run([*git, "status", "--porcelain", "operator", "api"], capture_output=True, text=True).stdout
    return head + (" + uncommitted operator/api changes" if dirty.strip() else "")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` tears down as Ctrl-C does
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1` prints every thread's stack (a stuck run)
    shown = _scale_args(sys.argv[1:] if argv is None else argv)
    command = "make bench-operator" + (f" BENCH_ARGS={shlex.quote(' '.join(shown))}" if shown else "")
    host, date = machine(), dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
    commit = _commit()
    bench = Bench(args)
    wanted = args.scenarios.split(",")
    t0 = time.monotonic()
    try:
        bench.setup()
        if "create" in wanted and args.ratio_jobs > 0:
            # Below the Job controller's throughput, so the ratio shows what the operator adds (see the docs).
            small = bench.scenario_create(args.ratio_jobs, args.ratio_rate, "-low", judged=False)
            bench.delete_namespaces(small)
        if "create" in wanted or "pending" in wanted:
            ftj_ns = bench.scenario_create(args.jobs, args.rate)
            if "pending" in wanted:
                bench.scenario_pending(ftj_ns)
            took = bench.delete_namespaces(ftj_ns)
            bench.record(
                f"pending ({args.jobs} FineTuneJobs, pods Pending)",
                f"delete the namespaces holding {args.jobs} FineTuneJobs",
                "",
                bench.fmt_took(took),
            )
        if "running" in wanted:
            bench.scenario_running()
        if "finished" in wanted:
            bench.scenario_finished()
    except KeyboardInterrupt:
        log("interrupted; tearing down")
    finally:
        if bench.operator is not None and not bench.operator.alive():
            log(f"the operator exited during the run:\n{bench.operator.tail()}")
        bench.teardown()
    rows = [row for _, row in bench.rows]
    print(f"\nOperator benchmark, {date} UTC, commit {commit}, {host}; {time.monotonic() - t0:.0f}s\n")
    print(text_table(rows))
    print(f"\nReproduce: {command}\n")
    if args.json:
        Path(args.json).write_text(json.dumps([{"section": s, **vars(r)} for s, r in bench.rows], indent=2))
    if not (args.quick or args.no_docs):
        body = (
            f"Last run: {date} UTC, commit `{commit}`, {time.monotonic() - t0:.0f} s. Reproduce with `{command}`.\n\n"
            + markdown_table(rows, date, host, command)
        )
        write_section(Path(args.docs), "bench-operator", body, "Operator at scale (`make bench-operator`)")
        log(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
