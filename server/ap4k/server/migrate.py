"""Numbered, pure-SQL schema migrations (`migrations/NNNN_name.sql`) and a version table.

Every server applies pending migrations at start (unless told not to) and `ap4k migrate`
applies them on demand; an advisory lock makes concurrent starts of several replicas safe.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger("ap4k.migrate")

# Any constant will do, as long as it is ours: "ap4k" in ASCII.
MIGRATION_LOCK_ID = 0x6170346B


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    folder = resources.files("ap4k.server") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply the pending migrations in order; return the versions applied."""
    applied: list[int] = []
    # The lock comes first: two first starts at once would both create the version table
    # (CREATE TABLE IF NOT EXISTS is not safe against a concurrent CREATE).
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS ap4k_schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {
            r["version"] for r in await conn.fetch("SELECT version FROM ap4k_schema_migrations")
        }
        for migration in available_migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO ap4k_schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            log.info("applied migration %04d_%s", migration.version, migration.name)
            applied.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied
