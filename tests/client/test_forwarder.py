"""The forwarder against a real `ap4k serve`: committed messages are delivered once each,
rolled-back ones never, through outages, SIGKILLs and concurrent forwarders."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from ap4k import outbox
from ap4k.client import AsyncClient, NewMessage
from ap4k.core.embedded_pg import EmbeddedPostgres, free_port
from ap4k.outbox import Forwarder, sql
from ap4k_testkit import ServerProcess, spawn, tail, wait_ready

from .conftest import ServerFactory, Target


async def backlog(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int((await conn.fetchrow(sql.STATS))["backlog"])
    finally:
        await conn.close()


async def assert_each_once(target: Target, expected: set[Any], settle: float = 0.7) -> None:
    assert await target.wait_for(len(expected), timeout=120), (
        f"{len(target.bodies)} of {len(expected)} delivered"
    )
    await asyncio.sleep(settle)  # a duplicate would arrive in this time
    counts = target.counts()
    assert set(counts) == expected
    duplicates = {n: c for n, c in counts.items() if c != 1}
    assert duplicates == {}


async def test_committed_delivered_once_rolled_back_never(
    server: ServerProcess, app_db: str, app_conn: Any, target: Target
) -> None:
    async with Forwarder(app_db, server.url, poll_interval=5.0) as forwarder:
        for i in range(100):
            async with app_conn.transaction():
                await outbox.enqueue(app_conn, "orders", target.url + "/hook", {"n": i})

        async def rolled_back(i: int) -> None:
            async with app_conn.transaction():
                await outbox.enqueue(app_conn, "orders", target.url + "/hook", {"n": -i})
                raise RuntimeError("rollback")

        for i in range(1, 51):
            with pytest.raises(RuntimeError):
                await rolled_back(i)
        # The poll interval is long: NOTIFY is what wakes the forwarder.
        await assert_each_once(target, set(range(100)))
        assert forwarder.forwarded == 100
    assert await backlog(app_db) == 0


async def test_an_idle_forwarder_is_woken_by_notify(
    server: ServerProcess, app_db: str, app_conn: Any, target: Target
) -> None:
    async with Forwarder(app_db, server.url, poll_interval=600, concurrency=3):
        # Wait until every worker has gone to sleep (registered, then waiting on LISTEN).
        deadline = time.monotonic() + 30
        while await app_conn.fetchval("SELECT count(*) FROM ap4k_outbox_sleepers") < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        async with app_conn.transaction():
            await outbox.enqueue(app_conn, "wake", target.url, {"n": 1})
        # Long before the next poll: only the NOTIFY can have woken a worker.
        assert await target.wait_for(1, timeout=30)
    # Leaving, the forwarder unregisters its sleepers.
    assert await app_conn.fetchval("SELECT count(*) FROM ap4k_outbox_sleepers") == 0


async def test_every_field_reaches_the_target(
    server: ServerProcess, app_db: str, app_conn: Any, target: Target
) -> None:
    async with Forwarder(app_db, server.url):
        started = time.monotonic()
        async with app_conn.transaction():
            await outbox.enqueue(
                app_conn, "fields", target.url + "/put", {"n": 1},
                method="PUT", headers={"X-Trace": "abc"}, priority=3,
                ordering_key="o-1", max_attempts=2, timeout_seconds=5, delay_seconds=1.0,
            )
        assert await target.wait_for(1, timeout=30)
        waited = time.monotonic() - started
    assert target.bodies == [{"n": 1}]
    assert target.headers[0]["X-Trace"] == "abc"
    assert target.headers[0]["Ap4k-Queue"] == "fields"
    assert waited >= 0.9  # the delay held


async def test_5000_enqueued_while_the_server_is_down(
    make_server: ServerFactory, app_db: str, app_conn: Any, target: Target
) -> None:
    server = await make_server(start=False)
    async with Forwarder(app_db, server.url, max_backoff=0.5, concurrency=2) as forwarder:
        for start in range(0, 5000, 100):
            async with app_conn.transaction():
                if start % 200:
                    await outbox.enqueue_many(
                        app_conn, "outage",
                        [NewMessage(target.url, {"n": start + i}) for i in range(100)],
                    )
                else:
                    for i in range(100):
                        await outbox.enqueue(app_conn, "outage", target.url, {"n": start + i})
        await asyncio.sleep(1.0)
        assert forwarder.forwarded == 0
        assert await backlog(app_db) == 5000
        await server.start()
        await assert_each_once(target, set(range(5000)))
    assert await backlog(app_db) == 0


async def test_forwarder_fails_over_between_servers(
    make_server: ServerFactory, app_db: str, app_conn: Any, target: Target
) -> None:
    # Two replicas on one database. The first only takes messages (no dispatchers), so
    # that stopping it tests the forwarder's failover and nothing else.
    first = await make_server(dispatchers=0)
    second = await make_server(database_url=first.database_url)
    async with Forwarder(app_db, [first.url, second.url], batch_size=50) as forwarder:
        async with app_conn.transaction():
            await outbox.enqueue_many(
                app_conn, "replicas", [NewMessage(target.url, {"n": i}) for i in range(500)]
            )
        deadline = time.monotonic() + 60
        while forwarder.forwarded < 100:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        first.stop()  # mid-drain
        async with app_conn.transaction():
            await outbox.enqueue_many(
                app_conn, "replicas",
                [NewMessage(target.url, {"n": i}) for i in range(500, 1000)],
            )
        await assert_each_once(target, set(range(1000)))
    assert await backlog(app_db) == 0


async def test_bearer_token_and_a_wrong_one(
    make_server: ServerFactory, app_db: str, app_conn: Any, target: Target
) -> None:
    server = await make_server(token="s3cret")
    async with app_conn.transaction():
        await outbox.enqueue_many(
            app_conn, "token", [NewMessage(target.url, {"n": i}) for i in range(10)]
        )
    async with Forwarder(app_db, server.url, token="wrong", max_backoff=0.2) as forwarder:
        await asyncio.sleep(1.0)
        # Refused for the forwarder's setup, not for the messages: nothing set aside.
        assert forwarder.forwarded == forwarder.rejected == 0
        assert (await forwarder.stats()).backlog == 10
    async with Forwarder(app_db, server.url, token="s3cret"):
        await assert_each_once(target, set(range(10)))


async def test_sigkill_mid_batch_loses_and_duplicates_nothing(
    server: ServerProcess, app_db: str, app_conn: Any, target: Target, tmp_path: Path
) -> None:
    total = 2500
    async with app_conn.transaction():
        await outbox.enqueue_many(
            app_conn, "kill", [NewMessage(target.url, {"n": i}) for i in range(total)]
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AP4K_")}
    env.update(AP4K_OUTBOX_URL=app_db, AP4K_SERVER_URL=server.url)
    args = ["forward", "--batch-size", "10", "--concurrency", "3", "--metrics-port", "0"]
    kills = 0
    last = total
    while kills < 3:
        log = tmp_path / f"forward-{kills}.log"
        process = spawn(args, log, env)
        try:
            # Let it forward some batches, then kill it while batches are in flight.
            deadline = time.monotonic() + 60
            while (left := await backlog(app_db)) > last - 200:
                assert process.poll() is None, tail(log)
                assert time.monotonic() < deadline, tail(log)
                await asyncio.sleep(0.01)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        kills += 1
        last = left
    assert 0 < last < total  # the kills did land mid-drain
    process = spawn(args, tmp_path / "forward-final.log", env)
    try:
        await assert_each_once(target, set(range(total)))
    finally:
        process.terminate()
        process.wait()
    assert await backlog(app_db) == 0


async def test_outbox_database_restart_mid_run(
    server: ServerProcess, target: Target, tmp_path: Path
) -> None:
    """The application's PostgreSQL crashes and comes back while the forwarder works:
    it reconnects, and every committed message is delivered once."""
    pg = EmbeddedPostgres(tmp_path / "app-pg")
    pg.init()
    pg.start()
    try:
        await outbox.init(pg.url)
        conn = await asyncpg.connect(pg.url)
        async with conn.transaction():
            await outbox.enqueue_many(
                conn, "restart", [NewMessage(target.url, {"n": i}) for i in range(1500)]
            )
        await conn.close()
        async with Forwarder(pg.url, server.url, batch_size=10, max_backoff=0.3) as forwarder:
            deadline = time.monotonic() + 60
            while forwarder.forwarded < 300:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            pg.kill()  # mid-drain, batches in flight
            assert forwarder.forwarded < 1500
            await asyncio.sleep(0.5)
            pg.start()
            conn = await asyncpg.connect(pg.url)
            async with conn.transaction():  # and the application goes on writing
                await outbox.enqueue_many(
                    conn, "restart",
                    [NewMessage(target.url, {"n": i}) for i in range(1500, 1600)],
                )
            await conn.close()
            await assert_each_once(target, set(range(1600)))
        assert await backlog(pg.url) == 0
    finally:
        pg.stop("immediate")


async def test_resending_an_acknowledged_batch_does_not_duplicate(
    server: ServerProcess, app_db: str, app_conn: Any, target: Target
) -> None:
    """The exact crash window: the server committed the batch, the forwarder died before
    deleting the rows. The next forwarder resends them under the same dedup keys."""
    async with app_conn.transaction():
        await outbox.enqueue_many(
            app_conn, "resend", [NewMessage(target.url, {"n": i}) for i in range(50)]
        )
    identity = await app_conn.fetchval(sql.IDENTITY)
    async with AsyncClient(server.url) as client:
        claimer = await asyncpg.connect(app_db)
        try:
            tx = claimer.transaction()
            await tx.start()
            claimed = await claimer.fetch(sql.CLAIM, 1000)
            payloads = []
            for row in claimed:
                message = orjson.loads(row["message"])
                message["dedup_key"] = f"outbox:{identity}:{row['id']}"
                payloads.append(message)
            first = await client.send_json_batch("resend", payloads)
            await tx.rollback()  # "crash" before the DELETE
        finally:
            await claimer.close()
        assert not any(r.duplicate for r in first)
        async with Forwarder(app_db, server.url) as forwarder:
            await assert_each_once(target, set(range(50)))
            assert forwarder.forwarded == 50
    assert await backlog(app_db) == 0


async def test_two_forwarders_deliver_each_once_and_keep_key_order(
    server: ServerProcess, app_db: str, target: Target
) -> None:
    keys, per_key = 10, 60
    async with (
        Forwarder(app_db, server.url, batch_size=40, concurrency=2) as one,
        Forwarder(app_db, server.url, batch_size=40, concurrency=2) as two,
    ):
        async def producer(key: int) -> None:
            conn = await asyncpg.connect(app_db)
            try:
                for seq in range(per_key):
                    async with conn.transaction():
                        await outbox.enqueue(
                            conn, "pair", target.url,
                            {"n": key * 1000 + seq, "key": key, "seq": seq},
                            ordering_key=f"k{key}",
                        )
                    if seq % 10 == 0:
                        await asyncio.sleep(0.01)
            finally:
                await conn.close()

        await asyncio.gather(*(producer(k) for k in range(keys)))
        expected = {k * 1000 + s for k in range(keys) for s in range(per_key)}
        await assert_each_once(target, expected)
        assert one.forwarded + two.forwarded == keys * per_key
    # The forwarders enqueued each key's messages in outbox order (the server's ids) ...
    conn = await asyncpg.connect(server.database_url)
    try:
        stored = await conn.fetch("SELECT body FROM ap4k_messages WHERE queue = 'pair' ORDER BY id")
    finally:
        await conn.close()
    enqueued: dict[int, list[int]] = defaultdict(list)
    for row in stored:
        body = orjson.loads(row["body"])
        enqueued[body["key"]].append(body["seq"])
    assert all(seqs == list(range(per_key)) for seqs in enqueued.values()), enqueued
    # ... so the server delivered them in that order.
    delivered: dict[int, list[int]] = defaultdict(list)
    for body in target.bodies:
        delivered[body["key"]].append(body["seq"])
    assert all(seqs == list(range(per_key)) for seqs in delivered.values()), delivered


async def test_a_refused_message_is_set_aside_and_the_rest_go_through(
    server: ServerProcess, app_db: str, app_conn: Any, target: Target
) -> None:
    async with AsyncClient(server.url) as client:
        await client.set_queue("strict", allowed_targets=[target.url])
    async with app_conn.transaction():
        for i in range(20):
            url = "http://elsewhere.example/steal" if i == 7 else target.url
            await outbox.enqueue(app_conn, "strict", url, {"n": i})
    async with Forwarder(app_db, server.url, batch_size=100) as forwarder:
        await assert_each_once(target, set(range(20)) - {7})
        stats = await forwarder.stats()
    assert (stats.backlog, stats.rejected) == (0, 1)
    row = await app_conn.fetchrow(
        "SELECT message, last_error FROM ap4k_outbox WHERE rejected_at IS NOT NULL"
    )
    assert orjson.loads(row["message"])["body"] == {"n": 7}
    assert "target" in row["last_error"]


async def test_big_messages_are_split_and_an_oversized_one_is_set_aside(
    server: ServerProcess, app_db: str, app_conn: Any, target: Target
) -> None:
    """The server takes 1 MiB per request: five 300 kB messages need several POSTs, and a
    2 MB one can never go (413) — it is set aside, and the others are not held up."""
    async with app_conn.transaction():
        for i in range(6):
            size = 2_000_000 if i == 3 else 300_000
            await outbox.enqueue(app_conn, "big", target.url, {"n": i, "pad": "x" * size})
    async with Forwarder(app_db, server.url) as forwarder:
        await assert_each_once(target, {0, 1, 2, 4, 5})
        stats = await forwarder.stats()
    assert (stats.backlog, stats.rejected) == (0, 1)
    error = await app_conn.fetchval("SELECT last_error FROM ap4k_outbox")
    assert error.startswith("413")


async def test_cli_forwarder_exports_its_backlog(
    app_db: str, app_conn: Any, tmp_path: Path
) -> None:
    """No server at all: the forwarder backs off, and says so in its metrics."""
    async with app_conn.transaction():
        await outbox.enqueue_many(app_conn, "q", [NewMessage("http://t.local/")] * 7)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AP4K_")}
    env["AP4K_OUTBOX_URL"] = app_db
    log = tmp_path / "forward.log"
    process = spawn(
        ["forward", "--server", f"http://127.0.0.1:{free_port()}", "--metrics-port", str(port),
         "--metrics-host", "127.0.0.1", "--max-backoff", "0.2"],
        log,
        env,
    )
    try:
        await wait_ready(f"http://127.0.0.1:{port}/readyz", 30, None, log)
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as session:
            while True:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                    text = await response.text()
                if "ap4k_outbox_backlog 7.0" in text and (
                    'ap4k_outbox_forward_errors_total{reason="server_unavailable"}' in text
                ):
                    break
                assert process.poll() is None, tail(log)
                assert time.monotonic() < deadline, text
                await asyncio.sleep(0.2)
    finally:
        process.terminate()
        assert process.wait(timeout=20) == 0, tail(log)
    assert await backlog(app_db) == 7


async def test_cli_forwarder_waits_for_its_database(
    postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    """Started before the application's database exists, `ap4k forward` keeps trying (not
    ready meanwhile) and comes up once it does, creating the outbox table itself."""
    url = postgres.database_url("late_app")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AP4K_")}
    log = tmp_path / "forward.log"
    process = spawn(
        ["forward", "--outbox-url", url, "--server", f"http://127.0.0.1:{free_port()}",
         "--metrics-port", str(port), "--metrics-host", "127.0.0.1", "--max-backoff", "0.3"],
        log,
        env,
    )
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while True:  # alive, not ready
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                        assert response.status == 503
                        break
                assert process.poll() is None, tail(log)
                assert time.monotonic() < deadline, tail(log)
                await asyncio.sleep(0.1)
            conn = await asyncpg.connect(postgres.url)
            await conn.execute('CREATE DATABASE "late_app"')
            await conn.close()
            await wait_ready(f"http://127.0.0.1:{port}/readyz", 30, process, log)
        assert await backlog(url) == 0  # the table exists: the forwarder created it
    finally:
        process.terminate()
        assert process.wait(timeout=20) == 0, tail(log)
