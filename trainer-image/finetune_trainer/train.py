"""The training flow, top to bottom: download -> prepare -> base samples -> train -> evaluate -> upload.

One readable function per stage. Every stage is announced with a ``stage`` report and timed (the durations
go into the report). Only rank 0 reports and uploads; every rank trains, evaluates and saves (DeepSpeed
needs all ranks for those).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from transformers import EarlyStoppingCallback, PreTrainedModel, Trainer, TrainingArguments, set_seed

from finetune_api.resolve import ResolvedTraining
from finetune_api.spec import FineTuneJobSpec, MethodType, Optimizer, Task
from finetune_api.status import FineTuneJob
from finetune_trainer import distributed, evaluate, interrupt
from finetune_trainer.batching import GROUP_BY_LENGTH, FineTuneTrainer
from finetune_trainer.checkpoints import (
    CheckpointUploader,
    GangBestCheckpoint,
    checkpoint_uri,
    remote_steps,
    resume_point,
    step_of,
)
from finetune_trainer.config import UserError, architecture, resolve_job
from finetune_trainer.data import DataError, PreparedData, make_collator, prepare_data
from finetune_trainer.distributed import (
    deepspeed_config,
    ensure_single_process_env,
    is_main_process,
    skip_unbuildable_deepspeed_ops,
)
from finetune_trainer.distributed import resolve_precision as _precision
from finetune_trainer.inputs import fetch
from finetune_trainer.modeling import apply_method, load_base_model, load_tokenizer, model_type_of, parameter_counts
from finetune_trainer.progress import ProgressCallback, StopOnSignal
from finetune_trainer.report import flops_estimate, memory_estimate, peak_memory, write_report
from finetune_trainer.reporting import Reporter, clean_metrics, write_termination_log
from finetune_trainer.storage import FileRecord, Storage, join_uri, storage_for

OPTIMIZERS = {
    Optimizer.ADAMW: "adamw_torch",
    Optimizer.ADAFACTOR: "adafactor",
    Optimizer.SGD: "sgd",
    Optimizer.ADAMW_8BIT: "adamw_bnb_8bit",
}
LIBRARIES = ("torch", "transformers", "peft", "deepspeed", "datasets", "tokenizers", "accelerate")


@dataclass
class Outcome:
    step: int
    metrics: dict[str, float]
    uri: str
    manifest: str
    resumed_from: int | None = None


@dataclass
class Stages:
    """Announces each stage with a report and records how long it took."""

    reporter: Reporter
    durations: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str, report_as: str | None = None, message: str | None = None) -> Iterator[None]:
        # A signal some library's bare ``except:`` swallowed still stops the run before the next stage.
        interrupt.check()
        self.reporter.stage(report_as or name, message)
        start = time.monotonic()
        try:
            yield
        finally:
            self.durations[name] = round(self.durations.get(name, 0.0) + time.monotonic() - start, 3)


@dataclass
class Inputs:
    model: Path
    tokenizer: Path
    train: Path
    validation: Path | None


# ---- distributed helpers -----------------------------------------------------------------------------------


def _init_distributed() -> None:
    """Several processes (torchrun, one pod or a gang): join the process group now, with a collective timeout,
    so each pod's local rank 0 can download while the others wait."""
    distributed.init_process_group()


def _barrier() -> None:
    distributed.wait_for_peers()


# ---- stages --------------------------------------------------------------------------------------------------


def fetch_inputs(storage: Storage, spec: FineTuneJobSpec, cache: Path) -> Inputs:
    """Local copies of the model, tokenizer and data (cached across attempts on the same node)."""

    def get(uri: str, what: str, reason: str) -> Path:
        return fetch(storage, uri, what, reason, cache)

    model = get(spec.model.uri, "model.uri", "ModelNotFound")
    tokenizer = (
        get(spec.model.tokenizer_uri, "model.tokenizerUri", "ModelNotFound") if spec.model.tokenizer_uri else model
    )
    train = get(spec.dataset.train, "dataset.train", "DataNotFound")
    val = get(spec.dataset.validation, "dataset.validation", "DataNotFound") if spec.dataset.validation else None
    if not model.is_dir():
        raise UserError("ModelNotFound", f"model.uri {spec.model.uri} must be a directory (prefix), not a file")
    return Inputs(model, tokenizer, train, val)


