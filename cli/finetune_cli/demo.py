"""`finetune demo`: the main example end to end on a real cluster, in six timed stages.

1. cluster   $KUBECONFIG if it reaches a cluster with a Ready node, else the local one
             (`scripts/cluster.sh up` + `scripts/images/build.sh`, see docs/local-cluster.md)
2. operator  the CRD, then `helm upgrade --install finetune charts/finetune-operator ... --wait`
3. data      the tiny GPT-NeoX model and the sample data, uploaded to s3://finetune-demo/ (skipped when there)
4. job       namespace finetune-demo, Secret s3-credentials, examples/03-pythia-instruction-medical.yaml
5. progress  a live progress bar until the job is Succeeded or Failed
6. result    phase, metrics, the output URI and a sample generation, base vs tuned

The e2e tests (tests/e2e/test_finetunejobs.py) install the operator and seed S3 with these same functions.
Exit code 0 when the job succeeds; otherwise 1 with the operator's reason and the trainer's last log lines.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from finetune_api.status import Phase
from finetune_cli.kube import CliError, Kube, follow
from finetune_cli.render import bar, duration, number, table

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = REPO_ROOT / "scripts"
CHART = REPO_ROOT / "charts" / "finetune-operator"
LOCAL_VALUES = CHART / "ci" / "local-values.yaml"
EXAMPLES = REPO_ROOT / "examples"
DEMO_EXAMPLE = EXAMPLES / "03-pythia-instruction-medical.yaml"

RELEASE, OPERATOR_NAMESPACE = "finetune", "finetune-system"
DEMO_NAMESPACE = "finetune-demo"
BUCKET = "finetune-demo"
SECRET = "s3-credentials"
# moto accepts any credentials; a real cluster's Secret would hold real ones.
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
REGION = "us-east-1"

# The tiny models the examples name (s3://finetune-demo/models/<name>/) and their architectures.
MODELS = {
    "tiny-bloom": "bloom",
    "tiny-gpt2": "gpt2",
    "tiny-gpt-neox": "gpt-neox",
    "tiny-bert": "bert",
    "tiny-t5": "t5",
    "tiny-llama": "llama",
}
JOB_TIMEOUT_S = 600
# Models the GPU example names, stored as config.json and a tokenizer only (never weights): enough for the
# preflight to check the data and size the job on CPU (finetune_api.plan), which is all a GPU-less cluster can do.
# Llama-2-7B's published config.json (6,738,415,616 parameters). Tests that size a real 7B shape use it too.
LLAMA_2_7B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}
# The shape is Llama-2-7B's published config; the tokenizer is tiny-llama's.
CONFIG_ONLY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {"llama-2-7b": ("tiny-llama", LLAMA_2_7B_CONFIG)}


class DemoError(Exception):
    """A stage failed; the message says why (and what to look at)."""


@dataclass(frozen=True)
class Target:
    """The cluster the demo runs on."""

    kubeconfig: str
    s3_endpoint: str  # S3 as pods see it (this machine reaches the same URL locally)
    local: bool


# ---- small helpers -----------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune") / "demo"


def sh(
    args: Sequence[str],
    *,
    timeout: float = 600,
    input: str | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command from the repository root; a failure raises DemoError with its output's tail."""
    proc = subprocess.run(
        list(args),
        cwd=REPO_ROOT,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise DemoError(f"`{' '.join(args)}` failed (rc={proc.returncode}):\n{tail}")
    return proc


def kubectl(target: Target, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return sh(["kubectl", "--kubeconfig", target.kubeconfig, *args], **kwargs)


def helm(target: Target, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return sh([str(SCRIPTS / "helm.sh"), "--kubeconfig", target.kubeconfig, *args], **kwargs)


def _exports(text: str) -> dict[str, str]:
    return dict(re.findall(r"^export ([A-Z_][A-Z0-9_]*)=(\S*)$", text, re.MULTILINE))


# ---- stage 1: cluster --------------------------------------------------------------------------------------


def has_ready_node(kubeconfig: str) -> bool:
    """True when kubeconfig reaches an API server that has a Ready node."""
    if not kubeconfig or not Path(kubeconfig).is_file():
        return False
    try:
        proc = subprocess.run(
            ["kubectl", "--kubeconfig", kubeconfig, "--request-timeout=5s", "get", "nodes", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    if proc.returncode != 0:
        return False
    for node in json.loads(proc.stdout).get("items", []):
        conditions = node.get("status", {}).get("conditions", [])
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            return True
    return False


def ensure_cluster(build_images: bool = True) -> Target:
    """$KUBECONFIG's cluster when it is usable, else the local cluster with the project's image imported."""
    kubeconfig = os.environ.get("KUBECONFIG", "")
    local_kubeconfig = Path(os.environ.get("FINETUNE_CLUSTER_STATE", "/tmp/finetune-cluster")) / "kubeconfig"
    if kubeconfig and Path(kubeconfig) != local_kubeconfig and has_ready_node(kubeconfig):
        endpoint = os.environ.get("FINETUNE_S3_ENDPOINT")
        if not endpoint:
            raise DemoError(
                f"using the cluster of KUBECONFIG={kubeconfig}: set FINETUNE_S3_ENDPOINT (S3 as pods see it)"
            )
        return Target(kubeconfig, endpoint, local=False)
    up = sh(["bash", str(SCRIPTS / "cluster.sh"), "up"], timeout=3600, env={"KUBECONFIG": ""})
    env = _exports(up.stdout)
    if "KUBECONFIG" not in env or "FINETUNE_S3_ENDPOINT" not in env:
        raise DemoError(f"scripts/cluster.sh up printed no KUBECONFIG/FINETUNE_S3_ENDPOINT:\n{up.stdout[-2000:]}")
    if build_images:
        sh(["bash", str(SCRIPTS / "images" / "build.sh")], timeout=2400)
    return Target(env["KUBECONFIG"], env["FINETUNE_S3_ENDPOINT"], local=True)


# ---- stage 2: operator -------------------------------------------------------------------------------------


def install_operator(target: Target, extra_values: Sequence[str] = (), timeout_s: int = 180) -> None:
    """The CRD (Helm installs crds/ only on the first install, never on upgrades), then the chart.

    extra_values are more `--set key=value` settings (the e2e tests widen the policy limits with them).
    """
    kubectl(target, "apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    kubectl(target, "wait", "--for", "condition=Established", "--timeout=60s", "crd/finetunejobs.finetune.dev")
    args = ["upgrade", "--install", RELEASE, str(CHART), "-n", OPERATOR_NAMESPACE, "--create-namespace"]
    if target.local:
        args += ["-f", str(LOCAL_VALUES)]
    args += ["--set", f"policy.defaults.storageEndpoint={target.s3_endpoint}", "--wait", "--timeout", f"{timeout_s}s"]
    for value in extra_values:
        args += ["--set", value]
    helm(target, *args, timeout=timeout_s + 60)


# ---- stage 3: data -----------------------------------------------------------------------------------------


def storage_env(target: Target) -> None:
    """This process talks to the demo's S3 with the demo's credentials (unless the caller set its own)."""
    for key, value in DUMMY_CREDENTIALS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)


def build_inputs(root: Path, models: Sequence[str]) -> tuple[Path, dict[str, Path]]:
    """The sample data under root/data/ and the tiny models under root/models/<name>/ (built once, cached)."""
    from finetune_cli import sample_data

    data_files = sample_data.write_all(root)  # deterministic and fast: always rewritten
    corpus = [line for path in data_files.values() for line in path.read_text().splitlines() if line.strip()]
    built = {}
    for name in models:
        out = root / "models" / name
        if not (out / "config.json").is_file():
            from finetune_trainer.tiny_models import build_model

            tmp = out.with_name(out.name + ".tmp")
            build_model(MODELS[name], tmp, corpus)
            tmp.rename(out)
        built[name] = out
    return root / "data", built


def seed_storage(target: Target, models: Sequence[str] = ("tiny-gpt-neox",)) -> dict[str, int]:
    """Create the bucket and upload the models and data the examples name; what is already there is kept.

    Returns how many files were uploaded per kind (0 and 0 on a second run)."""
    from finetune_trainer.storage import Storage, join_uri

    storage_env(target)
    store = Storage(endpoint=target.s3_endpoint, region=REGION)
    existing = {b["Name"] for b in store.client.list_buckets().get("Buckets", [])}
    if BUCKET not in existing:
        store.client.create_bucket(Bucket=BUCKET)
    data_dir, built = build_inputs(cache_dir(), models)
    uploaded = {"models": 0, "data": 0}
    for name, local in built.items():
        uri = f"s3://{BUCKET}/models/{name}/"
        if not store.exists(join_uri(uri, "config.json")):
            uploaded["models"] += len(store.upload_dir(local, uri))
    for name, (tokenizer_of, config) in CONFIG_ONLY_MODELS.items():
        uri = f"s3://{BUCKET}/models/{name}/"
        if tokenizer_of in built and not store.exists(join_uri(uri, "config.json")):
            for path in sorted(built[tokenizer_of].iterdir()):
                if path.name.startswith("tokenizer") or path.name.endswith(".jinja"):
                    store.upload_file(path, join_uri(uri, path.name))
            store.write_text(join_uri(uri, "config.json"), json.dumps(config, indent=2))
            uploaded["models"] += 1
    for path in sorted(data_dir.iterdir()):
        uri = f"s3://{BUCKET}/data/{path.name}"
        if not store.exists(uri):
            store.upload_file(path, uri)
            uploaded["data"] += 1
    return uploaded


# ---- stage 4: job ------------------------------------------------------------------------------------------


def prepare_namespace(target: Target, namespace: str) -> None:
    """The namespace and the s3-credentials Secret the examples reference (idempotent)."""
    if kubectl(target, "get", "namespace", namespace, check=False).returncode != 0:
        kubectl(target, "create", "namespace", namespace)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET, "namespace": namespace},
        "type": "Opaque",
        "stringData": DUMMY_CREDENTIALS,
    }
    kubectl(target, "apply", "-f", "-", input=json.dumps(secret))
    # Kubernetes 1.20's ServiceAccount admission rejects pods until `default` has its token.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        sa = kubectl(target, "-n", namespace, "get", "serviceaccount", "default", "-o", "json", check=False)
        if sa.returncode == 0 and json.loads(sa.stdout).get("secrets"):
            return
        time.sleep(0.5)
    raise DemoError(f"namespace {namespace}: the default ServiceAccount got no token within 60s")


def job_name(example: Path) -> str:
    return str(yaml.safe_load(example.read_text())["metadata"]["name"])


def clear_output(target: Target, output_uri: str) -> int:
    """Delete a previous run's outputs: the trainer resumes from any complete checkpoint under output.uri,
    whichever job wrote it, so a re-run would otherwise start at the old run's last step."""
    from finetune_trainer.storage import Storage

    storage_env(target)
    return Storage(endpoint=target.s3_endpoint, region=REGION).delete_prefix(output_uri)


def submit(target: Target, namespace: str, example: Path) -> str:
    """Delete a previous run of the example (job and outputs), then apply it; returns its name."""
    name = job_name(example)
    kubectl(
        target, "-n", namespace, "delete", "finetunejob", name, "--ignore-not-found", "--wait=true", "--timeout=120s"
    )
    clear_output(target, yaml.safe_load(example.read_text())["spec"]["output"]["uri"])
    kubectl(target, "-n", namespace, "apply", "-f", str(example))
    return name


# ---- stage 5: progress -------------------------------------------------------------------------------------


def progress_text(job: dict[str, Any]) -> str:
    """One line: phase, bar, step/total, loss, tokens/s, ETA (or the reason while not running)."""
    status = job.get("status") or {}
    progress = status.get("progress") or {}
    phase = status.get("phase") or "Pending"
    parts = [f"{phase:<9}", bar(progress.get("percent"), width=24)]
    if progress.get("totalSteps"):
        parts.append(f"step {progress.get('step', 0)}/{progress['totalSteps']}")
    if status.get("loss") is not None:
        parts.append(f"loss {number(status['loss'])}")
    if progress.get("tokensPerSecond") is not None:
        parts.append(f"{number(progress['tokensPerSecond'])} tok/s")
    if phase == "Running":
        if progress.get("etaSeconds") is not None:
            parts.append(f"ETA {duration(progress['etaSeconds'])}")
        if progress.get("stage"):
            parts.append(f"({progress['stage']})")
    elif status.get("reason"):
        parts.append(str(status["reason"]))
    return "  ".join(parts)


# ---- stage 6: result ---------------------------------------------------------------------------------------


def read_samples(target: Target, job: dict[str, Any]) -> dict[str, Any]:
    from finetune_trainer.storage import Storage, join_uri

    uri = join_uri(job["status"]["output"]["uri"], "report", "samples.json")
    return dict(json.loads(Storage(endpoint=target.s3_endpoint, region=REGION).read_text(uri)))


def _short(text: object, limit: int = 100) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def result_text(job: dict[str, Any], samples: dict[str, Any] | None) -> str:
    status = job.get("status") or {}
    lines = [f"phase:    {status.get('phase')}  ({status.get('reason') or '-'})"]
    if status.get("message"):
        lines.append(f"message:  {status['message']}")
    metrics = status.get("metrics") or {}
    if metrics:
        lines.append("metrics:  " + "  ".join(f"{k} {number(v)}" for k, v in sorted(metrics.items())))
    output = status.get("output") or {}
    if output:
        lines += [f"output:   {output.get('uri')}", f"manifest: {output.get('manifest')}"]
    if samples:
        sample = (samples.get("prompts") or samples.get("validation") or [None])[0]
        if sample:
            prompt = sample.get("prompt") or sample.get("text") or ""
            lines += [
                "",
                "sample generation:",
                f"  prompt: {_short(prompt)}",
                f"  base:   {_short(sample.get('base'))}",
                f"  tuned:  {_short(sample.get('tuned'))}",
            ]
            if sample.get("reference"):
                lines.append(f"  reference: {_short(sample['reference'])}")
    return "\n".join(lines)


def failure_text(kube: Kube, job: dict[str, Any], log_lines: int = 30) -> str:
    """The operator's verdict and the last lines of the newest trainer pod's log."""
    status = job.get("status") or {}
    lines = [
        f"the job did not succeed: phase {status.get('phase') or 'Pending'}, "
        f"reason {status.get('reason') or '-'}: {status.get('message') or '-'}"
    ]
    try:
        pods = kube.trainer_pods(job)
        if not pods:
            lines.append("(no trainer pod was created)")
        else:
            pod = pods[-1]["metadata"]["name"]
            tail = list(kube.log_lines(pod))[-log_lines:]
            lines += [f"---- last {len(tail)} log lines of pod {pod} ----", *tail]
    except CliError as exc:
        lines.append(f"(no trainer log: {exc})")
    return "\n".join(lines)


# ---- the stages, timed -------------------------------------------------------------------------------------


@dataclass
class Timings:
    rows: list[tuple[str, float, str]] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str, out: TextIO) -> Iterator[list[str]]:
        """Times a stage; the body may append a short note to the yielded list."""
        print(f"==> {name}", file=out, flush=True)
        note: list[str] = []
        start = time.monotonic()
        outcome = "FAILED"
        try:
            yield note
            outcome = "ok"
        finally:
            took = time.monotonic() - start
            self.rows.append((name, took, " ".join(note) if outcome == "ok" else outcome))
            print(f"    {name}: {took:.1f}s {' '.join(note)}", file=out, flush=True)

    def table(self) -> str:
        rows = [[n, f"{s:.1f}s", note] for n, s, note in self.rows]
        rows.append(["total", f"{sum(s for _, s, _ in self.rows):.1f}s", ""])
        return table(["stage", "time", "note"], rows)


def run_demo(out: TextIO) -> int:
    timings = Timings()
    try:
        return _stages(timings, out)
    except (DemoError, CliError) as exc:
        print(f"error: {exc}", file=out)
        return 1
    finally:
        print("\n" + timings.table(), file=out, flush=True)


def _stages(timings: Timings, out: TextIO) -> int:
    with timings.stage("cluster", out) as note:
        target = ensure_cluster()
        note.append(f"{'local' if target.local else 'KUBECONFIG'} {target.kubeconfig}")
    with timings.stage("operator", out) as note:
        install_operator(target)
        note.append(f"helm release {RELEASE} in {OPERATOR_NAMESPACE}")
    with timings.stage("data", out) as note:
        uploaded = seed_storage(target)
        note.append(f"uploaded {uploaded['models']} model files, {uploaded['data']} data files")
    kube = Kube(target.kubeconfig, DEMO_NAMESPACE)
    try:
        with timings.stage("job", out) as note:
            prepare_namespace(target, DEMO_NAMESPACE)
            name = submit(target, DEMO_NAMESPACE, DEMO_EXAMPLE)
            note.append(f"{DEMO_NAMESPACE}/{name}")
        with timings.stage("progress", out) as note:
            job = follow(kube, name, out, progress_text, interval=1.0, timeout_s=JOB_TIMEOUT_S)
            note.append(str((job.get("status") or {}).get("phase")))
        with timings.stage("result", out):
            if (job.get("status") or {}).get("phase") != Phase.SUCCEEDED:
                print(failure_text(kube, job), file=out)
                return 1
            print(result_text(job, read_samples(target, job)), file=out)
    finally:
        kube.close()
    return 0


def main() -> int:
    return run_demo(sys.stdout)


if __name__ == "__main__":
    raise SystemExit(main())
