"""The operator's work queue: events coalesce, one worker per key, delayed adds keep the earliest time."""

from __future__ import annotations

import asyncio

from finetune_operator.workqueue import WorkQueue


def test_many_events_for_one_key_coalesce() -> None:
    async def main() -> list[object]:
        q = WorkQueue()
        for _ in range(100):
            q.add("a")
        q.add("b")
        got = [await q.get(), await q.get()]
        assert len(q) == 0
        return got

    assert asyncio.run(main()) == ["a", "b"]


def test_a_key_added_while_processing_is_processed_again_afterwards() -> None:
    async def main() -> None:
        q = WorkQueue()
        q.add("a")
        key = await q.get()
        q.add("a")  # arrives while a worker holds it: must not be handed to a second worker now
        assert len(q) == 0
        q.done(key)
        assert await asyncio.wait_for(q.get(), 1) == "a"

    asyncio.run(main())


def test_delayed_add_keeps_the_earliest_due_time() -> None:
    async def main() -> None:
        q = WorkQueue()
        q.add_after("a", 0.05)
        q.add_after("a", 10)  # later: ignored
        assert await asyncio.wait_for(q.get(), 1) == "a"
        q.done("a")
        q.add_after("b", 10)
        q.add_after("b", 0.05)  # earlier: replaces
        assert await asyncio.wait_for(q.get(), 1) == "b"

    asyncio.run(main())


def test_retry_backs_off_and_forget_cancels() -> None:
    async def main() -> None:
        q = WorkQueue()
        q.add("a")
        await q.get()
        assert q.retry("a", base=0.01) == 0.01
        q.done("a")
        assert await asyncio.wait_for(q.get(), 1) == "a"
        assert q.retry("a", base=0.01) == 0.02
        q.done("a")
        q.forget("a")
        assert not q.scheduled("a")
        try:
            await asyncio.wait_for(q.get(), 0.1)
            raise AssertionError("a forgotten key came back")
        except TimeoutError:
            pass

    asyncio.run(main())
