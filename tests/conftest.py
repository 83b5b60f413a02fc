"""Fixtures shared by every test folder: one real PostgreSQL cluster per test session."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from ap4k.core.embedded_pg import EmbeddedPostgres, free_port
from ap4k.server.app import Server, ServerSettings
from ap4k_testkit import Api, StartServer, create_database


@pytest.fixture(scope="session")
def postgres() -> Iterator[EmbeddedPostgres]:
    """A real PostgreSQL for the whole session. Durability is traded for speed here
    (fsync off): the tests restart PostgreSQL, they do not crash the machine."""
    data_dir = Path(tempfile.mkdtemp(prefix="ap4k-test-pg-"))
    pg = EmbeddedPostgres(
        data_dir / "data",
        settings={"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"},
    )
    pg.init()
    pg.start()
    try:
        yield pg
    finally:
        pg.remove()


@pytest.fixture
async def database_url(postgres: EmbeddedPostgres) -> str:
    """A fresh, empty database for one test."""
    return await create_database(postgres.url)


@pytest.fixture
async def api_factory() -> AsyncIterator[list[Api]]:
    clients: list[Api] = []
    yield clients
    for client in clients:
        await client.close()




@pytest.fixture
async def start_server(database_url: str) -> AsyncIterator[StartServer]:
    """Start in-process servers on the test's database; all are stopped at teardown."""
    running: list[tuple[Server, Api]] = []

    async def start(**overrides: Any) -> tuple[Server, Api]:
        settings = ServerSettings(
            host="127.0.0.1",
            port=free_port(),
            database_url=database_url,
            dispatchers=16,
            drain_grace_seconds=2.0,
            pool_size=6,
        )
        token = overrides.pop("api_token", None)
        for key, value in overrides.items():
            setattr(settings, key, value)
        settings.api_token = token
        server = Server(settings)
        await server.start()
        api = Api(f"http://127.0.0.1:{settings.port}", token=token)
        running.append((server, api))
        return server, api

    yield start
    for server, api in reversed(running):
        await api.close()
        await server.stop()


@pytest.fixture
async def api(start_server: StartServer) -> Api:
    _, client = await start_server()
    return client
