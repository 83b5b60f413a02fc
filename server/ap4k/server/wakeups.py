"""Who gets woken when: local signals first, LISTEN/NOTIFY across replicas second.

A message enqueued through this process wakes this process's dispatchers and long-polling
carriers directly. Other replicas hear of it through one NOTIFY per burst — never one per
message, which would serialise commits (docs/performance.md, trap 1) — and only while there
are other replicas: every server's LISTEN connection is named in pg_stat_activity, which the
notifier looks at every few seconds. Carriers need no NOTIFY of their own: they long-poll a
server, which hears of work as any replica does. NOTIFY is only a latency shortcut: leasers
also poll, so a lost notification (or one not sent because a replica had just started)
delays work, never loses it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable

import asyncpg

from ap4k.core.waits import within
from ap4k.server.queries import LISTENER_APPLICATION_NAME, WAKEUP_CHANNEL
from ap4k.server.store import DB_ERRORS, Store

log = logging.getLogger("ap4k.wakeups")

SETTINGS_CHANNEL = "ap4k_settings"
NOTIFY_INTERVAL_SECONDS = 0.005
LISTENERS_CHECK_SECONDS = 2.0  # how often the notifier asks whether anyone else listens


class Wakeups:
    def __init__(self) -> None:
        # Queues that may have available work, as far as this process has heard.
        self.hinted: set[str] = set()
        self._future: asyncio.Future[None] | None = None
        self._outgoing: set[str] = set()
        self._outgoing_event = asyncio.Event()
        # The backend of our own LISTEN connection (not counted as someone else), and
        # whether another server listened when last looked at (until then: assume so).
        self._listener_pid = 0
        self._others_listen = True
        self._others_checked_at = -math.inf

    def hint(self, queues: Iterable[str]) -> None:
        """Some messages of these queues became available: wake everyone waiting."""
        self.hinted.update(queues)
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    def announce(self, queues: Iterable[str]) -> None:
        """Wake this process now, and the other replicas with the next NOTIFY."""
        queues = set(queues)
        if queues:
            self.hint(queues)
            self._outgoing.update(queues)
            self._outgoing_event.set()

    async def wait(self, timeout: float) -> None:
        """Until the next hint, or `timeout` seconds."""
        if self._future is None or self._future.done():
            self._future = asyncio.get_running_loop().create_future()
        await within(asyncio.shield(self._future), timeout)

    async def run_notifier(self, store: Store) -> None:
        """Send the pending queue names as one NOTIFY; bursts coalesce while one is sent."""
        while True:
            await self._outgoing_event.wait()
            self._outgoing_event.clear()
            queues, self._outgoing = self._outgoing, set()
            try:
                if await self._others_listening(store):
                    await store.notify(WAKEUP_CHANNEL, ",".join(sorted(queues))[:7000])
            except (OSError, asyncpg.PostgresError) as exc:
                log.debug("notify failed (polling covers it): %s", exc)
                await asyncio.sleep(0.5)
            # At most one NOTIFY every few milliseconds, whatever the enqueue rate.
            await asyncio.sleep(NOTIFY_INTERVAL_SECONDS)

    async def _others_listening(self, store: Store) -> bool:
        now = time.monotonic()
        if now - self._others_checked_at >= LISTENERS_CHECK_SECONDS:
            self._others_checked_at = now
            self._others_listen = await store.other_listeners(self._listener_pid) > 0
        return self._others_listen

    async def run_listener(self, dsn: str, on_settings_changed: Callable[[str], None]) -> None:
        """LISTEN on a dedicated connection; reconnect when PostgreSQL goes away."""
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    dsn, server_settings={"application_name": LISTENER_APPLICATION_NAME}
                )
                self._listener_pid = conn.get_server_pid()
                await conn.add_listener(
                    WAKEUP_CHANNEL, lambda _c, _p, _ch, payload: self.hint(payload.split(","))
                )
                await conn.add_listener(
                    SETTINGS_CHANNEL, lambda _c, _p, _ch, payload: on_settings_changed(payload)
                )
                # Anything announced while we were not listening is found by polling; tell
                # the leasers to look at everything once.
                on_settings_changed("")
                # Check the connection now and then: a dead peer does not always say so.
                while True:
                    await asyncio.sleep(5.0)
                    async with asyncio.timeout(5.0):
                        await conn.fetchval("SELECT 1")
            except DB_ERRORS as exc:  # TimeoutError is an OSError
                log.info("LISTEN connection lost (%s); reconnecting", exc)
            finally:
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(1.0)
