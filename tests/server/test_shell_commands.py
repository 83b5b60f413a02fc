"""The commands that operate a running server (`ap4k send`, `messages`, `queues`, `queue`,
`dead`, `redrive`, `purge`), run as real child processes against a real server: the tables
people read and the `--json` that scripts read, refusals on stderr."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from ap4k.core.embedded_pg import free_port
from ap4k_testkit import Api, Received, StartServer, ap4k, count_rows, sink


def rows(stdout: str) -> list[list[str]]:
    """A table's lines split into cells (two or more spaces apart), header first."""
    import re

    return [re.split(r"\s{2,}", line.strip()) for line in stdout.strip().splitlines()]


async def test_send_takes_every_message_field(start_server: StartServer) -> None:
    _, api = await start_server(dispatchers=0)  # the messages stay as sent
    server = ["--server", api.base_url]
    sent = await ap4k(
        "send", "shell", "http://127.0.0.1:9/hook", "--json", '{"order": 7}',
        "--method", "PUT", "--header", "X-Tenant: acme", "--header", "X-Trace:1",
        "--priority", "5", "--dedup-key", "order-7", "--ordering-key", "customer-1",
        "--max-attempts", "3", "--timeout", "2.5", "--delay", "600", *server,
    )  # fmt: skip
    assert sent.code == 0, sent
    accepted = sent.json()
    assert (accepted["state"], accepted["duplicate"]) == ("scheduled", False)
    message = await api.message(accepted["id"])
    assert {k: message[k] for k in (
        "queue", "target", "method", "headers", "body", "priority", "dedup_key",
        "ordering_key", "max_attempts", "timeout_seconds",
    )} == {
        "queue": "shell",
        "target": "http://127.0.0.1:9/hook",
        "method": "PUT",
        "headers": {"X-Tenant": "acme", "X-Trace": "1"},
        "body": {"order": 7},
        "priority": 5,
        "dedup_key": "order-7",
        "ordering_key": "customer-1",
        "max_attempts": 3,
        "timeout_seconds": 2.5,
    }  # fmt: skip

    # The server URL from AP4K_SERVER_URL; the body from a file or stdin; not_before.
    env = {"AP4K_SERVER_URL": api.base_url}
    later = await ap4k(
        "send", "shell", "http://127.0.0.1:9/at", "--not-before", "2099-01-01T00:00:00Z", env=env
    )
    assert later.code == 0, later
    assert (await api.message(later.json()["id"]))["scheduled_at"].startswith("2099-01-01")
    again = await ap4k("send", "shell", "http://127.0.0.1:9/k", "--dedup-key", "order-7", env=env)
    assert again.json() == {**accepted, "duplicate": True}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ap4k.cli", "send", "shell", "http://127.0.0.1:9/stdin",
        "--body-file", "-", "--server", api.base_url,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("AP4K_")},
    )  # fmt: skip
    out, _ = await process.communicate(b'{"from": "stdin"}')
    assert process.returncode == 0
    assert (await api.message(json.loads(out)["id"]))["body"] == {"from": "stdin"}


async def test_refusals_go_to_stderr_with_exit_1_and_store_nothing(
    api: Api, database_url: str
) -> None:
    server = ["--server", api.base_url]
    bad_json = await ap4k("send", "shell", "http://127.0.0.1:9/", "--json", "{oops", *server)
    assert (bad_json.code, bad_json.stdout) == (2, ""), bad_json
    assert "--json is not valid JSON" in bad_json.stderr, bad_json
    bad_header = await ap4k("send", "shell", "http://127.0.0.1:9/", "--header", "nocolon", *server)
    assert bad_header.code == 2 and "NAME:VALUE" in bad_header.stderr, bad_header

    refused = await ap4k("send", "shell", "http://169.254.169.254/latest/meta-data", *server)
    assert (refused.code, refused.stdout) == (1, ""), refused
    assert refused.stderr.startswith("ap4k send: target_not_allowed: "), refused
    bad_field = await ap4k("send", "shell", "http://127.0.0.1:9/", "--priority", "5000", *server)
    assert bad_field.code == 1 and "(field priority)" in bad_field.stderr, bad_field

    unreachable = await ap4k("queues", "--server", f"http://127.0.0.1:{free_port()}")
    assert unreachable.code == 1, unreachable
    assert unreachable.stderr.startswith("ap4k queues: cannot reach"), unreachable
    assert "Traceback" not in unreachable.stderr

    # Queue names are URL-encoded: a name with a slash reaches the server as one segment
    # and is refused as a name, not taken for another path.
    slashed = await ap4k("queue", "set", "a/b", "--pause", *server)
    assert slashed.code == 1, slashed
    assert "invalid" in slashed.stderr and "queue" in slashed.stderr, slashed
    missing = await ap4k("messages", "get", "12345", *server)
    assert (missing.code, missing.stderr.strip()) == (
        1,
        "ap4k messages: not_found: message not found",
    ), missing
    nothing = await ap4k("queue", "set", "shell", *server)
    assert nothing.code == 2 and "nothing to change" in nothing.stderr, nothing
    assert await count_rows(database_url, "SELECT count(*) FROM ap4k_messages") == 0


