"""The operator's side of the ap4k server's HTTP API and of Prometheus' query API.

- `GET /v1/queues` for the queues' depth and settings,
- `GET /v1/throughput` for the deliveries over the last poll interval,
- `PUT /v1/queues/{name}` for the declared settings (snake_case),
- `GET /api/v1/query` on Prometheus for a custom backlog metric.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp


class Unreachable(Exception):
    """The server (or Prometheus) did not answer usefully: connection, timeout, 5xx, bad JSON."""


class Rejected(Exception):
    """The server refused a request (4xx): a setting it considers invalid."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


class HttpClient:
    """One aiohttp session per event loop, for every server and Prometheus the operator calls."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def session(self, timeout: float) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            self._loop = loop
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout),
                headers={"User-Agent": "ap4k-operator"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def call(
        self, method: str, url: str, *, timeout: float, token: str | None = None,
        json: Any = None, params: Mapping[str, str] | None = None,
    ) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with self.session(timeout).request(
                method, url, json=json, params=params, headers=headers
            ) as response:
                if 400 <= response.status < 500:
                    raise _rejected(response.status, await response.text())
                if response.status >= 500:
                    raise Unreachable(f"{method} {url} answered {response.status}")
                return await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise Unreachable(f"{method} {url}: {exc or type(exc).__name__}") from exc


def _rejected(status: int, text: str) -> Rejected:
    try:
        error = json.loads(text).get("error", {})
        return Rejected(status, str(error.get("message", text)), error.get("field"))
    except (ValueError, AttributeError):
        return Rejected(status, text[:500] or f"HTTP {status}")


# --- the ap4k server ------------------------------------------------------------------------


async def list_queues(
    http: HttpClient, base_url: str, *, timeout: float, token: str | None
) -> list[dict[str, Any]]:
    answer = await http.call("GET", f"{base_url}/v1/queues", timeout=timeout, token=token)
    queues = answer.get("queues") if isinstance(answer, dict) else None
    if not isinstance(queues, list):
        raise Unreachable(f"GET {base_url}/v1/queues: no queue list in the answer")
    return [queue for queue in queues if isinstance(queue, dict)]


async def completed_within(
    http: HttpClient, base_url: str, seconds: float, *, timeout: float, token: str | None
) -> dict[str, int]:
    """`GET /v1/throughput`: messages delivered per queue over the last `seconds`."""
    url = f"{base_url}/v1/throughput"
    answer = await http.call(
        "GET", url, params={"seconds": f"{seconds:.3f}"}, timeout=timeout, token=token
    )
    queues = answer.get("queues") if isinstance(answer, dict) else None
    if not isinstance(queues, list):
        raise Unreachable(f"GET {url}: no queue list in the answer")
    return {
        str(q["name"]): int(q["completed"]) for q in queues
        if isinstance(q, dict) and isinstance(q.get("completed"), int)
    }


async def put_queue(
    http: HttpClient, base_url: str, name: str, settings: Mapping[str, Any], *,
    timeout: float, token: str | None,
) -> dict[str, Any]:
    url = f"{base_url}/v1/queues/{quote(name, safe='')}"
    answer = await http.call("PUT", url, json=dict(settings), timeout=timeout, token=token)
    return answer if isinstance(answer, dict) else {}


def settings_match(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether the server's settings already hold every desired value."""
    for key, value in desired.items():
        have = current.get(key)
        if isinstance(value, float | int) and not isinstance(value, bool):
            if not isinstance(have, float | int) or not math.isclose(have, value):
                return False
        elif have != value:
            return False
    return True


# --- Prometheus -----------------------------------------------------------------------------


async def prometheus_query(
    http: HttpClient, server_address: str, query: str, *, timeout: float
) -> float:
    """The sum of an instant query's values (an empty vector is 0, like KEDA's default)."""
    url = f"{server_address}/api/v1/query"
    try:
        answer = await http.call("GET", url, params={"query": query}, timeout=timeout)
    except Rejected as exc:  # Prometheus answers 400 for a query it cannot parse
        raise Unreachable(f"Prometheus refused the query: {exc}") from exc
    if not isinstance(answer, dict) or answer.get("status") != "success":
        raise Unreachable(f"Prometheus query failed: {answer!r:.300}")
    data = answer.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar" and isinstance(result, list) and len(result) == 2:
        values = [result[1]]
    elif kind == "vector" and isinstance(result, list):
        values = [sample.get("value", [None, None])[1] for sample in result]
    else:
        raise Unreachable(f"Prometheus query gave a {kind}, not a vector or a scalar")
    try:
        total = sum(float(value) for value in values)
    except (TypeError, ValueError) as exc:
        raise Unreachable(f"Prometheus query gave non-numbers: {values!r:.300}") from exc
    if not math.isfinite(total):
        raise Unreachable(f"Prometheus query gave {total}")
    return total
