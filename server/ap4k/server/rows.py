"""What the store's statements return: one frozen Struct per result shape.

Each class's fields are its statement's columns, in the statement's order (queries.py):
`Store` turns records into these in one place (`store._rows`, which checks the column
names), so callers read attributes that mypy checks instead of indexing records by string.
A row that the API shows becomes its wire object by field name (`as_view`): the wire
objects (ap4k.core.wire) are not spelled out again here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar

import msgspec

from ap4k.core import wire

View = TypeVar("View", bound=msgspec.Struct)

_SCHEDULED_MESSAGE = msgspec.json.Decoder(wire.ScheduledMessage)
_SUBSCRIPTIONS = msgspec.json.Decoder(list[wire.Subscription])


def as_view(cls: type[View], row: msgspec.Struct, **overrides: Any) -> View:
    """`row` as the wire object `cls`: each of its fields from the row's field of the same
    name, except those given in `overrides` (a field the row lacks raises AttributeError)."""
    names = [f for f in cls.__struct_fields__ if f not in overrides]
    return cls(**{f: getattr(row, f) for f in names}, **overrides)


# -- leases and outcomes ----------------------------------------------------------------------


class LeasedRow(msgspec.Struct, frozen=True):
    """A message just leased (LEASE: the columns of `ap4k_lease_v2`)."""

    id: int
    target: str
    method: str
    headers: str | None  # JSON
    body: bytes | None  # JSON
    attempt: int
    max_attempts: int
    timeout_seconds: float
    created_at: datetime
    ordering_key: str | None
    lease_order: int
    lease_expires_at: datetime
    probe: bool  # the probe of its origin's half-open circuit


class FinishedRow(msgspec.Struct, frozen=True):
    """A message whose outcome was recorded (RECORD_OUTCOMES, COMPLETE)."""

    id: int
    queue: str
    state: str  # completed | retryable | discarded
    ordering_key: str | None
    created_at: float  # epoch seconds
    called_back: bool  # a callback message was enqueued for it


class CircuitChangeRow(msgspec.Struct, frozen=True):
    """A circuit that outcomes moved from `previous` to `state`, with the counts of the
    window that moved it (RECORD_CIRCUITS)."""

    origin: str
    state: str  # closed | open | half_open
    previous: str
    failures: int
    attempts: int


class ReleasedRow(msgspec.Struct, frozen=True):
    """A lease given back (RELEASE)."""

    id: int
    queue: str


class ExtendedRow(msgspec.Struct, frozen=True):
    """A lease pushed out (EXTEND)."""

    id: int
    lease_expires_at: datetime


class RescuedRow(msgspec.Struct, frozen=True):
    """An expired lease returned by the rescuer (RESCUE_EXPIRED)."""

    queue: str
    state: str  # retryable | discarded


# -- counts -----------------------------------------------------------------------------------


class QueueCountRow(msgspec.Struct, frozen=True):
    """How many of something per queue (COMPLETED_WITHIN, FAILED_WITHIN)."""

    queue: str
    n: int


class DepthRow(msgspec.Struct, frozen=True):
    """Messages of one queue in one state (QUEUE_DEPTHS, QUEUE_DEPTHS_OF_ONE)."""

    queue: str
    state: str
    n: int
    oldest: float | None  # seconds since the oldest one's scheduled_at


# -- messages ---------------------------------------------------------------------------------


class MessageRow(msgspec.Struct, frozen=True):
    """A message as the API shows it (MESSAGE_COLUMNS: browsing, dead letters)."""

    id: int
    queue: str
    state: str
    target: str
    method: str
    headers: str | None  # JSON
    body: bytes | None  # JSON
    priority: int
    dedup_key: str | None
    ordering_key: str | None
    attempt: int
    max_attempts: int | None
    timeout_seconds: float
    last_error: str | None
    created_at: datetime
    scheduled_at: datetime | None
    attempted_at: datetime | None
    finalized_at: datetime | None
    callback: str | None
    failure_callback: str | None
    flow_key: str | None
    last_status: int | None
    last_response_excerpt: str | None

    def _view_fields(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "headers": msgspec.json.decode(self.headers) if self.headers else {},
            # The stored JSON as it is: no decoding and encoding again.
            "body": msgspec.Raw(self.body) if self.body is not None else None,
        }

    def view(self) -> wire.MessageView:
        return as_view(wire.MessageView, self, **self._view_fields())


class AttemptRow(msgspec.Struct, frozen=True):
    """One failed attempt of a message's history (GET_ATTEMPTS)."""

    attempt: int
    at: datetime
    duration_ms: float | None
    outcome: str  # retried | dead
    status: int | None
    error: str | None
    response_excerpt: str | None
    made_by: str  # the dispatcher or carrier that made it

    def view(self) -> wire.Attempt:
        return as_view(wire.Attempt, self, carrier=self.made_by)


class MessageDetailRow(MessageRow, frozen=True):
    """A message with its success's status and duration (GET_MESSAGE)."""

    delivered_status: int | None
    delivered_duration_ms: float | None

    def detail(self, failures: list[AttemptRow]) -> wire.MessageDetail:
        """The message with its attempt history, oldest first: the failures' rows, then the
        success (whose status and duration are kept on the message itself)."""
        attempts = [a.view() for a in failures]
        if self.state == "completed" and self.delivered_status is not None:
            attempts.append(
                wire.Attempt(
                    attempt=self.attempt,
                    at=self.attempted_at,
                    outcome="delivered",
                    duration_ms=self.delivered_duration_ms,
                    status=self.delivered_status,
                )
            )
        return as_view(wire.MessageDetail, self, **self._view_fields(), attempts=attempts)


class CancelledRow(msgspec.Struct, frozen=True):
    """A message just cancelled (CANCEL_MESSAGE)."""

    id: int
    queue: str
    state: str


# -- schedules and topics ---------------------------------------------------------------------


class ScheduleRow(msgspec.Struct, frozen=True):
    """A schedule (SCHEDULE_COLUMNS)."""

    name: str
    queue: str
    cron: str
    timezone: str
    message: str  # JSON: a wire.ScheduledMessage
    paused: bool
    next_fire_at: datetime | None
    last_fired_at: datetime | None
    last_message_id: int | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime

    def view(self) -> wire.ScheduleView:
        return as_view(
            wire.ScheduleView,
            self,
            message=_SCHEDULED_MESSAGE.decode(self.message),
            last_message_id=None if self.last_message_id is None else str(self.last_message_id),
        )


class DueScheduleRow(msgspec.Struct, frozen=True):
    """A schedule due to fire, locked for the firing's transaction (DUE_SCHEDULES)."""

    name: str
    queue: str
    cron: str
    timezone: str
    message: str  # JSON: a wire.ScheduledMessage
    next_fire_at: datetime

    def template(self) -> wire.ScheduledMessage:
        return _SCHEDULED_MESSAGE.decode(self.message)


class TopicRow(msgspec.Struct, frozen=True):
    """A topic (TOPIC_COLUMNS)."""

    name: str
    subscriptions: str  # JSON: a list of wire.Subscription
    created_at: datetime
    updated_at: datetime

    def view(self) -> wire.TopicView:
        return as_view(
            wire.TopicView, self, subscriptions=_SUBSCRIPTIONS.decode(self.subscriptions)
        )
