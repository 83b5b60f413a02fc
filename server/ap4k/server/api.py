"""The HTTP API (under /v1): messages, queues, dead letters and the carrier protocol.

Handlers are thin: decode and check the request into a wire object (`ap4k.core.wire`,
validation.py), call the store or the services on `Services`, answer with a wire object.
Every refusal is an ApiError rendered as {"error": {"code", "message", "field"}} by the
middleware, never a 500.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
from aiohttp import hdrs, web
from prometheus_client.aiohttp import make_aiohttp_handler

from ap4k.core import names, signatures, wire
from ap4k.core.delivery import Delivery, Verdict, to_leased
from ap4k.core.logs import Throttled
from ap4k.core.targets import TargetError
from ap4k.server.dispatcher import DispatcherPool
from ap4k.server.errors import ApiError, invalid, not_found
from ap4k.server.inserter import Inserter
from ap4k.server.leaser import Leaser
from ap4k.server.openapi import openapi_document
from ap4k.server.outcomes import OutcomeRecorder, OutcomeReport
from ap4k.server.queues import QueueDirectory
from ap4k.server.rows import MessageRow
from ap4k.server.store import DB_ERRORS, EnqueueRow, QueueDepth, QueueSettings, Store
from ap4k.server.validation import (
    ACKS,
    EXTEND,
    LEASE,
    REDRIVE,
    RELEASE,
    carrier_identity,
    check_backoff,
    check_queue_name,
    decode,
    encode_body,
    lease_ids,
    lease_queues,
    parse_enqueue,
    parse_id,
    parse_settings,
)
from ap4k.server.wakeups import SETTINGS_CHANNEL, Wakeups

log = logging.getLogger("ap4k.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# What aiohttp's HTTP server calls with each request (the application's router, by default).
ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


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
    # Whether lease requests' acks are recorded and the capability advertised (off: the
    # answers of a server from before, which carriers must cope with in a rolling upgrade).
    acks_on_lease: bool = True


SERVICES = web.AppKey("services", Services)
BODY_TIMEOUT_SECONDS = web.AppKey("body_timeout_seconds", float)


def json_response(data: Any, status: int = 200) -> web.Response:
    """`data`: a wire object (or plain JSON values), encoded by msgspec."""
    return web.Response(
        body=msgspec.json.encode(data), status=status, content_type="application/json"
    )


# -- middleware -----------------------------------------------------------------------------


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        response = json_response(exc.body(), exc.status)
        if exc.status == 408:
            response.force_close()  # what is left of the body is not worth waiting for
        return response
    except web.HTTPRequestEntityTooLarge:
        limit = request.client_max_size  # the application's
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
        _unavailable.warning("database unavailable, answering 503: %s", exc)
        body = ApiError(503, "unavailable", "the database is unavailable; retry later").body()
        return web.Response(
            body=msgspec.json.encode(body),
            status=503,
            content_type="application/json",
            headers={"Retry-After": "1"},
        )


# One line per few seconds of an outage, not one per refused request.
_unavailable = Throttled(log)


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


async def _body(
    request: web.Request, *, optional: bool = False, app: web.Application | None = None
) -> bytes | None:
    """`app`: the request's application, for a request that has no match info (one
    `direct_enqueue` took past the router)."""
    try:
        content = request.content
        if content.is_eof():
            # All here already (most bodies): taken as it is, without request.read()'s loop
            # of reads into a copy, under the same limit.
            raw = content.read_nowait()
            limit = request.client_max_size
            if limit and len(raw) > limit:
                raise web.HTTPRequestEntityTooLarge(limit, len(raw))
        else:
            async with asyncio.timeout((app or request.app)[BODY_TIMEOUT_SECONDS]):
                raw = await request.read()
    except TimeoutError:
        seconds = (app or request.app)[BODY_TIMEOUT_SECONDS]
        raise ApiError(
            408, "request_timeout", f"the request body did not arrive within {seconds:g} s"
        ) from None
    if not raw or raw.isspace():  # not strip(): that copies a whole batch
        if optional:
            return None
        raise ApiError(400, "malformed_json", "request body is empty; JSON expected")
    return raw


async def _json_body(request: web.Request, app: web.Application | None = None) -> bytes:
    raw = await _body(request, app=app)
    assert raw is not None
    return raw


def _message_id(request: web.Request) -> int:
    msg_id = parse_id(request.match_info["id"])
    if msg_id is None:
        raise not_found("message")
    return msg_id


# The window of the queue view's live rates.
RATE_WINDOW_SECONDS = 60.0


def queue_view(
    settings: QueueSettings, depth: QueueDepth | None, recent: dict[str, int] | None
) -> wire.QueueView:
    recent = recent or {}
    return wire.QueueView(
        name=settings.name,
        depth=wire.QueueDepth(**depth.counts) if depth else wire.QueueDepth(),
        oldest_available_age_seconds=depth.oldest_available_age_seconds if depth else 0.0,
        rates=wire.QueueRates(
            window_seconds=RATE_WINDOW_SECONDS,
            delivered_per_second=recent.get("delivered", 0) / RATE_WINDOW_SECONDS,
            failed_per_second=recent.get("failed", 0) / RATE_WINDOW_SECONDS,
        ),
        settings=settings.public(),
    )


async def queue_views(store: Store, queues: list[QueueSettings]) -> list[wire.QueueView]:
    """The queues with their depths and live rates (one queue's depths are counted on
    their own: that statement reads only its part of the index)."""
    if not queues:
        return []
    depths = await store.depths(queues[0].name if len(queues) == 1 else None)
    recent = await store.recent_outcomes(RATE_WINDOW_SECONDS)
    return [queue_view(q, depths.get(q.name), recent.get(q.name)) for q in queues]


def default_settings(name: str) -> QueueSettings:
    """A queue that does not exist yet: the settings it will be created with."""
    return QueueSettings.from_view(name, wire.QueueSettingsView())


# -- messages ---------------------------------------------------------------------------------


def checked_target(
    directory: QueueDirectory, settings: QueueSettings, target: str, field: str
) -> tuple[str, bool]:
    """(absolute URL, explicitly allowed) for a target the queue allows; else a 400."""
    try:
        return directory.target(settings, target)
    except TargetError as exc:
        raise ApiError(400, "target_not_allowed", str(exc), field) from None


def checked_callbacks(
    directory: QueueDirectory, settings: QueueSettings, m: wire.MessageBase, prefix: str
) -> tuple[str | None, str | None]:
    """A message's callback URLs, absolute and checked like its target; else a 400."""
    if m.callback is None and m.failure_callback is None:
        return None, None
    urls = []
    for field, value in (("callback", m.callback), ("failure_callback", m.failure_callback)):
        urls.append(
            None if value is None else checked_target(directory, settings, value, prefix + field)[0]
        )
    return urls[0], urls[1]



