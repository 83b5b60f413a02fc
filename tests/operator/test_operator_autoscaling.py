"""Autoscaling and queue settings end to end: the operator (kopf, against kmock) reads the
backlog of a real `ap4k serve` (a child process on a real PostgreSQL) and scales the carrier
Deployment, up at once and down after the stabilization window, to and from zero.

The queue is paused, so enqueued messages stay available: the backlog is exactly what the test
enqueued minus what it cancelled.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from ap4k.core.embedded_pg import free_port
from ap4k.operator import config
from ap4k_testkit import Api, ServerProcess

NS = "queues"
AQ, DEPLOYMENTS = "ap4k.dev/v1alpha1/asyncqueues", "apps/v1/deployments"
WINDOW = 3  # scaleDownStabilizationSeconds
TARGET = "http://127.0.0.1:9/never-called"  # the queue is paused: nothing is delivered


@pytest.fixture
async def server(database_url: str) -> AsyncIterator[ServerProcess]:
    process = await ServerProcess(database_url, "--dispatchers", "0").start()
    try:
        yield process
    finally:
        process.kill()


def asyncqueue(**carriers: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ap4k.dev/v1alpha1",
        "kind": "AsyncQueue",
        "metadata": {"name": "orders", "namespace": NS, "uid": "uid-orders", "generation": 1,
                     "resourceVersion": "1"},
        "spec": {
            "database": {"secretName": "orders-db"},
            "carriers": {
                "minReplicas": 0, "maxReplicas": 5, "targetBacklogPerReplica": 10,
                "scaleDownStabilizationSeconds": WINDOW, "pollIntervalSeconds": 1, **carriers,
            },
            "queues": [
                {"name": "jobs", "paused": True, "maxAttempts": 3, "minBackoffSeconds": 2},
                {"name": "idle", "rateLimitPerSecond": 5.5},
            ],
        },
    }


def condition(obj: Any, kind: str) -> dict[str, Any]:
    for item in obj["status"]["conditions"]:
        if item["type"] == kind:
            return dict(item)
    raise KeyError(kind)


async def test_backlog_scales_carriers_and_queue_settings_are_applied(
    cluster: Any, run_operator: Any, server: ServerProcess
) -> None:
    metrics_port = free_port()
    settings = config.OperatorConfig(
        kubernetes_url=cluster.url, server_url_template=server.url, metrics_port=metrics_port,
        http_timeout_seconds=2.0, scanning=False,
    )
    api = Api(server.url)

    def aq() -> Any:
        return cluster.get(AQ, "orders")

    def carriers() -> int:
        replicas: int = cluster.get(DEPLOYMENTS, "orders-carrier")["spec"]["replicas"]
        return replicas

    async def enqueue(count: int) -> list[str]:
        sent = await api.send_batch("jobs", [{"target": TARGET} for _ in range(count)])
        return [item["id"] for item in sent]

    async def cancel(ids: list[str]) -> None:
        for msg_id in ids:
            await api.ok("DELETE", f"/v1/messages/{msg_id}")

    try:
        async with run_operator(settings):
            await cluster.create(asyncqueue())

            # The server answers, the declared settings are applied through its API: Ready.
            await cluster.eventually(lambda: condition(aq(), "Ready")["status"] == "True",
                                     what="Ready=True")
            assert condition(aq(), "QueuesConfigured")["reason"] == "Applied"
            assert condition(aq(), "MetricsAvailable")["reason"] == "ServerStats"
            jobs = (await api.ok("GET", "/v1/queues/jobs"))["settings"]
            assert (jobs["paused"], jobs["max_attempts"], jobs["min_backoff_seconds"]) == (
                True, 3, 2
            )
            idle = (await api.ok("GET", "/v1/queues/idle"))["settings"]
            assert idle["rate_limit_per_second"] == 5.5
            assert carriers() == 0  # idle, minReplicas 0

            # A burst of 25 messages: ceil(25 / 10) = 3 carriers, at once.
            ids = await enqueue(25)
            await cluster.eventually(lambda: carriers() == 3, what="3 carriers")
            # The status follows the Deployment patch.
            await cluster.eventually(lambda: aq()["status"]["carriers"]["replicas"] == 3,
                                     what="status.carriers.replicas 3")
            status = aq()["status"]
            assert status["backlog"] == 25
            # (kmock keeps one event per namespace: kopf's events have only a generateName.)
            (event,) = await cluster.eventually(lambda: cluster.events("ScaledUp"),
                                                what="a ScaledUp event")
            assert event["type"] == "Normal"
            assert "scaled up from 0" in event["message"]
            assert status["carriers"]["lastScaleTime"]
            assert status["oldestAvailableAgeSeconds"] >= 0

            # Demand drops to one carrier's worth: held at 3 for the window, then down to 1.
            await cancel(ids[:18])
            await cluster.eventually(lambda: aq()["status"]["backlog"] == 7, what="backlog 7")
            assert carriers() > 1  # not straight down to what 7 messages ask for
            assert aq()["status"]["carriers"]["desiredReplicas"] == 1
            await cluster.eventually(lambda: carriers() == 1, timeout=WINDOW + 15,
                                     what="scale-down to 1")

            # Idle: to zero after the window; the first new message brings one carrier back.
            await cancel(ids[18:])
            await cluster.eventually(lambda: carriers() == 0, timeout=WINDOW + 15,
                                     what="scale to zero")
            assert aq()["status"]["backlog"] == 0
            await enqueue(1)
            await cluster.eventually(lambda: carriers() == 1, what="scale from zero")

            # Someone changes a declared setting through the API: the operator puts it back.
            await api.settings("jobs", paused=False, max_attempts=9)
            await api.settings("jobs", paused=True)  # keep the message where it is
            await cluster.eventually(
                lambda: _max_attempts(api), what="max_attempts restored",
            )

            # The operator's own metrics.
            async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{metrics_port}/metrics"
            ) as resp:
                text = await resp.text()
            assert 'ap4k_operator_carriers{asyncqueue="queues/orders"} 1.0' in text
            assert 'ap4k_operator_backlog{asyncqueue="queues/orders"} 1.0' in text
            assert 'ap4k_operator_desired_carriers{asyncqueue="queues/orders"} 1.0' in text
    finally:
        await api.close()


async def _max_attempts(api: Api) -> bool:
    settings = (await api.ok("GET", "/v1/queues/jobs"))["settings"]
    return bool(settings["max_attempts"] == 3 and settings["paused"] is True)


async def test_server_rejecting_a_setting_is_reported(
    cluster: Any, run_operator: Any, server: ServerProcess
) -> None:
    settings = config.OperatorConfig(
        kubernetes_url=cluster.url, server_url_template=server.url, metrics_port=0,
        http_timeout_seconds=2.0, scanning=False,
    )
    body = asyncqueue()
    # An http URL by the CRD's pattern, but without a host: only the server refuses it.
    body["spec"]["queues"] = [{"name": "jobs", "allowedTargets": ["http://:8080/"]}]
    async with run_operator(settings):
        await cluster.create(body)
        await cluster.eventually(
            lambda: condition(cluster.get(AQ, "orders"), "QueuesConfigured")["reason"]
            == "Rejected",
            what="QueuesConfigured=False/Rejected",
        )
        ready = condition(cluster.get(AQ, "orders"), "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "Rejected")
        assert "jobs" in ready["message"]


async def test_an_operator_restart_keeps_the_carriers(
    cluster: Any, run_operator: Any, server: ServerProcess
) -> None:
    settings = config.OperatorConfig(
        kubernetes_url=cluster.url, server_url_template=server.url, metrics_port=0,
        http_timeout_seconds=2.0, scanning=False,
    )
    api = Api(server.url)

    def carriers() -> int:
        replicas: int = cluster.get(DEPLOYMENTS, "orders-carrier")["spec"]["replicas"]
        return replicas

    try:
        async with run_operator(settings):
            await cluster.create(asyncqueue())
            await cluster.eventually(
                lambda: condition(cluster.get(AQ, "orders"), "QueuesConfigured")["status"]
                == "True", what="the queues configured",
            )
            sent = await api.send_batch("jobs", [{"target": TARGET} for _ in range(45)])
            await cluster.eventually(lambda: carriers() == 5, what="5 carriers")

        # While the operator is away (an upgrade), the demand goes.
        for item in sent:
            await api.ok("DELETE", f"/v1/messages/{item['id']}")

        async with run_operator(settings):
            # The resumed operator sees the empty backlog but starts its window with the 5 it
            # found: no sudden scale-down, then zero once a whole window stayed empty.
            await cluster.eventually(
                lambda: cluster.get(AQ, "orders")["status"]["backlog"] == 0,
                what="the empty backlog sampled",
            )
            assert carriers() == 5
            assert cluster.get(AQ, "orders")["status"]["carriers"]["desiredReplicas"] == 0
            await cluster.eventually(lambda: carriers() == 0, timeout=WINDOW + 15,
                                     what="scale to zero after the window")
    finally:
        await api.close()
