"""`ap4k bench`: the end-to-end benchmark, everything on 127.0.0.1.

It starts its own PostgreSQL (durable defaults: fsync on), one `ap4k serve` process, a sink
process that answers 200 at once, and drives load from this process. Figures:

- the raw PostgreSQL bound on the same database: bare INSERTs, bare lease-and-complete;
- enqueue rate: single-message POSTs at concurrency 64, and batches of 100;
- delivery rate to the sink from an empty start (messages enqueued to a paused queue,
  then released at once);
- end-to-end latency p50/p99 at a fixed offered load of 1,000 msg/s (open loop);
- delivery rate again with a 1,000,000-message backlog;
- optionally: carriers (--carriers) and the outbox forwarder (--outbox).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from ap4k.core.embedded_pg import EmbeddedPostgres, free_port


@dataclass
class BenchOptions:
    quick: bool = False
    dispatchers: int = 32
    backlog: int = 1_000_000
    carriers: list[int] = field(default_factory=list)
    outbox: bool = False
    seconds: float = 5.0
    latency_rate: int = 1000
    latency_seconds: float = 10.0
    delivery_messages: int = 50_000
    backlog_measured: int = 100_000
    keep: bool = False

    def scaled(self) -> BenchOptions:
        if not self.quick:
            return self
        self.seconds = 1.0
        self.backlog = min(self.backlog, 5_000)
        self.latency_rate = min(self.latency_rate, 200)
        self.latency_seconds = 2.0
        self.delivery_messages = 2_000
        self.backlog_measured = 2_000
        return self


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    target: str = ""
    note: str = ""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Process:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self.proc = subprocess.Popen(
            args,
            stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} did not come up")


class Bench:
    def __init__(self, options: BenchOptions) -> None:
        self.o = options
        self.workdir = Path(tempfile.mkdtemp(prefix="ap4k-bench-"))
        self.figures: list[Figure] = []
        self.processes: list[Process] = []
        self.pg = EmbeddedPostgres(self.workdir / "pg")
        self.server_port = free_port()
        self.sink_port = free_port()

    @property
    def server(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    @property
    def sink(self) -> str:
        return f"http://127.0.0.1:{self.sink_port}"

    # -- set-up -----------------------------------------------------------------------------

    async def start(self) -> None:
        log(f"PostgreSQL in {self.workdir}")
        await asyncio.to_thread(self.pg.init)
        await asyncio.to_thread(self.pg.start)
        conn = await asyncpg.connect(self.pg.url)
        await conn.execute("CREATE DATABASE ap4k")
        await conn.execute("CREATE DATABASE raw")
        await conn.close()
        # Everything runs on this machine: the server reaches PostgreSQL over its Unix
        # socket, as `ap4k serve` does with its embedded PostgreSQL.
        self.database_url = self.pg.socket_url("ap4k")
        self.processes.append(
            Process(
                [sys.executable, "-m", "ap4k.bench.sink", "--port", str(self.sink_port)],
                self.workdir / "sink.log",
            )
        )
        await self.start_server(self.o.dispatchers)
        await wait_http(self.sink + "/stats")
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), timeout=aiohttp.ClientTimeout(total=60)
        )
        self.db = await asyncpg.connect(self.database_url)

    async def start_server(self, dispatchers: int) -> Process:
        server = Process(
            [
                sys.executable,
                "-m",
                "ap4k.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.server_port),
                "--database-url",
                self.database_url,
                "--dispatchers",
                str(dispatchers),
                "--log-level",
                "warning",
            ],
            self.workdir / "server.log",
        )
        self.processes.append(server)
        await wait_http(self.server + "/readyz")
        self.server_process = server
        return server

    async def restart_server(self, dispatchers: int) -> None:
        self.server_process.stop()
        self.processes.remove(self.server_process)
        await self.start_server(dispatchers)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.session.close()
            await self.db.close()
        for process in reversed(self.processes):
            process.stop()
        await asyncio.to_thread(self.pg.stop)
        if not self.o.keep:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------------

    async def post(self, path: str, payload: Any) -> Any:
        async with self.session.post(
            self.server + path,
            data=orjson.dumps(payload),
            headers={"Content-Type": "application/json"},
        ) as response:
            body = await response.read()
            if response.status >= 300:
                raise RuntimeError(f"{path}: {response.status} {body[:200]!r}")
            return orjson.loads(body)

    async def put_queue(self, queue: str, **settings: Any) -> None:
        async with self.session.put(f"{self.server}/v1/queues/{queue}", json=settings) as r:
            assert r.status == 200, await r.text()

    async def sink_stats(self, latencies: bool = False) -> dict[str, Any]:
        url = self.sink + "/stats" + ("?latencies=1" if latencies else "")
        async with self.session.get(url) as response:
            stats: dict[str, Any] = orjson.loads(await response.read())
            return stats

    async def sink_reset(self) -> None:
        async with self.session.post(self.sink + "/reset"):
            pass

    async def fill(self, queue: str, count: int, batch: int = 1000, concurrency: int = 4) -> None:
        """Enqueue `count` messages for the sink in batches (the queue is paused)."""
        message = {"target": self.sink + "/deliver", "body": {"bench": True}}
        remaining = count
        lock = asyncio.Lock()

        async def worker() -> None:
            nonlocal remaining
            while True:
                async with lock:
                    n = min(batch, remaining)
                    remaining -= n
                if n <= 0:
                    return
                await self.post(f"/v1/queues/{queue}/messages", {"messages": [message] * n})

        await asyncio.gather(*[worker() for _ in range(concurrency)])

    async def clear(self) -> None:
        await self.db.execute("TRUNCATE ap4k_messages")
        await self.db.execute("VACUUM ANALYZE ap4k_messages")

    async def timed_loop(
        self, seconds: float, concurrency: int, step: Callable[[], Awaitable[int]]
    ) -> float:
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                n = await step()  # not `done += await step()`: that reads `done` too early
                done += n

        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return done / (time.perf_counter() - started)

    # -- the raw PostgreSQL bound -------------------------------------------------------------

    async def raw_postgres(self) -> None:
        url = self.pg.socket_url("raw")
        pool = await asyncpg.create_pool(url, min_size=16, max_size=16)
        assert pool is not None
        async with pool.acquire() as conn:
            await conn.execute(
                "CREATE TABLE jobs (id bigserial PRIMARY KEY, state text NOT NULL DEFAULT "
                "'available', payload bytea)"
            )
            await conn.execute("CREATE INDEX ON jobs (id) WHERE state = 'available'")
        payload = b'{"bench":true}'

        async def insert_one() -> int:
            async with pool.acquire() as conn:
                await conn.execute("INSERT INTO jobs (payload) VALUES ($1)", payload)
            return 1

        async def insert_batch() -> int:
            async with pool.acquire() as conn:
                await conn.execute(
                    "INSERT INTO jobs (payload) SELECT unnest($1::bytea[])", [payload] * 100
                )
            return 100

        single = await self.timed_loop(self.o.seconds, 16, insert_one)
        self.figures.append(
            Figure("PostgreSQL: bare INSERT, 1 row/commit (16 conns)", single, "rows/s")
        )
        batched = await self.timed_loop(self.o.seconds, 8, insert_batch)
        self.figures.append(
            Figure("PostgreSQL: bare INSERT, 100 rows/commit (8 conns)", batched, "rows/s")
        )

        async def lease_and_complete() -> int:
            async with pool.acquire() as conn:
                rows = await conn.fetch(
                    "UPDATE jobs SET state = 'running' WHERE id IN (SELECT id FROM jobs "
                    "WHERE state = 'available' ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED) "
                    "RETURNING id"
                )
                await conn.execute(
                    "UPDATE jobs SET state = 'completed' WHERE id = ANY($1)",
                    [r["id"] for r in rows],
                )
            return len(rows)

        rate = await self.timed_loop(self.o.seconds, 16, lease_and_complete)
        self.figures.append(
            Figure("PostgreSQL: bare lease + complete, batches of 100", rate, "msg/s")
        )
        await pool.close()

    async def calibration(self) -> None:
        """A bare aiohttp POST loop from this process to the sink: what one Python HTTP
        client does on this machine right now (docs/performance.md: 17,000-18,000/s
        with uvloop on an idle machine). Read the ap4k figures against it."""
        url = self.sink + "/deliver"
        body = b'{"bench":true}'
        headers = {"Content-Type": "application/json"}

        async def one() -> int:
            async with self.session.post(url, data=body, headers=headers) as response:
                await response.read()
            return 1

        rate = await self.timed_loop(self.o.seconds, 32, one)
        self.figures.append(
            Figure(
                "calibration: bare aiohttp POSTs to the sink, 1 process",
                rate,
                "req/s",
                "",
                "no ap4k involved",
            )
        )

    # -- ap4k figures ---------------------------------------------------------------------------

    async def enqueue_rates(self) -> None:
        await self.put_queue("bench-enqueue", paused=True)
        single_message = {"target": self.sink + "/deliver", "body": {"bench": True}}

        async def one() -> int:
            await self.post("/v1/queues/bench-enqueue/messages", single_message)
            return 1

        rate = await self.timed_loop(self.o.seconds, 64, one)
        self.figures.append(
            Figure("enqueue: single-message POSTs, concurrency 64", rate, "msg/s", "≥ 5,000")
        )
        batch = {"messages": [single_message] * 100}

        async def hundred() -> int:
            await self.post("/v1/queues/bench-enqueue/messages", batch)
            return 100

        rate = await self.timed_loop(self.o.seconds, 8, hundred)
        self.figures.append(
            Figure("enqueue: batches of 100, concurrency 8", rate, "msg/s", "≥ 50,000")
        )
        await self.clear()

    async def drain_rate(self, queue: str, count: int, measured: int | None = None) -> float:
        """Release `count` queued messages at once; the rate at which the sink gets them."""
        measured = measured or count
        await self.sink_reset()
        started = time.time()
        await self.put_queue(queue, paused=False)
        while True:
            stats = await self.sink_stats()
            if stats["received"] >= measured:
                break
            await asyncio.sleep(0.05)
        return float(stats["received"] / (stats["last_at"] - started))

    async def delivery_rate(
        self, label: str = "delivery: empty start, server dispatchers", target: str = "≥ 5,000"
    ) -> float:
        await self.put_queue("bench-deliver", paused=True)
        await self.fill("bench-deliver", self.o.delivery_messages)
        rate = await self.drain_rate("bench-deliver", self.o.delivery_messages)
        self.figures.append(Figure(label, rate, "msg/s", target))
        await self.wait_idle()
        await self.clear()
        return rate

    async def wait_idle(self) -> None:
        busy = "SELECT count(*) FROM ap4k_messages WHERE state IN ('available', 'running')"
        while await self.db.fetchval(busy):  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(0.1)

    async def latency(self) -> None:
        rate, seconds = self.o.latency_rate, self.o.latency_seconds
        warmup = 1.0
        await self.sink_reset()
        total = int(rate * (seconds + warmup))
        started = time.perf_counter()
        errors = 0

        async def send_at(i: int) -> None:
            nonlocal errors
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = {"target": self.sink + "/deliver", "body": {"t": time.time(), "i": i}}
            try:
                await self.post("/v1/queues/bench-latency/messages", body)
            except (RuntimeError, aiohttp.ClientError, OSError):
                errors += 1

        await asyncio.gather(*[send_at(i) for i in range(total)])
        deadline = time.monotonic() + 30
        while (await self.sink_stats())["received"] < total - errors:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        samples = (await self.sink_stats(latencies=True))["latencies"]
        samples = samples[int(rate * warmup) :]  # drop the warm-up second
        samples.sort()
        p50 = statistics.median(samples) * 1000
        p99 = samples[int(len(samples) * 0.99) - 1] * 1000
        self.figures.append(
            Figure(f"latency p50, enqueue → delivered, {rate} msg/s offered", p50, "ms")
        )
        self.figures.append(
            Figure(f"latency p99, enqueue → delivered, {rate} msg/s offered", p99, "ms", "< 20")
        )
        await self.wait_idle()
        await self.clear()

    async def backlog_rate(self, empty_rate: float) -> None:
        n = self.o.backlog
        await self.put_queue("bench-backlog", paused=True)
        log(f"filling a backlog of {n:,} messages")
        started = time.perf_counter()
        await self.fill("bench-backlog", n, batch=1000, concurrency=4)
        log(f"backlog filled in {time.perf_counter() - started:.1f}s; draining")
        rate = await self.drain_rate("bench-backlog", n, self.o.backlog_measured)
        await self.put_queue("bench-backlog", paused=True)
        share = rate / empty_rate * 100 if empty_rate else 0.0
        self.figures.append(
            Figure(
                f"delivery: with a {n:,}-message backlog",
                rate,
                "msg/s",
                "≥ 80% of empty",
                f"{share:.0f}% of the empty-start rate",
            )
        )
        await self.clear()

    async def carrier_rates(self, server_only: float) -> None:
        await self.restart_server(0)
        carriers: list[Process] = []
        try:
            for count in sorted(set(self.o.carriers)):
                while len(carriers) < count:
                    carriers.append(
                        Process(
                            [
                                sys.executable,
                                "-m",
                                "ap4k.cli",
                                "carrier",
                                "--server",
                                self.server,
                                "--concurrency",
                                str(self.o.dispatchers),
                                "--metrics-port",
                                str(free_port()),
                                "--log-level",
                                "warning",
                            ],
                            self.workdir / f"carrier-{len(carriers)}.log",
                        )
                    )
                self.processes.extend(carriers[-1:])
                await asyncio.sleep(1.0)
                rate = await self.delivery_rate(
                    f"delivery: 0 dispatchers, {count} carrier(s)",
                    "≥ 80% of server-only" if count == 1 else "",
                )
                self.figures[-1].note = f"{rate / server_only * 100:.0f}% of server-only"
        finally:
            for carrier in carriers:
                carrier.stop()
            await self.restart_server(self.o.dispatchers)

    async def outbox_rate(self) -> None:
        from ap4k.client.bench_outbox import run_outbox_bench

        conn = await asyncpg.connect(self.pg.url)
        await conn.execute("CREATE DATABASE app")
        await conn.close()
        figures = await run_outbox_bench(
            self.server,
            self.pg.socket_url("app"),
            target=self.sink + "/deliver",
            messages=2_000 if self.o.quick else 50_000,
        )
        for name, value in figures.items():
            if name.endswith("_rows_per_second") and isinstance(value, (int, float)):
                label = name.removesuffix("_rows_per_second").replace("_", " ")
                self.figures.append(Figure(f"outbox: {label}", float(value), "rows/s"))
        await self.wait_idle()
        await self.clear()

    # -- the whole run ------------------------------------------------------------------------

    async def run(self, only: set[str] | None = None) -> list[Figure]:
        await self.start()
        try:
            stages = only or {"raw", "enqueue", "delivery", "latency", "backlog"}
            if "raw" in stages:
                log("raw PostgreSQL bound and HTTP calibration")
                await self.raw_postgres()
                await self.calibration()
            if "enqueue" in stages:
                log("enqueue rates")
                await self.enqueue_rates()
            empty = 0.0
            if "delivery" in stages or "backlog" in stages or self.o.carriers:
                log("delivery rate")
                empty = await self.delivery_rate()
            if "latency" in stages:
                log("latency at a fixed offered load")
                await self.latency()
            if "backlog" in stages:
                await self.backlog_rate(empty)
            if self.o.carriers:
                log(f"carriers {self.o.carriers}")
                await self.carrier_rates(empty)
            if self.o.outbox:
                log("outbox forwarder")
                await self.outbox_rate()
        finally:
            await self.stop()
        return self.figures


def describe_machine() -> str:
    return (
        f"{os.cpu_count()} cores, Python {platform.python_version()}, "
        f"PostgreSQL {EmbeddedPostgres.version()} (fsync on)"
    )


def render(figures: list[Figure], options: BenchOptions) -> str:
    lines = [
        f"ap4k bench — {describe_machine()}; one server process, {options.dispatchers} "
        "dispatchers; load generator, server, PostgreSQL and sink on this machine",
        "",
        f"{'figure':<62} {'value':>12}  {'unit':<7} {'target':<22} note",
    ]
    for f in figures:
        value = f"{f.value:,.1f}" if f.unit == "ms" else f"{f.value:,.0f}"
        lines.append(f"{f.name:<62} {value:>12}  {f.unit:<7} {f.target:<22} {f.note}")
    return "\n".join(lines)
