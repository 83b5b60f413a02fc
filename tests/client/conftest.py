"""Fixtures of the client tests: real `ap4k serve` processes, real aiohttp targets on
127.0.0.1 that count what they receive, and fresh databases (the applications' and ap4k's)
in the session's PostgreSQL (the `postgres` fixture of tests/conftest.py)."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web

import ap4k_testkit as testkit
from ap4k.core.embedded_pg import EmbeddedPostgres
from ap4k_testkit import ServerProcess, serving

SERVER_AVAILABLE = importlib.util.find_spec("ap4k.server.cli") is not None
needs_server = pytest.mark.skipif(not SERVER_AVAILABLE, reason="`ap4k serve` is not built yet")


async def create_database(pg: EmbeddedPostgres, prefix: str) -> str:
    return await testkit.create_database(pg.url, prefix)


@pytest.fixture
async def app_db(postgres: EmbeddedPostgres) -> str:
    """A fresh application database with the outbox table."""
    from ap4k import outbox

    url = await create_database(postgres, "app")
    await outbox.init(url)
    return url


@pytest.fixture
async def app_conn(app_db: str) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(app_db)
    try:
        yield conn
    finally:
        await conn.close()


# -- targets ---------------------------------------------------------------------------


@dataclass
class Target:
    """A real HTTP target that records every delivery it receives."""

    url: str = ""
    bodies: list[Any] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    status: int = 200

    def counts(self, key: str = "n") -> Counter[Any]:
        return Counter(b.get(key) if isinstance(b, dict) else b for b in self.bodies)

    async def wait_for(self, count: int, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.bodies) >= count:
                return True
            await asyncio.sleep(0.05)
        return False


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    recorder = Target()

    async def receive(request: web.Request) -> web.Response:
        raw = await request.read()
        recorder.bodies.append(orjson.loads(raw) if raw else None)
        recorder.headers.append(dict(request.headers))
        return web.Response(status=recorder.status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receive)
    async with serving(app) as recorder.url:
        yield recorder


# -- ap4k serve --------------------------------------------------------------------------

ServerFactory = Callable[..., Awaitable[ServerProcess]]


@pytest.fixture
async def make_server(
    postgres: EmbeddedPostgres, tmp_path: Path
) -> AsyncIterator[ServerFactory]:
    """Build (and by default start) `ap4k serve` processes; all are stopped at the end."""
    if not SERVER_AVAILABLE:
        pytest.skip("`ap4k serve` is not built yet")
    servers: list[ServerProcess] = []

    async def make(
        *, start: bool = True, token: str | None = None, database_url: str | None = None,
        dispatchers: int = 32,
    ) -> ServerProcess:
        server = ServerProcess(
            database_url or await create_database(postgres, "ap4k"),
            # Enough concurrent deliveries that the thousands of messages of the volume
            # tests arrive in seconds.
            "--dispatchers", str(dispatchers),
            log=tmp_path / f"server-{len(servers)}.log",
            env={"AP4K_API_TOKEN": token} if token else {},
        )
        servers.append(server)
        if start:
            await server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
async def server(postgres: EmbeddedPostgres) -> AsyncIterator[ServerProcess]:
    """One `ap4k serve` shared by the tests that need nothing special of it (each uses
    its own queue names and targets); `make_server` builds dedicated ones."""
    if not SERVER_AVAILABLE:
        pytest.skip("`ap4k serve` is not built yet")
    shared = ServerProcess(await create_database(postgres, "ap4k_shared"), "--dispatchers", "32")
    await shared.start()
    try:
        yield shared
    finally:
        shared.stop()