async def test_messages_list_get_and_cancel(start_server: StartServer) -> None:
    _, api = await start_server(dispatchers=0)
    server = ["--server", api.base_url]
    ids = [
        m["id"]
        for m in await api.send_batch(
            "orders",
            [{"target": f"http://127.0.0.1:9/{i}", "dedup_key": f"o-{i}"} for i in range(5)],
        )
    ]
    table = await ap4k("messages", "list", "orders", "--limit", "3", *server)
    assert table.code == 0, table
    lines = rows(table.stdout)
    assert lines[0] == ["ID", "STATE", "ATTEMPT", "STATUS", "LAST ERROR", "TARGET", "CREATED"]
    assert [line[0] for line in lines[1:]] == ids[:1:-1]  # newest first
    assert lines[1][1:5] == ["available", "0/25", "-", "-"]
    assert f"--after {ids[2]}" in table.stderr  # how to get the next page

    page = await ap4k(
        "messages", "list", "orders", "--limit", "3", "--after", ids[2], "--json", *server
    )
    assert [m["id"] for m in page.json()["messages"]] == [ids[1], ids[0]]
    assert page.json()["next"] is None
    oldest = await ap4k("messages", "list", "orders", "--oldest-first", "--json", *server)
    assert [m["id"] for m in oldest.json()["messages"]] == ids
    by_key = await ap4k("messages", "list", "orders", "--dedup-key", "o-3", "--json", *server)
    assert [m["id"] for m in by_key.json()["messages"]] == [ids[3]]

    cancelled = await ap4k("messages", "cancel", ids[0], *server)
    assert (cancelled.code, cancelled.stdout.strip()) == (0, f"message {ids[0]} cancelled")
    only = await ap4k("messages", "list", "orders", "--state", "cancelled", "--json", *server)
    assert [m["id"] for m in only.json()["messages"]] == [ids[0]]
    twice = await ap4k("messages", "cancel", ids[0], "--json", *server)
    assert twice.code == 1 and "already_finished" in twice.stderr, twice

    shown = await ap4k("messages", "get", ids[1], *server)
    assert shown.code == 0, shown
    assert "state         available" in shown.stdout
    assert "dedup key     o-1" in shown.stdout
    assert "no attempts yet" in shown.stdout
    as_json = await ap4k("messages", "get", ids[1], "--json", *server)
    assert as_json.json()["id"] == ids[1] and as_json.json()["attempts"] == []


