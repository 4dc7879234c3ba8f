"""Architecture facts by ``config.json``'s ``model_type``: the one home of the per-architecture tables.

* :data:`TARGET_MODULES`, :data:`CLASSIFIER_HEADS`, :data:`DECODER_HEAD`, :data:`PACKING_MODEL_TYPES`: what the
  trainer looks up (``finetune_trainer.config.architecture`` imports them from here) and what the planner counts.
* :func:`layout`: the model's weights from its config alone (no weights, no torch): every linear layer with its
  peft module name, fan-in and fan-out, and the other parameters (embeddings, norms, position tables). The
  planner counts parameters, LoRA parameters (rank x (in + out) per targeted linear) and matmul FLOPs from it.

Pure: stdlib only. Missing config keys take the default of the transformers config class (a config.json written
by ``save_pretrained`` leaves out values equal to the defaults).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# LoRA target modules per `config.model_type`. Attention projections are the usual choice; for the
# Llama family the MLP projections too (the QLoRA paper's "all linear layers" setting).
TARGET_MODULES: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "opt": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
}

# The freshly initialised classification head must be trained (and saved) in full next to the adapters.
CLASSIFIER_HEADS: dict[str, list[str]] = {
    "bert": ["classifier"],
    "roberta": ["classifier"],
    "xlm-roberta": ["classifier"],
    "distilbert": ["pre_classifier", "classifier"],
    "deberta-v2": ["pooler", "classifier"],
}
DECODER_HEAD = ["score"]  # *ForSequenceClassification of decoder-only models

# Architectures whose attention honours position ids that restart inside a row (packed samples attend only to
# themselves, exactly as if each were its own row). tests/trainer/test_packing.py checks every one on a tiny
# model: per-sample losses packed == unpacked. Not here (they cannot): bloom (ALiBi from the attention mask),
# opt (positions from the attention mask).
PACKING_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gpt_neox", "gpt2"})


class ArchitectureError(ValueError):
    """config.json describes a model this module cannot size."""


@dataclass(frozen=True)
class Linear:
    """``count`` linear layers named ``name`` (the last component of the module path, as peft matches it)."""

    name: str
    fan_in: int
    fan_out: int
    bias: bool
    count: int

    @property
    def parameters(self) -> int:
        return self.count * (self.fan_in * self.fan_out + (self.fan_out if self.bias else 0))


@dataclass(frozen=True)
class Layout:
    """Every weight of the model the trainer builds for a generative task (an encoder-only model: its base
    model with pooler, what sequence classification builds on)."""

    model_type: str
    hidden: int
    layers: int  # transformer blocks (encoder + decoder)
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int | None
    encoder_decoder: bool
    tied: bool
    linears: list[Linear]  # inside the blocks (and pooler); LoRA targets
    embedding: int  # input embedding (and position/type tables): lookups, no matmul FLOPs
    other: int  # norms, biases outside linears, relative position tables
    lm_head: int  # untied output head parameters (0 when tied to the input embedding)
    tables: tuple[tuple[int, int], ...] = ()  # 2-D weights outside the linears: embeddings, position tables
    cross_attention_layers: int = 0  # decoder blocks attending to the encoder

    @property
    def parameters(self) -> int:
        return sum(lin.parameters for lin in self.linears) + self.embedding + self.other + self.lm_head

    @property
    def matrices(self) -> tuple[tuple[int, int], ...]:
        """Every 2-D weight outside the linears, the untied LM head included."""
        return self.tables + (((self.vocab, self.hidden),) if self.lm_head else ())


def _get(config: dict[str, Any], defaults: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    for key in keys:
        if defaults.get(key) is not None:
            return defaults[key]
    return None


def _int(config: dict[str, Any], defaults: dict[str, Any], *keys: str) -> int:
    value = _get(config, defaults, *keys)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ArchitectureError(f"config.json has no usable {keys[0]} ({value!r})")
    return value


def _gpt2(c: dict[str, Any]) -> Layout:
    d = {"vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}
    h, n, a = _int(c, d, "n_embd"), _int(c, d, "n_layer"), _int(c, d, "n_head")
    v, p = _int(c, d, "vocab_size"), _int(c, d, "n_positions")
    inner = _get(c, {}, "n_inner") or 4 * h
    lins = [
        Linear("c_attn", h, 3 * h, True, n),
        Linear("c_proj", h, h, True, n),
        Linear("c_fc", h, inner, True, n),
        Linear("c_proj", inner, h, True, n),
    ]
    tied = bool(_get(c, {"tie_word_embeddings": True}, "tie_word_embeddings"))
    norms = (2 * n + 1) * 2 * h
    return Layout(
        "gpt2",
        h,
        n,
        a,
        a,
        h // a,
        inner,
        v,
        p,
        False,
        tied,
        lins,
        v * h + p * h,
        norms,
        0 if tied else v * h,
        tables=((v, h), (p, h)),
    )


def _bloom(c: dict[str, Any]) -> Layout:
    d = {"vocab_size": 250880, "hidden_size": 64, "n_layer": 2, "n_head": 8}
    h, n, a, v = (
        _int(c, d, "hidden_size", "n_embed"),
        _int(c, d, "n_layer"),
        _int(c, d, "n_head"),
        _int(c, d, "vocab_size"),
    )
    lins = [
        Linear("query_key_value", h, 3 * h, True, n),
        Linear("dense", h, h, True, n),
        Linear("dense_h_to_4h", h, 4 * h, True, n),
        Linear("dense_4h_to_h", 4 * h, h, True, n),
    ]
    tied = bool(_get(c, {"tie_word_embeddings": True}, "tie_word_embeddings"))
    norms = (2 * n + 2) * 2 * h
    return Layout(
        "bloom",
        h,
        n,
        a,
        a,
        h // a,
        4 * h,
        v,
        None,
        False,
        tied,
        lins,
        v * h,
        norms,
        0 if tied else v * h,
        tables=((v, h),),
    )


def _gpt_neox(c: dict[str, Any]) -> Layout:
    d = {
        "vocab_size": 50432,
        "hidden_size": 6144,
        "num_hidden_layers": 44,
        "num_attention_heads": 64,
        "intermediate_size": 24576,
        "max_position_embeddings": 2048,
    }
    h, n, a = _int(c, d, "hidden_size"), _int(c, d, "num_hidden_layers"), _int(c, d, "num_attention_heads")
    v, inter, p = _int(c, d, "vocab_size"), _int(c, d, "intermediate_size"), _int(c, d, "max_position_embeddings")
    bias = bool(_get(c, {"attention_bias": True}, "attention_bias"))
    lins = [
        Linear("query_key_value", h, 3 * h, bias, n),
        Linear("dense", h, h, bias, n),
        Linear("dense_h_to_4h", h, inter, True, n),
        Linear("dense_4h_to_h", inter, h, True, n),
    ]
    tied = bool(_get(c, {"tie_word_embeddings": False}, "tie_word_embeddings"))
    norms = (2 * n + 1) * 2 * h
    return Layout(
        "gpt_neox",
        h,
        n,
        a,
        a,
        h // a,
        inter,
        v,
        p,
        False,
        tied,
        lins,
        v * h,
        norms,
        0 if tied else v * h,
        tables=((v, h),),
    )


_LLAMA_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
    },
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
    },
    "qwen2": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
    },
    "qwen3": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "max_position_embeddings": 32768,
    },
}


def _llama(c: dict[str, Any]) -> Layout:
    mt = str(c["model_type"])
    d = _LLAMA_DEFAULTS[mt]
    h, n, a = _int(c, d, "hidden_size"), _int(c, d, "num_hidden_layers"), _int(c, d, "num_attention_heads")
    kv = _get(c, d, "num_key_value_heads") or a
    hd = _get(c, d, "head_dim") or h // a
    v, inter, p = _int(c, d, "vocab_size"), _int(c, d, "intermediate_size"), _int(c, d, "max_position_embeddings")
    qkv_bias = mt == "qwen2" or bool(c.get("attention_bias", False))
    o_bias = mt != "qwen2" and bool(c.get("attention_bias", False))
    mlp_bias = bool(c.get("mlp_bias", False))
    lins = [
        Linear("q_proj", h, a * hd, qkv_bias, n),
        Linear("k_proj", h, kv * hd, qkv_bias, n),
        Linear("v_proj", h, kv * hd, qkv_bias, n),
        Linear("o_proj", a * hd, h, o_bias, n),
        Linear("gate_proj", h, inter, mlp_bias, n),
        Linear("up_proj", h, inter, mlp_bias, n),
        Linear("down_proj", inter, h, mlp_bias, n),
    ]
    norms = (2 * n + 1) * h + (2 * n * hd if mt == "qwen3" else 0)
    tied = bool(_get(c, {"tie_word_embeddings": False}, "tie_word_embeddings"))
    return Layout(
        mt, h, n, a, kv, hd, inter, v, p, False, tied, lins, v * h, norms, 0 if tied else v * h, tables=((v, h),)
    )


def _t5(c: dict[str, Any]) -> Layout:
    d = {
        "vocab_size": 32128,
        "d_model": 512,
        "d_kv": 64,
        "d_ff": 2048,
        "num_layers": 6,
        "num_heads": 8,
        "relative_attention_num_buckets": 32,
    }
    h, kvd, ff = _int(c, d, "d_model"), _int(c, d, "d_kv"), _int(c, d, "d_ff")
    enc, a, v = _int(c, d, "num_layers"), _int(c, d, "num_heads"), _int(c, d, "vocab_size")
    dec = _get(c, {}, "num_decoder_layers") or enc
    buckets = _int(c, d, "relative_attention_num_buckets")
    gated = str(_get(c, {"feed_forward_proj": "relu"}, "feed_forward_proj")).startswith("gated-")
    inner = a * kvd
    attn = enc + 2 * dec  # encoder self, decoder self, decoder cross
    ff_in = (
        [Linear("wi_0", h, ff, False, enc + dec), Linear("wi_1", h, ff, False, enc + dec)]
        if gated
        else [Linear("wi", h, ff, False, enc + dec)]
    )
    lins = [
        Linear("q", h, inner, False, attn),
        Linear("k", h, inner, False, attn),
        Linear("v", h, inner, False, attn),
        Linear("o", inner, h, False, attn),
        *ff_in,
        Linear("wo", ff, h, False, enc + dec),
    ]
    norms = (2 * enc + 1 + 3 * dec + 1) * h
    other = norms + 2 * buckets * a  # one relative position table per stack
    tied = bool(_get(c, {"tie_word_embeddings": True}, "tie_word_embeddings"))
    return Layout(
        "t5",
        h,
        enc + dec,
        a,
        a,
        kvd,
        ff,
        v,
        None,
        True,
        tied,
        lins,
        v * h,
        other,
        0 if tied else v * h,
        tables=((v, h), (buckets, a), (buckets, a)),
        cross_attention_layers=dec,
    )


_BERT_DEFAULTS: dict[str, dict[str, Any]] = {
    "bert": {"vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2},
    "roberta": {"vocab_size": 50265, "max_position_embeddings": 512, "type_vocab_size": 2},
}


def _bert(c: dict[str, Any]) -> Layout:
    mt = str(c["model_type"])
    d = {
        **_BERT_DEFAULTS[mt],
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    }
    h, n, a = _int(c, d, "hidden_size"), _int(c, d, "num_hidden_layers"), _int(c, d, "num_attention_heads")
    v, inter, p = _int(c, d, "vocab_size"), _int(c, d, "intermediate_size"), _int(c, d, "max_position_embeddings")
    types = _int(c, d, "type_vocab_size")
    lins = [
        Linear("query", h, h, True, n),
        Linear("key", h, h, True, n),
        Linear("value", h, h, True, n),
        Linear("dense", h, h, True, n),  # attention output
        Linear("dense", h, inter, True, n),  # intermediate
        Linear("dense", inter, h, True, n),  # output
        Linear("dense", h, h, True, 1),  # pooler
    ]
    norms = (2 * n + 1) * 2 * h
    return Layout(
        mt,
        h,
        n,
        a,
        a,
        h // a,
        inter,
        v,
        p,
        False,
        True,
        lins,
        (v + p + types) * h,
        norms,
        0,
        tables=((v, h), (p, h), (types, h)),
    )


def _distilbert(c: dict[str, Any]) -> Layout:
    d = {
        "vocab_size": 30522,
        "max_position_embeddings": 512,
        "n_layers": 6,
        "n_heads": 12,
        "dim": 768,
        "hidden_dim": 3072,
    }
    h, n, a = _int(c, d, "dim"), _int(c, d, "n_layers"), _int(c, d, "n_heads")
    v, inter, p = _int(c, d, "vocab_size"), _int(c, d, "hidden_dim"), _int(c, d, "max_position_embeddings")
    lins = [
        Linear("q_lin", h, h, True, n),
        Linear("k_lin", h, h, True, n),
        Linear("v_lin", h, h, True, n),
        Linear("out_lin", h, h, True, n),
        Linear("lin1", h, inter, True, n),
        Linear("lin2", inter, h, True, n),
    ]
    norms = (2 * n + 1) * 2 * h
    return Layout(
        "distilbert", h, n, a, a, h // a, inter, v, p, False, True, lins, (v + p) * h, norms, 0, tables=((v, h), (p, h))
    )


LAYOUTS: dict[str, Callable[[dict[str, Any]], Layout]] = {
    "gpt2": _gpt2,
    "bloom": _bloom,
    "gpt_neox": _gpt_neox,
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
    "qwen3": _llama,
    "t5": _t5,
    "bert": _bert,
    "roberta": _bert,
    "distilbert": _distilbert,
}


def layout(config: dict[str, Any]) -> Layout:
    """The weights of the model ``config`` (a parsed config.json) describes; ArchitectureError if unknown."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in LAYOUTS:
        raise ArchitectureError(
            f"cannot size model_type {model_type!r} from config.json; known: {', '.join(sorted(LAYOUTS))}"
        )
    return LAYOUTS[model_type](config)


