"""`AsyncClient`: the server's HTTP API for asyncio applications, on aiohttp.

This is the one client of the API: applications, the sync `Client`, the carrier, the
operator and the CLI all call the server through it. Every call goes through `call`, which
owns the three policies:

- failover: the client keeps one "current" server URL and sticks to it while it answers;
  a connection error, timeout, 5xx or 429 moves it on to the next URL at once;
- retries: after a full round of URLs failed it sleeps with capped exponential backoff and
  full jitter (or the server's Retry-After), until the `RetryPolicy`'s deadline (30 s by
  default: longer than a server restart);
- errors: a 4xx other than 408/425/429 is the server saying no: raised at once as a typed
  `ApiError` with the server's code, message and field.

Resending a POST of messages is safe only when the server can recognise the resend: with a
`dedup_key` on every message (the outbox forwarder always sets one) it is retried after any
failure; without, only after failures that prove the server never acted on it (see `call`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack
from urllib.parse import quote

import aiohttp
import msgspec
import orjson

from ap4k.client.errors import Ap4kError, OutcomeUnknown, ServerUnavailable, api_error
from ap4k.client.models import (
    JSON,
    Cancelled,
    DeadLetters,
    Enqueued,
    Message,
    MessageOptions,
    NewMessage,
    Published,
    Queue,
    QueueSettings,
    Schedule,
    ScheduledMessage,
    Subscription,
    Topic,
)
from ap4k.core.retry import RetryPolicy, is_retryable_status, parse_retry_after

logger = logging.getLogger("ap4k.client")
T = TypeVar("T")

DEFAULT_SERVER_URL = "http://127.0.0.1:7438"
# Each server URL once, no waiting: for questions whose answer is "not now" (readiness).
ONE_ROUND = RetryPolicy(attempts=1)
MAX_BATCH = 1000  # the server's limit for one POST of {"messages": [...]}

# Failures before anything was sent: no server saw the request.
NOT_SENT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
)
# Failures that say nothing about the request itself: the server was unreachable or died,
# possibly after it had acted on the request.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    asyncio.TimeoutError,
)
# Retryable answers that say the request was not acted on: it was too slow to arrive (408),
# too early (425), over a rate limit (429), or the server could not take it (503: ap4k
# answers it while draining or without its database, having changed nothing).
NOT_PROCESSED_STATUSES = frozenset({408, 425, 429, 503})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def split_urls(urls: str | Iterable[str]) -> list[str]:
    """`"http://a:7438,http://b:7438"` or a list → clean base URLs without trailing slash."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    cleaned = [u.strip().rstrip("/") for u in items if u and u.strip()]
    if not cleaned:
        raise ValueError("at least one server URL is needed")
    return cleaned


