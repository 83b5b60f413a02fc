"""Autoscaling and queue settings: one poll of an AsyncQueue's server, and the daemon loop.

Every `spec.carriers.pollIntervalSeconds`: apply the declared queue settings the server does not
hold, sample the backlog (server stats or a Prometheus query), let `scaling.decide()` pick the
carrier count, set it on the carrier Deployment, write status. Network calls happen outside
the AsyncQueue's lock; the decision and the writes inside it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import kopf

from ap4k.operator import builders, conditions, metrics, queue_server
from ap4k.operator.config import OperatorConfig, current, endpoint
from ap4k.operator.kube import KubeError, object_path
from ap4k.operator.scaling import decide
from ap4k.operator.spec import AsyncQueueSpec
from ap4k.operator.state import QueueState, Runtime, as_body, policy_of, set_condition, write_status


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
        set_condition(state, conditions.SERVER_REACHABLE, "True", "Answering",
                      f"{endpoint(spec.name, spec.namespace)} answers")
    else:
        set_condition(state, conditions.SERVER_REACHABLE, "False", "Unreachable", obs.server_error)
    if not spec.queues:
        set_condition(state, conditions.QUEUES_CONFIGURED, "True", "NoQueuesDeclared",
                      "the resource declares no queue settings")
    elif obs.rejected:
        set_condition(state, conditions.QUEUES_CONFIGURED, "False", "Rejected",
                      "the server refused: " + "; ".join(obs.rejected))
    elif obs.reachable and obs.configured == len(spec.queues):
        set_condition(state, conditions.QUEUES_CONFIGURED, "True", "Applied",
                      f"{obs.configured} queue(s) configured on the server")
    else:
        set_condition(state, conditions.QUEUES_CONFIGURED, "False", "Pending",
                      "waiting for the server to answer")
    if obs.backlog is None:
        set_condition(state, conditions.METRICS_AVAILABLE, "False", "MetricsUnavailable",
                      f"{obs.metric_error}; carriers stay where they are")
    else:
        if spec.carriers.metric.type == "Prometheus":
            source, origin = "PrometheusQuery", "the Prometheus query"
        else:
            source, origin = "ServerStats", "the server's queue stats"
        set_condition(state, conditions.METRICS_AVAILABLE, "True", source,
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
        if state.spec != spec or state.scaler is None:
            return  # the spec changed meanwhile: the next poll uses the new one
        _record(state, spec, obs)
        if obs.backlog is None:
            metrics.METRIC_ERRORS.labels(state.key).inc()
        else:
            state.backlog = round(obs.backlog)
            metrics.BACKLOG.labels(state.key).set(obs.backlog)
        state.oldest_available_age_seconds = obs.oldest
        decision = decide(policy_of(spec), state.scaler, obs.backlog,
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
            kopf.event(as_body(state.owner), type="Normal", reason=decision.reason,
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
