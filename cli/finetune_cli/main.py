"""`finetune`: follow, inspect and fetch FineTuneJobs, or validate and run one without Kubernetes.

Installed as `finetune` and as `kubectl-finetune`, so `kubectl finetune ...` works too.
Exit codes: 0 success; 1 an error (printed), or a watched job that Failed; 2 a job file with problems.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from finetune_api.status import Phase
from finetune_cli import artifacts, local, plan
from finetune_cli.kube import CliError, Kube, follow
from finetune_cli.render import jobs_table, progress_line, render_log_line, status_text

EXIT_OK, EXIT_ERROR, EXIT_INVALID = 0, 1, 2


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---- cluster commands --------------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace, kube: Kube, out: TextIO) -> int:
    jobs = kube.list_jobs(all_namespaces=args.all_namespaces)
    if not jobs:
        where = "any namespace" if args.all_namespaces else f"namespace {kube.namespace}"
        print(f"No FineTuneJobs in {where}.", file=out)
        return EXIT_OK
    print(jobs_table(jobs, _now(), with_namespace=args.all_namespaces), file=out)
    return EXIT_OK


def cmd_status(args: argparse.Namespace, kube: Kube, out: TextIO) -> int:
    if not args.watch:
        print(status_text(kube.get_job(args.name), _now()), file=out)
        return EXIT_OK
    job = follow(kube, args.name, out, progress_line, args.interval)
    return EXIT_OK if (job.get("status") or {}).get("phase") == Phase.SUCCEEDED else EXIT_ERROR


def cmd_logs(args: argparse.Namespace, kube: Kube, out: TextIO) -> int:
    job = kube.get_job(args.name)
    pods = kube.trainer_pods(job)
    if not pods:
        status = job.get("status") or {}
        detail = status.get("message") or "no trainer pod was created yet"
        raise CliError(f"{args.name} has no trainer pod (phase {status.get('phase') or 'Pending'}: {detail})")
    pod = pods[-1]["metadata"]["name"]
    if len(pods) > 1:
        earlier = ", ".join(p["metadata"]["name"] for p in pods[:-1])
        print(f"# attempt {len(pods)}: pod {pod} (earlier attempts: {earlier})", file=sys.stderr)
    if args.follow and kube.pod_phase(pod) == "Pending":  # a log exists only once the container started
        print(f"# waiting for pod {pod} to start", file=sys.stderr)
        while kube.pod_phase(pod) == "Pending":
            time.sleep(1)
    for line in kube.log_lines(pod, follow=args.follow):
        print(line if args.raw else render_log_line(line), file=out, flush=args.follow)
    return EXIT_OK


def cmd_report(args: argparse.Namespace, kube: Kube, out: TextIO) -> int:
    job = kube.get_job(args.name)
    print(artifacts.report_text(job), file=out)
    if args.files:
        print("\nFiles:", file=out)
        for uri in artifacts.report_files(job):
            print(f"  {uri}", file=out)
    return EXIT_OK


def cmd_download(args: argparse.Namespace, kube: Kube, out: TextIO) -> int:
    files = artifacts.download_model(kube.get_job(args.name), Path(args.dest))
    print(f"downloaded {len(files)} files of {args.name}'s model to {args.dest}", file=out)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace, kube: Kube, out: TextIO) -> int:
    where = f"{kube.namespace}/{args.name}"
    if args.keep:
        kube.suspend_job(args.name)
        patch = '{"spec":{"runPolicy":{"suspend":false}}}'
        print(f"finetunejob {where} suspended: its trainer stops, its checkpoints stay.", file=out)
        print(f"resume with: kubectl patch ftj {args.name} -n {kube.namespace} --type merge -p '{patch}'", file=out)
    elif args.delete:
        kube.delete_job(args.name)
        print(f"finetunejob {where} deleted (its trainer Job and pods go with it; uploaded outputs stay).", file=out)
    else:
        kube.cancel_job(args.name)
        print(
            f"finetunejob {where} cancelled: its trainer stops after a last checkpoint; the job stays, as Cancelled,"
            " with its status and outputs.",
            file=out,
        )
    return EXIT_OK


# ---- local commands ----------------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace, out: TextIO) -> int:
    _, result = local.validate_file(args.file, local.local_policy(args.policy))
    if not result.ok:
        print(local.problems_text(args.file, result), file=out)
        return EXIT_INVALID
    print(f"{args.file}: valid", file=out)
    return EXIT_OK


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    job, result = local.validate_file(args.file, local.local_policy(args.policy))
    if not result.ok or result.spec is None:
        print(local.problems_text(args.file, result), file=out)
        print("Not run: fix the problems above first.", file=out)
        return EXIT_INVALID
    code = local.run_trainer(job, result.spec, args.workdir, out)
    if code == 0:
        print(f"done: model, report and manifest are under {result.spec.output.uri}", file=out)
    else:
        print(f"the trainer failed (exit code {code}; 2 means the job or its data must be fixed)", file=out)
    return code


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from finetune_cli import demo

    return demo.run_demo(out)


# ---- wiring -------------------------------------------------------------------------------------------------


def _parser(prog: str) -> argparse.ArgumentParser:
    # Cluster options are accepted before or after the subcommand (`finetune -n ns list`, `finetune list -n ns`);
    # SUPPRESS keeps the subcommand's unset copy from overwriting a value given before it.
    cluster = argparse.ArgumentParser(add_help=False)
    cluster.add_argument("-n", "--namespace", default=argparse.SUPPRESS, help="Namespace. Default: the context's.")
    cluster.add_argument("--kubeconfig", default=argparse.SUPPRESS, help="Kubeconfig file. Default: $KUBECONFIG.")
    policy = argparse.ArgumentParser(add_help=False)
    policy.add_argument("file", help="FineTuneJob YAML file")
    policy.add_argument(
        "--policy", help="The platform's policy (operator config file). Default: built-in, with gpus 0 by default."
    )

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], parents=[cluster])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, parents: Sequence[argparse.ArgumentParser] = (cluster,)) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=list(parents))

    p = add("list", "List FineTuneJobs: name, phase, progress, loss, age.")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="List jobs in every namespace.")
    p = add("status", "Show a job's phase, reason, conditions, progress, metrics, checkpoints and output.")
    p.add_argument("name")
    p.add_argument("-w", "--watch", action="store_true", help="Show a live progress bar until the job finishes.")
    p.add_argument("--interval", type=float, default=2.0, help="Seconds between polls with --watch. Default: 2.")
    p = add("logs", "Show the trainer's log, its progress reports rendered readable.")
    p.add_argument("name")
    p.add_argument("-f", "--follow", action="store_true", help="Keep streaming until the trainer exits.")
    p.add_argument("--raw", action="store_true", help="Print report lines as the trainer wrote them.")
    p = add("report", "Show a job's metrics and where its report, plots and model are stored.")
    p.add_argument("name")
    p.add_argument("--files", action="store_true", help="Also list the report's files (needs bucket access).")
    p = add("download", "Download a succeeded job's model from object storage.")
    p.add_argument("name")
    p.add_argument("dest", help="Local directory")
    p = add("cancel", "Cancel a job for good (runPolicy.cancel: it ends as Cancelled, outputs stay).")
    p.add_argument("name")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--keep", action="store_true", help="Only suspend it (runPolicy.suspend); resume later.")
    mode.add_argument("--delete", action="store_true", help="Delete the FineTuneJob (its status goes with it).")
    add("validate", "Check a FineTuneJob file as the operator would; prints every problem, or 'valid'.", [policy])
    p = add("run", "Validate a FineTuneJob file, then train it here, without Kubernetes.", [policy])
    p.add_argument("--workdir", help="Scratch directory. Default: the trainer's (~/finetune-run).")
    p = add("plan", "Check a FineTuneJob's data and size it (memory per GPU, fixes, tokens, time) on this machine.", [])
    plan.add_arguments(p)
    add("demo", "Run the main example end to end on a local cluster.", [])
    return parser


CLUSTER_COMMANDS: dict[str, Callable[[argparse.Namespace, Kube, TextIO], int]] = {
    "list": cmd_list,
    "status": cmd_status,
    "logs": cmd_logs,
    "report": cmd_report,
    "download": cmd_download,
    "cancel": cmd_cancel,
}
LOCAL_COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO], int]] = {
    "validate": cmd_validate,
    "run": cmd_run,
    "plan": plan.cmd_plan,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    prog = "kubectl finetune" if Path(sys.argv[0]).name == "kubectl-finetune" else "finetune"
    args = _parser(prog).parse_args(argv)
    out = out or sys.stdout
    try:
        if args.command in LOCAL_COMMANDS:
            return LOCAL_COMMANDS[args.command](args, out)
        kube = Kube(getattr(args, "kubeconfig", None), getattr(args, "namespace", None))
        try:
            return CLUSTER_COMMANDS[args.command](args, kube, out)
        finally:
            kube.close()
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `finetune logs NAME | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