def lora_parameters(linears: list[Linear], targets: list[str] | str, rank: int) -> int:
    """LoRA parameters: rank x (in + out) for every targeted linear; "all-linear": every linear but the head."""
    chosen = [lin for lin in linears if targets == "all-linear" or lin.name in targets]
    return sum(rank * (lin.fan_in + lin.fan_out) * lin.count for lin in chosen)


def default_targets(model_type: str) -> list[str] | str:
    """LoRA target modules when the spec names none: the table's, else peft's "all-linear"."""
    return TARGET_MODULES.get(model_type) or "all-linear"


ENCODER_ONLY = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "deberta-v2"})


def is_encoder_only(model_type: str) -> bool:
    return model_type in ENCODER_ONLY


def classifier_matrices(model_type: str, hidden: int, labels: int) -> list[tuple[int, int]]:
    """The 2-D weights of the *ForSequenceClassification head (the rest of it is biases)."""
    if model_type in ("distilbert", "roberta"):
        return [(hidden, hidden), (labels, hidden)]  # pre_classifier / dense, then the classifier
    return [(labels, hidden)]


def classifier_head(model_type: str, hidden: int, labels: int) -> int:
    """Parameters of the *ForSequenceClassification head (decoders: `score`, replacing the LM head)."""
    h = hidden
    if model_type == "distilbert":
        return h * h + h + h * labels + labels  # pre_classifier + classifier
    if model_type in ("bert", "roberta"):
        return h * labels + labels  # roberta: its dense replaces the pooler (same size)
    return h * labels  # score, no bias


