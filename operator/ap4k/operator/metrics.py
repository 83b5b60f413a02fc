"""The operator's own Prometheus metrics, served with /healthz and /readyz by the shared
observability app (`ap4k.core.observability`)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from ap4k.core import observability

# A registry of its own, so that tests running several operators in one process (and the
# server's metrics, should both ever share a process) never collide.
REGISTRY = CollectorRegistry(auto_describe=True)

# `asyncqueue` is "<namespace>/<name>": one operator may watch several namespaces.
DESIRED_CARRIERS = Gauge(
    "ap4k_operator_desired_carriers",
    "Carrier replicas the autoscaler asks for.",
    ["asyncqueue"],
    registry=REGISTRY,
)
CARRIERS = Gauge(
    "ap4k_operator_carriers",
    "Carrier replicas set on the carrier Deployment.",
    ["asyncqueue"],
    registry=REGISTRY,
)
BACKLOG = Gauge(
    "ap4k_operator_backlog",
    "Backlog (available + running messages, or the Prometheus query's value) last sampled.",
    ["asyncqueue"],
    registry=REGISTRY,
)
METRIC_ERRORS = Counter(
    "ap4k_operator_metric_errors_total",
    "Backlog samples that failed (server unreachable, Prometheus query failed).",
    ["asyncqueue"],
    registry=REGISTRY,
)
RECONCILIATIONS = Counter(
    "ap4k_operator_reconciliations_total",
    "Reconciliations of AsyncQueues and their children, by result "
    "(unchanged, applied, invalid, error).",
    ["result"],
    registry=REGISTRY,
)


def forget(asyncqueue: str) -> None:
    """Drop the series of a deleted AsyncQueue."""
    for metric in (DESIRED_CARRIERS, CARRIERS, BACKLOG, METRIC_ERRORS):
        try:
            metric.remove(asyncqueue)
        except KeyError:
            pass


class Health:
    """Liveness: the event loop answers, and kopf has started (the startup handler ran)."""

    def __init__(self) -> None:
        self.started_at: float | None = None

    def problem(self) -> str | None:
        return "starting" if self.started_at is None else None


def make_app(health: Health) -> web.Application:
    return observability.make_app(alive=health.problem, ready=health.problem, registry=REGISTRY)


async def serve(health: Health, host: str, port: int) -> web.AppRunner:
    return await observability.serve(make_app(health), host, port)
