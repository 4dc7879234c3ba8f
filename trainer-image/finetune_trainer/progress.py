"""A TrainerCallback that turns the Trainer's logs into ``progress`` and ``eval`` reports.

Throughput is computed from the tokens the Trainer actually fed the model (``num_input_tokens_seen``,
non-padding tokens) during THIS process's run, so a resumed attempt does not count the previous attempt's
tokens against its own wall time.
"""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune_trainer.reporting import Reporter


class ProgressCallback(TrainerCallback):
    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self._t0 = 0.0
        self._step0 = 0
        self._tokens0 = 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # on_train_begin fires after a checkpoint's state is loaded: global_step is the resume step.
        self._t0 = time.monotonic()
        self._step0 = state.global_step
        self._tokens0 = state.num_input_tokens_seen

    def rates(self, state: TrainerState) -> tuple[float | None, float | None]:
        """(tokens/s, seconds left) for this process's run so far."""
        elapsed = time.monotonic() - self._t0
        steps = state.global_step - self._step0
        if elapsed <= 0 or steps <= 0:
            return None, None
        tokens = state.num_input_tokens_seen - self._tokens0
        tps = tokens / elapsed if tokens > 0 else None
        eta = elapsed / steps * max(state.max_steps - state.global_step, 0)
        return tps, eta

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            tps, eta = self.rates(state)
            self.reporter.progress(
                step=state.global_step,
                total_steps=state.max_steps,
                epoch=state.epoch,
                loss=float(logs["loss"]),
                learning_rate=float(logs["learning_rate"]) if "learning_rate" in logs else None,
                tokens_per_second=tps,
                eta_seconds=eta,
            )
        evals = {k: v for k, v in logs.items() if k.startswith("eval_")}
        if evals:
            self.reporter.eval(step=state.global_step, metrics=evals, epoch=state.epoch)
