"""The client's default retry policy outlasts a server restart: sends made while the only
`ap4k serve` is SIGKILLed and started again a few seconds later all succeed, and with dedup
keys nothing is enqueued twice (counted in the database)."""

from __future__ import annotations

import asyncio
import itertools

from ap4k.client import AsyncClient, Client
from ap4k_testkit import ServerProcess, count_rows

DOWN_SECONDS = 3.0  # within the 2-5 s of a restart


async def test_sends_ride_out_a_server_restart_with_the_default_policy(
    database_url: str,
) -> None:
    server = await ServerProcess(database_url, "--dispatchers", "0").start()
    keys = itertools.count()
    keyed_sent: list[str] = []
    stop = asyncio.Event()

    async def keyed_sender(client: AsyncClient) -> None:
        # Sends across the kill: some are cut off mid-request; their resends carry the key.
        while not stop.is_set():
            key = f"k-{next(keys)}"
            await client.send("restart", "http://127.0.0.1:9/", {"key": key}, dedup_key=key)
            keyed_sent.append(key)

    def sync_send() -> str:
        with Client(server.url) as client:
            return client.send("restart", "http://127.0.0.1:9/", {"sync": True}).id

    try:
        async with AsyncClient(server.url) as client:  # the defaults: no retry policy given
            senders = [asyncio.create_task(keyed_sender(client)) for _ in range(4)]
            await asyncio.sleep(0.5)
            server.kill()
            # Sends without dedup keys made while the server is down: each one reached no
            # server, so each is safe to retry and must succeed once the server is back.
            plain = [
                asyncio.create_task(
                    client.send("restart", "http://127.0.0.1:9/", {"plain": i})
                )
                for i in range(20)
            ]
            synced = asyncio.create_task(asyncio.to_thread(sync_send))
            await asyncio.sleep(DOWN_SECONDS)
            await server.start()
            plain_ids = await asyncio.gather(*plain)
            sync_id = await synced
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*senders)  # raises if any keyed send failed
        assert len({e.id for e in plain_ids}) == 20
        assert sync_id
        rows = "SELECT count(*) FROM ap4k_messages WHERE queue = 'restart'"
        keyed = rows + " AND dedup_key IS NOT NULL"
        assert await count_rows(database_url, keyed) == len(set(keyed_sent)) == len(keyed_sent)
        assert await count_rows(database_url, rows) == len(keyed_sent) + 20 + 1
    finally:
        server.kill()
