"""The planner's memory estimate against what tiny real models hold on CPU, in fp32 and in bf16 autocast as the HF
Trainer runs mixed precision (bench/plan_memory.py builds the rows; docs/planner.md shows its table).

Each case builds the model the trainer builds (its own loading and LoRA wrapping), runs one training forward
under ``torch.autograd.graph.saved_tensors_hooks`` (the unique storages saved for backward, parameters excluded:
the activations), then backward and one AdamW step (the bytes of every parameter, gradient and optimizer state
tensor: the states), and compares with ``finetune_api.plan.memory_bytes`` for the same spec on "cpu".

Tolerances:

* weights, gradients, optimizer states: 1%. They are counted, not modelled (config.json's shapes, rank x (in + out)
  per adapter, two fp32 moments per trainable parameter, in bf16 the 16-bit weight copies autocast keeps for the
  backward pass); the only slack is AdamW's 4-byte step counters.
* activations: 10%. The rules in finetune_api.activations are per-tensor, but leave out what does not scale
  with the model (token ids, labels, rotary tables, T5's causal mask) and count grouped-query k and v at full
  width, as transformers saves them whenever a padding mask is present (the held-out llama-gqa rows, which
  have no mask, are over by about 7% on activations).
* total: 15%, the issue's goal.

The fixed per-GPU overhead (CUDA context, allocator slack) has no CPU counterpart; it is excluded on both sides.
"""

from __future__ import annotations

import pytest

from bench.plan_memory import BF16_CASES, CASES, Row, measure

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=CASES + BF16_CASES, ids=lambda c: "-".join(map(str, c)))
def row(request: pytest.FixtureRequest) -> Row:
    return measure(*request.param)


def test_states_are_counted_exactly(row: Row) -> None:
    for key in ("weights", "gradients", "optimizer"):
        assert abs(row.error(key)) < 0.01, (key, row.estimated[key], row.measured[key])


def test_activations_are_within_ten_percent(row: Row) -> None:
    assert abs(row.error("activations")) < 0.10, (row.estimated["activations"], row.measured["activations"])


def test_total_is_within_fifteen_percent(row: Row) -> None:
    assert abs(row.error("total")) < 0.15, (row.estimated["total"], row.measured["total"])


def test_the_measurement_sees_what_changes() -> None:
    """The comparison can fail: the measured activations grow with the tokens, and LoRA's states shrink."""
    small, big = measure("llama", "full", 64, 2), measure("llama", "full", 64, 4)
    assert big.measured["activations"] > 1.8 * small.measured["activations"]
    lora = measure("llama", "lora", 64, 2)
    assert lora.measured["optimizer"] < 0.1 * small.measured["optimizer"]
    assert lora.measured["weights"] > small.measured["weights"]  # the adapters come on top of the base
