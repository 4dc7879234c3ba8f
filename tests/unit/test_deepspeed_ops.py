"""DeepSpeed must not try to compile its CPU shared-memory all-reduce where no compiler exists (the trainer image):
it then uses torch.distributed's own all-reduce. Where a compiler exists the op stays as DeepSpeed found it."""

from __future__ import annotations

import pytest

from finetune_trainer import distributed


def test_without_a_compiler_the_shm_op_is_marked_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__
    monkeypatch.setitem(compatible, "deepspeed_shm_comm", True)
    monkeypatch.setattr(distributed.shutil, "which", lambda _name: None)
    distributed.skip_unbuildable_deepspeed_ops()
    assert compatible["deepspeed_shm_comm"] is False


def test_with_a_compiler_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__
    monkeypatch.setitem(compatible, "deepspeed_shm_comm", True)
    monkeypatch.setattr(distributed.shutil, "which", lambda name: f"/usr/bin/{name}")
    distributed.skip_unbuildable_deepspeed_ops()
    assert compatible["deepspeed_shm_comm"] is True
