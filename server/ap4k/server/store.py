"""The server's access to PostgreSQL: a connection pool and one method per statement.

Every statement lives in `queries.py`; this module binds parameters and shapes results.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import msgspec

from ap4k.core import signatures, wire
from ap4k.server import queries
from ap4k.server.migrate import migrate
from ap4k.server.rows import (
    AttemptRow,
    CancelledRow,
    CircuitChangeRow,
    DepthRow,
    DueScheduleRow,
    ExtendedRow,
    FinishedRow,
    LeasedRow,
    MessageDetailRow,
    MessageRow,
    QueueCountRow,
    ReleasedRow,
    RescuedRow,
    ScheduleRow,
    TopicRow,
)

# Settings stored as arrays, never NULL: "none" is the empty array.
LIST_SETTINGS = frozenset({"allowed_targets", "signing_secrets"})
STATES = ("available", "scheduled", "running", "retryable", "discarded")

# How many rows one upkeep statement takes at most: each holds its locks for a short while,
# and the callers loop until a batch comes back short.
RESCUE_BATCH = 1000
PROMOTE_BATCH = 5000
PRUNE_BATCH = 10000
MAX_ID = 2**63 - 1

# What a statement raises when the database is unreachable, restarting, or closed the
# connection under it: worth a retry later (a 503), never a 500. InternalClientError ("cannot
# switch to state 12; another operation is in progress") is what asyncpg raises for a
# statement begun on a connection PostgreSQL's shutdown was tearing down.
DB_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


Row = TypeVar("Row", bound=msgspec.Struct)


def _rows(cls: type[Row], records: Sequence[asyncpg.Record]) -> list[Row]:
    """Records as typed rows (rows.py): the one place where a statement's result becomes
    attributes. Positional (a Struct built from a record's values costs a tenth of one built
    from its names), so the columns are checked against the fields, once per result."""
    if records and tuple(records[0].keys()) != cls.__struct_fields__:
        raise TypeError(
            f"{cls.__name__} has the fields {cls.__struct_fields__}, "
            f"the statement returned {tuple(records[0].keys())}"
        )
    return [cls(*r) for r in records]


def _row(cls: type[Row], record: asyncpg.Record | None) -> Row | None:
    return None if record is None else _rows(cls, [record])[0]


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
    signing_secrets: tuple[str, ...] = ()
    webhook_keys: tuple[bytes, ...] = ()  # the HMAC keys of signing_secrets
    circuit_breaker: wire.CircuitBreaker | None = None
    flow_limits: wire.FlowLimits | None = None

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> QueueSettings:
        """A row of QUEUE_COLUMNS, which are this class's fields (webhook_keys derived)."""
        return cls(
            **{
                **r,
                "allowed_targets": tuple(r["allowed_targets"] or ()),
                "signing_secrets": tuple(r["signing_secrets"]),
                "webhook_keys": tuple(signatures.secret_key(s) for s in r["signing_secrets"]),
                **{f: _decode_setting(r[f], kind) for f, kind in wire.OBJECT_SETTINGS.items()},
            }
        )

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
        return wire.QueueSettingsView(
            **shown,
            signing_secret_set=self.signing_secret is not None,
            signing_secrets_set=len(self.signing_secrets),
        )


# The settings the API shows as they are (all but the secrets, shown only as "is set"/count).
_SHOWN = tuple(
    f
    for f in wire.QueueSettingsView.__struct_fields__
    if f not in ("signing_secret_set", "signing_secrets_set")
)

S = TypeVar("S", bound=msgspec.Struct)


def _decode_setting(text: str | None, kind: type[S]) -> S | None:
    """A setting stored as jsonb (asyncpg hands it over as text)."""
    return None if text is None else msgspec.json.decode(text, type=kind)


def _encode_setting(value: Any) -> Any:
    """A setting as its column takes it: structs as JSON with every field (the SQL reads
    each one)."""
    if isinstance(value, msgspec.Struct):
        return msgspec.json.encode(msgspec.structs.asdict(value)).decode()
    return value