def checked_message(
    directory: QueueDirectory, settings: QueueSettings, m: wire.MessageIn, prefix: str
) -> tuple[tuple[str, bool], tuple[str | None, str | None], bytes | None]:
    """A message's target and callbacks, absolute and checked, and its body as stored; else
    a 400 naming the field (`prefix` + its name)."""
    return (
        checked_target(directory, settings, m.url, prefix + "target"),
        checked_callbacks(directory, settings, m, prefix),
        encode_body(m, prefix + "body"),
    )


def _resolved(
    directory: QueueDirectory,
    settings: QueueSettings,
    messages: list[wire.MessageIn],
    is_batch: bool,
) -> tuple[list[tuple[str, bool]], list[tuple[str | None, str | None]], list[bytes | None]]:
    """`checked_message` of each message (the directory caches each distinct target's
    verdict). A batch's field names are spelt out only for an error: it holds up to a
    thousand messages."""
    targets = []
    callbacks = []
    bodies = []
    for i, m in enumerate(messages):
        try:
            target, urls, body = checked_message(directory, settings, m, "")
        except ApiError:
            if not is_batch:
                raise
            # Checked again to name the field in full (the same check refuses it again).
            checked_message(directory, settings, m, f"messages[{i}].")
            raise
        targets.append(target)
        callbacks.append(urls)
        bodies.append(body)
    return targets, callbacks, bodies


async def enqueue(request: web.Request) -> web.Response:
    queue = check_queue_name(request.match_info["queue"])
    return await _enqueue(request, request.app, queue)


