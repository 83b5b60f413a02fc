"""The HTTP layer below the handlers: what aiohttp's parser refuses answers the API's JSON
error without an ERROR traceback, slow request heads are cut off, and the number of
connections held stays under the process's descriptor limit, so /healthz keeps answering.

Real sockets throughout: malformed requests are written byte for byte with asyncio streams,
and the descriptor-limit test runs `ap4k serve` as a child process with RLIMIT_NOFILE lowered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource

import aiohttp
import pytest

from ap4k_testkit import Api, ServerProcess, StartServer

HEAD = b"POST /v1/queues/q/messages HTTP/1.1\r\nHost: x\r\n"


async def exchange(port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    """Write `raw` on a fresh connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        writer.write(raw)
        # The server answers as soon as it has seen enough and closes with the rest of a
        # huge request unread, which resets the connection: keep what arrived before that.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await writer.drain()
            async with asyncio.timeout(timeout):
                while chunk := await reader.read(65536):
                    received += chunk
        return received
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


MALFORMED = {
    "request-line-over-8190": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "header-line-over-8190": b"GET /healthz HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
    "header-value-of-1-mb": b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n",
    "header-name-over-8190": b"GET /healthz HTTP/1.1\r\n" + b"X" * 9000 + b": v\r\n\r\n",
    "10000-headers": b"GET /healthz HTTP/1.1\r\n"
    + b"".join(b"X-%d: v\r\n" % i for i in range(10_000))
    + b"\r\n",
    "bad-header-token": b"GET /healthz HTTP/1.1\r\nBad Header: v\r\n\r\n",
    "control-in-header-name": b"GET /healthz HTTP/1.1\r\nX-\x01: v\r\n\r\n",
    "bare-cr-in-header": b"GET /healthz HTTP/1.1\r\nX-A: b\rc\r\n\r\n",
    "bare-cr-line-end": b"GET /healthz HTTP/1.1\rHost: x\r\r",
    "nul-in-header-value": b"GET /healthz HTTP/1.1\r\nX-A: b\x00c\r\n\r\n",
    "duplicate-content-length": HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "content-length-and-chunked": HEAD
    + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "negative-content-length": HEAD + b"Content-Length: -1\r\n\r\n",
    "bad-chunk-size": HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "bad-http-version": b"GET /healthz HTTP/9.z\r\nHost: x\r\n\r\n",
    "bad-method-token": b"G(T /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "not-http-at-all": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n",
    "space-before-colon": b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n",
    "obsolete-line-folding": b"GET /healthz HTTP/1.1\r\nX-A: b\r\n c\r\n\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
async def test_parser_refusals_answer_the_json_error_without_a_traceback(
    start_server: StartServer, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    server, api = await start_server()
    caplog.set_level(logging.DEBUG)
    status, headers, body = parse_response(await exchange(server.settings.port, raw))
    assert 400 <= status < 500, (status, body)
    assert headers["content-type"].startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message", "field"} and error["message"], error
    assert error["code"] != "internal_error", error
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in loud if r.levelno >= logging.ERROR or r.exc_info], [
        (r.name, r.getMessage()) for r in loud
    ]
    assert len(loud) <= 1, [(r.name, r.getMessage()) for r in loud]
    # The server is none the worse for it.
    assert (await api.call("GET", "/healthz"))[0] == 200


async def test_a_request_head_trickled_past_the_deadline_is_cut_off(
    start_server: StartServer,
) -> None:
    server, api = await start_server(header_timeout_seconds=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.settings.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        closed = False
        # One byte a quarter second, for up to 30 s: a server without a deadline holds it all.
        for _ in range(120):
            await asyncio.sleep(0.25)
            if reader.at_eof():
                closed = True
                break
            try:
                writer.write(b"X-Slow: a\r\n"[:1])
                await writer.drain()
            except OSError:
                closed = True
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.01):
                    if await reader.read(1) == b"" or reader.at_eof():
                        closed = True
                        break
        assert closed, "a connection trickling its request head was held for 30 s"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    assert (await api.call("GET", "/healthz"))[0] == 200


async def test_an_idle_connection_is_closed_after_the_deadline(start_server: StartServer) -> None:
    server, _ = await start_server(header_timeout_seconds=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.settings.port)
    try:
        async with asyncio.timeout(30):
            assert await reader.read(-1) == b""
    finally:
        writer.close()


async def test_a_body_trickled_past_the_deadline_gets_408(start_server: StartServer) -> None:
    server, api = await start_server(body_timeout_seconds=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.settings.port)
    try:
        writer.write(HEAD + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        async with asyncio.timeout(30):
            status, _, body = parse_response(await reader.read(-1))
        assert status == 408, body
        assert json.loads(body)["error"]["code"] == "request_timeout"
    finally:
        writer.close()
    assert await count_messages(api) == 0


async def count_messages(api: Api) -> int:
    status, body = await api.call("GET", "/v1/queues/q")
    return 0 if status == 404 else sum(body["depth"].values())


async def test_1100_slow_connections_under_1024_descriptors_leave_healthz_up(
    database_url: str,
) -> None:
    """More slow-loris connections than the process has descriptors: the oldest that have not
    sent a whole request are closed to make room, and the health check keeps answering."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1400:
        pytest.skip(f"this test needs 1,400 descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1400), hard))
    server = ServerProcess(database_url, "--dispatchers", "4", nofile=1024)
    await server.start()
    slow: list[asyncio.StreamWriter] = []
    health: list[int] = []
    try:
        for _ in range(1100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            except OSError:
                continue
            writer.write(b"GET /healthz HTTP/1.1\r\nX-Slow: ")  # and never the rest
            slow.append(writer)
            if len(slow) % 100 == 0:
                await writer.drain()
        for _ in range(10):
            # A fresh connection each time, as a kubelet's probe makes.
            try:
                async with aiohttp.ClientSession() as session, session.get(
                    server.url + "/healthz", timeout=aiohttp.ClientTimeout(total=5)
                ) as response:
                    health.append(response.status)
            except (aiohttp.ClientError, OSError, TimeoutError):
                health.append(0)
        assert health == [200] * 10, health
        assert "Too many open files" not in server.log(), server.log()[-2000:]
    finally:
        for writer in slow:
            writer.close()
        server.kill()