def training_arguments(
    spec: FineTuneJobSpec, resolved: ResolvedTraining, precision: str, output_dir: Path, has_eval: bool
) -> TrainingArguments:
    """TrainingArguments from spec.hyperparameters / evaluation / checkpoints / deepspeed."""
    hp = spec.hyperparameters
    cuda = torch.cuda.is_available()
    optim = Optimizer(hp.optimizer)
    if optim == Optimizer.ADAMW_8BIT and not cuda:
        raise UserError("OptimizerUnsupported", "hyperparameters.optimizer adamw-8bit needs a CUDA GPU; use adamw")
    if resolved.best_metric and not has_eval:
        raise UserError(
            "InvalidConfig",
            "evaluation.bestModelMetric / earlyStopping need validation data: set dataset.validation or "
            "dataset.split.validationRatio > 0",
        )
    eval_strategy = "no" if not has_eval else ("steps" if resolved.eval_steps else "epoch")
    kwargs: dict[str, Any] = {}
    if spec.deepspeed is not None:
        ensure_single_process_env()
        skip_unbuildable_deepspeed_ops()
        kwargs["deepspeed"] = deepspeed_config(spec.deepspeed)
    if MethodType(spec.method.type) != MethodType.FULL:
        kwargs["ddp_find_unused_parameters"] = False  # frozen base weights never get gradients
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps or -1,
        per_device_train_batch_size=hp.batch_size,
        # Batches of similar lengths pad less (FineTuneTrainer keeps the order seeded and evaluation unchanged).
        train_sampling_strategy=GROUP_BY_LENGTH if resolved.group_by_length else "random",
        per_device_eval_batch_size=resolved.eval_batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=resolved.learning_rate,
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        # transformers 5: an int is a step count, a float in [0, 1) a ratio of the total steps.
        warmup_steps=hp.warmup_steps if hp.warmup_steps else float(hp.warmup_ratio),
        lr_scheduler_type=str(hp.scheduler).replace("-", "_"),
        optim=OPTIMIZERS[optim],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=hp.gradient_checkpointing,  # transformers 5 name of gradient checkpointing
        seed=hp.seed,
        data_seed=hp.seed,
        logging_steps=hp.logging_steps,
        logging_first_step=True,  # the first loss is the baseline every later loss is compared with
        eval_strategy=eval_strategy,
        eval_steps=resolved.eval_steps if eval_strategy == "steps" else None,
        save_strategy="steps" if resolved.save_steps else "epoch",
        save_steps=resolved.save_steps or 500,
        save_total_limit=spec.checkpoints.keep,
        # A resumed attempt continues early stopping's patience count (and a decided stop stays decided).
        restore_callback_states_from_checkpoint=True,
        load_best_model_at_end=resolved.best_metric is not None,
        metric_for_best_model=resolved.best_metric,
        greater_is_better=resolved.greater_is_better,
        include_num_input_tokens_seen="non_padding",
        # Our datasets hold exactly the model inputs; peft wrappers hide forward()'s signature from the Trainer.
        remove_unused_columns=False,
        label_names=["labels"],
        report_to="none",
        disable_tqdm=not sys.stdout.isatty(),  # a progress bar only for humans; reports always
        use_cpu=not cuda,
        dataloader_num_workers=0,
        **kwargs,
    )


