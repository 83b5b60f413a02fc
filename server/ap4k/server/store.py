"""The server's access to PostgreSQL: a connection pool and one method per statement.

Every statement lives in `queries.py`; this module binds parameters and shapes results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import msgspec

from ap4k.core import signatures, wire
from ap4k.server import queries
from ap4k.server.migrate import migrate

# Settings stored as arrays, never NULL: "none" is the empty array.
LIST_SETTINGS = frozenset({"allowed_targets", "signing_secrets"})
STATES = ("available", "scheduled", "running", "retryable", "discarded")
MAX_ID = 2**63 - 1


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
        return cls(
            name=r["name"],
            max_attempts=r["max_attempts"],
            min_backoff_seconds=r["min_backoff_seconds"],
            max_backoff_seconds=r["max_backoff_seconds"],
            rate_limit_per_second=r["rate_limit_per_second"],
            max_concurrency=r["max_concurrency"],
            paused=r["paused"],
            base_url=r["base_url"],
            allowed_targets=tuple(r["allowed_targets"] or ()),
            signing_secret=r["signing_secret"],
            signing_secrets=tuple(r["signing_secrets"]),
            webhook_keys=tuple(signatures.secret_key(s) for s in r["signing_secrets"]),
            circuit_breaker=_decode_setting(r["circuit_breaker"], wire.CircuitBreaker),
            flow_limits=_decode_setting(r["flow_limits"], wire.FlowLimits),
        )

    @classmethod
    def from_view(cls, name: str, view: wire.QueueSettingsView) -> QueueSettings:
        """`view`'s settings (with no signing secret): `wire.QueueSettingsView()` holds a new
        queue's defaults."""
        return cls(
            name=name,
            max_attempts=view.max_attempts,
            min_backoff_seconds=view.min_backoff_seconds,
            max_backoff_seconds=view.max_backoff_seconds,
            rate_limit_per_second=view.rate_limit_per_second,
            max_concurrency=view.max_concurrency,
            paused=view.paused,
            base_url=view.base_url,
            allowed_targets=tuple(view.allowed_targets),
            signing_secret=None,
        )

    def public(self) -> wire.QueueSettingsView:
        """The settings as the API shows them: the signing secret never leaves the server."""
        return wire.QueueSettingsView(
            max_attempts=self.max_attempts,
            min_backoff_seconds=self.min_backoff_seconds,
            max_backoff_seconds=self.max_backoff_seconds,
            rate_limit_per_second=self.rate_limit_per_second,
            max_concurrency=self.max_concurrency,
            paused=self.paused,
            base_url=self.base_url,
            allowed_targets=list(self.allowed_targets),
            signing_secret_set=self.signing_secret is not None,
            signing_secrets_set=len(self.signing_secrets),
            circuit_breaker=self.circuit_breaker,
            flow_limits=self.flow_limits,
        )


S = TypeVar("S", bound=msgspec.Struct)


def _decode_setting(text: str | None, kind: type[S]) -> S | None:
    """A setting stored as jsonb (asyncpg hands it over as text)."""
    return None if text is None else msgspec.json.decode(text, type=kind)