async def _enqueue(request: web.Request, app: web.Application, queue: str) -> web.Response:
    """`queue`: a name check_queue_name accepts."""
    services = app[SERVICES]
    messages, is_batch = parse_enqueue(await _json_body(request, app))
    settings = await services.directory.get(queue, create=False)
    exists = settings is not None
    settings = settings or default_settings(queue)
    targets, callbacks, bodies = _resolved(services.directory, settings, messages, is_batch)
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
            EnqueueRow(
                queue=queue,
                message=m,
                target=url,
                body=bodies[i],
                leased_by=identity if hand_off else None,
                callback=callbacks[i][0],
                failure_callback=callbacks[i][1],
            )
        )
    # The hand-off runs when the statement ends, whatever happens to this request: a
    # request cancelled (at shutdown) while its INSERT may still commit must still get the
    # rows leased to our dispatchers to them (or give the places back), rather than leave
    # them to sit out a lease.
    ended = None
    if direct:
        assert dispatchers is not None
        ended = functools.partial(
            _hand_off, dispatchers, settings, queue, messages, rows, targets, handed, direct
        )
    results = await services.inserter.submit(rows, ended)
    items = [wire.Enqueued(str(i), s, d) for i, s, d in results]
    return json_response(wire.BatchEnqueued(items) if is_batch else items[0], 202)


def _hand_off(
    dispatchers: DispatcherPool,
    settings: QueueSettings,
    queue: str,
    messages: list[wire.MessageIn],
    rows: list[EnqueueRow],
    targets: list[tuple[str, bool]],
    handed: list[int],
    direct: int,
    results: list[tuple[int, str, bool]] | None,
) -> None:
    """Give the messages inserted leased to our dispatchers (`handed`, out of the `direct`
    places reserved) to them, once their INSERT ended; it failed (`results` None): return
    the places."""
    taken = 0
    created_at = time.time()
    for i in handed if results is not None else ():
        assert results is not None
        msg_id, state, duplicate = results[i]
        if duplicate or state != "running":
            continue
        m, row, (url, explicit) = messages[i], rows[i], targets[i]
        assert m.timeout_seconds is not None  # validation filled in the default
        dispatchers.take(
            Delivery(
                id=msg_id,
                queue=queue,
                attempt=1,
                max_attempts=m.max_attempts or settings.max_attempts,
                target=url,
                method=m.method,
                headers=m.headers,
                body=row.body,
                timeout_seconds=m.timeout_seconds,
                created_at=created_at,
                signing_secret=settings.signing_secret,
                webhook_keys=settings.webhook_keys,
                explicitly_allowed=explicit,
            )
        )
        taken += 1
    dispatchers.unreserve(direct - taken)


# The one request the server sees most, taken past aiohttp's router (see `direct_enqueue`).
# Only with a queue name as check_queue_name accepts it: any other path (a bad name, a
# percent-escape, a query string) goes through the router and is answered as before.
_ENQUEUE_PATH = re.compile(
    "/v1/queues/" + names.QUEUE_NAME_PATTERN.removeprefix("^").removesuffix("$") + "/messages"
)
_ENQUEUE_QUEUE = slice(len("/v1/queues/"), -len("/messages"))


def direct_enqueue(app: web.Application, routed: ServerHandler) -> ServerHandler:
    """The HTTP server's request handler: `POST /v1/queues/{queue}/messages` straight to the
    enqueue route through the application's middlewares, everything else to `routed` (the
    application's router).

    Single-message enqueues are the busiest request, and on a 2-core machine their rate is
    the server's CPU per request: resolving the route among forty (a walk of the path's
    prefixes and a regex per candidate), the match info and aiohttp's own middleware cost
    it about a tenth (docs/performance.md, "The enqueue path, third pass"). A request
    with `Expect: 100-continue` goes through the router, which answers the expectation.
    The middlewares must not need `request.match_info` (this request has none)."""

    async def enqueue_here(request: web.Request) -> web.StreamResponse:
        # The path matched _ENQUEUE_PATH: the queue's name is a valid one.
        return await _enqueue(request, app, request.raw_path[_ENQUEUE_QUEUE])

    handler: Handler = enqueue_here
    for middleware in reversed(app.middlewares):
        handler = functools.partial(middleware, handler=handler)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if (
            request.method == "POST"
            and _ENQUEUE_PATH.fullmatch(request.raw_path) is not None
            and hdrs.EXPECT not in request.headers
        ):
            assert isinstance(request, web.Request)  # what the application makes
            return await handler(request)
        return await routed(request)

    return handle


async def get_message(request: web.Request) -> web.Response:
    store = _services(request).store
    msg_id = _message_id(request)
    record = await store.get_message(msg_id)
    if record is None:
        raise not_found("message")
    return json_response(record.detail(await store.get_attempts(msg_id)))


