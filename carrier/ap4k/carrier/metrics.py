"""A carrier's own Prometheus metrics. Queue depths and per-queue outcomes come from the
server only (it records every ack), so scaling carriers out never double-counts them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from ap4k.server.metrics import LATENCY_BUCKETS

LEASES_IN_FLIGHT = Gauge(
    "ap4k_carrier_leases_in_flight", "Messages this carrier holds leases for and has not acked."
)
LEASED = Counter("ap4k_carrier_leased", "Messages leased by this carrier.")
DELIVERIES = Counter(
    "ap4k_carrier_deliveries", "Deliveries made by this carrier, by verdict.", ["outcome"]
)
DELIVERY_DURATION = Histogram(
    "ap4k_carrier_delivery_duration_seconds",
    "Duration of the HTTP call to the target.",
    buckets=LATENCY_BUCKETS,
)
ACKS = Counter(
    "ap4k_carrier_acks",
    "Acks the server answered, by the call that carried them (/v1/acks or /v1/leases).",
    ["path"],
)
ACKS_REFUSED = Counter(
    "ap4k_carrier_acks_refused", "Acks the server refused because the lease had expired."
)
LEASES_EXTENDED = Counter(
    "ap4k_carrier_leases_extended", "Leases extended by the heartbeat for slow deliveries."
)
SERVER_CALLS = Counter(
    "ap4k_carrier_server_calls",
    "Calls made to a server, by path (/v1/leases, /v1/acks, ...), failed ones included.",
    ["path"],
)
SERVER_ERRORS = Counter(
    "ap4k_carrier_server_errors", "Calls to a server that failed (the carrier fails over)."
)
