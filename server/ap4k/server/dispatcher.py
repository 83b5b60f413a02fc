"""The server's own dispatchers: one leaser feeding N concurrent delivery workers.

    leaser ──lease batch (SKIP LOCKED)──▶ ready buffer ──▶ N workers ──HTTP──▶ targets
                                                             └──outcome──▶ OutcomeRecorder

The lease loop keeps up to two batches' worth of messages leased ahead of the workers, in
batches that grow with the backlog (1 message when the queue is short, for latency; up to
100 under load, for throughput: docs/performance.md, trap 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time

from ap4k.core.delivery import Deliverer, Delivery, Verdict
from ap4k.server import metrics
from ap4k.server.leaser import MAX_LEASE_BATCH, Leaser
from ap4k.server.outcomes import OutcomeRecorder, OutcomeReport
from ap4k.server.queues import QueueDirectory
from ap4k.server.store import DB_ERRORS, QueueSettings, Store
from ap4k.server.wakeups import Wakeups

log = logging.getLogger("ap4k.dispatcher")

# How often each process looks at every queue even without a hint (the polling fallback).
POLL_SECONDS = 1.0


def worker_identity(kind: str) -> str:
    return f"{kind}/{socket.gethostname()}/{os.getpid()}"


class DispatcherPool:
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
        self.deliverer = Deliverer(max_connections=max(size, 1) * 2)
        self._ready: asyncio.Queue[Delivery | None] = asyncio.Queue()
        self._outstanding = 0  # leased and not yet delivered
        self._reserved = 0  # places promised to enqueues in flight (direct hand-off)
        self._late: list[Delivery] = []  # handed over after stop() began
        self._capacity = asyncio.Event()
        self._active: set[str] = set()  # queues that may have available messages
        self._in_flight: dict[asyncio.Task[None], Delivery] = {}
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self.size <= 0:
            return
        metrics.DISPATCHERS_IN_FLIGHT.set_function(lambda: len(self._in_flight))
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._lease_loop(), name="ap4k-leaser"))
        for i in range(self.size):
            self._tasks.append(loop.create_task(self._worker(), name=f"ap4k-dispatcher-{i}"))

    async def stop(self) -> None:
        """Drain: stop leasing, finish deliveries in flight within the grace period, and
        give back whatever was leased but not delivered."""
        if not self._tasks:
            await self.deliverer.close()
            return
        self._stopping = True
        leaser, workers = self._tasks[0], self._tasks[1:]
        # Let the lease loop finish the lease in hand rather than cancel it mid-statement:
        # a lease committed but never seen here would sit out its whole expiry.
        self._capacity.set()
        self.wakeups.hint([])
        _, pending = await asyncio.wait([leaser], timeout=10)
        if pending:
            leaser.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leaser
        # Enqueues that reserved a direct hand-off before we stopped are committing now.
        for _ in range(200):
            if self._reserved <= 0:
                break
            await asyncio.sleep(0.01)
        unstarted: list[Delivery] = []
        while not self._ready.empty():
            item = self._ready.get_nowait()
            if item is not None:
                unstarted.append(item)
        for _ in workers:
            self._ready.put_nowait(None)
        _, still_running = await asyncio.wait(workers, timeout=self.drain_grace_seconds)
        abandoned = list(self._in_flight.values())
        for task in still_running:
            task.cancel()
        await asyncio.gather(*still_running, return_exceptions=True)
        # A delivery cut off mid-request may well have reached its target: it counts as an
        # attempt and is retried (attempt + 1), never handed back as if never tried.
        for d in abandoned:
            self.recorder.submit(
                self.identity,
                OutcomeReport(
                    id=d.id,
                    attempt=d.attempt,
                    verdict=Verdict.RETRY,
                    retry_after=0.0,
                    error="abandoned at shutdown",
                    queue=d.queue,
                ),
            )
        await self.recorder.drain()
        late, self._late = self._late, []
        await self._release(unstarted + late)
        await self.deliverer.close()
        self._tasks.clear()

    async def release_late(self) -> None:
        """Give back what enqueues handed over after stop() (their INSERT committed late,
        e.g. for a request cancelled at shutdown); the server calls it once no INSERT is
        in flight any more."""
        late, self._late = self._late, []
        await self._release(late)

    async def _release(self, deliveries: list[Delivery]) -> None:
        if not deliveries:
            return
        try:
            await self.store.release(
                self.identity, [d.id for d in deliveries], [d.attempt for d in deliveries]
            )
            log.info("released %d undelivered leases", len(deliveries))
        except DB_ERRORS as exc:
            log.warning("could not release %d leases (they will expire): %s", len(deliveries), exc)

    # -- direct hand-off ------------------------------------------------------------------

    def reserve(self, settings: QueueSettings, wanted: int) -> int:
        """How many of `wanted` new messages of this queue we will deliver straight away,
        inserted already leased to us (no lease statement): only while workers are idle,
        the queue has no backlog we know of, and no pause, limit (the queue's or its flow
        keys') or circuit breaker needs the database's view. The caller hands them over
        with `take()` or gives the places back with `unreserve()`."""
        if (
            self.size <= 0
            or self._stopping
            or settings.paused
            or settings.rate_limit_per_second is not None
            or settings.max_concurrency is not None
            or settings.circuit_breaker is not None
            or settings.flow_limits is not None
            or settings.name in self._active
        ):
            return 0
        granted = min(wanted, self.size - self._outstanding - self._reserved)
        if granted <= 0:
            return 0
        self._reserved += granted
        return granted

    def unreserve(self, count: int) -> None:
        self._reserved -= count

    def take(self, delivery: Delivery) -> None:
        """A message inserted leased to us (after `reserve`)."""
        self._reserved -= 1
        if self._stopping:  # the workers may be gone: give it back with the rest
            self._late.append(delivery)
            return
        self._outstanding += 1
        self._ready.put_nowait(delivery)

    # -- leasing --------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        """Leasing must outlive any failure: without it this process delivers nothing."""
        while not self._stopping:
            try:
                await self._lease_rounds()
            except Exception:
                log.exception("the lease loop failed; it starts again in a second")
                await asyncio.sleep(1.0)

    async def _lease_rounds(self) -> None:
        next_poll = 0.0
        rotation = 0
        while not self._stopping:
            if self._outstanding > self.size:  # two batches' worth in hand: wait for room
                self._capacity.clear()
                await self._capacity.wait()
                continue
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + POLL_SECONDS
                try:
                    self._active.update(await self.directory.unpaused_names())
                except DB_ERRORS as exc:
                    log.warning("cannot list queues: %s", exc)
            self._active |= self.wakeups.hinted
            self.wakeups.hinted.clear()
            if not self._active:
                await self.wakeups.wait(max(next_poll - time.monotonic(), 0.01))
                continue
            queues = sorted(self._active)
            rotation += 1
            leased_any = False
            for queue in queues[rotation % len(queues) :] + queues[: rotation % len(queues)]:
                room = 2 * self.size - self._outstanding
                if room <= 0 or self._stopping:
                    break
                try:
                    leased_any |= await self._lease_from(queue, min(room, MAX_LEASE_BATCH))
                except DB_ERRORS as exc:
                    log.warning("lease from %s failed: %s", queue, exc)
                    await asyncio.sleep(0.5)
                    break
            if not leased_any and not self.wakeups.hinted:
                await self.wakeups.wait(max(next_poll - time.monotonic(), 0.01))

    async def _lease_from(self, queue: str, limit: int) -> bool:
        settings = await self.directory.get(queue, create=False)
        if settings is None or settings.paused:
            self._active.discard(queue)
            return False
        deliveries = await self.leaser.lease(settings, limit, self.identity, self.lease_seconds)
        if len(deliveries) < limit:
            # Drained for now (or limited): wait for a hint or the next poll.
            self._active.discard(queue)
        for delivery in deliveries:
            self._outstanding += 1
            self._ready.put_nowait(delivery)
        return bool(deliveries)

    # -- delivering -----------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            delivery = await self._ready.get()
            if delivery is None:
                return
            task = asyncio.current_task()
            assert task is not None
            self._in_flight[task] = delivery
            try:
                outcome = await self.deliverer.deliver(delivery)
            finally:
                self._in_flight.pop(task, None)
            self._outstanding -= 1
            if self._outstanding <= self.size:  # wake the lease loop only when it can act
                self._capacity.set()
            self.recorder.submit(
                self.identity,
                OutcomeReport(
                    id=delivery.id,
                    attempt=delivery.attempt,
                    verdict=outcome.verdict,
                    retry_after=outcome.retry_after,
                    error=outcome.error,
                    duration=outcome.duration,
                    queue=delivery.queue,
                    status=outcome.status,
                    response_excerpt=outcome.response_excerpt,
                ),
            )
