"""`ap4k operator`: flags, and the command itself run as a process against kmock."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import pytest

from ap4k.cli import build_parser
from ap4k.core.embedded_pg import free_port
from ap4k.operator.cli import watched_namespaces


def parse(*argv: str) -> Any:
    return build_parser().parse_args(["operator", *argv])


def test_namespaces_repeat_or_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    assert watched_namespaces(parse("--namespace", "a,b", "-n", "c", "--namespace", "a")) == [
        "a", "b", "c",
    ]
    monkeypatch.setenv("AP4K_NAMESPACES", "x, y")
    assert watched_namespaces(parse()) == ["x", "y"]
    assert watched_namespaces(parse("-n", "z")) == ["z"]  # a flag replaces the environment


def test_flags_have_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AP4K_METRICS_PORT", "9191")
    monkeypatch.setenv("AP4K_ALL_NAMESPACES", "true")
    args = parse()
    assert (args.metrics_port, args.all_namespaces) == (9191, True)
    assert parse("--metrics-port", "0").metrics_port == 0


def test_a_scope_is_required() -> None:
    args = parse()
    with pytest.raises(SystemExit, match="--all-namespaces"):
        args.func(args)
    args = parse("--all-namespaces", "-n", "a")
    with pytest.raises(SystemExit, match="exclude each other"):
        args.func(args)


async def test_ap4k_operator_runs_and_serves_health_and_metrics(cluster: Any) -> None:
    port = free_port()
    env = {
        **os.environ,
        "AP4K_OPERATOR_KUBERNETES_URL": cluster.url,
        "AP4K_OPERATOR_SCANNING": "false",
        "AP4K_OPERATOR_SERVER_URL_TEMPLATE": "http://127.0.0.1:9",
        "AP4K_OPERATOR_IMAGE": "example.test/ap4k:cli",
        "AP4K_METRICS_PORT": str(port),
        "AP4K_LOG_FORMAT": "json",
    }
    process = subprocess.Popen(  # noqa: ASYNC220  (returns at once)
        [sys.executable, "-m", "ap4k.cli", "operator", "--namespace", cluster.NAMESPACE],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        async with aiohttp.ClientSession() as http:
            async def get(path: str) -> tuple[int, str]:
                try:
                    async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
                        return resp.status, await resp.text()
                except aiohttp.ClientError:
                    assert process.poll() is None, "ap4k operator exited"
                    return 0, ""

            await cluster.eventually(lambda: _ok(get("/healthz")), timeout=30, what="/healthz")
            await cluster.create({
                "apiVersion": "ap4k.dev/v1alpha1", "kind": "AsyncQueue",
                "metadata": {"name": "cli", "namespace": cluster.NAMESPACE, "uid": "uid-cli",
                             "generation": 1, "resourceVersion": "1"},
                "spec": {"database": {"secretName": "db"}},
            })
            server = await cluster.eventually(
                lambda: cluster.get(cluster.DEPLOYMENTS, "cli-server"), what="cli-server"
            )
            image = server["spec"]["template"]["spec"]["containers"][0]["image"]
            assert image == "example.test/ap4k:cli"
            status, text = await get("/metrics")
            assert status == 200
            assert "ap4k_operator_reconciliations_total" in text
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.to_thread(process.communicate, timeout=30)
    assert process.returncode == 0, output.decode(errors="replace")[-3000:]
    # JSON log lines (--log-format through AP4K_LOG_FORMAT).
    assert b'"message":' in output or b'"message": ' in output
    # One line per real change: kopf's per-handler progress lines stay out of the INFO log.
    text = output.decode(errors="replace")
    assert "succeeded." not in text and "is processed" not in text, text[-3000:]
    assert "Children reconciled" in text


async def _ok(response: Any) -> bool:
    status, _ = await response
    return bool(status == 200)


def test_kopf_progress_lines_are_demoted_but_failures_kept() -> None:
    import logging

    from ap4k.operator.logfilter import DemoteKopfProgress

    def record(level: int, msg: str) -> logging.LogRecord:
        return logging.LogRecord("kopf.objects", level, __file__, 1, msg, None, None)

    demote = DemoteKopfProgress()
    logging.getLogger("kopf.objects").setLevel(logging.INFO)
    assert not demote.filter(record(logging.INFO, "Handler 'deployment_event' succeeded."))
    assert not demote.filter(record(logging.INFO, "Resuming is processed: 1 succeeded; 0 failed."))
    assert not demote.filter(record(logging.INFO, "Activity 'startup' succeeded."))
    assert demote.filter(record(logging.INFO, "Creation is processed: 0 succeeded; 1 failed."))
    assert demote.filter(record(logging.INFO, "Carriers ScaledUp: 0 → 2"))
    assert demote.filter(record(logging.ERROR, "Handler 'x' failed with an exception."))
    logging.getLogger("kopf.objects").setLevel(logging.DEBUG)
    shown = record(logging.INFO, "Handler 'deployment_event' succeeded.")
    assert demote.filter(shown) and shown.levelno == logging.DEBUG
    logging.getLogger("kopf.objects").setLevel(logging.NOTSET)
