"""Flags with `AP4K_*` environment defaults, shared by every component's command line."""

from __future__ import annotations

import argparse
import os
from typing import Any


def env(name: str, default: Any = None, cast: type = str) -> Any:
    """The value of `AP4K_<name>` cast to `cast`, or `default` when unset or empty."""
    raw = os.environ.get(f"AP4K_{name}")
    if raw is None or raw == "":
        return default
    if cast is bool:
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    return cast(raw)


def add_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    env_name: str,
    default: Any = None,
    cast: type = str,
    help: str,
) -> None:
    """Add `--flag` whose default comes from `AP4K_<env_name>`, then from `default`."""
    value = env(env_name, default, cast)
    if cast is bool:
        parser.add_argument(
            flag,
            action=argparse.BooleanOptionalAction,
            default=value,
            help=f"{help} [env AP4K_{env_name}]",
        )
    else:
        parser.add_argument(
            flag,
            type=cast,
            default=value,
            help=f"{help} [env AP4K_{env_name}; default {default!r}]",
        )


def add_drain_flags(parser: argparse.ArgumentParser) -> None:
    """How a server or carrier drains on SIGTERM (both run `ap4k.core.pool`)."""
    add_flag(
        parser,
        "--drain-seconds",
        env_name="DRAIN_SECONDS",
        default=10.0,
        cast=float,
        help="on SIGTERM, how long in-flight deliveries may take to finish (within "
        "--shutdown-seconds)",
    )
    add_flag(
        parser,
        "--shutdown-seconds",
        env_name="SHUTDOWN_SECONDS",
        default=20.0,
        cast=float,
        help="on SIGTERM, the whole drain's budget, to exit within: keep it under the pod's "
        "terminationGracePeriodSeconds (30 s by default)",
    )


def add_logging_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--log-level", env_name="LOG_LEVEL", default="info", help="log level")
    add_flag(parser, "--log-format", env_name="LOG_FORMAT", default="text", help="text or json")
