"""Turning request bodies into checked wire objects, with a clear error for each bad field.

The shapes, types and bounds are declared once in `ap4k.core.wire`; msgspec checks them while
it decodes (a batch of 100 messages in a few microseconds). Its error is turned into the API's
`{"error": {"code", "message", "field"}}` with the field's path (`messages[3].priority`).
What no type can say is checked here afterwards: a target urllib cannot parse, a header ap4k
sets itself, a method in lower case, a time off the calendar.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from datetime import UTC
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from ap4k.core import names, signatures, wire
from ap4k.core.limits import MAX_HEADER_FIELD_BYTES
from ap4k.server.errors import ApiError, invalid

QUEUE_NAME = names.QUEUE_NAME
# Headers that belong to the transport or to ap4k itself, not to the message.
RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te"}
    | {"webhook-id", "webhook-timestamp", "webhook-signature"}  # Standard Webhooks' own
)
SETTING_FIELDS = wire.QueueSettingsUpdate.__struct_fields__

T = TypeVar("T")


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


# -- msgspec's errors as the API's ------------------------------------------------------------


def refusal(error: msgspec.ValidationError, *, indexed: bool = True) -> ApiError:
    """The 400 for a msgspec validation error. `indexed=False` drops list positions from the
    field (`acks.id`, not `acks[3].id`), as the carrier protocol has always named them."""
    field, problem = wire.describe(error, indexed=indexed)
    field = field or "body"
    return invalid(field, f"{field}: {problem}")


def malformed(error: msgspec.DecodeError) -> ApiError:
    return ApiError(400, "malformed_json", f"request body is not valid JSON: {error}")


def _refused(exc: msgspec.ValidationError, raw: bytes, *, indexed: bool = True) -> ApiError:
    # msgspec stops at the first wrong type, before it has read the rest: `[` is "not an
    # object" to it. Malformed JSON is told as such, whatever the types said.
    try:
        msgspec.json.decode(raw)
    except msgspec.DecodeError as malformed_json:
        return malformed(malformed_json)
    return refusal(exc, indexed=indexed)


def decode(decoder: msgspec.json.Decoder[T], raw: bytes, *, indexed: bool = True) -> T:
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise _refused(exc, raw, indexed=indexed) from None
    except msgspec.DecodeError as exc:
        raise malformed(exc) from None


# -- messages -----------------------------------------------------------------------------------

# The URL fields of an enqueued message are decoded without their `Target` pattern (no
# control characters), which msgspec would run as a regex on every string, a hundred times
# for a batch naming one target: most of the batch's decoding time. `_check_url` runs the
# same pattern once per distinct string (cached) and refuses with msgspec's own words.
# Everything else about the message, and its OpenAPI schema, is wire.MessageIn's.
_UncheckedTarget = Annotated[str, Meta(min_length=1, max_length=wire.MAX_TARGET_LENGTH)]


class _DecodedMessage(wire.MessageIn):
    target: _UncheckedTarget | msgspec.UnsetType = msgspec.UNSET
    callback: _UncheckedTarget | None = None
    failure_callback: _UncheckedTarget | None = None


class _DecodedBatch(msgspec.Struct, forbid_unknown_fields=True):
    messages: Annotated[list[_DecodedMessage], Meta(min_length=1, max_length=wire.MAX_BATCH)]


_MESSAGE = msgspec.json.Decoder(_DecodedMessage)
_BATCH = msgspec.json.Decoder(_DecodedBatch)
# A batch is told from a message by its one field: decoding it as a message stops there.
_BATCH_HINT = "Object contains unknown field `messages`"
_NO_CONTROLS = re.compile(wire.NO_CONTROLS)


@functools.lru_cache(maxsize=4096)
def _url_problem(value: str) -> str | None:
    # Cached: a batch usually names one target a hundred times.
    try:
        parts = urlsplit(value)
        _ = parts.port  # an out-of-range or non-numeric port raises too
    except ValueError as exc:
        return f"is not a valid URL: {exc}"
    return None


@functools.lru_cache(maxsize=4096)
def _has_controls(value: str) -> bool:
    return _NO_CONTROLS.search(value) is None


def _check_url(value: str | None, prefix: str, name: str) -> None:
    """`prefix + name`: the field, spelt out only for an error."""
    if value is None:
        return
    if _has_controls(value):  # what the Target pattern says, as msgspec says it
        field = prefix + name
        raise invalid(field, f"{field}: expected `str` matching regex {wire.NO_CONTROLS!r}")
    problem = _url_problem(value)
    if problem is not None:
        raise invalid(prefix + name, f"{name} {problem}")


def check_headers(headers: dict[str, str] | None, field: str) -> None:
    for name, value in (headers or {}).items():
        lowered = name.lower()
        if lowered in RESERVED_HEADERS or lowered.startswith("ap4k-"):
            raise invalid(field, f"header {name!r} is set by ap4k and cannot be overridden")
        if len(name) + len(value.encode()) > MAX_HEADER_FIELD_BYTES:
            raise invalid(
                field,
                f"header {name!r} is longer than {MAX_HEADER_FIELD_BYTES} bytes (name and "
                "UTF-8 value): its delivery would be refused",
            )


def _check_message(m: wire.MessageBase, prefix: str) -> None:
    """What the wire types cannot say; normalises the method and not_before in place."""
    # Field names are only spelt out for an error: a batch checks a thousand messages.
    if isinstance(m.target, str):  # a topic's message has none
        _check_url(m.target, prefix, "target")
    if m.callback is not None:
        _check_url(m.callback, prefix, "callback")
    if m.failure_callback is not None:
        _check_url(m.failure_callback, prefix, "failure_callback")
    if m.method not in wire.METHODS:
        method = m.method.upper()
        if method not in wire.METHODS:
            raise invalid(prefix + "method", f"method must be one of {list(wire.METHODS)}")
        m.method = method
    if m.headers:
        check_headers(m.headers, prefix + "headers")
    if isinstance(m, wire.PublishedMessage) and m.not_before is not None:
        if m.not_before.year > 9000:
            raise invalid(prefix + "not_before", "not_before is too far in the future")
        try:
            # In UTC, as stored; a time zone can push year 1 or 9999 off the calendar.
            m.not_before = m.not_before.astimezone(UTC)
        except OverflowError:
            raise invalid(prefix + "not_before", "not_before is out of range") from None
    if m.timeout_seconds is None:
        m.timeout_seconds = wire.DEFAULT_TIMEOUT_SECONDS


# How deep a message body may nest arrays and objects. msgspec reads and writes nested JSON
# recursively, so Python's recursion limit bounds it anyway (a little under 1,000 levels,
# depending on the stack): this fixed limit, well inside that, makes the answer the same
# everywhere.
MAX_BODY_DEPTH = 500


def too_deep(field: str) -> ApiError:
    return invalid(field, f"{field} nests arrays or objects deeper than {MAX_BODY_DEPTH} levels")


def _nests_deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` holds more than `limit` levels of arrays and objects (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_enqueue(raw: bytes) -> tuple[list[wire.MessageIn], bool]:
    """The body of POST /v1/queues/{queue}/messages: (messages, is_batch)."""
    messages: list[wire.MessageIn]
    try:
        messages = [_MESSAGE.decode(raw)]
        is_batch = False
    except msgspec.ValidationError as exc:
        if not str(exc).startswith(_BATCH_HINT) or " - at `" in str(exc):
            raise _refused(exc, raw) from None
        try:
            messages = list(decode(_BATCH, raw).messages)
        except RecursionError:
            raise too_deep("messages") from None
        is_batch = True
    except msgspec.DecodeError as exc:
        raise malformed(exc) from None
    except RecursionError:  # only `body` may hold nested JSON
        raise too_deep("body") from None
    # Fewer brackets in the whole request than the limit: no body can nest that deep.
    deep = raw.count(b"[") + raw.count(b"{") > MAX_BODY_DEPTH
    for i, m in enumerate(messages):
        prefix = f"messages[{i}]." if is_batch else ""
        _check_message(m, prefix)
        if deep and _nests_deeper_than(m.body, MAX_BODY_DEPTH):
            raise too_deep(prefix + "body")
    return messages, is_batch


def encode_body(m: wire.MessageBase, field: str = "body") -> bytes | None:
    """The message's body as stored: JSON bytes, or None when it has none."""
    try:
        return None if m.body is msgspec.UNSET else msgspec.json.encode(m.body)
    except RecursionError:
        raise too_deep(field) from None


