"""Pure functions that build the children of a FineTuneJob: its resolved-config ConfigMap and its batch Job.

Names are deterministic (derived from the job's name), so a retried or restarted handler finds the child it
already made instead of creating a second one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from finetune_api.spec import FineTuneJobSpec, NotificationSpec
from finetune_api.status import FineTuneJob, FineTuneJobMeta
from finetune_operator.config import Preflight

LABEL_JOB = "finetune.dev/job-name"
LABEL_UID = "finetune.dev/job-uid"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_RANK = "finetune.dev/worker-rank"  # a gang's workers (resources.workers > 1): 0..N-1
MANAGER = "finetune-operator"
CONFIG_MOUNT = "/etc/finetune"
CONFIG_FILE = "job.yaml"
WORKSPACE = "/workspace"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
TRAINER_UID = 1000
TERMINATION_GRACE_SECONDS = 120
HOLD_ON_USER_ERROR_SECONDS = 60
INTERRUPTIONS_ALLOWED = 50  # evictions/preemptions before the Job controller itself gives up
RDZV_PORT = 29500  # torch.distributed's usual master port, on worker 0
PREFLIGHT_DEADLINE_SECONDS = 3600  # a preflight still running after an hour (a huge dataset) is stopped


def child_name(job_name: str, suffix: str) -> str:
    """`<job>-<suffix>`, shortened with a hash when it would exceed 52 characters.

    52, not 63: the Job controller appends a 5-character random suffix for pod names and the pod name also
    lands in a label value (max 63).
    """
    name = f"{job_name}-{suffix}"
    if len(name) <= 52:
        return name
    digest = hashlib.sha256(job_name.encode()).hexdigest()[:8]
    return f"{job_name[: 52 - len(suffix) - 10].rstrip('-.')}-{digest}-{suffix}"


def workload_name(job_name: str) -> str:
    return child_name(job_name, "trainer")


def config_name(job_name: str) -> str:
    return child_name(job_name, "config")


def label_value(value: str) -> str:
    """A label value (at most 63 characters): object names can be 253, so long ones keep a prefix and a hash.

    Nothing is looked up by this label (the operator maps children by the UID label); it is for humans and
    `kubectl get -l`, and stays unique per name.
    """
    if len(value) <= 63:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    return f"{value[:52].rstrip('-_.')}-{digest}"


def labels(meta: dict[str, Any], component: str) -> dict[str, str]:
    return {
        LABEL_JOB: label_value(meta["name"]),
        LABEL_UID: meta.get("uid", ""),
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGER,
        "app.kubernetes.io/name": "finetune",
    }


def resolved_job_yaml(meta: dict[str, Any], spec: FineTuneJobSpec) -> str:
    """The file the trainer reads: the FineTuneJob with every default resolved, and no status."""
    job = FineTuneJob(
        metadata=FineTuneJobMeta(
            name=meta["name"],
            namespace=meta.get("namespace"),
            uid=meta.get("uid"),
            generation=meta.get("generation"),
        ),
        spec=spec,
    )
    return yaml.safe_dump(job.dump(), sort_keys=False)


def build_config_map(meta: dict[str, Any], spec: FineTuneJobSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_name(meta["name"]),
            "namespace": meta.get("namespace"),
            "labels": labels(meta, "config"),
        },
        "data": {CONFIG_FILE: resolved_job_yaml(meta, spec)},
    }


def _storage_env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """Object-store settings; credentials only as secretKeyRef, so their values never pass through us."""
    env: list[dict[str, Any]] = []
    st = spec.storage
    if st.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": st.endpoint})
    if st.region:
        env += [
            {"name": "AWS_DEFAULT_REGION", "value": st.region},
            {"name": "AWS_REGION", "value": st.region},
        ]
    ref = st.secret_ref
    if ref is not None:
        keys = [
            ("AWS_ACCESS_KEY_ID", ref.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", ref.secret_access_key_key),
        ]
        if ref.session_token_key:
            keys.append(("AWS_SESSION_TOKEN", ref.session_token_key))
        env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key}}} for var, key in keys]
    return env


def _resources(spec: FineTuneJobSpec) -> dict[str, Any]:
    res = spec.resources
    amounts: dict[str, Any] = {}
    for key, value in (
        ("cpu", res.cpu),
        ("memory", res.memory),
        ("ephemeral-storage", res.ephemeral_storage),
    ):
        if value is not None:
            amounts[key] = str(value)
    limits = dict(amounts)
    if res.gpus:
        limits[res.gpu_resource_name or "nvidia.com/gpu"] = str(res.gpus)
    # Requests equal limits: a trainer that gets less memory than it planned for is killed mid-run.
    return {"requests": dict(amounts), "limits": limits}


def build_workload(
    meta: dict[str, Any], spec: FineTuneJobSpec, image_pull_policy: str = "IfNotPresent"
) -> dict[str, Any]:
    """The batch Job that runs the trainer. Retries are new pods (restartPolicy Never) that resume."""
    pod_labels = labels(meta, "trainer")
    rp = spec.run_policy
    container = {
        "name": "trainer",
        "image": spec.image,
        "imagePullPolicy": image_pull_policy,
        "command": ["python", "-m", "finetune_trainer", "--config", f"{CONFIG_MOUNT}/{CONFIG_FILE}"],
        "env": [
            *_base_env(),
            {"name": "FINETUNE_GPUS", "value": str(spec.resources.gpus or 0)},
            # After a user error the trainer waits (this long at most) for the operator to stop the Job, so the Job
            # controller starts no second pod; the operator's reaction takes about a second.
            {"name": "FINETUNE_HOLD_ON_USER_ERROR_SECONDS", "value": str(HOLD_ON_USER_ERROR_SECONDS)},
            *_storage_env(spec),
        ],
        "resources": _resources(spec),
        "volumeMounts": [dict(m) for m in _MOUNTS],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": restricted_container(),
    }
    pod_spec = _pod_spec(meta, container)
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod_spec["tolerations"] = [t.dump() for t in spec.resources.tolerations]
    job_spec: dict[str, Any] = {
        # The operator enforces runPolicy.backoffLimit itself, counting only attempts that failed by themselves;
        # the Job controller (which on Kubernetes 1.20 also counts evictions and preemptions) gets headroom.
        "backoffLimit": rp.backoff_limit + INTERRUPTIONS_ALLOWED,
        "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
    }
    if rp.active_deadline_seconds:
        # What is left of the deadline after earlier runs (the operator deducts them when a job resumes).
        job_spec["activeDeadlineSeconds"] = meta.get("activeDeadlineSeconds") or rp.active_deadline_seconds
    if meta.get("podFailurePolicy"):
        # Kubernetes 1.26+: the Job controller itself ends the Job on a user error (no second pod starts) and does
        # not count interruptions. On older clusters the operator does both (observe.py), a moment later.
        job_spec["podFailurePolicy"] = {
            "rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}},
                {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [75]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        }
    job_labels = labels(meta, "trainer")
    if meta.get("queueName"):
        # Kueue admits a Job by unsuspending it (Job.spec.suspend: Kubernetes 1.21+; older API servers drop the
        # field and the Job starts at once). The operator shows the wait as phase Queued.
        job_labels[KUEUE_QUEUE_LABEL] = meta["queueName"]
        job_spec["suspend"] = True
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": workload_name(meta["name"]),
            "namespace": meta.get("namespace"),
            "labels": job_labels,
        },
        "spec": job_spec,
    }


def _pod_spec(meta: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The trainer's pod (and the preflight's): restricted, no API token, the job's config and scratch volumes."""
    return {
        "restartPolicy": "Never",
        # On SIGTERM (deletion, eviction, preemption, suspend) the trainer saves and uploads a checkpoint first.
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_name(meta["name"])}},
            {"name": "workspace", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
        ],
    }


