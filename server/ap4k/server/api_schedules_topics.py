"""The HTTP API of recurring schedules (/v1/schedules) and fan-out topics (/v1/topics).

Thin handlers like api.py's: decode and check into a wire object, check what only the
server can (cron, time zone, targets against the queue's allow-list and the SSRF guard),
store, answer with a wire object.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import msgspec
from aiohttp import web

from ap4k.core import wire
from ap4k.server import schedules
from ap4k.server.api import (
    _json_body,
    _services,
    checked_callbacks,
    checked_target,
    default_settings,
    json_response,
)
from ap4k.server.errors import not_found
from ap4k.server.rows import ScheduleRow, TopicRow
from ap4k.server.store import EnqueueRow, QueueSettings
from ap4k.server.validation import (
    check_name,
    encode_body,
    parse_published,
    parse_schedule,
    parse_topic,
)


async def _settings(request: web.Request, queue: str) -> QueueSettings:
    """The queue's settings, or those it will have when it springs into being."""
    found = await _services(request).directory.get(queue, create=False)
    return found or default_settings(queue)


# The path parameter names what is found: {name} a schedule, {topic} a topic.
WHAT = {"name": "schedule", "topic": "topic"}

Found = TypeVar("Found", ScheduleRow, TopicRow)


async def _found(
    request: web.Request, param: str, fetch: Callable[[str], Awaitable[Found | None]]
) -> Found:
    """The schedule or topic the path names, or a 404."""
    row = await fetch(check_name(request.match_info[param], param))
    if row is None:
        raise not_found(WHAT[param])
    return row


async def _deleted(
    request: web.Request, param: str, delete: Callable[[str], Awaitable[bool]]
) -> web.Response:
    name = check_name(request.match_info[param], param)
    if not await delete(name):
        raise not_found(WHAT[param])
    return json_response(wire.Deleted(name))


# -- schedules --------------------------------------------------------------------------------


async def put_schedule(request: web.Request) -> web.Response:
    services = _services(request)
    name = check_name(request.match_info["name"], "name")
    schedule = parse_schedule(await _json_body(request))
    next_fire_at = schedules.check(schedule, datetime.now(UTC))
    settings = await _settings(request, schedule.queue)
    checked_target(services.directory, settings, schedule.message.url, "message.target")
    checked_callbacks(services.directory, settings, schedule.message, "message.")
    row = await services.store.put_schedule(name, schedule, next_fire_at)
    return json_response(row.view())


async def get_schedule(request: web.Request) -> web.Response:
    store = _services(request).store
    return json_response((await _found(request, "name", store.get_schedule)).view())


async def list_schedules(request: web.Request) -> web.Response:
    rows = await _services(request).store.list_schedules()
    return json_response(wire.ScheduleList([r.view() for r in rows]))


async def delete_schedule(request: web.Request) -> web.Response:
    return await _deleted(request, "name", _services(request).store.delete_schedule)


# -- topics -----------------------------------------------------------------------------------


async def put_topic(request: web.Request) -> web.Response:
    services = _services(request)
    name = check_name(request.match_info["topic"], "topic")
    topic = parse_topic(await _json_body(request))
    for i, sub in enumerate(topic.subscriptions):
        settings = await _settings(request, sub.queue or name)
        checked_target(services.directory, settings, sub.target, f"subscriptions[{i}].target")
    return json_response((await services.store.put_topic(name, topic)).view())


async def get_topic(request: web.Request) -> web.Response:
    store = _services(request).store
    return json_response((await _found(request, "topic", store.get_topic)).view())


async def list_topics(request: web.Request) -> web.Response:
    rows = await _services(request).store.list_topics()
    return json_response(wire.TopicList([r.view() for r in rows]))


async def delete_topic(request: web.Request) -> web.Response:
    return await _deleted(request, "topic", _services(request).store.delete_topic)


async def publish(request: web.Request) -> web.Response:
    """One message per subscription, all in one INSERT statement (one transaction)."""
    services = _services(request)
    message = parse_published(await _json_body(request))
    topic = (await _found(request, "topic", services.store.get_topic)).view()
    name, subscriptions = topic.name, topic.subscriptions
    rows = []
    created = set()
    fields = msgspec.structs.asdict(message)
    for i, sub in enumerate(subscriptions):
        queue = sub.queue or name
        settings = await services.directory.get(queue, create=False)
        if settings is None:
            settings = default_settings(queue)
            created.add(queue)
        # Checked again: the queue's allow-list may have changed since the topic was saved.
        url, _ = checked_target(
            services.directory, settings, sub.target, f"subscriptions[{i}].target"
        )
        callback, failure_callback = checked_callbacks(services.directory, settings, message, "")
        headers = (message.headers or {}) | (sub.headers or {})
        headers |= {"Ap4k-Topic": name, "Ap4k-Subscription": sub.name}
        key = message.dedup_key
        m = wire.MessageIn(**(fields | {"headers": headers, "target": sub.target}))
        # A dedup key holds per subscription (several may share a queue).
        m.dedup_key = None if key is None else f"topic:{name}:{sub.name}:{key}"
        rows.append(
            EnqueueRow(
                queue=queue,
                message=m,
                target=url,
                body=encode_body(m),
                callback=callback,
                failure_callback=failure_callback,
            )
        )
    if created:
        await services.store.ensure_queues(sorted(created))
        for queue in created:
            services.directory.invalidate(queue)
    results = await services.inserter.insert(rows) if rows else []
    return json_response(
        wire.Published(
            [
                wire.PublishedTo(sub.name, str(msg_id), state, duplicate)
                for sub, (msg_id, state, duplicate) in zip(subscriptions, results, strict=True)
            ]
        ),
        202,
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/schedules", list_schedules)
    app.router.add_put("/v1/schedules/{name}", put_schedule)
    app.router.add_get("/v1/schedules/{name}", get_schedule)
    app.router.add_delete("/v1/schedules/{name}", delete_schedule)
    app.router.add_get("/v1/topics", list_topics)
    app.router.add_put("/v1/topics/{topic}", put_topic)
    app.router.add_get("/v1/topics/{topic}", get_topic)
    app.router.add_delete("/v1/topics/{topic}", delete_topic)
    app.router.add_post("/v1/topics/{topic}/messages", publish)
