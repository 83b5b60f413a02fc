"""The server's access to PostgreSQL: a connection pool and one method per statement.

Every statement lives in `queries.py`; this module binds parameters and shapes results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import msgspec

from ap4k.core import wire
from ap4k.server import queries
from ap4k.server.migrate import migrate

STATES = ("available", "scheduled", "running", "retryable", "discarded")

# How many rows one upkeep statement takes at most: each holds its locks for a short while,
# and the callers loop until a batch comes back short.
RESCUE_BATCH = 1000
PROMOTE_BATCH = 5000
PRUNE_BATCH = 10000

Row = TypeVar("Row")


def _rows(cls: type[Row], records: list[asyncpg.Record]) -> list[Row]:
    """Records as the typed rows below: each class's fields are its statement's columns."""
    return [cls(**r) for r in records]


@dataclass(frozen=True, slots=True)
class LeasedRow:
    """A message just leased (`ap4k_lease_v1`)."""

    id: int
    target: str
    method: str
    headers: str | None  # JSON
    body: bytes | None  # JSON
    attempt: int
    max_attempts: int
    timeout_seconds: float
    created_at: datetime
    ordering_key: str | None
    lease_order: int
    lease_expires_at: datetime


@dataclass(frozen=True, slots=True)
class FinishedRow:
    """A message whose outcome was recorded (RECORD_OUTCOMES, COMPLETE)."""

    id: int
    queue: str
    state: str  # completed | retryable | discarded
    ordering_key: str | None
    created_at: float  # epoch seconds


@dataclass(frozen=True, slots=True)
class ReleasedRow:
    id: int
    queue: str


@dataclass(frozen=True, slots=True)
class ExtendedRow:
    id: int
    lease_expires_at: datetime


@dataclass(frozen=True, slots=True)
class RescuedRow:
    queue: str
    state: str  # retryable | discarded


@dataclass(frozen=True, slots=True)
class CancelledRow:
    id: int
    queue: str
    state: str


@dataclass(frozen=True, slots=True)
class MessageRow:
    """A message as GET /v1/messages/{id} and the dead letters show it (MESSAGE_COLUMNS)."""

    id: int
    queue: str
    state: str
    target: str
    method: str
    headers: str | None  # JSON
    body: bytes | None  # JSON
    priority: int
    dedup_key: str | None
    ordering_key: str | None
    attempt: int
    max_attempts: int | None
    timeout_seconds: float
    last_error: str | None
    created_at: datetime
    scheduled_at: datetime | None
    attempted_at: datetime | None
    finalized_at: datetime | None


@dataclass(frozen=True, slots=True)
class QueueSettings:
    name: str
    max_attempts: int
    min_backoff_seconds: float
    max_backoff_seconds: float
    rate_limit_per_second: float | None
    max_concurrency: int | None
    paused: bool
    base_url: str | None
    allowed_targets: tuple[str, ...]
    signing_secret: str | None

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> QueueSettings:
        """A row of QUEUE_COLUMNS, which are this class's fields."""
        return cls(**{**r, "allowed_targets": tuple(r["allowed_targets"] or ())})

    @classmethod
    def from_view(cls, name: str, view: wire.QueueSettingsView) -> QueueSettings:
        """`view`'s settings (with no signing secret): `wire.QueueSettingsView()` holds a new
        queue's defaults."""
        shown = {f: getattr(view, f) for f in _SHOWN}
        shown["allowed_targets"] = tuple(view.allowed_targets)
        return cls(name=name, signing_secret=None, **shown)

    def public(self) -> wire.QueueSettingsView:
        """The settings as the API shows them: the signing secret never leaves the server."""
        shown = {f: getattr(self, f) for f in _SHOWN}
        shown["allowed_targets"] = list(self.allowed_targets)
        return wire.QueueSettingsView(**shown, signing_secret_set=self.signing_secret is not None)


# The settings the API shows as they are (all but the secret, shown only as "is set").
_SHOWN = tuple(f for f in wire.QueueSettingsView.__struct_fields__ if f != "signing_secret_set")


@dataclass(slots=True)
class QueueDepth:
    counts: dict[str, int]
    oldest_available_age_seconds: float


@dataclass(frozen=True, slots=True)
class EnqueueRow:
    """One message for the ENQUEUE statement."""

    queue: str
    message: wire.MessageIn  # checked and normalised by validation.parse_enqueue
    target: str  # the absolute URL the message's target resolved to
    body: bytes | None  # JSON
    leased_by: str | None = None  # handed straight to this dispatcher


