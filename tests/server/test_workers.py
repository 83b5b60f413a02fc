"""`ap4k serve --workers N` and `ap4k carrier --workers N`: N processes on one port under a
supervisor that forwards SIGTERM and exits when a worker dies."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil

from ap4k_testkit import Api, CarrierProcess, ServerProcess, StartServer, sink


def workers_of(pid: int, count: int, timeout: float = 30.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        children = psutil.Process(pid).children()
        if len(children) >= count or time.monotonic() > deadline:
            return children
        time.sleep(0.1)


def listening_on(process: psutil.Process, port: int) -> bool:
    return any(
        c.status == psutil.CONN_LISTEN and c.laddr.port == port
        for c in process.net_connections("tcp")
    )


def gone(processes: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)


async def listening_workers(pid: int, port: int) -> list[psutil.Process]:
    """The supervisor's two workers, once both listen on `port`."""
    workers = await asyncio.to_thread(workers_of, pid, 2)
    assert len(workers) == 2
    for worker in workers:
        await asyncio.to_thread(_wait_listening, worker, port)
    return workers


async def deliver_forty(api: Api, queue: str) -> None:
    async with sink() as target:
        message = {"target": target.url + "/hook"}
        sent = [(await api.send(queue, message))["id"] for _ in range(40)]
        await target.wait_for(lambda: set(sent) <= set(target.delivered_ids()))


async def test_server_workers_share_the_port_deliver_and_stop_on_sigterm(
    database_url: str,
) -> None:
    server = await ServerProcess(database_url, "--workers", "2", "--dispatchers", "4").start()
    assert server.process is not None
    api = Api(server.url)
    try:
        # Both listen on the one port: the kernel spreads connections over them.
        workers = await listening_workers(server.process.pid, server.port)
        await deliver_forty(api, "workers")
        assert await asyncio.to_thread(server.terminate, 30) == 0
        assert gone(workers)
    finally:
        await api.close()
        server.kill()


def _wait_listening(worker: psutil.Process, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not listening_on(worker, port):
        assert time.monotonic() < deadline, f"worker {worker.pid} does not listen on {port}"
        time.sleep(0.1)


async def test_server_supervisor_exits_non_zero_when_a_worker_dies(database_url: str) -> None:
    server = await ServerProcess(database_url, "--workers", "2", "--dispatchers", "0").start()
    assert server.process is not None
    try:
        workers = await asyncio.to_thread(workers_of, server.process.pid, 2)
        assert len(workers) == 2
        os.kill(workers[0].pid, signal.SIGKILL)
        assert await asyncio.to_thread(server.process.wait, 30) == 1
        assert gone(workers)
        assert "stopping the other workers" in server.log()
    finally:
        server.kill()


async def test_carrier_workers_deliver_and_stop_on_sigterm(start_server: StartServer) -> None:
    _, api = await start_server(dispatchers=0)  # only the carriers deliver
    carrier = await CarrierProcess(api.base_url, "--workers", "2", concurrency=4).start()
    assert carrier.process is not None
    try:
        workers = await listening_workers(carrier.process.pid, carrier.metrics_port)
        await deliver_forty(api, "carried")
        assert await asyncio.to_thread(carrier.terminate, 30) == 0
        assert gone(workers)
    finally:
        carrier.kill()
