"""The `ap4k` console script: one entry point for every component.

Each component owns its sub-commands in a light `cli` module exposing `register(subparsers)`;
heavy imports (aiohttp, asyncpg, kopf) happen only inside the command that runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# (module, …): each module has `register(subparsers) -> None`, and every parser it adds sets
# `func=<callable(args) -> int>` as a default.
COMMAND_MODULES = (
    "ap4k.server.cli",
    "ap4k.carrier.cli",
    "ap4k.operator.cli",
    "ap4k.client.cli",
    "ap4k.bench.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ap4k",
        description="Asynchronous processing for Kubernetes: messages in, HTTP deliveries out.",
    )
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
