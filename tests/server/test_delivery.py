"""Every accepted message is delivered; failures retry or land in the dead letters."""

from __future__ import annotations

import asyncio
import random

import msgspec
from aiohttp import web

from ap4k.core.limits import MAX_HEADER_FIELD_BYTES
from ap4k.server.validation import MAX_BODY_DEPTH
from ap4k_testkit import Api, Received, count_rows, sink


async def test_ten_thousand_messages_across_queues_all_arrive(api: Api, database_url: str) -> None:
    async with sink() as target:
        queues = [f"bulk-{i}" for i in range(5)]
        sent: set[str] = set()
        for round_ in range(4):
            batches = [
                api.send_batch(
                    q,
                    [
                        {"target": target.url + "/in", "body": {"n": round_, "i": i}}
                        for i in range(500)
                    ],
                )
                for q in queues
            ]
            for results in await asyncio.gather(*batches):
                sent.update(r["id"] for r in results)
        assert len(sent) == 10_000
        await target.wait_for(lambda: set(target.delivered_ids()) >= sent, timeout=120)
        delivered = target.delivered_ids()
        assert set(delivered) == sent
        # Each message reached the target in its own queue, with its own body.
        assert {r.queue for r in target.received} == set(queues)
    # Every one of them is recorded as completed.
    await asyncio.sleep(0.5)
    completed = await count_rows(
        database_url, "SELECT count(*) FROM ap4k_messages WHERE state = 'completed'"
    )
    assert completed == 10_000


async def test_flaky_target_still_gets_every_message(api: Api) -> None:
    rng = random.Random(7)
    answered: list[tuple[str, int]] = []

    def flaky(received: Received, _: int) -> int:
        status = 503 if rng.random() < 0.3 else 200
        answered.append((received.message_id, status))
        return status

    async with sink(flaky) as target:
        await api.settings(
            "flaky", min_backoff_seconds=0.01, max_backoff_seconds=0.05, max_attempts=50
        )
        ids = {
            r["id"]
            for r in await api.send_batch(
                "flaky", [{"target": target.url, "body": i} for i in range(1000)]
            )
        }
        await target.wait_for(
            lambda: {m for m, status in answered if status == 200} >= ids, timeout=60
        )
        assert sum(1 for _, status in answered if status == 503) > 100  # really flaky
        # Retried deliveries carry increasing attempt numbers.
        assert max(r.attempt for r in target.received) >= 2
    for msg_id in list(ids)[:20]:
        message = await api.wait_state(msg_id, "completed")
        assert message["state"] == "completed"


async def test_permanent_failures_and_exhausted_attempts_become_dead_letters(api: Api) -> None:
    def behaviour(received: Received, _: int) -> int:
        return 404 if received.headers[":path"] == "/gone" else 500

    async with sink(behaviour) as target:
        await api.settings("dlq", min_backoff_seconds=0.01, max_backoff_seconds=0.02)
        gone = await api.send("dlq", {"target": target.url + "/gone"})
        broken = await api.send("dlq", {"target": target.url + "/broken", "max_attempts": 3})
        dead_gone = await api.wait_state(gone["id"], "discarded")
        dead_broken = await api.wait_state(broken["id"], "discarded")
        assert dead_gone["attempt"] == 1 and "404" in dead_gone["last_error"]
        assert dead_broken["attempt"] == 3 and "500" in dead_broken["last_error"]

        page = await api.ok("GET", "/v1/queues/dlq/dead")
        assert {m["id"] for m in page["messages"]} == {gone["id"], broken["id"]}
        queue = await api.ok("GET", "/v1/queues/dlq")
        assert queue["depth"]["discarded"] == 2

        # Redrive: the target is fixed; both go through with a fresh set of attempts.
        target.behaviour = None
        redriven = await api.ok("POST", "/v1/queues/dlq/dead/redrive")
        assert redriven == {"redriven": 2}
        for msg_id in (gone["id"], broken["id"]):
            done = await api.wait_state(msg_id, "completed")
            assert done["attempt"] == 1

        # Purge removes dead letters, and only them.
        target.behaviour = lambda r, n: 400
        again = await api.send("dlq", {"target": target.url + "/bad"})
        await api.wait_state(again["id"], "discarded")
        assert await api.ok("DELETE", "/v1/queues/dlq/dead") == {"purged": 1}
        status, _ = await api.call("GET", f"/v1/messages/{again['id']}")
        assert status == 404
        assert (await api.ok("GET", f"/v1/messages/{gone['id']}"))["state"] == "completed"


