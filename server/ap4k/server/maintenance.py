"""Background upkeep every server replica runs; all of it is safe to run concurrently.

- the scheduler promotes due `scheduled` and `retryable` messages to `available`;
- the schedules fire recurring schedules that are due (schedules.py);
- the rescuer returns expired leases (a dispatcher or carrier died) to the queue;
- the pruner deletes finished messages past their retention;
- the gauges refresh queue depths for /metrics.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from ap4k.core.waits import within
from ap4k.server import metrics
from ap4k.server.schedules import Scheduler
from ap4k.server.store import DB_ERRORS, PRUNE_BATCH, RESCUE_BATCH, STATES, Store
from ap4k.server.wakeups import Wakeups

log = logging.getLogger("ap4k.maintenance")


class Maintenance:
    def __init__(
        self,
        store: Store,
        wakeups: Wakeups,
        *,
        retention_seconds: float,
        rescue_interval: float = 2.0,
        prune_interval: float = 60.0,
        gauges_interval: float = 5.0,
        schedules: Scheduler | None = None,
    ) -> None:
        self.store = store
        self.wakeups = wakeups
        self.retention_seconds = retention_seconds
        self.rescue_interval = rescue_interval
        self.prune_interval = prune_interval
        self.gauges_interval = gauges_interval
        self.schedules = schedules
        self._scheduler_poke = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._circuit_queues: set[str] = set()
        self._known_gauges: set[tuple[str, str]] = set()

    def poke_scheduler(self) -> None:
        """Something was scheduled or set to retry: recompute when the next one is due."""
        self._scheduler_poke.set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for name, job in (
            ("scheduler", self._scheduler),
            ("rescuer", self._every(self.rescue_interval, self.rescue)),
            ("pruner", self._every(self.prune_interval, self.prune)),
            ("gauges", self._every(self.gauges_interval, self.refresh_gauges)),
            *(
                [("schedules", self._every(self.schedules.interval, self.schedules.run_once))]
                if self.schedules is not None
                else []
            ),
        ):
            self._tasks.append(loop.create_task(job(), name=f"ap4k-{name}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def _every(
        self, seconds: float, job: Callable[[], Awaitable[object]]
    ) -> Callable[[], Coroutine[Any, Any, None]]:
        async def loop() -> None:
            while True:
                try:
                    await job()
                except DB_ERRORS as exc:
                    log.warning("%s failed: %s", job.__name__, exc)
                except Exception:  # a bug: say so, and keep the upkeep going
                    log.exception("%s failed", job.__name__)
                await asyncio.sleep(seconds)

        return loop

    async def _scheduler(self) -> None:
        while True:
            wait = 1.0
            try:
                promoted = await self.promote()
                due_in = await self.store.seconds_until_next_due()
                if promoted >= 5000:
                    wait = 0.0
                elif due_in is not None:
                    wait = min(max(due_in, 0.005), 1.0)
            except DB_ERRORS as exc:
                log.warning("scheduler failed: %s", exc)
            except Exception:
                log.exception("scheduler failed")
            if wait > 0:
                self._scheduler_poke.clear()
                await within(self._scheduler_poke.wait(), wait)

    async def promote(self) -> int:
        queues = await self.store.promote_due()
        if queues:
            self.wakeups.announce(set(queues))
        return len(queues)

    async def rescue(self) -> int:
        """Every expired lease, in batches: a crashed carrier may leave tens of thousands."""
        total = 0
        while True:
            rows = await self.store.rescue_expired(RESCUE_BATCH)
            counts = Counter(r.queue for r in rows)
            for queue, n in counts.items():
                metrics.LEASES_EXPIRED.labels(queue).inc(n)
            total += len(rows)
            if len(rows) < RESCUE_BATCH:
                break
        if total:
            log.info("rescued %d expired leases", total)
            self.poke_scheduler()
        return total

    async def prune(self) -> int:
        await self.store.prune_flow_buckets()
        total = 0
        while True:
            deleted = await self.store.prune_finished(self.retention_seconds, PRUNE_BATCH)
            total += deleted
            if deleted < PRUNE_BATCH:
                break
        await self.store.prune_orphan_attempts(self.retention_seconds)
        return total

    async def refresh_gauges(self) -> None:
        depths = await self.store.depths()
        seen: set[tuple[str, str]] = set()
        for queue, depth in depths.items():
            for state in STATES:
                metrics.QUEUE_DEPTH.labels(queue, state).set(depth.counts[state])
                seen.add((queue, state))
            metrics.OLDEST_AVAILABLE_AGE.labels(queue).set(depth.oldest_available_age_seconds)
        # A queue that emptied out reads zero rather than its last value.
        for queue, state in self._known_gauges - seen:
            metrics.QUEUE_DEPTH.labels(queue, state).set(0)
            metrics.OLDEST_AVAILABLE_AGE.labels(queue).set(0)
        self._known_gauges |= seen
        held = await self.store.held_circuits()
        for queue in held.keys() | self._circuit_queues:
            metrics.CIRCUITS_OPEN.labels(queue).set(held.get(queue, 0))
        self._circuit_queues |= held.keys()
