"""`ap4k bench`: the end-to-end benchmark, everything on 127.0.0.1.

It starts its own PostgreSQL (durable defaults: fsync on), one `ap4k serve`, a sink process that
answers 200 at once, and drives load from this process. Every ap4k figure stands beside the
bound it is read against, measured in the same run (the machine's speed moves 2-4x with other
load, so only such ratios mean anything), with the issue's target and a met/missed mark:

- bounds: bare one-row INSERT commits, bare 100-row INSERTs, bare lease + complete, and one
  process of bare client POSTs to the sink, once with aiohttp and once with libcurl (pycurl's
  multi interface on ap4k's event-loop glue, `ap4k.core.curl.LoopMulti`: the client ap4k
  delivers with): deliveries are read against the faster;
- enqueue: single-message POSTs at concurrency 64, and batches of 100 (sent with libcurl),
  and as a reference beside the 100-row bound ap4k's own enqueue statement with 100 rows
  straight from asyncpg: PostgreSQL's share of a batch enqueue;
- delivery to the sink from an empty start (messages enqueued to a paused queue, then released
  at once), with the CPU-seconds the server spent per 1,000 messages;
- end-to-end latency p50/p99 at a fixed offered load of 1,000 msg/s (open loop);
- delivery again with a 1,000,000-message backlog;
- carriers: the server without dispatchers and N carriers (rate and CPU per 1,000 messages);
- optionally the outbox forwarder;
- optionally flow keys: one saturated key with a deep backlog ahead of thousands of keys
  with a few messages each: the time of one lease of a batch of 100 (with and without the
  queue's flow_limits), and the rate at which the waiting keys' messages are delivered.

Each stage reports how long it took, the peak RSS of the server and of each carrier, and the
load average is recorded at the start and the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import psutil
import pycurl

from ap4k.core import wire
from ap4k.core.curl import CurlClient, LoopMulti
from ap4k.core.embedded_pg import EmbeddedPostgres, free_port
from ap4k.core.workers import freeze_start_up_objects
from ap4k.server import queries
from ap4k.server.store import EnqueueRow, Store

# The stages in the order they run; `--only` takes names from this list.
STAGES = (
    "raw", "enqueue", "delivery", "latency", "backlog", "carriers", "outbox", "flow", "soak"
)
DEFAULT_STAGES = ("raw", "enqueue", "delivery", "latency", "backlog", "carriers")
# The dispatchers of the server each stage runs against, where not --dispatchers: the
# carriers stage measures a server that delivers nothing itself. `Bench.run` starts that
# server before the stage (and its --profile) begins, so that py-spy follows it.
STAGE_DISPATCHERS = {"carriers": 0}
CORES = os.cpu_count() or 1
PROGRESS_SECONDS = 3.0


@dataclass
class BenchOptions:
    quick: bool = False
    dispatchers: int = 32
    backlog: int = 1_000_000
    carriers: list[int] = field(default_factory=lambda: [1])
    workers: int = 1
    carrier_workers: int = 1
    seconds: float = 5.0
    latency_rate: int = 1000
    latency_seconds: float = 10.0
    delivery_messages: int = 50_000
    backlog_measured: int = 100_000
    flow_backlog: int = 20_000
    flow_keys: int = 5_000
    soak_rate: int = 500
    soak_seconds: float = 600.0
    keep: bool = False
    profile: bool = False

    def scaled(self) -> BenchOptions:
        if not self.quick:
            return self
        self.seconds = 1.0
        self.backlog = min(self.backlog, 5_000)
        self.latency_rate = min(self.latency_rate, 200)
        self.latency_seconds = 2.0
        self.delivery_messages = 2_000
        self.backlog_measured = 2_000
        self.flow_backlog = 2_000
        self.flow_keys = 1_500
        self.soak_rate = min(self.soak_rate, 200)
        self.soak_seconds = min(self.soak_seconds, 4.0)
        return self


@dataclass
class Figure:
    """One measured figure, beside the bound it is read against and the issue's target."""

    name: str
    value: float
    unit: str
    stage: str
    bound: str = ""  # the bound's figure name
    bound_value: float | None = None
    ratio: float | None = None  # value / bound_value
    target: str = ""
    met: bool | None = None  # None: no target
    note: str = ""
    short: str = ""  # how a figure read against this one names it
    # How many of the machine's cores were busy while a rate was measured (every process,
    # the kernel's work included), and the ratio the figure would reach at that cost per
    # item with every core busy: a target above this ceiling cannot be met on this machine
    # without making each item cheaper.
    cores_busy: float | None = None
    ceiling: float | None = None

    def __post_init__(self) -> None:
        self.short = self.short or self.name


@dataclass(frozen=True)
class Rate:
    """Items per second, and the machine's busy cores meanwhile."""

    per_second: float
    cores_busy: float


class BusyCores:
    """The machine's busy cores over a stretch of time, from the kernel's counters: every
    process and the kernel's own work (loopback TCP, page cache), not idle, I/O wait or
    time stolen by a hypervisor."""

    def __init__(self) -> None:
        self.started, self.busy = time.perf_counter(), self._busy_seconds()

    @staticmethod
    def _busy_seconds() -> float:
        t = psutil.cpu_times()
        return float(
            t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        )

    def rate(self, items: float, seconds: float | None = None) -> Rate:
        """`items` over `seconds` (default: since this started) as a Rate."""
        elapsed = time.perf_counter() - self.started
        cores = (self._busy_seconds() - self.busy) / elapsed if elapsed > 0 else 0.0
        return Rate(items / (seconds or elapsed), cores)


