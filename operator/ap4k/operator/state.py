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
from ap4k.operator.config import endpoint
from ap4k.operator.kube import KubeClient, object_path
from ap4k.operator.scaling import ScalerState, ScalingPolicy
from ap4k.operator.spec import AsyncQueueSpec

API_VERSION = "ap4k.dev/v1alpha1"
KIND = "AsyncQueue"

Body = dict[str, Any]


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
    backlog: int | None = None
    oldest_available_age_seconds: float | None = None
    recommended: int | None = None
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
    """Everything a running operator shares; replaced at each start (tests run several)."""

    kube: KubeClient
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
        target_backlog_per_replica=carriers.target_backlog_per_replica,
        scale_down_stabilization_seconds=carriers.scale_down_stabilization_seconds,
    )


def set_condition(
    state: QueueState, kind: str, status: conditions.Status, reason: str, msg: str
) -> None:
    """Record a condition of `state`, stamped with the generation being handled."""
    condition = Condition(kind, status, reason, msg, observed_generation=state.generation)
    state.conditions = conditions.set_condition(state.conditions, condition)


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
        carriers: Body = {"replicas": state.scaler.replicas}
        carriers["desiredReplicas"] = (
            state.recommended if state.recommended is not None else state.scaler.replicas
        )
        if state.last_scale_time is not None:
            carriers["lastScaleTime"] = state.last_scale_time
        status["carriers"] = carriers
    return status


async def write_status(kube: KubeClient, state: QueueState) -> None:
    """Patch the status subresource, unless it is what was last written."""
    status = render_status(state)
    if status == state.written:
        return
    path = object_path(API_VERSION, KIND, state.namespace, state.name) + "/status"
    await kube.merge_patch(path, {"status": status})
    state.written = status