async def cancel_message(request: web.Request) -> web.Response:
    services = _services(request)
    msg_id = _message_id(request)
    record = await services.store.cancel_message(msg_id)
    if record is None:
        current = await services.store.get_message(msg_id)
        if current is None:
            raise not_found("message")
        raise ApiError(
            409, "already_finished", f"message is {current.state} and cannot be cancelled"
        )
    services.wakeups.announce([record.queue])  # ordering keys behind it may go now
    return json_response(wire.Cancelled(str(record.id), record.state))


# -- queues -----------------------------------------------------------------------------------


async def list_queues(request: web.Request) -> web.Response:
    services = _services(request)
    queues = await services.store.list_queues()
    return json_response(wire.QueueList(await queue_views(services.store, queues)))


async def throughput(request: web.Request) -> web.Response:
    """Messages delivered per queue over the last `seconds` (default 60): for autoscaling."""
    raw = request.query.get("seconds", "60")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= wire.MAX_THROUGHPUT_WINDOW:  # also refuses nan and inf
        raise invalid(
            "seconds", f"seconds must be a number in (0, {wire.MAX_THROUGHPUT_WINDOW:g}]"
        )
    completed = await _services(request).store.completed_within(seconds)
    return json_response(
        wire.Throughput(
            seconds, [wire.QueueThroughput(name, n) for name, n in sorted(completed.items())]
        )
    )


async def get_queue(request: web.Request) -> web.Response:
    services = _services(request)
    name = check_queue_name(request.match_info["queue"])
    settings = await services.store.get_queue(name)
    if settings is None:
        raise not_found("queue")
    return json_response((await queue_views(services.store, [settings]))[0])


async def put_queue(request: web.Request) -> web.Response:
    services = _services(request)
    name = check_queue_name(request.match_info["queue"])
    changes = parse_settings(await _json_body(request))
    current = await services.store.get_queue(name) or default_settings(name)
    check_backoff(
        changes.get("min_backoff_seconds", current.min_backoff_seconds),
        changes.get("max_backoff_seconds", current.max_backoff_seconds),
    )
    settings = await services.store.update_queue(name, changes)
    await _settings_changed(services, settings)
    return json_response((await queue_views(services.store, [settings]))[0])


async def _settings_changed(services: Services, settings: QueueSettings) -> None:
    """Every replica and carrier picks up a queue's new settings (this one at its next read:
    the invalidation also keeps a read already under way from caching what it saw)."""
    services.directory.invalidate(settings.name)
    await services.store.notify(SETTINGS_CHANNEL, settings.name)
    if not settings.paused:
        services.wakeups.announce([settings.name])


async def add_signing_secret(request: web.Request) -> web.Response:
    """Generate a Standard Webhooks secret, add it to the queue and show it, this once."""
    services = _services(request)
    name = check_queue_name(request.match_info["queue"])
    secret = signatures.new_secret()
    settings = await services.store.add_signing_secret(name, secret)
    if settings is None:
        raise ApiError(
            409,
            "too_many_signing_secrets",
            f"the queue has {wire.MAX_SIGNING_SECRETS} signing secrets already: drop the "
            "oldest first (DELETE /v1/queues/{queue}/signing-secrets/oldest)",
            "signing_secrets",
        )
    await _settings_changed(services, settings)
    return json_response(wire.NewSigningSecret(secret, len(settings.signing_secrets)), 201)


async def drop_oldest_signing_secret(request: web.Request) -> web.Response:
    services = _services(request)
    name = check_queue_name(request.match_info["queue"])
    settings = await services.store.drop_oldest_signing_secret(name)
    if settings is None:
        raise not_found("queue")
    await _settings_changed(services, settings)
    return json_response(wire.SigningSecretsCount(len(settings.signing_secrets)))


async def _existing_queue(request: web.Request) -> str:
    name = check_queue_name(request.match_info["queue"])
    if await _services(request).store.get_queue(name) is None:
        raise not_found("queue")
    return name


async def list_circuits(request: web.Request) -> web.Response:
    """The queue's open and half-open circuits (none unless it has a circuit breaker)."""
    queue = await _existing_queue(request)
    circuits = await _services(request).store.list_circuits(queue)
    return json_response(wire.CircuitList(circuits))


async def list_flow_keys(request: web.Request) -> web.Response:
    """The queue's busiest flow keys: in flight, then waiting."""
    queue = await _existing_queue(request)
    keys = await _services(request).store.list_flow_keys(queue, _limit(request))
    return json_response(wire.FlowKeyList(keys))


def _limit(request: web.Request) -> int:
    limit = parse_id(request.query.get("limit", "100"))
    if limit is None or not 1 <= limit <= wire.MAX_PAGE:
        raise invalid("limit", f"limit must be an integer from 1 to {wire.MAX_PAGE}")
    return limit


