"""Checkpoints in the object store: background upload, completion markers, retention and resume.

Layout: ``{output.uri}/checkpoints/checkpoint-{step}/...`` with ``_COMPLETE`` written LAST. A checkpoint
without the marker is a partial upload (the pod was killed mid-way) and is never resumed from. Deletion
removes the marker FIRST, so a half-deleted checkpoint is never mistaken for a complete one either. The
result: killing the trainer at any instant loses at most the progress since the last complete checkpoint.

Uploads run in one background thread (training continues) from a hard-linked snapshot of the checkpoint
directory, because the Trainer may rotate (delete) its local copy while the upload is still running.

Gangs (several pods, ``distributed``): every pod's scratch dir holds only its own ranks' part of a checkpoint
(ZeRO optimizer shards ``global_stepN/*zero_pp_rank_R*``, ``rng_state_R.pth``). Each worker k > 0 uploads
its part, then ``_NODE-k`` naming this run; worker 0 uploads its part, waits for every ``_NODE-k`` of this
run, and only then writes ``_COMPLETE``. Worker 0 deletes the partial uploads of earlier gangs at start, so
nobody deletes a prefix while another worker uploads into it. On resume, global rank 0 picks the step and
every worker downloads that whole checkpoint (``resume_point``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune_trainer import distributed, interrupt
from finetune_trainer.reporting import Reporter
from finetune_trainer.storage import FileRecord, Storage, StorageNotFound, StorageUserError, join_uri

MARKER = "_COMPLETE"
NODE_MARKER = "_NODE-{}"  # worker k's part of a gang checkpoint is uploaded
NODE_POLL_S = 0.5
_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_uri(output_uri: str) -> str:
    return join_uri(output_uri, "checkpoints")


def checkpoint_uri(output_uri: str, step: int) -> str:
    return join_uri(output_uri, "checkpoints", f"checkpoint-{step}")


def step_of(path: str | os.PathLike[str] | None) -> int | None:
    """The step of a ``.../checkpoint-N`` path, or None."""
    if not path:
        return None
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def remote_steps(storage: Storage, output_uri: str) -> tuple[list[int], list[int]]:
    """(complete steps, incomplete steps) under ``checkpoints/``, each sorted ascending."""
    files: dict[int, set[str]] = {}
    for rel in storage.list_prefix(checkpoints_uri(output_uri)):
        head, _, rest = rel.partition("/")
        step = step_of(head)
        if step is not None and rest:
            files.setdefault(step, set()).add(rest)
    complete = sorted(s for s, names in files.items() if MARKER in names)
    incomplete = sorted(s for s in files if s not in complete)
    return complete, incomplete


def delete_checkpoint(storage: Storage, output_uri: str, step: int) -> None:
    """Marker first: from that instant the checkpoint is 'incomplete' to every reader, whatever happens next."""
    uri = checkpoint_uri(output_uri, step)
    storage.delete_file(join_uri(uri, MARKER))
    storage.delete_prefix(uri)


def _download(storage: Storage, output_uri: str, step: int, local_root: Path) -> Path:
    dest = local_root / f"checkpoint-{step}"
    if dest.exists():
        shutil.rmtree(dest)
    storage.download_prefix(checkpoint_uri(output_uri, step), dest)
    (dest / MARKER).unlink(missing_ok=True)
    for node_marker in dest.glob(NODE_MARKER.format("*")):
        node_marker.unlink()
    return dest


def _owner_of(storage: Storage, output_uri: str, step: int) -> str | None:
    try:
        marker = json.loads(storage.read_text(join_uri(checkpoint_uri(output_uri, step), MARKER)))
    except (StorageNotFound, ValueError):
        return None
    owner = marker.get("owner") if isinstance(marker, dict) else None
    return str(owner) if owner else None


def latest_complete(storage: Storage, output_uri: str, owner: str | None = None) -> int | None:
    """The newest complete checkpoint's step. With ``owner`` (the FineTuneJob's UID) only checkpoints written
    by that job count: a job that reuses the output.uri of a deleted job of the same name must start afresh,
    not "resume" someone else's finished run. Checkpoints without an owner (`finetune run`) count for anyone."""
    complete, _ = remote_steps(storage, output_uri)
    if owner is not None:
        complete = [s for s in complete if _owner_of(storage, output_uri, s) in (None, owner)]
    return complete[-1] if complete else None


def download_step(storage: Storage, output_uri: str, step: int, local_root: Path) -> Path:
    """Download checkpoint ``step`` into ``local_root`` (the Trainer's output_dir) for resuming.

    The best checkpoint is downloaded too when it is another one, so load_best_model_at_end still works
    after a resume; trainer_state.json is pointed at the local copies (it holds the previous pod's paths).
    """
    complete, _ = remote_steps(storage, output_uri)
    latest = _download(storage, output_uri, step, local_root)
    state_file = latest / "trainer_state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text(encoding="utf-8"))
        best = step_of(state.get("best_model_checkpoint"))
        if best is not None and best != step:
            if best in complete:
                try:
                    state["best_model_checkpoint"] = str(_download(storage, output_uri, best, local_root))
                except StorageNotFound:  # deleted between listing and download: keep training, lose "best"
                    state["best_model_checkpoint"] = None
            else:
                state["best_model_checkpoint"] = None
        elif best is not None:
            state["best_model_checkpoint"] = str(latest)
        state_file.write_text(json.dumps(state, indent=2), encoding="utf-8")
    return latest


