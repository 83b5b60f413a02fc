"""The operator's side of the ap4k server's HTTP API and of Prometheus' query API.

- `GET /v1/queues` for the queues' depth and settings,
- `GET /v1/throughput` for the deliveries over the last poll interval,
- `PUT /v1/queues/{name}` for the declared settings (snake_case),
- `GET /api/v1/query` on Prometheus for a custom backlog metric.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from ap4k.client.async_client import AsyncClient
from ap4k.client.errors import ApiError, ServerUnavailable
from ap4k.core.retry import RetryPolicy

# The operator's names for the API client's errors (one hierarchy, see ap4k.client.errors).
Unreachable = ServerUnavailable  # connection, timeout, 5xx, or an answer without what we need
Rejected = ApiError  # 4xx: a setting the server considers invalid (`.field` says which)


class HttpClient:
    """The API client per server (and Prometheus) the operator calls, in the running loop.

    Each poll is short: two tries within the configured HTTP timeout. The operator polls
    again at its next interval, so a longer retry would only delay the other AsyncQueues.
    """

    def __init__(self) -> None:
        self._clients: dict[tuple[str, str | None, float], AsyncClient] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def client(self, base_url: str, *, timeout: float, token: str | None) -> AsyncClient:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new loop (tests, a restart): sessions cannot move
            self._clients.clear()
            self._loop = loop
        key = (base_url, token, timeout)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = AsyncClient(
                base_url,
                token=token,
                timeout=timeout,
                connect_timeout=timeout,
                retry=RetryPolicy(deadline_seconds=timeout, attempts=2, max_backoff_seconds=0.5),
                user_agent="ap4k-operator",
            )
        return client

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

    async def call(
        self, method: str, url: str, path: str, *, timeout: float, token: str | None = None,
        json: Any = None, params: Mapping[str, str] | None = None,
    ) -> Any:
        client = self.client(url, timeout=timeout, token=token)
        try:
            return await client.call(method, path, json, params=params)
        except ValueError as exc:  # not JSON
            raise Unreachable(f"{method} {url}{path}: {exc}") from exc


# --- the ap4k server ------------------------------------------------------------------------


async def list_queues(
    http: HttpClient, base_url: str, *, timeout: float, token: str | None
) -> list[dict[str, Any]]:
    answer = await http.call("GET", base_url, "/v1/queues", timeout=timeout, token=token)
    queues = answer.get("queues") if isinstance(answer, dict) else None
    if not isinstance(queues, list):
        raise Unreachable(f"GET {base_url}/v1/queues: no queue list in the answer")
    return [queue for queue in queues if isinstance(queue, dict)]


async def completed_within(
    http: HttpClient, base_url: str, seconds: float, *, timeout: float, token: str | None
) -> dict[str, int]:
    """`GET /v1/throughput`: messages delivered per queue over the last `seconds`."""
    answer = await http.call(
        "GET", base_url, "/v1/throughput", params={"seconds": f"{seconds:.3f}"},
        timeout=timeout, token=token,
    )
    queues = answer.get("queues") if isinstance(answer, dict) else None
    if not isinstance(queues, list):
        raise Unreachable(f"GET {base_url}/v1/throughput: no queue list in the answer")
    return {
        str(q["name"]): int(q["completed"]) for q in queues
        if isinstance(q, dict) and isinstance(q.get("completed"), int)
    }


async def put_queue(
    http: HttpClient, base_url: str, name: str, settings: Mapping[str, Any], *,
    timeout: float, token: str | None,
) -> dict[str, Any]:
    path = f"/v1/queues/{quote(name, safe='')}"
    answer = await http.call(
        "PUT", base_url, path, json=dict(settings), timeout=timeout, token=token
    )
    return answer if isinstance(answer, dict) else {}


def settings_match(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether the server's settings already hold every desired value."""
    for key, value in desired.items():
        have = current.get(key)
        if isinstance(value, Mapping):  # an object setting: field by field
            if not isinstance(have, Mapping) or not settings_match(have, value):
                return False
        elif isinstance(value, float | int) and not isinstance(value, bool):
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
    try:
        answer = await http.call(
            "GET", server_address, "/api/v1/query", params={"query": query}, timeout=timeout
        )
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
