"""Typed values of the server's HTTP API: what goes in (`NewMessage`) and what comes back.

Each is the wire object the server itself decodes or encodes (`ap4k.core.wire`), with the
client's conveniences on top and no field of its own. Parsing is lenient on purpose: unknown
fields from a newer server are ignored and missing optional ones default, so an old client
keeps working against a new server.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Self, TypedDict, cast

import msgspec

from ap4k.core import wire
from ap4k.core.wire import QueueDepth, QueueSettingsView, ScheduledMessage, Subscription

JSON = Any  # any value `json.dumps` accepts
MESSAGE_STATES = wire.STATES

__all__ = [
    "JSON",
    "MESSAGE_STATES",
    "Cancelled",
    "DeadLetters",
    "Enqueued",
    "Message",
    "MessageOptions",
    "NewMessage",
    "Published",
    "Queue",
    "QueueDepth",
    "QueueSettings",
    "QueueSettingsView",
    "Schedule",
    "ScheduledMessage",
    "Subscription",
    "Topic",
    "parse_time",
]


class _FromJson:
    @classmethod
    def from_json(cls, data: Mapping[str, JSON]) -> Self:
        return msgspec.convert(data, cls)


class MessageOptions(TypedDict, total=False):
    """`NewMessage`'s fields after `target` and `body`: the keyword arguments of every `send`
    and `enqueue` (`**options: Unpack[MessageOptions]`). tests/wire/test_wire.py keeps the two
    equal."""

    method: str
    headers: dict[str, str] | None
    priority: int
    ordering_key: str | None
    max_attempts: int | None
    timeout_seconds: float | None
    callback: str | None
    failure_callback: str | None
    flow_key: str | None
    delay_seconds: float | None
    not_before: datetime | None
    dedup_key: str | None


class NewMessage(wire.MessageIn):
    """One message to enqueue (see `ap4k.core.wire.MessageIn` for its fields).

    A `body` of None means no body, as in `send(queue, target)`; a `method` or `priority` of
    None means the default.
    """

    def __post_init__(self) -> None:
        if self.body is None:
            self.body = msgspec.UNSET
        if cast(object, self.method) is None:
            self.method = "POST"
        if cast(object, self.priority) is None:
            self.priority = 0
        super().__post_init__()

    @classmethod
    def from_mapping(cls, data: Mapping[str, JSON]) -> NewMessage:
        """A message from a dict of the API's fields (`not_before` may be an ISO string)."""
        unknown = set(data) - set(cls.__struct_fields__)
        if unknown:
            raise ValueError(f"unknown message field(s): {', '.join(sorted(unknown))}")
        fields = dict(data)
        if isinstance(fields.get("not_before"), str):
            fields["not_before"] = parse_time(fields["not_before"])
        return cls(**fields)

    def to_json(self) -> dict[str, JSON]:
        """The request body the server takes; unset fields are left for its defaults."""
        payload: dict[str, JSON] = msgspec.to_builtins(self)
        return payload


class Enqueued(wire.Enqueued, _FromJson):
    """The server's answer to an enqueue: committed, with this id and state."""


class Message(wire.MessageDetail, _FromJson):
    """A message as the server reports it: `GET /v1/messages/{id}` with its `attempts`,
    oldest first; in pages of messages (browsing, dead letters) `attempts` is left empty."""


class Cancelled(wire.Cancelled, _FromJson):
    pass


class QueueSettings(wire.QueueSettingsUpdate):
    """Settings to change (`set_queue`): only the fields you set are sent. A queue reports
    its settings as `QueueSettingsView` (`Queue.settings`)."""

    def to_json(self) -> dict[str, JSON]:
        payload: dict[str, JSON] = msgspec.to_builtins(self)
        return payload


class Queue(wire.QueueView, _FromJson):
    pass


class DeadLetters(wire.DeadLetters, _FromJson):
    """One page of a queue's dead letters; pass `next` as `after` for the following page."""

    messages: list[Message]  # type: ignore[assignment]


class Schedule(wire.ScheduleView, _FromJson):
    """A recurring schedule as the server reports it (`next_fire_at`, `last_message_id`)."""


class Topic(wire.TopicView, _FromJson):
    pass


class Published(wire.Published, _FromJson):
    """The answer to a publish: the message each subscription got."""


def parse_time(value: JSON) -> datetime | None:
    if value is None or value == "":
        return None
    text = str(value)
    if text.endswith("Z"):  # fromisoformat takes "Z" only from Python 3.11 on; be explicit
        text = text[:-1] + "+00:00"
    return datetime.fromisoformat(text)
