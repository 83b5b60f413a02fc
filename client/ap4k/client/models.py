"""Typed values of the server's HTTP API: what goes in (`NewMessage`) and what comes back.

Parsing is lenient on purpose: unknown fields from a newer server are ignored and missing
optional ones default, so an old client keeps working against a new server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

JSON = Any  # any value `json.dumps` accepts

MESSAGE_STATES = (
    "scheduled",
    "available",
    "running",
    "retryable",
    "completed",
    "discarded",
    "cancelled",
)


@dataclass(frozen=True, slots=True)
class NewMessage:
    """One message to enqueue: the HTTP request ap4k will make later, and how.

    `target` is a URL, or a path joined to the queue's `base_url`. Give at most one of
    `delay_seconds` and `not_before`. With a `dedup_key`, enqueueing is idempotent: the same
    key in the same queue returns the existing message (that is what makes retries safe).
    """

    target: str
    body: JSON = None
    method: str | None = None
    headers: dict[str, str] | None = None
    delay_seconds: float | None = None
    not_before: datetime | None = None
    priority: int | None = None
    dedup_key: str | None = None
    ordering_key: str | None = None
    max_attempts: int | None = None
    timeout_seconds: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target:
            raise ValueError("target must be a non-empty URL or path")
        if self.delay_seconds is not None and self.not_before is not None:
            raise ValueError("give delay_seconds or not_before, not both")
        if self.delay_seconds is not None and self.delay_seconds < 0:
            raise ValueError("delay_seconds must not be negative")
        if self.not_before is not None and self.not_before.tzinfo is None:
            raise ValueError("not_before must be timezone-aware")

    @classmethod
    def from_mapping(cls, data: Mapping[str, JSON]) -> NewMessage:
        """A message from a dict of the API's fields (`not_before` may be an ISO string)."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown message field(s): {', '.join(sorted(unknown))}")
        fields = dict(data)
        if isinstance(fields.get("not_before"), str):
            fields["not_before"] = parse_time(fields["not_before"])
        return cls(**fields)

    def to_json(self) -> dict[str, JSON]:
        """The request body the server takes; unset fields are left for its defaults."""
        payload: dict[str, JSON] = {"target": self.target}
        if self.body is not None:
            payload["body"] = self.body
        if self.not_before is not None:
            payload["not_before"] = self.not_before.isoformat()
        for name in (
            "method",
            "headers",
            "delay_seconds",
            "priority",
            "dedup_key",
            "ordering_key",
            "max_attempts",
            "timeout_seconds",
        ):
            value = getattr(self, name)
            if value is not None:
                payload[name] = value
        return payload


@dataclass(frozen=True, slots=True)
class Enqueued:
    """The server's answer to an enqueue: committed, with this id and state."""

    id: str
    state: str
    duplicate: bool = False

    @classmethod
    def from_json(cls, data: dict[str, JSON]) -> Enqueued:
        return cls(
            id=str(data["id"]),
            state=str(data.get("state", "")),
            duplicate=bool(data.get("duplicate", False)),
        )


@dataclass(frozen=True, slots=True)
class Message:
    """A message as the server reports it (`GET /v1/messages/{id}`, dead letters)."""

    id: str
    queue: str
    state: str
    target: str
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    body: JSON = None
    priority: int = 0
    dedup_key: str | None = None
    ordering_key: str | None = None
    attempt: int = 0
    max_attempts: int | None = None
    last_error: str | None = None
    created_at: datetime | None = None
    scheduled_at: datetime | None = None
    attempted_at: datetime | None = None
    finalized_at: datetime | None = None

    @classmethod
    def from_json(cls, data: dict[str, JSON]) -> Message:
        return cls(
            id=str(data["id"]),
            queue=str(data.get("queue", "")),
            state=str(data.get("state", "")),
            target=str(data.get("target", "")),
            method=str(data.get("method") or "POST"),
            headers=dict(data.get("headers") or {}),
            body=data.get("body"),
            priority=int(data.get("priority") or 0),
            dedup_key=data.get("dedup_key"),
            ordering_key=data.get("ordering_key"),
            attempt=int(data.get("attempt") or 0),
            max_attempts=_int_or_none(data.get("max_attempts")),
            last_error=_error_text(data.get("last_error")),
            created_at=parse_time(data.get("created_at")),
            scheduled_at=parse_time(data.get("scheduled_at")),
            attempted_at=parse_time(data.get("attempted_at")),
            finalized_at=parse_time(data.get("finalized_at")),
        )


