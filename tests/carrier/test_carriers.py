"""Carriers: delivery that scales out over leases and loses nothing (issue 3)."""

from __future__ import annotations

import asyncio
import json
import time

from ap4k.core.embedded_pg import free_port
from ap4k_testkit import (
    Api,
    CarrierProcess,
    Received,
    ServerProcess,
    StartServer,
    count_rows,
    sink,
    wait_completed,
)


async def slow_ok(_: Received, __: int) -> int:
    await asyncio.sleep(0.02)
    return 200


async def test_three_carriers_deliver_twenty_thousand(
    start_server: StartServer, database_url: str
) -> None:
    server, api = await start_server(dispatchers=0)
    url = f"http://127.0.0.1:{server.settings.port}"
    carriers = [await CarrierProcess(url).start() for _ in range(3)]
    try:
        async with sink() as target:
            sent: set[str] = set()
            for _ in range(20):
                results = await api.send_batch(
                    "carried", [{"target": target.url, "body": {"i": i}} for i in range(1000)]
                )
                sent.update(r["id"] for r in results)
            await target.wait_for(lambda: set(target.delivered_ids()) >= sent, timeout=180)
            assert set(target.delivered_ids()) == sent
            # All three carriers took part.
            for carrier in carriers:
                assert await carrier.metric("ap4k_carrier_deliveries_total") > 0
        # The carriers' acks reach the database in batches, later than the deliveries; on a
        # loaded machine that can take a while.
        await wait_completed(database_url, 20_000, timeout=60)
    finally:
        for carrier in carriers:
            carrier.kill()


async def test_sigkill_of_a_carrier_loses_nothing(start_server: StartServer) -> None:
    server, api = await start_server(dispatchers=0)
    url = f"http://127.0.0.1:{server.settings.port}"
    doomed = await CarrierProcess(url, lease_seconds=2).start()
    survivor = await CarrierProcess(url, lease_seconds=2).start()
    try:
        async with sink(slow_ok) as target:
            sent = {
                r["id"]
                for r in await api.send_batch(
                    "sturdy", [{"target": target.url} for _ in range(1000)]
                )
            }
            await target.wait_for(lambda: len(target.received) >= 200, timeout=30)
            doomed.kill()  # leases held, deliveries in flight
            await target.wait_for(lambda: set(target.delivered_ids()) >= sent, timeout=60)
            assert set(target.delivered_ids()) == sent
    finally:
        doomed.kill()
        survivor.kill()


async def test_server_sigkill_and_restart_carriers_carry_on(database_url: str) -> None:
    server = await ServerProcess(database_url, "--dispatchers", "0").start()
    api = Api(server.url)
    carriers = [await CarrierProcess(server.url, lease_seconds=3).start() for _ in range(2)]
    try:
        async with sink(slow_ok) as target:
            sent: set[str] = set()
            for _ in range(2):
                batch = [{"target": target.url} for _ in range(750)]
                sent.update(r["id"] for r in await api.send_batch("through", batch))
            await target.wait_for(lambda: len(target.received) >= 200, timeout=30)
            server.kill()
            await asyncio.sleep(1.0)
            await server.start()
            more = {
                r["id"]
                for r in await api.send_batch(
                    "through", [{"target": target.url} for _ in range(200)]
                )
            }
            await target.wait_for(lambda: set(target.delivered_ids()) >= sent | more, timeout=90)
            assert all(c.process and c.process.poll() is None for c in carriers)
    finally:
        await api.close()
        for carrier in carriers:
            carrier.kill()
        server.kill()


async def test_a_carrier_added_mid_run_takes_work(start_server: StartServer) -> None:
    server, api = await start_server(dispatchers=0)
    url = f"http://127.0.0.1:{server.settings.port}"
    first = await CarrierProcess(url, concurrency=2).start()
    late: CarrierProcess | None = None
    try:
        async with sink(slow_ok) as target:
            sent = {
                r["id"]
                for r in await api.send_batch(
                    "growing", [{"target": target.url} for _ in range(400)]
                )
            }
            await target.wait_for(lambda: len(target.received) >= 20, timeout=30)
            late = await CarrierProcess(url, concurrency=8).start()
            await target.wait_for(lambda: set(target.delivered_ids()) >= sent, timeout=60)
            assert await late.metric("ap4k_carrier_deliveries_total") > 0
    finally:
        first.kill()
        if late is not None:
            late.kill()


