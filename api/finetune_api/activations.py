"""Activation memory: the bytes autograd saves for the backward pass during one training forward.

Korthikanti et al. (2022, "Reducing Activation Recomputation in Large Transformer Models") count, per
transformer layer of s tokens x b sequences, hidden h, a heads, in 16 bits: ``sbh (34 + 5 a s / h)`` bytes
(GPT-3 with eager attention and 1-byte dropout masks). The same accounting is done here for each architecture
family as the Hugging Face implementations run it, tensor by tensor (tests/trainer/test_plan_memory.py measures
every saved tensor of tiny real models and compares):

* norms: LayerNorm saves its input and two fp32 statistics per token; the RMSNorms written in Python (Llama, T5)
  save their input, one fp32 statistic, and the normalised tensor when the norm's weight trains;
* linear layers save their input when their weight trains (full fine-tuning); under autocast (the HF Trainer's
  bf16/fp16 with fp32 weights) each linear saves its own 16-bit copy of an fp32 input, so q, k and v fed by one
  norm save three copies; a frozen linear saves nothing. LoRA adapters save, per targeted linear, the
  dropped-out input and its dropout mask (or the shared input when lora dropout is 0) and the rank-r output of A;
* attention: q, k, v and the output (4h; k and v at full width, as transformers repeats grouped kv heads when a
  padding mask is given) plus the fp32 log-sum-exp per head for fused kernels (flash / memory-efficient SDPA on
  GPUs; CPU's flash kernel without dropout). Attention that materialises the probabilities (eager BLOOM; SDPA's
  math fallback on CPU when attention dropout is on; T5's additive position bias on GPUs) saves a x s values
  per token for the probabilities, and with attention dropout the mask and the dropped probabilities too;
* the MLP's activation: SwiGLU 3 x intermediate (gate, silu(gate), up), GPT-2's tanh GELU written in Python
  4 x intermediate, exact GELU and ReLU 1 x intermediate; plus the input of the down projection;
* dropout masks (hidden, attention, T5's inner MLP): 1 byte per element on GPUs (fused dropout), a full
  element on CPU (the CPU path multiplies by a saved noise tensor);
* outside the blocks: the final norm, the LM head's input and the fp32 log-softmax over the vocabulary per
  target token (classification: none), embedding dropout and embedding norms.

With LoRA, nothing before the first adapter needs a gradient: the first block's input norm and the dropout masks
on its first adapters' inputs are not saved. Gradient checkpointing keeps each block's input, recomputes one
block at a time in the backward pass, and keeps what lies outside the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """How an architecture's block saves activations (see the module docstring)."""

    norm: str  # "layer" or "rms"
    qkv: tuple[str, ...]  # peft names of the linears reading the attention's input (q, k, v or one fused)
    out: str  # the attention's output projection
    mlp_in: tuple[str, ...]  # the linears reading the MLP's input
    mlp_out: str  # the down projection, reading the activation's output
    act_internal: int  # intermediate-sized tensors the MLP's activation saves
    resid_dropouts: int = 0  # dropout layers on the hidden state per block (when hidden dropout is on)
    inner_dropout: bool = False  # dropout on the intermediate activation (T5)
    post_norm: bool = False  # norms after the sublayers (BERT)
    shared_norm_input: bool = False  # GPT-NeoX's parallel residual: both norms read the same tensor
    out_copy: bool = False  # the output projection reads a copy of the fused attention's output
    eager: bool = False  # attention always materialises the probabilities
    position_bias: bool = False  # T5: an additive float bias (a x s per token) saved by fused attention
    embed_norm: bool = False  # a norm right after the embeddings (BERT, BLOOM)
    embed_dropouts: int = 0  # dropout layers on the embeddings' output (T5: also after each final norm)
    final_norm: bool = True


_LLAMA = Family("rms", ("q_proj", "k_proj", "v_proj"), "o_proj", ("gate_proj", "up_proj"), "down_proj", 3)
_NEOX = ("query_key_value",), "dense", ("dense_h_to_4h",), "dense_4h_to_h"
_BERT = Family(
    "layer",
    ("query", "key", "value"),
    "dense",
    ("dense",),
    "dense",
    1,
    resid_dropouts=2,
    post_norm=True,
    embed_norm=True,
    embed_dropouts=1,
    final_norm=False,
)
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": Family("layer", ("c_attn",), "c_proj", ("c_fc",), "c_proj", 4, resid_dropouts=2, embed_dropouts=1),
    "gpt_neox": Family("layer", *_NEOX, 1, resid_dropouts=2, shared_norm_input=True, out_copy=True),
    "bloom": Family("layer", *_NEOX, 1, resid_dropouts=2, eager=True, embed_norm=True),
    "bert": _BERT,
    "roberta": _BERT,
    "distilbert": Family(
        "layer",
        ("q_lin", "k_lin", "v_lin"),
        "out_lin",
        ("lin1",),
        "lin2",
        1,
        resid_dropouts=1,
        post_norm=True,
        embed_norm=True,
        embed_dropouts=1,
        final_norm=False,
    ),
    "t5": Family(
        "rms",
        ("q", "k", "v"),
        "o",
        ("wi",),
        "wo",
        1,
        resid_dropouts=2,
        inner_dropout=True,
        position_bias=True,
        embed_dropouts=2,
    ),
}


