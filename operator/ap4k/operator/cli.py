"""`ap4k operator`: the kopf operator for AsyncQueues, run in-process.

Light on purpose: kopf and the handlers are imported only when the command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from ap4k.core.config import add_flag, env


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "operator",
        help="run the Kubernetes operator for AsyncQueue resources",
        description=(
            "Watch AsyncQueue resources and run a queue service for each: server Deployment "
            "and Service, carrier Deployment scaled from queue depth, queue settings."
        ),
    )
    # Repeatable, so not through add_flag; AP4K_NAMESPACES applies when no flag is given.
    parser.add_argument(
        "--namespace", "-n", dest="namespace", action="append", metavar="NAME",
        help="namespace to watch; repeat the flag or give a comma list "
             "[env AP4K_NAMESPACES, comma list]",
    )
    add_flag(parser, "--all-namespaces", env_name="ALL_NAMESPACES", default=False, cast=bool,
             help="watch AsyncQueues in every namespace (needs cluster-wide RBAC)")
    add_flag(parser, "--metrics-port", env_name="METRICS_PORT", default=8080, cast=int,
             help="port of the operator's /metrics and /healthz (0: off)")
    add_flag(parser, "--image", env_name="OPERATOR_IMAGE", default=None,
             help="image of servers and carriers when an AsyncQueue sets none "
                  "(default: the operator's own image)")
    add_flag(parser, "--log-level", env_name="LOG_LEVEL", default="info",
             help="debug, info, warning or error")
    add_flag(parser, "--log-format", env_name="LOG_FORMAT", default="text",
             help="text or json (JSON lines, for log collectors)")
    parser.set_defaults(func=run)


def watched_namespaces(args: argparse.Namespace) -> list[str]:
    raw = args.namespace if args.namespace else [env("NAMESPACES", "")]
    names = [part.strip() for item in raw for part in item.split(",") if part.strip()]
    return list(dict.fromkeys(names))


def run(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses
    import logging

    import kopf

    from ap4k.operator import config

    namespaces = watched_namespaces(args)
    if not namespaces and not args.all_namespaces:
        raise SystemExit("ap4k operator: give --namespace NAME (repeatable) or --all-namespaces")
    if namespaces and args.all_namespaces:
        raise SystemExit("ap4k operator: --namespace and --all-namespaces exclude each other")
    if args.log_format not in ("text", "json"):
        raise SystemExit(f"ap4k operator: --log-format is text or json, not {args.log_format!r}")

    settings = config.OperatorConfig.from_env()
    settings = dataclasses.replace(
        settings, metrics_port=args.metrics_port, image=args.image or settings.image
    )
    config.configure(settings)

    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    kopf.configure(
        verbose=level <= logging.DEBUG,
        quiet=level >= logging.WARNING,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
    )
    logging.getLogger().setLevel(level)
    from ap4k.operator import logfilter

    logfilter.install()

    import ap4k.operator.handlers  # noqa: F401  (registers the handlers with kopf)

    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=bool(args.all_namespaces),
            namespaces=namespaces,
        )
    )
    return 0
