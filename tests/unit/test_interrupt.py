"""A SIGTERM outside training stops the trainer even when it lands inside library code that swallows
``Exception`` (transformers, datasets and botocore all have such blocks), and a signal that was swallowed
anyway (a bare ``except:``) stops the run before its next stage."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from finetune_trainer import interrupt
from finetune_trainer.train import Stages


@pytest.fixture
def handler() -> Iterator[None]:
    previous = interrupt.install()
    try:
        yield
    finally:
        interrupt.restore(previous)
        interrupt.reset()


def _library_call_that_swallows_errors() -> str:
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs here, in the main thread
    except Exception:
        return "carried on"
    return "finished"


def test_a_signal_inside_an_except_exception_block_still_interrupts(handler: None) -> None:
    with pytest.raises(interrupt.Interrupted, match="SIGTERM received"):
        _library_call_that_swallows_errors()


class _Recorder:
    def __init__(self) -> None:
        self.stages: list[str] = []

    def stage(self, stage: str, message: str | None = None) -> None:
        self.stages.append(stage)


def test_a_swallowed_signal_stops_the_run_at_the_next_stage(handler: None) -> None:
    reporter = _Recorder()
    stages = Stages(reporter)  # type: ignore[arg-type]
    with stages("downloading"):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except BaseException:
            pass
    with pytest.raises(interrupt.Interrupted), stages("preparing"):
        pytest.fail("the stage after the signal must not start")
    assert reporter.stages == ["downloading"]
