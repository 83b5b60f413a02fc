"""The server's Prometheus metrics (named as the README's Metrics section lists them; base
units; no ids in labels)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: MetricWrapperBase, *labels: str) -> Any:
    """`metric.labels(*labels)`, memoised: `labels()` takes a lock and builds a tuple on
    every call, and the delivery path calls it for every message."""
    key = (id(metric), labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    3600,
)

MESSAGES_ENQUEUED = Counter(
    "ap4k_messages_enqueued", "Messages accepted (committed) per queue.", ["queue"]
)
DELIVERIES = Counter(
    "ap4k_deliveries",
    "Delivery attempts recorded, by outcome: delivered, retried or dead.",
    ["queue", "outcome"],
)
QUEUE_DEPTH = Gauge("ap4k_queue_depth", "Messages per queue and state.", ["queue", "state"])
OLDEST_AVAILABLE_AGE = Gauge(
    "ap4k_queue_oldest_available_age_seconds",
    "How long the oldest available message of the queue has been waiting.",
    ["queue"],
)
DELIVERY_DURATION = Histogram(
    "ap4k_delivery_duration_seconds",
    "Duration of the HTTP call to the target.",
    ["queue"],
    buckets=LATENCY_BUCKETS,
)
END_TO_END_LATENCY = Histogram(
    "ap4k_end_to_end_latency_seconds",
    "From enqueue to successful delivery.",
    ["queue"],
    buckets=LATENCY_BUCKETS,
)
LEASES_EXPIRED = Counter(
    "ap4k_leases_expired", "Leases that expired and were rescued, per queue.", ["queue"]
)
DISPATCHERS_IN_FLIGHT = Gauge(
    "ap4k_dispatchers_in_flight", "Deliveries this server's dispatchers are making now."
)
LEASED = Counter(
    "ap4k_messages_leased",
    "Messages leased, by who leased them: dispatcher or carrier.",
    ["queue", "leaser"],
)
EVENT_LOOP_LAG = Histogram(
    "ap4k_event_loop_lag_seconds",
    "How much later than asked the event loop woke a sleeper, sampled four times a second.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
CIRCUITS_OPEN = Gauge(
    "ap4k_circuits_open",
    "Target origins whose circuit is open or half-open (messages held), per queue.",
    ["queue"],
)
