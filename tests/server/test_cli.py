"""`ap4k serve` and `ap4k migrate`, run as real child processes (the commands that operate
a server are in test_shell_commands.py)."""

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
from ap4k_testkit import Api, ap4k, wait_ready


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
    count = len(available_migrations())
    assert first.stdout.startswith(f"applied {count} migration(s)"), first
    assert {"ap4k_messages", "ap4k_queues"} <= await tables(database_url)

    again = await ap4k("migrate", env={"AP4K_DATABASE_URL": database_url})
    assert again.code == 0, again
    assert again.stdout.strip() == "applied 0 migration(s)", again

    # No URL and no embedded PostgreSQL in the data dir: nothing to migrate.
    missing = await ap4k("migrate", "--data-dir", str(tmp_path / "nothing-here"))
    assert missing.code == 2, missing
    assert "--database-url" in missing.stderr, missing


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


async def test_schedules_from_the_command_line(api: Api) -> None:
    server = ["--server", api.base_url]
    saved = await ap4k(
        "schedules", "set", "hourly", "--queue", "reports", "--cron", "0 * * * *",
        "--timezone", "Europe/Berlin", "--target", "https://example.com/r",
        "--body", '{"kind": "hourly"}', "--json", *server,
    )  # fmt: skip
    assert saved.code == 0, saved
    message = saved.json()["message"]
    assert (message["target"], message["body"]) == ("https://example.com/r", {"kind": "hourly"})
    listed = await ap4k("schedules", "list", *server)
    assert listed.code == 0, listed
    header, row = listed.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "QUEUE", "CRON", "TIMEZONE"]
    assert row.split()[:2] == ["hourly", "reports"] and "Europe/Berlin" in row
    bad = await ap4k(
        "schedules", "set", "x", "--queue", "q", "--cron", "* *", "--target", "https://e.x/",
        *server,
    )  # fmt: skip
    assert bad.code == 1 and "(field cron)" in bad.stderr, bad
    unsent = await ap4k(
        "schedules", "set", "x", "--queue", "q", "--cron", "* * * * *", "--target", "https://e.x/",
        "--body", "{not json", *server,
    )  # fmt: skip
    assert unsent.code == 2 and "--body is not valid JSON" in unsent.stderr, unsent
    deleted = await ap4k("schedules", "delete", "hourly", *server)
    assert deleted.code == 0 and deleted.json() == {"deleted": "hourly"}
    gone = await ap4k("schedules", "delete", "hourly", *server)
    assert gone.code == 1 and "not_found" in gone.stderr
    assert (await ap4k("schedules", "list", "--json", *server)).json() == {"schedules": []}
async def test_cli_prints_a_new_secret_once(api: Api) -> None:
    server = api.base_url
    run = await ap4k(
        "queue", "set", "cli-signed", "--new-signing-secret", "--json", "--server", server
    )
    assert run.code == 0, run.stderr
    secret = run.json()["signing_secret"]
    assert secret.startswith("whsec_") and run.json()["signing_secrets_set"] == 1
    shown = await ap4k("queues", "--server", server)
    assert secret not in shown.stdout
    run = await ap4k(
        "queue", "set", "cli-signed", "--drop-old-signing-secret", "--json", "--server", server
    )
    assert run.code == 0 and run.json() == {"signing_secrets_set": 0}
