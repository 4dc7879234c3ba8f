"""The Helm chart, rendered by a real helm 3 (scripts/helm.sh), checked without a cluster.

What these tests pin: the chart lints; its policy ConfigMap is exactly what the operator's config model
accepts (so chart and operator cannot drift); the values schema rejects mistakes before anything renders;
RBAC stays least-privilege; the operator, test and cleanup-hook pods pass PodSecurity `restricted`; the
operator runs the slim operator image while trainer pods default to the trainer image; `helm uninstall`
first runs a pre-delete hook that strips the operator's finalizer from FineTuneJobs; manifests/operator.yaml
is a fresh render. helm is required: if scripts/helm.sh cannot provide it, the tests fail rather than skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from finetune_operator.config import Defaults, Limits, OperatorConfig

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
HELM_SH = REPO / "scripts" / "helm.sh"
NAMESPACE = "finetune-system"
RELEASE = "finetune"


@pytest.fixture(scope="session")
def helm() -> str:
    proc = subprocess.run(["bash", str(HELM_SH), "--path"], capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        pytest.fail(f"scripts/helm.sh could not provide helm (rc={proc.returncode}):\n{proc.stderr}", pytrace=False)
    return proc.stdout.strip()


def run_helm(helm: str, *args: str, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args, str(chart)], capture_output=True, text=True, timeout=120, check=False)


def render(helm: str, *flags: str, chart: Path = CHART) -> list[dict[str, Any]]:
    proc = run_helm(helm, "template", RELEASE, "--namespace", NAMESPACE, *flags, chart=chart)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def hook_of(doc: dict[str, Any]) -> str | None:
    return ((doc.get("metadata") or {}).get("annotations") or {}).get("helm.sh/hook")


def release_objects(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What `helm install` creates and keeps (no hooks)."""
    return [d for d in docs if hook_of(d) is None]


def hooks(docs: list[dict[str, Any]], hook: str) -> list[dict[str, Any]]:
    return [d for d in docs if hook_of(d) == hook]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def operator_config(docs: list[dict[str, Any]]) -> OperatorConfig:
    """The policy ConfigMap's config.yaml, parsed exactly as the operator parses it."""
    (cm,) = [d for d in find(docs, "ConfigMap") if "config.yaml" in d.get("data", {})]
    return OperatorConfig.model_validate(yaml.safe_load(cm["data"]["config.yaml"]))


def env_of(container: dict[str, Any]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env") or []}


def values_file(tmp_path: Path, values: dict[str, Any]) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


# ---- lint and render ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [[], ["-f", str(CHART / "ci" / "local-values.yaml")]], ids=["defaults", "local"])
def test_chart_lints_strictly(helm: str, values: list[str]) -> None:
    proc = run_helm(helm, "lint", "--strict", *values)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_default_render_has_the_operator_objects(helm: str) -> None:
    docs = render(helm)
    kinds = sorted(d["kind"] for d in docs)
    operator = ["ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Deployment"]
    smoke_test = ["ServiceAccount", "Role", "RoleBinding", "Pod"]
    cleanup = ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Job"]
    webhook = ["Secret", "Service", "ValidatingWebhookConfiguration"]
    metrics = ["Service"]
    assert kinds == sorted([*operator, *smoke_test, *cleanup, *webhook, *metrics])
    assert sorted(d["kind"] for d in hooks(docs, "pre-delete")) == sorted(cleanup)
    assert sorted(d["kind"] for d in hooks(docs, "test")) == ["Pod"]
    for doc in docs:
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "ValidatingWebhookConfiguration"):
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]


# ---- the policy ConfigMap is the operator's config ---------------------------------------------------------------


def test_default_policy_is_the_operators_builtin_policy(helm: str) -> None:
    # Helm deletes a key set to null, so the operator's built-in default then applies: the chart's defaults
    # must be those same values, or "unset" would mean two different things.
    assert operator_config(render(helm)) == OperatorConfig()


