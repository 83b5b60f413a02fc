"""The one Retry-After rule (deliveries and the API client) and the client's retry policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from ap4k.core.retry import RetryPolicy, parse_retry_after

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("0.3", 0.3),  # a fraction, as servers wanting less than a second send
        ("999999999999", 3600.0),  # clamped
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        (format_datetime(NOW - timedelta(seconds=90), usegmt=True), 0.0),  # in the past
        ("Fri, 02 Jan 2026 03:04:35 GMT", 30.0),
        (format_datetime(NOW + timedelta(days=3), usegmt=True), 3600.0),
    ],
)
def test_retry_after_delta_seconds_or_http_date_clamped(header: str, seconds: float) -> None:
    assert parse_retry_after(header, max_seconds=3600, now=NOW) == pytest.approx(seconds)


@pytest.mark.parametrize("header", [None, "", "-5", "inf", "nan", "1e3", "soon", "²", "Fri, 99"])
def test_retry_after_that_is_neither_is_ignored(header: str | None) -> None:
    assert parse_retry_after(header, max_seconds=3600, now=NOW) is None


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    policy = RetryPolicy(min_backoff_seconds=0.1, max_backoff_seconds=2.0)
    for failures, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (5, 1.6), (6, 2.0), (500, 2.0)]:
        waits = [policy.backoff(failures) for _ in range(200)]
        assert all(0 <= w <= ceiling for w in waits)
        assert max(waits) > ceiling / 2  # jittered over the whole range, not stuck at 0


def test_the_default_policy_retries_for_longer_than_a_restart() -> None:
    assert RetryPolicy().deadline_seconds >= 30
    assert RetryPolicy().attempts is None
    with pytest.raises(ValueError, match="deadline"):
        RetryPolicy(deadline_seconds=0)
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
