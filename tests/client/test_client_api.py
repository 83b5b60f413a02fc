"""`AsyncClient` and `Client` against a real `ap4k serve`: every call of the API, typed
results, typed 4xx errors, bearer tokens and failover between server processes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from ap4k.client import (
    AsyncClient,
    BadRequest,
    Client,
    Conflict,
    NewMessage,
    NotFound,
    QueueSettings,
    RetryPolicy,
    Unauthorized,
)
from ap4k.core.embedded_pg import free_port
from ap4k_testkit import ServerProcess

from .conftest import ServerFactory, Target

FAST = RetryPolicy(attempts=4, min_backoff_seconds=0.01, max_backoff_seconds=0.1)


async def test_send_and_get_every_field(server: ServerProcess, target: Target) -> None:
    when = datetime.now(UTC) + timedelta(hours=1)
    async with AsyncClient(server.url) as client:
        sent = await client.send(
            "api", target.url + "/x", {"hello": "world"},
            method="PUT", headers={"X-One": "1"}, not_before=when, priority=7,
            dedup_key="api-1", ordering_key="ok-1", max_attempts=4, timeout_seconds=3,
        )
        again = await client.send("api", target.url + "/x", {"other": 1}, dedup_key="api-1")
        message = await client.get(sent.id)
    assert sent.state == "scheduled"
    assert not sent.duplicate
    assert again.duplicate
    assert again.id == sent.id
    assert message.id == sent.id
    assert message.queue == "api"
    assert message.state == "scheduled"
    assert message.target == target.url + "/x"
    assert message.method == "PUT"
    assert message.headers == {"X-One": "1"}
    assert message.body == {"hello": "world"}
    assert message.priority == 7
    assert message.dedup_key == "api-1"
    assert message.ordering_key == "ok-1"
    assert message.max_attempts == 4
    assert message.attempt == 0
    assert message.scheduled_at is not None
    assert abs((message.scheduled_at - when).total_seconds()) < 1
    assert message.created_at is not None


async def test_send_many_is_in_order_and_delivered(server: ServerProcess, target: Target) -> None:
    async with AsyncClient(server.url) as client:
        results = await client.send_many(
            "many",
            [NewMessage(target.url, {"n": i}) for i in range(1500)]  # two POSTs
            + [{"target": target.url, "body": {"n": 1500}}],
        )
        # Five 300 kB messages do not fit one request (the server takes 1 MiB): split.
        big = await client.send_many(
            "many", [NewMessage(target.url, {"n": 2000 + i, "pad": "x" * 300_000})
                     for i in range(5)]
        )
    assert len(results) == 1501
    assert len({r.id for r in results}) == 1501
    assert len({r.id for r in big}) == 5
    assert await target.wait_for(1506)
    assert set(target.counts()) == set(range(1501)) | set(range(2000, 2005))


async def test_cancel(server: ServerProcess, target: Target) -> None:
    async with AsyncClient(server.url) as client:
        sent = await client.send("cancel", target.url, delay_seconds=3600)
        cancelled = await client.cancel(sent.id)
        assert (cancelled.id, cancelled.state) == (sent.id, "cancelled")
        with pytest.raises(Conflict):
            await client.cancel(sent.id)
        assert (await client.get(sent.id)).state == "cancelled"


async def test_4xx_carry_the_servers_code_message_and_field(server: ServerProcess) -> None:
    async with AsyncClient(server.url, retry=FAST) as client:
        with pytest.raises(BadRequest) as caught:
            await client.send("bad", "http://t.local/", priority=10**9)
        assert caught.value.status == 400
        assert caught.value.code == "invalid_field"
        assert caught.value.field == "priority"
        assert "priority" in caught.value.message
        with pytest.raises(NotFound):
            await client.get("999999999")
        with pytest.raises(NotFound):
            await client.queue("no-such-queue")


async def test_queue_settings_and_stats(server: ServerProcess, target: Target) -> None:
    async with AsyncClient(server.url) as client:
        queue = await client.set_queue(
            "settings",
            QueueSettings(max_attempts=3, rate_limit_per_second=50.0, paused=True,
                          allowed_targets=[target.url], signing_secret="shh"),
        )
        assert queue.name == "settings"
        assert queue.settings.max_attempts == 3
        assert queue.settings.rate_limit_per_second == 50.0
        assert queue.settings.paused is True
        assert queue.settings.allowed_targets == [target.url]
        assert queue.settings.signing_secret_set
        await client.send_many("settings", [NewMessage(target.url)] * 3)
        queue = await client.queue("settings")
        assert queue.depth.available == 3
        assert queue.depth.pending == 3
        assert "settings" in {q.name for q in await client.queues()}
        queue = await client.set_queue("settings", paused=False)
        assert queue.settings.paused is False
        assert queue.settings.max_attempts == 3  # untouched


async def test_dead_letters_list_redrive_purge(server: ServerProcess, target: Target) -> None:
    target.status = 400  # permanent failure: straight to the dead letters
    async with AsyncClient(server.url) as client:
        await client.set_queue("dlq", max_attempts=1)
        sent = await client.send_many("dlq", [NewMessage(target.url, {"n": i}) for i in range(5)])
        for _ in range(200):
            if (await client.queue("dlq")).depth.discarded == 5:
                break
            await asyncio.sleep(0.05)
        page = await client.dead_letters("dlq", limit=2)
        assert len(page.messages) == 2
        assert page.next is not None
        everything = [m async for m in client.iter_dead_letters("dlq", page_size=2)]
        assert sorted(m.id for m in everything) == sorted(r.id for r in sent)
        assert all(m.state == "discarded" and m.last_error for m in everything)

        target.status = 200
        assert await client.redrive("dlq", ids=[sent[0].id]) == 1
        assert await target.wait_for(6)
        assert await client.purge_dead("dlq") == 4
        assert (await client.dead_letters("dlq")).messages == []


async def test_bearer_token(make_server: ServerFactory) -> None:
    server = await make_server(token="t0ken")
    async with AsyncClient(server.url) as anonymous:
        with pytest.raises(Unauthorized):
            await anonymous.queues()
    async with AsyncClient(server.url, token="t0ken") as client:
        await client.queues()


async def test_failover_between_server_processes(
    make_server: ServerFactory, target: Target
) -> None:
    first = await make_server()
    second = await make_server(database_url=first.database_url)  # two replicas, one DB
    down = f"http://127.0.0.1:{free_port()}"
    async with AsyncClient([down, first.url, second.url], retry=FAST) as client:
        await client.send("failover", target.url, {"n": 0})
        assert client.current_url == first.url
        # Off the loop: the target (on this loop) must answer the delivery in flight, or
        # the drain cuts it off and the message is delivered a second time.
        await asyncio.to_thread(first.stop)
        await client.send("failover", target.url, {"n": 1})
        assert client.current_url == second.url
    assert await target.wait_for(2)
    assert target.counts() == {0: 1, 1: 1}


def test_sync_client(server: ServerProcess) -> None:
    with Client(f"http://127.0.0.1:{free_port()},{server.url}", retry=FAST) as client:
        sent = client.send("sync", "http://t.local/", {"n": 1}, delay_seconds=600)
        assert client.get(sent.id).body == {"n": 1}
        assert client.cancel(sent.id).state == "cancelled"
        assert client.queue("sync").name == "sync"
        assert client.ready()
        with pytest.raises(NotFound):
            client.get("123456789")