@dataclass
class StageReport:
    name: str
    seconds: float = 0.0
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class Report:
    machine: str
    options: dict[str, Any]
    load_average_start: tuple[float, float, float]
    load_average_end: tuple[float, float, float] = (0.0, 0.0, 0.0)
    figures: list[Figure] = field(default_factory=list)
    stages: list[StageReport] = field(default_factory=list)
    interrupted: bool = False


def versus(figure: Figure, bound: Figure | None, at_least: float | None = None) -> Figure:
    """Set the figure's ratio to `bound` and, given `at_least`, its mark against that target."""
    if bound is None or not bound.value:
        return figure
    figure.bound = bound.short
    figure.bound_value = bound.value
    figure.ratio = figure.value / bound.value
    if figure.cores_busy:
        figure.ceiling = figure.ratio * CORES / figure.cores_busy
    if at_least is not None:
        figure.target = f"≥ {at_least:g} × bound"
        figure.met = figure.ratio >= at_least
    return figure


def at_most(figure: Figure, limit: float, ratio_to: Figure | None = None) -> Figure:
    """A figure whose target is an upper limit: on its value, or (given `ratio_to`) its ratio."""
    if ratio_to is not None:
        if not ratio_to.value:
            return figure
        figure.bound, figure.bound_value = ratio_to.short, ratio_to.value
        figure.ratio = figure.value / ratio_to.value
        figure.target = f"≤ {limit:g} × bound"
        figure.met = figure.ratio <= limit
    else:
        figure.target = f"< {limit:g} {figure.unit}"
        figure.met = figure.value < limit
    return figure


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return (round(one, 2), round(five, 2), round(fifteen, 2))


