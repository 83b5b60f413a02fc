"""Create and upgrade the outbox tables in the application's database. Idempotent.

Each migration runs in its own transaction under an advisory lock, so that several forwarder
replicas starting at once, or `ap4k outbox init` run twice, apply each version exactly once.
"""

from __future__ import annotations

import logging
from typing import Any

from ap4k.outbox import sql

logger = logging.getLogger("ap4k.outbox")


async def migrate(conn: Any) -> list[int]:
    """Apply the missing migrations with an asyncpg connection; returns the versions applied."""
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute(sql.MIGRATION_LOCK)
        await conn.execute(sql.CREATE_MIGRATIONS_TABLE)
        done = {row["version"] for row in await conn.fetch(sql.APPLIED_VERSIONS)}
        for version, name, statement in sql.MIGRATIONS:
            if version in done:
                continue
            await conn.execute(statement)
            await conn.execute(sql.RECORD_MIGRATION, version, name)
            applied.append(version)
            logger.info("outbox migration %04d applied: %s", version, name)
    return applied


def migrate_sync(conn: Any) -> list[int]:
    """The same with a psycopg 3 connection (committed here)."""
    applied: list[int] = []
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(sql.MIGRATION_LOCK)
        cur.execute(sql.CREATE_MIGRATIONS_TABLE)
        cur.execute(sql.APPLIED_VERSIONS)
        done = {row[0] for row in cur.fetchall()}
        for version, name, statement in sql.MIGRATIONS:
            if version in done:
                continue
            cur.execute(statement)
            cur.execute(sql.psycopg_sql(sql.RECORD_MIGRATION), (version, name))
            applied.append(version)
            logger.info("outbox migration %04d applied: %s", version, name)
    return applied


async def init(database_url: str) -> list[int]:
    """Connect to `database_url` and migrate: what `ap4k outbox init` does."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        return await migrate(conn)
    finally:
        await conn.close()
