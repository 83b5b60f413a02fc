"""libcurl on the event loop (`ap4k.core.curl.LoopMulti`), against real HTTP servers on
127.0.0.1: transfers over reused keep-alive connections, timeouts that libcurl asks for
after a longer one was armed, connections the peer closes while they idle in libcurl's pool,
cancelled and refused transfers, and closing with transfers under way. Each runs with
libcurl's sockets in their own epoll set (Linux) and with a reader per socket on the loop
(the other platforms' path)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import pycurl
import pytest
from aiohttp import web

from ap4k.core.curl import CurlError, LoopMulti
from ap4k_testkit import serving, start_app

pytestmark = pytest.mark.parametrize("use_epoll", [True, False], ids=["epoll", "loop-readers"])


class Peers:
    """The server's view: which client connections (peer ports) the requests came over."""

    def __init__(self) -> None:
        self.ports: set[int] = set()
        self.requests = 0
        self.release = asyncio.Event()  # ends the requests to /hang


@contextlib.asynccontextmanager
async def served(peers: Peers) -> AsyncIterator[str]:
    async with serving(app(peers)) as base:
        try:
            yield base
        finally:
            peers.release.set()  # or the server's shutdown waits a minute for them


def app(peers: Peers) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        peers.requests += 1
        peername = request.transport.get_extra_info("peername") if request.transport else None
        if peername:
            peers.ports.add(peername[1])
        return web.Response(body=await request.read())

    async def hang(_request: web.Request) -> web.Response:
        await peers.release.wait()
        return web.Response()

    async def close_after(request: web.Request) -> web.Response:
        peers.requests += 1
        response = web.Response(text="bye")
        response.force_close()
        return response

    application = web.Application()
    application.router.add_post("/echo", echo)
    application.router.add_get("/hang", hang)
    application.router.add_get("/close", close_after)
    return application


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def get(multi: LoopMulti, url: str, timeout_ms: int = 10_000, body: bytes = b"") -> int:
    """One transfer: the answer's status, or CurlError."""
    handle = pycurl.Curl()
    handle.setopt(pycurl.URL, url)
    handle.setopt(pycurl.TIMEOUT_MS, timeout_ms)
    handle.setopt(pycurl.WRITEFUNCTION, lambda _chunk: None)
    if body:
        handle.setopt(pycurl.POSTFIELDS, body)
    try:
        code, message = await multi.perform(handle)
        if code:
            raise CurlError(code, message)
        return int(handle.getinfo(pycurl.RESPONSE_CODE))
    finally:
        handle.close()


async def test_concurrent_transfers_reuse_their_connections(use_epoll: bool) -> None:
    peers = Peers()
    before = open_fds()
    async with served(peers) as base:
        multi = LoopMulti(use_epoll)
        multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, 8)

        async def worker(n: int) -> list[int]:
            return [await get(multi, base + "/echo", body=b"%d" % n) for _ in range(25)]

        statuses = await asyncio.gather(*(worker(n) for n in range(16)))
        await multi.close()
    assert [s for each in statuses for s in each] == [200] * 400
    assert peers.requests == 400
    # At most the 8 connections allowed, each used for many requests.
    assert 1 <= len(peers.ports) <= 8
    # Closed: no socket, epoll set or reader left behind.
    assert open_fds() <= before


async def test_a_short_timeout_after_a_long_one_fires_on_time(use_epoll: bool) -> None:
    """libcurl asks for a 0.3 s timeout while a 60 s one is armed: the sooner one wins. And
    once the long transfer has ended, a later short one still gets its timer."""
    async with served(Peers()) as base:
        multi = LoopMulti(use_epoll)
        try:
            long_one = asyncio.ensure_future(get(multi, base + "/hang", timeout_ms=60_000))
            await asyncio.sleep(0.1)
            async with asyncio.timeout(20):  # the long timeout would be 60 s
                with pytest.raises(CurlError) as short:
                    await get(multi, base + "/hang", timeout_ms=300)
            assert short.value.timed_out
            long_one.cancel()
            with pytest.raises(asyncio.CancelledError):
                await long_one
            assert await get(multi, base + "/echo", body=b"x") == 200
            async with asyncio.timeout(20):
                with pytest.raises(CurlError) as later:
                    await get(multi, base + "/hang", timeout_ms=300)
            assert later.value.timed_out
        finally:
            await multi.close()


