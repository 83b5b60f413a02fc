"""The server's own dispatchers: `ap4k.core.pool.DeliveryPool` fed by the lease statement.

    leaser ──lease batch (SKIP LOCKED)──▶ ready buffer ──▶ N workers ──HTTP──▶ targets
                                                             └──outcome──▶ OutcomeRecorder

The pool keeps messages leased ahead of the workers (up to LEASE_AHEAD_BATCHES times their
number); the lease statement takes batches that grow with the backlog (1 message when the
queue is short, for latency; up to 100 under load, for throughput: docs/performance.md,
trap 3).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from ap4k.core.delivery import Delivery, Outcome
from ap4k.core.pool import DeliveryPool
from ap4k.core.waits import within
from ap4k.server import metrics
from ap4k.server.leaser import MAX_LEASE_BATCH, Leaser
from ap4k.server.outcomes import OutcomeRecorder, OutcomeReport
from ap4k.server.queues import QueueDirectory
from ap4k.server.store import DB_ERRORS, QueueSettings, Store
from ap4k.server.wakeups import Wakeups

log = logging.getLogger("ap4k.dispatcher")

# How often each process looks at every queue even without a hint (the polling fallback).
POLL_SECONDS = 1.0
# Of the drain's budget, what is kept for writing the last outcomes and giving leases back.
RECORD_RESERVE_SECONDS = 2.0
# At most this many times the dispatchers leased ahead of them (ap4k.core.pool): a lease
# statement takes 2-7 ms on a busy machine, while 32 dispatchers deliver 10,000-16,000 a
# second; with one message per dispatcher ahead, they spent a third of their time waiting
# for the next lease (docs/performance.md, "The delivery path").
LEASE_AHEAD_BATCHES = 4


def worker_identity(kind: str) -> str:
    return f"{kind}/{socket.gethostname()}/{os.getpid()}"


class DispatcherPool:
    """The server's dispatchers: a `DeliveryPool` that leases with the lease statement,
    round-robin over the queues that may have work, and records outcomes in the database.
    It also takes messages straight from enqueues (`reserve`/`take`), saving the lease."""

    def __init__(
        self,
        store: Store,
        directory: QueueDirectory,
        wakeups: Wakeups,
        recorder: OutcomeRecorder,
        leaser: Leaser,
        size: int,
        lease_seconds: float = 30.0,
        drain_grace_seconds: float = 10.0,
    ) -> None:
        self.store = store
        self.directory = directory
        self.wakeups = wakeups
        self.recorder = recorder
        self.leaser = leaser
        self.size = size
        self.lease_seconds = lease_seconds
        self.drain_grace_seconds = drain_grace_seconds
        self.identity = worker_identity("dispatcher")
        self.pool = DeliveryPool(
            size=size,
            lease_seconds=lease_seconds,
            lease=self._lease,
            report=self._report,
            release=self._release,
            extend=self._extend,
            max_ahead=LEASE_AHEAD_BATCHES * size,
            name="ap4k-dispatcher",
        )
        self._reserved = 0  # places promised to enqueues in flight (direct hand-off)
        self._active: set[str] = set()  # queues that may have available messages
        # Queues whose last lease came back full: a backlog we know of, which new messages
        # must not overtake (`reserve`). Not every queue in `_active`: a hint or the poll
        # says only that some message may be waiting, and refusing the hand-off for that
        # sent every enqueue of a steady stream through the lease statement, once one had
        # (docs/performance.md, "Latency tail").
        self._backlogged: set[str] = set()
        self._next_poll = 0.0
        self._rotation = 0
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self.size <= 0:
            return
        metrics.DISPATCHERS_IN_FLIGHT.set_function(lambda: self.pool.in_flight)
        self.pool.start()
        self._started = True

    async def stop(self, deadline: float | None = None) -> None:
        """Drain by `deadline` (monotonic; default: the drain grace from now): stop leasing,
        finish deliveries in flight within the grace period, record every outcome, and give
        back whatever was leased but not delivered."""
        if deadline is None:
            deadline = time.monotonic() + self.drain_grace_seconds + RECORD_RESERVE_SECONDS
        if not self._started:
            await self.pool.deliverer.close()
            return
        self.wakeups.hint([])  # wake the lease loop, idle or not, to see the drain
        in_flight_until = min(
            deadline - RECORD_RESERVE_SECONDS, time.monotonic() + self.drain_grace_seconds
        )
        await self.pool.stop(in_flight_until)
        # Enqueues that reserved a direct hand-off before the drain are committing now;
        # their messages come in through take() and are given back with the late ones.
        for _ in range(200):  # at most 2 s, and not past the drain deadline
            if self._reserved <= 0 or time.monotonic() >= deadline - RECORD_RESERVE_SECONDS:
                break
            await asyncio.sleep(0.01)
        await self.pool.give_back_late()
        # Shielded: giving up waiting must not cancel the outcomes' own futures.
        drain = asyncio.shield(self.recorder.drain())
        if not await within(drain, max(deadline - time.monotonic(), 0.1)):
            log.warning("outcomes not all recorded by the drain deadline (their leases expire)")
        self._started = False

    async def release_late(self) -> None:
        """Give back what enqueues handed over after stop() (their INSERT committed late,
        e.g. for a request cancelled at shutdown); the server calls it once no INSERT is
        in flight any more."""
        await self.pool.give_back_late()

    # -- what the pool asks of us ---------------------------------------------------------

    def _report(self, delivery: Delivery, outcome: Outcome) -> None:
        self.recorder.submit(
            self.identity,
            OutcomeReport(
                id=delivery.id,
                attempt=delivery.attempt,
                verdict=outcome.verdict,
                retry_after=outcome.retry_after,
                error=outcome.error,
                duration=None if outcome.cut_off else outcome.duration,
                queue=delivery.queue,
                status=outcome.status,
                response_excerpt=outcome.response_excerpt,
            ),
        )

    async def _release(self, deliveries: list[Delivery]) -> None:
        await self.store.release(
            self.identity, [d.id for d in deliveries], [d.attempt for d in deliveries]
        )
        log.info("released %d undelivered leases", len(deliveries))

    async def _extend(self, deliveries: list[Delivery], seconds: float) -> list[int]:
        rows = await self.store.extend(
            self.identity, [d.id for d in deliveries], [d.attempt for d in deliveries], seconds
        )
        return [row.id for row in rows]

    async def _lease(self, room: int) -> list[Delivery]:
        """One round over the queues that may have work (rotating the starting queue), or a
        wait for a hint or the next poll when none has."""
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + POLL_SECONDS
            try:
                self._active.update(await self.directory.unpaused_names())
            except DB_ERRORS as exc:
                log.warning("cannot list queues: %s", exc)
        self._active |= self.wakeups.hinted
        self.wakeups.hinted.clear()
        leased: list[Delivery] = []
        if self._active and not self.pool.stopping:
            queues = sorted(self._active)
            self._rotation += 1
            turn = self._rotation % len(queues)
            for queue in queues[turn:] + queues[:turn]:
                want = room - len(leased)
                if want <= 0 or self.pool.stopping:
                    break
                try:
                    leased += await self._lease_from(queue, min(want, MAX_LEASE_BATCH))
                except DB_ERRORS as exc:
                    log.warning("lease from %s failed: %s", queue, exc)
                    await asyncio.sleep(0.5)
                    break
        if not leased and not self.wakeups.hinted and not self.pool.stopping:
            await self.wakeups.wait(max(self._next_poll - time.monotonic(), 0.01))
        return leased

    async def _lease_from(self, queue: str, limit: int) -> list[Delivery]:
        settings = await self.directory.get(queue, create=False)
        if settings is None or settings.paused:
            self._active.discard(queue)
            self._backlogged.discard(queue)
            return []
        deliveries = await self.leaser.lease(settings, limit, self.identity, self.lease_seconds)
        if len(deliveries) < limit:
            # Drained for now (or limited): wait for a hint or the next poll.
            self._active.discard(queue)
            self._backlogged.discard(queue)
        else:
            self._backlogged.add(queue)
        return deliveries

    # -- direct hand-off ------------------------------------------------------------------

    def reserve(self, settings: QueueSettings, wanted: int) -> int:
        """How many of `wanted` new messages of this queue we will deliver straight away,
        inserted already leased to us (no lease statement): only while workers are idle,
        the queue's last lease did not come back full (a backlog we know of), and no pause,
        limit (the queue's or its flow keys') or circuit breaker needs the database's view.
        The caller hands them over with `take()` or gives the places back with
        `unreserve()`."""
        if (
            self.size <= 0
            or self.pool.stopping
            or settings.paused
            or settings.rate_limit_per_second is not None
            or settings.max_concurrency is not None
            or settings.circuit_breaker is not None
            or settings.flow_limits is not None
            or settings.name in self._backlogged
        ):
            return 0
        granted = min(wanted, self.size - self.pool.outstanding - self._reserved)
        if granted <= 0:
            return 0
        self._reserved += granted
        return granted

    def unreserve(self, count: int) -> None:
        self._reserved -= count

    def take(self, delivery: Delivery) -> None:
        """A message inserted leased to us (after `reserve`); during the drain the pool
        keeps it aside to give back."""
        self._reserved -= 1
        self.pool.hold(delivery)