def test_every_policy_value_reaches_the_operator(helm: str, tmp_path: Path) -> None:
    policy = {
        "defaults": {
            "image": "registry.example.com/ml/trainer:1.2",
            "imagePullPolicy": "Always",
            "gpus": 2,
            "gpuResourceName": "amd.com/gpu",
            "cpu": "8",
            "memory": "64Gi",
            "ephemeralStorage": "100Gi",
            "storageEndpoint": "http://minio.storage:9000",
            "storageRegion": "eu-west-1",
            "nodeSelector": {"gpu": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "limits": {
            "maxGpusPerJob": 4,
            "maxCpu": "16",
            "maxMemory": "128Gi",
            "maxActiveDeadlineSeconds": 86400,
            "allowedMethods": ["lora"],
            "allowedImagePrefixes": ["registry.example.com/ml/"],
            "allowedUriSchemes": ["s3"],
            "allowedUris": {"model": ["s3://models/"], "data": ["s3://data/", "s3://shared/team-a"], "output": []},
            "allowedTolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
            "allowedNodeSelector": {"gpu-type": ["a100", "h100"], "zone": ["*"]},
            "allowedGpuResourceNames": ["nvidia.com/gpu", "gpu.intel.com/i915"],
            "allowedStorageEndpoints": ["https://ceph.lab.corp"],
        },
        "tenants": {
            "research": {
                "limits": {"maxGpusPerJob": 16, "allowedUris": {"data": ["s3://research/"]}},
                "defaults": {"gpus": 4},
            }
        },
        "pollSeconds": 1.5,
        "logTailLines": 1000,
    }
    cfg = operator_config(render(helm, "-f", values_file(tmp_path, {"policy": policy})))
    assert cfg.model_dump(by_alias=True) == OperatorConfig.model_validate(policy).model_dump(by_alias=True)
    research = cfg.for_namespace("research")
    assert (research.limits.max_gpus_per_job, research.defaults.gpus, research.limits.max_cpu) == (16, 4, "16")
    # A tenant's allowedUris replaces only the kinds it names.
    assert research.limits.allowed_uris.model_dump() == {
        "model": ["s3://models/"],
        "data": ["s3://research/"],
        "output": [],
    }


def deployment_image(docs: list[dict[str, Any]]) -> str:
    return str(one(release_objects(docs), "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"])


def test_operator_runs_the_slim_image_and_trainers_default_to_the_trainer_image(helm: str) -> None:
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    docs = render(helm)
    assert deployment_image(docs) == f"finetune-operator:{version}"
    # Trainer pods default to the CUDA build (the chart's defaults are for GPU clusters; docs/images.md).
    assert operator_config(docs).defaults.image == f"finetune-trainer:{version}-cuda"
    # Each follows its own values.
    docs = render(
        helm,
        *("--set", "image.repository=reg.example.com/op", "--set", "image.tag=9.9"),
        *("--set", "trainerImage.repository=reg.example.com/ft", "--set", "trainerImage.tag=2.0"),
    )
    assert deployment_image(docs) == "reg.example.com/op:9.9"
    assert operator_config(docs).defaults.image == "reg.example.com/ft:2.0"
    # An explicit policy image wins; the hooks run the operator image (Python + the Kubernetes client).
    docs = render(helm, "--set", "policy.defaults.image=reg.example.com/custom:1")
    assert operator_config(docs).defaults.image == "reg.example.com/custom:1"
    for kind in ("Pod", "Job"):
        (pod,) = [d for d in docs if d["kind"] == kind]
        assert pod["spec"].get("template", pod)["spec"]["containers"][0]["image"] == f"finetune-operator:{version}"


def test_local_values_name_both_images(helm: str) -> None:
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    docs = render(helm, "-f", str(CHART / "ci" / "local-values.yaml"))
    assert deployment_image(docs).startswith("finetune-operator:")
    # The local cluster has no GPU: it keeps the CPU-only trainer image.
    assert operator_config(docs).defaults.image == f"finetune-trainer:{version}"


def test_empty_string_lifts_cpu_and_memory_limits(helm: str, tmp_path: Path) -> None:
    values = {
        "policy": {
            "limits": {"maxCpu": "", "maxMemory": ""},
            "tenants": {"team-a": {"limits": {"maxCpu": ""}}},
        }
    }
    cfg = operator_config(render(helm, "-f", values_file(tmp_path, values)))
    assert (cfg.limits.max_cpu, cfg.limits.max_memory) == (None, None)
    assert cfg.tenants["team-a"].limits == {"maxCpu": None}


def test_local_cluster_values_render_a_cpu_policy(helm: str) -> None:
    docs = render(helm, "-f", str(CHART / "ci" / "local-values.yaml"))
    cfg = operator_config(docs)
    assert cfg.defaults.gpus == 0 and cfg.defaults.image_pull_policy == "Never"
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] == "Never"


def _pydantic_types(prop: dict[str, Any]) -> set[str]:
    options = prop.get("anyOf", [prop])
    return {o["type"] for o in options if "type" in o}


@pytest.mark.parametrize(
    ("model", "pointer"),
    [(OperatorConfig, "policy"), (Defaults, "definitions/policyDefaults"), (Limits, "definitions/policyLimits")],
    ids=["OperatorConfig", "Defaults", "Limits"],
)
def test_values_schema_matches_the_config_model(model: type[BaseModel], pointer: str) -> None:
    """Same keys, same JSON types (nullability included), and bounds at least as strict as the model's."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    node: dict[str, Any] = schema
    for part in pointer.split("/"):
        node = node[part] if part in node else node["properties"][part]
    assert node["additionalProperties"] is False
    ours = node["properties"]
    theirs = model.model_json_schema(by_alias=True)["properties"]
    assert set(ours) == set(theirs)
    for key, prop in theirs.items():
        want = _pydantic_types(prop)
        if not want:  # a nested model ($ref): checked by its own parametrization
            continue
        mine = ours[key]
        if "$ref" in mine:
            mine = schema["definitions"][mine["$ref"].split("/")[-1]]
        got = set(mine["type"]) if isinstance(mine["type"], list) else {mine["type"]}
        assert got == want, f"{key}: schema types {got} != model types {want}"
        for bound in ("minimum", "exclusiveMinimum"):
            limit = next((o[bound] for o in prop.get("anyOf", [prop]) if bound in o), None)
            if limit is not None:
                assert mine.get(bound, mine.get("minimum", float("-inf"))) >= limit, f"{key}: {bound} {limit}"


# ---- the schema rejects mistakes at `helm template` -----------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "policy.defaults.gpu=1"], "Additional property gpu is not allowed"),
        (["--set", "polcy.pollSeconds=1"], "Additional property polcy is not allowed"),
        (["--set", "policy.defaults.gpus=-1"], "policy.defaults.gpus"),
        (["--set", "policy.defaults.cpu=4"], "Expected: string, given: integer"),
        (["--set", "policy.pollSeconds=0"], "policy.pollSeconds"),
        (["--set", "policy.defaults.imagePullPolicy=Sometimes"], "policy.defaults.imagePullPolicy"),
        (["--set", "policy.defaults.memory=lots"], "policy.defaults.memory"),
        (["--set", "policy.limits.allowedMethods={full,dpo}"], "policy.limits.allowedMethods"),
        (["--set", "policy.tenants.team-a.limits.maxGpus=3"], "Additional property maxGpus is not allowed"),
        (["--set", "watchNamespaces={team-*}"], "watchNamespaces"),
        (["--set", "resources.limits.cpu=-1"], "resources.limits.cpu"),
        (["--set", "replicas=2"], "Additional property replicas is not allowed"),
        (["--set", "securityContext.privileged=yes"], "securityContext.privileged"),
        (["--set", "trainerImage.repo=x"], "Additional property repo is not allowed"),
        (["--set", "cleanupOnUninstall.enable=false"], "Additional property enable is not allowed"),
        (["--set", "cleanupOnUninstall.timeoutSeconds=0"], "cleanupOnUninstall.timeoutSeconds"),
        (["--set", "policy.defaults.gpuResourceName=cpu"], "policy.defaults.gpuResourceName"),
        (["--set", "policy.limits.allowedGpuResourceNames={nvidia.com/gpu,memory}"], "allowedGpuResourceNames"),
        (["--set", "policy.limits.allowedGpuResourceNames={kubernetes.io/gpu}"], "allowedGpuResourceNames"),
        (["--set", "policy.limits.allowedUris.data={data/}"], "policy.limits.allowedUris.data"),
        (["--set", "policy.limits.allowedUris.output={s3://out/?x}"], "policy.limits.allowedUris.output"),
        (["--set", "policy.limits.allowedUris.logs={s3://logs/}"], "Additional property logs is not allowed"),
        (["--set", "policy.limits.allowedTolerations[0].operator=Any"], "allowedTolerations"),
        (["--set", "policy.tenants.team-a.limits.allowedUris.model={ftp://m/}"], "allowedUris.model"),
        (["--set", "policy.limits.allowedStorageEndpoints={minio:9000}"], "allowedStorageEndpoints"),
    ],
)
def test_schema_rejects_invalid_values(helm: str, flags: list[str], message: str) -> None:
    proc = run_helm(helm, "template", RELEASE, *flags)
    assert proc.returncode != 0, f"{flags} rendered:\n{proc.stdout[:500]}"
    assert message in proc.stderr, proc.stderr


# ---- RBAC ----------------------------------------------------------------------------------------------------

OPERATOR_RULES = {
    ("finetune.dev", "finetunejobs"): {"get", "list", "watch", "patch"},
    ("finetune.dev", "finetunejobs/status"): {"patch"},
    ("batch", "jobs"): {"create", "list", "watch", "patch", "delete"},
    ("", "configmaps"): {"create", "patch"},
    ("", "pods"): {"list", "watch"},
    ("", "pods/log"): {"get"},
    ("", "events"): {"create", "patch", "list", "watch"},
    ("", "resourcequotas"): {"list", "watch"},
}
DISCOVERY_RULES = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}


def grants(role: dict[str, Any], named: bool = False) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs of one Role or ClusterRole. Rules limited to resourceNames are allowed
    only with named=True."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert not rule.get("nonResourceURLs"), rule
        assert named or not rule.get("resourceNames"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def assert_least_privilege(role: dict[str, Any]) -> None:
    for (group, resource), verbs in grants(role, named=True).items():
        assert "*" not in (group, resource) and "*" not in verbs, f"wildcard in {role['metadata']['name']}"
        assert resource != "secrets", f"{role['metadata']['name']} may touch Secrets"
        assert resource not in ("pods/exec", "pods/attach", "pods/portforward", "pods/proxy"), resource
        if resource == "pods":
            assert verbs <= {"get", "list", "watch"}, verbs
        assert "escalate" not in verbs and "bind" not in verbs and "impersonate" not in verbs


@pytest.mark.parametrize("flags", [[], ["--set", "watchNamespaces={team-a,team-b}"]], ids=["cluster", "namespaced"])
def test_rbac_is_least_privilege(helm: str, flags: list[str]) -> None:
    docs = render(helm, *flags)
    roles = find(docs, "ClusterRole") + find(docs, "Role")
    assert roles
    for role in roles:
        assert_least_privilege(role)


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses(helm: str) -> None:
    docs = release_objects(render(helm))
    role = one(docs, "ClusterRole")
    assert grants(role) == OPERATOR_RULES | DISCOVERY_RULES
    binding = one(docs, "ClusterRoleBinding")
    sa = one(docs, "ServiceAccount", f"{RELEASE}-finetune-operator")
    assert binding["roleRef"]["kind"] == "ClusterRole" and binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]


def test_namespaced_rbac_grants_only_discovery_cluster_wide(helm: str) -> None:
    docs = release_objects(render(helm, "--set", "watchNamespaces={team-a,team-b}", "--set", "test.enabled=false"))
    assert grants(one(docs, "ClusterRole")) == DISCOVERY_RULES
    roles = find(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert grants(role) == OPERATOR_RULES
    for binding in find(docs, "RoleBinding"):
        assert binding["roleRef"]["name"] == roles[0]["metadata"]["name"]
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    env = env_of(one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0])
    assert env["WATCH_NAMESPACES"] == "team-a,team-b"


def test_rbac_create_false_renders_no_rbac(helm: str) -> None:
    docs = render(helm, "--set", "rbac.create=false", "--set", "test.enabled=false")
    assert not [d for d in docs if d["apiVersion"].startswith("rbac.authorization.k8s.io")]


def test_smoke_test_account_can_only_manage_finetunejobs(helm: str) -> None:
    docs = render(helm, "--set", "watchNamespaces={team-a}")
    role = one(docs, "Role", f"{RELEASE}-finetune-operator-smoke-test")
    assert grants(role) == {("finetune.dev", "finetunejobs"): {"create", "get", "delete"}}
    # The release namespace is not served, so the test job goes where the operator looks.
    assert role["metadata"]["namespace"] == "team-a"
    pod = one(docs, "Pod")
    env = env_of(pod["spec"]["containers"][0])
    assert env["SMOKE_NAMESPACE"] == "team-a"
    assert pod["spec"]["serviceAccountName"] == role["metadata"]["name"]


# ---- the Deployment and the test pod -------------------------------------------------------------------------

RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What keeps a pod spec from PodSecurity `restricted` (the baseline checks included)."""
    problems: list[str] = []
    psc = pod.get("securityContext") or {}
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            problems.append(f"{host} is true")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']} uses {sorted(kinds - RESTRICTED_VOLUME_TYPES)}")
    if psc.get("runAsUser") == 0:
        problems.append("pod runAsUser is 0")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        problems.append(f"pod seccompProfile {pod_seccomp}")
    for c in [*(pod.get("initContainers") or []), *pod["containers"]]:
        sc, name = c.get("securityContext") or {}, c["name"]
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {caps['add']}")
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            problems.append(f"{name}: runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: no RuntimeDefault or Localhost seccomp profile")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{name}: procMount {sc['procMount']}")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            problems.append(f"{name}: hostPort")
    return problems


def test_restricted_checker_catches_violations() -> None:
    good = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {"name": "c", "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}
        ],
    }
    assert restricted_violations(good) == []
    bad = json.loads(json.dumps(good))
    bad["hostNetwork"] = True
    bad["volumes"] = [{"name": "h", "hostPath": {"path": "/"}}]
    bad["securityContext"] = {}
    bad["containers"][0]["securityContext"] = {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}}
    found = "\n".join(restricted_violations(bad))
    for expected in (
        "hostNetwork",
        "hostPath",
        "privileged",
        "allowPrivilegeEscalation",
        "drop ALL",
        "SYS_ADMIN",
        "runAsNonRoot",
        "seccomp",
    ):
        assert expected in found


