"""`ap4k serve` with no database URL: the embedded PostgreSQL starts, keeps its data across
restarts, and stops with the server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from ap4k.core.embedded_pg import EmbeddedPostgres, free_port
from ap4k_testkit import Api, ap4k, sink, wait_ready


async def test_embedded_postgres_lifecycle(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "ap4k"
    command = [
        sys.executable,
        "-m",
        "ap4k.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
    ]
    env = {k: v for k, v in os.environ.items() if k != "AP4K_DATABASE_URL"}
    log = (tmp_path / "serve.log").open("ab")

    async def start() -> subprocess.Popen[bytes]:
        # Popen returns at once; the child runs on its own.
        process = subprocess.Popen(  # noqa: ASYNC220
            command, stdout=log, stderr=subprocess.STDOUT, env=env
        )
        await wait_ready(f"http://127.0.0.1:{port}/readyz", 90, process)
        return process

    server = await start()
    api = Api(f"http://127.0.0.1:{port}")
    try:
        async with sink() as target:
            sent = await api.send("local", {"target": target.url, "body": {"hi": 1}})
            await api.wait_state(sent["id"], "completed")
        cluster = EmbeddedPostgres(data_dir / "postgres")
        assert cluster.running()

        # A second server on the same data dir is refused, and the first one's database
        # stays up: it goes on taking and delivering messages.
        second = await ap4k(*command[3:7], str(free_port()), *command[8:])
        assert second.code == 1, second
        assert "belongs to another ap4k server" in second.stderr, second
        assert "Traceback" not in second.stderr, second
        assert cluster.running()
        # `ap4k migrate` on the data dir uses the running server's cluster.
        migrated = await ap4k("migrate", "--data-dir", str(data_dir))
        assert (migrated.code, migrated.stdout.strip()) == (0, "applied 0 migration(s)"), migrated
        async with sink() as target:
            after = await api.send("local", {"target": target.url, "body": {"hi": 2}})
            await api.wait_state(after["id"], "completed")

        server.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.wait, 60) == 0
        assert not cluster.running()  # stopped with the server

        # With no server, `ap4k migrate` starts the cluster for itself and stops it again.
        migrated = await ap4k("migrate", "--data-dir", str(data_dir))
        assert (migrated.code, migrated.stdout.strip()) == (0, "applied 0 migration(s)"), migrated
        assert not cluster.running()

        server = await start()  # same data directory: same messages
        assert (await api.message(sent["id"]))["state"] == "completed"
    finally:
        await api.close()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            await asyncio.to_thread(server.wait, 60)