@dataclass(slots=True)
class QueueDepth:
    counts: dict[str, int]
    oldest_available_age_seconds: float


class EnqueueRow(msgspec.Struct, frozen=True):
    """One message for the ENQUEUE statements (a struct: a batch makes a thousand of these)."""

    queue: str
    message: wire.MessageIn  # checked and normalised by validation.parse_enqueue
    target: str  # the absolute URL the message's target resolved to
    body: bytes | None  # JSON
    leased_by: str | None = None  # handed straight to this dispatcher
    callback: str | None = None  # absolute URLs, checked like the target
    failure_callback: str | None = None


class _EnqueueInput(msgspec.Struct, omit_defaults=True):
    """One element of the ENQUEUE statements' JSON document (queries.ENQUEUE_INPUT): a
    field left out is NULL there."""

    queue: str
    target: str
    method: str
    priority: int
    timeout_seconds: float | None
    headers: dict[str, str] | None = None
    body: str | None = None  # the JSON text, as a string: stored byte for byte
    dedup_key: str | None = None
    ordering_key: str | None = None
    max_attempts: int | None = None
    delay: float | None = None
    not_before: datetime | None = None
    leased_by: str | None = None
    callback: str | None = None
    failure_callback: str | None = None
    flow_key: str | None = None


_encode_input = msgspec.json.Encoder().encode


def plain_timeout(rows: Sequence[EnqueueRow]) -> float | None:
    """The one timeout of rows that are all plain enough for queries.ENQUEUE_PLAIN (the
    default method and priority, no headers, keys, attempts limit, delay, schedule, lease
    or callbacks, and the same timeout); None when any is not."""
    timeout = rows[0].message.timeout_seconds if rows else None
    if timeout is None:
        return None
    for r in rows:
        m = r.message
        if (
            r.leased_by is not None
            or r.callback is not None
            or r.failure_callback is not None
            or m.timeout_seconds != timeout
            or m.method != "POST"
            or m.priority != 0
            or m.headers
            or m.dedup_key is not None
            or m.ordering_key is not None
            or m.flow_key is not None
            or m.max_attempts is not None
            or m.not_before is not None
            or m.delay_seconds
        ):
            return None
    return timeout


async def _enqueue_plain(
    conn: asyncpg.Connection, rows: Sequence[EnqueueRow], timeout: float
) -> list[tuple[int, str, bool]]:
    """Plain rows (`plain_timeout`) with queries.ENQUEUE_PLAIN: one statement per queue, in
    one transaction when the inserter grouped requests for several queues (a request's rows
    are all for one queue; all of the group's rows commit or none do)."""

    async def insert(queue: str, group: Sequence[EnqueueRow]) -> list[int]:
        targets, bodies = [r.target for r in group], [r.body for r in group]
        ids: list[int] = await conn.fetchval(queries.ENQUEUE_PLAIN, queue, targets, bodies, timeout)
        return ids

    queue = rows[0].queue
    if all(r.queue == queue for r in rows):
        return [(id_, "available", False) for id_ in await insert(queue, rows)]
    by_queue: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_queue.setdefault(r.queue, []).append(i)
    results: list[tuple[int, str, bool]] = [(0, "", False)] * len(rows)
    async with conn.transaction():
        for queue, indexes in by_queue.items():
            ids = await insert(queue, [rows[i] for i in indexes])
            for i, id_ in zip(indexes, ids, strict=True):
                results[i] = (id_, "available", False)
    return results


def enqueue_document(rows: Sequence[EnqueueRow]) -> str:
    """The ENQUEUE statements' one parameter."""
    out = []
    for r in rows:
        m = r.message
        out.append(
            _EnqueueInput(
                r.queue,
                r.target,
                m.method,
                m.priority,
                m.timeout_seconds,
                m.headers or None,
                None if r.body is None else r.body.decode(),
                m.dedup_key,
                m.ordering_key,
                m.max_attempts,
                m.delay_seconds,
                m.not_before,
                r.leased_by,
                r.callback,
                r.failure_callback,
                m.flow_key,
            )
        )
    return _encode_input(out).decode()