# -- queue settings -------------------------------------------------------------------------

_SETTINGS = msgspec.json.Decoder(wire.QueueSettingsUpdate)


def _url_prefix(value: str, field: str) -> str:
    problem = _url_problem(value)
    if problem is not None:
        raise invalid(field, f"{field} {problem}")
    if not urlsplit(value).hostname:
        raise invalid(field, f"{field} must name a host")
    return value


def parse_settings(raw: bytes) -> dict[str, Any]:
    """The body of PUT /v1/queues/{queue}: only the fields given, each checked."""
    changes = decode(_SETTINGS, raw, indexed=False).changes()
    if changes.get("base_url") is not None:
        _url_prefix(changes["base_url"], "base_url")
    if "allowed_targets" in changes:
        changes["allowed_targets"] = [
            _url_prefix(v, "allowed_targets") for v in changes["allowed_targets"] or ()
        ]
    for secret in changes.get("signing_secrets") or ():
        try:
            signatures.secret_key(secret)
        except ValueError as exc:
            raise invalid("signing_secrets", f"signing_secrets: {exc}") from None
    check_backoff(changes.get("min_backoff_seconds"), changes.get("max_backoff_seconds"))
    return changes


def check_backoff(low: float | None, high: float | None) -> None:
    problem = wire.backoff_problem(low, high)
    if problem is not None:
        raise invalid("max_backoff_seconds", problem)


