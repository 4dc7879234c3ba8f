"""How long a checkpoint blocks training (part (a) of bench/storage_bench.py).

A real transformers Trainer trains a tiny Llama on CPU with the trainer's CheckpointUploader callback (uploads
to the local S3 server); timing callbacks around it record, per step: the step's wall time, the gap between
the step's end and the next step's begin (where the Trainer saves), the Trainer's own save to disk (model,
optimizer, scheduler, RNG and trainer state, rotation: from on_step_end to on_save), and the uploader's part
of on_save (hard-link snapshot and queueing). Blocking = median gap of checkpoint steps - median gap of the
others: the step's own compute, noisy on a shared CPU, is not in it. Uploads run in the uploader's thread;
the bench records when each one finished (its checkpoint report) and how long the end of training waited.

The same run repeated with the upload done inside on_save (synchronously) is the baseline.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

from finetune_trainer.checkpoints import CheckpointUploader
from finetune_trainer.reporting import Reporter
from finetune_trainer.storage import Storage
from finetune_trainer.tiny_models import build_tokenizer, model_config

SEQ = 32  # short rows: the steps stay cheap on a shared CPU, the checkpoint (parameters) stays large


class TimedReporter(Reporter):
    """Records when each checkpoint's upload completed (the uploader reports it after the marker is written)."""

    def __init__(self) -> None:
        super().__init__(enabled=False)
        self.uploaded: dict[int, float] = {}

    def checkpoint(self, step: int, uri: str, metrics: dict[str, Any]) -> None:
        self.uploaded[step] = time.perf_counter()
        super().checkpoint(step, uri, metrics)


@dataclass
class StepTimes:
    begin: dict[int, float] = field(default_factory=dict)  # step number (1-based) -> on_step_begin
    end: dict[int, float] = field(default_factory=dict)
    save_begin: dict[int, float] = field(default_factory=dict)  # on_save, before the uploader's hook
    save_end: dict[int, float] = field(default_factory=dict)  # on_save, after it


class Clock(TrainerCallback):
    """Placed before (``first``) and after the uploader in the callback list."""

    def __init__(self, times: StepTimes, first: bool) -> None:
        self.times, self.first = times, first

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.first:
            self.times.begin[state.global_step + 1] = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.first:
            self.times.end[state.global_step] = time.perf_counter()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        (self.times.save_begin if self.first else self.times.save_end)[state.global_step] = time.perf_counter()


class SyncUploader(CheckpointUploader):
    """The baseline: the same upload, done inside on_save (training waits for it)."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_save(args, state, control, **kwargs)
        self.wait_pending()

    def wait_pending(self) -> None:
        for fut in self._futures:
            fut.result()


@dataclass
class Result:
    mode: str
    checkpoint_mb: float
    normal_step: float  # median wall time of steps without a checkpoint (and no upload running)
    normal_gap: float  # median: on_step_end -> next on_step_begin, steps without a checkpoint
    checkpoint_gap: float  # median: the same, checkpoint steps (the save happens there)
    save_to_disk: float  # median: the Trainer's own save (on_step_end -> on_save)
    uploader_hook: float  # median: the uploader's on_save (snapshot + queue, or the whole upload when sync)
    host_copy: float  # copying weights and optimizer state to host memory (a fresh copy), median of 5
    upload_wall: float  # median: on_save -> upload complete (marker written)
    final_wait: float  # uploader.wait() after trainer.train() returned
    overlapped_step: float  # median wall time of non-checkpoint steps while an upload was running

    @property
    def blocking(self) -> float:
        return self.checkpoint_gap - self.normal_gap

    @property
    def beyond_host_copy(self) -> float:
        return self.blocking - self.host_copy


def _dataset(vocab: int, rows: int) -> Any:
    import datasets

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, SEQ), generator=gen).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * SEQ] * rows})


def _host_copy(model: Any, optimizer: Any) -> float:
    """Median of 5: weights and optimizer state copied into fresh host memory."""
    took = []
    for _ in range(5):
        t0 = time.perf_counter()
        weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        states = [
            {k: v.detach().to("cpu", copy=True) for k, v in s.items() if torch.is_tensor(v)}
            for s in optimizer.state.values()
        ]
        took.append(time.perf_counter() - t0)
        del weights, states
    return statistics.median(took)


def run(mode: str, work: Path, bucket: str, steps: int, every: int, hidden: int, layers: int) -> Result:
    tok = build_tokenizer("llama", vocab_size=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config("llama", tok, hidden_size=hidden, num_layers=layers))
    out = Path(tempfile.mkdtemp(prefix=f"ckpt-{mode}-", dir=work))
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-4,
        logging_steps=10_000,
        save_strategy="steps",
        save_steps=every,
        save_total_limit=2,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    reporter = TimedReporter()
    kind = SyncUploader if mode == "sync" else CheckpointUploader
    uploader = kind(Storage(), f"s3://{bucket}/{mode}", 2, reporter, out / "staging")
    times = StepTimes()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_dataset(len(tok), steps * 2),
        data_collator=default_data_collator,
        callbacks=[Clock(times, True), uploader, Clock(times, False)],
    )
    trainer.train()
    t0 = time.perf_counter()
    uploader.wait()
    final_wait = time.perf_counter() - t0
    host = _host_copy(trainer.model, trainer.optimizer)
    ckpt = out / "checkpoints" / f"checkpoint-{steps}"
    mb = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) / 1e6
    return _summarise(mode, times, reporter, mb, host, final_wait, steps)


def _summarise(
    mode: str, t: StepTimes, reporter: TimedReporter, mb: float, host: float, final_wait: float, steps: int
) -> Result:
    saved = sorted(t.save_begin)
    wall = {s: t.begin[s + 1] - t.begin[s] for s in range(2, steps) if s + 1 in t.begin}  # step 1 warms up
    gap = {s: t.begin[s + 1] - t.end[s] for s in wall}
    uploading = [(t.save_end[s], reporter.uploaded.get(s, float("inf"))) for s in saved]
    normal, overlapped = [], []
    for s, w in wall.items():
        if s in t.save_begin:
            continue
        busy = any(a < t.begin[s + 1] and t.begin[s] < b for a, b in uploading)
        (overlapped if busy else normal).append(w)
    med = statistics.median
    return Result(
        mode=mode,
        checkpoint_mb=mb,
        normal_step=med(normal) if normal else med(overlapped),
        normal_gap=med([g for s, g in gap.items() if s not in t.save_begin]),
        checkpoint_gap=med([g for s, g in gap.items() if s in t.save_begin]),
        save_to_disk=med([t.save_begin[s] - t.end[s] for s in saved]),
        uploader_hook=med([t.save_end[s] - t.save_begin[s] for s in saved]),
        host_copy=host,
        upload_wall=med([reporter.uploaded[s] - t.save_end[s] for s in saved if s in reporter.uploaded] or [0.0]),
        final_wait=final_wait,
        overlapped_step=med(overlapped) if overlapped else float("nan"),
    )
