"""Recording delivery outcomes in batches, for dispatchers and carriers' acks alike.

Deliveries finish one by one; their outcomes are written together: whatever finished while
the previous statement was in flight goes into the next one. Callers get, per outcome,
whether it was accepted (the lease was still theirs) — carriers' stale acks are refused here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ap4k.core.delivery import Verdict
from ap4k.server import metrics
from ap4k.server.queues import QueueDirectory
from ap4k.server.rows import FinishedRow
from ap4k.server.store import DB_ERRORS, Store
from ap4k.server.wakeups import Wakeups

log = logging.getLogger("ap4k.outcomes")

COALESCE_SECONDS = 0.01
OUTCOME_LABEL = {"completed": "delivered", "retryable": "retried", "discarded": "dead"}


@dataclass(frozen=True, slots=True, kw_only=True)
class OutcomeReport:
    """How one leased attempt went, from a dispatcher or a carrier's ack."""

    id: int
    attempt: int
    verdict: Verdict
    retry_after: float | None = None  # seconds the target asked to wait (Retry-After)
    error: str | None = None
    duration: float | None = None  # seconds of the HTTP call, when known
    queue: str | None = None
    status: int | None = None  # the HTTP status, when there was an answer
    response_excerpt: str | None = None  # the start of a failed answer's body


def _mark_retrieved(future: asyncio.Future[bool]) -> None:
    if not future.cancelled():
        future.exception()


