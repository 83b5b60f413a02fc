"""The HTTP API (under /v1): messages, queues, dead letters and the carrier protocol.

Handlers are thin: parse and check the request (validation.py), call the store or the
services on `Services`, shape the JSON. Every refusal is an ApiError rendered as
{"error": {"code", "message", "field"}} by the middleware, never a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from ap4k.core.delivery import Delivery
from ap4k.core.targets import TargetError
from ap4k.server.dispatcher import DispatcherPool
from ap4k.server.errors import ApiError, invalid, not_found
from ap4k.server.inserter import Inserter
from ap4k.server.leaser import Leaser
from ap4k.server.openapi import openapi_document
from ap4k.server.outcomes import OutcomeRecorder, OutcomeReport
from ap4k.server.queues import QueueDirectory
from ap4k.server.store import STATES, EnqueueRow, QueueDepth, QueueSettings, Store
from ap4k.server.validation import (
    QUEUE_NAME,
    check_queue_name,
    parse_enqueue,
    parse_id,
    parse_json,
    parse_settings,
)
from ap4k.server.wakeups import SETTINGS_CHANNEL, Wakeups

log = logging.getLogger("ap4k.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass
class Services:
    """What the handlers work with; built and owned by app.py."""

    store: Store
    directory: QueueDirectory
    inserter: Inserter
    recorder: OutcomeRecorder
    wakeups: Wakeups
    leaser: Leaser
    api_token: str | None
    dispatchers: DispatcherPool | None = None
    ready: bool = True


SERVICES = web.AppKey("services", Services)
MAX_BODY_BYTES = web.AppKey("max_body_bytes", int)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


# -- middleware -----------------------------------------------------------------------------


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return json_response(exc.body(), exc.status)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[MAX_BODY_BYTES]
        error = ApiError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")
        return json_response(error.body(), 413)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        response = json_response(ApiError(exc.status, code, exc.reason).body(), exc.status)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except asyncpg.DataError as exc:
        # A value PostgreSQL refuses (validation should have caught it): the request is at
        # fault, and retrying it would never help.
        return json_response(ApiError(400, "invalid_value", str(exc)).body(), 400)
    except DB_ERRORS as exc:
        log.warning("database unavailable: %s", exc)
        body = ApiError(503, "unavailable", "the database is unavailable; retry later").body()
        return web.Response(
            body=orjson.dumps(body),
            status=503,
            content_type="application/json",
            headers={"Retry-After": "1"},
        )


def auth_middleware(token: str | None) -> Any:
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise ApiError(
                    401, "unauthorized", "a valid 'Authorization: Bearer' token is required"
                )
        return await handler(request)

    return middleware


# -- helpers ----------------------------------------------------------------------------------


def _services(request: web.Request) -> Services:
    return request.app[SERVICES]


async def _json_body(request: web.Request, *, optional: bool = False) -> Any:
    raw = await request.read()
    if not raw.strip():
        if optional:
            return None
        raise ApiError(400, "malformed_json", "request body is empty; JSON expected")
    return parse_json(raw)


def _message_id(request: web.Request) -> int:
    msg_id = parse_id(request.match_info["id"])
    if msg_id is None:
        raise not_found("message")
    return msg_id


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()


def message_json(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": str(r["id"]),
        "queue": r["queue"],
        "state": r["state"],
        "target": r["target"],
        "method": r["method"],
        "headers": orjson.Fragment(r["headers"]) if r["headers"] else {},
        "body": orjson.Fragment(r["body"]) if r["body"] is not None else None,
        "priority": r["priority"],
        "dedup_key": r["dedup_key"],
        "ordering_key": r["ordering_key"],
        "attempt": r["attempt"],
        "max_attempts": r["max_attempts"],
        "timeout_seconds": float(r["timeout_seconds"]),
        "last_error": r["last_error"],
        "created_at": _iso(r["created_at"]),
        "scheduled_at": _iso(r["scheduled_at"]),
        "attempted_at": _iso(r["attempted_at"]),
        "finalized_at": _iso(r["finalized_at"]),
    }


def queue_json(settings: QueueSettings, depth: QueueDepth | None) -> dict[str, Any]:
    counts = depth.counts if depth else dict.fromkeys(STATES, 0)
    return {
        "name": settings.name,
        "depth": counts,
        "oldest_available_age_seconds": depth.oldest_available_age_seconds if depth else 0.0,
        "settings": settings.public(),
    }


def default_settings(name: str) -> QueueSettings:
    return QueueSettings(name, 25, 0.1, 3600.0, None, None, False, None, (), None)


# -- messages ---------------------------------------------------------------------------------


async def enqueue(request: web.Request) -> web.Response:
    services = _services(request)
    queue = check_queue_name(request.match_info["queue"])
    messages, is_batch = parse_enqueue(await _json_body(request))
    settings = await services.directory.get(queue, create=False)
    exists = settings is not None
    settings = settings or default_settings(queue)
    targets = []
    for i, m in enumerate(messages):
        try:
            targets.append(services.directory.target(settings, m.target))
        except TargetError as exc:
            field = f"messages[{i}].target" if is_batch else "target"
            raise ApiError(400, "target_not_allowed", str(exc), field) from None
    if not exists:
        await services.store.ensure_queues([queue])
        services.directory.invalidate(queue)
    # Messages that can go at once are inserted leased to an idle dispatcher of ours.
    dispatchers = services.dispatchers
    direct = 0
    if dispatchers is not None:
        direct = dispatchers.reserve(settings, len(messages))
    identity = dispatchers.identity if dispatchers is not None else None
    rows: list[EnqueueRow] = []
    handed: list[int] = []
    for i, (m, (url, _)) in enumerate(zip(messages, targets, strict=True)):
        hand_off = (
            len(handed) < direct
            and m.ordering_key is None
            and m.delay_seconds is None
            and m.not_before is None
        )
        if hand_off:
            handed.append(i)
        rows.append(
            (
                queue,
                url,
                m.method,
                m.headers,
                m.body,
                m.priority,
                m.dedup_key,
                m.ordering_key,
                m.max_attempts,
                m.timeout_seconds,
                m.delay_seconds,
                m.not_before,
                identity if hand_off else None,
            )
        )
    try:
        results = await services.inserter.insert(rows)
    except BaseException:
        if dispatchers is not None:
            dispatchers.unreserve(direct)
        raise
    if dispatchers is not None:
        created_at = time.time()
        taken = 0
        for i in handed:
            msg_id, state, duplicate = results[i]
            if duplicate or state != "running":
                continue
            m, (url, explicit) = messages[i], targets[i]
            dispatchers.take(
                Delivery(
                    id=msg_id,
                    queue=queue,
                    attempt=1,
                    max_attempts=m.max_attempts or settings.max_attempts,
                    target=url,
                    method=m.method,
                    headers=None if m.headers is None else orjson.loads(m.headers),
                    body=m.body,
                    timeout_seconds=m.timeout_seconds,
                    created_at=created_at,
                    signing_secret=settings.signing_secret,
                    explicitly_allowed=explicit,
                )
            )
            taken += 1
        dispatchers.unreserve(direct - taken)
    items = [{"id": str(i), "state": s, "duplicate": d} for i, s, d in results]
    return json_response({"messages": items} if is_batch else items[0], 202)


async def get_message(request: web.Request) -> web.Response:
    record = await _services(request).store.get_message(_message_id(request))
    if record is None:
        raise not_found("message")
    return json_response(message_json(record))


async def cancel_message(request: web.Request) -> web.Response:
    services = _services(request)
    msg_id = _message_id(request)
    record = await services.store.cancel_message(msg_id)
    if record is None:
        current = await services.store.get_message(msg_id)
        if current is None:
            raise not_found("message")
        raise ApiError(
            409, "already_finished", f"message is {current['state']} and cannot be cancelled"
        )
    services.wakeups.announce([record["queue"]])  # ordering keys behind it may go now
    return json_response({"id": str(record["id"]), "state": record["state"]})


# -- queues -----------------------------------------------------------------------------------


async def list_queues(request: web.Request) -> web.Response:
    services = _services(request)
    queues = await services.store.list_queues()
    depths = await services.store.depths()
    return json_response({"queues": [queue_json(q, depths.get(q.name)) for q in queues]})


async def get_queue(request: web.Request) -> web.Response:
    services = _services(request)
    name = check_queue_name(request.match_info["queue"])
    settings = await services.store.get_queue(name)
    if settings is None:
        raise not_found("queue")
    depths = await services.store.depths(name)
    return json_response(queue_json(settings, depths.get(name)))


async def put_queue(request: web.Request) -> web.Response:
    services = _services(request)
    name = check_queue_name(request.match_info["queue"])
    changes = parse_settings(await _json_body(request))
    current = await services.store.get_queue(name) or default_settings(name)
    low = changes.get("min_backoff_seconds", current.min_backoff_seconds)
    high = changes.get("max_backoff_seconds", current.max_backoff_seconds)
    if high < low:
        raise invalid("max_backoff_seconds", "max_backoff_seconds must be >= min_backoff_seconds")
    settings = await services.store.update_queue(name, changes)
    services.directory.put(settings)
    services.directory.invalidate(name)
    await services.store.notify(SETTINGS_CHANNEL, name)
    if not settings.paused:
        services.wakeups.announce([name])
    depths = await services.store.depths(name)
    return json_response(queue_json(settings, depths.get(name)))


async def _existing_queue(request: web.Request) -> str:
    name = check_queue_name(request.match_info["queue"])
    if await _services(request).store.get_queue(name) is None:
        raise not_found("queue")
    return name


async def list_dead(request: web.Request) -> web.Response:
    queue = await _existing_queue(request)
    limit_raw = request.query.get("limit", "100")
    after_raw = request.query.get("after", "0")
    limit = parse_id(limit_raw)
    if limit is None or not 1 <= limit <= 1000:
        raise invalid("limit", "limit must be an integer from 1 to 1000")
    after = parse_id(after_raw)
    if after is None:
        raise invalid("after", "after must be a message id")
    records = await _services(request).store.list_dead(queue, after, limit)
    next_cursor = str(records[-1]["id"]) if len(records) == limit else None
    return json_response({"messages": [message_json(r) for r in records], "next": next_cursor})


def _ids(data: Any) -> list[int] | None:
    if data is None:
        return None
    if not isinstance(data, dict) or set(data) - {"ids"}:
        raise invalid("body", 'expected {"ids": [message ids]} or no body')
    ids = data.get("ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or len(ids) > 10_000:
        raise invalid("ids", "ids must be an array of at most 10,000 message ids")
    out = []
    for value in ids:
        msg_id = parse_id(str(value) if type(value) in (int, str) else None)
        if msg_id is None:
            raise invalid("ids", f"{value!r} is not a message id")
        out.append(msg_id)
    return out


async def redrive_dead(request: web.Request) -> web.Response:
    services = _services(request)
    queue = await _existing_queue(request)
    ids = _ids(await _json_body(request, optional=True))
    count = await services.store.redrive_dead(queue, ids)
    if count:
        services.wakeups.announce([queue])
    return json_response({"redriven": count})


async def purge_dead(request: web.Request) -> web.Response:
    queue = await _existing_queue(request)
    return json_response({"purged": await _services(request).store.purge_dead(queue, None)})


# -- the carrier protocol -----------------------------------------------------------------------


def _carrier(data: dict[str, Any]) -> str:
    carrier = data.get("carrier")
    if not isinstance(carrier, str) or not 1 <= len(carrier) <= 200 or not carrier.isprintable():
        raise invalid("carrier", "carrier must be the carrier's id: a string of 1-200 characters")
    return f"carrier:{carrier}"


def _number_field(
    data: dict[str, Any], name: str, default: float, low: float, high: float
) -> float:
    value = data.get(name, default)
    if type(value) not in (int, float) or not low <= value <= high:
        raise invalid(name, f"{name} must be a number from {low:g} to {high:g}")
    return float(value)


def _leases(data: dict[str, Any], field: str = "leases") -> tuple[list[int], list[int]]:
    items = data.get(field)
    if not isinstance(items, list) or len(items) > 10_000:
        raise invalid(field, f"{field} must be an array of {{id, attempt}}")
    ids, attempts = [], []
    for item in items:
        if not isinstance(item, dict):
            raise invalid(field, f"each of {field} is an object {{id, attempt}}")
        msg_id, attempt = item.get("id"), item.get("attempt")
        parsed = parse_id(msg_id)
        if parsed is None:
            raise invalid(f"{field}.id", "id must be a message id string")
        if type(attempt) is not int or not 1 <= attempt <= 1_000_000:
            raise invalid(f"{field}.attempt", "attempt must be a positive integer")
        ids.append(parsed)
        attempts.append(attempt)
    return ids, attempts


async def lease(request: web.Request) -> web.Response:
    """Lease up to max_messages for a carrier, long-polling up to wait_seconds for work."""
    services = _services(request)
    data = await _json_body(request)
    if not isinstance(data, dict):
        raise invalid("body", "expected a JSON object")
    unknown = set(data) - {"carrier", "max_messages", "queues", "wait_seconds", "lease_seconds"}
    if unknown:
        raise invalid(sorted(unknown)[0], f"unknown field {sorted(unknown)[0]!r}")
    leased_by = _carrier(data)
    max_messages = int(_number_field(data, "max_messages", 100, 1, 1000))
    wait = _number_field(data, "wait_seconds", 20, 0, 60)
    lease_seconds = _number_field(data, "lease_seconds", 60, 1, 3600)
    wanted = data.get("queues")
    if wanted is not None and (
        not isinstance(wanted, list) or not all(isinstance(q, str) for q in wanted)
    ):
        raise invalid("queues", "queues must be an array of queue names")
    if wanted is not None and not all(QUEUE_NAME.fullmatch(q) for q in wanted):
        raise invalid("queues", "queues must be an array of valid queue names")
    deadline = time.monotonic() + wait
    messages: list[dict[str, Any]] = []
    secrets: dict[str, str] = {}
    while True:
        queues = wanted or await services.directory.unpaused_names()
        for queue in queues:
            room = max_messages - len(messages)
            if room <= 0:
                break
            settings = await services.directory.get(queue, create=False)
            if settings is None or settings.paused:
                continue
            for item in await services.leaser.lease(settings, room, leased_by, lease_seconds):
                messages.append(_leased_json(item))
                if item.signing_secret:
                    secrets[queue] = item.signing_secret
        remaining = deadline - time.monotonic()
        transport = request.transport
        if messages or remaining <= 0 or transport is None or transport.is_closing():
            break
        await services.wakeups.wait(min(remaining, 1.0))
    transport = request.transport
    if messages and (transport is None or transport.is_closing()):
        # The carrier hung up while we leased for it: give the leases back at once.
        await services.store.release(
            leased_by, [int(m["id"]) for m in messages], [m["attempt"] for m in messages]
        )
        raise ApiError(499, "client_closed", "the carrier closed the connection")
    return json_response({"messages": messages, "signing_secrets": secrets})


def _leased_json(d: Delivery) -> dict[str, Any]:
    return {
        "id": str(d.id),
        "queue": d.queue,
        "attempt": d.attempt,
        "max_attempts": d.max_attempts,
        "target": d.target,
        "method": d.method,
        "headers": d.headers or {},
        # The stored JSON text as a string: carriers send these exact bytes.
        "body_json": None if d.body is None else d.body.decode(),
        "timeout_seconds": d.timeout_seconds,
        "created_at": d.created_at,
        "ordering_key": d.ordering_key,
        "explicitly_allowed": d.explicitly_allowed,
    }


VERDICTS = {"delivered", "retry", "fail"}


async def ack(request: web.Request) -> web.Response:
    services = _services(request)
    data = await _json_body(request)
    if not isinstance(data, dict):
        raise invalid("body", "expected a JSON object")
    leased_by = _carrier(data)
    acks = data.get("acks")
    if not isinstance(acks, list) or len(acks) > 10_000:
        raise invalid("acks", "acks must be an array of outcomes")
    ids, attempts = _leases(data, "acks")
    reports = []
    for item, msg_id, attempt in zip(acks, ids, attempts, strict=True):
        outcome = item.get("outcome")
        if not isinstance(outcome, str) or outcome not in VERDICTS:
            raise invalid("acks.outcome", f"outcome must be one of {sorted(VERDICTS)}")
        error = item.get("error")
        if error is not None and not isinstance(error, str):
            raise invalid("acks.error", "error must be a string")
        if error is not None and "\x00" in error:
            raise invalid("acks.error", "error must not contain NUL characters")
        retry_after = item.get("retry_after")
        if retry_after is not None and (
            type(retry_after) not in (int, float) or not 0 <= retry_after <= 86400
        ):
            raise invalid("acks.retry_after", "retry_after must be seconds from 0 to 86400")
        duration = item.get("duration_seconds")
        if duration is not None and (type(duration) not in (int, float) or duration < 0):
            raise invalid("acks.duration_seconds", "duration_seconds must be a non-negative number")
        queue = item.get("queue") if isinstance(item.get("queue"), str) else None
        reports.append(
            OutcomeReport(
                msg_id,
                attempt,
                outcome,
                None if retry_after is None else float(retry_after),
                error,
                None if duration is None else float(duration),
                queue,
            )
        )
    accepted = await services.recorder.record(leased_by, reports) if reports else []
    return json_response(
        {
            "accepted": [str(r.id) for r, ok in zip(reports, accepted, strict=True) if ok],
            "refused": [str(r.id) for r, ok in zip(reports, accepted, strict=True) if not ok],
        }
    )


async def _lease_list(request: web.Request) -> tuple[dict[str, Any], str, list[int], list[int]]:
    """The body of extend and release: (body, leased_by, ids, attempts)."""
    data = await _json_body(request)
    if not isinstance(data, dict):
        raise invalid("body", "expected a JSON object")
    leased_by = _carrier(data)
    ids, attempts = _leases(data)
    return data, leased_by, ids, attempts


async def extend_leases(request: web.Request) -> web.Response:
    services = _services(request)
    data, leased_by, ids, attempts = await _lease_list(request)
    seconds = _number_field(data, "lease_seconds", 60, 1, 3600)
    rows = await services.store.extend(leased_by, ids, attempts, seconds) if ids else []
    extended = {r["id"]: r["lease_expires_at"] for r in rows}
    return json_response(
        {
            "extended": [{"id": str(i), "lease_expires_at": _iso(t)} for i, t in extended.items()],
            "refused": [str(i) for i in ids if i not in extended],
        }
    )


async def release_leases(request: web.Request) -> web.Response:
    services = _services(request)
    _, leased_by, ids, attempts = await _lease_list(request)
    rows = await services.store.release(leased_by, ids, attempts) if ids else []
    if rows:
        services.wakeups.announce({r["queue"] for r in rows})
    return json_response({"released": [str(r["id"]) for r in rows]})


# -- health and documents -------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    services = _services(request)
    if not services.ready:
        return json_response({"status": "draining"}, 503)
    try:
        async with asyncio.timeout(2):
            async with services.store.pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
    except (TimeoutError, *DB_ERRORS):
        return json_response({"status": "database unavailable"}, 503)
    return json_response({"status": "ready"})


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document())


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/queues/{queue}/messages", enqueue)
    app.router.add_get("/v1/messages/{id}", get_message)
    app.router.add_delete("/v1/messages/{id}", cancel_message)
    app.router.add_get("/v1/queues", list_queues)
    app.router.add_get("/v1/queues/{queue}", get_queue)
    app.router.add_put("/v1/queues/{queue}", put_queue)
    app.router.add_get("/v1/queues/{queue}/dead", list_dead)
    app.router.add_post("/v1/queues/{queue}/dead/redrive", redrive_dead)
    app.router.add_delete("/v1/queues/{queue}/dead", purge_dead)
    app.router.add_post("/v1/leases", lease)
    app.router.add_post("/v1/leases/extend", extend_leases)
    app.router.add_post("/v1/leases/release", release_leases)
    app.router.add_post("/v1/acks", ack)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/metrics", make_aiohttp_handler())
