"""`POST /v1/queues/{queue}/messages` goes past aiohttp's router (api.direct_enqueue) unless
it carries `Expect: 100-continue` or its path is not a plain queue name: both ways must
answer alike, through the same middlewares (the JSON errors, the API token)."""

from __future__ import annotations

import gzip
from typing import Any

import aiohttp
import orjson

from ap4k_testkit import Api, StartServer, count_rows

TARGET = "http://127.0.0.1:9/hook"
TOKEN = "direct-token"

# How one request reaches the enqueue route: past the router, or through it (the
# expectation is answered by the router; a query string does not match the direct path).
WAYS: dict[str, dict[str, Any]] = {
    "direct": {},
    "routed, Expect: 100-continue": {"expect100": True},
    "routed, query string": {"params": {"via": "router"}},
}


async def post(api: Api, queue: str, body: bytes, **how: Any) -> tuple[int, str, Any]:
    async with api.session.post(
        f"{api.base_url}/v1/queues/{queue}/messages",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=aiohttp.ClientTimeout(total=30),
        **how,
    ) as response:
        return response.status, response.content_type, orjson.loads(await response.read())


def without_ids(answer: Any) -> Any:
    if isinstance(answer, dict) and "messages" in answer:
        return {"messages": [without_ids(m) for m in answer["messages"]]}
    if isinstance(answer, dict) and "id" in answer:
        return {k: v for k, v in answer.items() if k != "id"}
    return answer


CASES: list[tuple[str, bytes]] = [
    ("one message", orjson.dumps({"target": TARGET, "body": {"n": 1}})),
    ("a batch", orjson.dumps({"messages": [{"target": TARGET}, {"target": TARGET}]})),
    ("not JSON", b"{not json"),
    ("an empty body", b"  "),
    ("a bad field", orjson.dumps({"target": TARGET, "priority": "high"})),
    ("a batch with a bad field", orjson.dumps({"messages": [{"target": TARGET}, {"x": 1}]})),
    ("a target not allowed", orjson.dumps({"target": "http://169.254.169.254/"})),
    ("over the body limit", orjson.dumps({"target": TARGET, "body": "x" * 5000})),
]


async def test_the_direct_path_answers_as_the_router_does(
    start_server: StartServer, database_url: str
) -> None:
    _, api = await start_server(max_body_bytes=4096, dispatchers=0)
    await api.settings("direct", paused=True)
    stored = 0
    for case, body in CASES:
        answers = {way: await post(api, "direct", body, **how) for way, how in WAYS.items()}
        status, content_type, _ = answers["direct"]
        assert content_type == "application/json", (case, answers)
        assert status in (202, 400, 413), (case, answers)
        shapes = {(s, t, orjson.dumps(without_ids(a))) for s, t, a in answers.values()}
        assert len(shapes) == 1, (case, answers)
        if status == 202:
            stored += len(WAYS) * (2 if case == "a batch" else 1)
        else:
            assert set(answers["direct"][2]["error"]) == {"code", "message", "field"}, answers
    assert await count_rows(database_url, "SELECT count(*) FROM ap4k_messages") == stored


async def test_queue_names_the_direct_path_leaves_to_the_router(api: Api) -> None:
    """A name check_queue_name refuses (or one only a percent-escape can spell) never
    matches the direct path; the router's route refuses it as before."""
    body = orjson.dumps({"target": TARGET})
    for queue in ("-starts-with-a-dash", ".hidden", "a%20b", "q" * 129):
        status, _, answer = await post(api, queue, body)
        assert (status, answer["error"]["code"]) == (400, "invalid_queue_name"), (queue, answer)


async def test_the_direct_path_asks_for_the_token(start_server: StartServer) -> None:
    _, api = await start_server(api_token=TOKEN, dispatchers=0)
    body = orjson.dumps({"target": TARGET})
    stranger = Api(api.base_url)
    try:
        for way, how in WAYS.items():
            status, _, answer = await post(stranger, "locked", body, **how)
            assert (status, answer["error"]["code"]) == (401, "unauthorized"), (way, answer)
            status, _, answer = await post(api, "locked", body, **how)
            assert (status, answer["state"]) == (202, "available"), (way, answer)
    finally:
        await stranger.close()


async def test_a_compressed_body_is_read_whole_and_under_the_limit(
    start_server: StartServer,
) -> None:
    """A body already received whole is taken from aiohttp's buffer as it is (api._body):
    a gzip-encoded one arrives decompressed, and what it decompresses to is held to the
    body limit."""
    _, api = await start_server(max_body_bytes=4096, dispatchers=0)
    await api.settings("zipped", paused=True)
    for body, status in (({"n": 1, "text": "z" * 3000}, 202), ({"text": "z" * 5000}, 413)):
        raw = gzip.compress(orjson.dumps({"target": TARGET, "body": body}))
        assert len(raw) < 4096
        async with api.session.post(
            f"{api.base_url}/v1/queues/zipped/messages",
            data=raw,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        ) as response:
            answer = orjson.loads(await response.read())
        assert response.status == status, answer
        if status == 202:
            assert (await api.message(answer["id"]))["body"] == body
        else:
            assert answer["error"]["code"] == "body_too_large", answer
