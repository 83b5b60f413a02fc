"""Assembling and running the server: database, services, HTTP API and dispatchers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from ap4k.core.embedded_pg import EmbeddedPostgres
from ap4k.server import metrics
from ap4k.server.api import (
    MAX_BODY_BYTES,
    SERVICES,
    Services,
    add_routes,
    auth_middleware,
    errors_middleware,
)
from ap4k.server.dispatcher import DispatcherPool
from ap4k.server.inserter import Inserter
from ap4k.server.leaser import Leaser
from ap4k.server.maintenance import Maintenance
from ap4k.server.outcomes import OutcomeRecorder
from ap4k.server.queues import QueueDirectory
from ap4k.server.store import EnqueueRow, Store
from ap4k.server.wakeups import Wakeups

log = logging.getLogger("ap4k.server")

# Of the shutdown budget, what closing the database connections and the rest may take.
CLOSE_RESERVE_SECONDS = 1.0


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
    pool_size: int = 8
    # With `--workers N`, every worker listens on the port (SO_REUSEPORT).
    reuse_port: bool = False


class Server:
    """One server process. `start()` brings it up; `stop()` drains and shuts it down."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.embedded: EmbeddedPostgres | None = None
        self._runner: web.AppRunner | None = None
        self._background: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        s = self.settings
        dsn = s.database_url
        if not dsn:
            dsn = await asyncio.to_thread(self._start_embedded)
        self.store = store = await Store.connect(dsn, max_size=s.pool_size)
        if s.migrate:
            await store.migrate()
        self.wakeups = wakeups = Wakeups()
        self.directory = directory = QueueDirectory(store)
        self.maintenance = Maintenance(
            store,
            wakeups,
            retention_seconds=s.retention_seconds,
            prune_interval=s.prune_interval_seconds,
            gauges_interval=s.gauges_interval_seconds,
        )
        self.recorder = OutcomeRecorder(store, wakeups, self.maintenance.poke_scheduler)
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
        )
        app = web.Application(
            client_max_size=s.max_body_bytes,
            # No token, no auth middleware: each layer costs every request a few µs.
            middlewares=[errors_middleware]
            + ([auth_middleware(s.api_token)] if s.api_token else []),
        )
        app[SERVICES] = self.services
        app[MAX_BODY_BYTES] = s.max_body_bytes
        add_routes(app)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=self._http_grace()
        )
        await self._runner.setup()
        await web.TCPSite(
            self._runner, s.host, s.port, backlog=2048, reuse_port=s.reuse_port or None
        ).start()
        loop = asyncio.get_running_loop()
        self._background = [
            loop.create_task(wakeups.run_notifier(store), name="ap4k-notifier"),
            loop.create_task(
                wakeups.run_listener(dsn, self._on_settings_changed), name="ap4k-listener"
            ),
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
        if self._runner is not None:
            await self._runner.cleanup()
        await self.maintenance.stop()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        try:
            await asyncio.wait_for(self.store.close(), max(deadline - time.monotonic(), 0.5))
        except TimeoutError:
            log.warning("database connections not closed within the shutdown budget")
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)


def start_embedded(data_dir: Path | None) -> EmbeddedPostgres:
    """The embedded PostgreSQL of `data_dir` (default: the user data dir), running."""
    from platformdirs import user_data_dir

    data_dir = data_dir or Path(user_data_dir("ap4k"))
    embedded = EmbeddedPostgres(data_dir / "postgres", port=_stable_port(data_dir))
    embedded.init()
    if not embedded.running():
        embedded.start()
    log.info("embedded PostgreSQL in %s at %s", embedded.data_dir, embedded.url)
    return embedded


def _stable_port(data_dir: Path) -> int:
    """The embedded cluster keeps its port across restarts (recorded beside its data)."""
    from ap4k.core.embedded_pg import free_port

    record = data_dir / "postgres.port"
    data_dir.mkdir(parents=True, exist_ok=True)
    if record.exists():
        return int(record.read_text().strip())
    port = free_port()
    record.write_text(str(port))
    return port


def serve_worker(settings: ServerSettings, log_level: str, log_format: str, index: int) -> None:
    """One worker of `ap4k serve --workers N` (in its own process)."""
    from ap4k.core import logs

    logs.configure(log_level, log_format)
    logs.run_async(serve(settings))


async def serve(settings: ServerSettings) -> None:
    server = Server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        await stop.wait()
        log.info("draining")
    finally:
        with contextlib.suppress(Exception):
            await server.stop()
    log.info("stopped")