async def test_stale_and_foreign_acks_are_refused(start_server: StartServer) -> None:
    _, api = await start_server(dispatchers=0)
    lease = {"carrier": "a", "queues": ["acks"], "wait_seconds": 10, "lease_seconds": 1}
    sent = await api.send("acks", {"target": "http://127.0.0.1:9/"})
    [message] = (await api.ok("POST", "/v1/leases", lease))["messages"]
    assert message["id"] == sent["id"] and message["attempt"] == 1
    first = {"id": message["id"], "attempt": 1, "outcome": "delivered"}
    refused = {"accepted": [], "refused": [message["id"]]}
    # Another carrier cannot ack it.
    assert await api.ok("POST", "/v1/acks", {"carrier": "b", "acks": [first]}) == refused
    # Once the lease has expired, its own carrier cannot either.
    await asyncio.sleep(1.2)
    assert await api.ok("POST", "/v1/acks", {"carrier": "a", "acks": [first]}) == refused
    # The rescuer hands it out again: a new attempt, and the old one stays refused.
    [again] = (await api.ok("POST", "/v1/leases", lease))["messages"]
    assert again["attempt"] == 2
    assert await api.ok("POST", "/v1/acks", {"carrier": "a", "acks": [first]}) == refused
    second = {"id": message["id"], "attempt": 2, "outcome": "delivered"}
    assert await api.ok("POST", "/v1/acks", {"carrier": "a", "acks": [second]}) == {
        "accepted": [message["id"]],
        "refused": [],
    }
    assert (await api.message(sent["id"]))["state"] == "completed"
    # A duplicate ack changes nothing.
    assert await api.ok("POST", "/v1/acks", {"carrier": "a", "acks": [second]}) == refused


async def test_lease_extension_and_release(start_server: StartServer) -> None:
    _, api = await start_server(dispatchers=0)
    sent = await api.send_batch("manual", [{"target": "http://127.0.0.1:9/"}] * 2)
    leased = await api.ok(
        "POST",
        "/v1/leases",
        {"carrier": "c", "queues": ["manual"], "wait_seconds": 5, "lease_seconds": 1},
    )
    held = [{"id": m["id"], "attempt": m["attempt"]} for m in leased["messages"]]
    assert {h["id"] for h in held} == {m["id"] for m in sent}
    extended = await api.ok(
        "POST", "/v1/leases/extend", {"carrier": "c", "leases": held, "lease_seconds": 30}
    )
    assert {e["id"] for e in extended["extended"]} == {h["id"] for h in held}
    await asyncio.sleep(1.5)  # past the original lease: still ours
    foreign = await api.ok("POST", "/v1/leases/release", {"carrier": "d", "leases": held})
    assert foreign["released"] == []
    released = await api.ok("POST", "/v1/leases/release", {"carrier": "c", "leases": held})
    assert set(released["released"]) == {h["id"] for h in held}
    for m in sent:
        back = await api.message(m["id"])
        assert (back["state"], back["attempt"]) == ("available", 0)


async def test_heartbeat_keeps_slow_deliveries_leased(start_server: StartServer) -> None:
    server, api = await start_server(dispatchers=0)
    url = f"http://127.0.0.1:{server.settings.port}"
    carrier = await CarrierProcess(url, lease_seconds=1).start()

    async def slow(_: Received, __: int) -> int:
        await asyncio.sleep(3.0)  # three lease durations
        return 200

    try:
        async with sink(slow) as target:
            sent = await api.send("patient", {"target": target.url, "timeout_seconds": 10})
            done = await api.wait_state(sent["id"], "completed", timeout=20)
            assert done["attempt"] == 1
            assert len(target.received) == 1
            assert await carrier.metric("ap4k_carrier_leases_extended_total") >= 2
    finally:
        carrier.kill()