def test_operator_test_and_cleanup_pods_pass_restricted(helm: str) -> None:
    docs = render(helm)
    operator_pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert restricted_violations(operator_pod) == []
    assert restricted_violations(one(docs, "Pod")["spec"]) == []
    assert restricted_violations(one(docs, "Job")["spec"]["template"]["spec"]) == []
    container = operator_pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    tmp = next(v for v in operator_pod["volumes"] if v["name"] == mounts["/tmp"])
    assert "emptyDir" in tmp


def test_deployment_runs_one_operator_with_liveness_and_its_config(helm: str) -> None:
    docs = render(helm)
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount", f"{RELEASE}-finetune-operator")["metadata"]["name"]
    container = pod["containers"][0]
    assert container["command"] == [
        "python", "-m", "finetune_operator", "--liveness", "http://0.0.0.0:8080/healthz",
    ]  # fmt: skip
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz" and ports[get["port"]] == 8080, probe
    # FINETUNE_OPERATOR_CONFIG names the file the policy ConfigMap is mounted as.
    env = env_of(container)
    config_path = Path(str(env["FINETUNE_OPERATOR_CONFIG"]))
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm = one(docs, "ConfigMap", volume["configMap"]["name"])
    assert config_path.name in cm["data"]
    assert env["WATCH_NAMESPACES"] == ""
    assert container["resources"]["limits"]["memory"] == "512Mi"


