"""`ap4k serve`, `ap4k migrate` and the operator's shell commands (send, queues, dead, redrive)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ap4k.core.config import add_flag, add_logging_flags

if TYPE_CHECKING:
    from ap4k.server.app import ServerSettings

DEFAULT_SERVER = "http://127.0.0.1:7438"


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
    add_flag(
        serve,
        "--drain-seconds",
        env_name="DRAIN_SECONDS",
        default=10.0,
        cast=float,
        help="on SIGTERM, how long in-flight deliveries may take to finish",
    )
    add_flag(
        serve,
        "--lease-seconds",
        env_name="LEASE_SECONDS",
        default=30.0,
        cast=float,
        help="how long a dispatcher's lease lasts (at least the message timeout + 1 s)",
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

    send = subparsers.add_parser("send", help="enqueue one message")
    send.add_argument("queue")
    send.add_argument("target")
    send.add_argument("--json", dest="body", default=None, help="JSON body")
    send.add_argument("--delay", type=float, default=None, help="delay in seconds")
    send.add_argument("--dedup-key", default=None)
    send.add_argument("--method", default=None)
    _server_flags(send)
    send.set_defaults(func=run_send)

    queues = subparsers.add_parser("queues", help="list queues with depth and settings")
    _server_flags(queues)
    queues.set_defaults(func=run_queues)

    queue = subparsers.add_parser("queue", help="change a queue")
    queue_actions = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    queue_set = queue_actions.add_parser(
        "set", help="change a queue's settings (signing secrets: one rotation step at a time)"
    )
    queue_set.add_argument("queue")
    rotation = queue_set.add_mutually_exclusive_group(required=True)
    rotation.add_argument(
        "--new-signing-secret",
        action="store_true",
        help="generate a Standard Webhooks secret, add it and print it (shown only this once)",
    )
    rotation.add_argument(
        "--drop-old-signing-secret",
        action="store_true",
        help="drop the oldest signing secret, once receivers verify with the newer one",
    )
    _server_flags(queue_set)
    queue_set.set_defaults(func=run_queue_set)

    dead = subparsers.add_parser("dead", help="list a queue's dead letters")
    dead.add_argument("queue")
    dead.add_argument("--limit", type=int, default=100)
    _server_flags(dead)
    dead.set_defaults(func=run_dead)

    redrive = subparsers.add_parser("redrive", help="send a queue's dead letters again")
    redrive.add_argument("queue")
    _server_flags(redrive)
    redrive.set_defaults(func=run_redrive)


def _server_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--server", env_name="SERVER_URL", default=DEFAULT_SERVER, help="server URL")
    add_flag(parser, "--api-token", env_name="API_TOKEN", default=None, help="bearer token")




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
        lease_seconds=args.lease_seconds,
        migrate=args.migrate,
        pool_size=args.pool_size,
        reuse_port=args.workers > 1,
        access_log=args.access_log,
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
            grace_seconds=settings.drain_grace_seconds,
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


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> int:
    import aiohttp

    async def main() -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {args.api_token}"} if args.api_token else {}
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method,
                args.server.rstrip("/") + path,
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=30),
            ) as response,
        ):
            return response.status, await response.json(content_type=None)

    try:
        status, data = asyncio.run(main())
    except OSError as exc:
        print(f"ap4k: cannot reach {args.server}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2))
    return 0 if status < 400 else 1


def run_send(args: argparse.Namespace) -> int:
    message: dict[str, Any] = {"target": args.target}
    if args.body is not None:
        try:
            message["body"] = json.loads(args.body)
        except json.JSONDecodeError as exc:
            print(f"ap4k send: --json is not valid JSON: {exc}", file=sys.stderr)
            return 2
    if args.delay is not None:
        message["delay_seconds"] = args.delay
    if args.dedup_key:
        message["dedup_key"] = args.dedup_key
    if args.method:
        message["method"] = args.method
    return _call(args, "POST", f"/v1/queues/{args.queue}/messages", message)


def run_queues(args: argparse.Namespace) -> int:
    return _call(args, "GET", "/v1/queues")


def run_queue_set(args: argparse.Namespace) -> int:
    if args.new_signing_secret:
        return _call(args, "POST", f"/v1/queues/{args.queue}/signing-secrets")
    return _call(args, "DELETE", f"/v1/queues/{args.queue}/signing-secrets/oldest")


def run_dead(args: argparse.Namespace) -> int:
    return _call(args, "GET", f"/v1/queues/{args.queue}/dead?limit={args.limit}")


def run_redrive(args: argparse.Namespace) -> int:
    return _call(args, "POST", f"/v1/queues/{args.queue}/dead/redrive")
