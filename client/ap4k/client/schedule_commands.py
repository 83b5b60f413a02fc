"""`ap4k schedules list|set|delete`: recurring schedules from a shell, run like the other
shell commands (`commands.api_command`): through `AsyncClient`, so they need only
`pip install ap4k`; a table by default, the API's JSON with `--json`; a refusal is one line
on stderr with exit code 1 (2 for a bad command line)."""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import quote

from ap4k.client.commands import (
    Call,
    UsageError,
    api_command,
    output_flags,
    show_json,
    table,
    time_text,
)


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


def schedule_path(name: str) -> str:
    return "/v1/schedules/" + quote(name, safe="")


SCHEDULE_HEADERS = ("NAME", "QUEUE", "CRON", "TIMEZONE", "NEXT FIRE", "LAST MESSAGE", "LAST ERROR")


def _schedule_row(s: dict[str, Any]) -> tuple[Any, ...]:
    return (
        s["name"],
        s["queue"],
        s["cron"],
        s["timezone"],
        "paused" if s["paused"] else time_text(s["next_fire_at"]),
        s["last_message_id"],
        s["last_error"],
    )


def _show_list(args: argparse.Namespace, data: Any) -> None:
    print(table(SCHEDULE_HEADERS, [_schedule_row(s) for s in data["schedules"]]))


def _show_one(args: argparse.Namespace, data: Any) -> None:
    print(table(SCHEDULE_HEADERS, [_schedule_row(data)]))


@api_command(_show_list)
async def run_list(args: argparse.Namespace, call: Call) -> Any:
    return await call("GET", "/v1/schedules")


@api_command(_show_one)
async def run_set(args: argparse.Namespace, call: Call) -> Any:
    message: dict[str, Any] = {"target": args.target}
    if args.body is not None:
        try:
            message["body"] = json.loads(args.body)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--body is not valid JSON: {exc}") from None
    if args.method:
        message["method"] = args.method
    schedule = {
        "queue": args.queue,
        "cron": args.cron,
        "timezone": args.timezone,
        "message": message,
        "paused": args.paused,
    }
    return await call("PUT", schedule_path(args.name), schedule)


# The answer is `{"deleted": name}`, printed as JSON either way.
@api_command(show_json)
async def run_delete(args: argparse.Namespace, call: Call) -> Any:
    return await call("DELETE", schedule_path(args.name))
