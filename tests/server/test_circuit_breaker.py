"""The circuit breaker per target origin: a target that answers 503 for a while and then
recovers, with the breaker on (server dispatchers and a carrier sharing its state in
PostgreSQL) and, at the same time and at the same target, off."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp

from ap4k_testkit import Api, CarrierProcess, Received, StartServer, count_rows, sink

OUTAGE_SECONDS = 6.0  # the 60 s, shortened; the policy below is scaled to it
MESSAGES = 40
POLICY = {"max_attempts": 6, "min_backoff_seconds": 0.1, "max_backoff_seconds": 0.5}
BREAKER = {"failure_ratio": 0.5, "min_attempts": 5, "window_seconds": 10, "open_seconds": 1.5}


async def gauge(api: Api, name: str, queue: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(api.base_url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(f'{name}{{queue="{queue}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_an_outage_spends_few_attempts_with_the_breaker_and_many_without(
    start_server: StartServer, database_url: str
) -> None:
    server, api = await start_server(gauges_interval_seconds=0.2)
    carrier = await CarrierProcess(f"http://127.0.0.1:{server.settings.port}").start()
    outage_ends = time.monotonic() + OUTAGE_SECONDS

    def down_then_up(_: Received, __: int) -> int:
        return 503 if time.monotonic() < outage_ends else 200

    try:
        async with sink(down_then_up) as target:
            await api.settings("guarded", **POLICY, circuit_breaker=BREAKER)
            await api.settings("unguarded", **POLICY)
            shown = await api.ok("GET", "/v1/queues/guarded")
            assert shown["settings"]["circuit_breaker"] == BREAKER
            sent: dict[str, set[str]] = {}
            for queue in ("guarded", "unguarded"):
                batch = [
                    {"target": target.url + "/hook", "body": {"i": i}} for i in range(MESSAGES)
                ]
                sent[queue] = {m["id"] for m in await api.send_batch(queue, batch)}

            # During the outage the guarded queue's circuit opens and shows.
            circuits: list[dict[str, object]] = []
            while not circuits and time.monotonic() < outage_ends:
                circuits = (await api.ok("GET", "/v1/queues/guarded/circuits"))["circuits"]
                await asyncio.sleep(0.1)
            assert circuits, "the circuit never opened during the outage"
            assert circuits[0]["origin"] == f"http://127.0.0.1:{target.port}"
            assert circuits[0]["state"] in ("open", "half_open")
            for _ in range(20):
                if await gauge(api, "ap4k_circuits_open", "guarded") >= 1:
                    break
                await asyncio.sleep(0.1)
            assert await gauge(api, "ap4k_circuits_open", "guarded") >= 1
            assert (await api.ok("GET", "/v1/queues/unguarded/circuits"))["circuits"] == []

            finished = (
                "SELECT count(*) FROM ap4k_messages WHERE queue = $1"
                " AND state IN ('completed', 'discarded')"
            )
            deadline = time.monotonic() + OUTAGE_SECONDS + 60
            while time.monotonic() < deadline:
                done = [await count_rows(database_url, finished, q) for q in sent]
                if done == [MESSAGES, MESSAGES]:
                    break
                await asyncio.sleep(0.2)

            attempts = {
                queue: Counter(r.message_id for r in target.received if r.message_id in ids)
                for queue, ids in sent.items()
            }
            dead = {
                queue: await count_rows(
                    database_url,
                    "SELECT count(*) FROM ap4k_messages WHERE queue = $1 AND state = 'discarded'",
                    queue,
                )
                for queue in sent
            }
            figures = {
                queue: (sum(attempts[queue].values()), max(attempts[queue].values()), dead[queue])
                for queue in sent
            }
            print(f"\n(total attempts, most attempts of one message, dead letters): {figures}")

            # Breaker on: every message delivered afterwards, a few attempts each, none dead.
            delivered = {r.message_id for r in target.received if r.at >= outage_ends}
            assert delivered >= sent["guarded"]
            assert dead["guarded"] == 0
            assert max(attempts["guarded"].values()) <= 4
            # Breaker off: the same outage burnt attempts (how many messages it dead-lettered
            # depends on how fast a loaded machine retries: all 40 on a quiet one).
            assert max(attempts["unguarded"].values()) == POLICY["max_attempts"]
            assert sum(attempts["guarded"].values()) < sum(attempts["unguarded"].values()) / 2

            # Closed again once the probe succeeded; the gauge follows.
            assert (await api.ok("GET", "/v1/queues/guarded/circuits"))["circuits"] == []
            for _ in range(20):
                if await gauge(api, "ap4k_circuits_open", "guarded") == 0:
                    break
                await asyncio.sleep(0.1)
            assert await gauge(api, "ap4k_circuits_open", "guarded") == 0
    finally:
        carrier.kill()


async def test_breaker_settings_are_checked(api: Api) -> None:
    for bad, field in (
        ({"failure_ratio": 0}, "circuit_breaker.failure_ratio"),
        ({"failure_ratio": 1.5}, "circuit_breaker.failure_ratio"),
        ({"min_attempts": 0}, "circuit_breaker.min_attempts"),
        ({"open_seconds": -1}, "circuit_breaker.open_seconds"),
        ({"window": 5}, "circuit_breaker.window"),
        ("on", "circuit_breaker"),
    ):
        status, body = await api.call("PUT", "/v1/queues/cb", {"circuit_breaker": bad})
        assert status == 400, bad
        assert body["error"]["field"] == field, body
    queue = await api.settings("cb", circuit_breaker={"open_seconds": 5})
    assert queue["settings"]["circuit_breaker"] == {
        "failure_ratio": 0.5,
        "min_attempts": 10,
        "window_seconds": 60.0,
        "open_seconds": 5.0,
    }
    assert (await api.settings("cb", circuit_breaker=None))["settings"]["circuit_breaker"] is None
    status, body = await api.call("GET", "/v1/queues/nowhere/circuits")
    assert status == 404


async def test_turning_the_breaker_off_releases_what_it_held(start_server: StartServer) -> None:
    _, api = await start_server()
    up = False
    delivered: set[str] = set()

    def down_until_told(received: Received, __: int) -> int:
        if up:
            delivered.add(received.message_id)
        return 200 if up else 503

    async with sink(down_until_told) as target:
        breaker = {"min_attempts": 1, "failure_ratio": 1, "open_seconds": 3600}
        await api.settings("held", **POLICY, circuit_breaker=breaker)
        sent = await api.send_batch(
            "held", [{"target": target.url, "body": {"i": i}} for i in range(5)]
        )
        circuits: list[dict[str, object]] = []
        while not circuits:
            circuits = (await api.ok("GET", "/v1/queues/held/circuits"))["circuits"]
            await asyncio.sleep(0.05)
        # Open for an hour: nothing goes but what was under way when it opened.
        await asyncio.sleep(1.0)
        tried = len(target.received)
        await asyncio.sleep(1.0)
        assert len(target.received) == tried
        up = True
        await api.settings("held", circuit_breaker=None)
        # Released at once, not in an hour: delivered, none dead.
        await target.wait_for(lambda: delivered == {m["id"] for m in sent})
        assert (await api.ok("GET", "/v1/queues/held/circuits"))["circuits"] == []
        for m in sent:
            assert (await api.message(m["id"]))["state"] != "discarded"
