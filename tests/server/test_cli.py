"""The `ap4k` shell commands of the server, run as real child processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import asyncpg

from ap4k.core.embedded_pg import free_port
from ap4k.server.migrate import available_migrations
from ap4k_testkit import Api, Received, StartServer, ap4k, count_rows, sink, wait_ready


async def tables(database_url: str) -> set[str]:
    conn = await asyncpg.connect(database_url)
    try:
        records = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_name LIKE 'ap4k_%'"
        )
    finally:
        await conn.close()
    return {r["table_name"] for r in records}


async def test_migrate_applies_once_and_takes_the_url_from_the_environment(
    database_url: str, tmp_path: Path
) -> None:
    assert await tables(database_url) == set()

    first = await ap4k("migrate", "--database-url", database_url)
    assert first.code == 0, first
    every = len(available_migrations())
    assert first.stdout.startswith(f"applied {every} migration(s)"), first
    assert {"ap4k_messages", "ap4k_queues"} <= await tables(database_url)

    again = await ap4k("migrate", env={"AP4K_DATABASE_URL": database_url})
    assert again.code == 0, again
    assert again.stdout.strip() == "applied 0 migration(s)", again

    # No URL and no embedded PostgreSQL in the data dir: nothing to migrate.
    missing = await ap4k("migrate", "--data-dir", str(tmp_path / "nothing-here"))
    assert missing.code == 2, missing
    assert "--database-url" in missing.stderr, missing


async def test_send_enqueues_and_reports_the_message(start_server: StartServer) -> None:
    _, api = await start_server(dispatchers=0)  # the messages stay as sent
    server = ["--server", api.base_url]
    sent = await ap4k("send", "shell", "http://127.0.0.1:9/hook", "--json", '{"order": 7}', *server)
    assert sent.code == 0, sent
    accepted = sent.json()
    assert (accepted["state"], accepted["duplicate"]) == ("available", False)
    message = await api.message(accepted["id"])
    assert (message["queue"], message["target"], message["method"], message["body"]) == (
        "shell",
        "http://127.0.0.1:9/hook",
        "POST",
        {"order": 7},
    )

    # The server URL may come from AP4K_SERVER_URL instead of --server.
    env = {"AP4K_SERVER_URL": api.base_url}
    delayed = await ap4k(
        "send", "shell", "http://127.0.0.1:9/later", "--delay", "600", "--method", "PUT", env=env
    )
    assert delayed.code == 0, delayed
    assert delayed.json()["state"] == "scheduled"
    assert (await api.message(delayed.json()["id"]))["method"] == "PUT"

    once = await ap4k("send", "shell", "http://127.0.0.1:9/k", "--dedup-key", "k1", env=env)
    twice = await ap4k("send", "shell", "http://127.0.0.1:9/k", "--dedup-key", "k1", env=env)
    assert (once.code, twice.code) == (0, 0), (once, twice)
    assert twice.json() == {**once.json(), "duplicate": True}


async def test_send_refusals_exit_non_zero_and_store_nothing(api: Api, database_url: str) -> None:
    server = ["--server", api.base_url]
    bad_json = await ap4k("send", "shell", "http://127.0.0.1:9/", "--json", "{oops", *server)
    assert bad_json.code == 2, bad_json
    assert "--json is not valid JSON" in bad_json.stderr, bad_json

    refused = await ap4k("send", "shell", "http://169.254.169.254/latest/meta-data", *server)
    assert refused.code == 1, refused
    assert refused.json()["error"]["code"] == "target_not_allowed", refused

    unreachable = await ap4k(
        "send", "shell", "http://127.0.0.1:9/", "--server", f"http://127.0.0.1:{free_port()}"
    )
    assert unreachable.code == 1, unreachable
    assert "cannot reach" in unreachable.stderr, unreachable

    assert await count_rows(database_url, "SELECT count(*) FROM ap4k_messages") == 0


async def test_queues_dead_and_redrive(start_server: StartServer) -> None:
    _, api = await start_server(dispatchers=4)
    server = ["--server", api.base_url]
    healthy = False

    def target_behaviour(received: Received, _: int) -> int:
        return 200 if healthy else 410  # 410: a permanent failure, dead at once

    async with sink(target_behaviour) as target:
        sent = [
            (await api.send("flaky", {"target": target.url, "body": {"n": i}}))["id"]
            for i in range(3)
        ]
        for msg_id in sent:
            await api.wait_state(msg_id, "discarded")

        queues = await ap4k("queues", *server)
        assert queues.code == 0, queues
        (flaky,) = [q for q in queues.json()["queues"] if q["name"] == "flaky"]
        assert flaky["depth"]["discarded"] == 3

        dead = await ap4k("dead", "flaky", "--limit", "2", *server)
        assert dead.code == 0, dead
        page = dead.json()
        assert [m["id"] for m in page["messages"]] == sent[:2]
        assert page["next"] == sent[1]
        assert "410" in page["messages"][0]["last_error"]

        healthy = True
        redriven = await ap4k("redrive", "flaky", *server)
        assert redriven.code == 0, redriven
        assert redriven.json() == {"redriven": 3}
        for msg_id in sent:
            await api.wait_state(msg_id, "completed")
        assert (await ap4k("dead", "flaky", *server)).json() == {"messages": [], "next": None}

    unknown = await ap4k("dead", "no-such-queue", *server)
    assert unknown.code == 1, unknown
    assert unknown.json()["error"]["code"] == "not_found"


async def test_shell_commands_send_the_api_token(start_server: StartServer) -> None:
    _, api = await start_server(api_token="t0ken", dispatchers=0)
    await api.settings("private")
    server = ["--server", api.base_url]

    refused = await ap4k("queues", *server)
    assert refused.code == 1, refused
    assert refused.json()["error"]["code"] == "unauthorized"

    by_flag = await ap4k("queues", *server, "--api-token", "t0ken")
    by_env = await ap4k("queues", *server, env={"AP4K_API_TOKEN": "t0ken"})
    for run in (by_flag, by_env):
        assert run.code == 0, run
        assert [q["name"] for q in run.json()["queues"]] == ["private"]


async def test_serve_help_lists_its_flags_and_their_environment_variables() -> None:
    helped = await ap4k("serve", "--help")
    assert helped.code == 0, helped
    for flag, env_name in [
        ("--host", "AP4K_HOST"),
        ("--port", "AP4K_PORT"),
        ("--dispatchers", "AP4K_DISPATCHERS"),
        ("--database-url", "AP4K_DATABASE_URL"),
        ("--data-dir", "AP4K_DATA_DIR"),
        ("--api-token", "AP4K_API_TOKEN"),
        ("--max-body-bytes", "AP4K_MAX_BODY_BYTES"),
    ]:
        assert flag in helped.stdout, flag
        assert env_name in helped.stdout, env_name


async def test_serve_takes_its_settings_from_ap4k_environment_variables(
    database_url: str, tmp_path: Path
) -> None:
    """No flags at all: host, port, database, token, dispatchers and the body limit all come
    from AP4K_* variables, and SIGTERM stops the server cleanly."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AP4K_")}
    env |= {
        "AP4K_HOST": "127.0.0.1",
        "AP4K_PORT": str(port),
        "AP4K_DATABASE_URL": database_url,
        "AP4K_API_TOKEN": "env-token",
        "AP4K_DISPATCHERS": "0",
        "AP4K_MAX_BODY_BYTES": "2048",
    }
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        # Popen returns at once; the server runs on its own until the SIGTERM below.
        process = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "ap4k.cli", "serve"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_ready(base + "/readyz", 30, process)
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/v1/queues") as response:
                assert response.status == 401  # AP4K_API_TOKEN
            api = Api(base, token="env-token")
            try:
                big = {"target": "http://127.0.0.1:9/", "body": "x" * 4096}
                status, body = await api.call("POST", "/v1/queues/env/messages", big)
                assert (status, body["error"]["code"]) == (413, "body_too_large")
                sent = await api.send("env", {"target": "http://127.0.0.1:9/"})
                await asyncio.sleep(0.5)
                # AP4K_DISPATCHERS=0: nobody delivers, the message waits.
                assert (await api.message(sent["id"]))["state"] == "available"
            finally:
                await api.close()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    log = log_path.read_text(errors="replace")
    assert f"127.0.0.1:{port} with 0 dispatchers" in log, log


async def test_cli_prints_a_new_secret_once(api: Api) -> None:
    server = api.base_url
    run = await ap4k("queue", "set", "cli-signed", "--new-signing-secret", "--server", server)
    assert run.code == 0, run.stderr
    secret = run.json()["signing_secret"]
    assert secret.startswith("whsec_") and run.json()["signing_secrets_set"] == 1
    shown = await ap4k("queues", "--server", server)
    assert secret not in shown.stdout
    run = await ap4k("queue", "set", "cli-signed", "--drop-old-signing-secret", "--server", server)
    assert run.code == 0 and run.json() == {"signing_secrets_set": 0}
