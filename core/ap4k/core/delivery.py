"""One HTTP delivery of one message, and what its outcome means.

Shared by the server's dispatchers and by carriers, so that both deliver identically:
the same headers, signature, timeout, SSRF guard and classification of outcomes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import StrEnum

import pycurl
from yarl import URL

from ap4k.core import wire
from ap4k.core.curl import CurlClient, CurlError
from ap4k.core.retry import parse_retry_after
from ap4k.core.signatures import legacy_signature, webhook_signature
from ap4k.core.targets import is_blocked_host, refuse_address

log = logging.getLogger("ap4k.delivery")

USER_AGENT = "ap4k/0.1"
# How much of a failed answer's body the attempt history keeps.
EXCERPT_BYTES = 1024
# Retry-After can ask for anything; we wait at most a day.
MAX_RETRY_AFTER_SECONDS = 86_400.0


class Verdict(StrEnum):
    DELIVERED = "delivered"  # 2xx
    RETRY = "retry"  # 408, 429, 5xx, timeout, connection error
    FAIL = "fail"  # any other status, or a target we may not call: dead letter at once


@dataclass(slots=True)
class Delivery:
    """A leased message, as dispatchers and carriers hold it."""

    id: int
    queue: str
    attempt: int
    max_attempts: int
    target: str
    method: str
    headers: dict[str, str] | None
    body: bytes | None
    timeout_seconds: float
    created_at: float  # epoch seconds, for end-to-end latency
    ordering_key: str | None = None
    signing_secret: str | None = None  # deprecated: the Ap4k-Signature header
    webhook_keys: tuple[bytes, ...] = ()  # Standard Webhooks: the queue's secrets' keys
    # The queue's allow-list names this target's host: link-local addresses may be used.
    explicitly_allowed: bool = False


def to_leased(d: Delivery) -> wire.LeasedMessage:
    """A leased message as the carrier protocol carries it (server side); the queues'
    secrets travel once per lease answer, beside the messages."""
    return wire.LeasedMessage(
        id=str(d.id),
        queue=d.queue,
        attempt=d.attempt,
        max_attempts=d.max_attempts,
        target=d.target,
        method=d.method,
        headers=d.headers or {},
        body_json=None if d.body is None else d.body.decode(),
        timeout_seconds=d.timeout_seconds,
        created_at=d.created_at,
        ordering_key=d.ordering_key,
        explicitly_allowed=d.explicitly_allowed,
    )


def from_leased(
    m: wire.LeasedMessage, signing_secret: str | None, webhook_keys: tuple[bytes, ...]
) -> Delivery:
    """The inverse of `to_leased` (carrier side), with its queue's secrets."""
    return Delivery(
        id=int(m.id),
        queue=m.queue,
        attempt=m.attempt,
        max_attempts=m.max_attempts,
        target=m.target,
        method=m.method,
        headers=m.headers or None,
        body=None if m.body_json is None else m.body_json.encode(),
        timeout_seconds=m.timeout_seconds,
        created_at=m.created_at,
        ordering_key=m.ordering_key,
        signing_secret=signing_secret,
        webhook_keys=webhook_keys,
        explicitly_allowed=m.explicitly_allowed,
    )


@dataclass(slots=True)
class Outcome:
    verdict: Verdict
    status: int | None
    error: str | None
    retry_after: float | None
    duration: float
    response_excerpt: str | None = None  # the start of a failed answer's body
    # Cut off by a drain before it finished: an attempt (it may have reached the target)
    # whose duration is unknown.
    cut_off: bool = False


def excerpt(body: bytes) -> str | None:
    """The first EXCERPT_BYTES of a body as text (NUL cannot be stored in a text column)."""
    if not body:
        return None
    return body[:EXCERPT_BYTES].decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def classify_status(status: int) -> Verdict:
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status in (408, 429) or status >= 500:
        return Verdict.RETRY
    return Verdict.FAIL


