"""The client's HTTP policies — retries, backoff, Retry-After, failover, typed 4xx — against
real aiohttp servers on 127.0.0.1 that answer what each test needs. (The API itself, against
a real `ap4k serve`, is in test_client_api.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from ap4k.client import (
    AsyncClient,
    BadRequest,
    Client,
    Conflict,
    NotFound,
    OutcomeUnknown,
    PayloadTooLarge,
    RetryPolicy,
    ServerUnavailable,
    Unauthorized,
)
from ap4k.core.embedded_pg import free_port
from ap4k_testkit import start_app

FAST = RetryPolicy(attempts=6, min_backoff_seconds=0.01, max_backoff_seconds=0.05)

Answer = Callable[[web.Request], web.Response]


@dataclass
class Scripted:
    """A server that answers each request with the next scripted response."""

    url: str = ""
    answers: list[Answer] = field(default_factory=list)
    seen: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)


def accepted(_request: web.Request) -> web.Response:
    return web.json_response({"id": "42", "state": "available", "duplicate": False}, status=202)


def status(code: int, headers: dict[str, str] | None = None, error: dict | None = None) -> Answer:
    def answer(_request: web.Request) -> web.Response:
        if error is not None:
            return web.json_response({"error": error}, status=code, headers=headers)
        return web.Response(status=code, text="nope", headers=headers)

    return answer


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Scripted]]:
    runners: list[web.AppRunner] = []
    made: list[Scripted] = []

    async def make(*answers: Answer) -> Scripted:
        server = Scripted(answers=list(answers))

        async def handle(request: web.Request) -> web.Response:
            server.seen.append(
                (request.method, request.path_qs, dict(request.headers), await request.read())
            )
            answer = server.answers.pop(0) if server.answers else accepted
            return answer(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner, port = await start_app(app)
        runners.append(runner)
        server.url = f"http://127.0.0.1:{port}"
        made.append(server)
        return server

    yield make  # type: ignore[misc]
    for runner in runners:
        await runner.cleanup()


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


async def test_retries_5xx_then_succeeds(scripted: Callable[..., Scripted]) -> None:
    server = await scripted(status(503), status(500), status(502))
    async with AsyncClient(server.url, retry=FAST, token="s3cret") as client:
        result = await client.send("mail", "http://x.local/", {"a": 1}, dedup_key="d-1")
    assert result.id == "42"
    assert len(server.seen) == 4
    method, path, headers, body = server.seen[-1]
    assert (method, path) == ("POST", "/v1/queues/mail/messages")
    assert headers["Authorization"] == "Bearer s3cret"
    assert body == b'{"target":"http://x.local/","body":{"a":1},"dedup_key":"d-1"}'


async def test_honours_retry_after_on_429(scripted: Callable[..., Scripted]) -> None:
    server = await scripted(status(429, {"Retry-After": "0.3"}))
    started = time.monotonic()
    async with AsyncClient(server.url, retry=FAST) as client:
        await client.send("q", "/t")
    assert time.monotonic() - started >= 0.3
    assert len(server.seen) == 2


async def test_gives_up_with_server_unavailable(scripted: Callable[..., Scripted]) -> None:
    server = await scripted(*[status(503)] * 10)
    three = RetryPolicy(attempts=3, min_backoff_seconds=0.01)
    async with AsyncClient(server.url, retry=three) as client:
        with pytest.raises(ServerUnavailable) as caught:
            await client.queues()
    assert caught.value.attempts == 3
    assert "503" in str(caught.value.last_error)
    assert len(server.seen) == 3


@pytest.mark.parametrize(
    ("code", "error", "exc_type"),
    [
        (400, {"code": "invalid_field", "message": "target is required", "field": "target"},
         BadRequest),
        (401, {"code": "unauthorized", "message": "bearer token required", "field": None},
         Unauthorized),
        (404, {"code": "not_found", "message": "message not found", "field": None}, NotFound),
        (409, {"code": "already_finished", "message": "message is completed", "field": None},
         Conflict),
        (413, None, PayloadTooLarge),
    ],
)
async def test_4xx_raise_typed_errors_at_once(
    scripted: Callable[..., Scripted], code: int, error: dict | None, exc_type: type
) -> None:
    server = await scripted(status(code, error=error))
    async with AsyncClient(server.url, retry=FAST) as client:
        with pytest.raises(exc_type) as caught:
            await client.get("7")
    assert len(server.seen) == 1  # never retried
    assert caught.value.status == code
    if error is not None:
        assert caught.value.code == error["code"]
        assert caught.value.message == error["message"]
        assert caught.value.field == error["field"]
    else:
        assert caught.value.code == "http_413"


async def test_fails_over_to_the_next_url_and_sticks_to_it(
    scripted: Callable[..., Scripted],
) -> None:
    down = dead_url()
    failing = await scripted(*[status(503)] * 10)
    healthy = await scripted()
    async with AsyncClient([down, failing.url, healthy.url], retry=FAST) as client:
        await client.send("q", "/t")
        assert client.current_url == healthy.url
        await client.send("q", "/t")
    assert len(failing.seen) == 1  # tried once, then the client stayed on the healthy one
    assert len(healthy.seen) == 2


async def test_concurrent_calls_fail_over_independently(
    scripted: Callable[..., Scripted],
) -> None:
    """Many calls in flight when a URL dies: each walks on to the next URL by itself, and
    none is sent back to the dead one by another call's failure (two attempts suffice)."""
    healthy = await scripted()
    urls = [dead_url(), healthy.url, dead_url()]
    two = RetryPolicy(attempts=2, min_backoff_seconds=0.01)
    async with AsyncClient(urls, retry=two, connect_timeout=1) as client:
        for _ in range(3):
            results = await asyncio.gather(*(client.send("q", "/t") for _ in range(30)))
            assert len(results) == 30
            assert client.current_url == healthy.url


