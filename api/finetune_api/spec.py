"""The FineTuneJob spec: one typed model shared by the operator, the trainer and the CRD generator.

YAML uses camelCase (Kubernetes convention), Python uses snake_case. Every field carries a description
because the CRD's openAPIV3Schema is generated from these classes and `kubectl explain` shows it.
Defaults that the platform team owns (image, GPUs, CPU, memory) are ``None`` here and are filled in by the
operator from its policy; training defaults are documented in each description and filled in, with every
cross-field rule, by ``finetune_api.resolve`` (the one place the operator and the trainer both use).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

API_GROUP = "finetune.dev"
API_VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"


class ApiModel(BaseModel):
    """Base for every API object: camelCase aliases, unknown fields rejected (typos are errors)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )

    def dump(self) -> dict[str, Any]:
        """The object as Kubernetes YAML would show it: camelCase keys, unset optionals left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Task(StrEnum):
    CAUSAL_LM = "causal-lm"
    INSTRUCTION = "instruction"
    CHAT = "chat"
    SEQ2SEQ = "seq2seq"
    CLASSIFICATION = "classification"


class MethodType(StrEnum):
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"


class FileFormat(StrEnum):
    AUTO = "auto"
    JSONL = "jsonl"
    JSON = "json"
    CSV = "csv"
    PARQUET = "parquet"
    TXT = "txt"


class SplitStrategy(StrEnum):
    RANDOM = "random"
    STRATIFIED = "stratified"
    TFIDF_CLUSTER = "tfidf-cluster"


class Optimizer(StrEnum):
    ADAMW = "adamw"
    ADAFACTOR = "adafactor"
    SGD = "sgd"
    ADAMW_8BIT = "adamw-8bit"


class Scheduler(StrEnum):
    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant-with-warmup"
    POLYNOMIAL = "polynomial"


class Precision(StrEnum):
    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


Uri = Annotated[
    str,
    Field(
        min_length=1,
        description="A URI: s3://bucket/key, file:///absolute/path (only where the platform allows it: in a "
        "pod it names the pod's own files), or hf://org/name (only on clusters that can reach a model hub). "
        "Path segments . and .. (also percent-encoded), empty segments, ? and # are refused; the platform may "
        "limit the buckets and prefixes a job may use.",
    ),
]


class ModelSpec(ApiModel):
    """The base model to fine-tune."""

    uri: Uri = Field(
        description="Where the base model lives: s3://bucket/prefix/ or file:///path holding a Hugging Face "
        "model directory (config.json, weights, tokenizer files), or hf://org/name where a hub is reachable. "
        "Remote code is never executed (trust_remote_code is always off). The platform's policy may limit the "
        "schemes (file:// is refused on clusters by default) and the locations."
    )
    tokenizer_uri: str | None = Field(
        default=None,
        description="Tokenizer location when it is not stored with the model. Default: model.uri.",
    )


class Fields(ApiModel):
    """Which dataset columns (after `rename`) hold what. Defaults are the conventional column names."""

    text: str = Field(default="text", description="Text column for causal-lm and classification. Default: text.")
    label: str = Field(default="label", description="Label column for classification. Default: label.")
    input: str = Field(default="input", description="Source column for seq2seq. Default: input.")
    target: str = Field(default="target", description="Target column for seq2seq. Default: target.")
    messages: str = Field(
        default="messages",
        description="Column with a list of {role, content} messages for chat. Default: messages.",
    )


class Template(ApiModel):
    """Builds each training sample from dataset fields with {field} placeholders: plain column names only
    (no attribute or index access, positional fields, conversions or format specs); {{ and }} are literal
    braces."""

    prompt: str = Field(
        description='The prompt part, e.g. "### Question:\\n{question}\\n### Answer:\\n". For seq2seq it '
        "builds the model input; for causal-lm the whole text (with response)."
    )
    response: str = Field(
        default="",
        description='The response part, e.g. "{answer}". Used by instruction (and causal-lm) tasks; the '
        "tokenizer's end-of-sequence token is appended.",
    )
    loss_on_response_only: bool = Field(
        default=True,
        description="Instruction tasks only: compute the loss on response tokens only (prompt tokens masked); "
        "false trains on the prompt too. Default: true.",
    )


class Split(ApiModel):
    """How a validation set is carved out of the training file when no validation file is given."""

    validation_ratio: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Fraction of samples held out for validation. Default: 0.1."
    )
    strategy: SplitStrategy = Field(
        default=SplitStrategy.RANDOM,
        description="random; stratified (by label, classification only); tfidf-cluster (stratified by label x "
        "KMeans cluster of TF-IDF vectors of the text, so both sets cover the same topics). Default: random.",
    )
    clusters: int = Field(default=8, ge=2, le=256, description="KMeans clusters for tfidf-cluster. Default: 8.")
    seed: int = Field(default=42, description="Seed that makes the split reproducible. Default: 42.")


class DatasetSpec(ApiModel):
    """Training (and optional validation) data and how to turn rows into samples."""

    train: Uri = Field(description="Training data file (jsonl, json, csv, parquet, or txt: one sample per line).")
    validation: str | None = Field(
        default=None, description="Validation data file. When absent, `split` carves one out of `train`."
    )
    file_format: FileFormat = Field(
        default=FileFormat.AUTO,
        description="File format; auto picks it from the file extension. Default: auto.",
    )
    rename: dict[str, str] = Field(
        default_factory=dict, description="Column renames applied first, old name -> new name."
    )
    drop_columns: list[str] = Field(default_factory=list, description="Columns removed before anything else.")
    fields: Fields = Field(default_factory=Fields, description="Which columns hold text, labels, inputs, targets.")
    template: Template | None = Field(
        default=None,
        description="Sample template. Required for instruction tasks; optional for causal-lm and seq2seq.",
    )
    labels: list[str] | None = Field(
        default=None,
        description="Classification label names in id order. Default: sorted distinct labels of the training set.",
    )
    clean_whitespace: bool = Field(
        default=True,
        description="Strip text fields and collapse runs of spaces and of blank lines (newlines are kept). "
        "Default: true.",
    )
    max_samples: int | None = Field(
        default=None, ge=1, description="Use only the first N training rows (after cleanup). Default: all."
    )
    split: Split = Field(default_factory=Split, description="Validation split when no validation file is given.")


class Quantization(ApiModel):
    """4-bit quantisation of the frozen base model for QLoRA (bitsandbytes; GPU only)."""

    quant_type: str = Field(default="nf4", pattern="^(nf4|fp4)$", description="nf4 or fp4. Default: nf4.")
    double_quant: bool = Field(default=True, description="Quantise the quantisation constants. Default: true.")
    compute_dtype: str = Field(
        default="bf16", pattern="^(bf16|fp16|fp32)$", description="Compute dtype. Default: bf16."
    )


class MethodSpec(ApiModel):
    """Which parameters are trained."""

    type: MethodType = Field(
        default=MethodType.LORA,
        description="full (all weights), lora (low-rank adapters via peft) or qlora (LoRA on a 4-bit base "
        "model; needs a GPU). Default: lora.",
    )
    rank: int = Field(default=8, ge=1, le=1024, description="LoRA rank r (lora/qlora only). Default: 8.")
    alpha: int = Field(default=16, ge=1, description="LoRA alpha, scale = alpha / rank (lora/qlora only). Default: 16.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="LoRA dropout (lora/qlora only). Default: 0.05.")
    target_modules: list[str] | None = Field(
        default=None,
        description='Module names that get adapters, e.g. ["q_proj","v_proj"], or ["all-linear"] '
        "(lora/qlora only). Default: chosen per architecture (config.json's model_type), all-linear when the "
        "architecture is not in the trainer's table.",
    )
    quantization: Quantization = Field(
        default_factory=Quantization, description="QLoRA quantisation settings (qlora only; an error otherwise)."
    )
    merge_adapter: bool = Field(
        default=False,
        description="Also upload the base model with the adapter merged in (lora/qlora only). Default: false.",
    )


class EarlyStopping(ApiModel):
    """Stop when the best-model metric stops improving."""

    patience: int = Field(default=3, ge=1, description="Evaluations without improvement before stopping.")
    threshold: float = Field(default=0.0, ge=0.0, description="Minimum improvement that counts. Default: 0.")


class Hyperparameters(ApiModel):
    """Optimisation settings. Either `epochs` or `maxSteps` bounds training."""

    epochs: float = Field(default=3.0, gt=0, description="Passes over the training set. Default: 3.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Optimizer steps; overrides epochs when set. Default: unset."
    )
    learning_rate: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Peak learning rate. Default: 2e-4 for lora/qlora, 5e-5 for full.",
    )
    batch_size: int = Field(default=8, ge=1, le=4096, description="Per-device train batch size. Default: 8.")
    eval_batch_size: int | None = Field(
        default=None, ge=1, description="Per-device eval batch size. Default: batchSize."
    )
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024, description="Default: 1.")
    max_seq_length: int = Field(
        default=512,
        ge=8,
        le=131072,
        description="Longest tokenised sample; longer ones are truncated. Default: 512.",
    )
    block_size: int | None = Field(
        default=None,
        ge=8,
        le=131072,
        description="Packing block length in tokens; only with packing (for instruction and chat at least "
        "maxSeqLength). Default: maxSeqLength.",
    )
    packing: bool | None = Field(
        default=None,
        description="causal-lm: concatenate all samples and cut blocks of exactly blockSize tokens (samples may "
        "see their predecessors). instruction and chat: put whole samples into rows of at most blockSize tokens, "
        "each sample attending only to itself (position ids restart per sample) with the loss still on its "
        "response/assistant tokens only, so the loss equals unpacked training's; only for architectures that "
        "support it (llama, mistral, mixtral, qwen2, qwen3, gemma, gpt_neox, gpt2; others fail with "
        "PackingUnsupported). Not for seq2seq or classification. Default: true for causal-lm, false otherwise.",
    )
    group_by_length: bool | None = Field(
        default=None,
        description="Without packing, batches are padded to their longest sample: with groupByLength each batch "
        "is drawn from samples of similar token length (shuffled within groups of 50 batches, a new order every "
        "epoch from the seed), so far fewer padding tokens are computed; the loss and the evaluation are the same "
        "(evaluation keeps the data's order). Not with packing (packed rows hold no padding). Default: true "
        "without packing, false with it.",
    )
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1, description="Fraction of steps for warmup. Default: 0.")
    warmup_steps: int = Field(
        default=0, ge=0, description="Warmup steps (set this or warmupRatio, not both). Default: 0."
    )
    weight_decay: float = Field(default=0.0, ge=0, description="Default: 0.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm. Default: 1.")
    optimizer: Optimizer = Field(default=Optimizer.ADAMW, description="adamw, adafactor, sgd, adamw-8bit (GPU).")
    scheduler: Scheduler = Field(default=Scheduler.LINEAR, description="Learning-rate schedule. Default: linear.")
    precision: Precision = Field(
        default=Precision.AUTO,
        description="auto (bf16 on GPUs that support it, else fp32), fp32, fp16, bf16.",
    )
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for memory. Default: false.")
    seed: int = Field(default=42, description="Training seed. Default: 42.")
    logging_steps: int = Field(default=10, ge=1, description="Report loss every N steps. Default: 10.")
    early_stopping: EarlyStopping | None = Field(default=None, description="Enable early stopping.")


class DeepSpeedSpec(ApiModel):
    """DeepSpeed ZeRO; the trainer generates the DeepSpeed config from these settings."""

    stage: int = Field(default=2, ge=0, le=3, description="ZeRO stage 0-3. Default: 2.")
    offload_optimizer: bool = Field(default=False, description="Offload optimizer state to CPU.")
    offload_params: bool = Field(default=False, description="Offload parameters to CPU (stage 3 only).")


class Toleration(ApiModel):
    """A Kubernetes toleration."""

    key: str | None = Field(default=None, description="Taint key.")
    operator: str | None = Field(default=None, pattern="^(Exists|Equal)$", description="Exists or Equal.")
    value: str | None = Field(default=None, description="Taint value.")
    effect: str | None = Field(
        default=None, pattern="^(NoSchedule|PreferNoSchedule|NoExecute)$", description="Taint effect."
    )
    toleration_seconds: int | None = Field(default=None, description="For NoExecute taints.")


Quantity = Annotated[
    str | int,
    Field(
        description="A Kubernetes quantity, e.g. 4, 500m, 16Gi.",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    ),
]


class Resources(ApiModel):
    """What the trainer pod gets. Unset values come from the platform's policy."""

    gpus: int | None = Field(default=None, ge=0, le=64, description="GPUs per pod. Default: platform policy.")
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Pods that train this job together as one gang (torch.distributed across pods: DDP, or "
        "DeepSpeed ZeRO when deepspeed is set), each with `gpus` GPUs, `cpu` and `memory`; the global batch is "
        "batchSize x gradientAccumulationSteps x GPUs per pod (1 on CPU) x workers. Every worker downloads the "
        "model and data; worker 0 reports progress and uploads checkpoints and the model. When any worker fails "
        "the whole gang restarts from the newest checkpoint, as one attempt. Default: 1 (one pod).",
    )
    gpu_type: str | None = Field(
        default=None,
        description="GPU model the preflight planner sizes the job for: memory per GPU, whether it fits, time "
        "and GPU-hours (h200, h100, a100-80gb, a100-40gb, l40s, l4, a10g, t4, v100-32gb, v100-16gb; "
        "docs/planner.md). Default: the platform's gpuType.",
    )
    gpu_resource_name: str | None = Field(
        default=None,
        description="Extended resource name of a GPU, from the platform's allowed list (by default "
        "nvidia.com/gpu and amd.com/gpu; never cpu or memory). Default: platform policy (nvidia.com/gpu).",
    )
    cpu: Quantity | None = Field(default=None, description="CPU request and limit. Default: platform policy.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit. Default: platform policy.")
    ephemeral_storage: Quantity | None = Field(
        default=None, description="Scratch space for the model cache. Default: platform policy."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Node labels the pod must match, added to the platform's own; only the keys and values the "
        "platform's policy allows (none by default).",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        description="Taints the pod tolerates, added to the platform's own; only those the platform's policy "
        "allows (none by default).",
    )

    @field_validator("gpu_type")
    @classmethod
    def _known_gpu_type(cls, value: str | None) -> str | None:
        from finetune_api.plan import GPU_CATALOG  # the catalog lives with the planner, which imports this module

        if value is not None and (value not in GPU_CATALOG or value == "cpu"):
            known = ", ".join(name for name in GPU_CATALOG if name != "cpu")
            raise ValueError(f"unknown GPU type {value!r}; known: {known}")
        return value


