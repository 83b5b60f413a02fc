"""The outbox in the application's database: schema, enqueue within the caller's
transaction (asyncpg and psycopg), rollback, and one NOTIFY per transaction."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import psycopg
import pytest

from ap4k import outbox
from ap4k.client import NewMessage
from ap4k.core.embedded_pg import EmbeddedPostgres
from ap4k.outbox import sql

from .conftest import create_database


async def rows(conn: Any) -> list[Any]:
    return list(
        await conn.fetch(
            "SELECT id, queue, message, ordering_key, not_before, created_at "
            "FROM ap4k_outbox ORDER BY id"
        )
    )


async def test_init_is_idempotent_and_safe_to_run_concurrently(
    postgres: EmbeddedPostgres,
) -> None:
    url = await create_database(postgres, "init")
    results = await asyncio.gather(*(outbox.init(url) for _ in range(4)))
    assert sorted(results, key=len) == [[], [], [], [1, 2]]  # applied exactly once
    assert await outbox.init(url) == []
    conn = await asyncpg.connect(url)
    try:
        versions = await conn.fetch("SELECT version FROM ap4k_outbox_migrations")
        identity = await conn.fetchval(sql.IDENTITY)
    finally:
        await conn.close()
    assert [r["version"] for r in versions] == [1, 2]
    assert len(identity) == 36  # a UUID: this outbox's identity in dedup keys


async def test_cli_outbox_init(postgres: EmbeddedPostgres) -> None:
    url = await create_database(postgres, "cli")
    for expected in ("applied: 0001, 0002", "up to date"):
        assert expected in await ap4k_cli("outbox", "init", "--database-url", url)
    assert "backlog: 0" in await ap4k_cli("outbox", "status", "--database-url", url)


async def ap4k_cli(*args: str) -> str:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ap4k.cli", *args],
        capture_output=True, text=True, check=True, timeout=60,
    )
    return done.stdout


async def test_enqueue_commits_with_the_transaction(app_db: str, app_conn: Any) -> None:
    async with app_conn.transaction():
        await app_conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, item text)")
    async with app_conn.transaction():
        order_id = await app_conn.fetchval("INSERT INTO orders (item) VALUES ('tea') RETURNING id")
        row_id = await outbox.enqueue(
            app_conn, "orders", "http://billing.local/charge", {"order": order_id},
            method="PUT", headers={"X-Trace": "t-1"}, priority=5, dedup_key="order-1",
            ordering_key="customer-7", max_attempts=3, timeout_seconds=2.5,
        )
        # Not visible to anyone else before the commit.
        other = await asyncpg.connect(app_db)
        try:
            assert await other.fetchval("SELECT count(*) FROM ap4k_outbox") == 0
        finally:
            await other.close()
    [row] = await rows(app_conn)
    assert row["id"] == row_id
    assert row["queue"] == "orders"
    assert row["ordering_key"] == "customer-7"
    assert row["not_before"] is None
    assert orjson.loads(row["message"]) == {
        "target": "http://billing.local/charge",
        "body": {"order": order_id},
        "method": "PUT",
        "headers": {"X-Trace": "t-1"},
        "priority": 5,
        "dedup_key": "order-1",
        "ordering_key": "customer-7",
        "max_attempts": 3,
        "timeout_seconds": 2.5,
    }


async def test_rolled_back_transaction_leaves_no_message(app_conn: Any) -> None:
    async def place_order() -> None:
        async with app_conn.transaction():
            await outbox.enqueue(app_conn, "orders", "http://billing.local/charge", {"n": 1})
            await outbox.enqueue_many(
                app_conn, "orders", [NewMessage("http://billing.local/x", {"n": 2})]
            )
            raise RuntimeError("payment failed")

    with pytest.raises(RuntimeError, match="payment failed"):
        await place_order()
    assert await rows(app_conn) == []


async def test_delays_become_absolute_times(app_conn: Any) -> None:
    later = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
    async with app_conn.transaction():
        now = await app_conn.fetchval("SELECT now()")
        await outbox.enqueue(app_conn, "q", "/a", delay_seconds=90)
        await outbox.enqueue(app_conn, "q", "/b", not_before=later)
        await outbox.enqueue_many(
            app_conn, "q",
            [{"target": "/c", "delay_seconds": 30}, NewMessage("/d"),
             {"target": "/e", "not_before": "2031-01-02T03:04:05Z"}],
        )
    delayed, absolute, many_delayed, immediate, from_text = await rows(app_conn)
    assert from_text["not_before"] == later
    assert delayed["not_before"] == now + timedelta(seconds=90)
    assert absolute["not_before"] == later
    assert many_delayed["not_before"] == now + timedelta(seconds=30)
    assert immediate["not_before"] is None
    assert "delay_seconds" not in orjson.loads(delayed["message"])


async def test_enqueue_many_keeps_the_order(app_conn: Any) -> None:
    messages = [NewMessage("/t", {"n": i}, ordering_key="k") for i in range(250)]
    async with app_conn.transaction():
        ids = await outbox.enqueue_many(app_conn, "q", messages)
    assert ids == sorted(ids)
    stored = await rows(app_conn)
    assert [orjson.loads(r["message"])["body"]["n"] for r in stored] == list(range(250))


async def test_one_notify_per_transaction_and_only_for_a_sleeping_forwarder(
    app_db: str, app_conn: Any
) -> None:
    listener = await asyncpg.connect(app_db)
    received: list[str] = []
    await listener.add_listener(sql.CHANNEL, lambda *args: received.append(args[2]))

    async def transactions() -> int:
        received.clear()
        async with app_conn.transaction():
            for i in range(200):
                await outbox.enqueue(app_conn, "q", "/t", {"n": i})
        async with app_conn.transaction():
            await outbox.enqueue_many(app_conn, "q", [NewMessage("/t")] * 50)
        async with app_conn.transaction():
            await outbox.enqueue(app_conn, "q", "/t", notify=False)

        async def rolled_back() -> None:
            async with app_conn.transaction():
                await outbox.enqueue(app_conn, "q", "/t")
                raise RuntimeError("rolled back: no NOTIFY either")

        with pytest.raises(RuntimeError):
            await rolled_back()
        await asyncio.sleep(0.3)
        return len(received)

    try:
        # No forwarder asleep (all busy, or none running): no NOTIFY at all.
        assert await transactions() == 0
        # A forwarder worker waits on LISTEN: one NOTIFY per committed transaction.
        await app_conn.execute(sql.SLEEP, "worker-1")
        await app_conn.execute(sql.SLEEP, "worker-2")
        assert await transactions() == 2
        # A sleeper that stopped refreshing its heartbeat (killed) is ignored.
        await app_conn.execute(
            "UPDATE ap4k_outbox_sleepers SET heartbeat = now() - interval '1 minute'"
        )
        assert await transactions() == 0
    finally:
        await listener.close()


async def test_invalid_messages_are_refused_before_any_write(app_conn: Any) -> None:
    with pytest.raises(ValueError, match="not both"):
        await outbox.enqueue(
            app_conn, "q", "/t", delay_seconds=1, not_before=datetime.now(UTC)
        )
    with pytest.raises(ValueError, match="target"):
        await outbox.enqueue(app_conn, "q", "")
    with pytest.raises(ValueError, match="queue"):
        await outbox.enqueue(app_conn, "", "/t")
    with pytest.raises(ValueError, match="timezone"):
        await outbox.enqueue(app_conn, "q", "/t", not_before=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="unknown message field"):
        await outbox.enqueue_many(app_conn, "q", [{"target": "/t", "prio": 1}])
    assert await outbox.enqueue_many(app_conn, "q", []) == []
    assert await rows(app_conn) == []


def test_psycopg_enqueue_sync_commit_and_rollback(app_db: str) -> None:
    with psycopg.connect(app_db) as conn:
        row_id = outbox.enqueue_sync(
            conn, "mail", "http://mailer.local/send", {"to": "a@example.com"},
            delay_seconds=5, dedup_key="mail-1",
        )
        ids = outbox.enqueue_many_sync(
            conn, "mail", [NewMessage("/x", {"n": i}) for i in range(3)]
        )
        conn.commit()
        outbox.enqueue_sync(conn, "mail", "http://mailer.local/send", {"lost": True})
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("SELECT id, message, not_before IS NOT NULL FROM ap4k_outbox ORDER BY id")
            stored = cur.fetchall()
    assert [r[0] for r in stored] == [row_id, *ids]
    assert stored[0][1]["dedup_key"] == "mail-1"
    assert stored[0][2] is True
    assert all(not (r[1].get("body") or {}).get("lost") for r in stored)


def test_psycopg_migrate_sync(postgres: EmbeddedPostgres) -> None:
    url = asyncio.run(create_database(postgres, "sync"))
    with psycopg.connect(url) as conn:
        assert outbox.migrate_sync(conn) == [1, 2]
        assert outbox.migrate_sync(conn) == []


async def test_psycopg_async_connection(app_db: str) -> None:
    async with await psycopg.AsyncConnection.connect(app_db) as conn:
        await outbox.enqueue(conn, "q", "/a", {"n": 1})
        await outbox.enqueue_many(conn, "q", [NewMessage("/b", {"n": 2})])
        await conn.rollback()
        await outbox.enqueue(conn, "q", "/c", {"n": 3})
        await conn.commit()
        cur = await conn.execute("SELECT message->'body'->>'n' FROM ap4k_outbox")
        assert [r[0] for r in await cur.fetchall()] == ["3"]