def download_latest(storage: Storage, output_uri: str, local_root: Path, owner: str | None = None) -> Path | None:
    """Download the newest complete checkpoint (``latest_complete``) into ``local_root`` (``download_step``)."""
    step = latest_complete(storage, output_uri, owner)
    return None if step is None else download_step(storage, output_uri, step, local_root)


def resume_point(storage: Storage, output_uri: str, local_root: Path, owner: str | None) -> tuple[Path | None, str]:
    """(the local checkpoint to resume from, this run's id), the same step on every rank of every worker.

    Global rank 0 picks the newest complete checkpoint (and, in a gang, deletes earlier gangs' partial
    uploads); the choice is broadcast; local rank 0 of each worker empties ``local_root`` (the remote
    checkpoints are the only truth) and downloads that checkpoint; the other ranks wait for it."""
    step: int | None = None
    run_id = uuid.uuid4().hex
    if distributed.is_main_process():
        step = latest_complete(storage, output_uri, owner)
        if distributed.nodes() > 1:
            for partial in remote_steps(storage, output_uri)[1]:
                storage.delete_prefix(checkpoint_uri(output_uri, partial))
    step, run_id = distributed.broadcast_from_main((step, run_id))
    local = None if step is None else local_root / f"checkpoint-{step}"
    if distributed.is_local_main():
        shutil.rmtree(local_root, ignore_errors=True)
        local_root.mkdir(parents=True, exist_ok=True)
        if step is not None:
            local = download_step(storage, output_uri, step, local_root)
    distributed.wait_for_peers()
    return local, run_id


def _snapshot(src: Path, dest: Path) -> None:
    """Hard links: instant and no extra disk; the Trainer only ever deletes or writes new files."""
    if dest.exists():
        shutil.rmtree(dest)
    try:
        shutil.copytree(src, dest, copy_function=os.link)
    except OSError:  # another filesystem, or links not allowed
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(src, dest)


def metrics_at(state: TrainerState, step: int) -> dict[str, float]:
    """Loss and eval metrics logged at ``step`` (the checkpoint report carries them)."""
    out: dict[str, float] = {}
    for entry in state.log_history:
        if entry.get("step") != step:
            continue
        for key, value in entry.items():
            if key == "loss" or key.startswith("eval_"):
                out[key] = value
    return out