async def test_queues_queue_set_dead_redrive_and_purge(start_server: StartServer) -> None:
    _, api = await start_server(dispatchers=4)
    server = ["--server", api.base_url]
    healthy = False

    def target_behaviour(received: Received, _: int) -> int:
        return 200 if healthy else 410  # 410: a permanent failure, dead at once

    set_up = await ap4k(
        "queue", "set", "flaky", "--max-attempts", "4", "--rate-limit", "500",
        "--max-concurrency", "8", "--allowed-targets", "http://127.0.0.1", *server,
    )  # fmt: skip
    assert set_up.code == 0, set_up
    assert "max_attempts           4" in set_up.stdout
    assert "allowed_targets        http://127.0.0.1" in set_up.stdout
    cleared = await ap4k(
        "queue", "set", "flaky", "--rate-limit", "none", "--max-concurrency", "none",
        "--allowed-targets", "none", "--json", *server,
    )  # fmt: skip
    settings = cleared.json()["settings"]
    assert (settings["max_attempts"], settings["rate_limit_per_second"]) == (4, None)
    assert (settings["max_concurrency"], settings["allowed_targets"]) == (None, [])

    async with sink(target_behaviour) as target:
        sent = [
            (await api.send("flaky", {"target": target.url, "body": {"n": i}}))["id"]
            for i in range(5)
        ]
        for msg_id in sent:
            await api.wait_state(msg_id, "discarded")

        queues = await ap4k("queues", *server)
        assert queues.code == 0, queues
        header, *lines = rows(queues.stdout)
        assert header == [
            "QUEUE", "PAUSED", "AVAILABLE", "SCHEDULED", "RUNNING", "RETRYABLE", "DISCARDED",
            "OLDEST", "DELIVERED", "FAILED",
        ]  # fmt: skip
        assert lines == [["flaky", "0", "0", "0", "0", "5", "-", "0.00/s", "0.08/s"]]
        as_json = await ap4k("queues", "--json", *server)
        (flaky,) = as_json.json()["queues"]
        assert flaky["depth"]["discarded"] == 5

        paused = await ap4k("queue", "set", "flaky", "--pause", *server)
        assert paused.code == 0
        assert rows((await ap4k("queues", *server)).stdout)[1][1] == "paused"
        await ap4k("queue", "set", "flaky", "--resume", *server)

        dead = await ap4k("dead", "flaky", "--limit", "2", *server)
        assert dead.code == 0, dead
        assert [line[0] for line in rows(dead.stdout)[1:]] == sent[:2]
        assert rows(dead.stdout)[1][1:5] == ["discarded", "1/4", "410", "HTTP 410 Gone"]
        assert f"ap4k dead flaky --after {sent[1]}" in dead.stderr
        second = await ap4k("dead", "flaky", "--limit", "2", "--after", sent[1], "--json", *server)
        assert [m["id"] for m in second.json()["messages"]] == sent[2:4]
        every = await ap4k("dead", "flaky", "--limit", "2", "--all", "--json", *server)
        assert [m["id"] for m in every.json()["messages"]] == sent
        assert every.json()["next"] is None

        healthy = True
        some = await ap4k("redrive", "flaky", "--ids", f"{sent[0]},{sent[1]}", *server)
        assert (some.code, some.stdout.strip()) == (0, "redriven: 2"), some
        for msg_id in sent[:2]:
            await api.wait_state(msg_id, "completed")
        purged = await ap4k("purge", "flaky", "--ids", sent[2], "--json", *server)
        assert purged.json() == {"purged": 1}
        rest = await ap4k("redrive", "flaky", "--json", *server)
        assert rest.json() == {"redriven": 2}
        for msg_id in sent[3:]:
            await api.wait_state(msg_id, "completed")
        assert (await ap4k("purge", "flaky", *server)).stdout.strip() == "purged: 0"
        assert (await ap4k("dead", "flaky", "--json", *server)).json() == {
            "messages": [],
            "next": None,
        }
    bad_ids = await ap4k("redrive", "flaky", "--ids", "1,x", *server)
    assert bad_ids.code == 2 and "--ids" in bad_ids.stderr


async def test_attempts_in_messages_get(start_server: StartServer) -> None:
    _, api = await start_server(dispatchers=2)
    await api.settings("shown", max_attempts=2, min_backoff_seconds=0.01)
    from aiohttp import web

    async with sink(lambda r, n: web.Response(status=500, text="kaput")) as target:
        sent = await api.send("shown", {"target": target.url})
        await api.wait_state(sent["id"], "discarded")
    shown = await ap4k("messages", "get", sent["id"], "--server", api.base_url)
    attempts = rows(shown.stdout.split("\n\n", 1)[1])
    assert attempts[0] == ["#", "AT", "DURATION", "OUTCOME", "STATUS", "ERROR", "RESPONSE", "BY"]
    assert [a[0] for a in attempts[1:]] == ["1", "2"]
    assert [a[3:7] for a in attempts[1:]] == [
        ["retried", "500", "HTTP 500 Internal Server Error", "kaput"],
        ["dead", "500", "HTTP 500 Internal Server Error", "kaput"],
    ]


