"""Fixtures shared by every test folder: one real PostgreSQL cluster per test session."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ap4k.core.embedded_pg import EmbeddedPostgres
from ap4k_testkit import Api, create_database


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
