"""TrainerCallbacks: ``ProgressCallback`` turns the Trainer's logs into ``progress`` and ``eval`` reports;
``StopOnSignal`` stops training at a step boundary with a checkpoint after SIGTERM (``interrupt``).

Throughput is computed from the tokens the Trainer actually fed the model (``num_input_tokens_seen``,
non-padding tokens) during THIS process's run, so a resumed attempt does not count the previous attempt's
tokens against its own wall time.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune_trainer import interrupt
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


def _any_rank_requested(args: TrainingArguments) -> bool:
    """Every rank must stop at the same step (collectives would hang otherwise): a MAX all-reduce of the flag.
    One tiny collective per step, only with several processes."""
    import torch

    flag = interrupt.STATE.requested
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = torch.tensor([1 if flag else 0], device=args.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        flag = bool(tensor.item())
        if flag and interrupt.STATE.signum is None:
            # Another rank got the signal (torchrun forwards it to every rank, not necessarily in the same step).
            interrupt.STATE.signum, interrupt.STATE.received_at = signal.SIGTERM, time.monotonic()
    return flag


class StopOnSignal(TrainerCallback):
    """At the first step boundary after a signal: save a checkpoint of that step (unless one was just saved),
    skip any evaluation due, stop training. Must come after DefaultFlowCallback (the Trainer adds that first)."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.stopped_at: int | None = None

    def _stop(self, state: TrainerState, control: TrainerControl, save: bool) -> TrainerControl:
        if self.stopped_at is None:
            self.stopped_at = state.global_step
            if state.is_world_process_zero:
                what = "saving a checkpoint of it" if save else "its checkpoint is saved"
                self.reporter.stage(
                    "stopping", f"{interrupt.STATE.name} received: stopped at step {state.global_step}, {what}"
                )
        control.should_evaluate = False  # could outlast the grace period; the resumed attempt evaluates
        control.should_save = save
        control.should_training_stop = True
        control.should_epoch_stop = True
        return control

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        if self.stopped_at is None and _any_rank_requested(args):
            return self._stop(state, control, save=True)
        return None

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        # A signal during a regular save: that checkpoint is the final one, no extra step.
        if self.stopped_at is None and _any_rank_requested(args):
            return self._stop(state, control, save=False)
        return None

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        # A signal during an in-training evaluation: save this step right after it and stop.
        if self.stopped_at is None and _any_rank_requested(args):
            return self._stop(state, control, save=True)
        return None

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        if self.stopped_at is not None:  # no second save or an epoch-end evaluation after the final checkpoint
            control.should_save = control.should_evaluate = False
            return control
        if _any_rank_requested(args):
            return self._stop(state, control, save=True)
        return None
