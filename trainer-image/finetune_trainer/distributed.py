"""Process topology, precision and DeepSpeed: how the training processes are laid out.

* More than one visible GPU, or a gang of several pods, and not yet under a launcher: run
  ``torch.distributed.run`` (torchrun) with one process per GPU (one on a CPU pod) and wait for it
  (``launch_per_gpu``). Only global rank 0 reports and uploads the final outputs.
* DeepSpeed always initialises ``torch.distributed``; a single process (CPU or one GPU) needs the rendezvous
  variables a launcher would have set (``ensure_single_process_env``).
* The DeepSpeed JSON is generated from ``spec.deepspeed``; batch sizes, clipping and precision are "auto"
  so the HF Trainer fills them from the TrainingArguments and the two can never disagree.

Gangs: the contract with the operator (docs/progress-protocol.md, "Gangs")
-------------------------------------------------------------------------
A job of N pods ("workers") trains one model together. Each worker pod gets

    FINETUNE_WORKERS=N          number of pods in the gang (unset or 1: a single-pod job, exactly as before)
    FINETUNE_WORKER_RANK=r      0..N-1, stable for the pod's role (the node rank)
    FINETUNE_RDZV_HOST=HOST     rank 0's address as the OTHER pods reach it (a Service ClusterIP or DNS name);
                                worker 0 itself always uses 127.0.0.1 (no hairpin through its own Service)
    FINETUNE_RDZV_PORT=PORT     default 29500: the TCP port of worker 0's rendezvous store
    FINETUNE_GPUS               GPUs per pod, as for single-pod jobs
    FINETUNE_RDZV_TIMEOUT_SECONDS  optional, default 1800: how long the workers wait for each other at the start
                                (keep it above the operator's deadline for starting the whole gang)

and runs ``python -m torch.distributed.run --nnodes N --node-rank r --master-addr HOST --master-port PORT
--max-restarts 0 --rdzv-conf timeout=T --nproc-per-node max(1, visible GPUs) -m finetune_trainer ...``
(torchrun's static rendezvous: no elastic membership, no restarts inside the pod; a failed gang is restarted
as a whole by the operator).
Global ranks are ``r * procs + local rank``. Workers talk to each other directly (pod IP to pod IP, gloo on
CPU, NCCL on GPU) on ports they pick; only the rendezvous port goes through the Service.

* Every worker downloads the model and data into its own node-local cache and prepares the same dataset
  (deterministic); only global rank 0 reports, checks the output and uploads the final model, report and
  manifest. A checkpoint is uploaded by every worker (its own ranks' files: ZeRO optimizer shards, RNG
  states); worker 0 writes ``_COMPLETE`` only after every other worker's ``_NODE-k`` marker of this run.
* Resume: global rank 0 picks the newest complete checkpoint and broadcasts its step; every worker
  downloads that same checkpoint (all ranks' files) into its own scratch dir.
* Exit code of a pod: its ranks each record an exit code (and error report); the pod exits with the most
  telling one: 2 (user error, the rank named in the termination message) over 1 (retryable) over 75
  (interrupted). A rank that dies makes the collectives of the others fail (peer closed the connection, or
  the collective timeout ``FINETUNE_COLLECTIVE_TIMEOUT_SECONDS``, default 1800 s): they exit 1 (retryable).
* SIGTERM on any worker: every rank learns it at the next step boundary (an all-reduce of the flag), the gang
  saves and uploads a checkpoint of that step and every worker exits 75. A signal outside training stops
  that worker at once (75); the others then fail their next collective and exit 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from finetune_api.reports import EXIT_INTERRUPTED, EXIT_OK, EXIT_RETRYABLE, EXIT_USER_ERROR, Report, parse_reports
from finetune_api.reports import format_report as _format_report
from finetune_api.spec import DeepSpeedSpec, Precision
from finetune_trainer.config import UserError

EXIT_CODE_FILE_ENV = "FINETUNE_EXIT_CODE_FILE"  # a directory: each rank writes rank-{RANK}.json there
WORKERS_ENV, WORKER_RANK_ENV = "FINETUNE_WORKERS", "FINETUNE_WORKER_RANK"
RDZV_HOST_ENV, RDZV_PORT_ENV = "FINETUNE_RDZV_HOST", "FINETUNE_RDZV_PORT"
DEFAULT_RDZV_PORT = 29500
RDZV_TIMEOUT_ENV = "FINETUNE_RDZV_TIMEOUT_SECONDS"
DEFAULT_RDZV_TIMEOUT_S = 1800  # torchrun's own default (600 s) is shorter than a slow GPU image pull
TIMEOUT_ENV = "FINETUNE_COLLECTIVE_TIMEOUT_SECONDS"
DEFAULT_TIMEOUT_S = 1800.0  # NCCL/gloo collectives (and HF's ddp_timeout default)
PEER_WAIT_ENV = "FINETUNE_PEER_WAIT_SECONDS"
DEFAULT_PEER_WAIT_S = 6 * 3600.0  # ranks waiting for their node's downloads (a large model from a slow store)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Global rank 0: the only process that reports and writes the final outputs."""
    return rank() == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_local_main() -> bool:
    """Local rank 0: the process that fills this node's caches and scratch dir (one per pod)."""
    return local_rank() == 0