@dataclass(frozen=True)
class Context:
    """Everything about the run that decides what is saved, and how many bytes each element takes."""

    hidden: int
    inter: int
    heads: int
    vocab: int
    seq: int
    tokens: int  # batch x seq
    full: bool  # full fine-tuning (every weight trains) or LoRA
    targets: frozenset[str] | None  # LoRA target names; None: every linear ("all-linear")
    rank: int
    lora_dropout: float
    hidden_dropout: float
    attention_dropout: float
    gpu: bool
    e: int  # bytes of a compute-dtype element (2 in bf16/fp16, 4 in fp32)
    autocast: bool  # HF mixed precision: fp32 weights, 16-bit compute; norms and the residual stream in fp32
    lm_loss: bool  # a vocabulary-sized loss (not classification)
    gated_mlp: bool = False  # T5 v1.1: wi_0 and wi_1 read the MLP's input

    @property
    def mask(self) -> int:
        return 1 if self.gpu else self.e  # fused dropout keeps a bool mask; CPU keeps the scaled noise

    @property
    def rb(self) -> int:
        return 4 if (self.autocast or self.e == 4) else self.e  # the residual stream and the norms

    def trains(self, name: str) -> bool:
        return self.full or self.targets is None or name in self.targets


class _Block:
    """Bytes saved per token by one block, walked in the order the forward runs."""

    def __init__(self, fam: Family, ctx: Context, first: bool) -> None:
        self.fam, self.ctx = fam, ctx
        self.grad = not first  # whether the tensor flowing through needs a gradient at this point
        self.total = 0.0

    def norm(self, shared: bool = False) -> None:
        c = self.ctx
        if not self.grad:
            return
        if self.fam.norm == "layer":
            self.total += 8 + (0 if shared else c.rb * c.hidden)  # input, mean and rstd
        else:  # RMSNorm in Python: fp32 input and rstd, the normalised tensor when the weight trains
            self.total += 4 * c.hidden + 4 + (c.rb * c.hidden if c.full else 0)

    def linears(self, names: tuple[str, ...], fan: int, fp32_input: bool) -> None:
        """Inputs saved by linears reading one tensor (of ``fan`` features per token)."""
        c = self.ctx
        if c.full:
            # Under autocast each linear casts an fp32 input to its own 16-bit copy, and saves that.
            copies = len(names) if (c.autocast and fp32_input) else 1
            self.total += copies * fan * c.e
            self.grad = True
            return
        hit = [n for n in names if c.trains(n)]
        for _ in hit:
            self.total += c.rank * c.e  # lora_A's output, saved by lora_B
            if c.lora_dropout > 0:
                self.total += fan * c.e + (fan * c.mask if self.grad else 0)  # dropped input and its mask
        if hit and c.lora_dropout == 0:
            self.total += (len(hit) if c.autocast and fp32_input else 1) * fan * c.e  # the shared input
        self.grad = self.grad or bool(hit)

    def attention(self, names: tuple[str, ...], cross: bool = False) -> None:
        c, fam = self.ctx, self.fam
        h, a = c.hidden, c.heads
        if not cross:
            self.linears(names, h, True)
        else:  # T5 cross-attention: q reads the decoder, k and v the encoder's output (counted once outside)
            self.linears(("q",), h, True)
            if not c.full:
                self.linears(("k", "v"), h, False)
        if not self.grad:
            return
        o_trains = c.trains(fam.out)
        if not fam.eager and (c.gpu or c.attention_dropout == 0):  # a fused kernel
            self.total += 4 * h * c.e + 4 * a  # q, k, v, output; fp32 log-sum-exp per head
            if fam.position_bias and c.gpu:
                self.total += a * c.seq * c.e  # T5: the additive position-bias mask
            if fam.out_copy and o_trains and (c.full or c.lora_dropout == 0):
                self.total += h * c.e
        else:
            probs = a * c.seq
            self.total += 3 * h * c.e  # q, k^T, v laid out for the batched matmuls
            self.total += probs * (c.e + (4 if fam.eager and c.e != 4 else 0))  # (fp32 softmax when eager)
            if c.attention_dropout > 0:
                self.total += probs * (c.e + c.mask)  # the dropped probabilities and the mask
            if o_trains and (c.full or c.lora_dropout == 0):
                self.total += h * c.e  # the output laid out for the output projection
        if not c.full and o_trains:  # the output projection's adapter
            if c.lora_dropout > 0:
                self.linears((fam.out,), h, False)
            else:  # peft casts the 16-bit output to the adapter's fp32, autocast casts it back: a new copy
                self.total += c.rank * c.e + (h * c.e if c.autocast else 0)
        self.dropout()

    def dropout(self) -> None:
        if self.ctx.hidden_dropout > 0 and self.grad:
            self.total += self.ctx.hidden * self.ctx.mask

    def mlp(self) -> None:
        c, fam = self.ctx, self.fam
        self.linears(("wi_0", "wi_1") if c.gated_mlp else fam.mlp_in, c.hidden, True)
        if not self.grad:
            return
        self.total += fam.act_internal * c.inter * c.e
        if fam.inner_dropout and c.hidden_dropout > 0:
            self.total += c.inter * c.mask
        self.linears((fam.mlp_out,), c.inter, False)
        if fam.resid_dropouts > 1:
            self.dropout()


