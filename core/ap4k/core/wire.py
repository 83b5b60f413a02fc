"""The HTTP API's wire objects, declared once: every body that the server takes or gives.

The server decodes and checks requests with these declarations (msgspec validates while it
parses, in C), the OpenAPI document is generated from them (`msgspec.json.schema_components`),
the client sends and reads them, and the operator checks an AsyncQueue's queue settings with
the same ones. A bound is therefore one edit here: tests/wire/test_wire.py reads each queue
setting's bound back from the server, the client, the OpenAPI document and the CRD.

What a type cannot say (a URL that parses, a header ap4k reserves, a delay given twice) is
checked after decoding by the server (`ap4k.server.validation`), with the same error body.

Import only the standard library and msgspec here: `pip install ap4k` (the client) has
nothing else but aiohttp and orjson.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect
from msgspec import UNSET, Meta, Struct, UnsetType

from ap4k.core import names
from ap4k.core.limits import MAX_HEADER_FIELD_BYTES

# -- bounds -----------------------------------------------------------------------------------

MAX_BATCH = 1000
MAX_TARGET_LENGTH = 4096
MAX_HEADERS = 64
MAX_KEY_LENGTH = 256
PRIORITY_LIMIT = 1000
MAX_ATTEMPTS_LIMIT = 1000
MAX_DELAY_SECONDS = 365 * 86400.0
# A delivery timeout under a millisecond means nothing, and the column is a float4 that
# rounds tiny values to 0, which the HTTP client would read as "no timeout at all".
MIN_TIMEOUT_SECONDS = 0.001
MAX_TIMEOUT_SECONDS = 1800.0
DEFAULT_TIMEOUT_SECONDS = 30.0
MAX_BACKOFF_LIMIT_SECONDS = 86400.0
MAX_RATE_LIMIT = 1e6
MAX_CONCURRENCY_LIMIT = 1_000_000
MAX_ALLOWED_TARGETS = 100
MAX_LEASE_IDS = 10_000
MAX_LEASE_ATTEMPT = 1_000_000
MAX_PAGE = 1000  # messages per page (browsing, dead letters)
MAX_THROUGHPUT_WINDOW = 3600.0  # seconds GET /v1/throughput looks back at most
EXCERPT_LENGTH = 1024  # characters of a failed answer's body kept in the attempt history

# Patterns end in `$(?!\\n)`: msgspec matches with Python's `re`, whose `$` also matches before
# a final newline ("name\\n" would pass); the lookahead means the same in JSON Schema's dialect.
END = "$(?!\\n)"
METHODS = ("DELETE", "GET", "PATCH", "POST", "PUT")
STATES = ("scheduled", "available", "running", "retryable", "completed", "discarded", "cancelled")
# Shared with the CRD, whose dialect has no lookahead: the server checks with fullmatch.
QUEUE_NAME_PATTERN = names.QUEUE_NAME_PATTERN
HEADER_NAME_PATTERN = "^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}" + END
# C0 controls and DEL: never part of a URL, and NUL cannot even be stored in a text column.
NO_CONTROLS = "^[^\\x00-\\x1f\\x7f]*" + END
NO_NUL = "^[^\\x00]*" + END
# RFC 9110 field-value: no controls but horizontal tab.
HEADER_VALUE_PATTERN = "^[^\\x00-\\x08\\x0a-\\x1f\\x7f]*" + END
URL_PREFIX_PATTERN = "^https?://[^\\x00-\\x1f\\x7f]+" + END
MESSAGE_ID_PATTERN = "^[0-9]{1,19}" + END

# -- field types ------------------------------------------------------------------------------

Target = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_TARGET_LENGTH,
        pattern=NO_CONTROLS,
        description="http(s) URL, or a path joined to the queue's base_url",
    ),
]
Method = Annotated[str, Meta(extra_json_schema={"enum": list(METHODS)})]
HeaderName = Annotated[str, Meta(pattern=HEADER_NAME_PATTERN)]
# At most MAX_HEADER_FIELD_BYTES for name and UTF-8 value together (checked in the server).
HeaderValue = Annotated[
    str, Meta(pattern=HEADER_VALUE_PATTERN, max_length=MAX_HEADER_FIELD_BYTES)
]
Headers = Annotated[dict[HeaderName, HeaderValue], Meta(max_length=MAX_HEADERS)]
Key = Annotated[str, Meta(min_length=1, max_length=MAX_KEY_LENGTH, pattern=NO_NUL)]
Priority = Annotated[int, Meta(ge=-PRIORITY_LIMIT, le=PRIORITY_LIMIT)]
Attempts = Annotated[int, Meta(ge=1, le=MAX_ATTEMPTS_LIMIT)]
DelaySeconds = Annotated[float, Meta(ge=0, le=MAX_DELAY_SECONDS)]
TimeoutSeconds = Annotated[float, Meta(ge=MIN_TIMEOUT_SECONDS, le=MAX_TIMEOUT_SECONDS)]
Timestamp = Annotated[datetime, Meta(tz=True)]
BackoffSeconds = Annotated[float, Meta(ge=0, le=MAX_BACKOFF_LIMIT_SECONDS)]
RateLimit = Annotated[
    float,
    Meta(
        gt=0,
        le=MAX_RATE_LIMIT,
        description="Deliveries per second across the queue (unset means unlimited).",
    ),
]
Concurrency = Annotated[
    int,
    Meta(
        ge=1,
        le=MAX_CONCURRENCY_LIMIT,
        description="Deliveries in flight across the queue (unset means unlimited).",
    ),
]
UrlPrefix = Annotated[str, Meta(max_length=MAX_TARGET_LENGTH, pattern=URL_PREFIX_PATTERN)]
AllowedTargets = Annotated[
    list[UrlPrefix],
    Meta(max_length=MAX_ALLOWED_TARGETS, description="URL prefixes that targets must start with."),
]
SigningSecret = Annotated[str, Meta(min_length=1, max_length=256, pattern=NO_NUL)]
# Standard Webhooks' form: "whsec_" and the base64 of 24 to 64 random bytes.
WEBHOOK_SECRET_PATTERN = "^whsec_[A-Za-z0-9+/]{32,88}={0,2}" + END
MAX_SIGNING_SECRETS = 2
WebhookSecret = Annotated[str, Meta(pattern=WEBHOOK_SECRET_PATTERN)]
SigningSecrets = Annotated[
    list[WebhookSecret],
    Meta(
        max_length=MAX_SIGNING_SECRETS,
        description=(
            "Standard Webhooks secrets (whsec_<base64>), oldest first: every delivery carries "
            "one webhook-signature entry per secret, so a rotation is add, move receivers, drop."
        ),
    ),
]


class CircuitBreaker(Struct, forbid_unknown_fields=True):
    """A circuit per target origin (scheme://host:port): when retry-class failures (5xx, 408,
    429, timeouts, connection errors) reach `failure_ratio` of at least `min_attempts`
    attempts within `window_seconds`, the origin's messages are held, spending no attempts,
    for `open_seconds`; then one probe delivery closes it (success) or opens it again."""

    failure_ratio: Annotated[
        float, Meta(gt=0, le=1, description="Failed share of the attempts that opens it.")
    ] = 0.5
    min_attempts: Annotated[
        int, Meta(ge=1, le=1_000_000, description="Attempts in the window before it can open.")
    ] = 10
    window_seconds: Annotated[
        float, Meta(gt=0, le=86400, description="How long outcomes count towards opening.")
    ] = 60.0
    open_seconds: Annotated[
        float, Meta(gt=0, le=86400, description="How long it holds messages before a probe.")
    ] = 30.0


class FlowLimits(Struct, forbid_unknown_fields=True):
    """Limits applied to each distinct `flow_key` of the queue separately (messages without a
    key are limited by the queue's own limits only). Unset: no such limit."""

    rate_limit_per_second: (
        Annotated[
            float,
            Meta(
                gt=0,
                le=MAX_RATE_LIMIT,
                description="Deliveries per second per key (a token bucket of one second).",
            ),
        ]
        | None
    ) = None
    max_concurrency: (
        Annotated[
            int,
            Meta(ge=1, le=MAX_CONCURRENCY_LIMIT, description="Deliveries in flight per key."),
        ]
        | None
    ) = None


QueueName = Annotated[str, Meta(pattern=QUEUE_NAME_PATTERN)]
MessageId = Annotated[str, Meta(pattern=MESSAGE_ID_PATTERN)]
CarrierId = Annotated[
    str, Meta(min_length=1, max_length=200, description="the carrier's id, printable text")
]
Verdict = Literal["delivered", "retry", "fail"]

# -- messages ---------------------------------------------------------------------------------


class MessageBase(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What every message may say, however it is enqueued: the request ap4k will make
    (`target`, `method`, `headers`, `body`: any JSON value, delivered as the JSON request
    body; left out, none is sent), its `priority` and `ordering_key`, its retry policy, and
    where to report its end: `callback` is POSTed to when it is delivered,
    `failure_callback` when it lands in the dead letters (URLs, or paths on the queue's
    base_url, checked like targets).

    `target` is a URL, or a path joined to the queue's `base_url`: required in a message
    (`MessageIn`) and a schedule's (`ScheduledMessage`), refused in one published to a topic
    (`PublishedMessage`), whose subscriptions name the targets. (It is typed optional here
    so that it can come first: `MessageIn(target, body)`.)
    """

    target: Target | UnsetType = UNSET
    body: Any = UNSET
    method: Method = "POST"
    headers: Headers | None = None
    priority: Priority = 0
    ordering_key: Key | None = None
    max_attempts: Attempts | None = None
    timeout_seconds: TimeoutSeconds | None = None
    callback: Target | None = None
    failure_callback: Target | None = None
    flow_key: Key | None = None

    @property
    def url(self) -> str:
        """The target, which a message has (its __post_init__ saw to that)."""
        assert isinstance(self.target, str)
        return self.target

    def _require_target(self) -> None:
        # Runs when the server decodes a message and when an application builds one. The
        # message says which field is at fault ("field: …"); see `describe`.
        if not isinstance(self.target, str) or not self.target:
            raise ValueError("target: target is required: an http(s) URL or a path")


class ScheduledMessage(MessageBase):
    """The message a schedule enqueues at each fire time. No delay, `not_before` or
    `dedup_key`: the fire time is the message's time, and its dedup key is the schedule's."""

    def __post_init__(self) -> None:
        self._require_target()


class PublishedMessage(MessageBase):
    """A message published to a topic (each subscription names the target). Give at most
    one of `delay_seconds` and `not_before`. With a `dedup_key`, enqueueing is idempotent:
    the same key in the same queue returns the existing message (that is what makes retries
    safe); a topic applies it per subscription."""

    delay_seconds: DelaySeconds | None = None
    not_before: Timestamp | None = None
    dedup_key: Key | None = None

    def __post_init__(self) -> None:
        if self.target is not UNSET:
            raise ValueError("target: a topic's subscriptions name the targets; leave it out")
        self._check_timing()

    def _check_timing(self) -> None:
        if self.delay_seconds is not None:
            if self.not_before is not None:
                raise ValueError("delay_seconds: give delay_seconds or not_before, not both")
            if self.delay_seconds < 0:
                raise ValueError("delay_seconds: delay_seconds must not be negative")
        if self.not_before is not None and self.not_before.tzinfo is None:
            raise ValueError("not_before: not_before must be timezone-aware")


class MessageIn(PublishedMessage):
    """One message to enqueue: the HTTP request ap4k will make later, and how (the fields
    of `MessageBase` and `PublishedMessage`, `target` required)."""

    def __post_init__(self) -> None:
        self._require_target()
        self._check_timing()


class Batch(Struct, forbid_unknown_fields=True):
    """Several messages in one request: all are enqueued, or (one being bad) none."""

    messages: Annotated[list[MessageIn], Meta(min_length=1, max_length=MAX_BATCH)]


class Enqueued(Struct):
    """The answer to an enqueue: committed, with this id and state."""

    id: str
    state: str
    duplicate: bool = False


class BatchEnqueued(Struct):
    messages: list[Enqueued]


class MessageView(Struct):
    """A message as the server reports it (`GET /v1/messages/{id}`, dead letters)."""

    id: str
    queue: str
    state: str
    target: str
    method: str = "POST"
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    body: Any = None
    priority: int = 0
    dedup_key: str | None = None
    ordering_key: str | None = None
    attempt: int = 0
    max_attempts: int | None = None
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    last_error: str | None = None
    created_at: datetime | None = None
    scheduled_at: datetime | None = None
    attempted_at: datetime | None = None
    finalized_at: datetime | None = None
    # The last answer: the success's status, or the last failed attempt's status and the
    # start of its body.
    last_status: int | None = None
    last_response_excerpt: str | None = None
    callback: str | None = None
    failure_callback: str | None = None
    flow_key: str | None = None


class Attempt(Struct):
    """One delivery attempt. Failures keep who made it and the start of the answer; a
    success keeps its status and duration."""

    attempt: int
    at: datetime | None
    outcome: Literal["retried", "dead", "delivered"]
    duration_ms: float | None = None
    status: int | None = None  # the HTTP status, when the target answered
    error: str | None = None  # "HTTP 503 Service Unavailable", "connection error: …", …
    response_excerpt: str | None = None  # the first KiB of a failed answer's body
    carrier: str | None = None  # "dispatcher/<host>/<pid>" or "carrier:<id>"


class MessageDetail(MessageView):
    """`GET /v1/messages/{id}`: the message and its attempts, oldest first."""

    attempts: list[Attempt] = msgspec.field(default_factory=list)


class Cancelled(Struct):
    id: str
    state: str = "cancelled"


class MessagePage(Struct):
    """One page of a queue's messages (browsing, dead letters); pass `next` as `after` for
    the following page (null: this is the last)."""

    messages: list[MessageView]
    next: str | None = None


DeadLetters = MessagePage


class IdList(Struct, forbid_unknown_fields=True):
    """The optional body of a redrive: which dead letters (all when absent)."""

    ids: Annotated[list[MessageId | int], Meta(max_length=MAX_LEASE_IDS)] | None = None


class Redriven(Struct):
    redriven: int


class Purged(Struct):
    purged: int


# -- queues -----------------------------------------------------------------------------------


class QueueSettingsUpdate(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The body of `PUT /v1/queues/{queue}`: only the settings given are changed."""

    max_attempts: Attempts | UnsetType = UNSET
    min_backoff_seconds: BackoffSeconds | UnsetType = UNSET
    max_backoff_seconds: BackoffSeconds | UnsetType = UNSET
    rate_limit_per_second: RateLimit | UnsetType | None = UNSET
    max_concurrency: Concurrency | UnsetType | None = UNSET
    paused: bool | UnsetType = UNSET
    base_url: UrlPrefix | UnsetType | None = UNSET
    allowed_targets: AllowedTargets | UnsetType | None = UNSET
    # Write-only: the server reports only whether one is set. Deprecated: the Ap4k-Signature
    # header it makes stays for one version; `signing_secrets` is its successor.
    signing_secret: SigningSecret | UnsetType | None = UNSET
    # Write-only: the server reports only how many are set.
    signing_secrets: SigningSecrets | UnsetType | None = UNSET
    circuit_breaker: CircuitBreaker | UnsetType | None = UNSET
    flow_limits: FlowLimits | UnsetType | None = UNSET

    def changes(self) -> dict[str, Any]:
        """The settings given, by name."""
        return {
            name: value
            for name in self.__struct_fields__
            if (value := getattr(self, name)) is not UNSET
        }


class QueueSettingsView(Struct):
    """A queue's settings as the server reports them; the defaults are a new queue's."""

    max_attempts: int = 25
    min_backoff_seconds: float = 0.1
    max_backoff_seconds: float = 3600.0
    rate_limit_per_second: float | None = None
    max_concurrency: int | None = None
    paused: bool = False
    base_url: str | None = None
    allowed_targets: list[str] = msgspec.field(default_factory=list)
    signing_secret_set: bool = False
    signing_secrets_set: int = 0
    circuit_breaker: CircuitBreaker | None = None
    flow_limits: FlowLimits | None = None


def _object_settings() -> dict[str, type[Struct]]:
    """The settings whose values are objects, by name, with their struct."""
    found: dict[str, type[Struct]] = {}
    for field in msgspec.inspect.type_info(QueueSettingsView).fields:  # type: ignore[attr-defined]
        kinds = field.type.types if isinstance(field.type, msgspec.inspect.UnionType) else ()
        for kind in kinds:
            if isinstance(kind, msgspec.inspect.StructType):
                found[field.name] = kind.cls
    return found


# Stored as JSON (jsonb), spelled in camelCase field by field in the CRD.
OBJECT_SETTINGS = _object_settings()


class QueueDepth(Struct):
    """Messages per state; terminal states other than `discarded` are not counted."""

    available: int = 0
    scheduled: int = 0
    running: int = 0
    retryable: int = 0
    discarded: int = 0

    @property
    def pending(self) -> int:
        """Messages not yet delivered nor dead: the backlog."""
        return self.available + self.scheduled + self.running + self.retryable


class QueueRates(Struct):
    """Outcomes per second over the last `window_seconds`, across every server and carrier:
    deliveries that succeeded, and attempts that failed."""

    window_seconds: float = 60.0
    delivered_per_second: float = 0.0
    failed_per_second: float = 0.0


class QueueView(Struct):
    name: str
    depth: QueueDepth = msgspec.field(default_factory=QueueDepth)
    oldest_available_age_seconds: float = 0.0
    rates: QueueRates = msgspec.field(default_factory=QueueRates)
    settings: QueueSettingsView = msgspec.field(default_factory=QueueSettingsView)


class QueueList(Struct):
    queues: list[QueueView]


class QueueThroughput(Struct):
    name: str
    completed: Annotated[int, Meta(ge=0)]


class Throughput(Struct):
    """Messages delivered per queue over the last `seconds`, counted in PostgreSQL (once
    across server replicas); queues with none are left out."""

    seconds: float
    queues: list[QueueThroughput]


# -- schedules, topics and callbacks ---------------------------------------------------------

MAX_CRON_LENGTH = 256
MAX_TIMEZONE_LENGTH = 64
MAX_SUBSCRIPTIONS = 100

# Schedules, topics and subscriptions are named like queues (the same URL-safe rule).
Name = Annotated[str, Meta(pattern=QUEUE_NAME_PATTERN)]
Cron = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_CRON_LENGTH,
        pattern=NO_CONTROLS,
        description="Standard 5-field cron: minute hour day-of-month month day-of-week.",
        examples=["*/5 * * * *", "0 9 * * MON-FRI"],
    ),
]
TimeZone = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_TIMEZONE_LENGTH,
        pattern=NO_CONTROLS,
        description="An IANA time zone name (Europe/Berlin); the cron is read in it.",
    ),
]


