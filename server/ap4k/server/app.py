"""Assembling and running the server: database, services, HTTP API and dispatchers."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from aiohttp import web
from yarl import URL

from ap4k.core.embedded_pg import DataDirInUse, LocalCluster, default_data_dir
from ap4k.core.workers import freeze_start_up_objects
from ap4k.server import api_schedules_topics, metrics
from ap4k.server.api import (
    BODY_TIMEOUT_SECONDS,
    SERVICES,
    Services,
    add_routes,
    auth_middleware,
    direct_enqueue,
    errors_middleware,
)
from ap4k.server.connections import ConnectionLimit, default_connection_limit, protocol_factory
from ap4k.server.console import add_console_routes
from ap4k.server.dispatcher import DispatcherPool
from ap4k.server.inserter import Inserter
from ap4k.server.leaser import Leaser
from ap4k.server.maintenance import Maintenance
from ap4k.server.outcomes import OutcomeRecorder
from ap4k.server.queues import QueueDirectory
from ap4k.server.schedules import Scheduler
from ap4k.server.store import EnqueueRow, Store
from ap4k.server.wakeups import Wakeups

log = logging.getLogger("ap4k.server")

# Of the shutdown budget, what closing the database connections and the rest may take.
CLOSE_RESERVE_SECONDS = 1.0
# How often the event loop's lag is sampled (ap4k_event_loop_lag_seconds).
LOOP_LAG_SAMPLE_SECONDS = 0.25


@dataclass
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 7438
    dispatchers: int = 32
    database_url: str | None = None
    data_dir: Path | None = None
    api_token: str | None = None
    max_body_bytes: int = 1024 * 1024
    retention_seconds: float = 86400.0
    drain_grace_seconds: float = 10.0
    # SIGTERM to exit, all of it: within Kubernetes' terminationGracePeriodSeconds (30 s by
    # default), with room to spare.
    shutdown_seconds: float = 20.0
    lease_seconds: float = 30.0
    migrate: bool = True
    prune_interval_seconds: float = 60.0
    gauges_interval_seconds: float = 5.0
    schedule_interval_seconds: float = 1.0
    pool_size: int = 8
    # With `--workers N`, every worker listens on the port (SO_REUSEPORT).
    reuse_port: bool = False
    access_log: bool = False
    # A connection must send a whole request head this long after opening or after its
    # previous response (also the idle keep-alive limit). Longer than aiohttp clients'
    # 15 s keep-alive, so that a client never reuses a connection the server is closing.
    header_timeout_seconds: float = 20.0
    body_timeout_seconds: float = 60.0  # to read a request body, once its head is in
    # API connections held at once; None: as many as the descriptor limit leaves room for.
    max_connections: int | None = None
    # Record the acks that carriers' lease requests carry, and say so in the answers. Off
    # only to stand in for an older server (the rolling-upgrade tests).
    acks_on_lease: bool = True


class StartupError(RuntimeError):
    """The server cannot start for a reason the user can fix: said in one line."""


def _where(dsn: str) -> str:
    """The database's host, port and name for a message: never its password."""
    try:
        url = URL(dsn)
    except ValueError:
        return "the given database URL"
    host = url.query.get("host") or url.host or "localhost"
    return f"{host}:{url.port or 5432}{url.path}"


async def connect_store(dsn: str, pool_size: int) -> Store:
    """The store, or a StartupError saying why not (bad URL, unreachable, refused)."""
    try:
        return await Store.connect(dsn, min_size=min(2, pool_size), max_size=pool_size)
    except (ValueError, asyncpg.ClientConfigurationError) as exc:
        raise StartupError(f"bad database URL: {exc}") from None
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = str(exc) or type(exc).__name__
        raise StartupError(f"cannot connect to the database at {_where(dsn)}: {reason}") from None


