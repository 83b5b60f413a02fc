"""Wake-ups across replicas: a NOTIFY per burst, and only when another server listens."""

from __future__ import annotations

import asyncio

import asyncpg

from ap4k.server.queries import LISTENER_APPLICATION_NAME, WAKEUP_CHANNEL
from ap4k.server.wakeups import LISTENERS_CHECK_SECONDS
from ap4k_testkit import StartServer

# On this test's database: other tests' servers may still be connected to theirs.
LISTENERS = """
SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()
"""


async def wait_for_listeners(conn: asyncpg.Connection, n: int) -> None:
    for _ in range(200):
        if await conn.fetchval(LISTENERS, LISTENER_APPLICATION_NAME) == n:
            # The server notes its listener's backend right after connecting.
            await asyncio.sleep(0.2)
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{n} server listener(s) did not connect")


async def test_a_lone_server_sends_no_notify_and_another_replica_hears_one(
    start_server: StartServer, database_url: str
) -> None:
    heard: list[str] = []
    # The test listens too, under its own name: it does not count as a server.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.add_listener(WAKEUP_CHANNEL, lambda _c, _p, _ch, payload: heard.append(payload))
        _, first = await start_server(dispatchers=0)
        await wait_for_listeners(conn, 1)
        await first.send("alone", {"target": "http://127.0.0.1:9/"})
        await asyncio.sleep(0.5)
        assert heard == []  # nobody else would hear it: not sent

        await start_server(dispatchers=0)
        await wait_for_listeners(conn, 2)
        await asyncio.sleep(LISTENERS_CHECK_SECONDS + 0.2)  # the first server looks again
        await first.send("shared", {"target": "http://127.0.0.1:9/"})
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.02)
        assert heard == ["shared"]
    finally:
        await conn.close()