def node_rank() -> int:
    """This pod's index in the gang (torchrun's GROUP_RANK), 0 for a single pod."""
    return int(os.environ.get("GROUP_RANK", "0"))


def nodes() -> int:
    """How many pods train together (WORLD_SIZE / LOCAL_WORLD_SIZE under torchrun)."""
    return max(1, world_size() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _seconds(env: str, default: float) -> float:
    try:
        value = float(os.environ.get(env) or default)
    except ValueError:
        return default
    return value if value > 0 else default


def collective_timeout() -> timedelta:
    return timedelta(seconds=_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


_PEER_GROUP: Any = None  # a gloo group with a long timeout, for waits that outlast a collective's timeout


def init_process_group() -> None:
    """Several processes (torchrun): join the process group now, so local rank 0 can download while the
    others wait. A collective timeout makes a rank whose peer vanished fail instead of hanging forever."""
    global _PEER_GROUP
    if world_size() <= 1 or torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend=backend, timeout=collective_timeout())
    _PEER_GROUP = torch.distributed.new_group(
        backend="gloo", timeout=timedelta(seconds=_seconds(PEER_WAIT_ENV, DEFAULT_PEER_WAIT_S))
    )


def wait_for_peers() -> None:
    """A barrier of every rank (no-op for one process), with the long peer-wait timeout."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier(group=_PEER_GROUP)


def broadcast_from_main(value: Any) -> Any:
    """Global rank 0's ``value`` on every rank (pickled; small objects only)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, group=_PEER_GROUP)
    return box[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_single_process_env() -> None:
    """The env a launcher would set, for DeepSpeed in one process (it initialises torch.distributed)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)


def resolve_precision(requested: Precision | str) -> str:
    """fp32/fp16/bf16 for this machine. auto: bf16 where the GPU supports it, else fp32 (never fp16: it
    needs loss scaling and silently diverges on some models; users must ask for it)."""
    requested = Precision(requested)
    cuda = torch.cuda.is_available()
    if requested == Precision.AUTO:
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if requested == Precision.FP16 and not cuda:
        raise UserError("PrecisionUnsupported", "hyperparameters.precision fp16 needs a CUDA GPU; use fp32 or auto")
    if requested == Precision.BF16 and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("PrecisionUnsupported", "this GPU does not support bf16; use fp16, fp32 or auto")
    return str(requested)


def skip_unbuildable_deepspeed_ops() -> None:
    """On a CPU with several processes DeepSpeed JIT-compiles its shared-memory all-reduce (deepspeed_shm_comm)
    when it starts; the trainer image has no C++ compiler, so that build fails and takes the run with it (seen in
    a 2-pod ZeRO-2 gang). Marked unavailable, DeepSpeed uses torch.distributed's own all-reduce (gloo) instead."""
    if torch.cuda.is_available() or shutil.which("c++"):
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # type: ignore[attr-defined]


def deepspeed_config(ds: DeepSpeedSpec) -> dict[str, Any]:
    """A ZeRO config for TrainingArguments(deepspeed=...). No optimizer/scheduler blocks: the Trainer's own
    (from hyperparameters) are used, so switching DeepSpeed on does not change the optimisation."""
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "contiguous_gradients": True,
        "overlap_comm": torch.cuda.is_available(),  # overlapping needs CUDA streams
        "reduce_bucket_size": "auto",
    }
    if ds.stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                # Checkpoints and the final model must hold real weights, not ZeRO-3 shards.
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        # The Trainer's optimizer (adamw_torch, adafactor, ...) is a "client optimizer" to DeepSpeed.
        "zero_allow_untested_optimizer": True,
    }


# ---- the launcher ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gang:
    """This pod's place in its gang (the operator's env; see the module doc)."""

    workers: int = 1
    rank: int = 0
    host: str = "127.0.0.1"
    port: int = DEFAULT_RDZV_PORT
    timeout_s: int = DEFAULT_RDZV_TIMEOUT_S


def gang_from_env(env: Mapping[str, str]) -> Gang:
    """The gang env of the module doc; a single pod when FINETUNE_WORKERS is unset. Inconsistent values are a
    platform bug (the operator sets them), not the user's: ValueError."""
    workers = int(env.get(WORKERS_ENV) or 1)
    node = int(env.get(WORKER_RANK_ENV) or 0)
    port = int(env.get(RDZV_PORT_ENV) or DEFAULT_RDZV_PORT)
    host = env.get(RDZV_HOST_ENV) or ""
    timeout = int(env.get(RDZV_TIMEOUT_ENV) or DEFAULT_RDZV_TIMEOUT_S)
    if workers < 1 or not 0 <= node < workers or not 0 < port < 65536 or timeout < 1:
        raise ValueError(f"bad gang env: {WORKERS_ENV}={workers} {WORKER_RANK_ENV}={node} {RDZV_PORT_ENV}={port}")
    if workers > 1 and node > 0 and not host:
        raise ValueError(f"{RDZV_HOST_ENV} must name worker 0 for worker {node} of {workers}")
    return Gang(workers, node, host or "127.0.0.1", port, timeout)