class Server:
    """One server process. `start()` brings it up; `stop()` drains and shuts it down."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.embedded: LocalCluster | None = None
        self.store: Store | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._background: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Bring everything up, or (StartupError and any other failure) stop what had
        started and raise."""
        try:
            await self._start()
        except BaseException:
            await self._abort()
            raise

    async def _abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._runner is not None:
                await self._runner.cleanup()
            if self.store is not None:
                await self.store.close()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)

    async def _start(self) -> None:
        s = self.settings
        dsn = s.database_url
        if not dsn:
            dsn = await asyncio.to_thread(self._start_embedded)
        self.store = store = await connect_store(dsn, s.pool_size)
        if s.migrate:
            await store.migrate()
        self.wakeups = wakeups = Wakeups()
        self.directory = directory = QueueDirectory(store)
        self.scheduler = Scheduler(
            store, directory, self._on_committed, interval=s.schedule_interval_seconds
        )
        self.maintenance = Maintenance(
            store,
            wakeups,
            retention_seconds=s.retention_seconds,
            prune_interval=s.prune_interval_seconds,
            gauges_interval=s.gauges_interval_seconds,
            schedules=self.scheduler,
        )
        self.recorder = OutcomeRecorder(
            store, wakeups, self.maintenance.poke_scheduler, directory=directory
        )
        self.leaser = Leaser(store, directory, self.recorder)
        self.dispatchers = DispatcherPool(
            store,
            directory,
            wakeups,
            self.recorder,
            self.leaser,
            s.dispatchers,
            lease_seconds=s.lease_seconds,
            drain_grace_seconds=s.drain_grace_seconds,
        )
        self.services = Services(
            store=store,
            directory=directory,
            inserter=Inserter(store, self._on_committed, lease_seconds=s.lease_seconds),
            dispatchers=self.dispatchers,
            recorder=self.recorder,
            wakeups=wakeups,
            leaser=self.leaser,
            api_token=s.api_token,
            acks_on_lease=s.acks_on_lease,
        )
        app = web.Application(
            client_max_size=s.max_body_bytes,
            # No token, no auth middleware: each layer costs every request a few µs.
            middlewares=[errors_middleware]
            + ([auth_middleware(s.api_token)] if s.api_token else []),
        )
        app[SERVICES] = self.services
        app[BODY_TIMEOUT_SECONDS] = s.body_timeout_seconds
        add_routes(app)
        add_console_routes(app)
        api_schedules_topics.add_routes(app)
        self._runner = web.AppRunner(
            app,
            access_log=logging.getLogger("aiohttp.access") if s.access_log else None,
            handle_signals=False,
            shutdown_timeout=self._http_grace(),
        )
        await self._runner.setup()
        assert self._runner.server is not None
        http = self._runner.server
        http.request_handler = direct_enqueue(app, http.request_handler)
        limit = s.max_connections or default_connection_limit(
            2 * s.pool_size + s.dispatchers
        )
        self.connections = ConnectionLimit(limit)
        # Our own listener rather than web.TCPSite: each connection gets the API's protocol
        # (JSON errors from the parser, the head deadline, the connection limit).
        protocol = protocol_factory(
            http,
            self.connections,
            s.header_timeout_seconds,
            logging.getLogger("aiohttp.access") if s.access_log else None,
        )
        try:
            self._listener = await asyncio.get_running_loop().create_server(
                protocol,
                s.host,
                s.port,
                backlog=2048,
                reuse_address=True,
                reuse_port=s.reuse_port or None,
            )
        except OSError as exc:
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise StartupError(f"cannot listen on {s.host}:{s.port}: {reason}") from None
        loop = asyncio.get_running_loop()
        self._background = [
            loop.create_task(wakeups.run_notifier(store), name="ap4k-notifier"),
            loop.create_task(
                wakeups.run_listener(dsn, self._on_settings_changed), name="ap4k-listener"
            ),
            loop.create_task(sample_loop_lag(LOOP_LAG_SAMPLE_SECONDS), name="ap4k-loop-lag"),
        ]
        self.maintenance.start()
        self.dispatchers.start()
        log.info(
            "ap4k server listening on %s:%d with %d dispatchers", s.host, s.port, s.dispatchers
        )

    def _start_embedded(self) -> str:
        self.embedded = start_embedded(self.settings.data_dir)
        # This process is on the same machine: talk over the Unix socket, not loopback TCP.
        return self.embedded.socket_url()

    def _on_committed(
        self, rows: Sequence[EnqueueRow], results: list[tuple[int, str, bool]]
    ) -> None:
        counts: Counter[str] = Counter()
        available: set[str] = set()
        prioritised: set[str] = set()
        scheduled = False
        for row, (_, state, duplicate) in zip(rows, results, strict=True):
            if duplicate:
                continue
            counts[row.queue] += 1
            if state == "available":
                available.add(row.queue)
                if row.message.priority > 0:
                    prioritised.add(row.queue)
            elif state == "scheduled":
                scheduled = True
        for queue, n in counts.items():
            metrics.MESSAGES_ENQUEUED.labels(queue).inc(n)
        for queue in prioritised:
            self.leaser.forget(queue)
        self.wakeups.announce(available)
        if scheduled:
            self.maintenance.poke_scheduler()

    def _on_settings_changed(self, queue: str) -> None:
        self.directory.invalidate(queue or None)
        self.wakeups.hint([queue] if queue else [])

    def _http_grace(self) -> float:
        """How long open requests (carriers' long polls) may take at shutdown."""
        return min(5.0, self.settings.shutdown_seconds / 4)

    async def stop(self) -> None:
        """Drain and shut down within `shutdown_seconds`: the dispatchers first (their
        in-flight deliveries get the drain grace, within the budget less what the HTTP
        server and the database need after them), then open requests, then the rest."""
        deadline = time.monotonic() + self.settings.shutdown_seconds
        self.services.ready = False
        await self.dispatchers.stop(deadline - self._http_grace() - CLOSE_RESERVE_SECONDS)
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
        # Requests cancelled by the cleanup may still have INSERTs committing, of rows handed
        # to our dispatchers, which have stopped: give those back now, not at lease expiry.
        await self.services.inserter.drain()
        await self.dispatchers.release_late()
        await self.maintenance.stop()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.store is not None:
            try:
                await asyncio.wait_for(self.store.close(), max(deadline - time.monotonic(), 0.5))
            except TimeoutError:
                log.warning("database connections not closed within the shutdown budget")
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)


