"""How PostgreSQL plans the delivery statements, read from its own EXPLAIN.

A prepared statement's generic plan guesses 10 rows for each unnest() of an array
parameter and takes the table's row counts from its last ANALYZE. After an ANALYZE that saw
no running rows, with thousands of rows leased and an outcome batch of thousands, that plan
joined the batch once per running row: a single COMPLETE took 1-40 s under `ap4k bench`
(docs/performance.md). The dispatch pool plans each execution for its own arrays."""

from __future__ import annotations

import json

from ap4k.server import queries
from ap4k.server.store import Store

RUNNING = 3000
BATCH = 2000


async def test_outcome_statements_are_planned_for_their_batch_after_stale_statistics(
    database_url: str,
) -> None:
    store = await Store.connect(database_url, min_size=1, max_size=1)
    try:
        await store.migrate()
        await store.ensure_queues(["plans"])
        async with store.dispatch_pool.acquire() as conn:
            # Statistics from an empty table, then thousands of rows leased.
            await conn.execute("ANALYZE ap4k_messages")
            await conn.execute(
                "INSERT INTO ap4k_messages (id, queue, target, state, attempt, leased_by, "
                "lease_expires_at, lease_order) SELECT nextval('ap4k_messages_id_seq'), "
                "'plans', 'http://127.0.0.1:9/', 'running', 1, 'me', "
                "now() + interval '1 hour', ap4k_lease_order(0) FROM generate_series(1, $1)",
                RUNNING,
            )
            ids = [r[0] for r in await conn.fetch("SELECT id FROM ap4k_messages LIMIT $1", BATCH)]
            # The statement as a cached, named prepared statement, like asyncpg's; EXPLAIN
            # EXECUTE shows the plan the cache hands out (a custom or a generic one).
            assert await conn.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
            await conn.execute(
                "PREPARE complete_batch(bigint[], int[], text, smallint[], real[]) AS "
                + queries.COMPLETE
            )
            columns = (ids, [1] * BATCH, None, [200] * BATCH, [1.0] * BATCH)
            values = ", ".join(
                "'me'" if column is None else "'{" + ",".join(map(str, column)) + "}'"
                for column in columns
            )
            explain = f"EXPLAIN (FORMAT JSON) EXECUTE complete_batch({values})"
            async with conn.transaction():
                # Past the five executions after which `auto` may switch to a generic plan.
                for _ in range(8):
                    custom = await conn.fetchval(explain)
                await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                generic = await conn.fetchval(explain)
            completed = await conn.execute(f"EXECUTE complete_batch({values})")
    finally:
        await store.close()
    # Planned for the array it was given; the generic plan's guess is what misled it.
    assert _unnest_rows(json.loads(custom)[0]) == BATCH
    assert _unnest_rows(json.loads(generic)[0]) == 10
    assert completed == f"SELECT {BATCH}"


def _unnest_rows(plan: dict) -> int:  # type: ignore[type-arg]
    """The row estimate of the plan's unnest() (its Function Scan)."""
    nodes = [plan["Plan"]]
    while nodes:
        node = nodes.pop()
        if node.get("Node Type") == "Function Scan":
            return int(node["Plan Rows"])
        nodes.extend(node.get("Plans", []))
    raise AssertionError(f"no Function Scan in {plan}")