class OutcomeRecorder:
    def __init__(
        self,
        store: Store,
        wakeups: Wakeups,
        on_retry_scheduled: Callable[[], None],
        concurrency: int = 1,
        directory: QueueDirectory | None = None,
    ) -> None:
        self._store = store
        self._directory = directory
        self._wakeups = wakeups
        self._on_retry_scheduled = on_retry_scheduled
        self._concurrency = concurrency
        self._pending: dict[str, list[tuple[OutcomeReport, asyncio.Future[bool]]]] = {}
        self._flushers = 0
        self._writing: list[asyncio.Future[bool]] = []

    def submit(self, leased_by: str, report: OutcomeReport) -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        # Dispatchers do not wait for their outcomes; a failed write is logged once per
        # batch in _flush, so mark each future's exception as seen (or asyncio logs a
        # "Future exception was never retrieved" for every outcome of the batch).
        future.add_done_callback(_mark_retrieved)
        self._pending.setdefault(leased_by, []).append((report, future))
        if report.duration is not None and report.queue is not None:
            metrics.child(metrics.DELIVERY_DURATION, report.queue).observe(report.duration)
        if self._flushers < self._concurrency:
            self._flushers += 1
            asyncio.get_running_loop().create_task(self._flush())
        return future

    async def record(self, leased_by: str, reports: list[OutcomeReport]) -> list[bool]:
        futures = [self.submit(leased_by, r) for r in reports]
        return list(await asyncio.gather(*futures))

    async def drain(self) -> None:
        """Until everything submitted so far is written (not what comes after: carriers may
        keep acking while this server shuts down)."""
        pending = [f for batch in self._pending.values() for _, f in batch] + list(self._writing)
        await asyncio.gather(*pending, return_exceptions=True)

    async def _flush(self) -> None:
        try:
            while self._pending:
                # Let the deliveries finishing meanwhile join this statement: one UPDATE of
                # fifty rows costs little more than one of a single row, and a statement's
                # round trip costs more than a delivery's bookkeeping. Nothing waits on
                # this but the leases' bookkeeping: the deliveries have already happened.
                await asyncio.sleep(COALESCE_SECONDS)
                leased_by = next(iter(self._pending))
                batch = self._pending.pop(leased_by)
                try:
                    await self._write(leased_by, batch)
                except asyncio.CancelledError:
                    for _, future in batch:
                        future.cancel()
                    raise
                except Exception as exc:
                    # The leases stay as they are; they expire and the rescuer retries them.
                    log.warning("recording %d outcomes failed: %s", len(batch), exc)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    await asyncio.sleep(0.2)
        finally:
            self._flushers -= 1

    async def _write(
        self, leased_by: str, batch: list[tuple[OutcomeReport, asyncio.Future[bool]]]
    ) -> None:
        self._writing = [f for _, f in batch]
        try:
            await self._write_batch(leased_by, batch)
        finally:
            self._writing = []

    async def _write_batch(
        self, leased_by: str, batch: list[tuple[OutcomeReport, asyncio.Future[bool]]]
    ) -> None:
        delivered = [r for r, _ in batch if r.verdict is Verdict.DELIVERED]
        others = [r for r, _ in batch if r.verdict is not Verdict.DELIVERED]
        rows = []
        if delivered:
            rows += await self._store.complete(
                leased_by,
                [r.id for r in delivered],
                [r.attempt for r in delivered],
                [r.status for r in delivered],
                [None if r.duration is None else r.duration * 1000 for r in delivered],
            )
        if others:
            rows += await self._store.record_outcomes(
                leased_by,
                [r.id for r in others],
                [r.attempt for r in others],
                [r.verdict.value for r in others],
                [r.retry_after for r in others],
                [(r.error or "failed")[:2000] for r in others],
                [r.status for r in others],
                [r.duration for r in others],
                [r.response_excerpt for r in others],
            )
        accepted = set()
        now = time.time()
        wake: set[str] = set()
        retried = False
        for row in rows:
            accepted.add(row.id)
            queue, state = row.queue, row.state
            metrics.child(metrics.DELIVERIES, queue, OUTCOME_LABEL[state]).inc()
            if state == "completed":
                latency = max(now - row.created_at, 0)
                metrics.child(metrics.END_TO_END_LATENCY, queue).observe(latency)
            elif state == "retryable":
                retried = True
            if row.ordering_key is not None and state != "retryable":
                wake.add(queue)  # the next message with this key may go now
            if row.called_back:
                metrics.MESSAGES_ENQUEUED.labels(queue).inc()
                wake.add(queue)  # its callback is available
        for report, future in batch:
            if not future.done():
                future.set_result(report.id in accepted)
        if wake:
            self._wakeups.announce(wake)
        if retried:
            self._on_retry_scheduled()
        if self._directory is not None and rows:
            await self._after_outcomes(batch, rows)

    async def _after_outcomes(
        self,
        batch: list[tuple[OutcomeReport, asyncio.Future[bool]]],
        rows: list[FinishedRow],
    ) -> None:
        """A finished delivery of a queue with flow limits makes room for its key: lease
        again. Outcomes of queues with a circuit breaker count towards their origins'
        circuits. After the callers have their answer: nothing waits on this."""
        assert self._directory is not None
        guarded = set()
        flowing = set()
        for queue in {row.queue for row in rows}:
            settings = self._directory.cached(queue)
            if settings is None:
                try:
                    settings = await self._directory.get(queue, create=False)
                except DB_ERRORS:
                    continue
            if settings is not None and settings.circuit_breaker is not None:
                guarded.add(queue)
            if settings is not None and settings.flow_limits is not None:
                flowing.add(queue)
        if flowing:
            self._wakeups.announce(flowing)
        if not guarded:
            return
        verdicts = {r.id: r.verdict for r, _ in batch}
        by_queue: dict[str, tuple[list[int], list[bool]]] = {}
        for row in rows:
            if row.queue in guarded:
                ids, failed = by_queue.setdefault(row.queue, ([], []))
                ids.append(row.id)
                failed.append(verdicts[row.id] is Verdict.RETRY)
        for queue, (ids, failed) in by_queue.items():
            try:
                changed = await self._store.record_circuits(queue, ids, failed)
            except DB_ERRORS as exc:
                log.warning(
                    "counting %d outcomes of %s for its circuits failed: %s", len(ids), queue, exc
                )
                continue
            if any(c.state == "closed" for c in changed):
                self._on_retry_scheduled()  # the held messages were released: promote them
            for c in changed:
                if c.state == "closed":
                    log.info(
                        "circuit closed: queue %s, origin %s (the probe was delivered)",
                        queue,
                        c.origin,
                    )
                elif c.previous == "half_open":
                    log.warning(
                        "circuit open: queue %s, origin %s (the probe failed)", queue, c.origin
                    )
                else:
                    log.warning(
                        "circuit open: queue %s, origin %s (%d of %d attempts failed)",
                        queue,
                        c.origin,
                        c.failures,
                        c.attempts,
                    )