def _base_env() -> list[dict[str, Any]]:
    return [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "HOME", "value": WORKSPACE},
        {"name": "HF_HOME", "value": f"{WORKSPACE}/hf"},
        {"name": "FINETUNE_CACHE", "value": f"{WORKSPACE}/cache"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


_MOUNTS: list[dict[str, Any]] = [
    {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
    {"name": "workspace", "mountPath": WORKSPACE},
    {"name": "tmp", "mountPath": "/tmp"},
    {"name": "shm", "mountPath": "/dev/shm"},
]


def preflight_name(job_name: str) -> str:
    return child_name(job_name, "preflight")


def build_preflight(
    meta: dict[str, Any], spec: FineTuneJobSpec, image_pull_policy: str, settings: Preflight
) -> dict[str, Any]:
    """The CPU preflight: one small pod of the trainer image that checks the dataset and sizes the job
    (``python -m finetune_trainer.preflight``) before any GPU is requested. Its verdict, a ``plan`` or a final
    ``error`` report, comes back in its termination message. No GPU, no tenant placement (the platform's preflight
    settings place it on CPU nodes), no retry: a failure is reported, not looped on."""
    pod_labels = labels(meta, "preflight")
    amounts = {"cpu": settings.cpu, "memory": settings.memory}
    if spec.resources.ephemeral_storage is not None:
        amounts["ephemeral-storage"] = str(spec.resources.ephemeral_storage)
    container = {
        "name": "preflight",
        "image": spec.image,
        "imagePullPolicy": image_pull_policy,
        "command": ["python", "-m", "finetune_trainer.preflight", "--config", f"{CONFIG_MOUNT}/{CONFIG_FILE}"],
        "env": [
            *_base_env(),
            # The planner sizes the whole job: every GPU of every worker.
            {"name": "FINETUNE_GPUS", "value": str((spec.resources.gpus or 0) * spec.resources.workers)},
            *_storage_env(spec),
        ],
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "volumeMounts": [dict(m) for m in _MOUNTS],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": restricted_container(),
    }
    pod_spec = _pod_spec(meta, container)
    pod_spec["terminationGracePeriodSeconds"] = 10  # nothing to save
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod_spec["tolerations"] = [t.dump() for t in settings.tolerations]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": preflight_name(meta["name"]), "namespace": meta.get("namespace"), "labels": pod_labels},
        "spec": {
            "backoffLimit": 0,  # a failed preflight is reported (and lets the job go on), never retried
            "activeDeadlineSeconds": PREFLIGHT_DEADLINE_SECONDS,
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }


def worker_name(job_name: str, rank: int) -> str:
    return child_name(job_name, f"worker-{rank}")


def build_worker(
    meta: dict[str, Any], spec: FineTuneJobSpec, image_pull_policy: str, rank: int, rdzv_host: str
) -> dict[str, Any]:
    """One worker of a gang (resources.workers > 1): the trainer's Job for one stable rank, with the
    torch.distributed rendezvous in its environment (static: worker 0 hosts it at rdzv_host:RDZV_PORT, the pod
    IP of worker 0 as the other pods reach it, known once that pod has one). backoffLimit 0 and no
    podFailurePolicy: a worker never restarts alone; the operator restarts the whole gang (gang.py)."""
    job = build_workload(meta, spec, image_pull_policy)
    job["metadata"]["name"] = worker_name(meta["name"], rank)
    job["metadata"]["labels"][LABEL_RANK] = str(rank)
    template = job["spec"]["template"]
    template["metadata"]["labels"][LABEL_RANK] = str(rank)
    job["spec"]["backoffLimit"] = 0
    job["spec"].pop("podFailurePolicy", None)
    container = template["spec"]["containers"][0]
    # No hold after a user error: with backoffLimit 0 no replacement pod can start, and a worker that lingers
    # would make the others fail first (their peer is gone), hiding the user error behind a retryable one.
    container["env"] = [e for e in container["env"] if e["name"] != "FINETUNE_HOLD_ON_USER_ERROR_SECONDS"]
    container["env"] += [
        {"name": "FINETUNE_WORKERS", "value": str(spec.resources.workers)},
        {"name": "FINETUNE_WORKER_RANK", "value": str(rank)},
        {"name": "FINETUNE_RDZV_HOST", "value": "127.0.0.1" if rank == 0 else rdzv_host},
        {"name": "FINETUNE_RDZV_PORT", "value": str(RDZV_PORT)},
    ]
    if rank == 0:
        container["ports"] = [{"name": "rendezvous", "containerPort": RDZV_PORT, "protocol": "TCP"}]
    return job


def restricted_container() -> dict[str, Any]:
    """A container securityContext that passes PodSecurity `restricted`, with a read-only root filesystem."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def notifier_name(job_name: str) -> str:
    return child_name(job_name, "notify")


def build_notifier(
    meta: dict[str, Any], notification: NotificationSpec, payload: dict[str, Any], image: str, image_pull_policy: str
) -> dict[str, Any]:
    """A one-pod Job that POSTs the verdict to the tenant's webhook (spec.notification), as restricted as the
    trainer and with the URL only as a secretKeyRef. Owned by the FineTuneJob like the trainer's Job."""
    ref = notification.webhook
    pod_labels = labels(meta, "notifier")
    container = {
        "name": "notify",
        "image": image,
        "imagePullPolicy": image_pull_policy,
        "command": ["python", "-m", "finetune_operator.notify"],
        "env": [
            {"name": "NOTIFY_URL", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}},
            {"name": "NOTIFY_PAYLOAD", "value": json.dumps(payload, sort_keys=True)},
        ],
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"cpu": "200m", "memory": "128Mi"},
        },
        "securityContext": restricted_container(),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": notifier_name(meta["name"]), "namespace": meta.get("namespace"), "labels": pod_labels},
        "spec": {
            "backoffLimit": 2,
            "activeDeadlineSeconds": 600,
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": TRAINER_UID,
                        "runAsGroup": TRAINER_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                },
            },
        },
    }