def _generation_examples(
    task: Task, data: PreparedData, prompts: list[str], limit: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    examples = data.eval_examples[:limit]
    extra: list[dict[str, Any]]
    if task == Task.CHAT:
        extra = [{"prompt_messages": [{"role": "user", "content": p}]} for p in prompts]
    else:
        extra = [{"prompt": p} for p in prompts]
    return examples, extra


def generation_kwargs(spec: FineTuneJobSpec, resolved: ResolvedTraining) -> dict[str, Any]:
    """How evaluate.generate runs for the validation examples and the sample prompts."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    synced = spec.deepspeed is not None and spec.deepspeed.stage == 3 and world > 1
    return {
        "max_new_tokens": spec.evaluation.max_new_tokens,
        "batch_size": resolved.eval_batch_size,
        "max_prompt_tokens": spec.hyperparameters.max_seq_length,
        "synced_gpus": synced,  # ZeRO-3 shards: every rank must take part in each forward
    }


def early_stopping(spec: FineTuneJobSpec) -> EarlyStoppingCallback | None:
    es = spec.hyperparameters.early_stopping
    return EarlyStoppingCallback(es.patience, es.threshold) if es is not None else None


def predict_outputs(
    model: Any,
    tokenizer: Any,
    spec: FineTuneJobSpec,
    resolved: ResolvedTraining,
    data: PreparedData,
    collator: Any,
) -> dict[str, Any]:
    """Real outputs of ``model``: generations (generative tasks) or label ids (classification), for the
    validation examples and the sample prompts."""
    task = Task(spec.task)
    if task == Task.CLASSIFICATION:
        preds = evaluate.classify(model, data.eval, collator, resolved.eval_batch_size) if data.eval else []
        prompt_preds: list[int] = []
        if spec.evaluation.sample_prompts:
            import datasets

            enc = tokenizer(
                spec.evaluation.sample_prompts, truncation=True, max_length=spec.hyperparameters.max_seq_length
            )
            ds = datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
            prompt_preds = evaluate.classify(model, ds, collator, resolved.eval_batch_size)
        return {"validation": preds, "prompts": prompt_preds}
    examples, extra = _generation_examples(task, data, spec.evaluation.sample_prompts, resolved.eval_max_samples)
    kwargs = generation_kwargs(spec, resolved)
    return {
        "validation": evaluate.generate(model, tokenizer, task, examples, **kwargs),
        "prompts": evaluate.generate(model, tokenizer, task, extra, **kwargs),
    }


def score(
    spec: FineTuneJobSpec, resolved: ResolvedTraining, data: PreparedData, outputs: dict[str, Any]
) -> dict[str, float]:
    """Task metrics of one model's outputs, restricted to evaluation.metrics."""
    task = Task(spec.task)
    if task == Task.CLASSIFICATION:
        labels = [int(e["label"]) for e in data.eval_examples]
        if not labels:
            return {}
        assert data.label_names is not None
        return evaluate.classification_metrics(outputs["validation"], labels, len(data.label_names), resolved.metrics)
    refs = [e["reference"] for e in data.eval_examples[: len(outputs["validation"])]]
    return evaluate.text_metrics(outputs["validation"], refs, resolved.metrics)


def build_samples(
    spec: FineTuneJobSpec, data: PreparedData, base: dict[str, Any], tuned: dict[str, Any], limit: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(validation samples, sample-prompt samples, classification predictions) with base and tuned side by side."""
    task = Task(spec.task)
    prompts = spec.evaluation.sample_prompts
    if task == Task.CLASSIFICATION:
        names = data.label_names or []
        triples = zip(data.eval_examples, base["validation"], tuned["validation"], strict=True)
        preds = [
            {
                "index": i,
                "text": e["text"],
                "label": names[e["label"]],
                "label_id": e["label"],
                "base": names[b],
                "base_id": b,
                "tuned": names[t],
                "tuned_id": t,
            }
            for i, (e, b, t) in enumerate(triples)
        ]
        prompt_rows = [
            {"prompt": p, "base": names[b], "tuned": names[t]}
            for p, b, t in zip(prompts, base["prompts"], tuned["prompts"], strict=True)
        ]
        return preds[:limit], prompt_rows, preds
    rows = []
    for e, b, t in zip(data.eval_examples, base["validation"], tuned["validation"], strict=False):
        prompt = e.get("prompt", e.get("prompt_messages"))
        rows.append({"prompt": prompt, "reference": e["reference"], "base": b, "tuned": t})
    prompt_rows = [
        {"prompt": p, "base": b, "tuned": t} for p, b, t in zip(prompts, base["prompts"], tuned["prompts"], strict=True)
    ]
    return rows, prompt_rows, None


def save_final_model(
    trainer: Trainer, tokenizer: Any, spec: FineTuneJobSpec, inputs: Inputs, labels: list[str] | None, out: Path
) -> tuple[Path, Path | None]:
    """model/ (the adapter for lora/qlora, full weights otherwise) and, with mergeAdapter, merged/."""
    model_dir = out / "model"
    trainer.save_model(str(model_dir))  # all ranks: DeepSpeed gathers ZeRO-3 shards here
    if not is_main_process():
        return model_dir, None
    tokenizer.save_pretrained(str(model_dir))
    method = MethodType(spec.method.type)
    if not spec.method.merge_adapter or method == MethodType.FULL:
        return model_dir, None
    from peft import PeftModel

    # Merge into a fresh, unquantised copy of the base (a 4-bit base cannot absorb the adapter exactly).
    base = load_base_model(spec, inputs.model, labels, tokenizer.pad_token_id, quantize=False)
    merged = PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload()
    merged_dir = out / "merged"
    merged.save_pretrained(str(merged_dir))
    tokenizer.save_pretrained(str(merged_dir))
    return model_dir, merged_dir


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def upload_outputs(storage: Storage, output_uri: str, dirs: dict[str, Path]) -> list[dict[str, Any]]:
    """Upload each local dir to ``{output_uri}/{name}/``; manifest entries with paths relative to output_uri."""
    files: list[dict[str, Any]] = []
    for name, local in dirs.items():
        records: list[FileRecord] = storage.upload_dir(local, join_uri(output_uri, name))
        files += [{"path": f"{name}/{r.path}", "size": r.size, "sha256": r.sha256} for r in records]
    return files


def _interrupted_message(output_uri: str, stopped_at: int | None) -> str:
    elapsed = interrupt.seconds_since_signal() or 0.0
    if stopped_at is None:
        what = "after the last training step; the next attempt resumes from the newest complete checkpoint"
    else:
        what = (
            f"at step {stopped_at}; checkpoint {checkpoint_uri(output_uri, stopped_at)} is uploaded and the next "
            "attempt resumes from it"
        )
    return f"{interrupt.STATE.name} received: training stopped {what} ({elapsed:.1f} s after the signal)"


# ---- the flow ------------------------------------------------------------------------------------------------


def run(job: FineTuneJob, reporter: Reporter, workdir: Path) -> Outcome:
    resolved_job = resolve_job(job.spec)  # the operator's resolution, unchanged (resolving is idempotent)
    spec, resolved = resolved_job.spec, resolved_job.training
    job = job.model_copy(update={"spec": spec})
    task = Task(spec.task)
    main = is_main_process()
    stages = Stages(reporter)
    storage = storage_for(spec.storage.endpoint, spec.storage.region)
    cache = Path(os.environ.get("FINETUNE_CACHE") or workdir / "cache")
    _init_distributed()

    with stages("downloading"):
        if main:
            # Before a possibly long download: an output that cannot be written fails now, as a user error.
            storage.check_writable(spec.output.uri)
        if distributed.is_local_main():  # every pod of a gang fills its own node-local cache
            inputs = fetch_inputs(storage, spec, cache)
        _barrier()
        if not distributed.is_local_main():
            inputs = fetch_inputs(storage, spec, cache)  # cache hits: local rank 0 fetched everything

    with stages("preparing"):
        arch = architecture(spec, resolved, model_type_of(inputs.model))
        precision = _precision(spec.hyperparameters.precision)
        tokenizer = load_tokenizer(inputs.tokenizer, task)
        try:
            data = prepare_data(spec, tokenizer, inputs.train, inputs.validation)
        except DataError as exc:
            raise UserError("DataInvalid", str(exc)) from None
        set_seed(spec.hyperparameters.seed)  # the classifier head / adapters start the same on every attempt
        model: PreTrainedModel = load_base_model(spec, inputs.model, data.label_names, tokenizer.pad_token_id)
        collator = make_collator(spec, tokenizer, model)
        output_dir = workdir / "checkpoints"
        args = training_arguments(spec, resolved, precision, output_dir, data.eval is not None)

    zero3 = spec.deepspeed is not None and spec.deepspeed.stage == 3
    if torch.cuda.is_available() and MethodType(spec.method.type) != MethodType.QLORA and not zero3:
        # Generate on the GPU (a 4-bit model is already there; under ZeRO-3 the full model may not fit).
        model.to(args.device)  # type: ignore[arg-type]  # transformers stubs type .to() oddly
    with stages("base_samples", report_as="evaluating", message="base model outputs, before training"):
        base_outputs = predict_outputs(model, tokenizer, spec, resolved, data, collator)
        base_metrics = score(spec, resolved, data, base_outputs)

    with stages("preparing", message="method and checkpoint"):
        model = apply_method(model, spec, arch, spec.hyperparameters.gradient_checkpointing)
        trainable, total = parameter_counts(model)
        # The same newest complete checkpoint on every rank of every pod (each pod downloads its own copy).
        resume, run_id = resume_point(storage, spec.output.uri, output_dir, owner=job.metadata.uid)
        uploader = CheckpointUploader(
            storage,
            spec.output.uri,
            spec.checkpoints.keep,
            reporter,
            workdir / "staging",
            enabled=distributed.is_local_main(),  # a gang's other pods upload their ranks' part of each checkpoint
            owner=job.metadata.uid,
            node=distributed.node_rank(),
            nodes=distributed.nodes(),
            run_id=run_id,
        )
        progress = ProgressCallback(reporter)
        stop_on_signal = StopOnSignal(reporter)
        callbacks: list[Any] = [progress, uploader, stop_on_signal]
        if distributed.nodes() > 1:
            callbacks.append(GangBestCheckpoint(storage, spec.output.uri, uploader))
        stopper = early_stopping(spec)
        if stopper is not None:
            callbacks.append(stopper)
        compute_metrics = None
        if task == Task.CLASSIFICATION and data.label_names:
            compute_metrics = evaluate.trainer_compute_metrics(
                len(data.label_names), ["accuracy", "precision", "recall", "f1"]
            )
        trainer = FineTuneTrainer(
            model=model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            data_collator=collator,
            processing_class=tokenizer,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
        )

    resumed_from = step_of(resume)
    message = f"resuming from checkpoint {resumed_from}" if resume else None
    with stages("training", message=message), interrupt.deferred():
        try:
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except BaseException:
            # Let in-flight checkpoint uploads finish: the next attempt resumes from them.
            try:
                uploader.wait()
            except Exception as upload_exc:
                print(f"checkpoint upload failed while stopping: {upload_exc}", file=sys.stderr)
            raise
        uploader.wait()  # after a signal: the final checkpoint, with its marker
    state = trainer.state
    if interrupt.STATE.requested:  # nothing more is written to the output: no evaluation, model or manifest
        raise interrupt.Interrupted(_interrupted_message(spec.output.uri, stop_on_signal.stopped_at))

    with stages("evaluating"):
        eval_metrics = trainer.evaluate() if data.eval is not None else {}
        tuned_outputs = predict_outputs(trainer.model, tokenizer, spec, resolved, data, collator)
        tuned_metrics = score(spec, resolved, data, tuned_outputs)

    metrics: dict[str, float] = {}
    if "loss" in resolved.metrics and "eval_loss" in eval_metrics:
        metrics["eval_loss"] = eval_metrics["eval_loss"]
    if "perplexity" in resolved.metrics and "eval_loss" in eval_metrics:
        metrics["perplexity"] = math.exp(min(eval_metrics["eval_loss"], 700.0))
    metrics.update(tuned_metrics)
    if "train_loss" in result.metrics:
        metrics["train_loss"] = result.metrics["train_loss"]
    metrics = clean_metrics(metrics)

    with stages("uploading"):
        final = workdir / "final"
        if main:
            shutil.rmtree(final, ignore_errors=True)
        model_dir, merged_dir = save_final_model(trainer, tokenizer, spec, inputs, data.label_names, final)
        if not main:
            return Outcome(state.global_step, metrics, spec.output.uri, "", resumed_from)
        samples, prompt_samples, predictions = build_samples(
            spec, data, base_outputs, tuned_outputs, resolved.eval_max_samples
        )
        tokens = int(state.num_input_tokens_seen)
        report_metrics: dict[str, Any] = {
            "task": str(task),
            "step": state.global_step,
            "epoch": state.epoch,
            "resumed_from_step": resumed_from,
            "metrics": metrics,
            "base_metrics": clean_metrics(base_metrics),
            "eval": clean_metrics(eval_metrics),
            "train": clean_metrics(result.metrics),
            "best_checkpoint_step": state.best_global_step,
            "parameters": {"total": total, "trainable": trainable},
            "estimates": {
                "tokens_trained": tokens,
                "flops": flops_estimate(total, tokens),
                "memory_bytes": memory_estimate(model, str(spec.hyperparameters.optimizer)),
            },
            "peak_memory_bytes": peak_memory(),
            "durations_seconds": stages.durations,
            "dataset": data.stats,
        }
        if task == Task.CLASSIFICATION and data.label_names and data.eval_examples:
            report_metrics["labels"] = data.label_names
            report_metrics["confusion_matrix"] = evaluate.confusion(
                tuned_outputs["validation"], [e["label"] for e in data.eval_examples], len(data.label_names)
            )
        report_dir = final / "report"
        write_report(report_dir, report_metrics, state.log_history, samples, prompt_samples, predictions)
        dirs = {"model": model_dir, "report": report_dir}
        if merged_dir is not None:
            dirs["merged"] = merged_dir
        files = upload_outputs(storage, spec.output.uri, dirs)
        complete, _ = remote_steps(storage, spec.output.uri)
        manifest = {
            "apiVersion": job.api_version,
            "kind": "FineTuneManifest",
            "job": {"name": job.metadata.name, "namespace": job.metadata.namespace, "uid": job.metadata.uid},
            "createdAt": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "step": state.global_step,
            "metrics": metrics,
            "files": files,
            "checkpoints": [{"step": s, "uri": checkpoint_uri(spec.output.uri, s)} for s in complete],
            "config": job.model_copy(update={"status": None}).dump(),
            "resolved": {**resolved.dump(), "architecture": arch.to_dict()},
            "versions": _versions(),
            "dataset": {"sha256": data.stats.get("dataset_sha256"), "stats": data.stats},
            "durationsSeconds": stages.durations,
        }
        manifest_uri = join_uri(spec.output.uri, "manifest.json")
        storage.write_text(manifest_uri, json.dumps(manifest, indent=2, default=str))  # LAST: marks completion

    final_report = reporter.output(spec.output.uri, manifest_uri, state.global_step, metrics)
    if final_report is not None:
        write_termination_log(final_report)
    return Outcome(state.global_step, metrics, spec.output.uri, manifest_uri, resumed_from)
