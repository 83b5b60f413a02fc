"""`run_outbox_bench`, as `ap4k bench --outbox` calls it, on a small scale."""

from __future__ import annotations

from ap4k.client.bench_outbox import run_outbox_bench
from ap4k_testkit import ServerProcess


async def test_run_outbox_bench(server: ServerProcess, app_db: str) -> None:
    figures = await run_outbox_bench(
        server.url, app_db, messages=600, batch_size=100, wait_delivered=True, timeout=120
    )
    assert figures["messages"] == figures["relayed"] == figures["delivered"] == 600
    assert figures["rejected"] == figures["backlog_after"] == 0
    assert figures["relay_rows_per_second"] > 0
    assert figures["enqueue_rows_per_second"] > 0
