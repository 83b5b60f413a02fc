"""What the operator remembers about each AsyncQueue, and how its status is written.

Per AsyncQueue the operator keeps a `QueueState` in memory: the parsed spec, the conditions,
the scaler's window and the last status written. The reconcile handlers, the drift watchers
and the autoscaling daemon all go through it; a lock per AsyncQueue serializes their writes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from typing import Any, cast

import kopf

from ap4k.operator import conditions, metrics, queue_server
from ap4k.operator.conditions import Condition
from ap4k.operator.config import OperatorConfig, endpoint
from ap4k.operator.constants import API_VERSION, KIND
from ap4k.operator.kube import KubeClient, object_path
from ap4k.operator.scaling import Decision, ScalerState, ScalingPolicy
from ap4k.operator.spec import AsyncQueueSpec

Body = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Counts:
    """The unfinished messages per queue at one poll: the next poll's arrivals follow."""

    at: float  # monotonic seconds
    active: Mapping[str, int]


@dataclasses.dataclass
class CarrierPods:
    """The carrier Deployment's readiness, from its watch events (no polling, no pod access).

    A scale-up's start-up time is how long the ready count took to reach what was asked for.
    """

    ready: int = 0
    # (when, how many) of the last scale-up whose carriers are not all ready yet.
    waiting_for: tuple[float, int] | None = None
    startup_sample: float | None = None

    def requested(self, replicas: int, now: float) -> None:
        if replicas > self.ready:
            if self.waiting_for is None or replicas > self.waiting_for[1]:
                # Timed from the first scale-up still starting: that is how long users wait.
                at = self.waiting_for[0] if self.waiting_for else now
                self.waiting_for = (at, replicas)
        else:
            self.waiting_for = None

    def observed(self, ready: int, now: float) -> None:
        self.ready = ready
        if self.waiting_for is not None and ready >= self.waiting_for[1]:
            self.startup_sample = now - self.waiting_for[0]
            self.waiting_for = None

    def take_startup_sample(self) -> float | None:
        sample, self.startup_sample = self.startup_sample, None
        return sample


@dataclasses.dataclass
class QueueState:
    namespace: str
    name: str
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    spec: AsyncQueueSpec | None = None  # None until a valid spec is reconciled
    owner: Body = dataclasses.field(default_factory=dict)
    generation: int | None = None
    conditions: dict[str, Condition] = dataclasses.field(default_factory=dict)
    scaler: ScalerState | None = None
    decision: Decision | None = None  # the last scaling decision
    counts: Counts | None = None
    carriers: CarrierPods = dataclasses.field(default_factory=CarrierPods)
    backlog: int | None = None
    oldest_available_age_seconds: float | None = None
    last_scale_time: str | None = None
    written: Body | None = None  # the status last written (no patch when nothing changed)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class Registry:
    """The in-memory state of every AsyncQueue this operator process has seen."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, str], QueueState] = {}

    def get(self, namespace: str, name: str) -> QueueState | None:
        return self.states.get((namespace, name))

    def ensure(self, namespace: str, name: str, status: Mapping[str, Any] | None) -> QueueState:
        state = self.states.get((namespace, name))
        if state is None:
            state = QueueState(namespace, name)
            # Keep the transition times across operator restarts.
            state.conditions = conditions.parse_conditions((status or {}).get("conditions"))
            carriers = (status or {}).get("carriers") or {}
            state.last_scale_time = carriers.get("lastScaleTime")
            self.states[(namespace, name)] = state
        return state

    def forget(self, namespace: str, name: str) -> None:
        self.states.pop((namespace, name), None)
        metrics.forget(f"{namespace}/{name}")


@dataclasses.dataclass
class Runtime:
    """Everything a running operator shares, kept in kopf's memo (tests run several)."""

    config: OperatorConfig
    kube: KubeClient = dataclasses.field(default_factory=KubeClient)
    http: queue_server.HttpClient = dataclasses.field(default_factory=queue_server.HttpClient)
    registry: Registry = dataclasses.field(default_factory=Registry)


def owner_of(body: Mapping[str, Any]) -> Body:
    """The parts of the AsyncQueue body that kopf.adopt() needs."""
    meta = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion", API_VERSION),
        "kind": body.get("kind", KIND),
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "labels": dict(meta.get("labels") or {}),
        },
    }


def as_body(raw: Mapping[str, Any]) -> kopf.Body:
    """A kopf Body for posting events about an object (kopf wants apiVersion, kind, metadata)."""
    return kopf.Body(cast(Any, dict(raw)))


def policy_of(spec: AsyncQueueSpec) -> ScalingPolicy:
    carriers = spec.carriers
    return ScalingPolicy(
        min_replicas=carriers.min_replicas,
        max_replicas=carriers.max_replicas,
        concurrency=carriers.concurrency,
        target_delay_seconds=carriers.target_delay_seconds,
        scale_down_stabilization_seconds=carriers.scale_down_stabilization_seconds,
        initial_rate_per_carrier=carriers.initial_rate_per_carrier,
        initial_startup_seconds=carriers.initial_startup_seconds,
    )


def set_condition(state: QueueState, condition: Condition) -> None:
    """Record a condition of `state`, stamped with the generation being handled."""
    stamped = dataclasses.replace(condition, observed_generation=state.generation)
    state.conditions = conditions.set_condition(state.conditions, stamped)


def render_status(state: QueueState) -> Body:
    state.conditions = conditions.summarize(state.conditions, state.generation)
    status: Body = {
        "endpoint": endpoint(state.name, state.namespace),
        "conditions": conditions.render_conditions(state.conditions),
    }
    if state.generation is not None:
        status["observedGeneration"] = state.generation
    if state.backlog is not None:
        status["backlog"] = state.backlog
    if state.oldest_available_age_seconds is not None:
        status["oldestAvailableAgeSeconds"] = round(state.oldest_available_age_seconds, 3)
    if state.scaler is not None:
        status["carriers"] = _carriers_status(state, state.scaler)
    return status


def _carriers_status(state: QueueState, scaler: ScalerState) -> Body:
    decision = state.decision
    recommended = decision.recommended if decision is not None else None
    carriers: Body = {
        "replicas": scaler.replicas,
        "desiredReplicas": recommended if recommended is not None else scaler.replicas,
        "readyReplicas": state.carriers.ready,
    }
    if state.last_scale_time is not None:
        carriers["lastScaleTime"] = state.last_scale_time
    if state.spec is not None:
        carriers["targetDelaySeconds"] = state.spec.carriers.target_delay_seconds
    demand = decision.demand if decision is not None else None
    if demand is not None:
        # Rounded: a status patch per poll for the last digit of a rate is noise.
        carriers["demand"] = {
            "carriers": round(demand.carriers, 2),
            "arrivalRatePerSecond": round(demand.arrival_rate, 1),
            "ratePerCarrier": round(demand.rate_per_carrier, 1),
            "startupSeconds": round(demand.startup_seconds, 1),
            "forArrivals": round(demand.steady, 2),
            "forBacklog": round(demand.backlog, 2),
            "waiting": demand.waiting,
            "inFlight": demand.in_flight,
            "cappedQueues": list(demand.capped),
        }
    if decision is not None:
        carriers["reason"] = decision.reason
    return carriers


async def write_status(kube: KubeClient, state: QueueState) -> None:
    """Patch the status subresource, unless it is what was last written."""
    status = render_status(state)
    if status == state.written:
        return
    path = object_path(API_VERSION, KIND, state.namespace, state.name) + "/status"
    await kube.merge_patch(path, {"status": status})
    state.written = status