async def test_limits_and_ordering_hold_across_carriers(start_server: StartServer) -> None:
    server, api = await start_server(dispatchers=0)
    url = f"http://127.0.0.1:{server.settings.port}"
    carriers = [await CarrierProcess(url).start() for _ in range(2)]
    current: dict[str, int] = {"narrow": 0, "fifo": 0}
    peak: dict[str, int] = {"narrow": 0, "fifo": 0}

    async def busy(received: Received, __: int) -> int:
        current[received.queue] += 1
        peak[received.queue] = max(peak[received.queue], current[received.queue])
        await asyncio.sleep(0.03)
        current[received.queue] -= 1
        return 200

    try:
        async with sink(busy) as target:
            await api.settings("narrow", max_concurrency=2, paused=True)
            await api.send_batch("narrow", [{"target": target.url} for _ in range(40)])
            await api.settings("narrow", paused=False)
            await target.wait_for(lambda: len(target.received) == 40, timeout=30)
            assert peak["narrow"] == 2
            target.received.clear()
            await api.send_batch(
                "fifo",
                [{"target": target.url, "ordering_key": "k", "body": {"n": n}} for n in range(30)],
            )
            await target.wait_for(lambda: len(target.received) == 30, timeout=30)
            assert [json.loads(r.body)["n"] for r in target.received] == list(range(30))
            assert peak["fifo"] == 1
    finally:
        for carrier in carriers:
            carrier.kill()


async def test_failover_to_the_next_server_url(start_server: StartServer) -> None:
    server, api = await start_server(dispatchers=0)
    dead = f"http://127.0.0.1:{free_port()}"
    live = f"http://127.0.0.1:{server.settings.port}"
    carrier = await CarrierProcess(f"{dead},{live}").start()
    try:
        async with sink() as target:
            sent = await api.send("failover", {"target": target.url})
            await api.wait_state(sent["id"], "completed", timeout=20)
    finally:
        carrier.kill()


async def test_sigterm_drains_the_carrier(start_server: StartServer, database_url: str) -> None:
    server, api = await start_server(dispatchers=0)
    url = f"http://127.0.0.1:{server.settings.port}"
    carrier = await CarrierProcess(url, concurrency=2).start()

    async def slow(_: Received, __: int) -> int:
        await asyncio.sleep(0.5)
        return 200

    async with sink(slow) as target:
        sent = {
            r["id"]
            for r in await api.send_batch("drained", [{"target": target.url} for _ in range(20)])
        }
        await target.wait_for(lambda: len(target.received) >= 2, timeout=20)
        assert await asyncio.to_thread(carrier.terminate) == 0
        started = {r.message_id for r in target.received}
        assert await count_rows(
            database_url, "SELECT count(*) FROM ap4k_messages WHERE state = 'completed'"
        ) == len(started)
        assert await count_rows(
            database_url,
            "SELECT count(*) FROM ap4k_messages WHERE state = 'available' AND attempt = 0",
        ) == len(sent) - len(started)


async def test_a_carriers_drain_fits_its_budget_with_targets_slower_than_it(
    start_server: StartServer, database_url: str
) -> None:
    """SIGTERM with every worker stuck on a target slower than the shutdown budget: the
    carrier exits within the budget; the cut-off deliveries are acked as failed attempts,
    what it had not started goes back untried; a second carrier then delivers them all."""
    server, api = await start_server(dispatchers=0)
    url = f"http://127.0.0.1:{server.settings.port}"
    budget = 4.0
    carrier = await CarrierProcess(
        url, "--drain-seconds", "60", "--shutdown-seconds", str(budget), concurrency=2
    ).start()
    released = asyncio.Event()

    async def stuck_until_released(_: Received, __: int) -> int:
        await released.wait()
        return 200

    async with sink(stuck_until_released) as target:
        await api.settings("carried", min_backoff_seconds=0.01, max_backoff_seconds=0.01)
        sent = {
            r["id"]
            for r in await api.send_batch(
                "carried", [{"target": target.url, "timeout_seconds": 120} for _ in range(8)]
            )
        }
        await target.wait_for(lambda: len(target.received) == 2, timeout=20)
        started = time.monotonic()
        assert await asyncio.to_thread(carrier.terminate) == 0
        took = time.monotonic() - started
        assert took < budget + 2, f"the drain took {took:.1f}s for a {budget:g}s budget"
        assert await count_rows(
            database_url,
            "SELECT count(*) FROM ap4k_messages WHERE queue = 'carried'"
            " AND attempt = 1 AND last_error LIKE 'abandoned%'",
        ) == 2
        assert await count_rows(
            database_url,
            "SELECT count(*) FROM ap4k_messages WHERE queue = 'carried'"
            " AND state = 'available' AND attempt = 0",
        ) == 6
        released.set()
        before = len(target.received)
        second = await CarrierProcess(url).start()
        try:
            await target.wait_for(
                lambda: {r.message_id for r in target.received[before:]} >= sent, timeout=60
            )
        finally:
            second.kill()
