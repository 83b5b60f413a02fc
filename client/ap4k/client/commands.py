"""Operating ap4k from a shell: `ap4k send`, `messages`, `queues`, `queue set`, `dead`,
`redrive`, `purge`. Every command calls the server through `AsyncClient` (so these need
only `pip install ap4k`), prints a table (or, with `--json`, the API's own JSON) on stdout,
and says what went wrong on stderr with exit code 1 (2 for a bad command line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

import msgspec

from ap4k.core import wire
from ap4k.core.config import add_flag

DEFAULT_SERVER = "http://127.0.0.1:7438"
# The shell commands try a few times (a server restarting), not for as long as applications.
CLI_ATTEMPTS = 4
STATES = wire.STATES
# The states a queue's depth counts.
LIVE_STATES = tuple(wire.QueueDepth.__struct_fields__)


class UsageError(Exception):
    """A command line that cannot be turned into a request (exit 2, nothing sent)."""


# -- the command line -------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    send = subparsers.add_parser(
        "send",
        help="enqueue one message",
        description="Enqueue one message; prints the server's answer {id, state, duplicate}.",
    )
    send.add_argument("queue")
    send.add_argument("target", help="URL, or a path joined to the queue's base_url")
    body = send.add_mutually_exclusive_group()
    body.add_argument("--json", dest="body", default=None, help="the JSON body")
    body.add_argument("--body-file", default=None, help="read the JSON body from a file (- stdin)")
    send.add_argument("--method", default=None, help="HTTP method (default POST)")
    send.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="a request header (repeatable)",
    )
    when = send.add_mutually_exclusive_group()
    when.add_argument("--delay", type=float, default=None, help="deliver after this many seconds")
    when.add_argument("--not-before", default=None, help="deliver at or after this ISO 8601 time")
    send.add_argument("--priority", type=int, default=None, help="higher goes first")
    send.add_argument("--dedup-key", default=None, help="the same key in a queue enqueues once")
    send.add_argument("--ordering-key", default=None, help="deliver such messages one by one")
    send.add_argument("--flow-key", default=None, help="the key the queue's flow_limits count")
    send.add_argument("--max-attempts", type=int, default=None)
    send.add_argument("--timeout", type=float, default=None, help="delivery timeout in seconds")
    _server_flags(send)
    send.set_defaults(func=run_send)

    messages = subparsers.add_parser("messages", help="list, show or cancel messages")
    actions = messages.add_subparsers(dest="messages_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="a queue's messages, newest first, by pages")
    listing.add_argument("queue")
    listing.add_argument("--state", choices=STATES, default=None)
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--after", default=None, help="the 'next' id of the previous page")
    listing.add_argument("--oldest-first", action="store_true")
    listing.add_argument("--dedup-key", default=None, help="the message with this dedup key")
    output_flags(listing)
    listing.set_defaults(func=run_messages_list)
    get = actions.add_parser("get", help="one message with its attempt history")
    get.add_argument("id")
    output_flags(get)
    get.set_defaults(func=run_messages_get)
    cancel = actions.add_parser("cancel", help="cancel a message that has not finished")
    cancel.add_argument("id")
    output_flags(cancel)
    cancel.set_defaults(func=run_messages_cancel)

    queues = subparsers.add_parser("queues", help="every queue with its depth and rates")
    output_flags(queues)
    queues.set_defaults(func=run_queues)

    queue = subparsers.add_parser("queue", help="show or change one queue")
    queue_actions = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    show = queue_actions.add_parser("show", help="a queue's depth, rates and settings")
    show.add_argument("queue")
    output_flags(show)
    show.set_defaults(func=run_queue_show)
    put = queue_actions.add_parser(
        "set",
        help="change a queue's settings (creating it if needed)",
        description="Change the settings given; 'none' clears an optional one.",
    )
    put.add_argument("queue")
    put.add_argument("--max-attempts", type=int)
    put.add_argument("--min-backoff", type=float, dest="min_backoff_seconds")
    put.add_argument("--max-backoff", type=float, dest="max_backoff_seconds")
    put.add_argument("--rate-limit", dest="rate_limit_per_second", metavar="PER_SECOND|none")
    put.add_argument("--max-concurrency", metavar="N|none")
    paused = put.add_mutually_exclusive_group()
    paused.add_argument("--pause", action="store_const", const=True, dest="paused")
    paused.add_argument("--resume", action="store_const", const=False, dest="paused")
    put.add_argument("--base-url", metavar="URL|none")
    put.add_argument("--allowed-targets", metavar="PREFIX,…|none")
    put.add_argument("--signing-secret", metavar="SECRET|none")
    for name, kind in wire.OBJECT_SETTINGS.items():  # --circuit-breaker, --flow-limits
        put.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            metavar="FIELD=VALUE,…|none",
            help=f"fields {', '.join(kind.__struct_fields__)} (a field left out: its default);"
            " none: off",
        )
    rotation = put.add_mutually_exclusive_group()
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
    output_flags(put)
    put.set_defaults(func=run_queue_set)

    dead = subparsers.add_parser("dead", help="a queue's dead letters, by pages")
    dead.add_argument("queue")
    dead.add_argument("--limit", type=int, default=50)
    dead.add_argument("--after", default=None, help="the 'next' id of the previous page")
    dead.add_argument("--all", action="store_true", help="every page")
    output_flags(dead)
    dead.set_defaults(func=run_dead)

    redrive = subparsers.add_parser("redrive", help="send a queue's dead letters again")
    redrive.add_argument("queue")
    redrive.add_argument("--ids", default=None, help="only these ids (comma separated)")
    output_flags(redrive)
    redrive.set_defaults(func=run_redrive)

    purge = subparsers.add_parser("purge", help="delete a queue's dead letters for good")
    purge.add_argument("queue")
    purge.add_argument("--ids", default=None, help="only these ids (comma separated)")
    output_flags(purge)
    purge.set_defaults(func=run_purge)


def _server_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--server", env_name="SERVER_URL", default=DEFAULT_SERVER, help="server URL")
    add_flag(parser, "--api-token", env_name="API_TOKEN", default=None, help="bearer token")


def output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the API's JSON")
    _server_flags(parser)


# -- calling the server -----------------------------------------------------------------------

Call = Callable[..., Awaitable[Any]]


def _run(args: argparse.Namespace, work: Callable[[Call], Awaitable[Any]]) -> Any:
    """Run `work(call)` with a client for `args.server`; ApiError and ServerUnavailable
    propagate to `api_command`."""
    from ap4k.client import AsyncClient, RetryPolicy

    async def main() -> Any:
        async with AsyncClient(
            args.server,
            token=args.api_token,
            timeout=30.0,
            retry=RetryPolicy(attempts=CLI_ATTEMPTS),
            user_agent="ap4k-cli",
        ) as client:
            return await work(client.call)

    return asyncio.run(main())


def api_command(
    show: Callable[[argparse.Namespace, Any], None],
) -> Callable[[Callable[[argparse.Namespace, Call], Awaitable[Any]]], Callable[..., int]]:
    """Wrap `fetch(args, call) -> data` into a command: prints `--json` or `show(args, data)`,
    and turns refusals and outages into a line on stderr."""

    def wrap(fetch: Callable[[argparse.Namespace, Call], Awaitable[Any]]) -> Callable[..., int]:
        def command(args: argparse.Namespace) -> int:
            from ap4k.client.errors import ApiError, ServerUnavailable

            try:
                data = _run(args, lambda call: fetch(args, call))
            except UsageError as exc:
                print(f"ap4k {args.command}: {exc}", file=sys.stderr)
                return 2
            except ApiError as exc:
                where = f" (field {exc.field})" if exc.field else ""
                print(f"ap4k {args.command}: {exc.code}: {exc.message}{where}", file=sys.stderr)
                return 1
            except ServerUnavailable as exc:
                print(f"ap4k {args.command}: cannot reach {args.server}: {exc}", file=sys.stderr)
                return 1
            if getattr(args, "json", False) is True:
                print(json.dumps(data, indent=2))
            else:
                show(args, data)
            return 0

        return command

    return wrap


def queue_path(queue: str, *parts: str) -> str:
    return "/".join(["/v1/queues", quote(queue, safe=""), *parts])


def message_path(message_id: str) -> str:
    if not message_id.isdigit():
        raise UsageError(f"{message_id!r} is not a message id")
    return f"/v1/messages/{message_id}"


def _id_list(raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    ids = [part.strip() for part in raw.split(",") if part.strip()]
    bad = [i for i in ids if not i.isdigit()]
    if bad or not ids:
        raise UsageError(f"--ids must be message ids separated by commas, not {raw!r}")
    return ids


# -- rendering --------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A plain-text table; columns in `right` are right-aligned (numbers)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(widths[i]) if i in right else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:59] + "…"


def _age(seconds: float | None) -> str:
    if not seconds:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def time_text(iso: str | None) -> str | None:
    if iso is None:
        return None
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}/s"


def _print_messages(page: dict[str, Any], again: str) -> None:
    rows = [
        (
            m["id"],
            m["state"],
            f"{m['attempt']}/{m['max_attempts']}",
            m.get("last_status"),
            m["last_error"],
            f"{m['method']} {m['target']}",
            time_text(m["created_at"]),
        )
        for m in page["messages"]
    ]
    headers = ("ID", "STATE", "ATTEMPT", "STATUS", "LAST ERROR", "TARGET", "CREATED")
    print(table(headers, rows, right=(0, 2, 3)))
    if page.get("next"):
        print(f"more: {again} --after {page['next']}", file=sys.stderr)


# -- the commands -----------------------------------------------------------------------------


def _message_body(args: argparse.Namespace) -> dict[str, Any]:
    message: dict[str, Any] = {"target": args.target}
    raw = args.body
    if args.body_file is not None:
        if args.body_file == "-":
            raw = sys.stdin.read()
        else:
            try:
                with open(args.body_file, encoding="utf-8") as handle:
                    raw = handle.read()
            except OSError as exc:
                raise UsageError(f"--body-file: {exc.strerror}: {args.body_file}") from None
    if raw is not None:
        try:
            message["body"] = json.loads(raw)
        except json.JSONDecodeError as exc:
            flag = "--json" if args.body is not None else "--body-file"
            raise UsageError(f"{flag} is not valid JSON: {exc}") from None
    headers = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"--header must be NAME:VALUE, not {item!r}")
        headers[name.strip()] = value.strip()
    if headers:
        message["headers"] = headers
    for key, value in [
        ("method", args.method),
        ("delay_seconds", args.delay),
        ("not_before", args.not_before),
        ("priority", args.priority),
        ("dedup_key", args.dedup_key),
        ("ordering_key", args.ordering_key),
        ("flow_key", args.flow_key),
        ("max_attempts", args.max_attempts),
        ("timeout_seconds", args.timeout),
    ]:
        if value is not None:
            message[key] = value
    return message


def show_json(args: argparse.Namespace, data: Any) -> None:
    print(json.dumps(data, indent=2))


# The answer is one small object, printed as JSON either way: `--json` of `ap4k send` is the
# message's body.
@api_command(show_json)
async def run_send(args: argparse.Namespace, call: Call) -> Any:
    message = _message_body(args)
    # Resent after a failure past sending only when the server can tell a resend.
    idempotent = args.dedup_key is not None
    return await call("POST", queue_path(args.queue, "messages"), message, idempotent=idempotent)


def _show_list(args: argparse.Namespace, data: Any) -> None:
    _print_messages(data, f"ap4k messages list {args.queue}")


@api_command(_show_list)
async def run_messages_list(args: argparse.Namespace, call: Call) -> Any:
    params = {"limit": str(args.limit), "order": "oldest" if args.oldest_first else "newest"}
    for key, value in [("state", args.state), ("after", args.after), ("dedup_key", args.dedup_key)]:
        if value is not None:
            params[key] = value
    return await call("GET", queue_path(args.queue, "messages"), params=params)


def _show_message(args: argparse.Namespace, m: Any) -> None:
    fields = [
        ("id", m["id"]),
        ("queue", m["queue"]),
        ("state", m["state"]),
        ("target", f"{m['method']} {m['target']}"),
        ("attempt", f"{m['attempt']} of {m['max_attempts']}"),
        ("last error", m["last_error"]),
        ("priority", m["priority"]),
        ("dedup key", m["dedup_key"]),
        ("ordering key", m["ordering_key"]),
        ("created", time_text(m["created_at"])),
        ("scheduled", time_text(m["scheduled_at"])),
        ("finished", time_text(m["finalized_at"])),
    ]
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key.ljust(width)}  {_cell(value)}")
    if m.get("headers"):
        print(f"{'headers'.ljust(width)}  {json.dumps(m['headers'])}")
    print(f"{'body'.ljust(width)}  {json.dumps(m['body'])}")
    attempts = m.get("attempts") or []
    print()
    if not attempts:
        print("no attempts yet")
        return
    rows = [
        (
            a["attempt"],
            time_text(a["at"]),
            None if a["duration_ms"] is None else f"{a['duration_ms']:.1f}ms",
            a["outcome"],
            a["status"],
            a["error"],
            a["response_excerpt"],
            a["carrier"],
        )
        for a in attempts
    ]
    headers = ("#", "AT", "DURATION", "OUTCOME", "STATUS", "ERROR", "RESPONSE", "BY")
    print(table(headers, rows, right=(0, 2, 4)))


@api_command(_show_message)
async def run_messages_get(args: argparse.Namespace, call: Call) -> Any:
    return await call("GET", message_path(args.id))


def _show_cancelled(args: argparse.Namespace, data: Any) -> None:
    print(f"message {data['id']} {data['state']}")


@api_command(_show_cancelled)
async def run_messages_cancel(args: argparse.Namespace, call: Call) -> Any:
    return await call("DELETE", message_path(args.id))


def _queue_row(q: dict[str, Any]) -> tuple[Any, ...]:
    rates = q.get("rates") or {}
    return (
        q["name"],
        "paused" if q["settings"]["paused"] else "",
        *(q["depth"][s] for s in LIVE_STATES),
        _age(q["oldest_available_age_seconds"]),
        _rate(rates.get("delivered_per_second")),
        _rate(rates.get("failed_per_second")),
    )


QUEUE_HEADERS = (
    "QUEUE",
    "PAUSED",
    *(s.upper() for s in LIVE_STATES),
    "OLDEST",
    "DELIVERED",
    "FAILED",
)
QUEUE_NUMBERS = tuple(range(2, len(QUEUE_HEADERS)))


def _show_queues(args: argparse.Namespace, data: Any) -> None:
    print(table(QUEUE_HEADERS, [_queue_row(q) for q in data["queues"]], right=QUEUE_NUMBERS))


@api_command(_show_queues)
async def run_queues(args: argparse.Namespace, call: Call) -> Any:
    return await call("GET", "/v1/queues")


def _show_queue(args: argparse.Namespace, q: Any) -> None:
    print(table(QUEUE_HEADERS, [_queue_row(q)], right=QUEUE_NUMBERS))
    print()
    settings = q["settings"]
    width = max(len(k) for k in settings)
    for key, value in settings.items():
        if isinstance(value, dict):  # an object setting, spelled as `queue set` takes it
            pairs = (f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
            print(f"{key.ljust(width)}  {','.join(p for p in pairs if not p.endswith('=None'))}")
            continue
        shown = ", ".join(value) if isinstance(value, list) else value
        print(f"{key.ljust(width)}  {_cell(shown if shown != '' else None)}")


@api_command(_show_queue)
async def run_queue_show(args: argparse.Namespace, call: Call) -> Any:
    return await call("GET", queue_path(args.queue))


def _optional(raw: str | None, cast: Callable[[str], Any], flag: str) -> Any:
    if raw is None or raw.lower() == "none":
        return None
    try:
        return cast(raw)
    except ValueError:
        raise UsageError(f"{flag} must be a number or 'none', not {raw!r}") from None


def _object_setting(name: str, raw: str) -> Any:
    """`--flow-limits max_concurrency=2,rate_limit_per_second=5` as the setting's JSON object,
    checked by the setting's one declaration in wire (`none`: off)."""
    flag = "--" + name.replace("_", "-")
    if raw.strip().lower() == "none":
        return None
    given: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in raw.split(","))):
        field, equals, value = pair.partition("=")
        if not equals or not field.strip() or field.strip() in given:
            raise UsageError(f"{flag} takes FIELD=VALUE pairs, each field once, not {raw!r}")
        given[field.strip()] = value.strip()
    if not given:
        raise UsageError(f"{flag} takes FIELD=VALUE pairs or 'none', not {raw!r}")
    fields = ", ".join(wire.OBJECT_SETTINGS[name].__struct_fields__)
    try:
        # strict=False: the command line's strings become the declared numbers.
        update = msgspec.convert({name: given}, wire.QueueSettingsUpdate, strict=False)
    except msgspec.ValidationError as exc:
        raise UsageError(f"{flag} {raw!r}: {exc} (fields: {fields})") from None
    return msgspec.to_builtins(getattr(update, name))


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for key in ("max_attempts", "min_backoff_seconds", "max_backoff_seconds", "paused"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    if args.rate_limit_per_second is not None:
        changes["rate_limit_per_second"] = _optional(
            args.rate_limit_per_second, float, "--rate-limit"
        )
    if args.max_concurrency is not None:
        changes["max_concurrency"] = _optional(args.max_concurrency, int, "--max-concurrency")
    for key in ("base_url", "signing_secret"):
        value = getattr(args, key)
        if value is not None:
            changes[key] = None if value.lower() == "none" else value
    for name in wire.OBJECT_SETTINGS:
        if getattr(args, name) is not None:
            changes[name] = _object_setting(name, getattr(args, name))
    if args.allowed_targets is not None:
        given = args.allowed_targets
        changes["allowed_targets"] = (
            [] if given.lower() == "none" else [p.strip() for p in given.split(",") if p.strip()]
        )
    if not changes:
        raise UsageError("nothing to change: give at least one setting (see --help)")
    return changes


def _show_queue_set(args: argparse.Namespace, data: Any) -> None:
    if "signing_secrets_set" in data and "settings" not in data:  # a rotation step
        for key, value in data.items():
            print(f"{key}: {value}")
    else:
        _show_queue(args, data)


@api_command(_show_queue_set)
async def run_queue_set(args: argparse.Namespace, call: Call) -> Any:
    if args.new_signing_secret:
        return await call("POST", queue_path(args.queue, "signing-secrets"))
    if args.drop_old_signing_secret:
        return await call("DELETE", queue_path(args.queue, "signing-secrets", "oldest"))
    return await call("PUT", queue_path(args.queue), _settings(args))


def _show_dead(args: argparse.Namespace, data: Any) -> None:
    _print_messages(data, f"ap4k dead {args.queue}")


@api_command(_show_dead)
async def run_dead(args: argparse.Namespace, call: Call) -> Any:
    params = {"limit": str(args.limit)}
    if args.after is not None:
        params["after"] = args.after
    page: dict[str, Any] = await call("GET", queue_path(args.queue, "dead"), params=params)
    while args.all and page["next"] is not None:
        more = await call(
            "GET", queue_path(args.queue, "dead"), params=params | {"after": page["next"]}
        )
        page = {"messages": page["messages"] + more["messages"], "next": more["next"]}
    return page


def _show_count(key: str) -> Callable[[argparse.Namespace, Any], None]:
    return lambda args, data: print(f"{key}: {data[key]}")


@api_command(_show_count("redriven"))
async def run_redrive(args: argparse.Namespace, call: Call) -> Any:
    ids = _id_list(args.ids)
    body = None if ids is None else {"ids": ids}
    return await call("POST", queue_path(args.queue, "dead", "redrive"), body, idempotent=True)


@api_command(_show_count("purged"))
async def run_purge(args: argparse.Namespace, call: Call) -> Any:
    ids = _id_list(args.ids)
    return await call(
        "DELETE", queue_path(args.queue, "dead"), None if ids is None else {"ids": ids}
    )