def test_policy_change_rolls_the_operator(helm: str) -> None:
    def checksum(*flags: str) -> str:
        deployment = one(render(helm, *flags), "Deployment")
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum() == checksum()
    assert checksum() != checksum("--set", "policy.defaults.gpus=0")


def test_smoke_test_pod_is_a_helm_test_hook_with_valid_python(helm: str) -> None:
    pod = one(render(helm), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    command = pod["spec"]["containers"][0]["command"]
    assert command[:2] == ["python", "-c"]
    compile(command[2], "smoke-finetunejob", "exec")  # a syntax error would only show up in a cluster
    assert "ftp://" in command[2] and '"InvalidURI"' in command[2]


def test_notes_tell_the_next_step(helm: str, tmp_path: Path) -> None:
    # helm template does not render NOTES.txt (and .Files cannot see templates/): render a copy through tpl.
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(CHART / "templates" / "NOTES.txt", chart / "notes-probe.txt")
    (chart / "templates" / "notes-probe.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data:\n  notes: {{ tpl (.Files.Get "notes-probe.txt") . | quote }}\n'
    )
    notes = one(render(helm, chart=chart), "ConfigMap", "notes")["data"]["notes"]
    for expected in ("kubectl apply", "kubectl get ftj", "finetune status", f"helm test {RELEASE}"):
        assert expected in notes
    # How to uninstall, and what stays.
    for expected in (f"helm uninstall {RELEASE}", "pre-delete hook", "kubectl delete crd finetunejobs.finetune.dev"):
        assert expected in notes


# ---- helm uninstall: the pre-delete cleanup hook ------------------------------------------------------------

CLEANUP = f"{RELEASE}-finetune-operator-cleanup"


def hook_weight(doc: dict[str, Any]) -> int:
    return int(doc["metadata"]["annotations"].get("helm.sh/hook-weight", "0"))


def test_cleanup_hook_runs_before_uninstall_and_removes_itself(helm: str) -> None:
    docs = hooks(render(helm), "pre-delete")
    job = one(docs, "Job")
    for doc in docs:
        policy = set(doc["metadata"]["annotations"]["helm.sh/hook-delete-policy"].split(","))
        assert policy == {"before-hook-creation", "hook-succeeded"}, doc["metadata"]
        if doc is not job:  # the account and its rights exist before the Job starts
            assert hook_weight(doc) < hook_weight(job), doc["metadata"]
    assert job["spec"]["activeDeadlineSeconds"] == 120 and job["spec"]["backoffLimit"] >= 1
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"] == CLEANUP
    command = pod["containers"][0]["command"]
    assert command[:2] == ["python", "-c"]
    compile(command[2], "cleanup-hook", "exec")  # a syntax error would only show up at uninstall
    assert '"finetune.dev/cleanup"' in command[2]


def test_cleanup_hook_stops_exactly_this_operator(helm: str) -> None:
    docs = render(helm)
    deployment = one(release_objects(docs), "Deployment")
    job = one(docs, "Job")
    env = env_of(job["spec"]["template"]["spec"]["containers"][0])
    assert env["OPERATOR_NAMESPACE"] == NAMESPACE and env["OPERATOR_DEPLOYMENT"] == deployment["metadata"]["name"]
    selector = dict(kv.split("=", 1) for kv in str(env["OPERATOR_SELECTOR"]).split(","))

    def selected(labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    assert selected(deployment["spec"]["template"]["metadata"]["labels"])
    assert not selected(job["spec"]["template"]["metadata"]["labels"])
    # The hook pod is no operator pod for the Deployment's ReplicaSet either.
    rs_selector = deployment["spec"]["selector"]["matchLabels"]
    hook_labels = job["spec"]["template"]["metadata"]["labels"]
    assert not all(hook_labels.get(k) == v for k, v in rs_selector.items())


def test_cleanup_hook_rbac_is_minimal_cluster_wide(helm: str) -> None:
    docs = hooks(render(helm), "pre-delete")
    role = one(docs, "ClusterRole")
    assert grants(role) == {("finetune.dev", "finetunejobs"): {"list", "patch"}}
    stop = one(docs, "Role")
    assert stop["metadata"]["namespace"] == NAMESPACE
    assert grants(stop, named=True) == {("apps", "deployments/scale"): {"get", "patch"}, ("", "pods"): {"list"}}
    (scale_rule,) = [r for r in stop["rules"] if "deployments/scale" in r["resources"]]
    assert scale_rule["resourceNames"] == [f"{RELEASE}-finetune-operator"]
    for binding in find(docs, "ClusterRoleBinding") + find(docs, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": CLEANUP, "namespace": NAMESPACE}]
    assert one(docs, "ClusterRoleBinding")["roleRef"]["name"] == role["metadata"]["name"]
    assert one(docs, "RoleBinding")["roleRef"]["name"] == stop["metadata"]["name"]


def test_cleanup_hook_rbac_follows_watch_namespaces(helm: str) -> None:
    docs = hooks(render(helm, "--set", "watchNamespaces={team-a,team-b}"), "pre-delete")
    assert not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding")
    per_ns = [r for r in find(docs, "Role") if r["metadata"]["name"] == CLEANUP]
    assert sorted(r["metadata"]["namespace"] for r in per_ns) == ["team-a", "team-b"]
    for role in per_ns:
        assert grants(role) == {("finetune.dev", "finetunejobs"): {"list", "patch"}}
    env = env_of(one(docs, "Job")["spec"]["template"]["spec"]["containers"][0])
    assert env["WATCH_NAMESPACES"] == "team-a,team-b"


@pytest.mark.parametrize(
    "flags", [["--set", "cleanupOnUninstall.enabled=false"], ["--set", "rbac.create=false"]], ids=["off", "no-rbac"]
)
def test_cleanup_hook_can_be_switched_off(helm: str, flags: list[str]) -> None:
    assert hooks(render(helm, *flags), "pre-delete") == []


# ---- manifests/operator.yaml and scripts/helm.sh ------------------------------------------------------------


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chart-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_rendered_manifests_are_up_to_date(helm: str, scratch: Path) -> None:
    fresh = scratch / "operator.yaml"
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "render-manifests.sh"), str(fresh)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    committed = REPO / "manifests" / "operator.yaml"
    stale = "manifests/operator.yaml is stale: run scripts/render-manifests.sh"
    assert committed.read_text() == fresh.read_text(), stale
    docs = [d for d in yaml.safe_load_all(fresh.read_text()) if d]
    assert docs[0] == {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": "finetune-system",
            "labels": {"app.kubernetes.io/part-of": "finetune", "pod-security.kubernetes.io/enforce": "restricted"},
        },
    }
    assert not find(docs, "Pod") and not find(docs, "CustomResourceDefinition")
    assert not find(docs, "Job") and not [d for d in docs if hook_of(d)], "a kubectl install must not run hooks"
    assert {d["metadata"].get("namespace", "finetune-system") for d in docs} == {"finetune-system"}
    assert operator_config(docs) == OperatorConfig()


def test_helm_sh_needs_no_npm_once_cached(helm: str) -> None:
    # Only the cached binary and coreutils are reachable: a second install attempt would fail for lack of npm.
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    bin_dir = Path(tempfile.mkdtemp(prefix="no-npm-"))
    try:
        for tool in ("bash", "env"):
            (bin_dir / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
        env["PATH"] = str(bin_dir)
        proc = subprocess.run(
            [str(bin_dir / "bash"), str(HELM_SH), "version", "--short"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
    finally:
        shutil.rmtree(bin_dir, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("v3."), proc.stdout


# ---- the admission webhook ---------------------------------------------------------------------------------------

WEBHOOK_FLAGS = ["--set", "webhook.enabled=false"]


def _pem_file(tmp_path: Path, name: str, b64: str) -> str:
    import base64

    path = tmp_path / name
    path.write_bytes(base64.b64decode(b64))
    return str(path)


def test_webhook_is_served_by_the_operator_with_a_certificate_the_api_server_trusts(helm: str, tmp_path: Path) -> None:
    from finetune_operator.admission import WEBHOOK_PATH

    docs = release_objects(render(helm))
    config = one(docs, "ValidatingWebhookConfiguration")
    (hook,) = config["webhooks"]
    assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None" and hook["timeoutSeconds"] == 10
    assert hook["rules"] == [
        {
            "apiGroups": ["finetune.dev"],
            "apiVersions": ["*"],
            "resources": ["finetunejobs"],
            "operations": ["CREATE", "UPDATE"],
            "scope": "Namespaced",
        }
    ]
    assert "namespaceSelector" not in hook  # every namespace by default
    # The API server calls the Service on the path the operator serves ...
    ref = hook["clientConfig"]["service"]
    assert ref["path"] == WEBHOOK_PATH and ref["namespace"] == NAMESPACE
    service = one(docs, "Service", ref["name"])
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]]
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = env_of(container)
    assert ports[port["targetPort"]] == int(str(env["FINETUNE_WEBHOOK_PORT"])) == 9443
    assert container["readinessProbe"]["tcpSocket"] == {"port": port["targetPort"]}  # ready = webhook listening
    # ... with the certificate from the Secret, mounted where the operator reads it ...
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env["FINETUNE_WEBHOOK_CERT_DIR"])
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    secret = one(docs, "Secret", volume["secret"]["secretName"])
    assert secret["type"] == "kubernetes.io/tls"
    assert {i["path"] for i in volume["secret"]["items"]} == {"tls.crt", "tls.key"}
    # ... which the caBundle verifies, for the Service's DNS name.
    assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    ca = _pem_file(tmp_path, "ca.crt", secret["data"]["ca.crt"])
    crt = _pem_file(tmp_path, "tls.crt", secret["data"]["tls.crt"])
    dns = f"{ref['name']}.{NAMESPACE}.svc"
    check = ["openssl", "verify", "-CAfile", ca, "-verify_hostname", dns, "-purpose", "sslserver", crt]
    proc = subprocess.run(check, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wrong = subprocess.run([*check[:4], "-verify_hostname", "evil.example.com", crt], capture_output=True, check=False)
    assert wrong.returncode != 0
    # The key matches the certificate.
    key = _pem_file(tmp_path, "tls.key", secret["data"]["tls.key"])
    commands = (["openssl", "x509", "-noout", "-pubkey", "-in", crt], ["openssl", "pkey", "-pubout", "-in", key])
    pub = [subprocess.run(c, capture_output=True, check=True).stdout for c in commands]
    assert pub[0] == pub[1]


def test_webhook_values(helm: str) -> None:
    values = ["failurePolicy=Ignore", "timeoutSeconds=5", "port=10443", "namespaceSelector.matchLabels.tenant=yes"]
    docs = render(helm, *[arg for v in values for arg in ("--set", f"webhook.{v}")])
    (hook,) = one(docs, "ValidatingWebhookConfiguration")["webhooks"]
    assert hook["failurePolicy"] == "Ignore" and hook["timeoutSeconds"] == 5
    assert hook["namespaceSelector"] == {"matchLabels": {"tenant": "yes"}}
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(container)["FINETUNE_WEBHOOK_PORT"] == "10443"
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["webhook"] == 10443


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "webhook.failurePolicy=Sometimes"], "webhook.failurePolicy"),
        (["--set", "webhook.timeoutSeconds=31"], "webhook.timeoutSeconds"),
        (["--set", "webhook.port=443"], "webhook.port"),
        (["--set", "webhook.enable=true"], "Additional property enable is not allowed"),
    ],
)
def test_webhook_schema_rejects_invalid_values(helm: str, flags: list[str], message: str) -> None:
    proc = run_helm(helm, "template", RELEASE, *flags)
    assert proc.returncode != 0, f"{flags} rendered:\n{proc.stdout[:500]}"
    assert message in proc.stderr, proc.stderr


