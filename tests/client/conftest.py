"""Fixtures of the client tests: real `ap4k serve` processes, real aiohttp targets on
127.0.0.1 that count what they receive, and fresh databases (the applications' and ap4k's)
in the session's PostgreSQL (the `postgres` fixture of tests/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from ap4k.core.embedded_pg import EmbeddedPostgres, free_port
from ap4k_testkit import serving

_names = itertools.count()

SERVER_AVAILABLE = importlib.util.find_spec("ap4k.server.cli") is not None
needs_server = pytest.mark.skipif(not SERVER_AVAILABLE, reason="`ap4k serve` is not built yet")


async def create_database(pg: EmbeddedPostgres, prefix: str) -> str:
    name = f"{prefix}_{os.getpid()}_{next(_names)}"
    conn = await asyncpg.connect(pg.url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return pg.database_url(name)


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


@dataclass
class ServerProcess:
    """`ap4k serve` in a subprocess, on a fixed port so that it can be restarted."""

    database_url: str
    port: int
    log: Path
    env: dict[str, str]
    # Enough concurrent deliveries that the thousands of messages of the volume tests
    # arrive in seconds.
    dispatchers: int = 32
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 60.0) -> None:
        self.process = spawn(
            [
                "serve",
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--database-url", self.database_url,
                "--dispatchers", str(self.dispatchers),
            ],
            self.log,
            self.env,
        )
        await wait_ready(self.url, timeout, self.process, self.log)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`ap4k ARGS…` as a subprocess, its output appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ap4k.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def tail(log: Path | None) -> str:
    return log.read_text()[-3000:] if log is not None and log.exists() else ""


async def wait_ready(
    url: str, timeout: float, process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{url} exited with {process.returncode}:\n{tail(log)}")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with session.get(url + "/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


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
        env = {k: v for k, v in os.environ.items() if not k.startswith("AP4K_")}
        if token:
            env["AP4K_API_TOKEN"] = token
        server = ServerProcess(
            database_url=database_url or await create_database(postgres, "ap4k"),
            port=free_port(),
            log=tmp_path / f"server-{len(servers)}.log",
            env=env,
            dispatchers=dispatchers,
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
    logs = Path(tempfile.mkdtemp(prefix="ap4k-client-server-"))
    shared = ServerProcess(
        database_url=await create_database(postgres, "ap4k_shared"),
        port=free_port(),
        log=logs / "server.log",
        env={k: v for k, v in os.environ.items() if not k.startswith("AP4K_")},
    )
    await shared.start()
    try:
        yield shared
    finally:
        shared.stop()
        shutil.rmtree(logs, ignore_errors=True)