class EvaluationSpec(ApiModel):
    """What is measured on the validation set and shown side by side after training."""

    metrics: list[str] | None = Field(
        default=None,
        description="Subset of: loss, perplexity, exact_match, token_f1, bleu, rouge, accuracy, precision, "
        "recall, f1. Default: every metric that applies to the task.",
    )
    sample_prompts: list[str] = Field(
        default_factory=list,
        description="Prompts generated from by the base and the tuned model, reported side by side.",
    )
    max_new_tokens: int = Field(default=64, ge=1, le=4096, description="Generation length. Default: 64.")
    steps: int | None = Field(
        default=None,
        ge=1,
        description="Evaluate every N steps (needs validation data). Default: once per epoch (and at the end).",
    )
    max_samples: int | None = Field(
        default=None,
        ge=1,
        description="Validation rows used for generation metrics and the side-by-side samples. Default: 200.",
    )
    best_model_metric: str | None = Field(
        default=None,
        description="Metric that picks the best checkpoint, loaded at the end, e.g. eval_loss or eval_f1 "
        "(generative tasks: eval_loss or eval_perplexity, the metrics computed during training). Default: "
        "eval_loss with earlyStopping, else unset (the last model is kept).",
    )


class CheckpointSpec(ApiModel):
    """Checkpoints are uploaded to output.uri while training continues; training resumes from the newest."""

    every_steps: int | None = Field(default=None, ge=1, description="Save every N steps. Default: once per epoch.")
    keep: int = Field(default=2, ge=1, le=100, description="How many recent checkpoints are kept. Default: 2.")


