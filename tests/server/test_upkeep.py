"""Retention, queue-depth gauges and readiness."""

from __future__ import annotations

import asyncio

from ap4k.server.maintenance import Maintenance
from ap4k.server.store import RESCUE_BATCH, Store
from ap4k.server.wakeups import Wakeups
from ap4k_testkit import StartServer, count_rows, sink


async def test_finished_messages_are_pruned_after_retention(
    start_server: StartServer, database_url: str
) -> None:
    _, api = await start_server(retention_seconds=0.5, prune_interval_seconds=0.2)
    async with sink(lambda r, n: 200 if r.headers[":path"] == "/ok" else 400) as target:
        done = await api.send("kept", {"target": target.url + "/ok"})
        dead = await api.send("kept", {"target": target.url + "/bad"})
        cancelled = await api.send("kept", {"target": target.url + "/ok", "delay_seconds": 60})
        await api.ok("DELETE", f"/v1/messages/{cancelled['id']}")
        await api.wait_state(done["id"], "completed")
        await api.wait_state(dead["id"], "discarded")
        for _ in range(50):
            if await count_rows(database_url, "SELECT count(*) FROM ap4k_messages") == 1:
                break
            await asyncio.sleep(0.1)
        # Completed and cancelled rows are gone; dead letters stay until purged.
        status, _ = await api.call("GET", f"/v1/messages/{done['id']}")
        assert status == 404
        status, _ = await api.call("GET", f"/v1/messages/{cancelled['id']}")
        assert status == 404
        assert (await api.message(dead["id"]))["state"] == "discarded"


async def test_depth_gauges_follow_the_queue(start_server: StartServer) -> None:
    _, api = await start_server(gauges_interval_seconds=0.2)
    await api.settings("gauged", paused=True)
    await api.send_batch("gauged", [{"target": "http://127.0.0.1:9/"}] * 3)
    await api.send("gauged", {"target": "http://127.0.0.1:9/", "delay_seconds": 60})

    async def metrics_text() -> str:
        status, text = await api.call("GET", "/metrics")
        assert status == 200
        return str(text)

    for _ in range(50):
        text = await metrics_text()
        # Both: a gauge pass may fall between the two sends.
        if (
            'ap4k_queue_depth{queue="gauged",state="available"} 3.0' in text
            and 'ap4k_queue_depth{queue="gauged",state="scheduled"} 1.0' in text
        ):
            break
        await asyncio.sleep(0.1)
    assert 'ap4k_queue_depth{queue="gauged",state="available"} 3.0' in text
    assert 'ap4k_queue_depth{queue="gauged",state="scheduled"} 1.0' in text
    assert 'ap4k_queue_oldest_available_age_seconds{queue="gauged"}' in text
    queue = await api.ok("GET", "/v1/queues/gauged")
    assert queue["depth"]["available"] == 3
    assert queue["oldest_available_age_seconds"] >= 0


async def test_health_and_readiness(start_server: StartServer) -> None:
    server, api = await start_server()
    assert await api.ok("GET", "/healthz") == {"status": "ok"}
    assert await api.ok("GET", "/readyz") == {"status": "ready"}
    server.services.ready = False  # as during a drain
    status, body = await api.call("GET", "/readyz")
    assert (status, body) == (503, {"status": "draining"})
    server.services.ready = True


async def test_one_rescue_returns_every_expired_lease(
    start_server: StartServer, database_url: str
) -> None:
    """A carrier that died holding more leases than one statement takes: the rescuer goes on
    until a batch comes back short, instead of 1,000 every rescue interval."""
    server, api = await start_server(dispatchers=0)
    total = 2 * RESCUE_BATCH + 500
    for _ in range(total // 500):
        await api.send_batch("orphaned", [{"target": "http://127.0.0.1:9/"}] * 500)
    leased = 0
    while leased < total:
        body = await api.ok(
            "POST",
            "/v1/leases",
            {"carrier": "dead", "queues": ["orphaned"], "max_messages": 1000, "wait_seconds": 0},
        )
        leased += len(body["messages"])
    await server.stop()  # nothing else rescues them meanwhile
    await count_rows(
        database_url, "WITH x AS (UPDATE ap4k_messages SET lease_expires_at = now() - "
        "interval '1 second' WHERE state = 'running' RETURNING 1) SELECT count(*) FROM x"
    )  # fmt: skip

    store = await Store.connect(database_url, min_size=1, max_size=2)
    try:
        rescued = await Maintenance(store, Wakeups(), retention_seconds=60).rescue()
    finally:
        await store.close()
    assert rescued == total
    running = "SELECT count(*) FROM ap4k_messages WHERE state = 'running'"
    assert await count_rows(database_url, running) == 0
    retryable = "SELECT count(*) FROM ap4k_messages WHERE state = 'retryable'"
    assert await count_rows(database_url, retryable) == total