class CheckpointUploader(TrainerCallback):
    """Uploads each saved checkpoint in the background, then reports it and applies ``checkpoints.keep``."""

    def __init__(
        self,
        storage: Storage,
        output_uri: str,
        keep: int,
        reporter: Reporter,
        staging: Path,
        enabled: bool = True,
        owner: str | None = None,
        node: int = 0,
        nodes: int = 1,
        run_id: str = "",
    ) -> None:
        self.owner = owner  # the FineTuneJob UID, recorded in each marker (see download_latest)
        self.node, self.nodes, self.run_id = node, nodes, run_id  # a gang's worker (see the module doc)
        self.node_wait_s = distributed.collective_timeout().total_seconds()
        self.storage = storage
        self.output_uri = output_uri
        self.keep = keep
        self.reporter = reporter
        self.staging = staging
        self.enabled = enabled
        self.uploaded: list[int] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self._futures: list[Future[None]] = []
        self._best: int | None = None
        self._lock = threading.Lock()

    # ---- Trainer hooks ----------------------------------------------------------------------------------

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self.enabled or not state.is_local_process_zero:
            return
        self.raise_failed()
        step = state.global_step
        src = Path(str(args.output_dir)) / f"checkpoint-{step}"
        snap = self.staging / f"checkpoint-{step}"
        if self.node > 0:  # a gang's worker k: its ranks' part, even when empty (worker 0 waits for the marker)
            if src.is_dir():
                _snapshot(src, snap)
            else:
                snap.mkdir(parents=True, exist_ok=True)
            self._drop_local(Path(str(args.output_dir)), step)
            self._futures.append(self._executor.submit(self._upload_part, step, snap))
            return
        if not src.is_dir():
            return
        _snapshot(src, snap)
        with self._lock:
            self._best = step_of(state.best_model_checkpoint)
        self._futures.append(self._executor.submit(self._upload, step, snap, metrics_at(state, step)))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.raise_failed()  # a checkpoint that cannot be stored must stop the run, not be ignored

    # ---- background work --------------------------------------------------------------------------------

    def _upload(self, step: int, snap: Path, metrics: dict[str, float]) -> None:
        uri = checkpoint_uri(self.output_uri, step)
        if self.nodes == 1:
            # Leftovers of an upload of this step that a killed attempt left behind (no marker) go first.
            # (A gang's worker 0 deleted them at start: other workers may be uploading into this prefix now.)
            self.storage.delete_prefix(uri)
        records = self.storage.upload_dir(snap, uri)
        records += self._wait_for_nodes(uri)
        marker = {
            "step": step,
            "files": [{"path": r.path, "size": r.size, "sha256": r.sha256} for r in records],
            "metrics": metrics,
            "owner": self.owner,
        }
        self.storage.write_text(join_uri(uri, MARKER), json.dumps(marker, indent=1))
        self.uploaded.append(step)
        self.reporter.checkpoint(step, uri, metrics)
        shutil.rmtree(snap, ignore_errors=True)
        self._rotate()

    def _upload_part(self, step: int, snap: Path) -> None:
        """Worker k > 0 of a gang: its ranks' files, then its marker naming this run."""
        uri = checkpoint_uri(self.output_uri, step)
        records = self.storage.upload_dir(snap, uri)
        part = {"run": self.run_id, "files": [{"path": r.path, "size": r.size, "sha256": r.sha256} for r in records]}
        self.storage.write_text(join_uri(uri, NODE_MARKER.format(self.node)), json.dumps(part))
        self.uploaded.append(step)
        shutil.rmtree(snap, ignore_errors=True)

    def _wait_for_nodes(self, uri: str) -> list[FileRecord]:
        """Worker 0 of a gang: the records of every other worker's part of this run's checkpoint at ``uri``."""
        records: list[FileRecord] = []
        deadline = time.monotonic() + self.node_wait_s
        for node in range(1, self.nodes):
            while (part := self._node_part(uri, node)) is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {node} did not upload its part of {uri} in {self.node_wait_s:.0f} s")
                time.sleep(NODE_POLL_S)
            records += part
        return records

    def _node_part(self, uri: str, node: int) -> list[FileRecord] | None:
        """Worker ``node``'s uploaded files, once its marker of THIS run is there (an older gang's may linger)."""
        try:
            part = json.loads(self.storage.read_text(join_uri(uri, NODE_MARKER.format(node))))
        except (StorageNotFound, ValueError):
            return None
        if not isinstance(part, dict) or part.get("run") != self.run_id:
            return None
        return [FileRecord(f["path"], f["size"], f["sha256"], join_uri(uri, f["path"])) for f in part["files"]]

    def _drop_local(self, output_dir: Path, step: int) -> None:
        """Worker k > 0: the Trainer rotates only worker 0's local checkpoints; drop this worker's older parts."""
        for old in output_dir.glob("checkpoint-*"):
            old_step = step_of(old)
            if old_step is not None and old_step < step:
                shutil.rmtree(old, ignore_errors=True)

    def _rotate(self) -> None:
        """Keep the newest ``keep`` complete checkpoints and the best one; drop older partial uploads."""
        complete, incomplete = remote_steps(self.storage, self.output_uri)
        with self._lock:
            best = self._best
        protected = set(complete[-self.keep :])
        if best is not None:
            protected.add(best)
        newest = complete[-1] if complete else -1
        for step in complete:
            if step not in protected:
                delete_checkpoint(self.storage, self.output_uri, step)
        for step in incomplete:
            if step < newest:  # stale partial uploads; newer ones may belong to a later save of this run
                self.storage.delete_prefix(checkpoint_uri(self.output_uri, step))

    # ---- completion --------------------------------------------------------------------------------------

    def raise_failed(self) -> None:
        for fut in self._futures:
            exc = fut.exception() if fut.done() else None
            if isinstance(exc, StorageUserError):  # keeps its reason: exit 2, not a retry
                raise exc
            if exc is not None:
                raise RuntimeError(f"checkpoint upload failed: {exc}") from exc

    def wait(self) -> None:
        """Block until every queued upload is done; re-raises the first failure."""
        try:
            for fut in self._futures:
                fut.result()
        finally:
            self._executor.shutdown(wait=True)


class GangBestCheckpoint(TrainerCallback):
    """Gangs, ``load_best_model_at_end``: each pod's disk holds only its own ranks' part of a checkpoint, but the
    Trainer's final "load the best checkpoint" (every rank; DeepSpeed reads every rank's shards) needs all of
    it. At the Trainer's final log, right before that load: every upload is finished, and each pod downloads
    the whole best checkpoint from the store (complete: worker 0 waited for every part)."""

    def __init__(self, storage: Storage, output_uri: str, uploader: CheckpointUploader) -> None:
        self.storage, self.output_uri, self.uploader = storage, output_uri, uploader

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # The final training metrics (train_runtime alone is in every log with include_num_input_tokens_seen).
        if not logs or "total_flos" not in logs or "train_loss" not in logs or not args.load_best_model_at_end:
            return
        step = state.best_global_step
        if interrupt.STATE.requested or step is None:
            state.best_model_checkpoint = None  # nothing final follows an interruption: no load at all
            return
        if distributed.is_local_main():
            self.uploader.wait()
        distributed.wait_for_peers()
        output_dir = Path(str(args.output_dir))
        if distributed.is_local_main():
            _download(self.storage, self.output_uri, step, output_dir)
        distributed.wait_for_peers()
        state.best_model_checkpoint = str(output_dir / f"checkpoint-{step}")
