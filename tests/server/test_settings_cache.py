"""The queue settings cache (`ap4k.server.queues.QueueDirectory`) against a real PostgreSQL:
a change of settings is seen by the next read, even one that raced the change."""

from __future__ import annotations

import asyncio

from ap4k.server.queues import QueueDirectory
from ap4k.server.store import QueueSettings, Store
from ap4k_testkit import StartServer


class HeldStore(Store):
    """The server's own store; each settings read answers only once `release` is set, so a
    test can make a change land while a read is under way (the window that, on a busy
    server, a dispatcher's read and a rotation of signing secrets can share)."""

    def __init__(self, store: Store) -> None:
        super().__init__(store.pool, store.dispatch_pool)
        self.reading = asyncio.Event()
        self.release = asyncio.Event()

    async def get_queue(self, name: str) -> QueueSettings | None:
        settings = await super().get_queue(name)
        self.reading.set()
        await self.release.wait()
        return settings

    async def unpaused_queue_names(self) -> list[str]:
        names = await super().unpaused_queue_names()
        self.reading.set()
        await self.release.wait()
        return names


async def test_a_read_that_raced_a_change_is_not_kept(start_server: StartServer) -> None:
    server, api = await start_server(dispatchers=0)
    await api.settings("cached", max_attempts=3)
    assert server.store is not None
    store = HeldStore(server.store)
    directory = QueueDirectory(store)

    read = asyncio.ensure_future(directory.get("cached"))
    await asyncio.wait_for(store.reading.wait(), 10)  # it has read max_attempts=3
    await api.settings("cached", max_attempts=7)  # the change commits meanwhile...
    directory.invalidate("cached")  # ...and its announcement arrives (NOTIFY, or this API)
    store.release.set()
    stale = await read
    assert stale is not None and stale.max_attempts == 3  # used once, as read

    assert directory.cached("cached") is None  # but not kept
    fresh = await directory.get("cached")
    assert fresh is not None and fresh.max_attempts == 7
    assert directory.cached("cached") == fresh  # a read with no change meanwhile is kept


async def test_unpaused_names_that_raced_a_pause_are_not_kept(start_server: StartServer) -> None:
    server, api = await start_server(dispatchers=0)
    await api.settings("flowing", paused=False)
    assert server.store is not None
    store = HeldStore(server.store)
    directory = QueueDirectory(store)

    read = asyncio.ensure_future(directory.unpaused_names())
    await asyncio.wait_for(store.reading.wait(), 10)
    await api.settings("flowing", paused=True)
    directory.invalidate("flowing")
    store.release.set()
    assert "flowing" in await read  # read before the pause
    assert "flowing" not in await directory.unpaused_names()