def _enqueue_columns(rows: Sequence[EnqueueRow]) -> list[list[Any]]:
    """ENQUEUE's array parameters, in its column order."""
    messages = [r.message for r in rows]
    return [
        [r.queue for r in rows],
        [r.target for r in rows],
        [m.method for m in messages],
        [None if not m.headers else msgspec.json.encode(m.headers).decode() for m in messages],
        [r.body for r in rows],
        [m.priority for m in messages],
        [m.dedup_key for m in messages],
        [m.ordering_key for m in messages],
        [m.max_attempts for m in messages],
        [m.timeout_seconds for m in messages],
        [m.delay_seconds for m in messages],
        [m.not_before for m in messages],
        [r.leased_by for r in rows],
    ]


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    """No reset query on release: we keep no session state, and the reset round trip
    (RESET ALL; UNLISTEN *; …) would cost as much as the statement it follows."""

    def get_reset_query(self) -> str:
        return ""


class Store:
    """Two pools on one database. Enqueues (and the API) commit durably: a 202 means the
    message is on disk. Leases, outcomes and upkeep commit with synchronous_commit off:
    losing the last few hundred milliseconds of those in a crash only means a message is
    leased again or delivered again — at-least-once allows that — and it takes an fsync
    off the delivery path."""

    def __init__(self, pool: asyncpg.Pool, dispatch_pool: asyncpg.Pool | None = None) -> None:
        self.pool = pool
        self.dispatch_pool = dispatch_pool or pool

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 2, max_size: int = 8) -> Store:
        async def create(synchronous_commit: str) -> asyncpg.Pool:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                connection_class=_Connection,
                statement_cache_size=256,
                server_settings={
                    "application_name": "ap4k",
                    "synchronous_commit": synchronous_commit,
                },
            )
            assert pool is not None
            return pool

        return cls(await create("on"), await create("off"))

    async def close(self) -> None:
        await self.pool.close()
        if self.dispatch_pool is not self.pool:
            await self.dispatch_pool.close()

    async def migrate(self) -> list[int]:
        async with self.pool.acquire() as conn:
            return await migrate(conn)

    # -- enqueue --------------------------------------------------------------------------

    async def enqueue(
        self, rows: Sequence[EnqueueRow], lease_seconds: float = 30.0
    ) -> list[tuple[int, str, bool]]:
        """Insert rows in one statement; per row (id, state, duplicate), in input order."""
        columns = _enqueue_columns(rows)
        async with self.pool.acquire() as conn:
            records = await conn.fetch(queries.ENQUEUE, *columns, lease_seconds)
            results = [(r["id"], r["state"], r["duplicate"]) for r in records]
            for i, (msg_id, _, _) in enumerate(results):
                if msg_id is None:  # a duplicate committed concurrently with us
                    again = await conn.fetchrow(
                        queries.FIND_BY_DEDUP_KEY, rows[i].queue, rows[i].message.dedup_key
                    )
                    assert again is not None
                    results[i] = (again["id"], again["state"], True)
        return results

    # -- leases and outcomes -------------------------------------------------------------

    async def lease(
        self,
        queue: str,
        limit: int,
        leased_by: str,
        lease_seconds: float,
        floor: int,
        cover_timeout: bool,
    ) -> list[LeasedRow]:
        async with self.dispatch_pool.acquire() as conn:
            records = await conn.fetch(
                queries.LEASE, queue, limit, leased_by, lease_seconds, floor, cover_timeout
            )
        return _rows(LeasedRow, records)

    async def record_outcomes(
        self,
        leased_by: str,
        ids: Sequence[int],
        attempts: Sequence[int],
        verdicts: Sequence[str],
        retry_afters: Sequence[float | None],
        errors: Sequence[str | None],
    ) -> list[FinishedRow]:
        async with self.dispatch_pool.acquire() as conn:
            records = await conn.fetch(
                queries.RECORD_OUTCOMES, ids, attempts, verdicts, retry_afters, errors, leased_by
            )
        return _rows(FinishedRow, records)

    async def complete(
        self, leased_by: str, ids: Sequence[int], attempts: Sequence[int]
    ) -> list[FinishedRow]:
        async with self.dispatch_pool.acquire() as conn:
            records = await conn.fetch(queries.COMPLETE, ids, attempts, leased_by)
        return _rows(FinishedRow, records)

    async def release(
        self, leased_by: str, ids: Sequence[int], attempts: Sequence[int]
    ) -> list[ReleasedRow]:
        async with self.dispatch_pool.acquire() as conn:
            records = await conn.fetch(queries.RELEASE, ids, attempts, leased_by)
        return _rows(ReleasedRow, records)

    async def extend(
        self, leased_by: str, ids: Sequence[int], attempts: Sequence[int], seconds: float
    ) -> list[ExtendedRow]:
        async with self.dispatch_pool.acquire() as conn:
            records = await conn.fetch(queries.EXTEND, ids, attempts, leased_by, seconds)
        return _rows(ExtendedRow, records)

    # -- maintenance ----------------------------------------------------------------------

    async def rescue_expired(self, limit: int = RESCUE_BATCH) -> list[RescuedRow]:
        async with self.dispatch_pool.acquire() as conn:
            records = await conn.fetch(queries.RESCUE_EXPIRED, limit)
        return _rows(RescuedRow, records)

    async def promote_due(self, limit: int = PROMOTE_BATCH) -> list[str]:
        """The queue of each message made available (one entry per message)."""
        async with self.dispatch_pool.acquire() as conn:
            return [r["queue"] for r in await conn.fetch(queries.PROMOTE_DUE, limit)]

    async def seconds_until_next_due(self) -> float | None:
        async with self.dispatch_pool.acquire() as conn:
            value: float | None = await conn.fetchval(queries.SECONDS_UNTIL_NEXT_DUE)
            return value

    async def prune_finished(self, older_than_seconds: float, limit: int = PRUNE_BATCH) -> int:
        async with self.dispatch_pool.acquire() as conn:
            status: str = await conn.execute(queries.PRUNE_FINISHED, older_than_seconds, limit)
        return int(status.split()[-1])

    async def depths(self, queue: str | None = None) -> dict[str, QueueDepth]:
        async with self.pool.acquire() as conn:
            if queue is None:
                records = await conn.fetch(queries.QUEUE_DEPTHS)
            else:
                records = await conn.fetch(queries.QUEUE_DEPTHS_OF_ONE, queue)
        out: dict[str, QueueDepth] = {}
        for r in records:
            depth = out.setdefault(r["queue"], QueueDepth(dict.fromkeys(STATES, 0), 0.0))
            depth.counts[r["state"]] = r["n"]
            if r["state"] == "available":
                depth.oldest_available_age_seconds = max(r["oldest"] or 0.0, 0.0)
        return out

    async def completed_within(self, seconds: float) -> dict[str, int]:
        """Messages delivered per queue over the last `seconds`."""
        async with self.pool.acquire() as conn:
            records = await conn.fetch(queries.COMPLETED_WITHIN, seconds)
        return {r["queue"]: r["n"] for r in records}

    async def notify(self, channel: str, payload: str) -> None:
        async with self.dispatch_pool.acquire() as conn:
            await conn.execute(queries.NOTIFY, channel, payload)

    # -- messages -------------------------------------------------------------------------

    async def get_message(self, msg_id: int) -> MessageRow | None:
        async with self.pool.acquire() as conn:
            record = await conn.fetchrow(queries.GET_MESSAGE, msg_id)
        return None if record is None else MessageRow(**record)

    async def cancel_message(self, msg_id: int) -> CancelledRow | None:
        async with self.pool.acquire() as conn:
            record = await conn.fetchrow(queries.CANCEL_MESSAGE, msg_id)
        return None if record is None else CancelledRow(**record)

    async def list_dead(self, queue: str, after: int, limit: int) -> list[MessageRow]:
        async with self.pool.acquire() as conn:
            records = await conn.fetch(queries.LIST_DEAD, queue, after, limit)
        return _rows(MessageRow, records)

    async def redrive_dead(self, queue: str, ids: Sequence[int] | None) -> int:
        async with self.pool.acquire() as conn:
            return len(await conn.fetch(queries.REDRIVE_DEAD, queue, ids))

    async def purge_dead(self, queue: str, ids: Sequence[int] | None) -> int:
        async with self.pool.acquire() as conn:
            status: str = await conn.execute(queries.PURGE_DEAD, queue, ids)
        return int(status.split()[-1])

    # -- queues ---------------------------------------------------------------------------

    async def ensure_queues(self, names: Sequence[str]) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(queries.ENSURE_QUEUES, list(names))

    async def get_queue(self, name: str) -> QueueSettings | None:
        async with self.pool.acquire() as conn:
            record = await conn.fetchrow(queries.GET_QUEUE, name)
        return None if record is None else QueueSettings.from_record(record)

    async def list_queues(self) -> list[QueueSettings]:
        async with self.pool.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(queries.LIST_QUEUES)
        return [QueueSettings.from_record(r) for r in rows]

    async def unpaused_queue_names(self) -> list[str]:
        async with self.pool.acquire() as conn:
            return [r["name"] for r in await conn.fetch(queries.UNPAUSED_QUEUE_NAMES)]

    async def update_queue(self, name: str, changes: dict[str, Any]) -> QueueSettings:
        """Create the queue if needed, then set the given (already validated) settings."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(queries.ENSURE_QUEUES, [name])
            if not changes:
                record = await conn.fetchrow(queries.GET_QUEUE, name)
            else:
                columns = [c for c in wire.QueueSettingsUpdate.__struct_fields__ if c in changes]
                assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(columns, start=2))
                sql = queries.UPDATE_QUEUE_TEMPLATE.format(
                    assignments=assignments, columns=queries.QUEUE_COLUMNS
                )
                values = [
                    changes[c] if c != "allowed_targets" else list(changes[c] or [])
                    for c in columns
                ]
                record = await conn.fetchrow(sql, name, *values)
        assert record is not None
        return QueueSettings.from_record(record)
