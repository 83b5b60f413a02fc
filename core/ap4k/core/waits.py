"""Waiting for something, for at most so long: the one way every component does it.

`asyncio.timeout`, never `asyncio.wait_for`: on Python 3.11, `wait_for` swallows a
cancellation that arrives together with the result it waits for (a stop() that sets the
event a loop sleeps on and cancels the loop's task), so the loop goes on and its stop waits
forever. The server's scheduler hung at shutdown that way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


async def within(awaitable: Awaitable[object], seconds: float) -> bool:
    """Await `awaitable` for at most `seconds`: True if it finished in time, False if it
    was cut off (a coroutine or task is then cancelled; shield what must go on)."""
    try:
        async with asyncio.timeout(seconds):
            await awaitable
    except TimeoutError:
        return False
    return True
