"""The one metrics-and-health app of carrier, forwarder and operator: one body shape."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter

from ap4k.core import observability
from ap4k.core.embedded_pg import free_port


@pytest.fixture
async def served() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    runners = []

    async def serve(**probes: Any) -> str:
        port = free_port()
        runners.append(
            await observability.serve(observability.make_app(**probes), "127.0.0.1", port)
        )
        return f"http://127.0.0.1:{port}"

    yield serve
    for runner in runners:
        await runner.cleanup()


async def get(url: str) -> tuple[int, object, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
        body = await response.json(content_type=None) if url.endswith("z") else None
        return response.status, body, text


async def test_probes_share_one_body_shape(served: Callable[..., Awaitable[str]]) -> None:
    problems: dict[str, str | None] = {"ready": "no server reachable", "alive": None}
    base = await served(ready=lambda: problems["ready"], alive=lambda: problems["alive"])
    assert (await get(f"{base}/healthz"))[:2] == (200, {"status": "ok"})
    assert (await get(f"{base}/readyz"))[:2] == (503, {"status": "no server reachable"})
    problems["ready"] = None
    assert (await get(f"{base}/readyz"))[:2] == (200, {"status": "ready"})
    problems["alive"] = "starting"
    assert (await get(f"{base}/healthz"))[:2] == (503, {"status": "starting"})


async def test_metrics_come_from_prometheus_client(served: Callable[..., Awaitable[str]]) -> None:
    registry = CollectorRegistry()
    Counter("ap4k_test_things", "Things counted.", registry=registry).inc(3)
    base = await served(registry=registry)
    status, _, text = await get(f"{base}/metrics")
    assert status == 200
    assert "ap4k_test_things_total 3.0" in text