class ScheduleIn(Struct, forbid_unknown_fields=True):
    """The body of `PUT /v1/schedules/{name}`: at each time the cron names (read in
    `timezone`), enqueue `message` to `queue`. Paused, it fires nothing."""

    queue: QueueName
    cron: Cron
    message: ScheduledMessage
    timezone: TimeZone = "UTC"
    paused: bool = False


class ScheduleView(Struct):
    """A schedule as the server reports it: `next_fire_at` is the next time it fires (none
    while paused); `last_message_id` the message its last firing enqueued; `last_error` why
    its last firing enqueued nothing, if it did not."""

    name: str
    queue: str
    cron: str
    timezone: str
    message: ScheduledMessage
    paused: bool = False
    next_fire_at: datetime | None = None
    last_fired_at: datetime | None = None
    last_message_id: str | None = None
    last_error: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class ScheduleList(Struct):
    schedules: list[ScheduleView]


class Deleted(Struct):
    deleted: str


class Subscription(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One receiver of a topic's messages: each gets its own message, in `queue` (the
    topic's name when left out), with `headers` added to the published message's."""

    name: Name
    target: Target
    queue: QueueName | None = None
    headers: Headers | None = None


class TopicIn(Struct, forbid_unknown_fields=True):
    """The body of `PUT /v1/topics/{topic}`: its subscriptions, replacing any before."""

    subscriptions: Annotated[list[Subscription], Meta(max_length=MAX_SUBSCRIPTIONS)]


class TopicView(Struct):
    name: str
    subscriptions: list[Subscription]
    created_at: datetime | None = None
    updated_at: datetime | None = None


class TopicList(Struct):
    topics: list[TopicView]


class PublishedTo(Struct):
    """The message one subscription got."""

    subscription: str
    id: str
    state: str
    duplicate: bool = False


class Published(Struct):
    """The answer to a publish: one message per subscription, all committed together."""

    messages: list[PublishedTo]


class CallbackBody(Struct):
    """The JSON body of the POST to a message's `callback` (on delivery) or
    `failure_callback` (on dead-lettering); its `Ap4k-Callback-For` header is the id too.
    `status` and `response_excerpt` are the last attempt's HTTP status and the start of
    its answer, when there was one."""

    message_id: str
    queue: str
    state: str
    attempts: int
    status: int | None
    response_excerpt: str | None
    target: str


CircuitState = Literal["open", "half_open"]


class Circuit(Struct):
    """A target origin whose messages are held (`open`) or waiting on a probe (`half_open`)."""

    origin: str
    state: CircuitState
    opened_at: datetime
    probe_at: datetime  # when an open circuit lets its probe through
    failures: int  # in the window that opened it
    attempts: int


class CircuitList(Struct):
    circuits: list[Circuit]


class FlowKey(Struct):
    """A flow key with messages in flight or ready to go."""

    flow_key: str
    in_flight: int  # running: leased, being delivered
    waiting: int  # available: ready, held back by the key's limits


class FlowKeyList(Struct):
    flow_keys: list[FlowKey]


# -- the carrier protocol -------------------------------------------------------------------




class LeasedMessage(Struct, omit_defaults=True):
    id: str
    queue: str
    attempt: int
    max_attempts: int
    target: str
    method: str
    headers: dict[str, str]
    # The stored JSON text as a string: carriers send these exact bytes.
    body_json: str | None
    timeout_seconds: float
    created_at: float
    ordering_key: str | None = None
    explicitly_allowed: bool = False


class Leased(Struct):
    messages: list[LeasedMessage]
    # By queue: the deprecated Ap4k-Signature secret, and the Standard Webhooks secrets.
    signing_secrets: dict[str, str] = msgspec.field(default_factory=dict)
    webhook_secrets: dict[str, list[str]] = msgspec.field(default_factory=dict)
    # Which of the request's `acks` were accepted (absent: the request carried none, or
    # this server did not record them).
    acks: AckResult | None = None
    # This server records the acks a lease request carries (`LeaseRequest.acks`).
    acks_on_lease: bool = False


class NewSigningSecret(Struct):
    """A secret the server made and added to a queue: shown this once, never again."""

    signing_secret: str
    signing_secrets_set: int


class SigningSecretsCount(Struct):
    signing_secrets_set: int


class LeaseRef(Struct, forbid_unknown_fields=True):
    id: MessageId
    attempt: Annotated[int, Meta(ge=1, le=MAX_LEASE_ATTEMPT)]


class Ack(Struct, forbid_unknown_fields=True, omit_defaults=True):
    id: MessageId
    attempt: Annotated[int, Meta(ge=1, le=MAX_LEASE_ATTEMPT)]
    outcome: Verdict
    error: Annotated[str, Meta(pattern=NO_NUL)] | None = None
    retry_after: Annotated[float, Meta(ge=0, le=86400)] | None = None
    duration_seconds: Annotated[float, Meta(ge=0)] | None = None
    queue: str | None = None
    # For the attempt history: the target's HTTP status and the start of its answer.
    status: Annotated[int, Meta(ge=100, le=599)] | None = None
    response_excerpt: Annotated[str, Meta(max_length=4 * EXCERPT_LENGTH)] | None = None


class AckRequest(Struct, forbid_unknown_fields=True):
    carrier: CarrierId
    acks: Annotated[list[Ack], Meta(max_length=MAX_LEASE_IDS)]


class AckResult(Struct):
    accepted: list[str]
    refused: list[str]


class LeaseRequest(Struct, forbid_unknown_fields=True):
    """Lease up to `max_messages`, long-polling up to `wait_seconds` for work.

    `acks`: outcomes of finished deliveries, as `POST /v1/acks` takes them, recorded before
    the lease; the answer's `acks` says which were accepted. Send them only to a server
    whose last `Leased` answer said `acks_on_lease` (servers before it refuse the field),
    and resend them with `POST /v1/acks` unless the answer carries `acks`."""

    carrier: CarrierId
    max_messages: Annotated[int, Meta(ge=1, le=1000)] = 100
    queues: list[QueueName] | None = None
    wait_seconds: Annotated[float, Meta(ge=0, le=60)] = 20.0
    lease_seconds: Annotated[float, Meta(ge=1, le=3600)] = 60.0
    acks: Annotated[list[Ack], Meta(max_length=MAX_LEASE_IDS)] | None = None


class Extension(Struct):
    id: str
    lease_expires_at: datetime | None


class Extended(Struct):
    extended: list[Extension]
    refused: list[str]


class ReleaseRequest(Struct, forbid_unknown_fields=True):
    """Give leases back undelivered (the messages are available again at once)."""

    carrier: CarrierId
    leases: Annotated[list[LeaseRef], Meta(max_length=MAX_LEASE_IDS)]


class ExtendRequest(ReleaseRequest, forbid_unknown_fields=True):
    """Push live leases' expiry out (a carrier's heartbeat for slow deliveries)."""

    lease_seconds: Annotated[float, Meta(ge=1, le=3600)] = 60.0


class Released(Struct):
    released: list[str]


# -- errors and health ----------------------------------------------------------------------


class ErrorDetail(Struct):
    code: str
    message: str
    field: str | None = None


class ErrorBody(Struct):
    """Every refusal: a 4xx (or a 503) with this body; `field` names the bad field."""

    error: ErrorDetail


class Health(Struct):
    status: str


# -- helpers --------------------------------------------------------------------------------


def camel_to_snake(name: str) -> str:
    """`failureRatio` → `failure_ratio`."""
    return re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), name)


def snake_to_camel(name: str) -> str:
    """`max_backoff_seconds` → `maxBackoffSeconds`: the Kubernetes spelling of a field."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def backoff_problem(low: float | None, high: float | None) -> str | None:
    """What is wrong with a queue's backoff bounds, if anything (a rule across two fields)."""
    if low is not None and high is not None and high < low:
        return "max_backoff_seconds must be >= min_backoff_seconds"
    return None