async def test_a_timer_that_fires_early_asks_libcurl_for_the_next(use_epoll: bool) -> None:
    """A hanging transfer with a 1.5 s timeout, then one answered at once with 0.4 s: the
    timer armed for 0.4 s fires after the quick one ended and finds nothing due; the hanging
    one still times out."""
    async with served(Peers()) as base:
        multi = LoopMulti(use_epoll)
        try:
            hanging = asyncio.ensure_future(get(multi, base + "/hang", timeout_ms=1500))
            await asyncio.sleep(0.1)
            assert await get(multi, base + "/echo", timeout_ms=400, body=b"x") == 200
            async with asyncio.timeout(20):
                with pytest.raises(CurlError) as timed_out:
                    await hanging
            assert timed_out.value.timed_out
        finally:
            await multi.close()


async def test_connections_the_peer_closed_are_replaced(use_epoll: bool) -> None:
    peers = Peers()
    async with served(peers) as base:
        multi = LoopMulti(use_epoll)
        try:
            for _ in range(20):  # each answer closes its connection: libcurl opens a new one
                assert await get(multi, base + "/close") == 200
            assert peers.requests == 20
            assert await get(multi, base + "/echo", body=b"x") == 200
        finally:
            await multi.close()
    # The server went away with a connection idle in libcurl's pool: a new server on another
    # port, and the old connection's end, change nothing for the next transfer.
    async with served(peers) as base:
        multi = LoopMulti(use_epoll)
        try:
            assert await get(multi, base + "/echo", body=b"y") == 200
        finally:
            await multi.close()


async def test_an_idle_connection_closed_by_the_server_is_not_reused(use_epoll: bool) -> None:
    peers = Peers()
    runner, port = await start_app(app(peers))
    base = f"http://127.0.0.1:{port}"
    multi = LoopMulti(use_epoll)
    try:
        assert await get(multi, base + "/echo", body=b"1") == 200
        # The server closes its side of the idle connection: the socket in libcurl's pool
        # turns readable (end of stream) while libcurl waits on nothing.
        assert runner.server is not None
        for handler in runner.server.connections:
            handler.force_close()
        await asyncio.sleep(0.2)
        assert await get(multi, base + "/echo", body=b"2") == 200
        assert len(peers.ports) == 2
    finally:
        await multi.close()
        await runner.cleanup()


async def test_refused_and_cancelled_transfers_end(use_epoll: bool) -> None:
    async with served(Peers()) as base:
        multi = LoopMulti(use_epoll)
        try:
            with pytest.raises(CurlError) as refused:
                await get(multi, "http://127.0.0.1:9/nobody")
            assert refused.value.code == pycurl.E_COULDNT_CONNECT
            hanging = [asyncio.ensure_future(get(multi, base + "/hang")) for _ in range(5)]
            await asyncio.sleep(0.2)
            for task in hanging:
                task.cancel()
            results = await asyncio.gather(*hanging, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results)
            assert await get(multi, base + "/echo", body=b"x") == 200
        finally:
            await multi.close()


async def test_closing_ends_the_transfers_under_way(use_epoll: bool) -> None:
    async with served(Peers()) as base:
        multi = LoopMulti(use_epoll)
        hanging = [asyncio.ensure_future(get(multi, base + "/hang")) for _ in range(3)]
        await asyncio.sleep(0.2)
        await multi.close()
        results = await asyncio.gather(*hanging, return_exceptions=True)
        assert all(isinstance(r, CurlError) and r.code == pycurl.E_FAILED_INIT for r in results)
        with pytest.raises(CurlError):
            await get(multi, base + "/echo")