def launch_command(argv: Sequence[str], gang: Gang, gpus: int, python: str = sys.executable) -> list[str]:
    """torchrun's command line for this pod: one process per GPU (one on a CPU pod), static rendezvous at
    worker 0 for a gang, ``--standalone`` for a single pod."""
    procs = max(1, gpus)
    if gang.workers == 1:
        topology = ["--standalone"]
    else:
        host = "127.0.0.1" if gang.rank == 0 else gang.host
        topology = [
            f"--nnodes={gang.workers}",
            f"--node-rank={gang.rank}",
            f"--master-addr={host}",
            f"--master-port={gang.port}",
            "--max-restarts=0",  # the operator restarts the whole gang; a lone restarted pod could not rejoin
            f"--rdzv-conf=timeout={gang.timeout_s}",
        ]
    module = ["-m", "finetune_trainer", *argv]
    return [python, "-m", "torch.distributed.run", *topology, f"--nproc-per-node={procs}", *module]


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def should_launch_per_gpu() -> bool:
    """True in the parent process of a multi-GPU pod or of a gang's worker: not yet under a launcher."""
    if "LOCAL_RANK" in os.environ or "RANK" in os.environ:
        return False
    return gang_from_env(os.environ).workers > 1 or _gpus() > 1


def _children(pid: int) -> list[int]:
    """The direct children of ``pid`` (torchrun's ranks), from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


@dataclass(frozen=True)
class RankExit:
    rank: int
    code: int
    error: Report | None = None


_PRIORITY = {EXIT_USER_ERROR: 0, EXIT_RETRYABLE: 1, EXIT_INTERRUPTED: 2}


def pod_exit(exits: Sequence[RankExit], launcher_rc: int) -> RankExit:
    """The pod's exit from its ranks' exits: all 0 -> 0; else a user error (2) over a crash (1) over an
    interruption (75), the lowest rank first. A rank that left no record (killed) counts as a crash."""
    failed = [e for e in exits if e.code != EXIT_OK]
    if not failed:
        return RankExit(min((e.rank for e in exits), default=0), EXIT_OK if launcher_rc == 0 else EXIT_RETRYABLE)
    return min(failed, key=lambda e: (_PRIORITY.get(e.code, 1), e.rank))


def _read_exits(directory: Path) -> list[RankExit]:
    exits = []
    for path in sorted(directory.glob("rank-*.json")):
        try:
            data = json.loads(path.read_text())
            reports = list(parse_reports([data["error"]])) if data.get("error") else []
            exits.append(RankExit(int(data["rank"]), int(data["code"]), reports[0] if reports else None))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return exits


def launch_per_gpu(argv: Sequence[str], workdir: Path) -> int:
    """Run this trainer under torch.distributed.run (see ``launch_command``) and return the pod's exit code.

    torchrun turns any child failure into its own exit code 1, which would make a user error (exit 2,
    non-retryable) retryable; every rank therefore records its intended exit code (and error report) in a
    file we read back (``pod_exit``). The error of a rank other than 0 becomes this pod's termination message,
    with the rank named. SIGTERM (pod deletion, preemption) is forwarded so the children can stop cleanly.
    """
    from finetune_trainer.reporting import write_termination_log

    gang = gang_from_env(os.environ)
    codes = workdir / "exit-codes"
    codes.mkdir(parents=True, exist_ok=True)
    for old in codes.glob("rank-*.json"):
        old.unlink()
    env = {
        **os.environ,
        EXIT_CODE_FILE_ENV: str(codes),
        "FINETUNE_HOLD_ON_USER_ERROR_SECONDS": "0",  # this parent holds instead (see __main__)
    }
    proc = subprocess.Popen(launch_command(argv, gang, _gpus()), env=env)

    def forward(signum: int, _frame: FrameType | None) -> None:
        # To the ranks themselves: torchrun would SIGKILL them 30 s after passing a SIGTERM on, too soon for
        # the checkpoint they save and upload when stopping. Not started yet: torchrun passes it on.
        for pid in _children(proc.pid) or [proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)
    chosen = pod_exit(_read_exits(codes), rc)
    if chosen.code != EXIT_OK and chosen.rank != 0 and chosen.error is not None:
        write_termination_log(chosen.error)  # global rank 0 wrote its own; others' errors land here
    return chosen.code


def record_exit_code(code: int, error: Report | None = None) -> None:
    """Every rank tells its launching parent (launch_per_gpu) which exit code it meant, with its error report
    (the message names the rank when there are several)."""
    directory = os.environ.get(EXIT_CODE_FILE_ENV)
    if not directory:
        return
    if error is not None and world_size() > 1 and rank() != 0:
        where = f"rank {rank()} (worker {node_rank()} of {nodes()})"
        error = error.model_copy(update={"message": f"{where}: {error.message}"})
    data = {"rank": rank(), "code": code, "error": _format_report(error) if error is not None else None}
    with contextlib.suppress(OSError):
        Path(directory, f"rank-{rank()}.json").write_text(json.dumps(data))
