"""Length-grouped batching (``hyperparameters.groupByLength``, resolved by ``finetune_api.resolve``).

Without packing every batch is padded to its longest sample, so a batch that mixes short and long samples
computes mostly padding. With ``train_sampling_strategy="group_by_length"`` in the TrainingArguments, the
:class:`FineTuneTrainer` draws each batch from samples of similar token length: the indices are shuffled,
cut into megabatches of 50 batches, and each megabatch is sorted by length (transformers'
``get_length_grouped_indices``). Two things differ from transformers' own ``LengthGroupedSampler``:

* the order is a pure function of the data seed and the epoch (like accelerate's seedable random sampler), so
  every rank draws the same order and a run resumed mid-epoch skips exactly the batches it already trained on;
* samples are grouped per global batch (per-device batch x gradient accumulation x processes), not per device,
  so an optimizer step trains the same samples on one process or several (accelerate hands each process a
  contiguous share of the order);
* evaluation keeps the data's order (transformers would group it too, which changes ``eval_loss``, a mean of
  per-batch means), so evaluation results do not depend on this setting.

Token lengths are read from the dataset's Arrow column, without decoding the rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import datasets
import pyarrow.compute as pc
import torch
from torch.utils.data import Sampler, SequentialSampler
from transformers import Trainer
from transformers.trainer_pt_utils import get_length_grouped_indices

GROUP_BY_LENGTH = "group_by_length"


def token_lengths(dataset: Any, column: str = "input_ids") -> list[int]:
    """The length of every row's ``column``: from Arrow for a ``datasets.Dataset``, else row by row."""
    if isinstance(dataset, datasets.Dataset):
        values = dataset.with_format("arrow")[column]
        return [int(n) for n in pc.list_value_length(values).to_pylist()]
    return [len(row[column]) for row in dataset]


class SeededLengthGroupedSampler(Sampler[int]):
    """Indices in length-grouped batches; the order depends only on ``seed`` and the epoch (``set_epoch``)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class FineTuneTrainer(Trainer):
    """transformers' Trainer with seeded length-grouped training batches and evaluation in the data's order."""

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler[int] | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != GROUP_BY_LENGTH or dataset is None:
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        group = self.args.train_batch_size * self.args.gradient_accumulation_steps * max(1, self.args.world_size)
        return SeededLengthGroupedSampler(token_lengths(dataset), group, seed)

    def _get_eval_sampler(self, eval_dataset: Any) -> Sampler[int] | None:
        if self.args.train_sampling_strategy != GROUP_BY_LENGTH:
            return super()._get_eval_sampler(eval_dataset)
        # What the Trainer does without grouping: the data's order (several processes: accelerate shards it).
        if eval_dataset is None or self.args.world_size > 1:
            return None
        return SequentialSampler(eval_dataset)