class Process:
    """A child process of the bench. In its own session: a Ctrl-C reaches the bench alone,
    which then stops its children in order (the server before PostgreSQL)."""

    def __init__(self, name: str, args: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.proc = subprocess.Popen(
            args, stdout=log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tree(self) -> list[psutil.Process]:
        """The process and its children (the workers of `--workers N`)."""
        try:
            top = psutil.Process(self.proc.pid)
            return [top, *top.children(recursive=True)]
        except psutil.Error:
            return []

    def rss_bytes(self) -> int:
        total = 0
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Monitor:
    """Samples the RSS of the server and of each carrier a few times a second; keeps the
    peak of each per stage."""

    def __init__(self) -> None:
        self.processes: dict[str, Process] = {}
        self.peaks: dict[str, int] = {}

    def watch(self, process: Process) -> None:
        self.processes[process.name] = process

    def forget(self, process: Process) -> None:
        self.sample()
        self.processes.pop(process.name, None)

    def sample(self) -> None:
        for name, process in list(self.processes.items()):
            rss = process.rss_bytes()
            if rss > self.peaks.get(name, 0):
                self.peaks[name] = rss

    def take_peaks(self) -> dict[str, float]:
        self.sample()
        peaks = {name: round(rss / 2**20, 1) for name, rss in sorted(self.peaks.items())}
        self.peaks = {}
        return peaks

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(0.25)


@contextlib.asynccontextmanager
async def progress(label: str, state: Callable[[], Awaitable[str] | str]) -> AsyncIterator[None]:
    """A line on stderr every few seconds while a long step runs."""
    started = time.perf_counter()

    async def ticker() -> None:
        while True:
            await asyncio.sleep(PROGRESS_SECONDS)
            value = state()
            text = await value if not isinstance(value, str) else value
            log(f"  {label}: {text} ({time.perf_counter() - started:.0f}s)")

    task = asyncio.create_task(ticker())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def wait_http(url: str, process: Process | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process is not None and process.proc.poll() is not None:
                # The log's end in the error: the work directory and its logs are removed
                # on the way out unless --keep.
                tail = process.log_path.read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(
                    f"{process.name} exited ({process.proc.returncode}); the end of "
                    f"{process.log_path}:\n" + "\n".join(tail)
                )
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
        self.report = Report(
            machine=describe_machine(),
            options={
                "quick": options.quick,
                "dispatchers": options.dispatchers,
                "workers": options.workers,
                "carrier_workers": options.carrier_workers,
                "backlog": options.backlog,
                "carriers": options.carriers,
                "seconds": options.seconds,
                "latency_rate": options.latency_rate,
                "delivery_messages": options.delivery_messages,
            },
            load_average_start=load_average(),
        )
        self.processes: list[Process] = []
        self.monitor = Monitor()
        self.bounds: dict[str, Figure] = {}
        self.pg = EmbeddedPostgres(self.workdir / "pg")
        self.server_port = free_port()
        self.sink_port = free_port()
        self.stage = ""
        self.session: aiohttp.ClientSession | None = None
        self.db: asyncpg.Connection | None = None
        self.pg_starting: asyncio.Future[None] | None = None
        self.cpu_dispatchers: Figure | None = None

    @property
    def figures(self) -> list[Figure]:
        return self.report.figures

    @property
    def server(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    @property
    def sink(self) -> str:
        return f"http://127.0.0.1:{self.sink_port}"

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def figure(
        self, name: str, value: float | Rate, unit: str, note: str = "", short: str = ""
    ) -> Figure:
        """A figure of this stage; a Rate's value is its rate, with the cores it kept busy."""
        if isinstance(value, Rate):
            figure = Figure(name, value.per_second, unit, self.stage, note=note, short=short)
            figure.cores_busy = value.cores_busy
        else:
            figure = Figure(name, value, unit, self.stage, note=note, short=short)
        return self.add(figure)

    # -- set-up -----------------------------------------------------------------------------

    async def start(self) -> None:
        log(f"PostgreSQL in {self.workdir}; load average {self.report.load_average_start}")
        # A thread cannot be cancelled: stop() waits for it before stopping PostgreSQL.
        self.pg_starting = asyncio.ensure_future(asyncio.to_thread(self._start_postgres))
        await asyncio.shield(self.pg_starting)
        conn = await asyncpg.connect(self.pg.url)
        await conn.execute("CREATE DATABASE ap4k")
        await conn.execute("CREATE DATABASE raw")
        await conn.close()
        # Everything runs on this machine: the server reaches PostgreSQL over its Unix
        # socket, as `ap4k serve` does with its embedded PostgreSQL.
        self.database_url = self.pg.socket_url("ap4k")
        sink = Process(
            "sink",
            [sys.executable, "-m", "ap4k.bench.sink", "--port", str(self.sink_port)],
            self.workdir / "sink.log",
        )
        self.processes.append(sink)
        await self.start_server(self.o.dispatchers)
        await wait_http(self.sink + "/stats", sink)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), timeout=aiohttp.ClientTimeout(total=60)
        )
        self.db = await asyncpg.connect(self.database_url)
        # The load generator's full garbage collections over what its imports and set-up
        # made would hold its loop: it would send late, in bursts (docs/performance.md,
        # "Latency tail").
        freeze_start_up_objects()

    def _start_postgres(self) -> None:
        self.pg.init()
        self.pg.start()

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self.session is not None
        return self.session

    @property
    def conn(self) -> asyncpg.Connection:
        assert self.db is not None
        return self.db

    async def start_server(self, dispatchers: int) -> Process:
        server = Process(
            "server",
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
                *(["--workers", str(self.o.workers)] if self.o.workers != 1 else []),
                "--log-level",
                "warning",
            ],
            self.workdir / "server.log",
        )
        self.processes.append(server)
        await wait_http(self.server + "/readyz", server)
        self.server_process = server
        self.server_dispatchers = dispatchers
        self.monitor.watch(server)
        return server

    async def restart_server(self, dispatchers: int) -> None:
        self.monitor.forget(self.server_process)
        self.server_process.stop()
        self.processes.remove(self.server_process)
        await self.start_server(dispatchers)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            if self.session is not None:
                await self.session.close()
            if self.db is not None:
                await self.db.close()
        for process in reversed(self.processes):
            process.stop()
        if self.pg_starting is not None:
            with contextlib.suppress(Exception):
                await self.pg_starting
            await asyncio.to_thread(self.pg.stop)
        if not self.o.keep:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------------

    async def post(self, path: str, payload: Any) -> Any:
        async with self.http.post(
            self.server + path,
            data=orjson.dumps(payload),
            headers={"Content-Type": "application/json"},
        ) as response:
            body = await response.read()
            if response.status >= 300:
                raise RuntimeError(f"{path}: {response.status} {body[:200]!r}")
            return orjson.loads(body)

    async def put_queue(self, queue: str, **settings: Any) -> None:
        async with self.http.put(f"{self.server}/v1/queues/{queue}", json=settings) as r:
            if r.status != 200:
                raise RuntimeError(f"PUT queue {queue}: {r.status} {await r.text()}")

    async def sink_stats(self, latencies: bool = False) -> dict[str, Any]:
        url = self.sink + "/stats" + ("?latencies=1" if latencies else "")
        async with self.http.get(url) as response:
            stats: dict[str, Any] = orjson.loads(await response.read())
            return stats

    async def sink_reset(self) -> None:
        async with self.http.post(self.sink + "/reset"):
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

        async with progress(f"enqueued of {count:,}", lambda: f"{count - remaining:,}"):
            await asyncio.gather(*[worker() for _ in range(concurrency)])

    async def clear(self) -> None:
        await self.conn.execute("TRUNCATE ap4k_messages")
        await self.conn.execute("VACUUM ANALYZE ap4k_messages")

    async def timed_loop(
        self, label: str, seconds: float, concurrency: int, step: Callable[[], Awaitable[int]]
    ) -> Rate:
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                n = await step()  # not `done += await step()`: that reads `done` too early
                done += n

        started = time.perf_counter()
        busy = BusyCores()
        async with progress(label, lambda: f"{done / (time.perf_counter() - started):,.0f}/s"):
            await asyncio.gather(*[worker() for _ in range(concurrency)])
        return busy.rate(done)

    # -- bounds: what the machine does right now without ap4k ------------------------------------

    async def bound(self, key: str) -> Figure:
        """A bound, measured the first time a stage needs it (then read from the cache)."""
        if key not in self.bounds:
            log(f"  bound: {key}")
            measure = {
                "insert_1": lambda: self.bare_insert(1, 16),
                "insert_100": lambda: self.bare_insert(100, 8),
                "enqueue_100": lambda: self.bare_enqueue_statement(100, 8),
                "lease": self.bare_lease_and_complete,
                "http": self.bare_http,
                "curl": self.bare_curl,
            }[key]
            self.bounds[key] = await measure()
        return self.bounds[key]

    @contextlib.asynccontextmanager
    async def raw_pool(self) -> AsyncIterator[asyncpg.Pool]:
        pool = await asyncpg.create_pool(self.pg.socket_url("raw"), min_size=16, max_size=16)
        assert pool is not None
        try:
            async with pool.acquire() as conn:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS jobs (id bigserial PRIMARY KEY, state text "
                    "NOT NULL DEFAULT 'available', payload bytea)"
                )
                await conn.execute(
                    "CREATE INDEX IF NOT EXISTS jobs_available ON jobs (id) "
                    "WHERE state = 'available'"
                )
            yield pool
        finally:
            await pool.close()

    async def bare_insert(self, rows: int, connections: int) -> Figure:
        """Bare INSERTs of `rows` rows per commit from `connections` connections."""
        payload = b'{"bench":true}'
        many = [payload] * rows
        async with self.raw_pool() as pool:

            async def insert() -> int:
                async with pool.acquire() as conn:
                    if rows == 1:
                        await conn.execute("INSERT INTO jobs (payload) VALUES ($1)", payload)
                    else:
                        await conn.execute(
                            "INSERT INTO jobs (payload) SELECT unnest($1::bytea[])", many
                        )
                return rows

            label = f"bare INSERT ×{rows}"
            rate = await self.timed_loop(label, self.o.seconds, connections, insert)
        plural = "row" if rows == 1 else "rows"
        return self.figure(
            f"bound: bare INSERT, {rows} {plural}/commit ({connections} conns)",
            rate,
            "rows/s",
            short=f"bare {rows}-row INSERTs",
        )

    async def bare_enqueue_statement(self, rows: int, connections: int) -> Figure:
        """The Inserter's own statement (`Store.enqueue_on`: for the enqueue stage's plain
        messages queries.ENQUEUE_PLAIN) with `rows` messages per commit into ap4k_messages,
        from `connections` asyncpg connections: no HTTP, no server. Beside the bare 100-row
        INSERTs it shows PostgreSQL's share of a batch enqueue: what ap4k's row costs over
        the bound's three-column one."""
        message = wire.MessageIn(self.sink + "/deliver", {"bench": True})
        message.timeout_seconds = wire.DEFAULT_TIMEOUT_SECONDS  # as validation fills it in
        row = EnqueueRow("bench-statement", message, message.url, b'{"bench":true}')
        batch = [row] * rows
        await self.put_queue("bench-statement", paused=True)
        pool = await asyncpg.create_pool(
            self.database_url, min_size=connections, max_size=connections
        )
        assert pool is not None
        try:

            async def insert() -> int:
                async with pool.acquire() as conn:
                    await Store.enqueue_on(conn, batch, 30.0)
                return rows

            label = f"enqueue statement ×{rows}"
            rate = await self.timed_loop(label, self.o.seconds, connections, insert)
        finally:
            await pool.close()
        await self.conn.execute("DELETE FROM ap4k_messages WHERE queue = 'bench-statement'")
        # PostgreSQL's share of a batch enqueue, read against the bound of the same rows.
        return versus(
            self.figure(
                f"reference: ap4k's INSERT, {rows} rows/commit ({connections} conns)",
                rate,
                "rows/s",
                "into ap4k_messages, no HTTP",
            ),
            await self.bound("insert_100"),
        )

    async def bare_lease_and_complete(self) -> Figure:
        async with self.raw_pool() as pool:

            async def lease_and_complete() -> int:
                async with pool.acquire() as conn:
                    rows = await conn.fetch(
                        "UPDATE jobs SET state = 'running' WHERE id IN (SELECT id FROM jobs "
                        "WHERE state = 'available' ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED)"
                        " RETURNING id"
                    )
                    await conn.execute(
                        "UPDATE jobs SET state = 'completed' WHERE id = ANY($1)",
                        [r["id"] for r in rows],
                    )
                return len(rows)

            rate = await self.timed_loop("bare lease", self.o.seconds, 16, lease_and_complete)
        return self.figure(
            "bound: bare lease + complete, batches of 100",
            rate,
            "msg/s",
            "over the rows the INSERT bounds left",
        )

    async def bare_http(self) -> Figure:
        """A bare aiohttp POST loop from this process to the sink: what one Python HTTP client
        does on this machine right now (docs/performance.md: 17,000-18,000/s with uvloop on an
        idle machine). The delivery figures are read against the faster of it and bare_curl."""
        url = self.sink + "/deliver"
        body = b'{"bench":true}'
        headers = {"Content-Type": "application/json"}

        async def one() -> int:
            async with self.http.post(url, data=body, headers=headers) as response:
                await response.read()
            if response.status != 200:  # a bound counts answered requests only
                raise RuntimeError(f"the sink answered {response.status}")
            return 1

        rate = await self.timed_loop("bare POSTs", self.o.seconds, 32, one)
        return self.figure(
            "bound: bare aiohttp POSTs to the sink, 1 process",
            rate,
            "req/s",
            short="bare aiohttp POSTs",
        )

    async def bare_curl(self) -> Figure:
        """The same loop with libcurl (driven from this event loop by `LoopMulti`, the glue the
        deliveries use, which costs less per request than pycurl's own AsyncCurlMulti; one
        handle per concurrent request, reused): the HTTP client the deliveries go out through,
        without any of ap4k's delivery code around it."""
        url = self.sink + "/deliver"
        body = b'{"bench":true}'
        multi = LoopMulti()
        idle: list[pycurl.Curl] = []

        def discard(_chunk: bytes) -> None:
            return None

        async def one() -> int:
            handle = idle.pop() if idle else pycurl.Curl()
            handle.setopt(pycurl.URL, url)
            handle.setopt(pycurl.POSTFIELDS, body)
            handle.setopt(pycurl.HTTPHEADER, [b"Content-Type: application/json"])
            handle.setopt(pycurl.WRITEFUNCTION, discard)
            code, message = await multi.perform(handle)
            status = handle.getinfo(pycurl.RESPONSE_CODE) if code == 0 else 0
            if status != 200:
                raise RuntimeError(f"the sink answered {status or message}")
            idle.append(handle)
            return 1

        try:
            rate = await self.timed_loop("bare libcurl POSTs", self.o.seconds, 32, one)
        finally:
            await multi.close()
            for handle in idle:
                handle.close()
        return self.figure(
            "bound: bare libcurl POSTs to the sink, 1 process",
            rate,
            "req/s",
            short="bare libcurl POSTs",
        )

    async def client_bound(self) -> Figure:
        """The faster of the two bare clients, which the delivery figures are read against."""
        aiohttp_bound, curl_bound = await self.bound("http"), await self.bound("curl")
        return max(aiohttp_bound, curl_bound, key=lambda f: f.value)

    # -- stages -------------------------------------------------------------------------------

    async def stage_raw(self) -> None:
        for key in ("insert_1", "insert_100", "enqueue_100", "lease", "http", "curl"):
            await self.bound(key)

    async def stage_enqueue(self) -> None:
        insert_1, insert_100 = await self.bound("insert_1"), await self.bound("insert_100")
        statement = await self.bound("enqueue_100")
        await self.put_queue("bench-enqueue", paused=True)
        single_message = {"target": self.sink + "/deliver", "body": {"bench": True}}
        rate = await self.enqueue_loop("single enqueue", 64, single_message, 1)
        versus(self.figure("enqueue: single-message POSTs, conc 64", rate, "msg/s"), insert_1, 0.9)
        rate = await self.enqueue_loop(
            "batch enqueue", 8, {"messages": [single_message] * 100}, 100
        )
        batches = versus(
            self.figure("enqueue: batches of 100, conc 8", rate, "msg/s"), insert_100, 0.6
        )
        if statement.ratio is not None:
            batches.note = f"its INSERT alone {statement.ratio:.2f} × bound"
        await self.clear()

    async def enqueue_loop(
        self, label: str, concurrency: int, payload: dict[str, Any], messages: int
    ) -> Rate:
        """POSTs of `payload` to the bench-enqueue queue from `concurrency` keep-alive
        connections, each waiting for its 202: messages/s. Sent with libcurl (ap4k's own
        client, `ap4k.core.curl`), which costs this process about half of aiohttp's CPU per
        request: the load generator shares the two cores with the server and PostgreSQL,
        as the bounds' asyncpg does, and should take as little of them as it can."""
        url = self.server + "/v1/queues/bench-enqueue/messages"
        body = orjson.dumps(payload)
        headers = [b"Content-Type: application/json"]
        client = CurlClient(max_connections=concurrency, keep_body_bytes=512)

        async def post() -> int:
            answer = await client.request("POST", url, headers, body, 60.0)
            if answer.status != 202:
                raise RuntimeError(f"enqueue: {answer.status} {answer.body[:200]!r}")
            return messages

        try:
            return await self.timed_loop(label, self.o.seconds, concurrency, post)
        finally:
            await client.close()

    async def drain_rate(self, queue: str, count: int, measured: int | None = None) -> Rate:
        """Release `count` queued messages at once; the rate at which the sink gets them."""
        measured = measured or count
        await self.sink_reset()
        started = time.time()
        busy = BusyCores()
        received = 0
        await self.put_queue(queue, paused=False)

        def state() -> str:
            return f"{received:,} of {measured:,} ({received / (time.time() - started):,.0f}/s)"

        async with progress("delivered", state):
            while True:
                stats = await self.sink_stats()
                received = stats["received"]
                if received >= measured:
                    break
                await asyncio.sleep(0.05)
        return busy.rate(stats["received"], stats["last_at"] - started)

    async def delivery(
        self, label: str, delivering: list[Process]
    ) -> tuple[Rate, dict[str, float]]:
        """Fill a paused queue, release it; the delivery rate and the CPU-seconds that each
        of the `delivering` processes (server, carriers) spent per 1,000 messages while
        draining, by process name."""
        await self.put_queue("bench-deliver", paused=True)
        await self.fill("bench-deliver", self.o.delivery_messages)
        cpu_before = [p.cpu_seconds() for p in delivering]
        rate = await self.drain_rate("bench-deliver", self.o.delivery_messages)
        await self.wait_idle()
        per_1000 = 1000 / self.o.delivery_messages
        cpu = {
            p.name: (p.cpu_seconds() - before) * per_1000
            for p, before in zip(delivering, cpu_before, strict=True)
        }
        await self.clear()
        return rate, cpu

    async def stage_delivery(self) -> Figure:
        client = await self.client_bound()
        rate, cpu = await self.delivery("delivery", [self.server_process])
        name = f"delivery: empty start, {self.o.dispatchers} dispatchers"
        note = f"bound: the faster bare client ({client.short.removeprefix('bare ')})"
        empty = self.figure(name, rate, "msg/s", note, short="server-only, empty start")
        versus(empty, client, 0.8)
        self.cpu_dispatchers = self.figure(
            "CPU per 1,000 delivered: server dispatchers",
            sum(cpu.values()),
            "cpu-s",
            "server process",
            short="dispatcher path",
        )
        return empty

    async def wait_idle(self) -> None:
        busy = "SELECT count(*) FROM ap4k_messages WHERE state IN ('available', 'running')"
        while await self.conn.fetchval(busy):  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(0.1)

    async def stage_latency(self) -> None:
        rate, seconds = self.o.latency_rate, self.o.latency_seconds
        warmup = 1.0
        await self.sink_reset()
        total = int(rate * (seconds + warmup))
        started = time.perf_counter()
        server_cpu = self.server_process.cpu_seconds()
        errors = 0
        sent = 0

        async def send(i: int) -> None:
            nonlocal errors, sent
            body = {"target": self.sink + "/deliver", "body": {"t": time.time(), "i": i}}
            try:
                await self.post("/v1/queues/bench-latency/messages", body)
                sent += 1
            except (RuntimeError, aiohttp.ClientError, OSError):
                errors += 1

        async def offer() -> None:
            # A task per message once it is due, not 11,000 waiting from the start: those
            # filled the generator's heap, and its full collections over them (40-200 ms of
            # CPU on a busy machine) made it send late, in bursts the server then absorbed.
            sending: set[asyncio.Task[None]] = set()
            for i in range(total):
                delay = started + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(send(i))
                sending.add(task)
                task.add_done_callback(sending.discard)
            await asyncio.gather(*sending)

        async with progress("latency", lambda: f"{sent:,} of {total:,} sent, {errors} errors"):
            await offer()
        deadline = time.monotonic() + 30
        while (await self.sink_stats())["received"] < total - errors:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        # The server's share of a core at this rate: what a busy machine must leave it.
        server_cpu = (self.server_process.cpu_seconds() - server_cpu) * 1000 / max(total, 1)
        samples = (await self.sink_stats(latencies=True))["latencies"]
        samples = samples[int(rate * warmup) :]  # drop the warm-up second
        samples.sort()
        if not samples:
            raise RuntimeError("latency: no message reached the sink")
        p50 = statistics.median(samples) * 1000
        p99 = samples[max(int(len(samples) * 0.99) - 1, 0)] * 1000
        # The tail beyond p99 says whether a miss is a few pauses or a backlog building up.
        p999 = samples[max(int(len(samples) * 0.999) - 1, 0)] * 1000
        tail = (
            f"p99.9 {p999:.1f} ms, max {samples[-1] * 1000:.1f} ms; "
            f"server {server_cpu:.2f} CPU-s per 1,000"
        )
        note = f"{errors} enqueue errors" if errors else ""
        self.figure(f"latency p50, enqueue → delivered, {rate} msg/s", p50, "ms", note)
        p99_figure = self.figure(
            f"latency p99, enqueue → delivered, {rate} msg/s", p99, "ms", tail
        )
        at_most(p99_figure, 10)
        await self.wait_idle()
        await self.clear()

    async def stage_backlog(self, empty: Figure) -> None:
        n = self.o.backlog
        await self.put_queue("bench-backlog", paused=True)
        log(f"  filling a backlog of {n:,} messages")
        started = time.perf_counter()
        await self.fill("bench-backlog", n, batch=1000, concurrency=4)
        log(f"  backlog filled in {time.perf_counter() - started:.1f}s; draining")
        rate = await self.drain_rate("bench-backlog", n, self.o.backlog_measured)
        await self.put_queue("bench-backlog", paused=True)
        name = f"delivery: with a {n:,}-message backlog"
        versus(self.figure(name, rate, "msg/s", f"first {self.o.backlog_measured:,}"), empty, 0.9)
        await self.clear()
        rss = Figure("server peak RSS through the backlog", 0.0, "MB", self.stage)
        rss.value = max(self.monitor.take_peaks().values(), default=0.0)
        self.add(at_most(rss, 150))

    def carrier(self, index: int) -> Process:
        workers = self.o.carrier_workers
        return Process(
            f"carrier-{index}",
            [
                sys.executable,
                "-m",
                "ap4k.cli",
                "carrier",
                "--server",
                self.server,
                "--concurrency",
                str(self.o.dispatchers),
                *(["--workers", str(workers)] if workers != 1 else []),
                "--metrics-port",
                str(free_port()),
                "--log-level",
                "warning",
            ],
            self.workdir / f"carrier-{index}.log",
        )

    async def stage_carriers(self, server_only: Figure) -> None:
        """Against a server without dispatchers (STAGE_DISPATCHERS)."""
        carriers: list[Process] = []
        try:
            for count in sorted(set(self.o.carriers)):
                while len(carriers) < count:
                    carrier = self.carrier(len(carriers))
                    carriers.append(carrier)
                    self.processes.append(carrier)
                    self.monitor.watch(carrier)
                await asyncio.sleep(1.0)
                rate, cpu = await self.delivery("carriers", [self.server_process, *carriers])
                name = f"delivery: 0 dispatchers, {count} carrier(s)"
                versus(self.figure(name, rate, "msg/s"), server_only, 0.9 if count == 1 else None)
                carriers_cpu = sum(v for k, v in cpu.items() if k != self.server_process.name)
                cpu_figure = self.figure(
                    f"CPU per 1,000 delivered: {count} carrier(s)",
                    sum(cpu.values()),
                    "cpu-s",
                    f"server {cpu[self.server_process.name]:.3f} + carriers {carriers_cpu:.3f}",
                )
                if self.cpu_dispatchers is not None and count == 1:
                    at_most(cpu_figure, 1.2, self.cpu_dispatchers)
                else:
                    versus(cpu_figure, self.cpu_dispatchers)
            peaks = self.monitor.take_peaks()
            rss = max((v for k, v in peaks.items() if k.startswith("carrier")), default=0.0)
            self.add(at_most(Figure("carrier peak RSS", rss, "MB", self.stage), 100))
        finally:
            for carrier in carriers:
                self.monitor.forget(carrier)
                carrier.stop()
                self.processes.remove(carrier)

    async def stage_outbox(self) -> None:
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
                self.figure(f"outbox: {label}", float(value), "rows/s")
        await self.wait_idle()
        await self.clear()

    # -- profiling ----------------------------------------------------------------------------

    async def fill_keyed(self, queue: str, keys: list[str]) -> None:
        """Enqueue one message per entry of `keys` (its flow_key), in order, in batches."""
        target = self.sink + "/deliver"
        for start in range(0, len(keys), 1000):
            batch = [
                {"target": target, "body": {"k": k}, "flow_key": k}
                for k in keys[start : start + 1000]
            ]
            await self.post(f"/v1/queues/{queue}/messages", {"messages": batch})

    async def lease_seconds(self, queue: str, flow_limits: dict[str, Any] | None) -> list[float]:
        """Times of consecutive leases of 100 (the dispatcher's batch) from `queue`, in a
        transaction rolled back after: the server, which sees the queue paused, leases none."""
        times: list[float] = []
        transaction = self.conn.transaction()
        await transaction.start()
        try:
            await self.conn.execute(
                "UPDATE ap4k_queues SET paused = false, flow_limits = $2 WHERE name = $1",
                queue,
                None if flow_limits is None else orjson.dumps(flow_limits).decode(),
            )
            for _ in range(12):
                started = time.perf_counter()
                rows = await self.conn.fetch(queries.LEASE, queue, 100, "bench", 30.0, 0, True)
                times.append(time.perf_counter() - started)
                if len(rows) != 100:
                    raise RuntimeError(f"lease from {queue}: {len(rows)} rows, not 100")
        finally:
            await transaction.rollback()
        return times

    async def stage_flow(self) -> None:
        hot, keys, each = self.o.flow_backlog, self.o.flow_keys, 3
        limits = {"max_concurrency": 1, "rate_limit_per_second": 1000}
        queue = "bench-flow"
        await self.put_queue(queue, paused=True, flow_limits=limits)
        others = [f"key-{i}" for i in range(keys)] * each
        log(f"  enqueuing {hot:,} messages of one key, then {keys:,} keys × {each}")
        await self.fill_keyed(queue, ["hot"] * hot + others)
        await self.conn.execute("VACUUM ANALYZE ap4k_messages")
        for label, setting in (("flow_limits", limits), ("no flow limits", None)):
            times = await self.lease_seconds(queue, setting)
            note = f"{hot:,} of one key ahead of {keys:,} keys × {each}"
            self.figure(f"lease of 100, {label}: first", times[0] * 1000, "ms", note)
            self.figure(
                f"lease of 100, {label}: median of next 11",
                statistics.median(times[1:]) * 1000,
                "ms",
                "the hot key saturated" if setting else "",
            )
        # Delivery: the waiting keys' messages, while the hot key delivers one at a time.
        await self.sink_reset()
        started = time.time()
        await self.put_queue(queue, paused=False)
        waiting = (
            "SELECT count(*) FROM ap4k_messages WHERE queue = $1 AND flow_key <> 'hot' "
            "AND state <> 'completed'"
        )
        left = len(others)
        async with progress("waiting keys' messages left", lambda: f"{left:,}"):
            while left:
                await asyncio.sleep(0.1)
                left = await self.conn.fetchval(waiting, queue)
        seconds = time.time() - started
        received = (await self.sink_stats())["received"]
        await self.put_queue(queue, paused=True)
        keyed = self.figure(
            f"delivery, flow_limits: {len(others):,} messages of {keys:,} waiting keys",
            len(others) / seconds,
            "msg/s",
            f"the hot key's {received - len(others):,} meanwhile",
        )
        running = "SELECT count(*) FROM ap4k_messages WHERE queue = $1 AND state = 'running'"
        while await self.conn.fetchval(running, queue):  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(0.1)
        await self.clear()
        # The same messages without flow limits.
        await self.put_queue("bench-flow-off", paused=True)
        await self.fill_keyed("bench-flow-off", ["hot"] * hot + others)
        rate = await self.drain_rate("bench-flow-off", hot + len(others))
        plain = self.figure(
            f"delivery, no flow limits: the same {hot + len(others):,} messages", rate, "msg/s"
        )
        versus(keyed, plain)
        await self.wait_idle()
        await self.clear()


    async def stage_soak(self) -> None:
        """A steady `soak_rate` of single-message POSTs for `soak_seconds`, every one
        delivered to the sink: the server's RSS sampled throughout must stay flat (a leak in
        a client library, a cache or a buffer shows here long before a pod is OOM-killed)."""
        rate, seconds = self.o.soak_rate, self.o.soak_seconds
        await self.sink_reset()
        body = {"target": self.sink + "/deliver", "body": {"soak": True}}
        sent = errors = 0
        samples: list[tuple[float, float]] = []  # (seconds since start, server RSS MB)
        pending: set[asyncio.Task[None]] = set()

        async def send() -> None:
            nonlocal sent, errors
            try:
                await self.post("/v1/queues/bench-soak/messages", body)
                sent += 1
            except (RuntimeError, aiohttp.ClientError, OSError):
                errors += 1

        def state() -> str:
            rss = f", server RSS {samples[-1][1]:.1f} MB" if samples else ""
            return f"{sent:,} sent, {errors} errors{rss}"

        started = time.perf_counter()
        next_sample = 0.0
        async with progress("soak", state):
            issued = 0
            while (elapsed := time.perf_counter() - started) < seconds:
                while issued < int(elapsed * rate):  # open loop: the schedule, not the answers
                    task = asyncio.create_task(send())
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    issued += 1
                if elapsed >= next_sample:
                    samples.append((elapsed, self.server_process.rss_bytes() / 2**20))
                    next_sample += max(seconds / 60, 0.5)
                await asyncio.sleep(0.005)
            await asyncio.gather(*pending)
        deadline = time.monotonic() + 30
        # polling another process
        while (await self.sink_stats())["received"] < sent and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        received = (await self.sink_stats())["received"]
        samples.append((time.perf_counter() - started, self.server_process.rss_bytes() / 2**20))
        # Read against the RSS once warmed up (after the first tenth: pools, caches and the
        # allocator's arenas fill first).
        warm = [rss for at, rss in samples if at >= seconds / 10] or [samples[-1][1]]
        note = f"{received:,} of {sent:,} delivered, {errors} enqueue errors, {rate}/s"
        start = self.figure("soak: server RSS once warm", warm[0], "MB", note)
        end = self.figure(f"soak: server RSS after {seconds:.0f} s", samples[-1][1], "MB")
        at_most(end, 1.1, ratio_to=start)
        self.figure("soak: server peak RSS", max(rss for _, rss in samples), "MB")
        await self.wait_idle()
        await self.clear()
    @contextlib.asynccontextmanager
    async def profiled(self, stage: str) -> AsyncIterator[None]:
        """With --profile: py-spy records the server (and its workers) through the stage, as
        collapsed stacks in the work directory (kept)."""
        if not self.o.profile:
            yield
            return
        out = self.workdir / f"profile-{stage}-server.txt"
        # py-spy writes its output when interrupted.
        spy = Process(
            "py-spy",
            [
                "py-spy",
                "record",
                "--pid",
                str(self.server_process.pid),
                "--subprocesses",
                "--format",
                "raw",
                "--output",
                str(out),
                "--rate",
                "200",
                "--nonblocking",
            ],
            self.workdir / f"profile-{stage}.log",
        )
        try:
            yield
        finally:
            spy.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(spy.proc.wait, 30)
            spy.stop()
            log(f"  profile: {out}")

    # -- the whole run ------------------------------------------------------------------------

    async def run(self, stages: tuple[str, ...]) -> Report:
        monitor: asyncio.Task[None] | None = None
        try:
            await self.start()
            monitor = asyncio.create_task(self.monitor.run())
            empty: Figure | None = None
            needs_empty = {"backlog", "carriers"}
            for stage in STAGES:
                wanted = stage in stages
                if stage == "delivery" and not wanted and needs_empty & set(stages):
                    wanted = True  # the backlog and carrier figures are read against it
                if not wanted:
                    continue
                self.stage = stage
                log(f"stage {stage}")
                self.monitor.take_peaks()
                report = StageReport(stage)
                started = time.perf_counter()
                dispatchers = STAGE_DISPATCHERS.get(stage, self.o.dispatchers)
                if dispatchers != self.server_dispatchers:
                    await self.restart_server(dispatchers)
                async with self.profiled(stage):
                    if stage == "raw":
                        await self.stage_raw()
                    elif stage == "enqueue":
                        await self.stage_enqueue()
                    elif stage == "delivery":
                        empty = await self.stage_delivery()
                    elif stage == "latency":
                        await self.stage_latency()
                    elif stage == "backlog":
                        assert empty is not None
                        self.monitor.sample()
                        await self.stage_backlog(empty)
                    elif stage == "carriers":
                        assert empty is not None
                        await self.stage_carriers(empty)
                    elif stage == "outbox":
                        await self.stage_outbox()
                    elif stage == "flow":
                        await self.stage_flow()
                    elif stage == "soak":
                        await self.stage_soak()
                report.seconds = round(time.perf_counter() - started, 1)
                report.peak_rss_mb = self.monitor.take_peaks() or report.peak_rss_mb
                report.load_average = load_average()
                self.report.stages.append(report)
        except asyncio.CancelledError:
            self.report.interrupted = True
            raise
        finally:
            if monitor is not None:
                monitor.cancel()
            self.report.load_average_end = load_average()
            await self.stop()
        return self.report


def describe_machine() -> str:
    return (
        f"{os.cpu_count()} cores, Python {platform.python_version()}, "
        f"PostgreSQL {EmbeddedPostgres.version()} (fsync on)"
    )


def _value(value: float, unit: str) -> str:
    return (
        f"{value:,.1f}"
        if unit in ("ms", "MB")
        else (f"{value:,.2f}" if unit == "cpu-s" else f"{value:,.0f}")
    )


def _note(f: Figure) -> str:
    """The figure's note, after the cores its measurement kept busy and its ceiling."""
    cpu = ""
    if f.cores_busy is not None:
        cpu = f"{f.cores_busy:.1f} of {CORES} cores busy"
        if f.ceiling is not None:
            cpu += f", ceiling {f.ceiling:.2f} × bound"
    return "; ".join(part for part in (cpu, f.note) if part)


def render(report: Report) -> str:
    o = report.options
    lines = [
        f"ap4k bench — {report.machine}; {o['workers']} server worker(s), "
        f"{o['dispatchers']} dispatchers; load generator, server, PostgreSQL and sink on this "
        "machine",
        f"load average (1, 5, 15 min): {report.load_average_start} at start, "
        f"{report.load_average_end} at end",
        "",
        f"{'figure':<50} {'value':>10} {'unit':<6}  {'bound (same run)':<36} {'ratio':>5}  "
        f"{'target':<14} {'':<6} note",
    ]
    for f in report.figures:
        bound = f"{f.bound} {_value(f.bound_value, f.unit)}" if f.bound_value else ""
        ratio = f"{f.ratio:.2f}" if f.ratio is not None else ""
        mark = {True: "met", False: "MISSED", None: ""}[f.met]
        lines.append(
            f"{f.name:<50} {_value(f.value, f.unit):>10} {f.unit:<6}  {bound:<36} {ratio:>5}  "
            f"{f.target:<14} {mark:<6} {_note(f)}".rstrip()
        )
    lines += ["", f"{'stage':<10} {'seconds':>8}  {'load avg':<20} peak RSS (MB)"]
    for s in report.stages:
        rss = ", ".join(f"{k} {v:,.0f}" for k, v in s.peak_rss_mb.items())
        lines.append(f"{s.name:<10} {s.seconds:>8,.1f}  {s.load_average[0]:<20} {rss}")
    if report.interrupted:
        lines += ["", "interrupted: the figures above are the stages that finished"]
    return "\n".join(lines)
