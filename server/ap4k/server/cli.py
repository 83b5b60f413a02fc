"""`ap4k serve` and `ap4k migrate` (the commands that operate a running server are in
`ap4k.client.commands`: they need only the client)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ap4k.core.config import add_drain_flags, add_flag, add_logging_flags

if TYPE_CHECKING:
    from ap4k.server.app import ServerSettings

def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser("serve", help="run the server (embedded PostgreSQL by default)")
    add_flag(serve, "--host", env_name="HOST", default="0.0.0.0", help="address to listen on")
    add_flag(serve, "--port", env_name="PORT", default=7438, cast=int, help="port to listen on")
    add_flag(
        serve,
        "--dispatchers",
        env_name="DISPATCHERS",
        default=32,
        cast=int,
        help="concurrent deliveries by this process (0: carriers only)",
    )
    add_flag(
        serve,
        "--workers",
        env_name="WORKERS",
        default=1,
        cast=int,
        help="server processes sharing the port (SO_REUSEPORT); each has its own dispatchers",
    )
    add_flag(
        serve,
        "--database-url",
        env_name="DATABASE_URL",
        default=None,
        help="PostgreSQL URL; without one, an embedded PostgreSQL runs in --data-dir",
    )
    add_flag(
        serve,
        "--data-dir",
        env_name="DATA_DIR",
        default=None,
        help="where the embedded PostgreSQL keeps its data (default: user data dir)",
    )
    add_flag(
        serve,
        "--api-token",
        env_name="API_TOKEN",
        default=None,
        help="require 'Authorization: Bearer <token>' on /v1",
    )
    add_flag(
        serve,
        "--max-body-bytes",
        env_name="MAX_BODY_BYTES",
        default=1024 * 1024,
        cast=int,
        help="largest request body accepted (413 past it)",
    )
    add_flag(
        serve,
        "--retention-seconds",
        env_name="RETENTION_SECONDS",
        default=86400.0,
        cast=float,
        help="keep completed and cancelled messages this long",
    )
    add_drain_flags(serve)
    add_flag(
        serve,
        "--lease-seconds",
        env_name="LEASE_SECONDS",
        default=30.0,
        cast=float,
        help="how long a dispatcher's lease lasts; renewed while a delivery runs, so a "
        "crashed server's messages are delivered again after about this long",
    )
    add_flag(
        serve,
        "--pool-size",
        env_name="POOL_SIZE",
        default=8,
        cast=int,
        help="PostgreSQL connections per pool (two pools: enqueue, dispatch)",
    )
    add_flag(
        serve,
        "--header-timeout",
        env_name="HEADER_TIMEOUT",
        default=20.0,
        cast=float,
        help="seconds a connection has to send a request head (also the idle keep-alive)",
    )
    add_flag(
        serve,
        "--body-timeout",
        env_name="BODY_TIMEOUT",
        default=60.0,
        cast=float,
        help="seconds a request body has to arrive (408 past it)",
    )
    add_flag(
        serve,
        "--max-connections",
        env_name="MAX_CONNECTIONS",
        default=0,
        cast=int,
        help="API connections held at once (0: what the descriptor limit leaves room for)",
    )
    add_flag(
        serve,
        "--migrate",
        env_name="MIGRATE",
        default=True,
        cast=bool,
        help="apply schema migrations at start",
    )
    add_flag(
        serve,
        "--access-log",
        env_name="ACCESS_LOG",
        default=False,
        cast=bool,
        help="log every HTTP request the API answers (at info)",
    )
    add_logging_flags(serve)
    serve.set_defaults(func=run_serve)

    migrate = subparsers.add_parser("migrate", help="apply schema migrations")
    add_flag(
        migrate,
        "--database-url",
        env_name="DATABASE_URL",
        default=None,
        help="PostgreSQL URL; without one, the embedded PostgreSQL in --data-dir",
    )
    add_flag(
        migrate,
        "--data-dir",
        env_name="DATA_DIR",
        default=None,
        help="the embedded PostgreSQL's directory, as given to `ap4k serve`",
    )
    migrate.set_defaults(func=run_migrate)


def run_serve(args: argparse.Namespace) -> int:
    from ap4k.core import logs
    from ap4k.server.app import ServerSettings, StartupError, serve

    try:
        logs.configure(args.log_level, args.log_format, access_log=args.access_log)
    except logs.LogSettingsError as exc:
        print(f"ap4k serve: {exc}", file=sys.stderr)
        return 1
    if args.workers < 1:
        print("ap4k serve: --workers must be at least 1", file=sys.stderr)
        return 2
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        dispatchers=args.dispatchers,
        database_url=args.database_url,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        api_token=args.api_token,
        max_body_bytes=args.max_body_bytes,
        retention_seconds=args.retention_seconds,
        drain_grace_seconds=args.drain_seconds,
        shutdown_seconds=args.shutdown_seconds,
        lease_seconds=args.lease_seconds,
        migrate=args.migrate,
        pool_size=args.pool_size,
        reuse_port=args.workers > 1,
        access_log=args.access_log,
        header_timeout_seconds=args.header_timeout,
        body_timeout_seconds=args.body_timeout,
        max_connections=args.max_connections or None,
    )
    try:
        if args.workers == 1:
            logs.run_async(serve(settings))
            return 0
        return _serve_workers(args, settings)
    except StartupError as exc:
        print(f"ap4k serve: {exc}", file=sys.stderr)
        return 1


def _serve_workers(args: argparse.Namespace, settings: ServerSettings) -> int:
    """`--workers N`: N server processes on one port, under a supervisor."""
    from ap4k.core.workers import supervise
    from ap4k.server.app import serve_worker, start_embedded

    # One embedded PostgreSQL for all the workers, started and stopped by the supervisor.
    embedded = None if settings.database_url else start_embedded(settings.data_dir)
    if embedded is not None:
        settings.database_url = embedded.socket_url()
    try:
        return supervise(
            args.workers,
            serve_worker,
            settings,
            args.log_level,
            args.log_format,
            name="ap4k-serve",
            grace_seconds=settings.shutdown_seconds,  # the whole drain fits in it
        )
    finally:
        if embedded is not None:
            embedded.stop()


def run_migrate(args: argparse.Namespace) -> int:
    """Apply migrations to --database-url, or to the embedded PostgreSQL of --data-dir: the
    running server's cluster when one holds it, else the cluster started for the occasion."""
    from ap4k.core.embedded_pg import DataDirInUse, LocalCluster, default_data_dir
    from ap4k.server.app import StartupError, connect_store

    async def apply(dsn: str) -> list[int]:
        store = await connect_store(dsn, 1)
        try:
            return await store.migrate()
        finally:
            await store.close()

    try:
        if args.database_url:
            applied = asyncio.run(apply(args.database_url))
        else:
            local = LocalCluster(Path(args.data_dir) if args.data_dir else default_data_dir())
            if local.owned_by_another():
                applied = asyncio.run(apply(local.open().socket_url()))
            elif not (local.data_dir / "postgres" / "PG_VERSION").exists():
                print(
                    f"ap4k migrate: no embedded PostgreSQL in {local.data_dir} "
                    "(give --database-url, or the --data-dir of `ap4k serve`)",
                    file=sys.stderr,
                )
                return 2
            else:
                cluster = local.start()
                try:
                    applied = asyncio.run(apply(cluster.socket_url()))
                finally:
                    local.stop()
    except (StartupError, DataDirInUse) as exc:
        print(f"ap4k migrate: {exc}", file=sys.stderr)
        return 1
    print(f"applied {len(applied)} migration(s)" + (f": {applied}" if applied else ""))
    return 0
