"""Metrics from real model outputs: greedy generations (causal-lm, instruction, chat, seq2seq) scored against
the references, and classification predictions scored against the labels.

Prompts are encoded exactly as ``data.py`` lays out training samples (leading special tokens + prompt
without extra specials for decoders; the chat template with a generation prompt for chat; the tokenizer's
own specials for seq2seq sources), so the model is asked in the format it was trained on.

Scales: exact_match, token_f1, rouge*, accuracy, precision, recall, f1 are fractions in [0, 1]; bleu is
sacrebleu's 0-100 corpus BLEU.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from finetune_api.spec import Task

GENERATIVE = frozenset({Task.CAUSAL_LM, Task.INSTRUCTION, Task.CHAT, Task.SEQ2SEQ})


# ---- prompts and generation --------------------------------------------------------------------------------


def _leading_ids(tokenizer: Any) -> list[int]:
    """Special tokens a tokenizer puts before any text (Llama's BOS); GPT-2 style tokenizers have none."""
    lead = []
    for tid in tokenizer("", add_special_tokens=True)["input_ids"]:
        if tid in (tokenizer.eos_token_id, tokenizer.sep_token_id):
            break
        lead.append(tid)
    return lead


def prompt_ids(tokenizer: Any, task: Task, example: dict[str, Any]) -> list[int]:
    if task == Task.CHAT:
        text = tokenizer.apply_chat_template(example["prompt_messages"], tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if task == Task.SEQ2SEQ:
        return list(tokenizer(example["prompt"])["input_ids"])
    return _leading_ids(tokenizer) + list(tokenizer(example["prompt"], add_special_tokens=False)["input_ids"])


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    task: Task,
    examples: Sequence[dict[str, Any]],
    max_new_tokens: int,
    batch_size: int = 8,
    max_prompt_tokens: int | None = None,
    synced_gpus: bool = False,
) -> list[str]:
    """Greedy continuations of each example's prompt (decoded, special tokens removed, stripped)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    outputs: list[str] = []
    encoder_decoder = task == Task.SEQ2SEQ
    for start in range(0, len(examples), batch_size):
        batch = [prompt_ids(tokenizer, task, ex) for ex in examples[start : start + batch_size]]
        if max_prompt_tokens:
            # Keep the END of an over-long prompt for decoders: that is where the answer must continue.
            batch = [ids[:max_prompt_tokens] if encoder_decoder else ids[-max_prompt_tokens:] for ids in batch]
        width = max(len(ids) for ids in batch)
        # Decoders continue from the last position, so pad on the LEFT; encoders do not care, pad right.
        rows = [
            ids + [pad] * (width - len(ids)) if encoder_decoder else [pad] * (width - len(ids)) + ids for ids in batch
        ]
        masks = [
            [1] * len(ids) + [0] * (width - len(ids)) if encoder_decoder else [0] * (width - len(ids)) + [1] * len(ids)
            for ids in batch
        ]
        input_ids = torch.tensor(rows, device=device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.tensor(masks, device=device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced_gpus,
        )
        new = out if encoder_decoder else out[:, width:]
        outputs += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    model.train(was_training)
    return outputs


# ---- text metrics ------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def text_metrics(predictions: Sequence[str], references: Sequence[str], wanted: Sequence[str]) -> dict[str, float]:
    """Generation metrics named in ``wanted`` (exact_match, token_f1, bleu, rouge)."""
    out: dict[str, float] = {}
    if not predictions:
        return out
    n = len(predictions)
    if "exact_match" in wanted:
        out["exact_match"] = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)) / n
    if "token_f1" in wanted:
        out["token_f1"] = sum(token_f1(p, r) for p, r in zip(predictions, references, strict=True)) / n
    if "bleu" in wanted:
        import sacrebleu

        out["bleu"] = float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)
    if "rouge" in wanted:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        for p, r in zip(predictions, references, strict=True):
            for key, score in scorer.score(r, p).items():
                totals[key] += score.fmeasure
        out.update({key: value / n for key, value in totals.items()})
    return out


# ---- classification ----------------------------------------------------------------------------------------


@torch.no_grad()
def classify(model: Any, dataset: Any, collator: Any, batch_size: int = 32) -> list[int]:
    """Predicted label id per row of a tokenized dataset (argmax of the logits)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds: list[int] = []
    columns = [c for c in ("input_ids", "attention_mask") if c in dataset.column_names]
    for start in range(0, len(dataset), batch_size):
        rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
        batch = collator([{c: row[c] for c in columns} for row in rows])
        logits = model(**{k: v.to(device) for k, v in batch.items() if k in columns}).logits
        preds += logits.argmax(dim=-1).tolist()
    model.train(was_training)
    return preds


def classification_metrics(
    predictions: Sequence[int], labels: Sequence[int], num_labels: int, wanted: Sequence[str] = ("accuracy", "f1")
) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 (every label weighs the same, however rare)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    out: dict[str, float] = {}
    if "accuracy" in wanted:
        out["accuracy"] = float(accuracy_score(labels, predictions))
    if {"precision", "recall", "f1"} & set(wanted):
        p, r, f, _ = precision_recall_fscore_support(
            labels, predictions, labels=list(range(num_labels)), average="macro", zero_division=0
        )
        for key, value in (("precision", p), ("recall", r), ("f1", f)):
            if key in wanted:
                out[key] = float(value)
    return out


def confusion(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> list[list[int]]:
    """Rows: true label, columns: predicted label."""
    from sklearn.metrics import confusion_matrix

    return [[int(x) for x in row] for row in confusion_matrix(labels, predictions, labels=list(range(num_labels)))]


def trainer_compute_metrics(num_labels: int, wanted: Sequence[str]) -> Any:
    """compute_metrics for the Trainer's evaluations during training (best model, early stopping)."""

    def compute(eval_pred: Any) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        preds = np.asarray(logits).argmax(axis=-1)
        return classification_metrics(preds.tolist(), np.asarray(eval_pred.label_ids).tolist(), num_labels, wanted)

    return compute
