"""The worked example (examples/orders_app.py), end to end: order placed → outbox →
forwarder → ap4k → the shop's own /jobs/fulfil and the mailer; a failed order sends nothing."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp

from ap4k.core.embedded_pg import free_port
from ap4k_testkit import ServerProcess, serving

from .conftest import Target

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "orders_app.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("orders_app", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_orders_app(
    server: ServerProcess, app_db: str, app_conn: Any, target: Target
) -> None:
    shop = load_example()
    port = free_port()
    app = shop.make_app(
        app_db,
        server.url,
        public_url=f"http://127.0.0.1:{port}",
        mailer_url=target.url,
        mail_delay_seconds=0.2,
    )
    async with serving(app, port) as base:
        async with aiohttp.ClientSession() as http:
            async with http.post(base + "/orders", json={"item": "tea", "quantity": 2}) as r:
                assert r.status == 201
                order_id = (await r.json())["id"]
            # Out of stock: the order AND its messages are rolled back together.
            async with http.post(base + "/orders", json={"item": "tea", "quantity": 999}) as r:
                assert r.status == 409
            deadline = time.monotonic() + 30
            while True:
                async with http.get(f"{base}/orders/{order_id}") as r:
                    order = await r.json()
                if order["status"] == "fulfilled":
                    break
                assert time.monotonic() < deadline, order
                await asyncio.sleep(0.05)
        assert await target.wait_for(1, timeout=30)
        await asyncio.sleep(0.5)
        assert target.bodies == [{"template": "order-confirmation", "order_id": order_id}]
        orders = await app_conn.fetch("SELECT id, status, fulfilled_by FROM orders")
        assert [(o["id"], o["status"]) for o in orders] == [(order_id, "fulfilled")]
        assert orders[0]["fulfilled_by"]  # the Ap4k-Message-Id of the delivery
        assert await app_conn.fetchval("SELECT count(*) FROM ap4k_outbox") == 0

