"""After a user error the trainer waits for the operator to stop its Job (so no second pod starts), and a SIGTERM
(the operator's parallelism 0 deleting the pod) ends that wait at once."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from finetune_trainer import interrupt
from finetune_trainer.__main__ import hold_after_user_error


def test_sigterm_ends_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_HOLD_ON_USER_ERROR_SECONDS", "30")
    previous = interrupt.install()
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        start = time.monotonic()
        hold_after_user_error()
        assert 0.2 < time.monotonic() - start < 5
    finally:
        interrupt.restore(previous)
        interrupt.reset()


def test_without_the_setting_there_is_no_wait_and_with_it_the_wait_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FINETUNE_HOLD_ON_USER_ERROR_SECONDS", raising=False)
    start = time.monotonic()
    hold_after_user_error()
    assert time.monotonic() - start < 0.5
    monkeypatch.setenv("FINETUNE_HOLD_ON_USER_ERROR_SECONDS", "1")
    start = time.monotonic()
    hold_after_user_error()
    assert 0.9 < time.monotonic() - start < 3
