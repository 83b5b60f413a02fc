"""The one delivery pool (`ap4k.core.pool`) under both the server's dispatchers and carriers:
its drain, heartbeat and hand-over, against a real HTTP target on 127.0.0.1. The owner's
side (leasing from a list, recording what the pool reports) is the test's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from aiohttp import web

from ap4k.core.delivery import Delivery, Outcome, Verdict
from ap4k.core.pool import CUT_OFF_ERROR, RATE_WINDOW_SECONDS, DeliveryPool
from ap4k_testkit import serving


class Owner:
    """What a dispatcher or carrier supplies: a backlog to lease from, and ledgers."""

    def __init__(self, target: str, count: int, *, path: str = "/") -> None:
        self.backlog = [
            Delivery(id=i, queue="q", attempt=1, max_attempts=3, target=target + path,
                     method="POST", headers=None, body=b"{}", timeout_seconds=30,
                     created_at=time.time())
            for i in range(count)
        ]
        self.reported: dict[int, Outcome] = {}
        self.released: list[int] = []
        self.extended: list[int] = []
        self.more = asyncio.Event()
        self.rooms: list[int] = []  # what each lease call was asked for

    async def lease(self, room: int) -> list[Delivery]:
        self.rooms.append(room)
        if not self.backlog:
            await self.more.wait()
            self.more.clear()
            return []
        taken, self.backlog = self.backlog[:room], self.backlog[room:]
        return taken

    def report(self, delivery: Delivery, outcome: Outcome) -> None:
        assert delivery.id not in self.reported  # once per delivery
        self.reported[delivery.id] = outcome

    async def release(self, deliveries: list[Delivery]) -> None:
        self.released += [d.id for d in deliveries]

    async def extend(self, deliveries: list[Delivery], seconds: float) -> Iterable[int]:
        self.extended += [d.id for d in deliveries]
        return [d.id for d in deliveries]

    def pool(self, size: int, lease_seconds: float = 30.0, **options: Any) -> DeliveryPool:
        return DeliveryPool(size=size, lease_seconds=lease_seconds, lease=self.lease,
                            report=self.report, release=self.release, extend=self.extend,
                            **options)


@pytest.fixture
async def target() -> AsyncIterator[str]:
    released = asyncio.Event()  # ends the stuck requests at teardown

    async def fast(_request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def slow(_request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(status=200)

    async def stuck(_request: web.Request) -> web.Response:
        await released.wait()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/", fast)
    app.router.add_post("/slow", slow)
    app.router.add_post("/stuck", stuck)
    async with serving(app) as url:
        yield url
        released.set()


async def wait_until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_every_leased_message_is_delivered_and_reported_once(target: str) -> None:
    owner = Owner(target, 500)
    pool = owner.pool(size=8)
    pool.start()
    await wait_until(lambda: len(owner.reported) == 500)
    await pool.stop(time.monotonic() + 5)
    assert {o.verdict for o in owner.reported.values()} == {Verdict.DELIVERED}
    assert owner.released == []


async def test_the_drain_finishes_in_flight_and_gives_back_the_unstarted(target: str) -> None:
    owner = Owner(target, 10, path="/slow")
    pool = owner.pool(size=2)
    pool.start()
    await wait_until(lambda: pool.in_flight == 2)
    await pool.stop(time.monotonic() + 5)  # more than the 1 s the in-flight ones need
    assert sorted(owner.reported) == [0, 1]
    assert all(o.verdict is Verdict.DELIVERED for o in owner.reported.values())
    # Leased ahead (two batches' worth) but never started: given back, untried.
    assert sorted(owner.released) == [2, 3]
    assert len(owner.backlog) == 6  # never leased


async def test_the_drain_deadline_cuts_off_and_reports_an_attempt(target: str) -> None:
    owner = Owner(target, 2, path="/stuck")
    pool = owner.pool(size=2)
    pool.start()
    await wait_until(lambda: pool.in_flight == 2)
    started = time.monotonic()
    await pool.stop(started + 0.3)
    assert time.monotonic() - started < 2
    assert sorted(owner.reported) == [0, 1]
    for outcome in owner.reported.values():
        assert (outcome.verdict, outcome.error, outcome.cut_off) == (
            Verdict.RETRY, CUT_OFF_ERROR, True
        )
    assert owner.released == []


async def test_a_message_handed_over_during_the_drain_is_given_back(target: str) -> None:
    owner = Owner(target, 0)
    pool = owner.pool(size=2)
    pool.start()
    stopping = asyncio.create_task(pool.stop(time.monotonic() + 1))
    await asyncio.sleep(0)
    late = Owner(target, 1).backlog[0]
    pool.hold(late)
    owner.more.set()
    await stopping
    assert owner.released == [late.id]
    assert owner.reported == {}


async def test_the_heartbeat_renews_leases_held_past_half_their_length(target: str) -> None:
    owner = Owner(target, 1, path="/slow")
    pool = owner.pool(size=1, lease_seconds=1.0)
    pool.start()
    await wait_until(lambda: len(owner.reported) == 1)
    await pool.stop(time.monotonic() + 1)
    assert set(owner.extended) == {0}  # held 1 s on a 1 s lease: renewed past its half


async def test_a_reported_lease_is_renewed_until_the_owner_settles_it(target: str) -> None:
    """A carrier's acks reach the server later, in batches: until they have, the heartbeat
    keeps renewing the leases they need (an ack for an expired lease would be refused)."""
    owner = Owner(target, 1)
    pool = owner.pool(size=1, lease_seconds=1.0, hold_until_settled=True)
    pool.start()
    await wait_until(lambda: len(owner.reported) == 1)
    await wait_until(lambda: owner.extended == [0])  # reported, not settled: still renewed
    pool.settled([0])
    await asyncio.sleep(1.0)  # two heartbeats
    await pool.stop(time.monotonic() + 1)
    assert owner.extended == [0]


async def test_fast_deliveries_are_leased_in_large_batches_slow_ones_not(target: str) -> None:
    """With `max_ahead`, the pool leases ahead about AHEAD_SECONDS of deliveries at the
    recent rate: fast ones come in batches larger than the pool (few lease calls), slow ones
    one batch's worth at a time (no hoarding)."""
    fast = Owner(target, 20_000)
    pool = fast.pool(size=4, max_ahead=64)
    pool.start()
    await asyncio.sleep(2 * RATE_WINDOW_SECONDS + 0.5)
    await pool.stop(time.monotonic() + 5)
    assert max(fast.rooms) > 2 * 4  # more than the fixed two batches' worth
    assert max(fast.rooms) <= 4 + 64

    slow = Owner(target, 100, path="/slow")  # 1 s each: 4 per second
    pool = slow.pool(size=4, max_ahead=64)
    pool.start()
    await asyncio.sleep(2 * RATE_WINDOW_SECONDS + 0.5)
    await pool.stop(time.monotonic() + 2)
    assert max(slow.rooms) <= 2 * 4


