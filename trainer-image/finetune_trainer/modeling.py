"""Loads the base model and tokenizer from a local directory for the job's task and method.

Remote code is never executed: ``trust_remote_code`` is always False, so a model directory can only
select architectures that ship with transformers. Full fine-tuning trains every weight; LoRA wraps the
model with peft adapters; QLoRA loads the frozen base in 4-bit (bitsandbytes, CUDA only) under the adapters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from finetune_api.spec import FineTuneJobSpec, MethodType, Task
from finetune_trainer.config import Architecture, UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_type_of(model_dir: Path) -> str:
    """``config.json``'s model_type, which picks LoRA targets and classifier-head names."""
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        raise UserError("ModelInvalid", f"{model_dir} has no config.json: model.uri must hold a Hugging Face model")
    try:
        return str(json.loads(cfg.read_text(encoding="utf-8"))["model_type"])
    except (ValueError, KeyError):
        raise UserError("ModelInvalid", f"{cfg} is not a transformers config (no model_type)") from None


def load_tokenizer(path: Path, task: Task) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise UserError("TokenizerInvalid", f"cannot load a tokenizer from {path}: {exc}") from None
    if tokenizer.pad_token is None:
        # Decoder-only checkpoints (GPT-2, Llama) often ship without a pad token; padding positions are
        # masked out of attention and loss, so reusing EOS is harmless.
        if tokenizer.eos_token is None:
            raise UserError("TokenizerInvalid", f"the tokenizer in {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # training; generation switches to left padding for decoder models
    return tokenizer


def _quantization_config(spec: FineTuneJobSpec) -> Any:
    """BitsAndBytesConfig for QLoRA; refuses early (exit 2) where 4-bit kernels cannot run."""
    if not torch.cuda.is_available():
        raise UserError(
            "QLoRARequiresGPU",
            "method.type qlora loads the base model in 4-bit with bitsandbytes, which needs a CUDA GPU; "
            "request resources.gpus >= 1, or use method.type lora on CPU",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("QLoRAUnavailable", "method.type qlora needs the bitsandbytes package in the image") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**quantization_kwargs(spec))


def quantization_kwargs(spec: FineTuneJobSpec) -> dict[str, Any]:
    """BitsAndBytesConfig arguments from method.quantization."""
    q = spec.method.quantization
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": q.quant_type,
        "bnb_4bit_use_double_quant": q.double_quant,
        "bnb_4bit_compute_dtype": DTYPES[q.compute_dtype],
    }


def lora_kwargs(spec: FineTuneJobSpec, arch: Architecture) -> dict[str, Any]:
    """LoraConfig arguments (without task_type) from method and the architecture's table lookups."""
    return {
        "r": spec.method.rank,
        "lora_alpha": spec.method.alpha,
        "lora_dropout": spec.method.dropout,
        "target_modules": arch.target_modules,
        "modules_to_save": arch.modules_to_save,
        # GPT-2 stores its projections as Conv1D (weight transposed); peft must know to avoid a silent mismatch.
        "fan_in_fan_out": arch.model_type == "gpt2",
        "bias": "none",
    }


def load_base_model(
    spec: FineTuneJobSpec,
    model_dir: Path,
    label_names: list[str] | None,
    pad_token_id: int | None,
    quantize: bool = True,
) -> PreTrainedModel:
    """The base model for the task; weights in fp32 (mixed precision autocasts) unless quantised (qlora and
    ``quantize``; merging an adapter needs the unquantised base)."""
    task, method = Task(spec.task), MethodType(spec.method.type)
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if method == MethodType.QLORA and quantize:
        kwargs["quantization_config"] = _quantization_config(spec)
        kwargs["dtype"] = DTYPES[spec.method.quantization.compute_dtype]
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        if task == Task.CLASSIFICATION:
            labels = label_names or []
            if len(labels) < 2:
                raise UserError("DataInvalid", f"classification needs at least 2 labels, found {labels}")
            model = AutoModelForSequenceClassification.from_pretrained(
                str(model_dir),
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
                **kwargs,
            )
            if model.config.pad_token_id is None:
                # Decoder classifiers pool the last non-pad token, which needs to know the pad id.
                model.config.pad_token_id = pad_token_id
        elif task == Task.SEQ2SEQ:
            model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir), **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc) or "does not support" in str(exc):
            raise UserError(
                "ModelTaskMismatch", f"the model in {model_dir} cannot be used for task {task}: {exc}"
            ) from None
        raise
    except OSError as exc:
        raise UserError("ModelInvalid", f"cannot load the model in {model_dir}: {exc}") from None
    return model


def apply_method(
    model: PreTrainedModel, spec: FineTuneJobSpec, arch: Architecture, gradient_checkpointing: bool
) -> Any:
    """Wrap the model with LoRA adapters (lora, qlora) or leave it as is (full)."""
    method, task = MethodType(spec.method.type), Task(spec.task)
    if method == MethodType.FULL:
        return model
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if method == MethodType.QLORA:
        # Casts norms to fp32 and enables input grads so gradients reach the adapters through 4-bit layers.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        # With frozen embeddings no activation would require grad and checkpointed blocks get no gradient.
        model.enable_input_require_grads()
    task_type = {
        Task.CLASSIFICATION: TaskType.SEQ_CLS,
        Task.SEQ2SEQ: TaskType.SEQ_2_SEQ_LM,
    }.get(task, TaskType.CAUSAL_LM)
    config = LoraConfig(task_type=task_type, **lora_kwargs(spec, arch))
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(
            "InvalidConfig",
            f"method.targetModules {arch.target_modules} do not match the model ({arch.model_type}): {exc}",
        ) from None


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights are packed two per byte, so count them twice."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
