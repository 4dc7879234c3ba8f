"""A 2-pod gang against the same job in 1 pod, on the local cluster: time from apply to the first training step,
and training throughput (tokens/s) at the same global batch.

    python bench/gang_bench.py [--steps 40] [--no-build] [--docs docs/benchmarks.md]

Both jobs train the tiny Llama of the demo bucket as causal-lm with packing (every token real) for `--steps`
optimizer steps: 1 pod with batchSize 8, or 2 pods (resources.workers: 2, gloo between the pods) with batchSize 4
each, so every step sees 8 blocks either way. Throughput is measured from worker 0's own progress reports
(steps between the first and the last report over the time between them, x tokens per step), so start-up and
the final upload are excluded. Each pod gets 0.9 CPU on a 2-core node: the ratio shows what a second pod buys
here once its communication is paid, and is reported, not targeted (on GPUs the same code runs NCCL).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from kubernetes import client, config

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from benchkit import Row, machine, markdown_table, text_table, write_section  # noqa: E402
from submit_bench import demo_platform  # noqa: E402

from finetune_api.reports import ReportKind, parse_reports  # noqa: E402
from finetune_cli import demo  # noqa: E402

NAMESPACE = "bench-gang"
BLOCK = 128
TIMEOUT_S = 900


def job(name: str, workers: int, steps: int) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "model": {"uri": f"s3://{demo.BUCKET}/models/tiny-llama/"},
            "task": "causal-lm",
            "dataset": {"train": f"s3://{demo.BUCKET}/data/lines.txt", "split": {"validationRatio": 0.05}},
            "method": {"type": "full"},
            "hyperparameters": {
                "maxSteps": steps,
                "batchSize": 8 // workers,
                "blockSize": BLOCK,
                "packing": True,
                "loggingSteps": 2,
                "learningRate": 0.001,
            },
            "evaluation": {"maxSamples": 2, "maxNewTokens": 4},
            "checkpoints": {"everySteps": steps},
            "resources": {"gpus": 0, "workers": workers, "cpu": "900m", "memory": "2Gi"},
            "output": {"uri": f"s3://{demo.BUCKET}/bench-gang/{name}/"},
            "storage": {"secretRef": {"name": demo.SECRET}},
        },
    }


def _ts(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def run(target: demo.Target, core: Any, custom: Any, workers: int, steps: int) -> dict[str, float]:
    name = f"gang{workers}-{uuid.uuid4().hex[:5]}"
    start = time.time()
    demo.kubectl(target, "apply", "-f", "-", input=json.dumps(job(name, workers, steps)))
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        status = custom.get_namespaced_custom_object("finetune.dev", "v1alpha1", NAMESPACE, "finetunejobs", name)
        phase = (status.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: not finished within {TIMEOUT_S}s")
        time.sleep(1)
    if phase != "Succeeded":
        raise RuntimeError(f"{name}: {phase}: {(status.get('status') or {}).get('message')}")
    selector = f"finetune.dev/job-name={name},app.kubernetes.io/component=trainer"
    pods = core.list_namespaced_pod(NAMESPACE, label_selector=selector).items
    leader = next(p for p in pods if (p.metadata.labels or {}).get("finetune.dev/worker-rank", "0") == "0")
    reports = list(parse_reports(core.read_namespaced_pod_log(leader.metadata.name, NAMESPACE).splitlines()))
    progress = [r for r in reports if r.kind == ReportKind.PROGRESS and r.step]
    first, last = progress[0], progress[-1]
    assert first.step is not None and last.step is not None
    tokens = (last.step - first.step) * 8 * BLOCK
    return {
        "first_step_s": _ts(first.time) - start,
        "tokens_per_s": tokens / max(1e-9, _ts(last.time) - _ts(first.time)),
        "attempts": float((status.get("status") or {}).get("attempts") or 0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="12 steps; does not write --docs")
    parser.add_argument("--no-build", action="store_true", help="Do not (re)build the images.")
    parser.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"), help="'' = do not write")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.docs = 12, ""
    with demo_platform(not args.no_build, ("tiny-llama",), NAMESPACE) as target:
        api = config.new_client_from_config(target.kubeconfig)
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        one = run(target, core, custom, 1, args.steps)
        two = run(target, core, custom, 2, args.steps)
    rows = [
        Row("gang, 2 pods vs 1", "apply -> first training step", "1 pod: " + f"{one['first_step_s']:.1f} s",
            f"{two['first_step_s']:.1f} s (+{two['first_step_s'] - one['first_step_s']:.1f} s)", None),
        Row("gang, 2 pods vs 1", "training tokens/s at the same global batch (8 x 128 tokens)",
            f"1 pod: {one['tokens_per_s']:,.0f}",
            f"{two['tokens_per_s']:,.0f} = {two['tokens_per_s'] / one['tokens_per_s']:.2f}x", None),
    ]  # fmt: skip
    print(text_table(rows))
    if args.docs:
        date = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        body = (
            "The tiny Llama as causal-lm, packed, on the local single-node cluster (2 cores; 0.9 CPU per pod), "
            f"{args.steps} steps; one run each, in the same session. Definitions: bench/gang_bench.py.\n\n"
            + markdown_table(rows, date, machine(), f"python bench/gang_bench.py --steps {args.steps}")
        )
        write_section(Path(args.docs), "bench-gang", body, "Gang of 2 pods vs 1 pod (`make bench-gang`)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