@dataclass(frozen=True, slots=True)
class Cancelled:
    id: str
    state: str

    @classmethod
    def from_json(cls, data: dict[str, JSON]) -> Cancelled:
        return cls(id=str(data["id"]), state=str(data.get("state", "cancelled")))


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """Messages per state; terminal states other than `discarded` are not counted."""

    available: int = 0
    scheduled: int = 0
    running: int = 0
    retryable: int = 0
    discarded: int = 0

    @classmethod
    def from_json(cls, data: dict[str, JSON]) -> QueueDepth:
        return cls(
            available=int(data.get("available") or 0),
            scheduled=int(data.get("scheduled") or 0),
            running=int(data.get("running") or 0),
            retryable=int(data.get("retryable") or 0),
            discarded=int(data.get("discarded") or 0),
        )

    @property
    def pending(self) -> int:
        """Messages not yet delivered nor dead: the backlog."""
        return self.available + self.scheduled + self.running + self.retryable


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """A queue's settings. As input (`set_queue`) only the fields you set are sent."""

    max_attempts: int | None = None
    min_backoff_seconds: float | None = None
    max_backoff_seconds: float | None = None
    rate_limit_per_second: float | None = None
    max_concurrency: int | None = None
    paused: bool | None = None
    base_url: str | None = None
    allowed_targets: list[str] | None = None
    # Write-only: the server reports only whether one is set.
    signing_secret: str | None = None
    signing_secret_set: bool = False

    @classmethod
    def from_json(cls, data: dict[str, JSON]) -> QueueSettings:
        allowed = data.get("allowed_targets")
        return cls(
            max_attempts=_int_or_none(data.get("max_attempts")),
            min_backoff_seconds=_float_or_none(data.get("min_backoff_seconds")),
            max_backoff_seconds=_float_or_none(data.get("max_backoff_seconds")),
            rate_limit_per_second=_float_or_none(data.get("rate_limit_per_second")),
            max_concurrency=_int_or_none(data.get("max_concurrency")),
            paused=None if data.get("paused") is None else bool(data.get("paused")),
            base_url=data.get("base_url"),
            allowed_targets=None if allowed is None else [str(a) for a in allowed],
            signing_secret_set=bool(data.get("signing_secret_set", False)),
        )

    def to_json(self) -> dict[str, JSON]:
        payload: dict[str, JSON] = {}
        for name in (
            "max_attempts",
            "min_backoff_seconds",
            "max_backoff_seconds",
            "rate_limit_per_second",
            "max_concurrency",
            "paused",
            "base_url",
            "allowed_targets",
            "signing_secret",
        ):
            value = getattr(self, name)
            if value is not None:
                payload[name] = value
        return payload


@dataclass(frozen=True, slots=True)
class Queue:
    name: str
    depth: QueueDepth
    oldest_available_age_seconds: float
    settings: QueueSettings

    @classmethod
    def from_json(cls, data: dict[str, JSON]) -> Queue:
        return cls(
            name=str(data["name"]),
            depth=QueueDepth.from_json(data.get("depth") or {}),
            oldest_available_age_seconds=float(data.get("oldest_available_age_seconds") or 0.0),
            settings=QueueSettings.from_json(data.get("settings") or {}),
        )


@dataclass(frozen=True, slots=True)
class DeadLetters:
    """One page of a queue's dead letters; pass `next` as `after` for the following page."""

    messages: list[Message]
    next: str | None

    @classmethod
    def from_json(cls, data: dict[str, JSON]) -> DeadLetters:
        following = data.get("next")
        return cls(
            messages=[Message.from_json(m) for m in data.get("messages") or []],
            next=None if following is None else str(following),
        )


def parse_time(value: JSON) -> datetime | None:
    if value is None or value == "":
        return None
    text = str(value)
    if text.endswith("Z"):  # fromisoformat takes "Z" only from Python 3.11 on; be explicit
        text = text[:-1] + "+00:00"
    return datetime.fromisoformat(text)


def _int_or_none(value: JSON) -> int | None:
    return None if value is None else int(value)


def _float_or_none(value: JSON) -> float | None:
    return None if value is None else float(value)


def _error_text(value: JSON) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return str(value)
