"""The deliveries' HTTP client (`ap4k.core.curl`, libcurl) against a real target on 127.0.0.1
that answers with a body far larger than anything ap4k keeps: only the first bytes are held,
the rest is read and dropped, and the connection serves the next request."""

from __future__ import annotations

from aiohttp import web

from ap4k.core.curl import CurlClient
from ap4k.core.delivery import EXCERPT_BYTES, Deliverer, Delivery, Verdict
from ap4k_testkit import serving

HUGE_BYTES = 32 * 1024 * 1024
CHUNK = b"x" * 65_536


async def huge_answer(request: web.Request) -> web.StreamResponse:
    await request.read()
    status = int(request.query.get("status", "200"))
    response = web.StreamResponse(status=status)
    response.content_length = HUGE_BYTES
    await response.prepare(request)
    for _ in range(HUGE_BYTES // len(CHUNK)):
        await response.write(CHUNK)
    await response.write_eof()
    return response


def app() -> web.Application:
    application = web.Application()
    application.router.add_route("*", "/huge", huge_answer)
    application.router.add_get("/small", lambda _r: web.Response(text="ok"))
    return application


async def test_a_huge_answer_keeps_only_its_first_bytes() -> None:
    async with serving(app()) as base:
        client = CurlClient(keep_body_bytes=1000)
        try:
            answer = await client.request("POST", base + "/huge", [], b"{}", 30.0)
            assert answer.status == 200
            assert answer.body == b"x" * 1000
            # The huge answer was read to its end, so the connection is reusable.
            small = await client.request("GET", base + "/small", [], None, 5.0)
            assert (small.status, small.body) == (200, b"ok")
        finally:
            await client.close()


async def test_a_failed_delivery_with_a_huge_body_records_an_excerpt() -> None:
    async with serving(app()) as base:
        deliverer = Deliverer()
        try:
            outcome = await deliverer.deliver(
                Delivery(
                    id=1, queue="q", attempt=1, max_attempts=3,
                    target=base + "/huge?status=503", method="POST", headers=None,
                    body=b"{}", timeout_seconds=30, created_at=0,
                )
            )
        finally:
            await deliverer.close()
    assert outcome.verdict is Verdict.RETRY and outcome.status == 503
    assert outcome.response_excerpt == "x" * EXCERPT_BYTES