class OutputSpec(ApiModel):
    """Where results go: checkpoints/, model/, report/ and manifest.json are written under this prefix."""

    uri: Uri = Field(
        description="Prefix for all outputs, e.g. s3://models/my-job/. Not file:// on clusters unless the "
        "platform allows it (a pod's own files are lost when it ends)."
    )


class SecretKeyRef(ApiModel):
    """A Secret in the job's namespace holding object-store credentials; only referenced, never copied."""

    name: str = Field(min_length=1, description="Secret name (same namespace as the job).")
    access_key_id_key: str = Field(default="AWS_ACCESS_KEY_ID", description="Key of the access key id.")
    secret_access_key_key: str = Field(default="AWS_SECRET_ACCESS_KEY", description="Key of the secret key.")
    session_token_key: str | None = Field(default=None, description="Key of a session token, if any.")


class StorageSpec(ApiModel):
    """How the trainer reaches the object store."""

    secret_ref: SecretKeyRef | None = Field(
        default=None, description="Credentials Secret. Default: the pod's ambient credentials (e.g. IRSA)."
    )
    endpoint: str | None = Field(
        default=None, description="S3 endpoint URL for S3-compatible stores (MinIO, Ceph). Default: AWS."
    )
    region: str | None = Field(default=None, description="Region. Default: us-east-1 or the platform's.")