# Dropout probabilities by config key, with the transformers config class's default: (hidden, attention).
DROPOUT_KEYS: dict[str, tuple[tuple[str, float], tuple[str, float]]] = {
    "gpt2": (("resid_pdrop", 0.1), ("attn_pdrop", 0.1)),
    "bloom": (("hidden_dropout", 0.0), ("attention_dropout", 0.0)),
    "gpt_neox": (("hidden_dropout", 0.0), ("attention_dropout", 0.0)),
    "llama": (("hidden_dropout", 0.0), ("attention_dropout", 0.0)),
    "mistral": (("hidden_dropout", 0.0), ("attention_dropout", 0.0)),
    "qwen2": (("hidden_dropout", 0.0), ("attention_dropout", 0.0)),
    "qwen3": (("hidden_dropout", 0.0), ("attention_dropout", 0.0)),
    "t5": (("dropout_rate", 0.1), ("dropout_rate", 0.1)),
    "bert": (("hidden_dropout_prob", 0.1), ("attention_probs_dropout_prob", 0.1)),
    "roberta": (("hidden_dropout_prob", 0.1), ("attention_probs_dropout_prob", 0.1)),
    "distilbert": (("dropout", 0.1), ("attention_dropout", 0.1)),
}


def dropouts(config: dict[str, Any]) -> tuple[float, float]:
    """(hidden, attention) dropout probabilities of the model ``config`` describes."""
    (hk, hd), (ak, ad) = DROPOUT_KEYS.get(str(config.get("model_type")), (("", 0.0), ("", 0.0)))
    hidden, attention = config.get(hk, hd), config.get(ak, ad)
    return (
        float(hidden) if isinstance(hidden, int | float) else hd,
        float(attention) if isinstance(attention, int | float) else ad,
    )
