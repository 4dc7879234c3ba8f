"""The few Kubernetes calls the CLI makes, with errors turned into messages a person can act on.

The kubernetes client is imported lazily: `finetune validate` and `finetune run` work on machines that never
talk to a cluster and may not have it installed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

from finetune_api.spec import API_GROUP, API_VERSION, PLURAL
from finetune_api.status import TERMINAL_PHASES
from finetune_operator.builders import LABEL_COMPONENT, LABEL_UID

if TYPE_CHECKING:
    from kubernetes.client import ApiClient


class CliError(Exception):
    """A failure explained in its message; the CLI prints it and exits 1."""


def _explain(exc: Exception, what: str) -> CliError:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        if exc.status == 404:
            return CliError(f"{what}: not found")
        if exc.status in (401, 403):
            return CliError(f"{what}: not allowed ({exc.status} {exc.reason}); check your kubeconfig's user and RBAC")
        return CliError(f"{what}: the API server answered {exc.status} {exc.reason}")
    return CliError(f"{what}: cannot reach the API server ({type(exc).__name__}: {exc})")


class Kube:
    """A connection to one cluster (from --kubeconfig, $KUBECONFIG or ~/.kube/config) and a default namespace."""

    def __init__(self, kubeconfig: str | None = None, namespace: str | None = None) -> None:
        try:
            from kubernetes import config
            from kubernetes.client.exceptions import ApiException
            from urllib3.exceptions import HTTPError
        except ImportError:
            raise CliError(
                "the kubernetes client is not installed: pip install 'finetune-platform[operator]'"
            ) from None
        try:
            self.api: ApiClient = config.new_client_from_config(config_file=kubeconfig)
            _, context = config.list_kube_config_contexts(config_file=kubeconfig)
        except (config.ConfigException, OSError) as exc:
            raise CliError(f"no usable kubeconfig ({exc}); pass --kubeconfig or set KUBECONFIG") from None
        # What a call may fail with: an API answer, or no answer (connection, TLS, timeout). Anything else is a
        # bug and keeps its traceback.
        self.errors: tuple[type[Exception], ...] = (ApiException, HTTPError, OSError)
        self.namespace = namespace or (context or {}).get("context", {}).get("namespace") or "default"

    def close(self) -> None:
        self.api.close()

    def _custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    def _core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api)

    # ---- FineTuneJobs ----

    def list_jobs(self, all_namespaces: bool = False) -> list[dict[str, Any]]:
        where = "all namespaces" if all_namespaces else f"namespace {self.namespace}"
        try:
            if all_namespaces:
                result = self._custom().list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL)
            else:
                result = self._custom().list_namespaced_custom_object(API_GROUP, API_VERSION, self.namespace, PLURAL)
        except self.errors as exc:
            raise _explain(exc, f"listing FineTuneJobs in {where}") from None
        items: list[dict[str, Any]] = result.get("items") or []
        return items

    def get_job(self, name: str) -> dict[str, Any]:
        try:
            job: dict[str, Any] = self._custom().get_namespaced_custom_object(
                API_GROUP, API_VERSION, self.namespace, PLURAL, name
            )
        except self.errors as exc:
            raise _explain(exc, f"FineTuneJob {self.namespace}/{name}") from None
        return job

    def delete_job(self, name: str) -> None:
        try:
            self._custom().delete_namespaced_custom_object(API_GROUP, API_VERSION, self.namespace, PLURAL, name)
        except self.errors as exc:
            raise _explain(exc, f"deleting FineTuneJob {self.namespace}/{name}") from None

    def suspend_job(self, name: str) -> dict[str, Any]:
        return self._set_run_policy(name, "suspend", "suspending")

    def cancel_job(self, name: str) -> dict[str, Any]:
        return self._set_run_policy(name, "cancel", "cancelling")

    def _set_run_policy(self, name: str, field: str, doing: str) -> dict[str, Any]:
        patch = {"spec": {"runPolicy": {field: True}}}  # a merge patch: the rest of runPolicy is kept
        try:
            job: dict[str, Any] = self._custom().patch_namespaced_custom_object(
                API_GROUP, API_VERSION, self.namespace, PLURAL, name, patch
            )
        except self.errors as exc:
            raise _explain(exc, f"{doing} FineTuneJob {self.namespace}/{name}") from None
        return job

    # ---- trainer pods ----

    def trainer_pods(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        """The job's trainer pods, oldest first (each retry is a new pod), found by the job's UID label."""
        selector = f"{LABEL_UID}={job['metadata']['uid']},{LABEL_COMPONENT}=trainer"
        try:
            pods = self._core().list_namespaced_pod(self.namespace, label_selector=selector).items
        except self.errors as exc:
            raise _explain(exc, f"listing trainer pods of {job['metadata']['name']}") from None
        found = [self.api.sanitize_for_serialization(p) for p in pods]
        return sorted(found, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))

    def pod_phase(self, pod_name: str) -> str:
        try:
            pod = self._core().read_namespaced_pod(pod_name, self.namespace)
        except self.errors as exc:
            raise _explain(exc, f"pod {self.namespace}/{pod_name}") from None
        return str(pod.status.phase or "Pending")

    def log_lines(self, pod_name: str, follow: bool = False) -> Iterator[str]:
        """The trainer container's log, line by line; with follow, until the container exits."""
        what = f"log of pod {self.namespace}/{pod_name}"
        try:
            if not follow:
                text = self._core().read_namespaced_pod_log(pod_name, self.namespace, container="trainer")
                yield from str(text).splitlines()
                return
            response = self._core().read_namespaced_pod_log(
                pod_name, self.namespace, container="trainer", follow=True, _preload_content=False
            )
        except self.errors as exc:
            raise _explain(exc, what) from None
        raw = getattr(response, "response", response)  # newer clients wrap the urllib3 response
        try:
            pending = b""
            for chunk in raw.stream(4096, decode_content=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", errors="replace")
            if pending:
                yield pending.decode("utf-8", errors="replace")
        finally:
            raw.release_conn()


def follow(
    kube: Kube,
    name: str,
    out: TextIO,
    render_line: Callable[[dict[str, Any]], str],
    interval: float,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Poll a job until it is terminal (or timeout_s passes), showing one line; returns its last state.

    Poll rather than watch: a watch needs list/watch rights a tenant may not have, and a lag of a poll interval
    is fine for a progress bar (the operator itself updates status every few seconds). On a terminal the line
    is redrawn in place; otherwise each change is printed once.
    """
    live, last = out.isatty(), ""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        job = kube.get_job(name)
        line = render_line(job)
        if live:
            out.write("\r\033[K" + line)
            out.flush()
        elif line != last:
            print(line, file=out, flush=True)
        last = line
        terminal = (job.get("status") or {}).get("phase") in TERMINAL_PHASES
        if terminal or (deadline is not None and time.monotonic() > deadline):
            if live:
                out.write("\n")
            return job
        time.sleep(interval)
