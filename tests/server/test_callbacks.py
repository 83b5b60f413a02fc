"""Callbacks: a delivered message POSTs its `callback` once, a dead-lettered one its
`failure_callback` once, with the last status and response excerpt; callbacks are ordinary
messages (signed, visible) that trigger no callbacks of their own."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json

import msgspec
import pytest
from aiohttp import web

from ap4k.core import wire
from ap4k_testkit import Api, Received, sink


def signature_ok(secret: str, r: Received) -> bool:
    timestamp = r.headers["Ap4k-Timestamp"]
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + r.body, hashlib.sha256)
    return r.headers["Ap4k-Signature"] == f"t={timestamp},v1={mac.hexdigest()}"


async def test_a_delivered_message_calls_its_callback_once(api: Api) -> None:
    async with sink() as target, sink() as hooks:
        await api.settings("cb", signing_secret="s3cret")
        sent = await api.send(
            "cb",
            {
                "target": target.url + "/work",
                "callback": hooks.url + "/done",
                "failure_callback": hooks.url + "/failed",
            },
        )
        await hooks.wait_for(lambda: len(hooks.received) >= 1)
        await asyncio.sleep(0.5)  # a second callback would have come by now
        assert len(target.received) == 1 and len(hooks.received) == 1
        call = hooks.received[0]
        assert call.headers[":path"] == "/done"
        assert call.headers["Ap4k-Callback-For"] == sent["id"]
        assert call.queue == "cb"
        assert signature_ok("s3cret", call)
        body = msgspec.json.decode(call.body, type=wire.CallbackBody)
        assert body == wire.CallbackBody(
            message_id=sent["id"],
            queue="cb",
            state="completed",
            attempts=1,
            status=200,
            response_excerpt=None,
            target=target.url + "/work",
        )
        callback = await api.wait_state(call.message_id, "completed")
        assert callback["target"] == hooks.url + "/done"
        assert callback["callback"] is None and callback["failure_callback"] is None
        original = await api.message(sent["id"])
        assert original["callback"] == hooks.url + "/done"


async def test_a_dead_letter_calls_its_failure_callback_with_the_last_answer(api: Api) -> None:
    async def failing(_: Received, nth: int) -> web.Response:
        return web.Response(status=500, text=f"boom {nth}")

    async with sink(failing) as target, sink() as hooks:
        await api.settings("fcb", min_backoff_seconds=0.01, max_backoff_seconds=0.05)
        sent = await api.send(
            "fcb",
            {
                "target": target.url,
                "max_attempts": 3,
                "callback": hooks.url + "/done",
                "failure_callback": hooks.url + "/failed",
            },
        )
        await api.wait_state(sent["id"], "discarded")
        await hooks.wait_for(lambda: len(hooks.received) >= 1)
        await asyncio.sleep(0.5)
        assert len(target.received) == 3
        assert [r.headers[":path"] for r in hooks.received] == ["/failed"]
        body = json.loads(hooks.received[0].body)
        assert body == {
            "message_id": sent["id"],
            "queue": "fcb",
            "state": "discarded",
            "attempts": 3,
            "status": 500,
            "response_excerpt": "boom 3",
            "target": target.url,
        }


async def test_a_failing_callback_is_retried_and_calls_back_nothing(api: Api) -> None:
    async def flaky(_: Received, nth: int) -> int:
        return 503 if nth < 3 else 200

    async with sink() as target, sink(flaky) as hooks:
        await api.settings("retry-cb", min_backoff_seconds=0.01, max_backoff_seconds=0.05)
        sent = await api.send("retry-cb", {"target": target.url, "callback": hooks.url})
        await hooks.wait_for(lambda: len(hooks.received) == 3)
        await asyncio.sleep(0.5)
        assert len(hooks.received) == 3
        assert {r.headers["Ap4k-Callback-For"] for r in hooks.received} == {sent["id"]}
        assert len(hooks.delivered_ids()) == 1  # one callback message, attempted three times
        assert len(target.received) == 1


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"callback": "http://169.254.169.254/latest"}, "callback"),
        ({"failure_callback": "http://[fe80::1]/x"}, "failure_callback"),
        ({"callback": "relative/path"}, "callback"),
        ({"callback": ""}, "callback"),
        ({"callback": 5}, "callback"),
    ],
)
async def test_bad_callbacks_are_refused_with_their_field(
    api: Api, message: dict[str, object], field: str
) -> None:
    status, error = await api.call(
        "POST", "/v1/queues/q/messages", {"target": "https://example.com/"} | message
    )
    assert status == 400, error
    assert error["error"]["field"] == field
    status, error = await api.call(
        "POST",
        "/v1/queues/q/messages",
        {
            "messages": [
                {"target": "https://example.com/"},
                {"target": "https://x.example/"} | message,
            ]
        },
    )
    assert status == 400, error
    assert error["error"]["field"] == f"messages[1].{field}"
    assert (await api.call("GET", "/v1/queues/q"))[0] == 404