async def test_dead_letter_paging(api: Api) -> None:
    async with sink(lambda r, n: 410) as target:
        ids = [
            r["id"]
            for r in await api.send_batch("paging", [{"target": target.url} for _ in range(7)])
        ]
        for msg_id in ids:
            await api.wait_state(msg_id, "discarded")
        first = await api.ok("GET", "/v1/queues/paging/dead?limit=5")
        assert [m["id"] for m in first["messages"]] == ids[:5]
        second = await api.ok("GET", f"/v1/queues/paging/dead?limit=5&after={first['next']}")
        assert [m["id"] for m in second["messages"]] == ids[5:]
        assert second["next"] is None
        # Redrive a chosen few.
        assert await api.ok("POST", "/v1/queues/paging/dead/redrive", {"ids": ids[:2]}) == {
            "redriven": 2
        }


async def test_retry_after_is_honoured(api: Api) -> None:
    def later(_: Received, nth: int) -> web.Response:
        if nth == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(status=200)

    async with sink(later) as target:
        await api.settings("polite", min_backoff_seconds=0.01, max_backoff_seconds=0.01)
        sent = await api.send("polite", {"target": target.url})
        await api.wait_state(sent["id"], "completed", timeout=10)
        first, second = target.received[0], target.received[1]
        assert second.at - first.at >= 0.9
        assert (first.attempt, second.attempt) == (1, 2)


async def test_timeouts_are_retried(api: Api) -> None:
    async def slow(_: Received, nth: int) -> int:
        if nth == 1:
            await asyncio.sleep(1.0)
        return 200

    async with sink(slow) as target:
        await api.settings("slow", min_backoff_seconds=0.01, max_backoff_seconds=0.01)
        sent = await api.send("slow", {"target": target.url, "timeout_seconds": 0.2})
        done = await api.wait_state(sent["id"], "completed", timeout=10)
        assert done["attempt"] == 2


async def test_a_header_of_the_largest_size_allowed_is_delivered(api: Api) -> None:
    """The header limit is the one targets apply: the largest field it lets through is
    stored, delivered and accepted by an aiohttp target."""
    name = "X-Large"
    value = "v" * (MAX_HEADER_FIELD_BYTES - len(name))
    async with sink() as target:
        sent = await api.send("large-header", {"target": target.url, "headers": {name: value}})
        await api.wait_state(sent["id"], "completed")
        assert target.received[-1].headers[name] == value


async def test_bodies_and_headers_arrive_as_stored(api: Api) -> None:
    """Whatever JSON a body holds (null, a bare string with escapes and a NUL, nesting) is
    delivered as msgspec wrote it at enqueue, byte for byte; no body is no body."""
    bodies: list[object] = [
        None,
        "x\u00e9 \u2028 \"quoted\" back\\slash \x00 end",
        {"z": 1, "a": [1, 2.5, {"deep": None}], "nul": "\x00", "": True},
        [],
        0,
    ]
    async with sink() as target:
        messages: list[dict[str, object]] = [
            {"target": target.url + f"/{i}", "body": b, "headers": {"X-Order": str(i)}}
            for i, b in enumerate(bodies)
        ]
        messages.append({"target": target.url + f"/{len(bodies)}"})  # no body at all
        sent = await api.send_batch("bodies", messages)
        single = await api.send("bodies", {"target": target.url + "/single", "body": "one"})
        for item in [*sent, single]:
            await api.wait_state(item["id"], "completed")
        got = {r.headers[":path"]: r for r in target.received}
        for i, b in enumerate(bodies):
            assert got[f"/{i}"].body == msgspec.json.encode(b)
            assert got[f"/{i}"].headers["X-Order"] == str(i)
        assert got[f"/{len(bodies)}"].body == b""
        assert got["/single"].body == b'"one"'


async def test_the_deepest_body_allowed_is_stored_and_delivered_whole(api: Api) -> None:
    """MAX_BODY_DEPTH levels (deeper than orjson writes back): it arrives byte for byte."""
    depth = MAX_BODY_DEPTH
    body = "[" * depth + "1" + "]" * depth
    async with sink() as target:
        status, sent = await api.call(
            "POST",
            "/v1/queues/deep/messages",
            data=f'{{"target": "{target.url}", "body": {body}}}'.encode(),
            headers={"Content-Type": "application/json"},
        )
        assert status == 202, sent
        await api.wait_state(sent["id"], "completed")
        assert target.received[-1].body == body.encode()
