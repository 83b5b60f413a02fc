"""Store-and-forward: messages written in the application's own database transaction.

    from ap4k import outbox

    async with conn.transaction():                      # asyncpg
        order_id = await conn.fetchval("INSERT INTO orders … RETURNING id")
        await outbox.enqueue(conn, "orders", "http://billing/charge", {"order": order_id},
                             ordering_key=f"order-{order_id}")

    with psycopg.connect(url) as conn:                  # psycopg 3, synchronous
        outbox.enqueue_sync(conn, "mail", "http://mailer/send", {"to": "a@example.com"})

The message exists if and only if the transaction commits. `ap4k forward` (or an
in-process `Forwarder`) relays committed rows to the server; `ap4k outbox init` (or
`migrate`/`migrate_sync`) creates the table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ap4k.outbox.enqueue import enqueue, enqueue_many, enqueue_many_sync, enqueue_sync
from ap4k.outbox.schema import init, migrate, migrate_sync

if TYPE_CHECKING:
    from ap4k.outbox.forwarder import BatchResult, Forwarder, OutboxStats

__all__ = [
    "BatchResult",
    "Forwarder",
    "OutboxStats",
    "enqueue",
    "enqueue_many",
    "enqueue_many_sync",
    "enqueue_sync",
    "init",
    "migrate",
    "migrate_sync",
]


def __getattr__(name: str) -> Any:
    # The forwarder pulls in asyncpg, aiohttp and prometheus-client: only when asked for.
    if name in {"Forwarder", "BatchResult", "OutboxStats"}:
        from ap4k.outbox import forwarder

        return getattr(forwarder, name)
    raise AttributeError(f"module 'ap4k.outbox' has no attribute {name!r}")