async def sample_loop_lag(interval: float) -> None:
    """Observe how much later than asked the event loop wakes a sleeper, every `interval`:
    whatever holds the loop (a long callback, a garbage collection, a process short of CPU)
    delays every request and delivery by as much. On a shared 2-core machine this lag was
    what the latency tail was made of (docs/performance.md, "Latency tail")."""
    while True:
        asked = time.perf_counter() + interval
        await asyncio.sleep(interval)
        metrics.EVENT_LOOP_LAG.observe(max(time.perf_counter() - asked, 0.0))


def start_embedded(data_dir: Path | None) -> LocalCluster:
    """The embedded PostgreSQL of `data_dir` (default: the user data dir), locked for this
    process and running; a StartupError when another server holds it or it does not start."""
    local = LocalCluster(data_dir or default_data_dir())
    try:
        cluster = local.start()
    except DataDirInUse as exc:
        raise StartupError(str(exc)) from None
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise StartupError(
            f"the embedded PostgreSQL in {local.data_dir} did not start ({exc}); "
            f"its log: {local.data_dir / 'postgres' / 'postgresql.log'}"
        ) from None
    log.info("embedded PostgreSQL in %s at %s", cluster.data_dir, cluster.url)
    return local


def serve_worker(settings: ServerSettings, log_level: str, log_format: str, index: int) -> None:
    """One worker of `ap4k serve --workers N` (in its own process)."""
    from ap4k.core import logs

    logs.configure(log_level, log_format, access_log=settings.access_log)
    logs.run_async(serve(settings))


async def serve(settings: ServerSettings) -> None:
    server = Server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    freeze_start_up_objects()
    try:
        await stop.wait()
        log.info("draining")
    finally:
        with contextlib.suppress(Exception):
            await server.stop()
    log.info("stopped")
