"""When to try an HTTP request again and how long to wait: one rule for the whole product.

- `parse_retry_after` reads a `Retry-After` header the same way for a delivery's target (the
  message waits that long before its next attempt) and for the API client (it waits before
  calling the server again);
- `RetryPolicy` is the API client's: capped exponential backoff with full jitter (AWS's
  "Exponential Backoff And Jitter": the n-th wait is uniform in [0, min(cap, base·2ⁿ)], so
  many clients recovering from one outage do not call in step), retried to a deadline like
  Google's API clients, so that a call outlasts a server restart or a rolling update.

Standard library only: the light client install imports this.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# Statuses that say nothing about the request itself: worth another try (maybe on another
# server URL). Every other 4xx is final.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})

# Delta-seconds (RFC 9110 §10.2.3 says digits; a decimal fraction is accepted, as sent by
# servers that want less than a second). Anything else must be an HTTP-date.
_DELTA_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUSES or status >= 500


def parse_retry_after(
    value: str | None, *, max_seconds: float, now: datetime | None = None
) -> float | None:
    """The wait a `Retry-After` header asks for, in seconds within [0, max_seconds].

    Delta-seconds or an HTTP-date (a date in the past is 0); None when the header is absent
    or is neither (negative numbers, "inf", garbage): the caller's own backoff applies.
    """
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return min(float(value), max_seconds)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=UTC)
    delay = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(delay, 0.0), max_seconds)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard one API call tries before it raises `ServerUnavailable`.

    A call is retried (with failover across the server URLs) until `deadline_seconds` have
    passed since it started, or `attempts` requests were made if that is set. The default
    rides out a server restart or a rolling update (a few seconds to tens of seconds); an
    application that must survive longer outages writes to the outbox instead.
    """

    deadline_seconds: float = 30.0
    attempts: int | None = None  # at most this many requests per call (None: the deadline)
    min_backoff_seconds: float = 0.1
    max_backoff_seconds: float = 2.0
    # Honour a server's Retry-After up to this long (within the deadline).
    max_retry_after_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.deadline_seconds <= 0:
            raise ValueError("deadline_seconds must be positive")
        if self.attempts is not None and self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.min_backoff_seconds < 0 or self.max_backoff_seconds < 0:
            raise ValueError("backoff bounds must not be negative")

    def backoff(self, failures: int) -> float:
        """The wait after `failures` (≥ 1) consecutive failed rounds."""
        exponent = min(failures - 1, 62)  # 2**62 overflows nothing and caps any base
        ceiling = min(self.max_backoff_seconds, self.min_backoff_seconds * 2**exponent)
        return random.uniform(0, ceiling)