class RunPolicy(ApiModel):
    """Retries, deadlines and cleanup."""

    backoff_limit: int = Field(
        default=3, ge=0, le=20, description="Retries after a failed attempt; each resumes from a checkpoint."
    )
    active_deadline_seconds: int | None = Field(default=None, ge=1, description="Hard time limit for the job.")
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        description="Delete the workload (not the FineTuneJob) this long after it finishes.",
    )
    suspend: bool = Field(default=False, description="Suspended jobs have no pods; unsuspend to resume.")
    cancel: bool = Field(
        default=False,
        description="Cancel the job for good: its trainer stops (saving a checkpoint first), the job ends as "
        "Cancelled, and its status, checkpoints and outputs stay (`finetune cancel NAME`).",
    )


class WebhookSecretRef(ApiModel):
    """A key of a Secret in the job's namespace that holds the webhook URL (URLs often carry a token)."""

    name: str = Field(min_length=1, description="Secret name (same namespace as the job).")
    key: str = Field(default="url", min_length=1, description="Key holding the URL. Default: url.")


class NotificationSpec(ApiModel):
    """Tell another system when the job ends."""

    webhook: WebhookSecretRef = Field(
        description="POST a JSON document (docs/notifications.md: job, namespace, phase, reason, message, metrics, "
        "output URI) to this URL once when the job reaches Succeeded or Failed, retried with backoff. The URL is "
        "read from the Secret by a short-lived pod, never by the operator."
    )


class FineTuneJobSpec(ApiModel):
    """What to fine-tune, on what data, how, and where the result goes."""

    model: ModelSpec = Field(description="The base model.")
    task: Task = Field(description="causal-lm, instruction, chat, seq2seq or classification.")
    dataset: DatasetSpec = Field(description="Training and validation data.")
    method: MethodSpec = Field(default_factory=MethodSpec, description="full, lora or qlora.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Optimisation.")
    deepspeed: DeepSpeedSpec | None = Field(default=None, description="DeepSpeed ZeRO. Default: off.")
    resources: Resources = Field(default_factory=Resources, description="Pod resources and placement.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Metrics and samples.")
    checkpoints: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpointing.")
    output: OutputSpec = Field(description="Where checkpoints, the model and the report go.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Object-store access.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Retries, deadlines, cleanup.")
    notification: NotificationSpec | None = Field(default=None, description="A webhook called when the job ends.")
    image: str | None = Field(
        default=None,
        description="Trainer image, under one of the platform's allowed image prefixes (matched by whole registry "
        "and path segments) when it sets any. Default: the operator's configured image.",
    )
