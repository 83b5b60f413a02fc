"""Write messages into the outbox with the application's own connection and transaction.

Nothing here commits: the row becomes visible to the forwarder when — and only if — the
caller's transaction commits. A rolled-back transaction leaves no message behind.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Unpack

import orjson

from ap4k.client.models import JSON, MessageOptions, NewMessage
from ap4k.outbox import sql

# (queue, message JSON without the delay, ordering_key, not_before ISO, delay seconds)
Row = tuple[str, str, str | None, str | None, float | None]


def to_row(queue: str, message: NewMessage | Mapping[str, JSON]) -> Row:
    """The outbox columns of one message (validated by `NewMessage`)."""
    if not isinstance(queue, str) or not queue:
        raise ValueError("queue must be a non-empty string")
    if not isinstance(message, NewMessage):
        message = NewMessage.from_mapping(message)
    payload = message.to_json()
    # The delay is stored as an absolute time (see the table's comments), not in the JSON.
    payload.pop("delay_seconds", None)
    payload.pop("not_before", None)
    return (
        queue,
        orjson.dumps(payload).decode(),
        message.ordering_key,
        None if message.not_before is None else message.not_before.isoformat(),
        message.delay_seconds,
    )


def _columns(
    rows: list[Row],
) -> tuple[str, list[str], list[str | None], list[str | None], list[str | None]]:
    queues = {row[0] for row in rows}
    if len(queues) != 1:
        raise ValueError("enqueue_many takes messages for one queue")
    return (
        rows[0][0],
        [row[1] for row in rows],
        [row[2] for row in rows],
        [row[3] for row in rows],
        [None if row[4] is None else repr(float(row[4])) for row in rows],
    )


def _is_asyncpg(conn: Any) -> bool:
    return type(conn).__module__.startswith("asyncpg")


async def enqueue(
    conn: Any,
    queue: str,
    target: str,
    body: JSON = None,
    *,
    notify: bool = True,
    **options: Unpack[MessageOptions],
) -> int:
    """Add a message to the outbox within `conn`'s current transaction; returns the row id.

    `conn` is an asyncpg connection (or a psycopg 3 AsyncConnection). With `notify`, the
    forwarder is woken at commit; without, it finds the row at its next poll.
    """
    message = NewMessage(target, body=body, **options)
    row = to_row(queue, message)
    statement = sql.ENQUEUE_NOTIFY if notify else sql.ENQUEUE
    if _is_asyncpg(conn):
        # asyncpg wants the real types, not text.
        not_before_value = message.not_before
        record = await conn.fetchrow(statement, row[0], row[1], row[2], not_before_value, row[4])
        return int(record["id"])
    async with conn.cursor() as cur:
        await cur.execute(sql.psycopg_sql(statement), row)
        result = await cur.fetchone()
    return int(result[0])


async def enqueue_many(
    conn: Any,
    queue: str,
    messages: Iterable[NewMessage | Mapping[str, JSON]],
    *,
    notify: bool = True,
) -> list[int]:
    """Add many messages for one queue in one statement; returns their row ids, in order."""
    rows = [to_row(queue, m) for m in messages]
    if not rows:
        return []
    columns = _columns(rows)
    if _is_asyncpg(conn):
        records = await conn.fetch(sql.ENQUEUE_MANY, *columns)
        if notify:
            await conn.execute(sql.NOTIFY)
        return [int(r["id"]) for r in records]
    async with conn.cursor() as cur:
        await cur.execute(sql.psycopg_sql(sql.ENQUEUE_MANY), columns)
        ids = [int(r[0]) for r in await cur.fetchall()]
        if notify:
            await cur.execute(sql.NOTIFY)
    return ids


def enqueue_sync(
    conn: Any,
    queue: str,
    target: str,
    body: JSON = None,
    *,
    notify: bool = True,
    **options: Unpack[MessageOptions],
) -> int:
    """`enqueue` for a psycopg 3 (synchronous) connection, within its current transaction."""
    message = NewMessage(target, body=body, **options)
    row = to_row(queue, message)
    statement = sql.ENQUEUE_NOTIFY if notify else sql.ENQUEUE
    with conn.cursor() as cur:
        cur.execute(sql.psycopg_sql(statement), row)
        result = cur.fetchone()
    return int(result[0])


def enqueue_many_sync(
    conn: Any,
    queue: str,
    messages: Iterable[NewMessage | Mapping[str, JSON]],
    *,
    notify: bool = True,
) -> list[int]:
    """`enqueue_many` for a psycopg 3 (synchronous) connection."""
    rows = [to_row(queue, m) for m in messages]
    if not rows:
        return []
    with conn.cursor() as cur:
        cur.execute(sql.psycopg_sql(sql.ENQUEUE_MANY), _columns(rows))
        ids = [int(r[0]) for r in cur.fetchall()]
        if notify:
            cur.execute(sql.NOTIFY)
    return ids
