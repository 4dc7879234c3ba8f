"""SIGTERM/SIGINT: stop at a step boundary, save a checkpoint, exit "interrupted, resumable".

Kubernetes stops a pod (deletion, eviction, node drain, spot preemption, suspend) by sending SIGTERM to the
container's PID 1 and SIGKILL ``terminationGracePeriodSeconds`` later. The trainer runs as PID 1, and the
kernel drops signals sent to a PID-namespace init that has no handler for them, so without an explicitly
installed handler SIGTERM is silently ignored and the trainer keeps training (and uploading) until SIGKILL.
:func:`install` installs one, as early as possible in ``__main__``.

What the handler does depends on the phase (:func:`deferred`):

* training (deferred): it only records the signal. ``progress.StopOnSignal`` sees it at the next step boundary,
  makes the Trainer save a checkpoint at that step and stop; ``train.run`` waits for that checkpoint's upload
  (with its ``_COMPLETE`` marker) and raises :class:`Interrupted`. No evaluation, final model or manifest.
* anything else (downloading, preparing, evaluating, uploading): it raises :class:`Interrupted` at once;
  there is nothing worth saving, and a resumed attempt redoes that stage.

A second signal always raises at once. This module imports nothing heavy: it is installed before torch.
``__main__`` turns :class:`Interrupted` into an ``error`` report with reason ``Interrupted``, the termination
message and exit code ``EXIT_INTERRUPTED``.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


class Interrupted(BaseException):
    """The pod is being stopped (SIGTERM/SIGINT); the next attempt resumes from the newest checkpoint.

    A ``BaseException``, like ``KeyboardInterrupt``: the handler raises it wherever the main thread happens to
    be, often deep inside a library (transformers, datasets, botocore) whose ``except Exception`` would
    otherwise swallow it and carry on with the run."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _State:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at: float | None = None
        self.deferred = False
        self.lock = threading.Lock()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "no signal"


STATE = _State()


def _handler(signum: int, _frame: FrameType | None) -> None:
    first = STATE.signum is None
    if first:
        STATE.signum, STATE.received_at = signum, time.monotonic()
    if STATE.deferred and first:
        return  # progress.StopOnSignal stops at the next step boundary and saves
    raise Interrupted(f"{signal.Signals(signum).name} received; stopped before finishing")


Handlers = dict[int, Any]


def install() -> Handlers:
    """Handle SIGTERM and SIGINT in this (main) thread, forgetting any earlier signal; needed for PID 1 (see
    the module doc). Returns the previous handlers, for :func:`restore`."""
    reset()
    return {signum: signal.signal(signum, _handler) for signum in (signal.SIGTERM, signal.SIGINT)}


def restore(previous: Handlers) -> None:
    """Put back what :func:`install` replaced (``main`` called in-process, e.g. by tests)."""
    for signum, handler in previous.items():
        if handler is not None:  # None: installed outside Python, nothing we can put back
            signal.signal(signum, handler)


def reset() -> None:
    """Forget a received signal (tests that call ``main`` in-process more than once)."""
    STATE.signum, STATE.received_at, STATE.deferred = None, None, False


def seconds_since_signal() -> float | None:
    return None if STATE.received_at is None else time.monotonic() - STATE.received_at


@contextmanager
def deferred() -> Iterator[None]:
    """While inside, a first signal is only recorded (the training loop stops at a step boundary). A signal
    that arrived just before entering is honoured on exit from the block at the latest (``check``)."""
    STATE.deferred = True
    try:
        yield
    finally:
        STATE.deferred = False


def check() -> None:
    """Raise :class:`Interrupted` when a signal was received (outside a deferred block)."""
    if STATE.requested:
        raise Interrupted(f"{STATE.name} received; stopped before finishing")