async def test_token_and_a_pipe_that_closes_early(start_server: StartServer) -> None:
    _, api = await start_server(api_token="t0ken", dispatchers=0)
    for i in range(30):
        await api.settings(f"q{i:02d}")
    server = ["--server", api.base_url]

    refused = await ap4k("queues", *server)
    assert refused.code == 1 and "unauthorized" in refused.stderr, refused
    by_flag = await ap4k("queues", "--json", *server, "--api-token", "t0ken")
    by_env = await ap4k("queues", "--json", *server, env={"AP4K_API_TOKEN": "t0ken"})
    for run in (by_flag, by_env):
        assert run.code == 0, run
        assert len(run.json()["queues"]) == 30

    # `ap4k queues | head -1` ends quietly: no BrokenPipeError, nothing on stderr.
    shell = (
        f"{sys.executable} -m ap4k.cli queues --json --server {api.base_url} --api-token t0ken"
        " | head -c 10"
    )
    process = await asyncio.create_subprocess_shell(
        shell, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert (len(out), err) == (10, b"")


async def test_queue_set_flow_limits_and_circuit_breaker(start_server: StartServer) -> None:
    _, api = await start_server(dispatchers=0)
    server = ["--server", api.base_url]
    both = await ap4k(
        "queue", "set", "tenants", "--flow-limits", "max_concurrency=2, rate_limit_per_second=5",
        "--circuit-breaker", "failure_ratio=0.25,min_attempts=4,window_seconds=30,open_seconds=15",
        "--json", *server,
    )  # fmt: skip
    assert both.code == 0, both
    shown = (await api.ok("GET", "/v1/queues/tenants"))["settings"]
    assert shown["flow_limits"] == {"rate_limit_per_second": 5.0, "max_concurrency": 2}
    assert shown["circuit_breaker"] == {
        "failure_ratio": 0.25,
        "min_attempts": 4,
        "window_seconds": 30.0,
        "open_seconds": 15.0,
    }
    assert both.json()["settings"] == shown
    # A field left out takes its default; the table shows the objects as the flags take them.
    some = await ap4k("queue", "set", "tenants", "--circuit-breaker", "open_seconds=5", *server)
    assert some.code == 0, some
    lines = {line.split()[0]: line.split()[-1] for line in some.stdout.splitlines()[2:] if line}
    assert lines["circuit_breaker"] == (
        "failure_ratio=0.5,min_attempts=10,window_seconds=60,open_seconds=5"
    )
    assert lines["flow_limits"] == "rate_limit_per_second=5,max_concurrency=2"
    off = await ap4k(
        "queue", "set", "tenants", "--flow-limits", "none", "--circuit-breaker", "None", *server
    )
    assert off.code == 0, off
    shown = (await api.ok("GET", "/v1/queues/tenants"))["settings"]
    assert (shown["flow_limits"], shown["circuit_breaker"]) == (None, None)

    for flag, bad, said in (
        ("--flow-limits", "max_concurrency=0", "$.flow_limits.max_concurrency"),
        ("--flow-limits", "max_concurrency=two", "$.flow_limits.max_concurrency"),
        ("--flow-limits", "burst=3", "unknown field `burst`"),
        ("--flow-limits", "max_concurrency", "FIELD=VALUE"),
        ("--flow-limits", "max_concurrency=1,max_concurrency=2", "each field once"),
        ("--flow-limits", ",", "FIELD=VALUE"),
        ("--circuit-breaker", "failure_ratio=1.5", "$.circuit_breaker.failure_ratio"),
    ):
        refused = await ap4k("queue", "set", "tenants", flag, bad, *server)
        assert refused.code == 2, (bad, refused)
        assert said in refused.stderr and flag in refused.stderr, (bad, refused.stderr)
        assert "Traceback" not in refused.stderr
    shown = (await api.ok("GET", "/v1/queues/tenants"))["settings"]
    assert (shown["flow_limits"], shown["circuit_breaker"]) == (None, None)
