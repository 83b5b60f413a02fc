"""When to try again and how long to wait: shared by the client and the forwarder.

Exponential backoff with full jitter (AWS's "Exponential Backoff And Jitter"): the n-th wait
is uniform in [0, min(cap, base * 2**n)], so that many clients recovering from the same
outage do not hammer the server in step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# Statuses worth another try, maybe on another server: the request itself was fine.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`attempts` requests at most per call (at least one per server URL)."""

    attempts: int = 6
    min_backoff_seconds: float = 0.05
    max_backoff_seconds: float = 5.0
    # Honour a server's Retry-After up to this long; a longer one is cut short.
    max_retry_after_seconds: float = 30.0

    def backoff(self, failures: int) -> float:
        """The wait after `failures` (≥ 1) consecutive failed rounds."""
        ceiling = min(self.max_backoff_seconds, self.min_backoff_seconds * 2 ** (failures - 1))
        return random.uniform(0, ceiling)


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUSES or status >= 500


def retry_after_seconds(value: str | None) -> float | None:
    """The delay of a `Retry-After` header: seconds, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