class Deliverer:
    """Delivers messages over two keep-alive connection pools (libcurl's, ap4k.core.curl): a
    guarded one for ordinary targets, and one without the link-local guard for targets a
    queue allows explicitly (a connection made for one is never reused for the other)."""

    def __init__(self, max_connections: int = 0) -> None:
        self._max_connections = max_connections
        self._guarded: CurlClient | None = None
        self._open: CurlClient | None = None
        self._urls: dict[str, tuple[str, str | None, bool]] = {}

    def _client(self, guarded: bool) -> CurlClient:
        if guarded:
            if self._guarded is None:
                self._guarded = CurlClient(
                    self._max_connections, guard=refuse_address, keep_body_bytes=EXCERPT_BYTES
                )
            return self._guarded
        if self._open is None:
            self._open = CurlClient(self._max_connections, keep_body_bytes=EXCERPT_BYTES)
        return self._open

    async def close(self) -> None:
        for client in (self._guarded, self._open):
            if client is not None:
                await client.close()
        self._guarded = self._open = None

    def _parse(self, target: str) -> tuple[str, str | None, bool]:
        """The URL as sent (IDNA-encoded, as the guard reads it), its host, and whether that
        host is a blocked address in any spelling or a metadata name (cached: a queue's
        deliveries mostly go to a handful of targets). ValueError if it is no URL."""
        hit = self._urls.get(target)
        if hit is None:
            url = URL(target)
            host = url.raw_host or ""
            hit = (str(url), url.host, is_blocked_host(host))
            if len(self._urls) > 10_000:
                self._urls.clear()
            self._urls[target] = hit
        return hit

    async def deliver(self, d: Delivery) -> Outcome:
        outcome = await self._deliver(d)
        if outcome.verdict is not Verdict.DELIVERED:
            log_attempt(logging.INFO, d, outcome)
        elif log.isEnabledFor(logging.DEBUG):
            log_attempt(logging.DEBUG, d, outcome)
        return outcome

    async def _deliver(self, d: Delivery) -> Outcome:
        started = time.perf_counter()
        headers = {
            "user-agent": ("User-Agent", USER_AGENT),
            "content-type": ("Content-Type", "application/json"),
            "ap4k-message-id": ("Ap4k-Message-Id", str(d.id)),
            "ap4k-queue": ("Ap4k-Queue", d.queue),
            "ap4k-attempt": ("Ap4k-Attempt", str(d.attempt)),
        }
        if d.headers:
            headers.update({name.lower(): (name, value) for name, value in d.headers.items()})
        body = d.body or b""
        if d.webhook_keys or d.signing_secret:
            timestamp = int(time.time())
            if d.webhook_keys:
                # The message id is the same on every attempt: the receiver's idempotency key.
                msg_id = str(d.id)
                signature = webhook_signature(d.webhook_keys, msg_id, timestamp, body)
                headers["webhook-id"] = ("webhook-id", msg_id)
                headers["webhook-timestamp"] = ("webhook-timestamp", str(timestamp))
                headers["webhook-signature"] = ("webhook-signature", signature)
            if d.signing_secret:
                signature = legacy_signature(d.signing_secret, timestamp, body)
                headers["ap4k-timestamp"] = ("Ap4k-Timestamp", str(timestamp))
                headers["ap4k-signature"] = ("Ap4k-Signature", signature)
        lines = [f"{name}: {value}".encode() for name, value in headers.values()]
        guarded = not d.explicitly_allowed
        try:
            url, host, blocked = self._parse(d.target)
        except ValueError as exc:
            return self._failed(f"invalid request: {exc}", started)
        if guarded and blocked:
            return self._failed(
                f"refused: {host} is a link-local, metadata or unspecified address", started
            )
        try:
            answer = await self._client(guarded).request(
                d.method, url, lines, body, d.timeout_seconds
            )
        except CurlError as exc:
            if exc.refused is not None:
                return self._failed(f"refused: {exc.refused}", started)
            if exc.timed_out:
                return self._transient(f"timed out after {d.timeout_seconds:g}s", started)
            if exc.code in (pycurl.E_URL_MALFORMAT, pycurl.E_UNSUPPORTED_PROTOCOL):
                return self._failed(f"invalid request: {exc}", started)
            return self._transient(f"connection error: {exc}", started)
        status = answer.status
        verdict = classify_status(status)
        if verdict is Verdict.DELIVERED:
            return Outcome(verdict, status, None, None, time.perf_counter() - started)
        error = f"HTTP {status} {answer.reason}".strip()
        if 300 <= status < 400:
            error += " (redirects are not followed)"
        retry_after = parse_retry_after(
            answer.header("Retry-After"), max_seconds=MAX_RETRY_AFTER_SECONDS
        )
        return Outcome(
            verdict, status, error, retry_after, time.perf_counter() - started, excerpt(answer.body)
        )

    @staticmethod
    def _failed(error: str, started: float) -> Outcome:
        return Outcome(Verdict.FAIL, None, error, None, time.perf_counter() - started)

    @staticmethod
    def _transient(error: str, started: float) -> Outcome:
        return Outcome(Verdict.RETRY, None, error, None, time.perf_counter() - started)


def log_attempt(level: int, d: Delivery, outcome: Outcome) -> None:
    """One structured line per attempt: failures at info, successes at debug."""
    host = URL(d.target).host if "://" in d.target else None
    log.log(
        level,
        "delivered" if outcome.verdict is Verdict.DELIVERED else "delivery failed",
        extra={
            "message_id": str(d.id),
            "queue": d.queue,
            "attempt": d.attempt,
            "outcome": outcome.verdict.value,
            "status": outcome.status,
            "error": outcome.error,
            "duration_ms": round(outcome.duration * 1000, 2),
            "target_host": host,
        },
    )