_NAMED = re.compile(r"^Object (?:contains unknown|missing required) field `([^`]*)`")
_OWN = re.compile(r"^([a-z_]+): (.*)$", re.DOTALL)  # the "field: problem" of __post_init__
_INDEX = re.compile(r"\[\d+\]")


def describe(error: msgspec.ValidationError, *, indexed: bool = True) -> tuple[str, str]:
    """(the bad field's path, what is wrong) from a msgspec validation error: `messages[3].
    priority` for "... - at `$.messages[3].priority`"; "" for the body as a whole.
    `indexed=False` drops list positions (`acks.id`)."""
    text, _, where = str(error).rpartition(" - at `")
    if not text:
        text, where = where, "$"
    where = where.rstrip("`").rpartition("in `")[2]  # "`key` in `$.headers" → "$.headers"
    path = where.removeprefix("$").removeprefix(".").split("[...]")[0]
    name = ""
    if named := _NAMED.match(text):
        name = named.group(1)
        verb = "unknown field" if "unknown" in text else "missing required field"
        text = f"{verb} {name!r}"
    elif own := _OWN.match(text):
        name, text = own.groups()
    if name:
        path = f"{path}.{name}" if path else name
    if not indexed:
        path = _INDEX.sub("", path)
    return path, text[:1].lower() + text[1:]
