"""Status conditions, Kubernetes-style, with `Ready` as their summary.

Condition types an AsyncQueue reports:

- `Reconciled`: the children (server and carrier Deployments, Service) match the spec.
  False with `InvalidSpec` (the spec cannot be acted on) or `ApplyFailed`.
- `ServerReachable`: the operator got an answer from the server's API.
- `QueuesConfigured`: the declared queues' settings are applied on the server. False with
  `Pending` (the server does not answer yet) or `Rejected` (the server refused a setting).
- `MetricsAvailable`: the last backlog sample succeeded (`ServerStats` or `PrometheusQuery`).
  False with `MetricsUnavailable`: carriers then stay where they are.
- `Ready`: True when the first three are True; otherwise False with the reason of the first
  one that is not. A failing metric does not make the queue unready: it still serves.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

Status = Literal["True", "False", "Unknown"]

RECONCILED = "Reconciled"
SERVER_REACHABLE = "ServerReachable"
QUEUES_CONFIGURED = "QueuesConfigured"
METRICS_AVAILABLE = "MetricsAvailable"
READY = "Ready"

# The conditions Ready summarizes, in the order their reasons are reported.
READY_REQUIRES = (RECONCILED, SERVER_REACHABLE, QUEUES_CONFIGURED)
ORDER = (READY, *READY_REQUIRES, METRICS_AVAILABLE)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class Condition:
    type: str
    status: Status
    reason: str
    message: str
    last_transition_time: str = ""
    observed_generation: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": self.last_transition_time,
        }
        if self.observed_generation is not None:
            out["observedGeneration"] = self.observed_generation
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Condition:
        status = raw.get("status", "Unknown")
        return cls(
            type=str(raw.get("type", "")),
            status=status if status in ("True", "False") else "Unknown",
            reason=str(raw.get("reason", "")),
            message=str(raw.get("message", "")),
            last_transition_time=str(raw.get("lastTransitionTime", "")),
            observed_generation=raw.get("observedGeneration"),
        )


# --- every condition the operator sets, with its text (one home for each) -----------------


def invalid_spec(error: str) -> Condition:
    return Condition(RECONCILED, "False", "InvalidSpec", error)


def apply_failed(error: str) -> Condition:
    return Condition(RECONCILED, "False", "ApplyFailed", error)


CHILDREN_APPLIED = Condition(
    RECONCILED, "True", "Applied",
    "the server and carrier Deployments and the Service match the spec",
)


def server_answering(endpoint: str) -> Condition:
    return Condition(SERVER_REACHABLE, "True", "Answering", f"{endpoint} answers")


def server_unreachable(error: str) -> Condition:
    return Condition(SERVER_REACHABLE, "False", "Unreachable", error)


SERVER_PENDING = Condition(
    SERVER_REACHABLE, "Unknown", "Pending", "the server has not been contacted yet"
)
NO_QUEUES_DECLARED = Condition(
    QUEUES_CONFIGURED, "True", "NoQueuesDeclared", "the resource declares no queue settings"
)
QUEUES_PENDING = Condition(
    QUEUES_CONFIGURED, "False", "Pending", "waiting for the server to answer"
)


def queues_rejected(refusals: Sequence[str]) -> Condition:
    return Condition(
        QUEUES_CONFIGURED, "False", "Rejected", "the server refused: " + "; ".join(refusals)
    )


def queues_applied(count: int) -> Condition:
    return Condition(
        QUEUES_CONFIGURED, "True", "Applied", f"{count} queue(s) configured on the server"
    )


def metrics_unavailable(error: str) -> Condition:
    return Condition(METRICS_AVAILABLE, "False", "MetricsUnavailable",
                     f"{error}; carriers stay where they are")


def metrics_available(prometheus: bool, backlog: float) -> Condition:
    if prometheus:
        return Condition(METRICS_AVAILABLE, "True", "PrometheusQuery",
                         f"backlog {backlog:g} from the Prometheus query")
    return Condition(METRICS_AVAILABLE, "True", "ServerStats",
                     f"backlog {backlog:g} from the server's queue stats")


def not_known_yet(kind: str) -> Condition:
    return Condition(READY, "False", "Reconciling", f"{kind} is not known yet")


READY_TRUE = Condition(READY, "True", "Ready", "the server answers and the queues are configured")


def set_condition(
    conditions: Mapping[str, Condition], new: Condition, now: str | None = None
) -> dict[str, Condition]:
    """`conditions` with `new` in place; the transition time moves only when the status does."""
    old = conditions.get(new.type)
    if old is not None and old.status == new.status:
        stamp = old.last_transition_time or now or now_rfc3339()
    else:
        stamp = now or now_rfc3339()
    return {**conditions, new.type: dataclasses.replace(new, last_transition_time=stamp)}


def summarize(
    conditions: Mapping[str, Condition], generation: int | None, now: str | None = None
) -> dict[str, Condition]:
    """`conditions` with `Ready` recomputed from the ones it requires."""
    for kind in READY_REQUIRES:
        condition = conditions.get(kind)
        if condition is None:
            ready = not_known_yet(kind)
            break
        if condition.status != "True":
            ready = Condition(READY, "False", condition.reason, condition.message)
            break
    else:
        ready = READY_TRUE
    return set_condition(
        conditions, dataclasses.replace(ready, observed_generation=generation), now
    )


def parse_conditions(raw: Iterable[Mapping[str, Any]] | None) -> dict[str, Condition]:
    return {c.type: c for c in (Condition.from_dict(item) for item in raw or ()) if c.type}


def render_conditions(conditions: Mapping[str, Condition]) -> list[dict[str, Any]]:
    def rank(kind: str) -> tuple[int, str]:
        return (ORDER.index(kind) if kind in ORDER else len(ORDER), kind)

    return [conditions[kind].to_dict() for kind in sorted(conditions, key=rank)]


def find(conditions: Sequence[Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == kind), None)