async def test_the_pool_leases_again_before_its_workers_run_dry() -> None:
    """A lease takes a round trip: the pool asks for more once half of what it holds ahead
    has gone to the workers, so that those finishing meanwhile find a message waiting."""
    permits: asyncio.Queue[None] = asyncio.Queue()

    async def one_at_a_time(_request: web.Request) -> web.Response:
        await permits.get()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/", one_at_a_time)
    async with serving(app) as url:
        owner = Owner(url, 100)
        waiting_at_lease: list[int] = []

        async def watched_lease(room: int) -> list[Delivery]:
            waiting_at_lease.append(pool.outstanding - pool.in_flight)
            return await owner.lease(room)

        pool = DeliveryPool(size=2, lease_seconds=30.0, lease=watched_lease,  # two ahead
                            report=owner.report, release=owner.release, extend=owner.extend)
        pool.start()
        try:
            await wait_until(lambda: pool.in_flight == 2 and len(waiting_at_lease) == 1)
            assert owner.rooms == [4]
            permits.put_nowait(None)  # one delivery ends: one of the two ahead starts
            await wait_until(lambda: len(owner.rooms) == 2)
            assert waiting_at_lease[1] == 1  # leased while a message still waited
            assert owner.rooms[1] == 1
        finally:
            for _ in range(200):
                permits.put_nowait(None)
        await wait_until(lambda: len(owner.reported) == 100)
        await pool.stop(time.monotonic() + 5)
    assert {o.verdict for o in owner.reported.values()} == {Verdict.DELIVERED}


async def test_a_backlog_after_a_quiet_spell_is_leased_ahead_without_waiting_a_second(
    target: str,
) -> None:
    """The recent rate is measured over the last second or, sooner, over the last
    `max_ahead` deliveries: a backlog released into an idle pool is leased ahead at its own
    pace after that many deliveries, not after a whole rate window of small leases."""
    owner = Owner(target, 2_000)
    delivered_at_lease: list[tuple[int, int]] = []  # (room asked, delivered by then)

    async def watched_lease(room: int) -> list[Delivery]:
        delivered_at_lease.append((room, len(owner.reported)))
        return await owner.lease(room)

    pool = DeliveryPool(size=4, lease_seconds=30.0, lease=watched_lease, report=owner.report,
                        release=owner.release, extend=owner.extend, max_ahead=64)
    pool.start()
    await wait_until(lambda: len(owner.reported) >= 500)
    await pool.stop(time.monotonic() + 5)
    first_large = next((d for room, d in delivered_at_lease if room > 2 * 4), None)
    assert first_large is not None, delivered_at_lease
    assert first_large <= 64 + 2 * 4


async def test_lease_now_leases_at_once_unless_a_lease_call_is_in_flight(target: str) -> None:
    """A carrier's acker asks for a lease call that can carry its acks: with a batch's
    worth in hand the lease loop would wait for room, but leases at once when asked; not
    while a lease call is in flight (a long poll), nor once stopping."""
    owner = Owner(target, 10, path="/stuck")
    owner.backlog, more = owner.backlog[:7], owner.backlog[7:]
    pool = owner.pool(size=4, max_ahead=16)
    pool.start()
    # Four in flight (stuck), three waiting: more than half of the four ahead are still in
    # hand, so the loop waits.
    await wait_until(lambda: pool.in_flight == 4 and pool.outstanding == 7)
    await asyncio.sleep(0.1)
    calls = len(owner.rooms)
    assert pool.lease_now()
    await wait_until(lambda: len(owner.rooms) == calls + 1)
    # The backlog is empty: that call now waits for more (a long poll); no other starts.
    assert not pool.lease_now()
    owner.more.set()  # the long poll ends with nothing: the loop waits for room again
    owner.backlog = more
    await wait_until(pool.lease_now)
    # What it has room for: four workers and four ahead, less the seven in hand.
    await wait_until(lambda: len(owner.rooms) == calls + 2 and pool.outstanding == 8)
    assert owner.rooms[-1] == 1
    await pool.stop(time.monotonic() + 0.5)
    assert not pool.lease_now()
