"""A real Prometheus scrapes a real `ap4k serve` while it delivers a short load to a real
sink, some of it failing for good: then every dashboard and alert query runs in that
Prometheus, and every panel about server metrics shows data. Twice: once with the server's
own dispatchers delivering, once with a real `ap4k carrier` delivering everything (then the
carrier panels must show data too).

Skipped only when Debian's prometheus package is absent (CI installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from ap4k.core.embedded_pg import free_port
from ap4k_testkit import serving
from tests.chart.conftest import (
    DOCUMENTED_CARRIER_METRICS,
    DOCUMENTED_OPERATOR_METRICS,
    DOCUMENTED_SERVER_METRICS,
    alert_rules,
    dashboard_queries,
    metric_names,
)

PROMETHEUS = Path("/usr/bin/prometheus")
pytestmark = pytest.mark.skipif(not PROMETHEUS.exists(), reason="/usr/bin/prometheus is absent")

# The load: per queue, how many messages go to which sink path.
LOAD = {
    "orders": {"/ok": 40, "/bad": 6},  # /bad answers 400: permanent failure, dead letter
    "webhooks": {"/flaky": 12, "/ok": 8},  # /flaky answers 503 once, then 200: one retry
}
DELIVERED = sum(n for paths in LOAD.values() for p, n in paths.items() if p != "/bad")
DEAD = sum(paths.get("/bad", 0) for paths in LOAD.values())
RETRIED = sum(paths.get("/flaky", 0) for paths in LOAD.values())


# --- the parts -------------------------------------------------------------------------------


@dataclass
class Sink:
    url: str
    received: int = 0


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    """A real aiohttp target: /ok succeeds, /bad fails permanently, /flaky fails once."""
    state = Sink("")

    async def ok(request: web.Request) -> web.Response:
        state.received += 1
        await asyncio.sleep(0.005)  # a little latency for the histograms
        return web.json_response({"ok": True})

    async def bad(request: web.Request) -> web.Response:
        return web.json_response({"error": "no such order"}, status=400)

    async def flaky(request: web.Request) -> web.Response:
        if request.headers.get("Ap4k-Attempt", "1") == "1":
            return web.json_response({"error": "try later"}, status=503)
        return await ok(request)

    app = web.Application()
    app.router.add_post("/ok", ok)
    app.router.add_post("/bad", bad)
    app.router.add_post("/flaky", flaky)
    async with serving(app) as state.url:
        yield state


def _spawn(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


def _tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.exists() else ""


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{url}: exited {process.returncode}\n{_tail(log)}")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} never answered 200\n{_tail(log)}")


@dataclass
class Stack:
    """The ap4k processes under test and the /metrics endpoints Prometheus scrapes."""

    server: str
    # job name -> host:port
    targets: dict[str, str]


AP4K = [sys.executable, "-c", "import sys; from ap4k.cli import main; sys.exit(main())"]


@pytest.fixture(params=["dispatchers", "carrier"])
async def stack(
    request: pytest.FixtureRequest, database_url: str, tmp_path: Path
) -> AsyncIterator[Stack]:
    """`ap4k serve` on its own database (the suite's shared PostgreSQL, tests/conftest.py),
    delivering with its own dispatchers; or with none, and one `ap4k carrier` delivering."""
    delivery = request.param
    if delivery == "carrier" and importlib.util.find_spec("ap4k.carrier.cli") is None:
        pytest.skip("the carrier is not built yet")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AP4K_")}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    processes = []
    try:
        log = tmp_path / "server.log"
        dispatchers = "4" if delivery == "dispatchers" else "0"
        server = _spawn(
            [*AP4K, "serve", "--host", "127.0.0.1", "--port", str(port),
             "--database-url", database_url, "--dispatchers", dispatchers],
            log, env,
        )  # fmt: skip
        processes.append(server)
        await _wait_http(url + "/readyz", server, log)
        targets = {"ap4k-server": f"127.0.0.1:{port}"}
        if delivery == "carrier":
            metrics_port = free_port()
            log = tmp_path / "carrier.log"
            carrier = _spawn(
                [*AP4K, "carrier", "--server", url, "--concurrency", "8",
                 "--metrics-port", str(metrics_port)],
                log, env,
            )  # fmt: skip
            processes.append(carrier)
            await _wait_http(f"http://127.0.0.1:{metrics_port}/healthz", carrier, log)
            targets["ap4k-carrier"] = f"127.0.0.1:{metrics_port}"
        yield Stack(url, targets)
    finally:
        for process in reversed(processes):
            _stop(process)


@pytest.fixture
async def prometheus(stack: Stack, tmp_path: Path) -> AsyncIterator[str]:
    """Prometheus scraping the stack every second, with the chart's alert rules loaded."""
    rules = tmp_path / "ap4k.rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": alert_rules()}))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {"job_name": job, "static_configs": [{"targets": [target]}]}
                    for job, target in stack.targets.items()
                ],
            }
        )
    )
    port = free_port()
    log = tmp_path / "prometheus.log"
    process = _spawn(
        [str(PROMETHEUS), f"--config.file={config}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        log,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_http(url + "/-/ready", process, log)
        # Ready is not scraping yet: service discovery hands over its first targets only
        # after a few seconds. A load sent before the first scrape would have no "before".
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 60
            while len(await _query(session, url, "up == 1")) < len(stack.targets):
                assert time.monotonic() < deadline, _tail(log)
                await asyncio.sleep(0.2)
        yield url
    finally:
        _stop(process)


# --- helpers ---------------------------------------------------------------------------------


async def _query(session: aiohttp.ClientSession, prometheus: str, expr: str) -> list[Any]:
    async with session.get(f"{prometheus}/api/v1/query", params={"query": expr}) as response:
        body = await response.json()
    assert response.status == 200 and body["status"] == "success", (expr, body)
    result: list[Any] = body["data"]["result"]
    return result


def _finite(result: list[Any]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


async def _post_load(session: aiohttp.ClientSession, server: str, sink: Sink) -> None:
    for queue in LOAD:
        # Short backoff, so that the retried messages are delivered within the test.
        settings = {"min_backoff_seconds": 0.1, "max_backoff_seconds": 0.2, "max_attempts": 5}
        async with session.put(f"{server}/v1/queues/{queue}", json=settings) as response:
            assert response.status == 200, await response.text()
    # In waves over a few seconds: Prometheus' rate() only sees increases between scrapes, so
    # a load delivered within one scrape interval would show as a flat line.
    waves = 5
    for wave in range(waves):
        for queue, paths in LOAD.items():
            messages = [
                {"target": f"{sink.url}{path}", "body": {"n": i}}
                for path, count in paths.items()
                for i in range(count)
                if i % waves == wave
            ]
            # A batch and a single message: both enqueue paths.
            async with session.post(
                f"{server}/v1/queues/{queue}/messages", json={"messages": messages[:-1]}
            ) as response:
                assert response.status == 202, await response.text()
            async with session.post(
                f"{server}/v1/queues/{queue}/messages", json=messages[-1]
            ) as response:
                assert response.status == 202, await response.text()
        await asyncio.sleep(1.2)


async def _wait_settled(session: aiohttp.ClientSession, server: str) -> None:
    """Until nothing is left to deliver: every message delivered or dead."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pending = 0
        for queue in LOAD:
            async with session.get(f"{server}/v1/queues/{queue}") as response:
                depth = (await response.json())["depth"]
            pending += sum(
                depth.get(s, 0) for s in ("available", "scheduled", "running", "retryable")
            )
        if pending == 0:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("the load was not delivered within 60s")


async def _wait_scraped(session: aiohttp.ClientSession, prometheus: str) -> None:
    """Until Prometheus holds the final counts, and the gauges (which the server refreshes
    every few seconds) show the settled queues."""
    deadline = time.monotonic() + 60
    wanted = {"delivered": DELIVERED, "dead": DEAD, "retried": RETRIED}
    seen: dict[str, float] = {}
    while time.monotonic() < deadline:
        result = await _query(session, prometheus, "sum by (outcome) (ap4k_deliveries_total)")
        seen = {s["metric"]["outcome"]: float(s["value"][1]) for s in result}
        discarded = await _query(session, prometheus, 'sum(ap4k_queue_depth{state="discarded"})')
        seen["discarded"] = float(discarded[0]["value"][1]) if discarded else 0.0
        if seen["discarded"] == DEAD and all(
            seen.get(outcome, 0) == count for outcome, count in wanted.items()
        ):
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"Prometheus never saw the final counts: {seen}")


async def _evaluated_rules(session: aiohttp.ClientSession, prometheus: str) -> list[Any]:
    """The loaded alerting rules, once Prometheus has evaluated each after the load."""
    deadline = time.monotonic() + 20
    while True:
        async with session.get(f"{prometheus}/api/v1/rules") as response:
            groups = (await response.json())["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        # Never evaluated yet: lastEvaluation is Go's zero time, year 1.
        if rules and all(not r["lastEvaluation"].startswith("0001") for r in rules):
            return rules
        assert time.monotonic() < deadline, rules
        await asyncio.sleep(0.5)


def _exported_names(exposition: str) -> set[str]:
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            names.add(
                f"{name}_total" if kind == "counter" and not name.endswith("_total") else name
            )
    return names


# --- the test --------------------------------------------------------------------------------


async def test_prometheus_runs_every_dashboard_and_alert_query(
    stack: Stack, prometheus: str, sink: Sink
) -> None:
    server = stack.server
    async with aiohttp.ClientSession() as session:
        await _post_load(session, server, sink)
        await _wait_settled(session, server)
        await _wait_scraped(session, prometheus)

        async with session.get(f"{server}/metrics") as response:
            exported = _exported_names(await response.text())
        # The server exports every documented server metric under its documented name.
        assert exported >= DOCUMENTED_SERVER_METRICS, DOCUMENTED_SERVER_METRICS - exported
        known = exported | DOCUMENTED_CARRIER_METRICS | DOCUMENTED_OPERATOR_METRICS

        # The load really happened as planned.
        assert sink.received == DELIVERED

        # With a carrier delivering, its panels must show data too.
        scraped = exported | (
            DOCUMENTED_CARRIER_METRICS if "ap4k-carrier" in stack.targets else set()
        )
        with_data = 0
        for dashboard, panel, expr in dashboard_queries():
            names = metric_names(expr)
            assert names <= known, f"{dashboard} / {panel}: not exported: {names - known}"
            result = await _query(session, prometheus, expr)  # parses and runs
            if names <= scraped:
                assert result and _finite(result), f"{dashboard} / {panel}: no data for {expr}"
                with_data += 1
        assert with_data >= 10 + (3 if "ap4k-carrier" in stack.targets else 0)

        # Alert expressions run, and Prometheus evaluated the loaded rules without error.
        for group in alert_rules():
            for rule in group["rules"]:
                assert metric_names(rule["expr"]) <= known, rule["alert"]
                await _query(session, prometheus, rule["expr"])
        rules = await _evaluated_rules(session, prometheus)
        assert len(rules) == 4
        assert all(r["health"] == "ok" for r in rules), [
            (r["name"], r.get("lastError")) for r in rules
        ]
        # The dead letters of this very run fire the dead-letter alert (it has no `for:`).
        alerts = {r["name"]: r for r in rules}
        assert alerts["Ap4kDeadLettersGrowing"]["state"] == "firing"
        firing = alerts["Ap4kDeadLettersGrowing"]["alerts"]
        assert {a["labels"]["queue"] for a in firing} == {"orders"}
