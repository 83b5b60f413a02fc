"""One HTTP delivery of one message, and what its outcome means.

Shared by the server's dispatchers and by carriers, so that both deliver identically:
the same headers, signature, timeout, SSRF guard and classification of outcomes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from enum import StrEnum

import aiohttp
from yarl import URL

from ap4k.core import wire
from ap4k.core.retry import parse_retry_after
from ap4k.core.signatures import legacy_signature, webhook_signature
from ap4k.core.targets import BlockedAddressError, GuardedResolver, is_blocked_host

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
    """Delivers messages over two keep-alive connection pools: a guarded one for ordinary
    targets, and one without the link-local guard for targets a queue allows explicitly."""

    def __init__(self, max_connections: int = 0) -> None:
        self._max_connections = max_connections
        self._guarded: aiohttp.ClientSession | None = None
        self._open: aiohttp.ClientSession | None = None
        self._urls: dict[str, tuple[URL, bool]] = {}
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _session(self, guarded: bool) -> aiohttp.ClientSession:
        if guarded:
            if self._guarded is None:
                self._guarded = self._new_session(GuardedResolver())
            return self._guarded
        if self._open is None:
            self._open = self._new_session(None)
        return self._open

    def _new_session(self, resolver: GuardedResolver | None) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            limit_per_host=0,
            resolver=resolver,
            ttl_dns_cache=10,
            enable_cleanup_closed=True,
        )
        return aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": USER_AGENT},
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
        )

    async def close(self) -> None:
        for session in (self._guarded, self._open):
            if session is not None:
                await session.close()
        self._guarded = self._open = None

    def _parse(self, target: str) -> tuple[URL, bool]:
        """The parsed URL and whether its host is a blocked address in any spelling or a
        metadata name (cached: a queue's deliveries mostly go to a handful of targets)."""
        hit = self._urls.get(target)
        if hit is None:
            url = URL(target)
            hit = (url, is_blocked_host(url.raw_host or ""))
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
            "Content-Type": "application/json",
            "Ap4k-Message-Id": str(d.id),
            "Ap4k-Queue": d.queue,
            "Ap4k-Attempt": str(d.attempt),
        }
        if d.headers:
            headers.update(d.headers)
        body = d.body or b""
        if d.webhook_keys or d.signing_secret:
            timestamp = int(time.time())
            if d.webhook_keys:
                # The message id is the same on every attempt: the receiver's idempotency key.
                msg_id = str(d.id)
                headers["webhook-id"] = msg_id
                headers["webhook-timestamp"] = str(timestamp)
                headers["webhook-signature"] = webhook_signature(
                    d.webhook_keys, msg_id, timestamp, body
                )
            if d.signing_secret:
                headers["Ap4k-Timestamp"] = str(timestamp)
                headers["Ap4k-Signature"] = legacy_signature(d.signing_secret, timestamp, body)
        guarded = not d.explicitly_allowed
        try:
            url, blocked = self._parse(d.target)
            if guarded and blocked:
                raise BlockedAddressError(
                    f"{url.host} is a link-local, metadata or unspecified address"
                )
            timeout = self._timeouts.get(d.timeout_seconds)
            if timeout is None:
                timeout = self._timeouts[d.timeout_seconds] = aiohttp.ClientTimeout(
                    total=d.timeout_seconds
                )
            async with self._session(guarded).request(
                d.method,
                url,
                data=body if d.method not in ("GET", "HEAD") or body else None,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                # Read the answer (so that the connection can be reused); keep its start only
                # when it failed, for the attempt history.
                answer = await response.read()
                status = response.status
                verdict = classify_status(status)
                if verdict is Verdict.DELIVERED:
                    return Outcome(verdict, status, None, None, time.perf_counter() - started)
                error = f"HTTP {status} {response.reason or ''}".strip()
                if 300 <= status < 400:
                    error += " (redirects are not followed)"
                retry_after = parse_retry_after(
                    response.headers.get("Retry-After"), max_seconds=MAX_RETRY_AFTER_SECONDS
                )
                return Outcome(
                    verdict,
                    status,
                    error,
                    retry_after,
                    time.perf_counter() - started,
                    excerpt(answer),
                )
        except BlockedAddressError as exc:
            return Outcome(
                Verdict.FAIL, None, f"refused: {exc}", None, time.perf_counter() - started
            )
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, BlockedAddressError):
                error = f"refused: {exc.os_error}"
                return Outcome(Verdict.FAIL, None, error, None, time.perf_counter() - started)
            return self._transient(f"connection error: {exc}", started)
        except TimeoutError:
            return self._transient(f"timed out after {d.timeout_seconds:g}s", started)
        except (aiohttp.ClientError, OSError) as exc:
            return self._transient(f"{type(exc).__name__}: {exc}", started)
        except asyncio.CancelledError:
            raise
        except ValueError as exc:  # an URL or header aiohttp will not send
            return Outcome(
                Verdict.FAIL, None, f"invalid request: {exc}", None, time.perf_counter() - started
            )

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
