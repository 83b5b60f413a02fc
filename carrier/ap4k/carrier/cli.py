"""`ap4k carrier --server URL[,URL…]`: a delivery worker that scales out over leases."""

from __future__ import annotations

import argparse
import sys

from ap4k.core.config import add_drain_flags, add_flag, add_logging_flags


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    carrier = subparsers.add_parser("carrier", help="run a carrier (a delivery worker)")
    add_flag(
        carrier,
        "--server",
        env_name="SERVER_URL",
        default="http://127.0.0.1:7438",
        help="server URL(s), comma-separated; any replica takes any call",
    )
    add_flag(
        carrier,
        "--concurrency",
        env_name="CARRIER_CONCURRENCY",
        default=32,
        cast=int,
        help="concurrent deliveries",
    )
    add_flag(
        carrier,
        "--workers",
        env_name="WORKERS",
        default=1,
        cast=int,
        help="carrier processes (each with --concurrency deliveries; /metrics on a shared port)",
    )
    add_flag(
        carrier,
        "--lease-seconds",
        env_name="LEASE_SECONDS",
        default=60.0,
        cast=float,
        help="lease duration (extended by heartbeats for slow deliveries)",
    )
    add_flag(
        carrier,
        "--queues",
        env_name="QUEUES",
        default="",
        help="only these queues (comma-separated); default: all",
    )
    add_flag(carrier, "--api-token", env_name="API_TOKEN", default=None, help="bearer token")
    add_flag(
        carrier,
        "--metrics-port",
        env_name="METRICS_PORT",
        default=7439,
        cast=int,
        help="port of /metrics and /healthz (0: off)",
    )
    add_drain_flags(carrier)
    add_flag(
        carrier,
        "--id",
        env_name="CARRIER_ID",
        default="",
        help="this carrier's id (default: host-pid-random)",
    )
    add_logging_flags(carrier)
    carrier.set_defaults(func=run_carrier)


def run_carrier(args: argparse.Namespace) -> int:
    from ap4k.core import logs

    try:
        logs.configure(args.log_level, args.log_format)
    except logs.LogSettingsError as exc:
        print(f"ap4k carrier: {exc}", file=sys.stderr)
        return 1
    if args.workers < 1:
        print("ap4k carrier: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers == 1:
        carrier_worker(args, 0)
        return 0
    from ap4k.core.workers import supervise

    return supervise(
        args.workers,
        carrier_worker,
        args,
        name="ap4k-carrier",
        grace_seconds=args.shutdown_seconds,  # the whole drain fits in it
    )


def carrier_worker(args: argparse.Namespace, index: int) -> None:
    """One carrier process; with `--workers N`, worker `index` of N (its own carrier id)."""
    from ap4k.carrier.carrier import CarrierSettings
    from ap4k.carrier.main import run
    from ap4k.core import logs

    if args.workers > 1:
        logs.configure(args.log_level, args.log_format)
    carrier_id = f"{args.id}-{index}" if args.id and args.workers > 1 else args.id
    settings = CarrierSettings(
        servers=[s.strip() for s in args.server.split(",") if s.strip()],
        concurrency=args.concurrency,
        lease_seconds=args.lease_seconds,
        queues=[q.strip() for q in args.queues.split(",") if q.strip()],
        api_token=args.api_token,
        carrier_id=carrier_id,
        drain_grace_seconds=args.drain_seconds,
        shutdown_seconds=args.shutdown_seconds,
    )
    logs.run_async(run(settings, args.metrics_port, reuse_port=args.workers > 1))