def _after(request: web.Request) -> int | None:
    raw = request.query.get("after")
    if raw is None or raw == "":
        return None
    after = parse_id(raw)
    if after is None:
        raise invalid("after", "after must be a message id (the 'next' of the previous page)")
    return after


def _page(rows: list[MessageRow], limit: int) -> web.Response:
    next_cursor = str(rows[-1].id) if len(rows) == limit else None
    return json_response(wire.MessagePage([r.view() for r in rows], next_cursor))


async def list_dead(request: web.Request) -> web.Response:
    queue = await _existing_queue(request)
    limit = _limit(request)
    records = await _services(request).store.list_dead(queue, _after(request) or 0, limit)
    return _page(records, limit)


ORDERS = {"newest": True, "oldest": False}


async def list_messages(request: web.Request) -> web.Response:
    """A queue's messages in any state, paged by id, newest or oldest first; `dedup_key`
    finds the one message with that key."""
    queue = await _existing_queue(request)
    state = request.query.get("state") or None
    if state is not None and state not in wire.STATES:
        raise invalid("state", f"state must be one of {', '.join(wire.STATES)}")
    order = request.query.get("order", "newest")
    if order not in ORDERS:
        raise invalid("order", "order must be newest or oldest")
    dedup_key = request.query.get("dedup_key") or None
    if dedup_key is not None and ("\x00" in dedup_key or len(dedup_key) > wire.MAX_KEY_LENGTH):
        raise invalid(
            "dedup_key", f"dedup_key must be a string of at most {wire.MAX_KEY_LENGTH} characters"
        )
    limit = _limit(request)
    records = await _services(request).store.list_messages(
        queue,
        state=state,
        dedup_key=dedup_key,
        after=_after(request),
        limit=limit,
        newest_first=ORDERS[order],
    )
    return _page(records, limit)


def _ids(raw: bytes | None) -> list[int] | None:
    if raw is None:
        return None
    try:
        given = decode(REDRIVE, raw, indexed=False).ids
    except ApiError as exc:
        if exc.code != "invalid_field" or exc.field == "ids":
            raise
        raise invalid("body", 'expected {"ids": [message ids]} or no body') from None
    if given is None:
        return None
    out = []
    for value in given:
        msg_id = parse_id(str(value))
        if msg_id is None:
            raise invalid("ids", f"{value!r} is not a message id")
        out.append(msg_id)
    return out


async def redrive_dead(request: web.Request) -> web.Response:
    services = _services(request)
    queue = await _existing_queue(request)
    ids = _ids(await _body(request, optional=True))
    count = await services.store.redrive_dead(queue, ids)
    if count:
        services.wakeups.announce([queue])
    return json_response(wire.Redriven(count))


async def purge_dead(request: web.Request) -> web.Response:
    queue = await _existing_queue(request)
    ids = _ids(await _body(request, optional=True))
    return json_response(wire.Purged(await _services(request).store.purge_dead(queue, ids)))


# -- the carrier protocol -----------------------------------------------------------------------


async def lease(request: web.Request) -> web.Response:
    """Lease up to max_messages for a carrier, long-polling up to wait_seconds for work;
    first record the acks the request carries (one round trip for both under a backlog)."""
    services = _services(request)
    body = decode(LEASE, await _json_body(request), indexed=False)
    leased_by = carrier_identity(body.carrier)
    wanted = lease_queues(body.queues)
    acked = None
    if body.acks is not None and services.acks_on_lease:
        # Before leasing: a finished message of an ordering or flow key lets the next one go.
        acked = await _record_acks(services, leased_by, body.acks)
    deadline = time.monotonic() + body.wait_seconds
    messages: list[wire.LeasedMessage] = []
    ids: list[int] = []
    secrets: dict[str, str] = {}
    webhook_secrets: dict[str, list[str]] = {}
    while True:
        queues = wanted or await services.directory.unpaused_names()
        for queue in queues:
            room = body.max_messages - len(messages)
            if room <= 0:
                break
            settings = await services.directory.get(queue, create=False)
            if settings is None or settings.paused:
                continue
            leased = await services.leaser.lease(settings, room, leased_by, body.lease_seconds)
            for item in leased:
                messages.append(to_leased(item))
                ids.append(item.id)
            if leased and settings.signing_secret:
                secrets[queue] = settings.signing_secret
            if leased and settings.signing_secrets:
                webhook_secrets[queue] = list(settings.signing_secrets)
        remaining = deadline - time.monotonic()
        transport = request.transport
        if messages or remaining <= 0 or transport is None or transport.is_closing():
            break
        await services.wakeups.wait(min(remaining, 1.0))
    transport = request.transport
    if messages and (transport is None or transport.is_closing()):
        # The carrier hung up while we leased for it: give the leases back at once.
        await services.store.release(leased_by, ids, [m.attempt for m in messages])
        raise ApiError(499, "client_closed", "the carrier closed the connection")
    return json_response(
        wire.Leased(
            messages, secrets, webhook_secrets, acks=acked, acks_on_lease=services.acks_on_lease
        )
    )


