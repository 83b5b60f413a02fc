"""Attempt history (GET /v1/messages/{id} → attempts) and browsing a queue's messages."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
from aiohttp import web

from ap4k_testkit import Api, CarrierProcess, Received, StartServer, count_rows, sink


async def test_failed_attempts_are_recorded_with_status_excerpt_and_duration(
    start_server: StartServer,
) -> None:
    """Two 503s with a body, then a 200: three attempts, oldest first, each with its number,
    time, duration, status and who made it; the failures keep the start of the answer."""
    _, api = await start_server(dispatchers=2)
    await api.settings("history", min_backoff_seconds=0.05, max_backoff_seconds=0.05)

    def behaviour(received: Received, nth: int) -> web.StreamResponse:
        if nth <= 2:
            return web.Response(status=503, text=f"overloaded, try #{nth} later " + "x" * 3000)
        return web.Response(status=200, text="fine")

    async with sink(behaviour) as target:
        sent = await api.send("history", {"target": target.url + "/hook"})
        message = await api.wait_state(sent["id"], "completed")
    attempts = message["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["outcome"] for a in attempts] == ["retried", "retried", "delivered"]
    assert [a["status"] for a in attempts] == [503, 503, 200]
    first, _, last = attempts
    assert first["error"] == "HTTP 503 Service Unavailable"
    assert first["response_excerpt"].startswith("overloaded, try #1 later xxx")
    assert len(first["response_excerpt"].encode()) == 1024  # the first KiB, no more
    assert last["error"] is None and last["response_excerpt"] is None
    for a in attempts:
        assert a["duration_ms"] is not None and a["duration_ms"] >= 0
        assert a["at"] is not None
    # Who made a failed attempt is kept; a success keeps only its status and duration.
    assert [a["carrier"][:11] for a in attempts[:2]] == ["dispatcher/"] * 2
    assert last["carrier"] is None
    assert attempts[0]["at"] <= attempts[1]["at"] <= attempts[2]["at"]
    assert message["last_error"] is None  # the message itself finished well


async def test_dead_letter_keeps_every_attempt_and_purge_removes_them(
    start_server: StartServer, database_url: str
) -> None:
    _, api = await start_server(dispatchers=2)
    await api.settings("doomed", max_attempts=2, min_backoff_seconds=0.01)

    async with sink(lambda r, n: web.Response(status=500, text="boom")) as target:
        sent = await api.send("doomed", {"target": target.url})
        message = await api.wait_state(sent["id"], "discarded")
    assert [
        (a["attempt"], a["outcome"], a["status"], a["response_excerpt"])
        for a in message["attempts"]
    ] == [(1, "retried", 500, "boom"), (2, "dead", 500, "boom")]

    # A permanent failure: one attempt, dead at once; a connection error has no status.
    async with sink(lambda r, n: 404) as target:
        gone = await api.send("doomed", {"target": target.url})
        dead = await api.wait_state(gone["id"], "discarded")
    assert [(a["outcome"], a["status"], a["response_excerpt"]) for a in dead["attempts"]] == [
        ("dead", 404, None)
    ]
    refused = await api.send("doomed", {"target": "http://127.0.0.1:9/"})
    unreachable = await api.wait_state(refused["id"], "discarded")
    assert {a["status"] for a in unreachable["attempts"]} == {None}
    assert all(a["error"].startswith("connection error") for a in unreachable["attempts"])

    assert await count_rows(database_url, "SELECT count(*) FROM ap4k_attempts") == 5
    purged = await api.ok("DELETE", "/v1/queues/doomed/dead", {"ids": [gone["id"]]})
    assert purged == {"purged": 1}
    assert await count_rows(database_url, "SELECT count(*) FROM ap4k_attempts") == 4
    assert (await api.ok("DELETE", "/v1/queues/doomed/dead")) == {"purged": 2}
    assert await count_rows(database_url, "SELECT count(*) FROM ap4k_attempts") == 0


async def test_carrier_acks_carry_status_and_excerpt(start_server: StartServer) -> None:
    _, api = await start_server(dispatchers=0)
    await api.settings("carried", min_backoff_seconds=30)
    sent = await api.send("carried", {"target": "http://127.0.0.1:9/"})
    leased = await api.ok("POST", "/v1/leases", {"carrier": "c-1", "wait_seconds": 0})
    (item,) = leased["messages"]
    ack = {
        "id": item["id"],
        "attempt": item["attempt"],
        "outcome": "retry",
        "error": "HTTP 502 Bad Gateway",
        "status": 502,
        "response_excerpt": "upstream is down",
        "duration_seconds": 0.25,
    }
    assert (await api.ok("POST", "/v1/acks", {"carrier": "c-1", "acks": [ack]}))["accepted"] == [
        sent["id"]
    ]
    (attempt,) = (await api.message(sent["id"]))["attempts"]
    assert attempt | {"at": None} == {
        "attempt": 1,
        "at": None,
        "duration_ms": 250.0,
        "outcome": "retried",
        "status": 502,
        "error": "HTTP 502 Bad Gateway",
        "response_excerpt": "upstream is down",
        "carrier": "carrier:c-1",
    }

    for bad, field in [
        ({"status": 99}, "acks.status"),
        ({"response_excerpt": 7}, "acks.response_excerpt"),
    ]:
        status, body = await api.call("POST", "/v1/acks", {"carrier": "c-1", "acks": [ack | bad]})
        assert (status, body["error"]["field"]) == (400, field)


async def test_an_expired_lease_is_an_attempt_in_the_history(
    start_server: StartServer, database_url: str
) -> None:
    server, api = await start_server(dispatchers=0)
    sent = await api.send("lost", {"target": "http://127.0.0.1:9/"})
    await api.ok("POST", "/v1/leases", {"carrier": "gone", "wait_seconds": 0, "lease_seconds": 1})
    await asyncio.sleep(1.2)
    await server.maintenance.rescue()
    (attempt,) = (await api.message(sent["id"]))["attempts"]
    assert (attempt["outcome"], attempt["carrier"], attempt["status"]) == (
        "retried",
        "carrier:gone",
        None,
    )
    assert attempt["error"].startswith("lease expired")


async def _states(database_url: str, changes: dict[str, str]) -> None:
    """Put messages into states that take a while to reach for real."""
    conn = await asyncpg.connect(database_url)
    try:
        for msg_id, state in changes.items():
            finalized = "now()" if state in ("completed", "discarded", "cancelled") else "NULL"
            lease = "now() + interval '1 hour'" if state == "running" else "NULL"
            await conn.execute(
                f"UPDATE ap4k_messages SET state = $2::ap4k_state, finalized_at = {finalized}, "
                f"lease_expires_at = {lease} WHERE id = $1",
                int(msg_id),
                state,
            )
    finally:
        await conn.close()


async def test_browsing_pages_by_id_in_every_state(
    start_server: StartServer, database_url: str
) -> None:
    _, api = await start_server(dispatchers=0)
    ids = [
        m["id"]
        for m in await api.send_batch(
            "browse",
            [{"target": "http://127.0.0.1:9/", "dedup_key": f"order-{i}"} for i in range(12)],
        )
    ]
    states = ["available", "scheduled", "running", "retryable", "completed", "discarded"]
    await _states(database_url, {ids[i]: states[i % len(states)] for i in range(12)})
    await api.send("elsewhere", {"target": "http://127.0.0.1:9/"})  # not in this queue

    async def page(**query: Any) -> dict[str, Any]:
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        body: dict[str, Any] = await api.ok("GET", f"/v1/queues/browse/messages?{qs}")
        return body

    everything = await page(limit=1000)
    assert [m["id"] for m in everything["messages"]] == ids[::-1]  # newest first by default
    assert everything["next"] is None

    # Pages of 5, newest first, then oldest first: every message exactly once.
    seen: list[str] = []
    cursor = ""
    while True:
        got = await page(limit=5, after=cursor)
        seen += [m["id"] for m in got["messages"]]
        if got["next"] is None:
            break
        cursor = got["next"]
    assert seen == ids[::-1]
    first = await page(limit=5, order="oldest")
    assert [m["id"] for m in first["messages"]] == ids[:5]
    second = await page(limit=5, order="oldest", after=first["next"])
    assert [m["id"] for m in second["messages"]] == ids[5:10]

    for i, state in enumerate(states):
        got = await page(state=state)
        assert [m["id"] for m in got["messages"]] == [ids[i + 6], ids[i]], state
        assert {m["state"] for m in got["messages"]} == {state}
    assert (await page(state="cancelled"))["messages"] == []

    found = await page(dedup_key="order-7")
    assert [m["id"] for m in found["messages"]] == [ids[7]]
    assert (await page(dedup_key="order-7", state="completed"))["messages"] == []
    assert (await page(dedup_key="no-such-key"))["messages"] == []


async def test_browsing_refuses_bad_queries(api: Api) -> None:
    await api.settings("strict")
    for query, field in [
        ("state=lost", "state"),
        ("order=sideways", "order"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("after=-3", "after"),
        ("after=abc", "after"),
    ]:
        status, body = await api.call("GET", f"/v1/queues/strict/messages?{query}")
        assert (status, body["error"]["field"]) == (400, field), query
    status, body = await api.call("GET", "/v1/queues/no-such-queue/messages")
    assert (status, body["error"]["code"]) == (404, "not_found")


async def test_queue_view_reports_recent_rates(start_server: StartServer) -> None:
    _, api = await start_server(dispatchers=4)
    await api.settings("rated", max_attempts=1)
    async with sink(lambda r, n: 200 if r.body == b'{"ok":true}' else 500) as target:
        good = [
            await api.send("rated", {"target": target.url, "body": {"ok": True}}) for _ in range(6)
        ]
        bad = [
            await api.send("rated", {"target": target.url, "body": {"ok": False}}) for _ in range(3)
        ]
        for m in good:
            await api.wait_state(m["id"], "completed")
        for m in bad:
            await api.wait_state(m["id"], "discarded")
    rates = (await api.ok("GET", "/v1/queues/rated"))["rates"]
    assert rates == {
        "window_seconds": 60.0,
        "delivered_per_second": 6 / 60,
        "failed_per_second": 3 / 60,
    }
    (listed,) = [q for q in (await api.ok("GET", "/v1/queues"))["queues"] if q["name"] == "rated"]
    assert listed["rates"] == rates


async def test_a_carriers_failed_attempts_carry_status_and_excerpt(
    start_server: StartServer,
) -> None:
    server, api = await start_server(dispatchers=0)  # only the carrier delivers
    await api.settings("by-carrier", max_attempts=2, min_backoff_seconds=0.01)
    carrier = await CarrierProcess(f"http://127.0.0.1:{server.settings.port}").start()
    try:
        async with sink(lambda r, n: web.Response(status=502, text="bad gateway, sorry")) as t:
            sent = await api.send("by-carrier", {"target": t.url})
            message = await api.wait_state(sent["id"], "discarded")
    finally:
        carrier.kill()
    assert [(a["outcome"], a["status"], a["response_excerpt"]) for a in message["attempts"]] == [
        ("retried", 502, "bad gateway, sorry"),
        ("dead", 502, "bad gateway, sorry"),
    ]
    assert all(a["carrier"].startswith("carrier:") for a in message["attempts"])
