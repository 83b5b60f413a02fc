"""The forwarder: relays committed outbox rows to the ap4k server, then deletes them.

One round (`forward_batch`), in one transaction of the outbox database:

1. claim the oldest rows nobody else holds (`FOR UPDATE SKIP LOCKED`, so any number of
   forwarders — replicas, or workers of one forwarder — share an outbox without overlap);
2. hold back rows whose ordering key has an older row outside the batch (held by someone
   else), so that messages sharing an ordering key reach the server in outbox order;
3. POST them, per queue, as `{"messages": [...]}` with `dedup_key` = this outbox's identity
   + the row id (unless the application set its own key) — see `relay.py`;
4. delete the acknowledged rows and commit.

A forwarder killed anywhere in between loses nothing: PostgreSQL rolls the claim back and
the rows are sent again, and the server answers a resend of a known dedup key with the
message it already has. A 4xx for one message (say a target outside the allow-list) must
not block the outbox: the batch is split until the culprit is found, and that row is marked
rejected and kept. Idle workers register in `ap4k_outbox_sleepers` and wait on LISTEN
(enqueues send a NOTIFY only while someone sleeps), with a polling fallback; they back off
while the server or the database is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from ap4k.client.async_client import AsyncClient
from ap4k.client.errors import ApiError, ServerUnavailable
from ap4k.core.retry import RetryPolicy
from ap4k.core.waits import within
from ap4k.outbox import metrics, schema, sql
from ap4k.outbox.relay import Relay, Row

logger = logging.getLogger("ap4k.outbox.forwarder")

DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


@dataclass(slots=True)
class BatchResult:
    claimed: int = 0
    forwarded: int = 0
    rejected: int = 0
    held_back: int = 0  # ordering keys still in flight elsewhere


@dataclass(slots=True)
class OutboxStats:
    backlog: int
    rejected: int
    oldest_age_seconds: float


class Forwarder:
    """Relays an outbox to a server until stopped. Use as `async with Forwarder(...)`, or
    `await start()` / `await stop()`, or `await run()` (until cancelled).

    `server` is one URL, a comma-separated list or sequence of URLs (failover), or an
    `AsyncClient` you own. `concurrency` workers each forward batches of `batch_size` rows.
    """

    def __init__(
        self,
        outbox_url: str,
        server: str | Sequence[str] | AsyncClient,
        *,
        token: str | None = None,
        batch_size: int = 500,
        concurrency: int = 2,
        poll_interval: float = 1.0,
        max_backoff: float = 30.0,
        stats_interval: float = 5.0,
        migrate: bool = True,
        request_timeout: float = 30.0,
        max_request_bytes: int = 512 * 1024,
    ) -> None:
        if not 1 <= batch_size <= 1000:
            raise ValueError("batch_size must be between 1 and 1000 (the server's batch limit)")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.outbox_url = outbox_url
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.max_backoff = max_backoff
        self.stats_interval = stats_interval
        self.migrate = migrate
        # Under the server's body limit (1 MiB by default): a batch of big messages is sent
        # in several POSTs rather than refused with a 413.
        self.max_request_bytes = max_request_bytes
        if isinstance(server, AsyncClient):
            self._client = server
            self._owns_client = False
        else:
            urls = [server] if isinstance(server, str) else list(server)
            self._client = AsyncClient(
                urls,
                token=token,
                timeout=request_timeout,
                # A short in-request retry (one round of failover and a second try); the long
                # backoff happens here, outside the claim transaction, so that rows are not
                # held locked while the server is down.
                retry=RetryPolicy(attempts=2, min_backoff_seconds=0.05, max_backoff_seconds=0.5),
            )
            self._owns_client = True
        # Two attempts of `request_timeout` and a short pause between them, with room to spare.
        self._claim_timeout_ms = int((2 * request_timeout + 30) * 1000)
        self._backoff = RetryPolicy(min_backoff_seconds=0.1, max_backoff_seconds=max_backoff)
        self._pool: Any = None
        self._relay = Relay(self._client, "", max_request_bytes)
        self._tasks: list[asyncio.Task[None]] = []
        self._wakeups: list[asyncio.Event] = []
        self._workers: list[str] = []
        self._stopping = asyncio.Event()
        self._started = False
        self.forwarded = 0  # rows acknowledged and deleted by this forwarder
        self.rejected = 0

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Forwarder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._started:
            return
        self._stopping.clear()
        self._pool = await asyncpg.create_pool(
            self.outbox_url,
            min_size=1,
            max_size=self.concurrency + 1,
            server_settings={
                "application_name": "ap4k-forwarder",
                # A forwarder that vanishes without closing its socket (a node lost) would
                # hold its claimed rows locked until TCP gives up, hours later. PostgreSQL
                # ends a transaction idle for longer than any batch can take instead.
                "idle_in_transaction_session_timeout": str(self._claim_timeout_ms),
            },
        )
        try:
            async with self._pool.acquire() as conn:
                if self.migrate:
                    await schema.migrate(conn)
                identity = await conn.fetchval(sql.IDENTITY)
                await conn.execute(sql.FORGET_STALE_SLEEPERS)
        except BaseException:
            await self._pool.close()
            raise
        if identity is None:
            raise RuntimeError("the outbox has no identity row: run `ap4k outbox init`")
        self._relay = Relay(self._client, f"outbox:{identity}:", self.max_request_bytes)
        self._wakeups = [asyncio.Event() for _ in range(self.concurrency)]
        instance = uuid.uuid4().hex[:12]
        self._workers = [f"{instance}-{n}" for n in range(self.concurrency)]
        self._tasks = [
            asyncio.create_task(self._work(name, wakeup), name=f"ap4k-forwarder-{name}")
            for name, wakeup in zip(self._workers, self._wakeups, strict=True)
        ]
        self._tasks.append(asyncio.create_task(self._listen(), name="ap4k-forwarder-listen"))
        self._tasks.append(asyncio.create_task(self._report(), name="ap4k-forwarder-stats"))
        self._started = True
        logger.info(
            "forwarding outbox %s to %s (%d workers, batches of %d)",
            identity,
            ", ".join(self._client.urls),
            self.concurrency,
            self.batch_size,
        )

    async def stop(self, timeout: float = 10.0) -> None:
        """Finish the batches in flight (up to `timeout`), then close everything."""
        if not self._started:
            return
        self._stopping.set()
        self._wake_all()
        _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        with contextlib.suppress(*DATABASE_ERRORS):
            await asyncio.wait_for(self._pool.execute(sql.WAKE, self._workers), 2)
        await self._pool.close()
        if self._owns_client:
            await self._client.close()
        self._started = False

    @property
    def started(self) -> bool:
        return self._started

    async def run(self) -> None:
        """Start, and forward until cancelled (then stop cleanly)."""
        await self.start()
        try:
            await self._stopping.wait()
        finally:
            await self.stop()

    # -- observability ----------------------------------------------------------------------

    async def stats(self) -> OutboxStats:
        row = await self._pool.fetchrow(sql.STATS)
        return OutboxStats(int(row["backlog"]), int(row["rejected"]), row["oldest_age_seconds"])

    async def wait_until_empty(self, timeout: float = 60.0, interval: float = 0.05) -> bool:
        """True once no row waits to be forwarded; False if `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (await self.stats()).backlog == 0:
                return True
            await asyncio.sleep(interval)
        return False

    # -- one round --------------------------------------------------------------------------

    async def forward_batch(self) -> BatchResult:
        """Claim, send and delete one batch. Raises `ServerUnavailable`, a setup `ApiError`,
        or a database error after committing whatever the server did acknowledge."""
        started = time.perf_counter()
        result = BatchResult()
        async with self._pool.acquire() as conn, conn.transaction():
            records = await conn.fetch(sql.CLAIM, self.batch_size)
            result.claimed = len(records)
            if not records:
                return result
            rows = [Row(r["id"], r["queue"], r["message"], r["ordering_key"],
                         r["delay_seconds"]) for r in records]
            rows = await self._hold_back_overtaking(conn, rows)
            result.held_back = result.claimed - len(rows)
            outcome = await self._relay.send(rows)
            if outcome.acked:
                await conn.execute(sql.DELETE_FORWARDED, outcome.acked)
            if outcome.rejected:
                await conn.executemany(sql.REJECT, outcome.rejected)
        # Committed: count what the server now holds.
        result.forwarded = len(outcome.acked)
        result.rejected = len(outcome.rejected)
        self.forwarded += result.forwarded
        self.rejected += result.rejected
        queues = {row.id: row.queue for row in rows}
        for row_id in outcome.acked:
            metrics.FORWARDED.labels(queues[row_id]).inc()
        for row_id, reason in outcome.rejected:
            metrics.REJECTIONS.labels(queues[row_id]).inc()
            logger.warning("outbox row %d rejected by the server: %s", row_id, reason)
        metrics.BATCH_DURATION.observe(time.perf_counter() - started)
        if outcome.error is not None:
            raise outcome.error
        return result

    async def _hold_back_overtaking(self, conn: Any, rows: list[Row]) -> list[Row]:
        last: dict[tuple[str, str], int] = {}
        for row in rows:
            if row.ordering_key is not None:
                last[(row.queue, row.ordering_key)] = row.id  # rows come in id order
        if not last:
            return rows
        keys = list(last)
        gaps = {
            (r["queue"], r["ordering_key"]): r["first_outside"]
            for r in await conn.fetch(
                sql.ORDERING_GAPS,
                [k[0] for k in keys],
                [k[1] for k in keys],
                [last[k] for k in keys],
                [r.id for r in rows],
            )
        }
        if not gaps:
            return rows
        return [
            r for r in rows
            if r.ordering_key is None or r.id < gaps.get((r.queue, r.ordering_key), r.id + 1)
        ]

    # -- background tasks -------------------------------------------------------------------

    async def _work(self, name: str, wakeup: asyncio.Event) -> None:
        """One worker: forward batches while there are rows; when there are none, register
        as asleep (so that enqueues send a NOTIFY), look once more, and wait."""
        failures = 0
        asleep_since: float | None = None  # when our sleeper row was last written
        while not self._stopping.is_set():
            wakeup.clear()  # before the claim: a NOTIFY from now on wakes the next wait
            try:
                result = await self.forward_batch()
                if result.claimed and asleep_since is not None:
                    # Busy from now on: enqueues can stop sending NOTIFYs.
                    await self._pool.execute(sql.WAKE, [name])
                    asleep_since = None
                if result.claimed == 0:
                    now = time.monotonic()
                    if asleep_since is None:
                        await self._pool.execute(sql.SLEEP, name)
                        asleep_since = now
                        # Rows committed before that registration sent no NOTIFY: look again.
                        continue
                    if now - asleep_since > sql.SLEEPER_HEARTBEAT_SECONDS:
                        await self._pool.execute(sql.SLEEP, name)  # heartbeat
                        asleep_since = now
            except ServerUnavailable as exc:
                reason, message = "server_unavailable", str(exc)
            except ApiError as exc:
                reason, message = "unauthorized" if exc.status == 401 else "setup", str(exc)
            except DATABASE_ERRORS as exc:
                reason, message = "database", repr(exc)
                asleep_since = None  # the sleeper table may have been reset (unlogged)
            except Exception as exc:  # a bug must not kill the worker: log, back off, go on
                logger.exception("forwarding failed unexpectedly")
                reason, message = "internal", repr(exc)
            else:
                failures = 0
                if result.claimed >= self.batch_size:
                    continue  # a full batch: there is more
                if result.claimed > result.held_back:
                    continue  # progress: look again at once
                if result.held_back:
                    await self._sleep(0.05)  # another forwarder holds the older rows
                    continue
                await self._wait(wakeup, self.poll_interval)
                continue
            failures += 1
            metrics.ERRORS.labels(reason).inc()
            delay = self._backoff.backoff(min(failures, 20))
            log = logger.warning if failures == 1 else logger.debug
            log("forwarding failed (%s), retrying in %.2fs: %s", reason, delay, message)
            await self._sleep(delay)

    async def _listen(self) -> None:
        """Wake the workers on NOTIFY; reconnect when the connection drops."""
        failures = 0
        while not self._stopping.is_set():
            conn: Any = None
            closed = asyncio.Event()
            try:
                conn = await asyncpg.connect(self.outbox_url)
                conn.add_termination_listener(lambda _conn, gone=closed: gone.set())
                await conn.add_listener(sql.CHANNEL, lambda *_args: self._wake_all())
                failures = 0
                self._wake_all()  # rows may have come while we were not listening
                stop = asyncio.create_task(self._stopping.wait())
                gone = asyncio.create_task(closed.wait())
                try:
                    await asyncio.wait({stop, gone}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop.cancel()
                    gone.cancel()
            except DATABASE_ERRORS as exc:
                failures += 1
                logger.debug("LISTEN connection failed: %r", exc)
                await self._sleep(self._backoff.backoff(min(failures, 20)))
            finally:
                if conn is not None:
                    with contextlib.suppress(*DATABASE_ERRORS):
                        await conn.close(timeout=2)

    async def _report(self) -> None:
        """Export the backlog gauges every `stats_interval`."""
        while not self._stopping.is_set():
            try:
                current = await self.stats()
            except DATABASE_ERRORS as exc:
                logger.debug("outbox stats failed: %r", exc)
            else:
                metrics.BACKLOG.set(current.backlog)
                metrics.REJECTED_ROWS.set(current.rejected)
                metrics.OLDEST_AGE.set(current.oldest_age_seconds)
            await self._sleep(self.stats_interval)

    def _wake_all(self) -> None:
        for event in self._wakeups:
            event.set()

    async def _wait(self, event: asyncio.Event, timeout: float) -> None:
        await within(event.wait(), timeout)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but return at once when the forwarder is told to stop."""
        await self._wait(self._stopping, seconds)
