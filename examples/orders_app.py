"""A small shop that records an order and enqueues its follow-up work in ONE transaction.

This is AP4R's `async_to` in Python. The request handler writes the order and an outbox row
with the same connection, in the same transaction: either both exist or neither does. The
in-process forwarder relays the outbox to ap4k, which later calls this very application
back at `/jobs/fulfil` (and, a little later still, a mailer) — with retries, until it
answers 2xx. If ap4k is down when the order is placed, nothing is lost: the row waits in
the shop's own database.

Run it (one PostgreSQL for the shop, ap4k running on :7438):

    ap4k serve &
    SHOP_DATABASE_URL=postgresql://localhost/shop AP4K_SERVER_URL=http://127.0.0.1:7438 \\
        python examples/orders_app.py --port 8080
    curl -X POST localhost:8080/orders -d '{"item": "tea", "quantity": 2}'
    curl localhost:8080/orders/1          # "placed", then "fulfilled" a moment later
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import asyncpg
from aiohttp import web

from ap4k import outbox
from ap4k.outbox import Forwarder

POOL = web.AppKey("pool", asyncpg.Pool)
SETTINGS = web.AppKey("settings", dict)

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    item text NOT NULL,
    quantity integer NOT NULL CHECK (quantity > 0),
    status text NOT NULL DEFAULT 'placed',
    fulfilled_by text,                     -- the ap4k message that did it (idempotence)
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS stock (item text PRIMARY KEY, available integer NOT NULL);
INSERT INTO stock VALUES ('tea', 100), ('coffee', 100) ON CONFLICT DO NOTHING;
"""


class OutOfStock(Exception):
    pass


async def place_order(request: web.Request) -> web.Response:
    data = await request.json()
    item, quantity = data.get("item"), data.get("quantity", 1)
    if not isinstance(item, str) or not isinstance(quantity, int) or quantity < 1:
        return web.json_response({"error": "item (string) and quantity (>= 1) needed"}, status=400)
    settings = request.app[SETTINGS]
    async with request.app[POOL].acquire() as conn:
        try:
            async with conn.transaction():
                order_id = await conn.fetchval(
                    "INSERT INTO orders (item, quantity) VALUES ($1, $2) RETURNING id",
                    item, quantity,
                )
                # The follow-up work, in the same transaction as the order.
                await outbox.enqueue(
                    conn, "orders", f"{settings['public_url']}/jobs/fulfil",
                    {"order_id": order_id},
                    ordering_key=f"order-{order_id}",
                    max_attempts=10,
                )
                await outbox.enqueue(
                    conn, "mail", f"{settings['mailer_url']}/send",
                    {"template": "order-confirmation", "order_id": order_id},
                    delay_seconds=settings["mail_delay_seconds"],
                )
                # A late failure still takes everything back with it, messages included.
                left = await conn.fetchval(
                    "UPDATE stock SET available = available - $2 WHERE item = $1 "
                    "RETURNING available", item, quantity,
                )
                if left is None or left < 0:
                    raise OutOfStock(item)
        except OutOfStock:
            return web.json_response({"error": f"{item} is out of stock"}, status=409)
    return web.json_response({"id": order_id, "status": "placed"}, status=201)


async def get_order(request: web.Request) -> web.Response:
    row = await request.app[POOL].fetchrow(
        "SELECT id, item, quantity, status FROM orders WHERE id = $1",
        int(request.match_info["order_id"]),
    )
    if row is None:
        return web.json_response({"error": "no such order"}, status=404)
    return web.json_response(dict(row))


async def fulfil(request: web.Request) -> web.Response:
    """Called by ap4k, later. At-least-once delivery: make it idempotent."""
    data = await request.json()
    message_id = request.headers.get("Ap4k-Message-Id", "")
    await request.app[POOL].execute(
        "UPDATE orders SET status = 'fulfilled', fulfilled_by = $2 "
        "WHERE id = $1 AND status = 'placed'",
        data["order_id"], message_id,
    )
    return web.json_response({"ok": True})


async def start_database(app: web.Application) -> Any:
    settings = app[SETTINGS]
    app[POOL] = pool = await asyncpg.create_pool(settings["database_url"], min_size=1)
    async with pool.acquire() as conn:
        await conn.execute(SCHEMA)
        await outbox.migrate(conn)  # or once, at deploy time: `ap4k outbox init`
    yield
    await pool.close()


async def start_forwarder(app: web.Application) -> Any:
    """In-process forwarder; with several app replicas each runs one, safely (SKIP LOCKED).
    Run `ap4k forward` as a separate process instead if you prefer."""
    settings = app[SETTINGS]
    forwarder = Forwarder(settings["database_url"], settings["server_url"],
                          token=settings.get("api_token"))
    await forwarder.start()
    yield
    await forwarder.stop()


def make_app(
    database_url: str,
    server_url: str | None,
    *,
    public_url: str,
    mailer_url: str | None = None,
    api_token: str | None = None,
    mail_delay_seconds: float = 60.0,
) -> web.Application:
    app = web.Application()
    app[SETTINGS] = {
        "database_url": database_url,
        "server_url": server_url,
        "public_url": public_url.rstrip("/"),
        "mailer_url": (mailer_url or public_url).rstrip("/"),
        "api_token": api_token,
        "mail_delay_seconds": mail_delay_seconds,
    }
    app.cleanup_ctx.append(start_database)
    if server_url:
        app.cleanup_ctx.append(start_forwarder)
    app.router.add_post("/orders", place_order)
    app.router.add_get("/orders/{order_id:\\d+}", get_order)
    app.router.add_post("/jobs/fulfil", fulfil)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--database-url", default=os.environ.get("SHOP_DATABASE_URL"))
    parser.add_argument("--server", default=os.environ.get("AP4K_SERVER_URL",
                                                           "http://127.0.0.1:7438"))
    parser.add_argument("--public-url", default=None,
                        help="how ap4k reaches this app (default http://127.0.0.1:PORT)")
    parser.add_argument("--mailer-url", default=None)
    args = parser.parse_args()
    if not args.database_url:
        parser.error("--database-url or SHOP_DATABASE_URL is required")
    logging.basicConfig(level=logging.INFO)
    app = make_app(
        args.database_url,
        args.server,
        public_url=args.public_url or f"http://127.0.0.1:{args.port}",
        mailer_url=args.mailer_url,
        api_token=os.environ.get("AP4K_API_TOKEN"),
    )
    web.run_app(app, port=args.port)


if __name__ == "__main__":
    main()
