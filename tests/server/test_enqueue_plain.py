"""The plain-batch enqueue statement (queries.ENQUEUE_PLAIN: a queue and two typed arrays)
writes what the general one (queries.ENQUEUE_NEW, the JSON document) writes for the same
messages, and is taken only for messages with nothing but a target, a body and a timeout.
Real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from ap4k.core import wire
from ap4k.server import queries
from ap4k.server.store import EnqueueRow, Store, enqueue_document, plain_timeout


def plain(queue: str, path: str, body: bytes | None, timeout: float = 30.0) -> EnqueueRow:
    target = "http://127.0.0.1:9/" + path
    message = wire.MessageIn(target=target, timeout_seconds=timeout)
    return EnqueueRow(queue=queue, message=message, target=target, body=body)


# Every column but the ones a sequence or the clock gives, and whether it is due now.
COLUMNS = """
SELECT queue, state::text, target, method, headers, body, priority, dedup_key, ordering_key,
       attempt, max_attempts, timeout_seconds, scheduled_at = created_at AS due_now,
       attempted_at, finalized_at, leased_by, lease_expires_at, last_error, callback,
       failure_callback, flow_key, lease_order >> 42 AS priority_bits
  FROM ap4k_messages WHERE id = ANY($1::bigint[]) ORDER BY array_position($1::bigint[], id)
"""


async def test_a_plain_batch_is_stored_as_the_json_document_would_store_it(
    database_url: str,
) -> None:
    rows = [
        plain("plain-a", "1", b'{"n":1}'),
        plain("plain-b", "2", None),
        plain("plain-a", "3", b'"\\u0000 and \xc3\xa9"'),
        plain("plain-b", "4", b"[1, 2.50, null]"),
    ]
    assert plain_timeout(rows) == 30.0
    store = await Store.connect(database_url, min_size=1, max_size=2)
    try:
        await store.migrate()
        await store.ensure_queues(["plain-a", "plain-b"])
        fast = await store.enqueue(rows)
        async with store.pool.acquire() as conn:
            general = await conn.fetch(queries.ENQUEUE_NEW, enqueue_document(rows), 30.0)
            ids = [r["id"] for r in general]
            assert ids == sorted(ids)
            stored_fast = await conn.fetch(COLUMNS, [r[0] for r in fast])
            stored_general = await conn.fetch(COLUMNS, ids)
    finally:
        await store.close()
    # Each queue's ids in input order (a request's rows are all for one queue), every
    # message available now, as the general statement answers.
    for queue in ("plain-a", "plain-b"):
        ids_of_queue = [r[0] for r, row in zip(fast, rows, strict=True) if row.queue == queue]
        assert ids_of_queue == sorted(ids_of_queue)
    assert [(state, dup) for _, state, dup in fast] == [("available", False)] * 4
    assert [r["state"] for r in general] == ["available"] * 4
    assert [dict(r) for r in stored_fast] == [dict(r) for r in stored_general]
    assert [(r["queue"], r["target"], r["body"]) for r in stored_fast] == [
        (r.queue, r.target, r.body) for r in rows
    ]
    assert all(r["due_now"] and r["timeout_seconds"] == 30.0 for r in stored_fast)


NOT_PLAIN: dict[str, dict[str, Any]] = {
    "method": {"method": "PUT"},
    "headers": {"headers": {"X-A": "1"}},
    "priority": {"priority": 5},
    "dedup_key": {"dedup_key": "k"},
    "ordering_key": {"ordering_key": "k"},
    "flow_key": {"flow_key": "k"},
    "max_attempts": {"max_attempts": 3},
    "delay_seconds": {"delay_seconds": 2.0},
    "not_before": {"not_before": datetime(2030, 1, 1, tzinfo=UTC)},
    "another timeout": {"timeout_seconds": 5.0},
    "no timeout": {"timeout_seconds": None},
}


@pytest.mark.parametrize("field", sorted(NOT_PLAIN))
def test_a_batch_with_anything_more_than_a_target_and_a_body_takes_the_document(
    field: str,
) -> None:
    target = "http://127.0.0.1:9/x"
    settings = {"timeout_seconds": 30.0, **NOT_PLAIN[field]}
    other = EnqueueRow("q", wire.MessageIn(target=target, **settings), target, b"{}")
    assert plain_timeout([plain("q", "y", b"{}"), other]) is None
    assert plain_timeout([plain("q", "y", b"{}"), plain("q", "z", None)]) == 30.0


@pytest.mark.parametrize("extra", ["leased_by", "callback", "failure_callback"])
def test_a_lease_or_a_callback_takes_the_document(extra: str) -> None:
    row = plain("q", "y", b"{}")
    value = "dispatcher-1" if extra == "leased_by" else "http://127.0.0.1:9/cb"
    other = EnqueueRow(
        row.queue, row.message, row.target, row.body, **{extra: value}
    )
    assert plain_timeout([row, other]) is None


async def test_a_refused_row_in_a_plain_batch_is_a_data_error(database_url: str) -> None:
    """The inserter's backstop (a row PostgreSQL refuses fails its own request only)
    relies on a DataError from either statement."""
    store = await Store.connect(database_url, min_size=1, max_size=2)
    try:
        await store.migrate()
        await store.ensure_queues(["plain-a"])
        rows = [plain("plain-a", "ok", b"{}"), plain("plain-a", "\x00", b"{}")]
        assert plain_timeout(rows) == 30.0
        with pytest.raises(asyncpg.DataError):
            await store.enqueue(rows)
        # Requests for two queues share the group: one statement per queue, in one
        # transaction, so the first queue's rows do not stay behind when the second fails
        # (the inserter then inserts each request again on its own).
        await store.ensure_queues(["plain-b"])
        rows = [plain("plain-a", "ok", b"{}"), plain("plain-b", "\x00", b"{}")]
        with pytest.raises(asyncpg.DataError):
            await store.enqueue(rows)
        async with store.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM ap4k_messages") == 0
    finally:
        await store.close()


def test_every_field_of_a_message_is_either_plain_or_sends_the_document() -> None:
    """A field added to `wire.MessageIn` must be looked at by `plain_timeout`, or
    ENQUEUE_PLAIN would store such messages without it: this fails until it is (and a case
    for it is added to NOT_PLAIN)."""
    plain_fields = {"target", "body", "timeout_seconds"}
    # Checked on the row (`EnqueueRow.callback`, resolved from the message's) by the test above.
    on_the_row = {"callback", "failure_callback"}
    assert set(wire.MessageIn.__struct_fields__) == plain_fields | on_the_row | (
        set(NOT_PLAIN) & set(wire.MessageIn.__struct_fields__)
    )
