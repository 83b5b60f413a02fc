"""The forwarder's Prometheus metrics (default registry, created once per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BACKLOG = Gauge(
    "ap4k_outbox_backlog",
    "Outbox rows waiting to be forwarded to the server.",
)
OLDEST_AGE = Gauge(
    "ap4k_outbox_oldest_age_seconds",
    "Age of the oldest outbox row waiting to be forwarded.",
)
REJECTED_ROWS = Gauge(
    "ap4k_outbox_rejected_rows",
    "Outbox rows the server refused for good (4xx), kept for inspection.",
)
FORWARDED = Counter(
    "ap4k_outbox_forwarded_total",
    "Outbox rows acknowledged by the server and deleted.",
    ["queue"],
)
REJECTIONS = Counter(
    "ap4k_outbox_rejections_total",
    "Outbox rows the server refused for good (4xx).",
    ["queue"],
)
ERRORS = Counter(
    "ap4k_outbox_forward_errors_total",
    "Failed forwarding rounds, by reason (server_unavailable, unauthorized, database).",
    ["reason"],
)
BATCH_DURATION = Histogram(
    "ap4k_outbox_batch_duration_seconds",
    "Time to claim, send and delete one batch of outbox rows.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
