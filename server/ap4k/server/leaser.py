"""Leasing messages for the server's dispatchers and for carriers, the same way.

One Leaser per process. It remembers, per queue, a head pointer: the lowest lease_order of
the last full batch it leased. The next lease starts there instead of at the queue's
beginning, which every delivery litters with a dead index entry until vacuum passes
(docs/performance.md, trap 2). The pointer is only a hint: it is dropped whenever a lease
comes back short, when higher-priority work arrives, and every second, so that messages
released or rolled back behind it are found again.
"""

from __future__ import annotations

import logging
import time

import orjson
from yarl import URL

from ap4k.core.delivery import Delivery, Verdict
from ap4k.core.targets import TargetError
from ap4k.server import metrics
from ap4k.server.outcomes import OutcomeRecorder, OutcomeReport
from ap4k.server.queues import QueueDirectory
from ap4k.server.rows import LeasedRow
from ap4k.server.store import QueueSettings, Store

log = logging.getLogger("ap4k.leaser")

MAX_LEASE_BATCH = 100
FLOOR_SECONDS = 1.0


class Leaser:
    def __init__(self, store: Store, directory: QueueDirectory, recorder: OutcomeRecorder) -> None:
        self.store = store
        self.directory = directory
        self.recorder = recorder
        self._floors: dict[str, int] = {}
        self._floors_reset_at = time.monotonic()

    def forget(self, queue: str | None = None) -> None:
        """Drop the head pointer of `queue` (or of every queue)."""
        if queue is None:
            self._floors.clear()
        else:
            self._floors.pop(queue, None)

    async def lease(
        self, settings: QueueSettings, limit: int, leased_by: str, lease_seconds: float
    ) -> list[Delivery]:
        """Lease up to `limit` messages (in batches of at most 100) of one queue."""
        if time.monotonic() - self._floors_reset_at > FLOOR_SECONDS:
            self._floors.clear()
            self._floors_reset_at = time.monotonic()
        queue = settings.name
        is_carrier = leased_by.startswith("carrier:")
        out: list[Delivery] = []
        while len(out) < limit:
            want = min(limit - len(out), MAX_LEASE_BATCH)
            rows = await self.store.lease(
                queue,
                want,
                leased_by,
                lease_seconds,
                self._floors.get(queue, 0),
            )
            if len(rows) == want:
                self._floors[queue] = min(r.lease_order for r in rows)
            else:
                self._floors.pop(queue, None)
            if rows:
                kind = "carrier" if is_carrier else "dispatcher"
                metrics.LEASED.labels(queue, kind).inc(len(rows))
            for row in rows:
                if row.probe:
                    log.warning(
                        "circuit half_open: queue %s, origin %s, probe message %d",
                        queue,
                        URL(row.target).origin(),
                        row.id,
                    )
                delivery = self._delivery(row, settings, leased_by)
                if delivery is not None:
                    out.append(delivery)
            if len(rows) < want:
                break
        return out

    def _delivery(
        self, row: LeasedRow, settings: QueueSettings, leased_by: str
    ) -> Delivery | None:
        try:
            _, explicit = self.directory.target(settings, row.target)
        except TargetError as exc:
            # The queue's allow-list changed since this message was accepted.
            self.recorder.submit(
                leased_by,
                OutcomeReport(
                    id=row.id,
                    attempt=row.attempt,
                    verdict=Verdict.FAIL,
                    error=f"refused: {exc}",
                    queue=settings.name,
                ),
            )
            return None
        return Delivery(
            id=row.id,
            queue=settings.name,
            attempt=row.attempt,
            max_attempts=row.max_attempts,
            target=row.target,
            method=row.method,
            headers=None if row.headers is None else orjson.loads(row.headers),
            body=row.body,
            timeout_seconds=float(row.timeout_seconds),
            created_at=row.created_at.timestamp(),
            ordering_key=row.ordering_key,
            signing_secret=settings.signing_secret,
            webhook_keys=settings.webhook_keys,
            explicitly_allowed=explicit,
        )
