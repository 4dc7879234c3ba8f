"""The preflight planner: what a job needs (memory per GPU, FLOPs, time) from its spec and config.json alone.

Pure (pydantic + stdlib). Inputs: the resolved spec, the model's shape (:func:`model_shape`, from config.json:
no weights), the GPU type and count, and optionally the dataset's statistics (the preflight measures them).

Memory per GPU (bytes; P parameters of the model as trained, T of them trainable, n GPUs, ``e`` = bytes of an
activation element: 2 in bf16/fp16, 4 in fp32):

* Weights. The trainer loads weights in fp32 and autocasts (HF Trainer mixed precision): 4P, plus 2 bytes per
  weight used in a matrix multiply (the linears, the LM head, the adapters) for the 16-bit copies autocast makes
  and the backward pass keeps (trainable weights: autocast's cache; frozen ones: saved to compute the input's
  gradient). qlora: 0.5 bytes per weight of the quantised block linears plus their quantisation constants
  (blocks of 64: one fp32 absmax per block, or with doubleQuant an 8-bit absmax plus one fp32 constant per 256
  blocks), the rest (embeddings, norms, head) upcast to fp32 by peft's prepare_model_for_kbit_training, the
  adapters fp32 (bitsandbytes keeps the 4-bit weights for the backward pass, so only the head and adapters get
  16-bit copies). DeepSpeed in bf16/fp16 casts the model to 16 bits: 2P (ZeRO-3: 2P/n, offloadParams: 0; plus
  the gathered weights of the running and the prefetched block, or of the embedding when larger).
* Gradients: 4T (DeepSpeed 16-bit: 2T; ZeRO-2/3: /n). Plain multi-GPU DDP keeps a second copy in its buckets.
* Optimizer states per trainable parameter: adamw 8 bytes (two fp32 moments), adamw-8bit 2, sgd 0 (no
  momentum), adafactor 4 x (rows + cols) per matrix (factored second moment) and 4 per vector. DeepSpeed in
  16-bit adds the fp32 master copy (4T). ZeRO-1/2/3 divide by n; offloadOptimizer moves them to host memory.
* Activations: the tensors autograd saves during one forward of a full batch (batchSize x maxSeqLength tokens,
  blockSize with packing): Korthikanti et al.'s per-layer accounting redone tensor by tensor for each
  architecture family as the Hugging Face implementations run it (``finetune_api.activations`` states the
  rules), plus the fp32 log-softmax over the vocabulary per target token. Gradient checkpointing keeps each
  block's input plus one block being recomputed. Worked example, a Llama block (hidden h, intermediate I, a
  heads) in full bf16 fine-tuning under autocast, per token: 34h + 8I + 4a + 8 bytes (fp32 norm inputs and
  normalised tensors 16h; 16-bit input copies for q, k, v, gate and up 10h; q, k, v and the attention output
  8h; SwiGLU's gate, silu and up and the down projection's input 8I; the log-sum-exp 4a; norm statistics 8),
  where Korthikanti's GPT-3 count in pure 16 bits is 34h + 5as (GELU MLP of 4h, eager attention).
* Overhead: 1 GiB per GPU for the CUDA context, cuBLAS workspaces and allocator slack, plus 5% of the rest for
  fragmentation (CPU jobs: 1 GiB for the interpreter and libraries). Not measured on CPU; stated.

FLOPs per token (N = weights used in matrix multiplies, including the LM head even when tied; s the sequence
length; L blocks of a heads x head_dim attention): full training 6N + 12 L s a d (PaLM's formula); LoRA 4N +
12 L s a d + 6 N_lora (no weight gradients for frozen weights); gradient checkpointing adds one more forward
(2N + 4 L s a d). Time = total FLOPs / (GPUs x peak x utilisation), peak the GPU's dense 16-bit tensor peak
(fp32 peak for fp32 training), utilisation DEFAULT_UTILISATION unless given.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import Field

from finetune_api import activations as acts
from finetune_api import architectures as archs
from finetune_api.spec import ApiModel, DeepSpeedSpec, FineTuneJobSpec, MethodType, Optimizer, Precision, Task

GIB = 1024**3
DEFAULT_UTILISATION: float = 0.4
GPU_OVERHEAD_GIB = 1.0
FRAGMENTATION = 0.05
CPU_OVERHEAD_GIB = 1.0
QUANT_BLOCK = 64  # bitsandbytes 4-bit block size
DOUBLE_QUANT_BLOCK = 256


class PlanError(ValueError):
    """The planner cannot size this job: an unknown architecture shape or GPU type."""


class GpuType(ApiModel):
    """A GPU model: memory as nvidia-smi reports it, dense (non-sparse) peak throughput."""

    name: str
    memory_gib: float
    peak_tflops_bf16: float = Field(description="Dense 16-bit tensor peak (fp16 where bf16 is not supported).")
    peak_tflops_fp32: float = Field(description="Dense fp32 peak (no TF32).")
    bf16: bool


def _gpu(name: str, mem: float, tf16: float, tf32: float, bf16: bool = True) -> tuple[str, GpuType]:
    return name, GpuType(name=name, memory_gib=mem, peak_tflops_bf16=tf16, peak_tflops_fp32=tf32, bf16=bf16)


GPU_CATALOG: dict[str, GpuType] = dict(
    [
        _gpu("h200", 140.0, 989.0, 67.0),
        _gpu("h100", 79.6, 989.0, 67.0),
        _gpu("a100-80gb", 80.0, 312.0, 19.5),
        _gpu("a100-40gb", 40.0, 312.0, 19.5),
        _gpu("l40s", 45.0, 362.0, 91.6),
        _gpu("l4", 22.5, 121.0, 30.3),
        _gpu("a10g", 22.5, 70.0, 31.2),
        _gpu("t4", 15.0, 65.0, 8.1, bf16=False),
        _gpu("v100-32gb", 32.0, 125.0, 15.7, bf16=False),
        _gpu("v100-16gb", 16.0, 125.0, 15.7, bf16=False),
        _gpu("cpu", 16.0, 0.5, 0.5, bf16=False),
    ]
)


def gpu_type(name: str) -> GpuType:
    """The catalog entry for ``name``; PlanError listing the known names."""
    if name not in GPU_CATALOG:
        raise PlanError(f"unknown GPU type {name!r}; known: {', '.join(GPU_CATALOG)}")
    return GPU_CATALOG[name]


class LinearShape(ApiModel):
    """``count`` linear layers called ``name`` (peft's module name), fan_in -> fan_out."""

    name: str
    fan_in: int
    fan_out: int
    bias: bool
    count: int


class ModelShape(ApiModel):
    """The model as config.json describes it (the generative model; encoder-only: base model with pooler)."""

    model_type: str
    parameters: int
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int | None
    encoder_decoder: bool
    tied_embeddings: bool
    head_dim: int = 0
    linears: list[LinearShape] = []
    embedding_parameters: int = 0
    lm_head_parameters: int = 0
    matrices: list[tuple[int, int]] = []  # 2-D weights outside the linears (embeddings, tables, untied head)
    cross_attention_layers: int = 0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    gated_mlp: bool = False


def model_shape(config: dict[str, Any]) -> ModelShape:
    """The shape of the model a config.json describes (no weights); PlanError for an unknown architecture."""
    try:
        lay = archs.layout(config)
    except archs.ArchitectureError as exc:
        raise PlanError(str(exc)) from None
    dropout, attention_dropout = archs.dropouts(config)
    return ModelShape(
        model_type=lay.model_type,
        parameters=lay.parameters,
        layers=lay.layers,
        hidden_size=lay.hidden,
        heads=lay.heads,
        kv_heads=lay.kv_heads,
        intermediate_size=lay.intermediate,
        vocab_size=lay.vocab,
        max_positions=lay.max_positions,
        encoder_decoder=lay.encoder_decoder,
        tied_embeddings=lay.tied,
        head_dim=lay.head_dim,
        linears=[
            LinearShape(name=x.name, fan_in=x.fan_in, fan_out=x.fan_out, bias=x.bias, count=x.count)
            for x in lay.linears
        ],
        embedding_parameters=lay.embedding,
        lm_head_parameters=lay.lm_head,
        matrices=list(lay.matrices),
        cross_attention_layers=lay.cross_attention_layers,
        dropout=dropout,
        attention_dropout=attention_dropout,
        gated_mlp=lay.model_type == "t5" and str(config.get("feed_forward_proj", "relu")).startswith("gated-"),
    )


class DataStats(ApiModel):
    """What the preflight measured of the training data (after the trainer's own preparation)."""

    samples: int
    tokens: int
    mean_length: float
    p50_length: int
    p95_length: int
    max_length: int
    truncated: int
    labels: list[str] | None = None


class MemoryBreakdown(ApiModel):
    """Memory per GPU, GiB (docs/planner.md)."""

    weights_gib: float = Field(description="Model weights (4-bit and constants for qlora; a shard with ZeRO-3).")
    gradients_gib: float = Field(description="Gradients of the trainable weights.")
    optimizer_gib: float = Field(description="Optimizer states (and DeepSpeed's fp32 master weights).")
    activations_gib: float = Field(description="Tensors saved for the backward pass of one full batch.")
    overhead_gib: float = Field(description="CUDA context, workspaces and allocator fragmentation (stated).")
    total_gib: float = Field(description="The sum: what one GPU must hold.")


class Estimate(ApiModel):
    """The planner's estimate for one job on one GPU type (compact: it travels in a termination message)."""

    parameters: int = Field(description="Parameters of the model as trained (adapters and heads included).")
    trainable_parameters: int = Field(description="Parameters that get gradients.")
    gpu_type: str = Field(description="The GPU type the job was sized for (cpu: a job without GPUs).")
    gpus: int = Field(description="GPUs per pod x pods.")
    memory: MemoryBreakdown = Field(description="Memory per GPU.")
    gpu_memory_gib: float = Field(description="Memory of one GPU of this type (a CPU job: its memory).")
    fits: bool = Field(description="Whether memory.totalGib fits gpuMemoryGib.")
    dataset_tokens: int | None = Field(default=None, description="Training tokens per epoch.")
    steps: int | None = Field(default=None, description="Optimizer steps.")
    tokens_per_step: int = Field(description="Tokens per optimizer step across all GPUs.")
    flops_per_token: float = Field(description="Training FLOPs per token (forward, backward, recomputation).")
    total_flops: float | None = Field(default=None, description="FLOPs of the whole training run.")
    utilisation: float = Field(description="The model FLOPs utilisation assumed for the time estimate.")
    hours: float | None = Field(default=None, description="Wall-clock hours of training at that utilisation.")
    gpu_hours: float | None = Field(default=None, description="hours x gpus.")
    fixes: list[str] = Field(
        default_factory=list,
        description="When it does not fit: spec changes that make it fit, cheapest first, each with its memory.",
    )
    summary: str = Field(description="One line: the verdict, memory per GPU and GPU-hours.")


# ---- counting ----------------------------------------------------------------------------------------------


def _layout(shape: ModelShape) -> list[archs.Linear]:
    return [archs.Linear(x.name, x.fan_in, x.fan_out, x.bias, x.count) for x in shape.linears]


def lora_targets(spec: FineTuneJobSpec, model_type: str) -> list[str] | str:
    """The LoRA target modules: the spec's, else the architecture's (the trainer's own rule)."""
    chosen = spec.method.target_modules
    if chosen:
        return "all-linear" if chosen == ["all-linear"] else list(chosen)
    return archs.default_targets(model_type)


def num_labels(spec: FineTuneJobSpec, data: DataStats | None) -> int:
    labels = (data.labels if data else None) or spec.dataset.labels
    return max(len(labels), 2) if labels else 2


def parameter_counts(spec: FineTuneJobSpec, shape: ModelShape, data: DataStats | None = None) -> tuple[int, int]:
    """(parameters, trainable) of the model the trainer builds for this spec."""
    total = shape.parameters
    head = 0
    if spec.task == Task.CLASSIFICATION:
        head = archs.classifier_head(shape.model_type, shape.hidden_size, num_labels(spec, data))
        total += head - (shape.lm_head_parameters if not archs.is_encoder_only(shape.model_type) else 0)
    if spec.method.type == MethodType.FULL:
        return total, total
    lora = archs.lora_parameters(_layout(shape), lora_targets(spec, shape.model_type), spec.method.rank)
    # peft's modules_to_save trains a copy of the classification head next to the frozen original.
    return total + lora + head, lora + head


# ---- memory ------------------------------------------------------------------------------------------------


def resolved_precision(spec: FineTuneJobSpec, gpu: GpuType, gpus: int) -> str:
    """The trainer's rule: auto is bf16 on a GPU that supports it, else fp32."""
    p = Precision(spec.hyperparameters.precision)
    if p == Precision.AUTO:
        return "bf16" if gpus > 0 and gpu.bf16 else "fp32"
    return str(p)


def _optimizer_bytes(spec: FineTuneJobSpec, shape: ModelShape, trainable: int, data: DataStats | None) -> float:
    opt = Optimizer(spec.hyperparameters.optimizer)
    if opt == Optimizer.ADAMW:
        return 8.0 * trainable
    if opt == Optimizer.ADAMW_8BIT:
        return 2.0 * trainable * (1 + 4 / 2048)  # two 8-bit moments + one fp32 absmax per 2048-block each
    if opt == Optimizer.SGD:
        return 0.0
    # adafactor (no first moment): a factored second moment, rows + cols fp32 values per matrix; vectors in full.
    linears = [(x.fan_in, x.fan_out, x.count) for x in shape.linears]
    head = []
    if spec.task == Task.CLASSIFICATION:
        head = archs.classifier_matrices(shape.model_type, shape.hidden_size, num_labels(spec, data))
    if spec.method.type == MethodType.FULL:
        tables = list(shape.matrices) + head
        if spec.task == Task.CLASSIFICATION and shape.lm_head_parameters:
            tables.remove((shape.vocab_size, shape.hidden_size))  # the classifier replaces the LM head
        if spec.task == Task.CLASSIFICATION and shape.model_type == "roberta":
            tables.remove((shape.hidden_size, shape.hidden_size))  # its dense replaces the pooler (a linear)
    else:
        chosen = lora_targets(spec, shape.model_type)
        r = spec.method.rank
        picked = [
            (i, o, n)
            for (i, o, n), x in zip(linears, shape.linears, strict=True)
            if chosen == "all-linear" or x.name in chosen
        ]
        linears = [(i, r, n) for i, _, n in picked] + [(r, o, n) for _, o, n in picked]  # A and B
        tables = head  # trained in full next to the adapters
    factored = sum((i + o) * n for i, o, n in linears) + sum(rows + cols for rows, cols in tables)
    matrix_weights = sum(i * o * n for i, o, n in linears) + sum(rows * cols for rows, cols in tables)
    return 4.0 * (factored + max(trainable - matrix_weights, 0))  # biases, norms, heads: in full


def _quantised_bytes(spec: FineTuneJobSpec, shape: ModelShape) -> tuple[float, int]:
    """Bytes of the 4-bit block linears with their constants, and how many weights they hold."""
    q = sum(x.fan_in * x.fan_out * x.count for x in shape.linears)
    if spec.method.quantization.double_quant:
        consts = q / QUANT_BLOCK * 1 + q / (QUANT_BLOCK * DOUBLE_QUANT_BLOCK) * 4
    else:
        consts = q / QUANT_BLOCK * 4
    return 0.5 * q + consts, q


def activation_bytes(spec: FineTuneJobSpec, shape: ModelShape, gpus: int, mixed: bool, deepspeed: bool) -> float:
    """Saved-for-backward bytes of one full batch (``finetune_api.activations``); ``deepspeed``: the model itself
    is cast to 16 bits (no autocast)."""
    hp = spec.hyperparameters
    seq = sequence_length(spec)
    full = spec.method.type == MethodType.FULL
    targets = None if full else lora_targets(spec, shape.model_type)
    ctx = acts.Context(
        hidden=shape.hidden_size,
        inter=shape.intermediate_size,
        heads=shape.heads,
        vocab=shape.vocab_size,
        seq=seq,
        tokens=hp.batch_size * seq,
        full=full,
        targets=None if targets is None or targets == "all-linear" else frozenset(targets),
        rank=spec.method.rank,
        lora_dropout=spec.method.dropout,
        hidden_dropout=shape.dropout,
        attention_dropout=shape.attention_dropout,
        gpu=gpus > 0,
        e=2 if mixed else 4,
        autocast=mixed and (not deepspeed or spec.method.type == MethodType.QLORA),
        lm_loss=spec.task != Task.CLASSIFICATION,
        gated_mlp=shape.gated_mlp,
    )
    return acts.activation_bytes(
        shape.model_type, ctx, shape.layers, shape.cross_attention_layers, hp.gradient_checkpointing
    )


def sequence_length(spec: FineTuneJobSpec) -> int:
    hp = spec.hyperparameters
    return (hp.block_size or hp.max_seq_length) if hp.packing else hp.max_seq_length


def memory_bytes(
    spec: FineTuneJobSpec, shape: ModelShape, gpu: GpuType, gpus: int, data: DataStats | None = None
) -> dict[str, float]:
    """Bytes per GPU by component (weights, gradients, optimizer, activations, overhead, total); the formulas
    are in the module docstring."""
    total, trainable = parameter_counts(spec, shape, data)
    precision = resolved_precision(spec, gpu, gpus)
    mixed = precision != "fp32"
    method = MethodType(spec.method.type)
    ds: DeepSpeedSpec | None = spec.deepspeed if gpus > 0 else None
    n = max(gpus, 1)
    stage = ds.stage if ds else 0
    head = shape.vocab_size * shape.hidden_size if spec.task != Task.CLASSIFICATION else 0
    lora = 0 if method == MethodType.FULL else trainable
    if method == MethodType.QLORA:
        qbytes, qcount = _quantised_bytes(spec, shape)
        weights = qbytes + 4.0 * (total - trainable - qcount) + 4.0 * trainable
        copies = head + lora  # bitsandbytes saves the 4-bit weights themselves for the backward pass
    elif ds and mixed:
        weights = 2.0 * total / (n if stage == 3 else 1)
        copies = 0
    else:
        weights = 4.0 * total / (n if ds and stage == 3 else 1)
        copies = sum(x.fan_in * x.fan_out * x.count for x in shape.linears) + head + lora
        if method == MethodType.LORA:
            stacks = 2 if shape.cross_attention_layers else 1
            copies -= acts.frozen_without_grad(
                shape.model_type, [(x.name, x.fan_in, x.fan_out) for x in shape.linears], stacks
            )
    if mixed and (not ds or method == MethodType.QLORA):
        # Autocast's 16-bit copies of the fp32 weights each matmul uses, kept for the backward pass.
        weights += 2.0 * copies
    if ds and ds.offload_params:
        weights = 0.0
    if ds and stage == 3:
        # ZeRO-3 gathers each block's (and the embedding's) full weights while it runs, and prefetches the next.
        block = sum(x.fan_in * x.fan_out * x.count for x in shape.linears) / max(shape.layers, 1)
        weights += 2 * (2.0 if mixed else 4.0) * max(block, shape.vocab_size * shape.hidden_size)
    grads = (2.0 if ds and mixed else 4.0) * trainable / (n if stage >= 2 else 1)
    if not ds and gpus > 1:
        grads *= 2  # DDP's gradient buckets
    opt = _optimizer_bytes(spec, shape, trainable, data) + (4.0 * trainable if ds and mixed else 0.0)
    opt /= n if stage >= 1 else 1
    if ds and ds.offload_optimizer:
        opt = 0.0
    activations = activation_bytes(spec, shape, gpus, mixed, ds is not None)
    base = weights + grads + opt + activations
    overhead = (GPU_OVERHEAD_GIB * GIB + FRAGMENTATION * base) if gpus > 0 else CPU_OVERHEAD_GIB * GIB
    return {
        "weights": weights,
        "gradients": grads,
        "optimizer": opt,
        "activations": activations,
        "overhead": overhead,
        "total": base + overhead,
    }


def memory(
    spec: FineTuneJobSpec, shape: ModelShape, gpu: GpuType, gpus: int, data: DataStats | None = None
) -> MemoryBreakdown:
    """Memory per GPU in GiB (:func:`memory_bytes`)."""
    b = memory_bytes(spec, shape, gpu, gpus, data)
    return MemoryBreakdown(**{f"{key}_gib": _gib(value) for key, value in b.items()})


def _sig(x: float) -> float:
    """Four significant digits: enough for a plan, short in JSON."""
    return float(f"{x:.4g}")


def _gib(b: float) -> float:
    return round(b / GIB, 3)


# ---- FLOPs and time ----------------------------------------------------------------------------------------


def flops_per_token(spec: FineTuneJobSpec, shape: ModelShape, seq: int, data: DataStats | None = None) -> float:
    """Training FLOPs per token (module docstring)."""
    n_mm = sum(x.fan_in * x.fan_out * x.count for x in shape.linears)
    if spec.task != Task.CLASSIFICATION:
        n_mm += shape.vocab_size * shape.hidden_size
    attn = 4.0 * shape.layers * seq * shape.heads * shape.head_dim  # forward QK^T and AV
    if spec.method.type == MethodType.FULL:
        f = 6.0 * n_mm + 3 * attn
    else:
        _, trainable = parameter_counts(spec, shape, data)
        f = 4.0 * n_mm + 3 * attn + 6.0 * trainable
    if spec.hyperparameters.gradient_checkpointing:
        f += 2.0 * n_mm + attn
    return f


def _steps(spec: FineTuneJobSpec, data: DataStats | None, dp: int) -> int | None:
    hp = spec.hyperparameters
    if hp.max_steps:
        return hp.max_steps
    if data is None:
        return None
    rows = math.ceil(data.tokens / sequence_length(spec)) if hp.packing else data.samples
    per_epoch = max(math.ceil(rows / (hp.batch_size * dp)) // hp.gradient_accumulation_steps, 1)
    return math.ceil(hp.epochs * per_epoch)


def _peak_tflops(gpu: GpuType, precision: str) -> float:
    return gpu.peak_tflops_fp32 if precision == "fp32" else gpu.peak_tflops_bf16


# ---- estimate and fixes ------------------------------------------------------------------------------------


_QUANTITY = re.compile(r"^([0-9.]+)\s*([KMGTPE]i?)?$")
_UNITS = {
    "": 1,
    "K": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def _quantity_gib(value: str | int | None) -> float | None:
    if value is None:
        return None
    m = _QUANTITY.match(str(value).strip())
    if not m:
        return None
    return float(m.group(1)) * _UNITS[m.group(2) or ""] / GIB


def _with(spec: FineTuneJobSpec, changes: dict[str, Any]) -> FineTuneJobSpec:
    """A copy of ``spec`` with dotted snake_case fields changed (e.g. {"method.type": "lora"})."""
    data = spec.model_dump()
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
        node[last] = value
    return FineTuneJobSpec.model_validate(data)


Change = tuple[dict[str, Any], str]  # spec changes (snake_case paths), and how the tenant writes them
MAX_FIXES = 3
_ZERO3: dict[str, Any] = {"deepspeed": {"stage": 3, "offload_optimizer": False, "offload_params": False}}


def _levers(spec: FineTuneJobSpec, gpus: int) -> list[list[Change]]:
    """The memory levers that apply, alone and combined with gradient checkpointing, in the order they are
    preferred: switching to adapters keeps the GPUs and nearly halves the compute; ZeRO-3 shards what the GPUs
    already hold; gradient checkpointing costs a third more compute; more GPUs cost money; a smaller batch or
    shorter sequences change the training itself."""
    method, hp = MethodType(spec.method.type), spec.hyperparameters
    lora: Change = ({"method.type": "lora"}, "method.type: lora")
    qlora: Change = ({"method.type": "qlora", "deepspeed": None}, "method.type: qlora")
    zero3: Change = (_ZERO3, "deepspeed.stage: 3")
    ckpt: Change = ({"hyperparameters.gradient_checkpointing": True}, "hyperparameters.gradientCheckpointing: true")
    singles: list[Change] = []
    if method == MethodType.FULL:
        singles.append(lora)
    if method != MethodType.QLORA and gpus > 0:
        singles.append(qlora)
    if gpus > 1 and method != MethodType.QLORA and (spec.deepspeed is None or spec.deepspeed.stage < 3):
        singles.append(zero3)
    bases: list[list[Change]] = [[]] + [[c] for c in singles]
    if not hp.gradient_checkpointing:
        bases += [[ckpt]] + [[c, ckpt] for c in singles]
    return bases


def _search(spec: FineTuneJobSpec, base: list[Change], gpus: int) -> list[tuple[str, list[Change], int]]:
    """Candidates built on ``base`` (lever kind, changes, GPUs): as it is, with more GPUs (ZeRO-3), a smaller
    batch, shorter sequences; the mildest setting of each lever first."""
    out: list[tuple[str, list[Change], int]] = [("alone", base, gpus)] if base else []
    hp = spec.hyperparameters
    qlora = spec.method.type == MethodType.QLORA or any(c[0].get("method.type") == "qlora" for c in base)
    if gpus > 0 and not qlora and not any(c[0] is _ZERO3 for c in base):
        for more in (2, 4, 8, 16, 32, 64):
            if more > gpus:
                wider: Change = ({**_ZERO3, "resources.gpus": more}, f"resources.gpus: {more}, deepspeed.stage: 3")
                out.append(("gpus", [*base, wider], more))
    b = hp.batch_size
    while b > 1:
        b //= 2
        ga = hp.gradient_accumulation_steps * hp.batch_size // b
        batch: dict[str, Any] = {"hyperparameters.batch_size": b, "hyperparameters.gradient_accumulation_steps": ga}
        out.append(
            ("batch", [*base, (batch, f"hyperparameters.batchSize: {b}, gradientAccumulationSteps: {ga}")], gpus)
        )
    seq = hp.max_seq_length
    while seq > 128:
        seq //= 2
        shorter: dict[str, Any] = {"hyperparameters.max_seq_length": seq, "hyperparameters.block_size": None}
        out.append(("seq", [*base, (shorter, f"hyperparameters.maxSeqLength: {seq}")], gpus))
    return out


# The levers from the cheapest (see _levers). A fix ranks by the most expensive lever it pulls, then by how many
# it pulls, then by the mildest setting (fewest extra GPUs, the largest batch, the longest sequences).
PREFERENCE = (
    "method.type: lora",
    "method.type: qlora",
    "deepspeed.stage: 3",
    "hyperparameters.gradientCheckpointing",
    "resources.gpus",
    "hyperparameters.batchSize",
    "hyperparameters.maxSeqLength",
)


def _preference(label: str) -> int:
    return next(i for i, prefix in enumerate(PREFERENCE) if label.startswith(prefix))


def fixes(
    spec: FineTuneJobSpec, shape: ModelShape, gpu: GpuType, gpus: int, data: DataStats | None = None
) -> list[str]:
    """Up to MAX_FIXES spec changes that make the job fit, cheapest first (PREFERENCE), each with its
    re-estimated memory per GPU. Empty when nothing tried fits."""
    found: list[tuple[tuple[int, int, tuple[int, ...], int], str]] = []
    done: set[tuple[int, str]] = set()
    for rank, base in enumerate(_levers(spec, gpus)):
        for order, (kind, changes, n) in enumerate(_search(spec, base, gpus)):
            if (rank, kind) in done:
                continue  # a milder setting of this lever already fits
            merged: dict[str, Any] = {}
            for change, _ in changes:
                merged.update(change)
            try:
                changed = _with(spec, merged)
            except ValueError:
                continue
            total = memory_bytes(changed, shape, gpu, n, data)["total"] / GIB
            if total <= gpu.memory_gib:
                done.add((rank, kind))
                label = ", ".join(label for _, label in changes)
                levers = tuple(sorted(_preference(text) for _, text in changes))
                found.append(((max(levers), len(changes), levers, order), f"{label} -> {total:.1f} GiB per GPU"))
    found.sort()
    kept: list[tuple[set[int], str]] = []
    for (_, _, levers, _), text in found:
        if not any(pulled <= set(levers) for pulled, _ in kept):  # a cheaper fix pulls a subset already
            kept.append((set(levers), text))
    return [text for _, text in kept[:MAX_FIXES]]


def estimate(
    spec: FineTuneJobSpec,
    shape: ModelShape,
    gpu: GpuType,
    gpus: int,
    data: DataStats | None = None,
    utilisation: float = DEFAULT_UTILISATION,
) -> Estimate:
    """The planner's estimate for a resolved spec on ``gpus`` GPUs of type ``gpu`` (0: a CPU job)."""
    if gpus == 0:
        mem_gib = _quantity_gib(spec.resources.memory)
        gpu = gpu.model_copy(update={"memory_gib": round(mem_gib, 3)}) if mem_gib else gpu
    total, trainable = parameter_counts(spec, shape, data)
    mem = memory(spec, shape, gpu, gpus, data)
    fits = mem.total_gib <= gpu.memory_gib
    hp = spec.hyperparameters
    dp = max(gpus, 1)
    seq = sequence_length(spec)
    if data is not None and not hp.packing:
        seq = max(1, min(seq, round(data.mean_length)))
    tokens_per_step = hp.batch_size * hp.gradient_accumulation_steps * dp * seq
    fpt = flops_per_token(spec, shape, seq, data)
    steps = _steps(spec, data, dp)
    total_flops: float | None = None
    if hp.max_steps:
        total_flops = fpt * tokens_per_step * hp.max_steps
    elif data is not None:
        total_flops = fpt * data.tokens * hp.epochs
    precision = resolved_precision(spec, gpu, gpus)
    hours = gpu_hours = None
    if total_flops is not None:
        seconds = total_flops / (dp * _peak_tflops(gpu, precision) * 1e12 * utilisation)
        hours = _sig(seconds / 3600)
        gpu_hours = _sig(seconds / 3600 * dp)
    found = [] if fits else fixes(spec, shape, gpu, gpus, data)
    where = f"{mem.total_gib:.1f} of {gpu.memory_gib:g} GiB per {gpu.name}"
    if fits:
        cost = f"; {gpu_hours:.2f} GPU-hours at {utilisation:.0%} MFU" if gpu_hours is not None else ""
        summary = f"fits: {where}{cost}"
    else:
        summary = f"does not fit: {where}" + (
            f"; cheapest fix: {found[0]}" if found else "; none of the planner's fixes fits (docs/planner.md)"
        )
    return Estimate(
        parameters=total,
        trainable_parameters=trainable,
        gpu_type=gpu.name,
        gpus=gpus,
        memory=mem,
        gpu_memory_gib=gpu.memory_gib,
        fits=fits,
        dataset_tokens=data.tokens if data else None,
        steps=steps,
        tokens_per_step=tokens_per_step,
        flops_per_token=_sig(fpt),
        total_flops=_sig(total_flops) if total_flops is not None else None,
        utilisation=utilisation,
        hours=hours,
        gpu_hours=gpu_hours,
        fixes=found,
        summary=summary,
    )


def gpu_for(spec: FineTuneJobSpec, name: str | None = None) -> GpuType:
    """The GPU type a job is sized for: ``name`` (an override), else resources.gpuType, else h100 (cpu for a
    job without GPUs)."""
    chosen = name or spec.resources.gpu_type or ("h100" if spec.resources.gpus else "cpu")
    return gpu_type(chosen)