@dataclass(slots=True)
class ScheduleFiring:
    """One schedule fired: for which time, when it fires next, and what it enqueued (the
    row and its (id, state, duplicate)), or why it enqueued nothing."""

    name: str
    fire_at: datetime
    next_fire_at: datetime
    row: EnqueueRow | None = None
    result: tuple[int, str, bool] | None = None
    error: str | None = None


PlanFirings = Callable[[list[DueScheduleRow], datetime], Awaitable[list[ScheduleFiring]]]


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
        async def create(synchronous_commit: str, plan_cache_mode: str) -> asyncpg.Pool:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                connection_class=_Connection,
                statement_cache_size=256,
                server_settings={
                    "application_name": "ap4k",
                    "synchronous_commit": synchronous_commit,
                    "plan_cache_mode": plan_cache_mode,
                },
            )
            assert pool is not None
            return pool

        # The delivery statements (lease, outcomes, release, extend) are planned for the
        # arrays they are given: a generic plan guesses 10 rows for every unnest() and takes
        # the table's row counts from its last ANALYZE, which may have seen few running
        # rows. With thousands leased ahead (carriers) and an outcome batch grown to
        # thousands while the previous one ran, that plan rescans the batch once per running
        # row: a single COMPLETE was seen taking 1-40 s, and each slow one made the next
        # batch bigger (docs/performance.md, "Generic plans and the outcome statements").
        return cls(await create("on", "auto"), await create("off", "force_custom_plan"))

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
        async with self.pool.acquire() as conn:
            return await self.enqueue_on(conn, rows, lease_seconds)

    @staticmethod
    async def enqueue_on(
        conn: asyncpg.Connection, rows: Sequence[EnqueueRow], lease_seconds: float = 30.0
    ) -> list[tuple[int, str, bool]]:
        timeout = plain_timeout(rows)
        if timeout is not None:
            return await _enqueue_plain(conn, rows, timeout)
        if all(r.message.dedup_key is None for r in rows):
            records = await conn.fetch(queries.ENQUEUE_NEW, enqueue_document(rows), lease_seconds)
            return sorted((r["id"], r["state"], False) for r in records)
        results: list[tuple[int, str, bool] | None] = [None] * len(rows)
        todo = list(range(len(rows)))
        # A row whose dedup key was committed concurrently with the INSERT is skipped
        # and looked up afterwards; if that original was purged or pruned in between,
        # the row goes in again (the original is gone: this is no longer a duplicate).
        for _ in range(10):
            document = enqueue_document([rows[i] for i in todo])
            records = await conn.fetch(queries.ENQUEUE, document, lease_seconds)
            vanished = []
            for i, r in zip(todo, records, strict=True):
                if r["id"] is not None:
                    results[i] = (r["id"], r["state"], r["duplicate"])
                    continue
                again = await conn.fetchrow(
                    queries.FIND_BY_DEDUP_KEY, rows[i].queue, rows[i].message.dedup_key
                )
                if again is None:
                    vanished.append(i)
                else:
                    results[i] = (again["id"], again["state"], True)
            if not vanished:
                return [r for r in results if r is not None]
            todo = vanished
        raise asyncpg.exceptions.SerializationError(
            "a dedup key kept changing under the enqueue; retry later"
        )

    # -- leases and outcomes -------------------------------------------------------------

    async def lease(
        self,
        queue: str,
        limit: int,
        leased_by: str,
        lease_seconds: float,
        floor: int,
    ) -> list[LeasedRow]:
        async with self.dispatch_pool.acquire() as conn:
            records = await conn.fetch(
                queries.LEASE, queue, limit, leased_by, lease_seconds, floor,
                # p_cover_timeout off: dispatchers and carriers alike renew the leases they
                # hold (ap4k.core.pool's heartbeat), so a lease lasts lease_seconds and a
                # crashed process's messages come back within about that, not after twice
                # their timeout. Older servers passed true for dispatchers.
                False,
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
        statuses: Sequence[int | None],
        durations: Sequence[float | None],
        excerpts: Sequence[str | None],
    ) -> list[FinishedRow]:
        """Record failed (or other) outcomes, each with its row in the attempt history, and
        enqueue the callbacks they call for."""
        async with self.dispatch_pool.acquire() as conn:
            records = await conn.fetch(
                queries.RECORD_OUTCOMES,
                ids,
                attempts,
                verdicts,
                retry_afters,
                errors,
                leased_by,
                statuses,
                durations,
                excerpts,
            )
        return _rows(FinishedRow, records)

    async def complete(
        self,
        leased_by: str,
        ids: Sequence[int],
        attempts: Sequence[int],
        statuses: Sequence[int | None],
        durations_ms: Sequence[float | None],
    ) -> list[FinishedRow]:
        """Record successful deliveries; enqueue the callbacks they call for."""
        async with self.dispatch_pool.acquire() as conn:
            records = await conn.fetch(
                queries.COMPLETE, ids, attempts, leased_by, statuses, durations_ms
            )
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

    async def prune_orphan_attempts(self, older_than_seconds: float) -> int:
        async with self.dispatch_pool.acquire() as conn:
            status: str = await conn.execute(queries.PRUNE_ORPHAN_ATTEMPTS, older_than_seconds)
        return int(status.split()[-1])

    async def recent_outcomes(self, window_seconds: float) -> dict[str, dict[str, int]]:
        """{queue: {"delivered": n, "failed": n}} over the last `window_seconds`: messages
        delivered, and attempts that failed."""
        delivered = await self.completed_within(window_seconds)
        async with self.pool.acquire() as conn:
            records = await conn.fetch(queries.FAILED_WITHIN, window_seconds)
        failed = {r.queue: r.n for r in _rows(QueueCountRow, records)}
        return {
            queue: {"delivered": delivered.get(queue, 0), "failed": failed.get(queue, 0)}
            for queue in delivered.keys() | failed.keys()
        }

    async def depths(self, queue: str | None = None) -> dict[str, QueueDepth]:
        async with self.pool.acquire() as conn:
            if queue is None:
                records = await conn.fetch(queries.QUEUE_DEPTHS)
            else:
                records = await conn.fetch(queries.QUEUE_DEPTHS_OF_ONE, queue)
        out: dict[str, QueueDepth] = {}
        for r in _rows(DepthRow, records):
            depth = out.setdefault(r.queue, QueueDepth(dict.fromkeys(STATES, 0), 0.0))
            depth.counts[r.state] = r.n
            if r.state == "available":
                depth.oldest_available_age_seconds = max(r.oldest or 0.0, 0.0)
        return out

    async def completed_within(self, seconds: float) -> dict[str, int]:
        """Messages delivered per queue over the last `seconds`."""
        async with self.pool.acquire() as conn:
            records = await conn.fetch(queries.COMPLETED_WITHIN, seconds)
        return {r.queue: r.n for r in _rows(QueueCountRow, records)}

    async def record_circuits(
        self, queue: str, ids: Sequence[int], failed: Sequence[bool]
    ) -> list[CircuitChangeRow]:
        """Count outcomes towards the queue's circuits; the circuits that changed state."""
        async with self.dispatch_pool.acquire() as conn:
            records = await conn.fetch(queries.RECORD_CIRCUITS, queue, ids, failed)
        return _rows(CircuitChangeRow, records)

    async def list_circuits(self, queue: str) -> list[wire.Circuit]:
        """The queue's open and half-open circuits."""
        async with self.pool.acquire() as conn:
            records = await conn.fetch(queries.LIST_CIRCUITS, queue)
        return _rows(wire.Circuit, records)  # the wire object's fields are the columns

    async def list_flow_keys(self, queue: str, limit: int) -> list[wire.FlowKey]:
        """The queue's busiest flow keys: most in flight, then most waiting."""
        async with self.pool.acquire() as conn:
            records = await conn.fetch(queries.LIST_FLOW_KEYS, queue, limit)
        return _rows(wire.FlowKey, records)  # the wire object's fields are the columns

    async def prune_flow_buckets(self) -> int:
        async with self.dispatch_pool.acquire() as conn:
            status: str = await conn.execute(queries.PRUNE_FLOW_BUCKETS)
        return int(status.split()[-1])

    async def held_circuits(self) -> dict[str, int]:
        """Open and half-open circuits per queue."""
        async with self.pool.acquire() as conn:
            records = await conn.fetch(queries.HELD_CIRCUITS)
        return {r.queue: r.n for r in _rows(QueueCountRow, records)}

    async def notify(self, channel: str, payload: str) -> None:
        async with self.dispatch_pool.acquire() as conn:
            await conn.execute(queries.NOTIFY, channel, payload)

    async def other_listeners(self, own_listener_pid: int) -> int:
        """How many other servers' LISTEN connections there are on this database."""
        async with self.dispatch_pool.acquire() as conn:
            n: int = await conn.fetchval(queries.OTHER_LISTENERS, own_listener_pid)
        return n

    # -- messages -------------------------------------------------------------------------

    async def get_message(self, msg_id: int) -> MessageDetailRow | None:
        async with self.pool.acquire() as conn:
            return _row(MessageDetailRow, await conn.fetchrow(queries.GET_MESSAGE, msg_id))

    async def get_attempts(self, msg_id: int) -> list[AttemptRow]:
        """The message's failed attempts, oldest first."""
        async with self.pool.acquire() as conn:
            records = await conn.fetch(queries.GET_ATTEMPTS, msg_id)
        return _rows(AttemptRow, records)

    async def list_messages(
        self,
        queue: str,
        *,
        state: str | None,
        dedup_key: str | None,
        after: int | None,
        limit: int,
        newest_first: bool,
    ) -> list[MessageRow]:
        """A page of the queue's messages by id, after the cursor `after` (a message id)."""
        sql = queries.LIST_MESSAGES[(state, newest_first)]
        if after is None:
            after = MAX_ID if newest_first else 0
        async with self.pool.acquire() as conn:
            records = await conn.fetch(sql, queue, dedup_key, after, limit)
        return _rows(MessageRow, records)

    async def cancel_message(self, msg_id: int) -> CancelledRow | None:
        async with self.pool.acquire() as conn:
            return _row(CancelledRow, await conn.fetchrow(queries.CANCEL_MESSAGE, msg_id))

    async def list_dead(self, queue: str, after: int, limit: int) -> list[MessageRow]:
        async with self.pool.acquire() as conn:
            records = await conn.fetch(queries.LIST_DEAD, queue, after, limit)
        return _rows(MessageRow, records)

    async def redrive_dead(self, queue: str, ids: Sequence[int] | None) -> int:
        async with self.pool.acquire() as conn:
            return len(await conn.fetch(queries.REDRIVE_DEAD, queue, ids))

    async def purge_dead(self, queue: str, ids: Sequence[int] | None) -> int:
        async with self.pool.acquire() as conn:
            purged: int = await conn.fetchval(queries.PURGE_DEAD, queue, ids)
        return purged

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

    async def add_signing_secret(self, name: str, secret: str) -> QueueSettings | None:
        """Add a secret (creating the queue if needed); None if two are set already."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(queries.ENSURE_QUEUES, [name])
            record = await conn.fetchrow(
                queries.ADD_SIGNING_SECRET, name, secret, wire.MAX_SIGNING_SECRETS
            )
        return None if record is None else QueueSettings.from_record(record)

    async def drop_oldest_signing_secret(self, name: str) -> QueueSettings | None:
        """None if the queue does not exist."""
        async with self.pool.acquire() as conn:
            record = await conn.fetchrow(queries.DROP_OLDEST_SIGNING_SECRET, name)
        return None if record is None else QueueSettings.from_record(record)

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
                    list(changes[c] or []) if c in LIST_SETTINGS else _encode_setting(changes[c])
                    for c in columns
                ]
                record = await conn.fetchrow(sql, name, *values)
                if "circuit_breaker" in changes and changes["circuit_breaker"] is None:
                    await conn.execute(queries.FORGET_CIRCUITS, name)
        assert record is not None
        return QueueSettings.from_record(record)

    # -- schedules ------------------------------------------------------------------------

    async def put_schedule(
        self, name: str, schedule: wire.ScheduleIn, next_fire_at: datetime | None
    ) -> ScheduleRow:
        async with self.pool.acquire() as conn:
            record = await conn.fetchrow(
                queries.PUT_SCHEDULE,
                name,
                schedule.queue,
                schedule.cron,
                schedule.timezone,
                msgspec.json.encode(schedule.message).decode(),
                schedule.paused,
                next_fire_at,
            )
        return _rows(ScheduleRow, [record])[0]

    async def get_schedule(self, name: str) -> ScheduleRow | None:
        async with self.pool.acquire() as conn:
            return _row(ScheduleRow, await conn.fetchrow(queries.GET_SCHEDULE, name))

    async def list_schedules(self) -> list[ScheduleRow]:
        async with self.pool.acquire() as conn:
            records = await conn.fetch(queries.LIST_SCHEDULES)
        return _rows(ScheduleRow, records)

    async def delete_schedule(self, name: str) -> bool:
        async with self.pool.acquire() as conn:
            status: str = await conn.execute(queries.DELETE_SCHEDULE, name)
        return status.endswith(" 1")

    async def fire_schedules(self, now: datetime, plan: PlanFirings) -> list[ScheduleFiring]:
        """In one transaction: lock the schedules due at `now` (others' locked ones are
        skipped: another replica is firing them), enqueue what `plan` makes of them, and
        record each firing."""
        async with self.pool.acquire() as conn, conn.transaction():
            due = _rows(DueScheduleRow, await conn.fetch(queries.DUE_SCHEDULES, now))
            if not due:
                return []
            firings = await plan(due, now)
            made = [f for f in firings if f.row is not None]
            if made:
                results = await self.enqueue_on(conn, [f.row for f in made if f.row is not None])
                for firing, result in zip(made, results, strict=True):
                    firing.result = result
            await conn.execute(
                queries.RECORD_FIRINGS,
                [f.name for f in firings],
                [f.next_fire_at for f in firings],
                [f.fire_at for f in firings],
                [None if f.result is None else f.result[0] for f in firings],
                [f.error for f in firings],
            )
            return firings

    # -- topics ---------------------------------------------------------------------------

    async def put_topic(self, name: str, topic: wire.TopicIn) -> TopicRow:
        async with self.pool.acquire() as conn:
            record = await conn.fetchrow(
                queries.PUT_TOPIC, name, msgspec.json.encode(topic.subscriptions).decode()
            )
        return _rows(TopicRow, [record])[0]

    async def get_topic(self, name: str) -> TopicRow | None:
        async with self.pool.acquire() as conn:
            return _row(TopicRow, await conn.fetchrow(queries.GET_TOPIC, name))

    async def list_topics(self) -> list[TopicRow]:
        async with self.pool.acquire() as conn:
            records = await conn.fetch(queries.LIST_TOPICS)
        return _rows(TopicRow, records)

    async def delete_topic(self, name: str) -> bool:
        async with self.pool.acquire() as conn:
            status: str = await conn.execute(queries.DELETE_TOPIC, name)
        return status.endswith(" 1")