async def test_all_urls_down(scripted: Callable[..., Scripted]) -> None:
    client = AsyncClient(f"{dead_url()},{dead_url()}", retry=FAST, connect_timeout=1)
    with pytest.raises(ServerUnavailable):
        await client.send("q", "/t")
    assert not await client.ready()
    await client.close()


async def test_quotes_names_in_paths(scripted: Callable[..., Scripted]) -> None:
    server = await scripted(
        lambda _r: web.json_response({"messages": [], "next": None}),
    )
    async with AsyncClient(server.url) as client:
        page = await client.dead_letters("a/b c", limit=5, after="x")
    assert page.messages == []
    assert page.next is None
    assert server.seen[0][1] == "/v1/queues/a%2Fb%20c/dead?limit=5&after=x"


async def test_sync_client_from_a_thread(scripted: Callable[..., Scripted]) -> None:
    server = await scripted(status(503))
    down = dead_url()

    def use_sync_client() -> tuple[str, str]:
        with Client([down, server.url], retry=FAST) as client:
            result = client.send("q", "/t", {"n": 1})
            return result.id, client.current_url

    message_id, current = await asyncio.to_thread(use_sync_client)
    assert message_id == "42"
    assert current == server.url
    assert len(server.seen) == 2


def hang_up(request: web.Request) -> web.Response:
    """Read the request, then drop the connection without answering: maybe committed."""
    assert request.transport is not None
    request.transport.close()
    return web.Response(status=202)


async def test_a_send_without_dedup_key_cut_off_after_sending_is_not_resent(
    scripted: Callable[..., Scripted],
) -> None:
    server = await scripted(hang_up)
    async with AsyncClient(server.url, retry=FAST) as client:
        with pytest.raises(OutcomeUnknown):
            await client.send("q", "/t", {"n": 1})
    assert len(server.seen) == 1  # never sent twice: it may have been enqueued


async def test_a_send_with_dedup_key_cut_off_after_sending_is_resent(
    scripted: Callable[..., Scripted],
) -> None:
    server = await scripted(hang_up, hang_up)
    async with AsyncClient(server.url, retry=FAST) as client:
        result = await client.send("q", "/t", {"n": 1}, dedup_key="once")
    assert result.id == "42"
    assert len(server.seen) == 3  # the server recognises the resends by their key


async def test_idempotent_calls_are_resent_after_a_cut_off(
    scripted: Callable[..., Scripted],
) -> None:
    server = await scripted(hang_up, lambda _r: web.json_response({"queues": []}))
    async with AsyncClient(server.url, retry=FAST) as client:
        assert await client.queues() == []
    assert len(server.seen) == 2


async def test_retries_until_the_deadline_and_per_call_policy(
    scripted: Callable[..., Scripted],
) -> None:
    server = await scripted(*[status(503)] * 1000)
    policy = RetryPolicy(deadline_seconds=0.5, min_backoff_seconds=0.01, max_backoff_seconds=0.02)
    async with AsyncClient(server.url, retry=FAST) as client:
        started = time.monotonic()
        with pytest.raises(ServerUnavailable):
            await client.send("q", "/t", retry=policy)  # overrides the client's 6 attempts
        elapsed = time.monotonic() - started
    assert elapsed >= 0.5
    assert len(server.seen) > 6