def test_webhook_disabled_renders_nothing_of_it(helm: str) -> None:
    docs = render(helm, *WEBHOOK_FLAGS)
    assert not find(docs, "ValidatingWebhookConfiguration") and not find(docs, "Secret")
    assert [d["metadata"]["name"] for d in find(docs, "Service")] == [f"{RELEASE}-finetune-operator-metrics"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert not [k for k in env_of(container) if k.startswith("FINETUNE_WEBHOOK")]
    assert [p["name"] for p in container["ports"]] == ["health", "metrics"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert not [v for v in pod["volumes"] if "secret" in v]


@pytest.mark.parametrize("flags", [[], ["--set", "watchNamespaces={team-a,team-b}"]], ids=["cluster", "namespaced"])
def test_webhook_needs_no_operator_rbac(helm: str, flags: list[str]) -> None:
    # Helm writes the webhook configuration and the kubelet mounts the Secret: the operator may touch neither.
    docs = render(helm, *flags)
    for role in find(docs, "ClusterRole") + find(docs, "Role"):
        for (group, resource), _verbs in grants(role, named=True).items():
            assert group != "admissionregistration.k8s.io", role["metadata"]["name"]
            assert resource not in ("secrets", "certificatesigningrequests"), role["metadata"]["name"]


def test_kubectl_manifests_carry_no_private_key() -> None:
    text = (REPO / "manifests" / "operator.yaml").read_text()
    assert "PRIVATE KEY" not in text and "ValidatingWebhookConfiguration" not in text


# ---- metrics ---------------------------------------------------------------------------------------------------


def test_metrics_service_and_optional_service_monitor(helm: str) -> None:
    docs = render(helm)
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(container)["FINETUNE_METRICS_PORT"] == "8081"
    assert {"name": "metrics", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    (service,) = [d for d in find(docs, "Service") if d["metadata"]["name"].endswith("-metrics")]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert not find(docs, "ServiceMonitor")
    docs = render(
        helm, "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.serviceMonitor.labels.release=kps"
    )
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "metrics"
    off = render(helm, "--set", "metrics.enabled=false")
    assert "FINETUNE_METRICS_PORT" not in env_of(one(off, "Deployment")["spec"]["template"]["spec"]["containers"][0])
