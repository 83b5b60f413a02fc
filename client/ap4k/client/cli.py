"""`ap4k forward` and `ap4k outbox …`: the application side on the command line.

Kept light: asyncpg, aiohttp and prometheus-client are imported by the command that runs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from ap4k.core.config import add_flag
from ap4k.core.waits import within


def register(subparsers: Any) -> None:
    forward = subparsers.add_parser(
        "forward",
        help="relay the application's outbox to the ap4k server (store-and-forward)",
        description=(
            "Relay committed rows of an application's outbox table to the ap4k server, in "
            "batches and in commit order, deleting each row once the server has accepted "
            "it. Safe to run as several replicas."
        ),
    )
    _outbox_url_flag(forward, "--outbox-url")
    add_flag(
        forward, "--server", env_name="SERVER_URL", default="http://127.0.0.1:7438",
        help="server URL, or several separated by commas (failover)",
    )
    add_flag(forward, "--api-token", env_name="API_TOKEN", default=None,
             help="bearer token for the server's /v1 API")
    add_flag(forward, "--batch-size", env_name="FORWARD_BATCH_SIZE", default=500, cast=int,
             help="rows per POST (1-1000)")
    add_flag(forward, "--concurrency", env_name="FORWARD_CONCURRENCY", default=2, cast=int,
             help="batches in flight at once")
    add_flag(forward, "--poll-interval", env_name="FORWARD_POLL_INTERVAL", default=1.0,
             cast=float, help="seconds between polls when no NOTIFY comes")
    add_flag(forward, "--max-backoff", env_name="FORWARD_MAX_BACKOFF", default=30.0, cast=float,
             help="longest wait between retries while the server is down")
    add_flag(forward, "--max-request-bytes", env_name="FORWARD_MAX_REQUEST_BYTES",
             default=512 * 1024, cast=int,
             help="split batches into POSTs of at most this size (under the server's limit)")
    add_flag(forward, "--metrics-port", env_name="METRICS_PORT", default=7440, cast=int,
             help="port of /metrics and /healthz (0: none)")
    add_flag(forward, "--metrics-host", env_name="METRICS_HOST", default="0.0.0.0",
             help="address of /metrics and /healthz")
    add_flag(forward, "--migrate", env_name="FORWARD_MIGRATE", default=True, cast=bool,
             help="create or upgrade the outbox table at start")
    add_flag(forward, "--log-level", env_name="LOG_LEVEL", default="INFO", help="log level")
    forward.set_defaults(func=run_forward)

    outbox = subparsers.add_parser(
        "outbox", help="manage the outbox table in the application's database"
    )
    actions = outbox.add_subparsers(dest="outbox_command", metavar="ACTION", required=True)
    init = actions.add_parser(
        "init", help="create or upgrade the outbox table (idempotent)",
        description="Apply the outbox's numbered migrations to the application's database.",
    )
    _outbox_url_flag(init, "--database-url", "--outbox-url")
    init.set_defaults(func=run_outbox_init)
    status = actions.add_parser("status", help="backlog and rejected rows of the outbox")
    _outbox_url_flag(status, "--database-url", "--outbox-url")
    status.set_defaults(func=run_outbox_status)
    retry = actions.add_parser(
        "retry-rejected", help="give rows the server refused another try (after a fix)"
    )
    _outbox_url_flag(retry, "--database-url", "--outbox-url")
    retry.set_defaults(func=run_outbox_retry_rejected)


def _outbox_url_flag(parser: argparse.ArgumentParser, *flags: str) -> None:
    from ap4k.core.config import env

    parser.add_argument(
        *flags,
        dest="outbox_url",
        default=env("OUTBOX_URL"),
        help="PostgreSQL URL of the APPLICATION's database holding the outbox "
        "[env AP4K_OUTBOX_URL]",
    )


def _require_url(args: argparse.Namespace) -> str | None:
    if not args.outbox_url:
        print("ap4k: the outbox database URL is required (--outbox-url or AP4K_OUTBOX_URL)",
              file=sys.stderr)
        return None
    url: str = args.outbox_url
    return url


def run_outbox_init(args: argparse.Namespace) -> int:
    url = _require_url(args)
    if url is None:
        return 2
    from ap4k.outbox import init

    applied = asyncio.run(init(url))
    if applied:
        print("outbox migrations applied: " + ", ".join(f"{v:04d}" for v in applied))
    else:
        print("outbox is up to date")
    return 0


def run_outbox_status(args: argparse.Namespace) -> int:
    url = _require_url(args)
    if url is None:
        return 2

    async def status() -> Any:
        import asyncpg

        from ap4k.outbox import sql

        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchrow(sql.STATS)
        finally:
            await conn.close()

    row = asyncio.run(status())
    print(f"backlog: {row['backlog']}  rejected: {row['rejected']}  "
          f"oldest: {row['oldest_age_seconds']:.1f}s")
    return 0


def run_outbox_retry_rejected(args: argparse.Namespace) -> int:
    url = _require_url(args)
    if url is None:
        return 2

    async def retry() -> str:
        import asyncpg

        from ap4k.outbox import sql

        conn = await asyncpg.connect(url)
        try:
            result: str = await conn.execute(sql.RETRY_REJECTED)
            await conn.execute(sql.NOTIFY)
            return result
        finally:
            await conn.close()

    print(f"rows released: {asyncio.run(retry()).split()[-1]}")
    return 0


def run_forward(args: argparse.Namespace) -> int:
    url = _require_url(args)
    if url is None:
        return 2
    logging.basicConfig(
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is not on Windows
        pass
    return asyncio.run(_forward(args, url))


async def _forward(args: argparse.Namespace, url: str) -> int:
    from aiohttp import web

    from ap4k.core import observability
    from ap4k.core.retry import RetryPolicy
    from ap4k.outbox.forwarder import DATABASE_ERRORS, Forwarder

    forwarder = Forwarder(
        url,
        args.server,
        token=args.api_token,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        poll_interval=args.poll_interval,
        max_backoff=args.max_backoff,
        migrate=args.migrate,
        max_request_bytes=args.max_request_bytes,
    )
    runner: web.AppRunner | None = None
    if args.metrics_port:
        # Ready once connected to the outbox (and its schema is in place).
        app = observability.make_app(
            ready=lambda: None if forwarder.started else "outbox not reachable yet"
        )
        runner = await observability.serve(app, args.metrics_host, args.metrics_port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log = logging.getLogger("ap4k.outbox.forwarder")
    backoff = RetryPolicy(min_backoff_seconds=0.5, max_backoff_seconds=args.max_backoff)
    failures = 0
    try:
        # The database may not be reachable yet (a pod starting before it): keep trying,
        # with /healthz up and /readyz saying 503, rather than crash-looping.
        while not stop.is_set():
            try:
                await forwarder.start()
                break
            except DATABASE_ERRORS as exc:
                failures += 1
                delay = backoff.backoff(min(failures, 20))
                log.warning("cannot open the outbox (%r); retrying in %.1fs", exc, delay)
                await within(stop.wait(), delay)
        await stop.wait()
        log.info("stopping")
    finally:
        await forwarder.stop()
        if runner is not None:
            await runner.cleanup()
    return 0