class AsyncClient:
    """An asyncio client for one ap4k deployment, reachable at one or several URLs.

    Use it as an async context manager, or call `close()` when done. The aiohttp session is
    created on first use, in the running loop, so the client may be built anywhere.
    """

    def __init__(
        self,
        urls: str | Iterable[str] = DEFAULT_SERVER_URL,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        connect_timeout: float = 3.0,
        retry: RetryPolicy | None = None,
        session: aiohttp.ClientSession | None = None,
        user_agent: str = "ap4k-client",
        max_request_bytes: int = 512 * 1024,
    ) -> None:
        self.urls = split_urls(urls)
        # `send_many` splits its POSTs to stay under the server's body limit (1 MiB default).
        self.max_request_bytes = max_request_bytes
        self.retry = retry or RetryPolicy()
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self._headers = {"User-Agent": user_agent, "Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._session = session
        self._owns_session = session is None
        self._current = 0  # index of the URL that answered last

    @property
    def current_url(self) -> str:
        """The server URL the next request goes to first."""
        return self.urls[self._current]

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    # -- messages ---------------------------------------------------------------------------

    async def send(
        self,
        queue: str,
        target: str,
        body: JSON = None,
        *,
        retry: RetryPolicy | None = None,
        **options: Unpack[MessageOptions],
    ) -> Enqueued:
        """Enqueue one message; returns once the server has committed it.

        Retried within `retry` (the client's policy by default) when the server cannot be
        reached; after a failure past sending, only if the message has a `dedup_key`.
        """
        message = NewMessage(target, body=body, **options)
        return await self.send_message(queue, message, retry=retry)

    async def send_message(
        self, queue: str, message: NewMessage, *, retry: RetryPolicy | None = None
    ) -> Enqueued:
        payload = message.to_json()
        data = await self.call(
            "POST",
            _queue_path(queue, "messages"),
            payload,
            idempotent=_has_dedup_key(payload),
            retry=retry,
        )
        return Enqueued.from_json(data)

    async def send_many(
        self,
        queue: str,
        messages: Sequence[NewMessage | Mapping[str, JSON]],
        *,
        retry: RetryPolicy | None = None,
    ) -> list[Enqueued]:
        """Enqueue many messages, in order, in POSTs of up to 1,000 messages and
        `max_request_bytes`.

        Each POST is atomic on the server; a list that needs several is not, as a whole.
        Give the messages dedup keys if you retry a failed call.
        """
        results: list[Enqueued] = []
        chunk: list[dict[str, JSON]] = []
        size = 0
        for message in messages:
            payload = _message_json(message)
            payload_size = len(orjson.dumps(payload)) + 1
            if chunk and (len(chunk) == MAX_BATCH or size + payload_size > self.max_request_bytes):
                results.extend(await self.send_json_batch(queue, chunk, retry=retry))
                chunk, size = [], 0
            chunk.append(payload)
            size += payload_size
        if chunk:
            results.extend(await self.send_json_batch(queue, chunk, retry=retry))
        return results

    async def send_json_batch(
        self,
        queue: str,
        payloads: list[dict[str, JSON]],
        *,
        retry: RetryPolicy | None = None,
    ) -> list[Enqueued]:
        """One POST of up to 1,000 messages already in the API's JSON form (resent after a
        failure past sending only if every message has a `dedup_key`)."""
        if len(payloads) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} messages per batch")
        data = await self.call(
            "POST",
            _queue_path(queue, "messages"),
            {"messages": payloads},
            idempotent=all(_has_dedup_key(p) for p in payloads),
            retry=retry,
        )
        results = [Enqueued.from_json(item) for item in data["messages"]]
        if len(results) != len(payloads):
            raise Ap4kError(
                f"the server answered a batch of {len(payloads)} with {len(results)} results"
            )
        return results

    async def get(self, message_id: str) -> Message:
        return Message.from_json(await self.call("GET", _message_path(message_id)))

    async def cancel(self, message_id: str) -> Cancelled:
        """Cancel a message that has not finished yet (`Conflict` if it has)."""
        return Cancelled.from_json(await self.call("DELETE", _message_path(message_id)))

    # -- queues -----------------------------------------------------------------------------

    async def queues(self) -> list[Queue]:
        data = await self.call("GET", "/v1/queues")
        return [Queue.from_json(q) for q in data.get("queues") or []]

    async def queue(self, name: str) -> Queue:
        return Queue.from_json(await self.call("GET", _queue_path(name)))

    async def set_queue(
        self, name: str, settings: QueueSettings | None = None, **fields: JSON
    ) -> Queue:
        """Change a queue's settings (creating the queue if needed); unset fields are kept.

        Either a `QueueSettings` or keyword fields: `set_queue("mail", paused=True)`.
        """
        payload = settings.to_json() if settings is not None else {}
        payload.update({k: v for k, v in fields.items() if v is not None})
        return Queue.from_json(await self.call("PUT", _queue_path(name), payload))

    # -- dead letters -----------------------------------------------------------------------

    async def dead_letters(
        self, queue: str, *, limit: int = 100, after: str | None = None
    ) -> DeadLetters:
        params = {"limit": str(limit)}
        if after is not None:
            params["after"] = after
        data = await self.call("GET", _queue_path(queue, "dead"), params=params)
        return DeadLetters.from_json(data)

    async def iter_dead_letters(
        self, queue: str, *, page_size: int = 100
    ) -> AsyncIterator[Message]:
        """Every dead letter of a queue, page by page."""
        after: str | None = None
        while True:
            page = await self.dead_letters(queue, limit=page_size, after=after)
            for message in page.messages:
                yield message
            if page.next is None or not page.messages:
                return
            after = page.next

    async def redrive(self, queue: str, ids: Sequence[str] | None = None) -> int:
        """Make dead letters available again (all of them, or those `ids`); returns how many."""
        payload = None if ids is None else {"ids": list(ids)}
        # Idempotent: a second redrive makes available what is dead by then, as the first.
        data = await self.call(
            "POST", _queue_path(queue, "dead", "redrive"), payload or {}, idempotent=True
        )
        return int(data.get("redriven", 0))

    async def purge_dead(self, queue: str) -> int:
        """Delete a queue's dead letters for good; returns how many."""
        data = await self.call("DELETE", _queue_path(queue, "dead"))
        return int(data.get("purged", 0))

    # -- schedules and topics --------------------------------------------------------------

    async def schedules(self) -> list[Schedule]:
        data = await self.call("GET", "/v1/schedules")
        return [Schedule.from_json(s) for s in data.get("schedules") or []]

    async def schedule(self, name: str) -> Schedule:
        return Schedule.from_json(await self.call("GET", _named_path("schedules", name)))

    async def set_schedule(
        self,
        name: str,
        queue: str,
        cron: str,
        message: ScheduledMessage | Mapping[str, JSON],
        *,
        timezone: str = "UTC",
        paused: bool = False,
    ) -> Schedule:
        """Create or replace a recurring schedule: enqueue `message` to `queue` at every
        time `cron` (5 fields) names in `timezone` (an IANA name)."""
        payload = {
            "queue": queue,
            "cron": cron,
            "timezone": timezone,
            "paused": paused,
            "message": msgspec.to_builtins(message),
        }
        data = await self.call("PUT", _named_path("schedules", name), payload)
        return Schedule.from_json(data)

    async def delete_schedule(self, name: str) -> None:
        await self.call("DELETE", _named_path("schedules", name))

    async def topics(self) -> list[Topic]:
        data = await self.call("GET", "/v1/topics")
        return [Topic.from_json(t) for t in data.get("topics") or []]

    async def topic(self, name: str) -> Topic:
        return Topic.from_json(await self.call("GET", _named_path("topics", name)))

    async def set_topic(
        self, name: str, subscriptions: Sequence[Subscription | Mapping[str, JSON]]
    ) -> Topic:
        """Create or replace a fan-out topic with these subscriptions."""
        payload = {"subscriptions": [msgspec.to_builtins(s) for s in subscriptions]}
        return Topic.from_json(await self.call("PUT", _named_path("topics", name), payload))

    async def delete_topic(self, name: str) -> None:
        await self.call("DELETE", _named_path("topics", name))

    async def publish(self, topic: str, body: JSON = None, **options: JSON) -> Published:
        """Publish a message (any message field but `target`) to every subscription."""
        payload = {k: v for k, v in options.items() if v is not None}
        if body is not None:
            payload["body"] = body
        path = _named_path("topics", topic) + "/messages"
        return Published.from_json(await self.call("POST", path, payload))

    async def ready(self) -> bool:
        """True when the current server (or, failing that, another) answers /readyz."""
        try:
            await self.call("GET", "/readyz", expect_json=False, retry=ONE_ROUND)
        except ServerUnavailable:
            return False
        return True

    # -- transport --------------------------------------------------------------------------

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Keep-alive connections to every server URL; the limit matches what one
            # process can usefully push (docs/performance.md: ~13k POST/s per session).
            connector = aiohttp.TCPConnector(limit=64, limit_per_host=32)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, headers=self._headers
            )
            self._owns_session = True
        return self._session

    async def call(
        self,
        method: str,
        path: str,
        payload: JSON = None,
        *,
        params: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        expect_json: bool = True,
    ) -> Any:
        """One API call with the client's failover and retries; returns the decoded answer.

        `idempotent` says whether sending the request twice does no harm (default: by
        method: GET, PUT and DELETE are, POST is not). A request that is not is resent only
        after failures that prove the server did not process it (it could not be reached,
        or answered 408/425/429/503); any other failure raises `OutcomeUnknown` at once.
        `retry` and `timeout` override the client's for this call.
        """
        data = None if payload is None else orjson.dumps(payload)
        raw = await self._exchange(
            method, path, data, params=params, idempotent=idempotent, retry=retry,
            timeout=timeout,
        )
        if not expect_json:
            return None
        return orjson.loads(raw) if raw else {}

    async def post(
        self,
        path: str,
        request: msgspec.Struct,
        answer: type[T],
        *,
        idempotent: bool,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> T:
        """POST a wire object (`ap4k.core.wire`) and decode the answer as another, as `call`
        does with plain JSON. An answer that does not fit `answer` raises `Ap4kError`."""
        raw = await self._exchange(
            "POST", path, msgspec.json.encode(request), idempotent=idempotent, retry=retry,
            timeout=timeout,
        )
        try:
            return msgspec.json.decode(raw, type=answer)
        except msgspec.DecodeError as exc:  # not JSON, or not that object
            raise Ap4kError(f"POST {path}: the answer is not a {answer.__name__}: {exc}") from exc

    async def _exchange(
        self,
        method: str,
        path: str,
        data: bytes | None,
        *,
        params: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """The failover and retry loop of every call: the answer's bytes, or an error."""
        policy = retry or self.retry
        if idempotent is None:
            idempotent = method.upper() in IDEMPOTENT_METHODS
        session = self._get_session()
        headers = {"Content-Type": "application/json"} if data is not None else None
        request_timeout = None if timeout is None else self._timeout_for(timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + policy.deadline_seconds
        failed_in_round = 0
        rounds_failed = 0
        attempt = 0
        last_error: BaseException | str = "no attempt made"
        # Each call walks the URLs from the shared "current" one on; concurrent calls must
        # not send each other back to a URL that just failed, hence the local index.
        index = self._current
        while True:
            attempt += 1
            url = self.urls[index] + path
            retry_after: float | None = None
            processed = False  # whether the server may have acted on the request
            if not idempotent:
                await _notice_closed_connections()
            try:
                async with session.request(
                    method, url, data=data, headers=headers, params=params,
                    timeout=request_timeout or self._timeout,
                ) as response:
                    status = response.status
                    raw = await response.read()
                    if status < 300:
                        self._current = index  # stick to the URL that answered
                        return raw
                    body = _decode_error_body(raw)
                    if not is_retryable_status(status):
                        self._current = index  # alive: it answered, and said no
                        raise api_error(status, body, url=url)
                    retry_after = parse_retry_after(
                        response.headers.get("Retry-After"),
                        max_seconds=policy.max_retry_after_seconds,
                    )
                    processed = status not in NOT_PROCESSED_STATUSES
                    last_error = f"{method} {url}: HTTP {status} {_short(body)}"
            except NOT_SENT_ERRORS as exc:
                last_error = exc
                logger.debug("%s %s: not reached: %r", method, url, exc)
            except CONNECTION_ERRORS as exc:
                processed = True  # cut off after sending, maybe after the commit
                last_error = exc
                logger.debug("%s %s failed: %r", method, url, exc)
            if processed and not idempotent:
                raise OutcomeUnknown(
                    f"{method} {path} failed on {url} after it was sent (not resent: it "
                    "may have been processed)",
                    attempts=attempt,
                    last_error=last_error,
                )
            # This URL failed: fail over to the next one (and move the shared pointer on,
            # unless another call already has).
            following = (index + 1) % len(self.urls)
            if self._current == index:
                self._current = following
            index = following
            failed_in_round += 1
            remaining = deadline - loop.time()
            out_of_attempts = policy.attempts is not None and attempt >= policy.attempts
            # Every URL is tried once per call whatever the policy says.
            if (out_of_attempts or remaining <= 0) and attempt >= len(self.urls):
                break
            if failed_in_round >= len(self.urls) or retry_after is not None:
                # Every URL failed once (or the server asked us to wait): back off.
                failed_in_round = 0
                rounds_failed += 1
                delay = policy.backoff(rounds_failed)
                if retry_after is not None:
                    delay = max(delay, retry_after)
                await asyncio.sleep(max(min(delay, remaining), 0.0))
        raise ServerUnavailable(
            f"{method} {path} failed on {', '.join(self.urls)}",
            attempts=attempt,
            last_error=last_error,
        )

    def _timeout_for(self, total: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=total, sock_connect=self._timeout.sock_connect)


async def _notice_closed_connections() -> None:
    """Let the loop process what the kernel already knows before a request that must not be
    sent twice goes out on a pooled keep-alive connection.

    A server that went away (restarted, killed) closed its idle connections; until the loop
    has read that end-of-file, the pool hands the dead connection out, the request fails
    with "server disconnected", and a non-idempotent request could not be resent — though
    no server ever saw it. Two loop iterations: one for the selector to report the
    end-of-file, one for its callback to have run before this task resumes (Go's HTTP
    client makes the same check before it writes a request on a reused connection).
    """
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def _has_dedup_key(message: Mapping[str, JSON]) -> bool:
    return bool(message.get("dedup_key"))


def _message_json(message: NewMessage | Mapping[str, JSON]) -> dict[str, JSON]:
    if isinstance(message, NewMessage):
        return message.to_json()
    return NewMessage.from_mapping(message).to_json()


def _queue_path(queue: str, *parts: str) -> str:
    if not queue:
        raise ValueError("queue name must not be empty")
    return "/".join(["/v1/queues", quote(queue, safe=""), *parts])


def _named_path(collection: str, name: str) -> str:
    if not name:
        raise ValueError("name must not be empty")
    return f"/v1/{collection}/{quote(name, safe='')}"


def _message_path(message_id: str) -> str:
    if not message_id:
        raise ValueError("message id must not be empty")
    return f"/v1/messages/{quote(str(message_id), safe='')}"


def _decode_error_body(raw: bytes) -> JSON:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")


def _short(body: JSON) -> str:
    text = body if isinstance(body, str) else orjson.dumps(body).decode()
    return text[:200]
