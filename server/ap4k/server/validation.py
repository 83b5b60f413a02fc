"""Turning request JSON into checked values, with a clear error for each bad field.

Kept deliberately plain (no schema library): a batch of 100 messages must validate in well
under a millisecond, and every check here says exactly which field is wrong and why.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

from ap4k.core import names
from ap4k.server.errors import ApiError, invalid

QUEUE_NAME = names.QUEUE_NAME
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
# Headers that belong to the transport or to ap4k itself, not to the message.
RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te"}
)
MESSAGE_FIELDS = frozenset(
    {
        "target",
        "method",
        "headers",
        "body",
        "delay_seconds",
        "not_before",
        "priority",
        "dedup_key",
        "ordering_key",
        "max_attempts",
        "timeout_seconds",
    }
)
MAX_BATCH = 1000
MAX_DELAY_SECONDS = 365 * 86400.0
# A delivery timeout under a millisecond means nothing, and the column is a float4 that
# rounds tiny values to 0, which the HTTP client would read as "no timeout at all".
MIN_TIMEOUT_SECONDS = 0.001
MAX_TIMEOUT_SECONDS = 1800.0
DEFAULT_TIMEOUT_SECONDS = 30.0
MAX_ATTEMPTS_LIMIT = 1000
PRIORITY_LIMIT = 1000
MAX_KEY_LENGTH = 256
MAX_HEADERS = 64
MAX_TARGET_LENGTH = 4096
# C0 controls and DEL: never part of a URL, and NUL cannot even be stored in a text column
# (PostgreSQL would refuse the row, which must be a 400 here, not a 5xx there).
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
# What a header value may not hold (RFC 9110 field-value: no controls but horizontal tab).
HEADER_VALUE_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(slots=True)
class NewMessage:
    """A message that passed validation, ready for the target check and the INSERT."""

    target: str
    method: str
    headers: str | None  # JSON text
    body: bytes | None
    priority: int
    dedup_key: str | None
    ordering_key: str | None
    max_attempts: int | None
    timeout_seconds: float
    delay_seconds: float | None
    not_before: datetime | None


def check_queue_name(name: str) -> str:
    if not QUEUE_NAME.fullmatch(name):  # not match(): "$" also matches before a final "\n"
        raise ApiError(
            400,
            "invalid_queue_name",
            "queue names are 1-128 characters of letters, digits, '.', '_' and '-', "
            "starting with a letter or digit",
            "queue",
        )
    return name


MAX_ID = 2**63 - 1
ID_DIGITS = re.compile(r"[0-9]{1,19}")


def parse_id(raw: object) -> int | None:
    """A message id given as a string (path, query or JSON), or None if it cannot be one.

    ASCII digits only: str.isdigit() also accepts '²' and other digits that int() refuses.
    """
    if not isinstance(raw, str) or not ID_DIGITS.fullmatch(raw):
        return None
    value = int(raw)
    return value if value <= MAX_ID else None


def parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"request body is not valid JSON: {exc}") from None


def _int(value: Any, field: str, low: int, high: int) -> int:
    if type(value) is not int:  # bool is an int subclass; refuse it too
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise invalid(field, f"{field} must be an integer")
    if not low <= value <= high:
        raise invalid(field, f"{field} must be between {low} and {high}")
    return int(value)


def _number(value: Any, field: str, low: float, high: float, *, open_low: bool = False) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise invalid(field, f"{field} must be a number")
    if value < low or value > high or (open_low and value == low):
        bound = f"greater than {low:g}" if open_low else f"at least {low:g}"
        raise invalid(field, f"{field} must be {bound} and at most {high:g}")
    return float(value)


def _key(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_KEY_LENGTH:
        raise invalid(field, f"{field} must be a non-empty string of at most {MAX_KEY_LENGTH}")
    if "\x00" in value:
        raise invalid(field, f"{field} must not contain NUL characters")
    return value


def _url_text(value: str, field: str, what: str) -> str:
    """Refuse what no URL may hold, and what urllib cannot parse (e.g. an unclosed '[::1')."""
    problem = _url_problem(value)
    if problem is not None:
        raise invalid(field, f"{what} {problem}")
    return value


@functools.lru_cache(maxsize=4096)
def _url_problem(value: str) -> str | None:
    # Cached: a batch usually names one target a hundred times.
    if CONTROL_CHARACTERS.search(value):
        return "must not contain control characters"
    try:
        parts = urlsplit(value)
        _ = parts.port  # an out-of-range or non-numeric port raises too
    except ValueError as exc:
        return f"is not a valid URL: {exc}"
    return None


def _headers(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid(field, "headers must be an object of header names to string values")
    if len(value) > MAX_HEADERS:
        raise invalid(field, f"at most {MAX_HEADERS} headers")
    for name, header_value in value.items():
        if not HEADER_NAME.fullmatch(name):
            raise invalid(field, f"{name!r} is not a valid header name")
        lowered = name.lower()
        if lowered in RESERVED_HEADERS or lowered.startswith("ap4k-"):
            raise invalid(field, f"header {name!r} is set by ap4k and cannot be overridden")
        if not isinstance(header_value, str) or HEADER_VALUE_FORBIDDEN.search(header_value):
            raise invalid(
                field, f"header {name!r} must be a string without line breaks or control characters"
            )
    return orjson.dumps(value).decode() if value else None


def _timestamp(value: Any, field: str) -> datetime:
    if not isinstance(value, str):
        raise invalid(field, f"{field} must be an RFC 3339 timestamp string")
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise invalid(
            field, f"{field} must be an RFC 3339 timestamp, e.g. 2030-01-01T00:00:00Z"
        ) from None
    if when.tzinfo is None:
        raise invalid(field, f"{field} must carry a time zone (e.g. a trailing Z)")
    if when.year > 9000:
        raise invalid(field, f"{field} is too far in the future")
    try:
        # In UTC, as stored; a time zone can push year 1 or 9999 off the calendar.
        return when.astimezone(UTC)
    except OverflowError:
        raise invalid(field, f"{field} is out of range") from None


def parse_message(data: Any, prefix: str = "") -> NewMessage:
    """One message object of the API; `prefix` locates it in a batch (`messages[3].`)."""
    if not isinstance(data, dict):
        raise invalid(prefix.rstrip(".") or "body", "a message must be a JSON object")
    unknown = data.keys() - MESSAGE_FIELDS
    if unknown:
        name = sorted(unknown)[0]
        raise invalid(prefix + name, f"unknown field {name!r}")

    target = data.get("target")
    if not isinstance(target, str) or not target:
        raise invalid(prefix + "target", "target is required: an http(s) URL or a path")
    if len(target) > MAX_TARGET_LENGTH:
        raise invalid(prefix + "target", f"target is longer than {MAX_TARGET_LENGTH} characters")
    _url_text(target, prefix + "target", "target")

    method = data.get("method", "POST")
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise invalid(prefix + "method", f"method must be one of {sorted(METHODS)}")

    body = orjson.dumps(data["body"]) if "body" in data else None

    delay = data.get("delay_seconds")
    not_before = data.get("not_before")
    if delay is not None and not_before is not None:
        raise invalid(prefix + "delay_seconds", "give delay_seconds or not_before, not both")

    priority = data.get("priority", 0)
    dedup_key = data.get("dedup_key")
    ordering_key = data.get("ordering_key")
    max_attempts = data.get("max_attempts")
    timeout = data.get("timeout_seconds")
    return NewMessage(
        target=target,
        method=method.upper(),
        headers=_headers(data.get("headers"), prefix + "headers"),
        body=body,
        priority=(
            priority
            if type(priority) is int and -PRIORITY_LIMIT <= priority <= PRIORITY_LIMIT
            else _int(priority, prefix + "priority", -PRIORITY_LIMIT, PRIORITY_LIMIT)
        ),
        dedup_key=None if dedup_key is None else _key(dedup_key, prefix + "dedup_key"),
        ordering_key=None if ordering_key is None else _key(ordering_key, prefix + "ordering_key"),
        max_attempts=(
            None
            if max_attempts is None
            else _int(max_attempts, prefix + "max_attempts", 1, MAX_ATTEMPTS_LIMIT)
        ),
        timeout_seconds=(
            DEFAULT_TIMEOUT_SECONDS
            if timeout is None
            else _number(
                timeout, prefix + "timeout_seconds", MIN_TIMEOUT_SECONDS, MAX_TIMEOUT_SECONDS
            )
        ),
        delay_seconds=(
            None
            if delay is None
            else _number(delay, prefix + "delay_seconds", 0, MAX_DELAY_SECONDS)
        ),
        not_before=None if not_before is None else _timestamp(not_before, prefix + "not_before"),
    )


def parse_enqueue(data: Any) -> tuple[list[NewMessage], bool]:
    """The body of POST /v1/queues/{queue}/messages: (messages, is_batch)."""
    if isinstance(data, dict) and "messages" in data:
        if len(data) != 1:
            extra = sorted(data.keys() - {"messages"})[0]
            raise invalid(extra, f"a batch holds only 'messages'; unexpected field {extra!r}")
        batch = data["messages"]
        if not isinstance(batch, list) or not batch:
            raise invalid("messages", "messages must be a non-empty array")
        if len(batch) > MAX_BATCH:
            raise invalid("messages", f"a batch holds at most {MAX_BATCH} messages")
        return [parse_message(m, f"messages[{i}].") for i, m in enumerate(batch)], True
    return [parse_message(data)], False


# -- queue settings ---------------------------------------------------------------------

SETTING_FIELDS = (
    "max_attempts",
    "min_backoff_seconds",
    "max_backoff_seconds",
    "rate_limit_per_second",
    "max_concurrency",
    "paused",
    "base_url",
    "allowed_targets",
    "signing_secret",
)


def _url_prefix(value: Any, field: str) -> str:
    if (
        not isinstance(value, str)
        or not value.startswith(("http://", "https://"))
        or len(value) > MAX_TARGET_LENGTH
        or len(value.split("://", 1)[1]) == 0
    ):
        raise invalid(field, f"{field} must be an http(s) URL")
    _url_text(value, field, field)
    if not urlsplit(value).hostname:
        raise invalid(field, f"{field} must name a host")
    return value


def parse_settings(data: Any) -> dict[str, Any]:
    """The body of PUT /v1/queues/{queue}: only the fields given, each checked."""
    if not isinstance(data, dict):
        raise invalid("body", "queue settings must be a JSON object")
    unknown = data.keys() - set(SETTING_FIELDS)
    if unknown:
        name = sorted(unknown)[0]
        raise invalid(name, f"unknown setting {name!r}; settings are {list(SETTING_FIELDS)}")
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name == "max_attempts":
            out[name] = _int(value, name, 1, MAX_ATTEMPTS_LIMIT)
        elif name in ("min_backoff_seconds", "max_backoff_seconds"):
            out[name] = _number(value, name, 0, 86400.0)
        elif name == "rate_limit_per_second":
            out[name] = None if value is None else _number(value, name, 0, 1e6, open_low=True)
        elif name == "max_concurrency":
            out[name] = None if value is None else _int(value, name, 1, 1_000_000)
        elif name == "paused":
            if not isinstance(value, bool):
                raise invalid(name, "paused must be true or false")
            out[name] = value
        elif name == "base_url":
            out[name] = None if value is None else _url_prefix(value, name)
        elif name == "allowed_targets":
            if value is None:
                value = []
            if not isinstance(value, list) or len(value) > 100:
                raise invalid(name, "allowed_targets must be an array of at most 100 URL prefixes")
            out[name] = [_url_prefix(v, name) for v in value]
        elif name == "signing_secret":
            if value is not None and (
                not isinstance(value, str) or not 1 <= len(value) <= 256 or "\x00" in value
            ):
                raise invalid(
                    name, "signing_secret must be a string of 1 to 256 characters, without NUL"
                )
            out[name] = value
    low = out.get("min_backoff_seconds")
    high = out.get("max_backoff_seconds")
    if low is not None and high is not None and high < low:
        raise invalid("max_backoff_seconds", "max_backoff_seconds must be >= min_backoff_seconds")
    return out