# -- the carrier protocol ---------------------------------------------------------------------


def carrier_identity(carrier: str) -> str:
    """Who holds a carrier's leases: `carrier:<its id>`."""
    if not carrier.isprintable():
        raise invalid("carrier", "carrier must be the carrier's id: printable text")
    return f"carrier:{carrier}"


def lease_queues(queues: list[str] | None) -> list[str] | None:
    if queues is not None and not all(QUEUE_NAME.fullmatch(q) for q in queues):
        raise invalid("queues", "queues must be an array of valid queue names")
    return queues


def lease_ids(refs: Sequence[wire.LeaseRef | wire.Ack], field: str) -> list[int]:
    ids = []
    for ref in refs:
        msg_id = parse_id(ref.id)
        if msg_id is None:
            raise invalid(f"{field}.id", "id must be a message id string")
        ids.append(msg_id)
    return ids


LEASE = msgspec.json.Decoder(wire.LeaseRequest)
ACKS = msgspec.json.Decoder(wire.AckRequest)
EXTEND = msgspec.json.Decoder(wire.ExtendRequest)
RELEASE = msgspec.json.Decoder(wire.ReleaseRequest)
REDRIVE = msgspec.json.Decoder(wire.IdList)


# -- schedules and topics ---------------------------------------------------------------------

_SCHEDULE = msgspec.json.Decoder(wire.ScheduleIn)
_TOPIC = msgspec.json.Decoder(wire.TopicIn)
_PUBLISHED = msgspec.json.Decoder(wire.PublishedMessage)


def check_name(name: str, what: str) -> str:
    """A schedule's, topic's or subscription's name: the queue name rule."""
    if not QUEUE_NAME.fullmatch(name):
        raise invalid(
            what,
            f"{what} names are 1-128 characters of letters, digits, '.', '_' and '-', "
            "starting with a letter or digit",
        )
    return name


def parse_schedule(raw: bytes) -> wire.ScheduleIn:
    """The body of PUT /v1/schedules/{name}; the cron and time zone are checked by the
    caller (`schedules.check`), which knows what they mean."""
    schedule = decode(_SCHEDULE, raw)
    check_queue_name_field(schedule.queue, "queue")
    _check_message(schedule.message, "message.")
    return schedule


def check_queue_name_field(name: str, field: str) -> None:
    if not QUEUE_NAME.fullmatch(name):
        raise invalid(field, f"{field} must be a queue name")


def parse_topic(raw: bytes) -> wire.TopicIn:
    """The body of PUT /v1/topics/{topic}: subscriptions with distinct names."""
    topic = decode(_TOPIC, raw)
    seen: set[str] = set()
    for i, sub in enumerate(topic.subscriptions):
        prefix = f"subscriptions[{i}]."
        check_name(sub.name, prefix + "name")
        if sub.name in seen:
            raise invalid(prefix + "name", f"subscription {sub.name!r} is named twice")
        seen.add(sub.name)
        if sub.queue is not None:
            check_queue_name_field(sub.queue, prefix + "queue")
        _check_url(sub.target, prefix, "target")
        check_headers(sub.headers, prefix + "headers")
    return topic


def parse_published(raw: bytes) -> wire.PublishedMessage:
    """The body of POST /v1/topics/{topic}/messages: a message without a target."""
    message = decode(_PUBLISHED, raw)
    _check_message(message, "")
    return message
