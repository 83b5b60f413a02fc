"""Replicas of two releases side by side on one database, as during a rolling upgrade."""

from __future__ import annotations

import asyncpg

from ap4k.server import queries
from ap4k_testkit import StartServer

OLD_LEASE = "SELECT * FROM ap4k_lease($1, $2, $3, $4, $5, $6)"  # as replicas before 0002 call it


async def test_the_unversioned_lease_still_serves_older_replicas(
    start_server: StartServer, database_url: str
) -> None:
    _, api = await start_server(dispatchers=0)
    await api.send_batch(
        "mixed", [{"target": "http://127.0.0.1:9/", "body": {"n": i}} for i in range(4)]
    )
    assert "ap4k_lease_v1(" in queries.LEASE
    conn = await asyncpg.connect(database_url)
    try:
        old = await conn.fetch(OLD_LEASE, "mixed", 2, "old-replica", 30.0, 0, True)
        new = await conn.fetch(queries.LEASE, "mixed", 2, "new-replica", 30.0, 0, True)
        # The same columns from both, and no message leased twice.
        assert [list(r.keys()) for r in old] == [list(r.keys()) for r in new]
        assert len({r["id"] for r in [*old, *new]}) == 4
        holders = await conn.fetch("SELECT DISTINCT leased_by FROM ap4k_messages")
        assert {r["leased_by"] for r in holders} == {"old-replica", "new-replica"}
    finally:
        await conn.close()