async def ack(request: web.Request) -> web.Response:
    services = _services(request)
    body = decode(ACKS, await _json_body(request), indexed=False)
    return json_response(
        await _record_acks(services, carrier_identity(body.carrier), body.acks)
    )


async def _record_acks(
    services: Services, leased_by: str, acks: list[wire.Ack]
) -> wire.AckResult:
    """Record a carrier's acks (of `POST /v1/acks` or of a lease request)."""
    ids = lease_ids(acks, "acks")
    reports = [
        OutcomeReport(
            id=msg_id,
            attempt=item.attempt,
            verdict=Verdict(item.outcome),
            retry_after=item.retry_after,
            error=item.error,
            duration=item.duration_seconds,
            queue=item.queue,
            status=item.status,
            response_excerpt=None
            if item.response_excerpt is None
            else item.response_excerpt[: wire.EXCERPT_LENGTH].replace("\x00", ""),
        )
        for item, msg_id in zip(acks, ids, strict=True)
    ]
    accepted = await services.recorder.record(leased_by, reports) if reports else []
    return wire.AckResult(
        accepted=[str(r.id) for r, ok in zip(reports, accepted, strict=True) if ok],
        refused=[str(r.id) for r, ok in zip(reports, accepted, strict=True) if not ok],
    )


async def extend_leases(request: web.Request) -> web.Response:
    services = _services(request)
    body = decode(EXTEND, await _json_body(request), indexed=False)
    leased_by = carrier_identity(body.carrier)
    ids = lease_ids(body.leases, "leases")
    attempts = [ref.attempt for ref in body.leases]
    rows = await services.store.extend(leased_by, ids, attempts, body.lease_seconds) if ids else []
    extended = {r.id: r.lease_expires_at for r in rows}
    return json_response(
        wire.Extended(
            extended=[wire.Extension(str(i), t) for i, t in extended.items()],
            refused=[str(i) for i in ids if i not in extended],
        )
    )


async def release_leases(request: web.Request) -> web.Response:
    services = _services(request)
    body = decode(RELEASE, await _json_body(request), indexed=False)
    leased_by = carrier_identity(body.carrier)
    ids = lease_ids(body.leases, "leases")
    attempts = [ref.attempt for ref in body.leases]
    rows = await services.store.release(leased_by, ids, attempts) if ids else []
    if rows:
        services.wakeups.announce({r.queue for r in rows})
    return json_response(wire.Released([str(r.id) for r in rows]))


# -- health and documents -------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return json_response(wire.Health("ok"))


async def readyz(request: web.Request) -> web.Response:
    services = _services(request)
    if not services.ready:
        return json_response(wire.Health("draining"), 503)
    try:
        async with asyncio.timeout(2):
            async with services.store.pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
    except DB_ERRORS:  # a TimeoutError is an OSError
        return json_response(wire.Health("database unavailable"), 503)
    return json_response(wire.Health("ready"))


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document())


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/queues/{queue}/messages", enqueue)
    app.router.add_get("/v1/messages/{id}", get_message)
    app.router.add_delete("/v1/messages/{id}", cancel_message)
    app.router.add_get("/v1/queues", list_queues)
    app.router.add_get("/v1/throughput", throughput)
    app.router.add_get("/v1/queues/{queue}", get_queue)
    app.router.add_put("/v1/queues/{queue}", put_queue)
    app.router.add_get("/v1/queues/{queue}/messages", list_messages)
    app.router.add_post("/v1/queues/{queue}/signing-secrets", add_signing_secret)
    app.router.add_delete("/v1/queues/{queue}/signing-secrets/oldest", drop_oldest_signing_secret)
    app.router.add_get("/v1/queues/{queue}/circuits", list_circuits)
    app.router.add_get("/v1/queues/{queue}/flow-keys", list_flow_keys)
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