def _block(fam: Family, ctx: Context, first: bool, cross: bool) -> float:
    """Bytes saved per token by one block; ``first``: its input needs no gradient (LoRA's first block);
    ``cross``: a T5 decoder block (self-attention, cross-attention, MLP)."""
    b = _Block(fam, ctx, first)
    if not fam.post_norm:
        b.norm()
    b.attention(fam.qkv)
    if fam.post_norm:
        b.norm()
    if cross:
        b.norm()
        b.attention(("q", "k", "v"), cross=True)
    if fam.shared_norm_input:  # parallel residual: the MLP reads the block's input, not the attention's output
        b.grad = not first
    if not fam.post_norm:
        b.norm(shared=fam.shared_norm_input)
    b.mlp()
    if fam.post_norm:
        b.norm()
    return b.total


def activation_bytes(model_type: str, ctx: Context, layers: int, decoder_layers: int, checkpointing: bool) -> float:
    """Bytes autograd saves during one forward of ``ctx.tokens`` tokens (module docstring)."""
    fam = FAMILIES.get(model_type, _LLAMA)
    h = ctx.hidden
    stacks = [n for n in (layers - decoder_layers, decoder_layers) if n > 0]
    blocks = biggest = 0.0
    for i, count in enumerate(stacks):
        cross = i == 1
        rest = _block(fam, ctx, first=False, cross=cross)
        blocks += _block(fam, ctx, first=not ctx.full, cross=cross) + (count - 1) * rest
        biggest = max(biggest, rest)
    if checkpointing:
        blocks = layers * h * ctx.rb + biggest  # each block's input, plus one block recomputed
    outside = 0.0
    if ctx.hidden_dropout > 0:
        # Embedding dropout needs no mask when the embeddings are frozen; T5's final dropouts always do.
        outside += (fam.embed_dropouts if ctx.full else 0) * len(stacks) * h * ctx.mask
        outside += (len(stacks) * h * ctx.mask) if fam.position_bias else 0
    if fam.embed_norm and ctx.full:
        outside += ctx.rb * h + 8
    if fam.final_norm:
        norm = (ctx.rb * h + 8) if fam.norm == "layer" else (4 * h + 4 + (ctx.rb * h if ctx.full else 0))
        outside += norm * len(stacks)
    if decoder_layers and ctx.full:  # the encoder's output, read by every cross-attention's k and v
        outside += (2 * decoder_layers * h * ctx.e) if ctx.autocast else h * ctx.e
    if ctx.lm_loss:
        outside += (h * ctx.e if ctx.full else 0) + 4 * ctx.vocab  # the head's input; the fp32 log-softmax
    total = (blocks + outside) * ctx.tokens
    if fam.position_bias:
        total += len(stacks) * ctx.seq * ctx.seq * 9  # relative-position buckets (int64), the causal mask
    return total


def frozen_without_grad(model_type: str, linears: list[tuple[str, int, int]], stacks: int) -> int:
    """LoRA: weights of the frozen linears in each stack's first block whose input needs no gradient (they read
    the frozen embeddings), so autocast's 16-bit copies of them are not kept: the attention's input projections,
    and with GPT-NeoX's parallel residual the MLP too. ``linears``: (name, fan_in, fan_out) of one block."""
    fam = FAMILIES.get(model_type, _LLAMA)
    names = set(fam.qkv) | ({*fam.mlp_in, fam.mlp_out} if fam.shared_norm_input else set())
    per_block = {name: fan_in * fan_out for name, fan_in, fan_out in linears if name in names}
    return stacks * sum(per_block.values())
