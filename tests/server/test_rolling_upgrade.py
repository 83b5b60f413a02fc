"""Replicas of two releases side by side on one database, as during a rolling upgrade."""

from __future__ import annotations

import asyncpg

from ap4k.server import queries
from ap4k_testkit import StartServer

# As replicas before 0004 call it, and as those before 0006 do.
OLD_LEASES = (
    "SELECT * FROM ap4k_lease($1, $2, $3, $4, $5, $6)",
    "SELECT * FROM ap4k_lease_v1($1, $2, $3, $4, $5, $6)",
)


async def test_the_older_leases_still_serve_older_replicas(
    start_server: StartServer, database_url: str
) -> None:
    _, api = await start_server(dispatchers=0)
    await api.send_batch(
        "mixed", [{"target": "http://127.0.0.1:9/", "body": {"n": i}} for i in range(6)]
    )
    assert "ap4k_lease_v2(" in queries.LEASE
    conn = await asyncpg.connect(database_url)
    try:
        olds = [
            await conn.fetch(sql, "mixed", 2, f"old-replica-{i}", 30.0, 0, True)
            for i, sql in enumerate(OLD_LEASES)
        ]
        new = await conn.fetch(queries.LEASE, "mixed", 2, "new-replica", 30.0, 0, True)
        # The old columns from the old names (the new one adds `probe`), and no message
        # leased twice.
        for old in olds:
            assert [[*r.keys(), "probe"] for r in old] == [list(r.keys()) for r in new]
        assert len({r["id"] for r in [*olds[0], *olds[1], *new]}) == 6
        holders = await conn.fetch("SELECT DISTINCT leased_by FROM ap4k_messages")
        assert {r["leased_by"] for r in holders} == {
            "old-replica-0",
            "old-replica-1",
            "new-replica",
        }
    finally:
        await conn.close()
