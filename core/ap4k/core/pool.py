"""The delivery pool: the one engine under the server's dispatchers and under carriers.

    lease loop ──owner.lease(room)──▶ ready buffer ──▶ N workers ──HTTP──▶ targets
                                                          └──▶ owner.report(delivery, outcome)
    heartbeat ──owner.extend(held too long)             drain ──owner.release(not started)

The owner supplies only how it leases (a `FOR UPDATE SKIP LOCKED` statement for the server,
a long poll of `/v1/leases` for a carrier) and how it reports outcomes and gives leases back
(an outcome recorder, or acks over HTTP). Everything else lives here, once:

- the lease loop keeps messages leased ahead of the workers, so that a worker that finishes
  finds its next message waiting: about `AHEAD_SECONDS` of deliveries at the recent rate,
  at least one batch's worth (`size`) and at most `max_ahead`: under a backlog, fast
  deliveries then come in large lease batches (few lease calls), while slow ones do not
  hoard messages others could deliver. It leases again once half of what it holds ahead
  has gone to the workers, not once all of it has: a lease takes a round trip (a statement,
  or an HTTP call for a carrier), and the workers that finish meanwhile must not wait for
  it (docs/performance.md, "The delivery path: workers waiting on the lease loop");
- a heartbeat renews the leases held for more than half their duration (slow deliveries and
  messages still waiting for a worker), so leases can be short: a process that dies stops
  renewing, and its messages are handed out again within about one lease;
- the drain (`stop`): stop leasing; give back at once what no worker has started; let the
  deliveries in flight finish until the drain deadline; report those cut off as failed
  attempts (a request cut off mid-way may have reached its target: it is retried, never
  given back as untried); give back what was handed over after the drain began.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from ap4k.core.delivery import Deliverer, Delivery, Outcome, Verdict

log = logging.getLogger("ap4k.pool")

CUT_OFF_ERROR = "abandoned at shutdown"
AHEAD_SECONDS = 0.25
RATE_WINDOW_SECONDS = 1.0
# How long the drain waits for a lease call in flight to come back before cancelling it: a
# lease committed but never seen would sit out its whole expiry.
LEASE_RETURN_SECONDS = 2.0

Lease = Callable[[int], Awaitable[list[Delivery]]]
Report = Callable[[Delivery, Outcome], None]
Release = Callable[[list[Delivery]], Awaitable[None]]
# Renews these leases for `seconds`; returns the ids it renewed (the others were lost).
Extend = Callable[[list[Delivery], float], Awaitable[Iterable[int]]]


class DeliveryPool:
    """`size` concurrent deliveries fed by the owner's `lease`, reported through `report`.

    `lease(room)` leases up to `room` messages; it may wait (for a hint, a poll interval or a
    long poll) and return none. `report` is called once per delivery, from the worker that
    made it. `cancel_lease_on_stop`: whether a lease call in flight at the drain is
    cancelled at once (a carrier's long poll, which the server gives back when cut) rather
    than awaited for up to `LEASE_RETURN_SECONDS` (a server's lease statement).
    `max_ahead`: the most messages leased beyond the workers (default and at least `size`).
    `hold_until_settled`: keep renewing a lease after its outcome is reported, until the
    owner calls `settled()` (a carrier, whose acks reach the server later, in batches).
    """

    def __init__(
        self,
        *,
        size: int,
        lease_seconds: float,
        lease: Lease,
        report: Report,
        release: Release,
        extend: Extend,
        deliverer: Deliverer | None = None,
        cancel_lease_on_stop: bool = False,
        max_ahead: int | None = None,
        hold_until_settled: bool = False,
        name: str = "ap4k-pool",
    ) -> None:
        self.size = size
        self.max_ahead = max(size, max_ahead or size)
        self._hold_until_settled = hold_until_settled
        self.lease_seconds = lease_seconds
        self.deliverer = deliverer or Deliverer(max_connections=max(size, 1) * 2)
        self._lease = lease
        self._report = report
        self._release = release
        self._extend = extend
        self._cancel_lease_on_stop = cancel_lease_on_stop
        self._name = name
        self._ready: asyncio.Queue[Delivery | None] = asyncio.Queue()
        self._outstanding = 0  # leased and not yet delivered
        self._capacity = asyncio.Event()
        self._refill_at = size  # the lease loop leases again once `outstanding` falls to this
        self._leasing = False  # a lease call is in flight
        self._lease_asked = False  # the owner asked for a lease call now (`lease_now`)
        # Every lease held and not yet reported (or settled): id -> (delivery, renewed at).
        self._held: dict[int, tuple[Delivery, float]] = {}
        self._in_flight: dict[int, Delivery] = {}
        self._late: list[Delivery] = []  # handed over after the drain began
        self._stopping = False
        self._leaser: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._delivered = 0
        self._rate = 0.0  # deliveries per second, over the last rate window
        self._rate_since = time.monotonic()
        self._rate_count = 0

    # -- state ------------------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Messages leased and not yet delivered (buffered or in flight)."""
        return self._outstanding

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def room(self) -> int:
        """How many more messages the lease loop would take now."""
        return self.size + self._ahead() - self._outstanding

    def _ahead(self) -> int:
        if self.max_ahead == self.size:
            return self.size
        now = time.monotonic()
        elapsed = now - self._rate_since
        counted = self._delivered - self._rate_count
        # Over the last second, or sooner once `max_ahead` deliveries were made: a backlog
        # released after a quiet spell is leased ahead at its own pace within milliseconds.
        if elapsed >= RATE_WINDOW_SECONDS or (counted >= self.max_ahead and elapsed > 0):
            self._rate = counted / elapsed
            self._rate_since, self._rate_count = now, self._delivered
        return min(max(self.size, int(self._rate * AHEAD_SECONDS)), self.max_ahead)

    def lease_now(self) -> bool:
        """Have the lease loop lease what it has room for now, even with enough in hand, for
        an owner whose lease call carries other news (a carrier's acks). False when it
        cannot start one now: stopping, without room, or a lease call in flight."""
        if self._stopping or self._leasing or self.room <= 0:
            return False
        self._lease_asked = True
        self._capacity.set()
        return True

    def settled(self, ids: Iterable[int]) -> None:
        """The outcomes of these deliveries reached the server: stop renewing their leases
        (with `hold_until_settled`)."""
        for delivery_id in ids:
            self._held.pop(delivery_id, None)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._leaser = loop.create_task(self._lease_loop(), name=f"{self._name}-leaser")
        self._heartbeat = loop.create_task(self._heartbeat_loop(), name=f"{self._name}-heartbeat")
        self._workers = [
            loop.create_task(self._worker(), name=f"{self._name}-worker-{i}")
            for i in range(self.size)
        ]

    def hold(self, delivery: Delivery) -> None:
        """Take a leased message for delivery (the lease loop's, or one handed over)."""
        if self._stopping:  # the workers may be gone: give it back with the rest
            self._late.append(delivery)
            return
        self._outstanding += 1
        self._held[delivery.id] = (delivery, time.monotonic())
        self._ready.put_nowait(delivery)

    async def stop(self, deadline: float) -> None:
        """Drain by `deadline` (a `time.monotonic()` instant); see the module docstring."""
        self._stopping = True
        self._capacity.set()
        if self._leaser is not None:
            wait = 0.0 if self._cancel_lease_on_stop else LEASE_RETURN_SECONDS
            await _finish(self._leaser, min(wait, _left(deadline)))
        unstarted = self._take_unstarted()
        if unstarted:
            await self._give_back(unstarted)
        for _ in self._workers:
            self._ready.put_nowait(None)
        if self._workers:
            _, late = await asyncio.wait(self._workers, timeout=_left(deadline))
            cut_off = list(self._in_flight.values())
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            if cut_off:
                log.warning(
                    "%d deliveries still in flight at the drain deadline: cut off, "
                    "to be retried", len(cut_off)
                )
            for delivery in cut_off:
                self._held.pop(delivery.id, None)
                self._report(
                    delivery, Outcome(Verdict.RETRY, None, CUT_OFF_ERROR, 0.0, 0.0, cut_off=True)
                )
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        await self.give_back_late()
        await self.deliverer.close()
        self._workers = []

    async def give_back_late(self) -> None:
        """Give back what was handed over after the drain began (`hold` keeps it aside)."""
        late, self._late = self._late + self._take_unstarted(), []
        if late:
            await self._give_back(late)

    def _take_unstarted(self) -> list[Delivery]:
        unstarted: list[Delivery] = []
        while not self._ready.empty():
            item = self._ready.get_nowait()
            if item is not None:
                unstarted.append(item)
                self._held.pop(item.id, None)
                self._outstanding -= 1
        return unstarted

    async def _give_back(self, deliveries: list[Delivery]) -> None:
        try:
            await self._release(deliveries)
        except Exception as exc:  # the owner's transport failed: the leases will expire
            log.warning("could not give back %d leases (they will expire): %r",
                        len(deliveries), exc)

    # -- leasing ----------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        while not self._stopping:
            ahead = self._ahead()
            self._refill_at = self.size + ahead // 2
            # Enough ahead in hand: wait for room (or for the owner's call, `lease_now`).
            if self._outstanding > self._refill_at and not self._lease_asked:
                self._capacity.clear()
                await self._capacity.wait()
                continue
            self._lease_asked = False
            self._leasing = True
            try:
                leased = await self._lease(max(self.size + ahead - self._outstanding, 1))
            except Exception:  # a bug in the owner's lease must not stop delivery for good
                log.exception("leasing failed unexpectedly")
                await asyncio.sleep(1.0)
                continue
            finally:
                self._leasing = False
            for delivery in leased:
                self.hold(delivery)

    async def _heartbeat_loop(self) -> None:
        """Renew the leases held for more than half their duration, every quarter of one."""
        lease = self.lease_seconds
        while True:
            await asyncio.sleep(max(lease / 4, 0.25))
            now = time.monotonic()
            due = [d for d, renewed in self._held.values() if now - renewed > lease / 2]
            if not due:
                continue
            try:
                renewed = await self._extend(due, lease)
            except Exception as exc:  # tried again at the next beat, while the lease lasts
                log.warning("could not renew %d leases: %r", len(due), exc)
                continue
            for delivery_id in renewed:
                held = self._held.get(delivery_id)
                if held is not None:
                    self._held[delivery_id] = (held[0], now)

    # -- delivering -------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            delivery = await self._ready.get()
            if delivery is None:
                return
            self._in_flight[delivery.id] = delivery
            try:
                outcome = await self.deliverer.deliver(delivery)
            finally:
                self._in_flight.pop(delivery.id, None)
            self._outstanding -= 1
            self._delivered += 1
            if self._outstanding <= self._refill_at:  # wake the lease loop only when it acts
                self._capacity.set()
            if not self._hold_until_settled:
                self._held.pop(delivery.id, None)
            self._report(delivery, outcome)


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


async def _finish(task: asyncio.Task[None], timeout: float) -> None:
    """Let `task` end by itself within `timeout`, else cancel it."""
    if timeout > 0:
        await asyncio.wait([task], timeout=timeout)
    if not task.done():
        task.cancel()
    (result,) = await asyncio.gather(task, return_exceptions=True)
    if isinstance(result, Exception):
        log.error("the lease loop failed", exc_info=result)
