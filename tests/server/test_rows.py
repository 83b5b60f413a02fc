"""The store's typed rows (rows.py) against the statements that fill them (queries.py)."""

from __future__ import annotations

import asyncpg
import msgspec
import pytest

from ap4k.core import wire
from ap4k.server import queries, rows
from ap4k.server.store import Store, _rows

# Every statement whose result the store turns into a typed row, with that row.
STATEMENTS: list[tuple[str, str, type[msgspec.Struct]]] = [
    ("LEASE", queries.LEASE, rows.LeasedRow),
    ("RECORD_OUTCOMES", queries.RECORD_OUTCOMES, rows.FinishedRow),
    ("COMPLETE", queries.COMPLETE, rows.FinishedRow),
    ("RELEASE", queries.RELEASE, rows.ReleasedRow),
    ("EXTEND", queries.EXTEND, rows.ExtendedRow),
    ("RESCUE_EXPIRED", queries.RESCUE_EXPIRED, rows.RescuedRow),
    ("COMPLETED_WITHIN", queries.COMPLETED_WITHIN, rows.QueueCountRow),
    ("FAILED_WITHIN", queries.FAILED_WITHIN, rows.QueueCountRow),
    ("QUEUE_DEPTHS", queries.QUEUE_DEPTHS, rows.DepthRow),
    ("QUEUE_DEPTHS_OF_ONE", queries.QUEUE_DEPTHS_OF_ONE, rows.DepthRow),
    ("GET_MESSAGE", queries.GET_MESSAGE, rows.MessageDetailRow),
    ("GET_ATTEMPTS", queries.GET_ATTEMPTS, rows.AttemptRow),
    ("LIST_DEAD", queries.LIST_DEAD, rows.MessageRow),
    *[
        (f"LIST_MESSAGES[{key}]", sql, rows.MessageRow)
        for key, sql in queries.LIST_MESSAGES.items()
    ],
    ("CANCEL_MESSAGE", queries.CANCEL_MESSAGE, rows.CancelledRow),
    ("PUT_SCHEDULE", queries.PUT_SCHEDULE, rows.ScheduleRow),
    ("GET_SCHEDULE", queries.GET_SCHEDULE, rows.ScheduleRow),
    ("LIST_SCHEDULES", queries.LIST_SCHEDULES, rows.ScheduleRow),
    ("DUE_SCHEDULES", queries.DUE_SCHEDULES, rows.DueScheduleRow),
    ("PUT_TOPIC", queries.PUT_TOPIC, rows.TopicRow),
    ("GET_TOPIC", queries.GET_TOPIC, rows.TopicRow),
    ("LIST_TOPICS", queries.LIST_TOPICS, rows.TopicRow),
    ("RECORD_CIRCUITS", queries.RECORD_CIRCUITS, rows.CircuitChangeRow),
    ("LIST_CIRCUITS", queries.LIST_CIRCUITS, wire.Circuit),
    ("HELD_CIRCUITS", queries.HELD_CIRCUITS, rows.QueueCountRow),
    ("LIST_FLOW_KEYS", queries.LIST_FLOW_KEYS, wire.FlowKey),
]


async def test_each_row_has_its_statements_columns_in_order(database_url: str) -> None:
    """PostgreSQL describes each prepared statement's result (nothing runs): its columns
    are the row's fields, in order, also for statements that seldom return anything."""
    store = await Store.connect(database_url, min_size=1, max_size=1)
    try:
        await store.migrate()
        async with store.pool.acquire() as conn:
            for name, sql, row in STATEMENTS:
                statement = await conn.prepare(sql)
                columns = tuple(a.name for a in statement.get_attributes())
                assert columns == row.__struct_fields__, name
    finally:
        await store.close()


async def test_a_result_that_does_not_match_its_row_is_refused(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        swapped = await conn.fetch("SELECT 'q' AS queue, 1::bigint AS id")
        with pytest.raises(TypeError, match=r"ReleasedRow has the fields \('id', 'queue'\)"):
            _rows(rows.ReleasedRow, swapped)
        matching = await conn.fetch("SELECT 1::bigint AS id, 'q' AS queue")
        assert _rows(rows.ReleasedRow, matching) == [rows.ReleasedRow(id=1, queue="q")]
    finally:
        await conn.close()
