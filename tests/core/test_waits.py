"""ap4k.core.waits.within: the one bounded wait (wakeups, scheduler, forwarder, CLI, drain)."""

from __future__ import annotations

import asyncio

import pytest

from ap4k.core.waits import within


async def test_true_when_the_awaited_finishes_in_time() -> None:
    event = asyncio.Event()
    asyncio.get_running_loop().call_soon(event.set)
    assert await within(event.wait(), 5.0) is True


async def test_false_when_cut_off_and_a_shielded_task_goes_on() -> None:
    finished = asyncio.Event()

    async def slow() -> None:
        await asyncio.sleep(0.2)
        finished.set()

    task = asyncio.create_task(slow())
    assert await within(asyncio.shield(task), 0.01) is False
    await task
    assert finished.is_set()


async def test_a_cancellation_arriving_with_the_event_is_not_swallowed() -> None:
    """The case that hung the server's scheduler at shutdown: stop() sets the event a loop
    sleeps on and cancels the loop in the same turn. On Python 3.11, asyncio.wait_for
    returned normally here and the loop went on; `within` must raise CancelledError."""
    event = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            await within(event.wait(), 10.0)
            event.clear()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2.0)
    assert rounds == 1
