"""What the handlers do: reconcile an AsyncQueue, correct its children's drift, autoscale.

Per AsyncQueue the operator keeps a `QueueState` in memory: the parsed spec, the conditions,
the scaler's window and the last status written. Three kinds of handlers touch it:

- `reconcile()` (on create, update, resume): parse the spec, apply the children, write status;
- `correct_drift()` (on events of the children): put an edited or deleted child back;
- `autoscale()` (a daemon per AsyncQueue, every `pollIntervalSeconds`): configure the queues on
  the server, sample the backlog, decide and set the carrier replicas, write status.

A lock per AsyncQueue serializes what they write; network calls to the ap4k server happen
outside of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any, cast

import kopf

from ap4k.operator import builders, conditions, metrics, queue_server
from ap4k.operator.apply import apply, contains
from ap4k.operator.conditions import Condition
from ap4k.operator.config import OperatorConfig, current, endpoint
from ap4k.operator.kube import KubeClient, KubeError, object_path
from ap4k.operator.scaling import ScalerState, ScalingPolicy, decide
from ap4k.operator.spec import AsyncQueueSpec, SpecError, parse_spec

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


def _as_body(raw: Mapping[str, Any]) -> kopf.Body:
    """A kopf Body for posting events about an object (kopf wants apiVersion, kind, metadata)."""
    return kopf.Body(cast(Any, dict(raw)))


def _policy(spec: AsyncQueueSpec) -> ScalingPolicy:
    carriers = spec.carriers
    return ScalingPolicy(
        min_replicas=carriers.min_replicas,
        max_replicas=carriers.max_replicas,
        target_backlog_per_replica=carriers.target_backlog_per_replica,
        scale_down_stabilization_seconds=carriers.scale_down_stabilization_seconds,
    )


def _set(state: QueueState, kind: str, status: conditions.Status, reason: str, msg: str) -> None:
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


# --- reconcile ------------------------------------------------------------------------------


async def _current_carrier_replicas(kube: KubeClient, spec: AsyncQueueSpec) -> int | None:
    path = object_path("apps/v1", "Deployment", spec.namespace,
                       builders.carrier_deployment_name(spec.name))
    deployment = await kube.get(path)
    if deployment is None:
        return None
    replicas = deployment.get("spec", {}).get("replicas")
    return replicas if isinstance(replicas, int) else None


async def reconcile(
    rt: Runtime, body: Mapping[str, Any], logger: logging.Logger | logging.LoggerAdapter[Any]
) -> None:
    meta = body.get("metadata", {})
    name, namespace = meta["name"], meta["namespace"]
    state = rt.registry.ensure(namespace, name, body.get("status"))
    config = current()
    async with state.lock:
        state.generation = meta.get("generation")
        state.owner = owner_of(body)
        try:
            spec = parse_spec(name, namespace, body.get("spec") or {})
        except SpecError as exc:
            # Nothing to retry until the spec changes: record it, tell the user, stop here.
            state.spec = None
            _set(state, conditions.RECONCILED, "False", "InvalidSpec", str(exc))
            await write_status(rt.kube, state)
            kopf.event(_as_body(body), type="Warning", reason="InvalidSpec", message=str(exc))
            metrics.RECONCILIATIONS.labels("invalid").inc()
            logger.warning("Invalid spec: %s", exc)
            return

        policy = _policy(spec)
        if state.scaler is None:
            # First sight (or operator restart): adopt what the carrier Deployment has.
            existing = await _current_carrier_replicas(rt.kube, spec)
            start = policy.clamp(existing if existing is not None else spec.carriers.min_replicas)
            state.scaler = ScalerState(replicas=start)
        else:
            state.scaler = dataclasses.replace(
                state.scaler, replicas=policy.clamp(state.scaler.replicas)
            )
        state.spec = spec
        try:
            outcomes = [
                await apply(rt.kube, child)
                for child in builders.desired_children(
                    spec, state.owner, config, state.scaler.replicas
                )
            ]
        except KubeError as exc:
            _set(state, conditions.RECONCILED, "False", "ApplyFailed", str(exc))
            await write_status(rt.kube, state)
            metrics.RECONCILIATIONS.labels("error").inc()
            raise kopf.TemporaryError(f"applying the children failed: {exc}", delay=10) from exc

        _set(state, conditions.RECONCILED, "True", "Applied",
             "the server and carrier Deployments and the Service match the spec")
        if not spec.queues:
            _set(state, conditions.QUEUES_CONFIGURED, "True", "NoQueuesDeclared",
                 "the resource declares no queue settings")
        elif state.conditions.get(conditions.QUEUES_CONFIGURED, None) is None:
            _set(state, conditions.QUEUES_CONFIGURED, "False", "Pending",
                 "waiting for the server to answer")
        if conditions.SERVER_REACHABLE not in state.conditions:
            _set(state, conditions.SERVER_REACHABLE, "Unknown", "Pending",
                 "the server has not been contacted yet")
        await write_status(rt.kube, state)
        changed = [outcome for outcome in outcomes if outcome != "unchanged"]
        metrics.RECONCILIATIONS.labels("applied" if changed else "unchanged").inc()
        if changed:
            logger.info("Children reconciled: %s", ", ".join(outcomes))


# --- drift ----------------------------------------------------------------------------------


def _desired_child(state: QueueState, kind: str, name: str, config: OperatorConfig
                   ) -> Body | None:
    if state.spec is None or state.scaler is None:
        return None
    children = builders.desired_children(state.spec, state.owner, config, state.scaler.replicas)
    return next((c for c in children
                 if c["kind"] == kind and c["metadata"]["name"] == name), None)


async def correct_drift(
    rt: Runtime, kind: str, event_type: str | None, child: Mapping[str, Any],
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> None:
    """Put a child back when it was deleted or edited away from its desired state."""
    meta = child.get("metadata", {})
    owner_name = (meta.get("labels") or {}).get(builders.OWNER_LABEL)
    namespace, name = meta.get("namespace"), meta.get("name")
    if not owner_name or not namespace or not name:
        return
    state = rt.registry.get(namespace, owner_name)
    if state is None:
        return  # not reconciled yet: the resume handler will
    config = current()
    # Most events are the operator's own writes: filter them out without taking the lock.
    desired = _desired_child(state, kind, name, config)
    if desired is None or (event_type != "DELETED" and contains(child, desired)):
        return
    async with state.lock:
        # Again under the lock: the autoscaler may have just changed the carrier replicas.
        desired = _desired_child(state, kind, name, config)
        if desired is None:
            return
        if event_type == "DELETED":
            # The owner may be going away (garbage collection deletes the children).
            owner = await rt.kube.get(object_path(API_VERSION, KIND, namespace, owner_name))
            if owner is None or owner.get("metadata", {}).get("deletionTimestamp"):
                return
        outcome = await apply(rt.kube, desired)
    if outcome != "unchanged":
        metrics.RECONCILIATIONS.labels("applied").inc()
        logger.info("%s %s was %s; %s it", kind, name,
                    "deleted" if event_type == "DELETED" else "changed",
                    "recreated" if outcome == "created" else "restored")


# --- autoscaling and queue settings ---------------------------------------------------------


@dataclasses.dataclass
class Observation:
    """What one poll of the server (and Prometheus) found, gathered outside the lock."""

    reachable: bool = False
    server_error: str = ""
    rejected: list[str] = dataclasses.field(default_factory=list)
    configured: int = 0
    backlog: float | None = None
    oldest: float | None = None
    metric_error: str = ""


async def observe(rt: Runtime, spec: AsyncQueueSpec, config: OperatorConfig) -> Observation:
    obs = Observation()
    base_url = config.server_url(spec.name, spec.namespace)
    timeout, token = config.http_timeout_seconds, config.api_token
    queues: list[dict[str, Any]] | None = None
    try:
        queues = await queue_server.list_queues(rt.http, base_url, timeout=timeout, token=token)
        obs.reachable = True
    except (queue_server.Unreachable, queue_server.Rejected) as exc:
        obs.server_error = str(exc)

    if queues is not None:
        # Apply the declared settings the server does not hold yet (also undoing API edits).
        by_name = {queue.get("name"): queue for queue in queues}
        for name, settings in builders.build_queue_settings(spec).items():
            have = (by_name.get(name) or {}).get("settings") or {}
            if name in by_name and queue_server.settings_match(have, settings):
                obs.configured += 1
                continue
            try:
                await queue_server.put_queue(
                    rt.http, base_url, name, settings, timeout=timeout, token=token
                )
                obs.configured += 1
            except queue_server.Rejected as exc:
                field = f" ({exc.field})" if exc.field else ""
                obs.rejected.append(f"queue {name!r}{field}: {exc}")
            except queue_server.Unreachable as exc:
                obs.reachable, obs.server_error = False, str(exc)
                break

    metric = spec.carriers.metric
    if metric.type == "Prometheus" and metric.prometheus is not None:
        try:
            obs.backlog = await queue_server.prometheus_query(
                rt.http, metric.prometheus.server_address, metric.prometheus.query,
                timeout=timeout,
            )
        except queue_server.Unreachable as exc:
            obs.metric_error = str(exc)
        if queues is not None:  # the age still comes from the server
            obs.oldest = queue_server.backlog_of(queues, spec.queue_names)[1]
    elif queues is not None:
        backlog, obs.oldest = queue_server.backlog_of(queues, spec.queue_names)
        obs.backlog = float(backlog)
    else:
        obs.metric_error = f"the server's stats are unavailable: {obs.server_error}"
    return obs


def _record(state: QueueState, spec: AsyncQueueSpec, obs: Observation) -> None:
    if obs.reachable:
        _set(state, conditions.SERVER_REACHABLE, "True", "Answering",
             f"{endpoint(spec.name, spec.namespace)} answers")
    else:
        _set(state, conditions.SERVER_REACHABLE, "False", "Unreachable", obs.server_error)
    if not spec.queues:
        _set(state, conditions.QUEUES_CONFIGURED, "True", "NoQueuesDeclared",
             "the resource declares no queue settings")
    elif obs.rejected:
        _set(state, conditions.QUEUES_CONFIGURED, "False", "Rejected",
             "the server refused: " + "; ".join(obs.rejected))
    elif obs.reachable and obs.configured == len(spec.queues):
        _set(state, conditions.QUEUES_CONFIGURED, "True", "Applied",
             f"{obs.configured} queue(s) configured on the server")
    else:
        _set(state, conditions.QUEUES_CONFIGURED, "False", "Pending",
             "waiting for the server to answer")
    if obs.backlog is None:
        _set(state, conditions.METRICS_AVAILABLE, "False", "MetricsUnavailable",
             f"{obs.metric_error}; carriers stay where they are")
    else:
        if spec.carriers.metric.type == "Prometheus":
            source, origin = "PrometheusQuery", "the Prometheus query"
        else:
            source, origin = "ServerStats", "the server's queue stats"
        _set(state, conditions.METRICS_AVAILABLE, "True", source,
             f"backlog {obs.backlog:g} from {origin}")


async def autoscale_once(
    rt: Runtime, state: QueueState, logger: logging.Logger | logging.LoggerAdapter[Any],
    now: float | None = None,
) -> None:
    """One poll: configure queues, sample the backlog, scale the carriers, write status."""
    spec = state.spec
    if spec is None:
        return
    obs = await observe(rt, spec, current())
    async with state.lock:
        if state.spec is not spec or state.scaler is None:
            return  # the spec changed meanwhile: the next poll uses the new one
        _record(state, spec, obs)
        if obs.backlog is None:
            metrics.METRIC_ERRORS.labels(state.key).inc()
        else:
            state.backlog = round(obs.backlog)
            metrics.BACKLOG.labels(state.key).set(obs.backlog)
        state.oldest_available_age_seconds = obs.oldest
        decision = decide(_policy(spec), state.scaler, obs.backlog,
                          time.monotonic() if now is None else now)
        state.recommended = decision.recommended
        if decision.changed:
            path = object_path("apps/v1", "Deployment", spec.namespace,
                               builders.carrier_deployment_name(spec.name))
            # A missing Deployment comes back through the drift watcher with these replicas;
            # a failed patch raises before the state moves, so the next poll tries again.
            await rt.kube.merge_patch(path, {"spec": {"replicas": decision.replicas}})
            state.last_scale_time = conditions.now_rfc3339()
            logger.info("Carriers %s: %s", decision.reason, decision.message)
            kopf.event(_as_body(state.owner), type="Normal", reason=decision.reason,
                       message=decision.message)
        state.scaler = decision.state
        metrics.DESIRED_CARRIERS.labels(state.key).set(
            decision.recommended if decision.recommended is not None else decision.replicas
        )
        metrics.CARRIERS.labels(state.key).set(decision.replicas)
        await write_status(rt.kube, state)


async def autoscale(
    rt: Runtime, namespace: str, name: str, stopped: kopf.DaemonStopped,
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> None:
    """The per-AsyncQueue loop: one poll every `spec.carriers.pollIntervalSeconds`."""
    while not stopped:
        state = rt.registry.get(namespace, name)
        if state is None or state.spec is None:
            await stopped.wait(1.0)  # not reconciled yet, or an invalid spec
            continue
        try:
            await autoscale_once(rt, state, logger)
        except KubeError as exc:
            logger.warning("Autoscaling poll failed: %s", exc)
        except Exception:
            # A bug must not stop the scaling of this queue for good: log it, poll again.
            logger.exception("Autoscaling poll failed unexpectedly")
        await stopped.wait(state.spec.carriers.poll_interval_seconds if state.spec else 1.0)
