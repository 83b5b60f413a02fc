"""`ap4k schedules list|set|delete`: recurring schedules from a shell, through `AsyncClient`
(so they need only `pip install ap4k`). A table by default, the API's JSON with `--json`;
a refusal is one line on stderr with exit code 1 (2 for a bad command line)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from ap4k.client.commands import output_flags

# A shell command tries a few times (a server restarting), not for as long as an application.
CLI_ATTEMPTS = 3


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    schedules = subparsers.add_parser("schedules", help="list, set or delete recurring schedules")
    actions = schedules.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="every schedule with its next fire time")
    output_flags(listing)
    listing.set_defaults(func=run_list)

    put = actions.add_parser("set", help="create or replace a schedule")
    put.add_argument("name")
    put.add_argument("--queue", required=True, help="the queue its messages go to")
    put.add_argument("--cron", required=True, help="5-field cron, e.g. '*/5 * * * *'")
    put.add_argument("--timezone", default="UTC", help="IANA time zone (default UTC)")
    put.add_argument("--target", required=True, help="the message's target URL or path")
    put.add_argument("--body", default=None, help="the message's JSON body")
    put.add_argument("--method", default=None)
    put.add_argument("--paused", action="store_true", help="save it paused")
    output_flags(put)
    put.set_defaults(func=run_set)

    delete = actions.add_parser("delete", help="delete a schedule")
    delete.add_argument("name")
    output_flags(delete)
    delete.set_defaults(func=run_delete)


def _run(args: argparse.Namespace, work: Callable[[Any], Awaitable[Any]]) -> int:
    """Run `work(client)`; print its result as JSON (--json) or as `args.show` renders it."""
    from ap4k.client.async_client import AsyncClient
    from ap4k.client.errors import ApiError, ServerUnavailable
    from ap4k.core.retry import RetryPolicy

    async def main() -> Any:
        async with AsyncClient(
            args.server,
            token=args.api_token,
            retry=RetryPolicy(attempts=CLI_ATTEMPTS),
            user_agent="ap4k-cli",
        ) as client:
            return await work(client)

    try:
        result = asyncio.run(main())
    except ApiError as exc:
        print(f"ap4k schedules {args.action}: {exc}", file=sys.stderr)
        return 1
    except ServerUnavailable as exc:
        print(f"ap4k schedules: cannot reach {args.server}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(msgspec.to_builtins(result), indent=2))
    else:
        print(_table(result if isinstance(result, list) else [result]))
    return 0


def _table(schedules: list[Any]) -> str:
    headers = ("NAME", "QUEUE", "CRON", "TIMEZONE", "NEXT FIRE", "LAST MESSAGE", "LAST ERROR")
    rows = [
        (
            s.name,
            s.queue,
            s.cron,
            s.timezone,
            "paused" if s.paused else (s.next_fire_at.isoformat() if s.next_fire_at else "-"),
            s.last_message_id or "-",
            s.last_error or "",
        )
        for s in schedules
    ]
    widths = [max(len(str(v)) for v in column) for column in zip(headers, *rows, strict=True)]
    return "\n".join(
        "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    )


def run_list(args: argparse.Namespace) -> int:
    return _run(args, lambda client: client.schedules())


def run_set(args: argparse.Namespace) -> int:
    message: dict[str, Any] = {"target": args.target}
    if args.body is not None:
        try:
            message["body"] = json.loads(args.body)
        except json.JSONDecodeError as exc:
            print(f"ap4k schedules set: --body is not valid JSON: {exc}", file=sys.stderr)
            return 2
    if args.method:
        message["method"] = args.method
    return _run(
        args,
        lambda client: client.set_schedule(
            args.name,
            args.queue,
            args.cron,
            message,
            timezone=args.timezone,
            paused=args.paused,
        ),
    )


def run_delete(args: argparse.Namespace) -> int:
    async def delete(client: Any) -> dict[str, str]:
        await client.delete_schedule(args.name)
        return {"deleted": args.name}

    args.json = True  # nothing to tabulate
    return _run(args, delete)