def _encode_setting(value: Any) -> Any:
    """A setting as its column takes it: arrays never NULL, structs as JSON with every field
    (the SQL reads each one)."""
    if isinstance(value, msgspec.Struct):
        return msgspec.json.encode(msgspec.structs.asdict(value)).decode()
    return value


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
        [m.flow_key for m in messages],
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
            records = await conn.fetch(queries.ENQUEUE, *columns[:13], lease_seconds, columns[13])
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
    ) -> list[asyncpg.Record]:
        async with self.dispatch_pool.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(
                queries.LEASE, queue, limit, leased_by, lease_seconds, floor, cover_timeout
            )
            return rows

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
    ) -> list[asyncpg.Record]:
        """Record failed (or other) outcomes, each with its row in the attempt history."""
        async with self.dispatch_pool.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(
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
            return rows

    async def complete(
        self,
        leased_by: str,
        ids: Sequence[int],
        attempts: Sequence[int],
        statuses: Sequence[int | None],
        durations_ms: Sequence[float | None],
    ) -> list[asyncpg.Record]:
        async with self.dispatch_pool.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(
                queries.COMPLETE, ids, attempts, leased_by, statuses, durations_ms
            )
            return rows

    async def release(
        self, leased_by: str, ids: Sequence[int], attempts: Sequence[int]
    ) -> list[asyncpg.Record]:
        async with self.dispatch_pool.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(queries.RELEASE, ids, attempts, leased_by)
            return rows

    async def extend(
        self, leased_by: str, ids: Sequence[int], attempts: Sequence[int], seconds: float
    ) -> list[asyncpg.Record]:
        async with self.dispatch_pool.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(
                queries.EXTEND, ids, attempts, leased_by, seconds
            )
            return rows

    # -- maintenance ----------------------------------------------------------------------

    async def rescue_expired(self) -> list[asyncpg.Record]:
        async with self.dispatch_pool.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(queries.RESCUE_EXPIRED)
            return rows

    async def promote_due(self) -> list[str]:
        async with self.dispatch_pool.acquire() as conn:
            return [r["queue"] for r in await conn.fetch(queries.PROMOTE_DUE)]

    async def seconds_until_next_due(self) -> float | None:
        async with self.dispatch_pool.acquire() as conn:
            value: float | None = await conn.fetchval(queries.SECONDS_UNTIL_NEXT_DUE)
            return value

    async def prune_finished(self, older_than_seconds: float) -> int:
        async with self.dispatch_pool.acquire() as conn:
            status: str = await conn.execute(queries.PRUNE_FINISHED, older_than_seconds)
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
        failed = {r["queue"]: r["n"] for r in records}
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

    async def record_circuits(
        self, queue: str, ids: Sequence[int], failed: Sequence[bool]
    ) -> list[asyncpg.Record]:
        """Count outcomes towards the queue's circuits; the circuits that changed state."""
        async with self.dispatch_pool.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(
                queries.RECORD_CIRCUITS, queue, ids, failed
            )
            return rows

    async def list_circuits(self, queue: str) -> list[asyncpg.Record]:
        async with self.pool.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(queries.LIST_CIRCUITS, queue)
            return rows

    async def list_flow_keys(self, queue: str, limit: int) -> list[asyncpg.Record]:
        async with self.pool.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(queries.LIST_FLOW_KEYS, queue, limit)
            return rows

    async def prune_flow_buckets(self) -> int:
        async with self.dispatch_pool.acquire() as conn:
            status: str = await conn.execute(queries.PRUNE_FLOW_BUCKETS)
        return int(status.split()[-1])

    async def held_circuits(self) -> dict[str, int]:
        """Open and half-open circuits per queue."""
        async with self.pool.acquire() as conn:
            return {r["queue"]: r["n"] for r in await conn.fetch(queries.HELD_CIRCUITS)}

    async def notify(self, channel: str, payload: str) -> None:
        async with self.dispatch_pool.acquire() as conn:
            await conn.execute(queries.NOTIFY, channel, payload)

    # -- messages -------------------------------------------------------------------------

    async def get_message(self, msg_id: int) -> asyncpg.Record | None:
        async with self.pool.acquire() as conn:
            return await conn.fetchrow(queries.GET_MESSAGE, msg_id)

    async def get_attempts(self, msg_id: int) -> list[asyncpg.Record]:
        """The message's failed attempts, oldest first."""
        async with self.pool.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(queries.GET_ATTEMPTS, msg_id)
            return rows

    async def list_messages(
        self,
        queue: str,
        *,
        state: str | None,
        dedup_key: str | None,
        after: int | None,
        limit: int,
        newest_first: bool,
    ) -> list[asyncpg.Record]:
        """A page of the queue's messages by id, after the cursor `after` (a message id)."""
        sql = queries.LIST_MESSAGES[(state, newest_first)]
        if after is None:
            after = MAX_ID if newest_first else 0
        async with self.pool.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(sql, queue, dedup_key, after, limit)
            return rows

    async def cancel_message(self, msg_id: int) -> asyncpg.Record | None:
        async with self.pool.acquire() as conn:
            return await conn.fetchrow(queries.CANCEL_MESSAGE, msg_id)

    async def list_dead(self, queue: str, after: int, limit: int) -> list[asyncpg.Record]:
        async with self.pool.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(queries.LIST_DEAD, queue, after, limit)
            return rows

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
