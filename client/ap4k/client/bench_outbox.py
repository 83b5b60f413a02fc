"""The outbox benchmark: how fast a forwarder drains a backlog into a running server.

`ap4k bench --outbox` calls `run_outbox_bench(server_url, outbox_url, …)` with a running
server and an application database. It

1. creates the outbox table if needed and enqueues `messages` rows with `enqueue_many`, in
   application transactions of `enqueue_batch` rows (the app side, timed on its own);
2. starts an in-process `Forwarder` and times it until every row is acknowledged by the
   server and deleted from the outbox (the relay rate: the figure of merit);
3. optionally waits until a sink target it runs on 127.0.0.1 has received them all (the
   end-to-end rate, which includes the server's dispatchers).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from ap4k.client.models import NewMessage
from ap4k.core.embedded_pg import free_port


async def _start_sink() -> tuple[web.AppRunner, str, list[int]]:
    received = [0]

    async def sink(request: web.Request) -> web.Response:
        await request.read()
        received[0] += 1
        return web.Response(status=204)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", sink)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/sink", received


async def run_outbox_bench(
    server_url: str,
    outbox_url: str,
    *,
    messages: int = 20_000,
    batch_size: int = 500,
    concurrency: int = 2,
    enqueue_batch: int = 1000,
    queue: str = "bench-outbox",
    target: str | None = None,
    token: str | None = None,
    wait_delivered: bool = False,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Enqueue `messages` outbox rows, relay them, and return the figures (rates in rows/s).

    With `target=None` the messages go to a sink this function runs; with a `target` URL
    of yours, `wait_delivered` is ignored (the sink cannot count them).
    """
    import asyncpg

    from ap4k import outbox
    from ap4k.outbox import sql
    from ap4k.outbox.forwarder import Forwarder

    await outbox.init(outbox_url)
    runner: web.AppRunner | None = None
    received = [0]
    if target is None:
        runner, target, received = await _start_sink()
    else:
        wait_delivered = False
    try:
        conn = await asyncpg.connect(outbox_url)
        try:
            before = int((await conn.fetchrow(sql.STATS))["backlog"])
            started = time.perf_counter()
            for start in range(0, messages, enqueue_batch):
                count = min(enqueue_batch, messages - start)
                batch = [NewMessage(target, body={"n": start + i}) for i in range(count)]
                async with conn.transaction():
                    await outbox.enqueue_many(conn, queue, batch, notify=False)
            enqueue_seconds = time.perf_counter() - started
        finally:
            await conn.close()

        total = before + messages
        forwarder = Forwarder(
            outbox_url,
            server_url,
            token=token,
            batch_size=batch_size,
            concurrency=concurrency,
            poll_interval=0.05,
            stats_interval=3600,
        )
        # Connecting and checking the schema is not relaying: the clock starts after it
        # (start() returns before its workers first run).
        await forwarder.start()
        started = time.perf_counter()
        try:
            deadline = time.monotonic() + timeout
            while forwarder.forwarded + forwarder.rejected < total:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"relayed {forwarder.forwarded} of {total} rows in {timeout}s"
                    )
                await asyncio.sleep(0.01)
            relay_seconds = time.perf_counter() - started
            left = (await forwarder.stats()).backlog
        finally:
            await forwarder.stop()

        figures: dict[str, Any] = {
            "messages": messages,
            "batch_size": batch_size,
            "concurrency": concurrency,
            "enqueue_seconds": round(enqueue_seconds, 3),
            "enqueue_rows_per_second": round(messages / enqueue_seconds),
            "relayed": forwarder.forwarded,
            "rejected": forwarder.rejected,
            "relay_seconds": round(relay_seconds, 3),
            "relay_rows_per_second": round(total / relay_seconds),
            "backlog_after": left,
        }
        if wait_delivered:
            deadline = time.monotonic() + timeout
            while received[0] < total:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.02)
            delivery_seconds = time.perf_counter() - started
            figures["delivered"] = received[0]
            figures["delivery_seconds"] = round(delivery_seconds, 3)
            figures["delivered_per_second"] = round(received[0] / delivery_seconds)
        return figures
    finally:
        if runner is not None:
            await runner.cleanup()


def run_outbox_bench_sync(server_url: str, outbox_url: str, **options: Any) -> dict[str, Any]:
    """`run_outbox_bench` for callers without an event loop."""
    return asyncio.run(run_outbox_bench(server_url, outbox_url, **options))
