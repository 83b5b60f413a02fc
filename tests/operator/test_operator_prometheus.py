"""`spec.carriers.metric: {type: Prometheus}` end to end: a real Prometheus (Debian's package)
scrapes two real `ap4k serve` replicas of one database; the README's queries count each
message once across them; the operator (against kmock) scales from those queries, and keeps
the carriers where they are when Prometheus goes away.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ap4k.core.embedded_pg import free_port
from ap4k.operator import config
from ap4k_testkit import Api, ServerProcess

PROMETHEUS = Path("/usr/bin/prometheus")
pytestmark = pytest.mark.skipif(not PROMETHEUS.exists(), reason="/usr/bin/prometheus is absent")

NS = "queues"
AQ, DEPLOYMENTS = "ap4k.dev/v1alpha1/asyncqueues", "apps/v1/deployments"
# The README's queries. Every replica exports the whole database's depth (a gauge): take one
# replica's value per queue. Each replica counts only what it enqueued or delivered (a
# counter): sum them.
QUERY = 'sum(max by (queue) (ap4k_queue_depth{queue="jobs",state="available"}))'
ARRIVALS = 'sum(rate(ap4k_messages_enqueued_total{queue="jobs"}[10s]))'
COMPLETIONS = 'sum(rate(ap4k_deliveries_total{queue="jobs",outcome="delivered"}[10s]))'


@pytest.fixture
async def servers(database_url: str) -> AsyncIterator[list[ServerProcess]]:
    first = await ServerProcess(database_url, "--dispatchers", "0").start()
    try:
        second = await ServerProcess(database_url, "--dispatchers", "0").start()
        try:
            yield [first, second]
        finally:
            second.kill()
    finally:
        first.kill()


@pytest.fixture
async def server(servers: list[ServerProcess]) -> ServerProcess:
    return servers[0]


@pytest.fixture
async def prometheus(servers: list[ServerProcess], tmp_path: Path) -> AsyncIterator[Any]:
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: ap4k\n"
        "    static_configs: [{targets: ["
        + ", ".join(f"'127.0.0.1:{server.port}'" for server in servers)
        + "]}]\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(  # noqa: ASYNC220  (returns at once)
        [str(PROMETHEUS), f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(f"{url}/-/ready") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            await asyncio.sleep(0.1)
    try:
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        log.close()


def condition(obj: Any, kind: str) -> dict[str, Any]:
    for item in obj["status"]["conditions"]:
        if item["type"] == kind:
            return dict(item)
    raise KeyError(kind)


async def instant(url: str, query: str) -> float | None:
    """The value of a one-sample instant query (None: empty)."""
    async with aiohttp.ClientSession() as http, http.get(
        f"{url}/api/v1/query", params={"query": query}
    ) as resp:
        result = (await resp.json())["data"]["result"]
    return float(result[0]["value"][1]) if result else None


async def test_prometheus_query_drives_scaling_and_its_failure_freezes_it(
    cluster: Any, run_operator: Any, servers: list[ServerProcess], prometheus: Any
) -> None:
    server = servers[0]
    process, prometheus_url = prometheus
    settings = config.OperatorConfig(
        kubernetes_url=cluster.url, server_url_template=server.url, metrics_port=0,
        http_timeout_seconds=2.0, scanning=False,
    )
    api, other = Api(server.url), Api(servers[1].url)
    body = {
        "apiVersion": "ap4k.dev/v1alpha1", "kind": "AsyncQueue",
        "metadata": {"name": "orders", "namespace": NS, "uid": "uid-p", "generation": 1,
                     "resourceVersion": "1"},
        "spec": {
            "database": {"secretName": "orders-db"},
            "queues": [{"name": "jobs", "paused": True}],
            "carriers": {
                "minReplicas": 0, "maxReplicas": 5, "initialRatePerCarrier": 10,
                "initialStartupSeconds": 1,
                "scaleDownStabilizationSeconds": 2, "pollIntervalSeconds": 1,
                "metric": {"type": "Prometheus", "prometheus": {
                    "serverAddress": prometheus_url, "query": QUERY,
                    "arrivalRateQuery": ARRIVALS, "completionRateQuery": COMPLETIONS}},
            },
        },
    }

    def aq() -> Any:
        return cluster.get(AQ, "orders")

    def carriers() -> int:
        replicas: int = cluster.get(DEPLOYMENTS, "orders-carrier")["spec"]["replicas"]
        return replicas

    try:
        async with run_operator(settings):
            await cluster.create(body)
            await cluster.eventually(
                lambda: condition(aq(), "QueuesConfigured")["status"] == "True",
                what="the queue configured (paused)",
            )
            # 15 messages through one replica, 10 through the other.
            sent = await api.send_batch(
                "jobs", [{"target": "http://127.0.0.1:9/x"} for _ in range(15)]
            )
            sent += await other.send_batch(
                "jobs", [{"target": "http://127.0.0.1:9/x"} for _ in range(10)]
            )
            # The server's gauges refresh every few seconds, Prometheus scrapes every second.
            # Each message counts once: 25, though both replicas export a depth of 25.
            naive = 'sum(ap4k_queue_depth{queue="jobs",state="available"})'
            await cluster.eventually(
                lambda: _equals(instant(prometheus_url, naive), 50.0), timeout=40,
                interval=0.5, what="both replicas' depth scraped (summed: twice the backlog)",
            )
            assert await instant(prometheus_url, QUERY) == 25.0
            enqueued = 'sum(ap4k_messages_enqueued_total{queue="jobs"})'
            assert await instant(prometheus_url, enqueued) == 25.0  # each replica its own
            # The query is a backlog the queue's own settings do not cap (`jobs` is paused:
            # the query decides what counts).
            await cluster.eventually(lambda: carriers() >= 1, timeout=40,
                                     what="carriers from the Prometheus query")
            await cluster.eventually(
                lambda: condition(aq(), "MetricsAvailable")["reason"] == "PrometheusQuery",
                what="MetricsAvailable=True/PrometheusQuery",
            )
            await cluster.eventually(lambda: aq()["status"]["backlog"] == 25,
                                     what="status.backlog 25")

            # Prometheus goes away, and the demand with it: without a sample, nothing moves.
            process.kill()
            process.wait(10)
            for item in sent:
                await api.ok("DELETE", f"/v1/messages/{item['id']}")
            await cluster.eventually(
                lambda: condition(aq(), "MetricsAvailable")["status"] == "False",
                what="MetricsAvailable=False",
            )
            metrics = condition(aq(), "MetricsAvailable")
            assert metrics["reason"] == "MetricsUnavailable"
            assert "carriers stay where they are" in metrics["message"]
            held = carriers()
            await asyncio.sleep(4)  # two stabilization windows, four polls
            assert carriers() == held
            # The queue itself still serves: Ready does not depend on the metric.
            assert condition(aq(), "Ready")["status"] == "True"
    finally:
        await api.close()
        await other.close()


async def _equals(value: Any, expected: float) -> bool:
    return bool(await value == expected)
