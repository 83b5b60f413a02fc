"""Autoscaling and queue settings: one poll of an AsyncQueue's server, and the daemon loop.

Every `spec.carriers.pollIntervalSeconds` (every `ZERO_CHECK_SECONDS` while no carrier is
requested, so that the first message gets its carrier at once): apply the declared queue
settings the server does not hold, observe the load (the server's queue depths and settings,
its delivery counts over the interval, or Prometheus queries; the carriers ready, from the
carrier Deployment's watch events), let `scaling.decide()` pick the carrier count, set it on
the carrier Deployment, write status. Network calls happen outside the AsyncQueue's lock; the
decision and the writes inside it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import kopf

from ap4k.operator import builders, conditions, metrics, queue_server, scaling
from ap4k.operator.config import OperatorConfig, endpoint
from ap4k.operator.kube import KubeError, object_path
from ap4k.operator.spec import AsyncQueueSpec
from ap4k.operator.state import (
    Counts,
    QueueState,
    Runtime,
    as_body,
    policy_of,
    set_condition,
    write_status,
)

# While no carrier is requested, the server is checked this often (not every poll interval):
# the first message must get its first carrier within a second.
ZERO_CHECK_SECONDS = 0.5
# The delivery counts are asked for over the time since the last poll, within these bounds.
MIN_WINDOW_SECONDS, MAX_WINDOW_SECONDS = 0.5, 3600.0
ACTIVE_STATES = ("available", "running", "scheduled", "retryable", "discarded")


def _count(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def loads_from_server(
    queues: Sequence[Mapping[str, Any]], completed: Mapping[str, int], window: float,
    previous: Counts | None, now: float,
) -> tuple[tuple[scaling.QueueLoad, ...], Counts]:
    """Every queue the server lists (the carriers serve them all), with its rates.

    The completion rate is the server's delivery count over `window` seconds; the arrival rate
    follows by conservation from the change of the unfinished states since `previous` (dead
    letters count as finished work). Without a previous poll, arrivals are taken to match
    completions.
    """
    loads = []
    active: dict[str, int] = {}
    for queue in queues:
        name = str(queue.get("name"))
        depth = queue.get("depth") or {}
        settings = queue.get("settings") or {}
        active[name] = sum(_count(depth.get(state)) for state in ACTIVE_STATES)
        completion = completed.get(name, 0) / window
        arrival = completion
        if previous is not None:
            arrival = scaling.arrival_rate(
                completed.get(name, 0), previous.active.get(name, 0), active[name],
                now - previous.at,
            )
        age = queue.get("oldest_available_age_seconds")
        rate_limit = settings.get("rate_limit_per_second")
        concurrency = settings.get("max_concurrency")
        loads.append(scaling.QueueLoad(
            name=name,
            available=_count(depth.get("available")),
            running=_count(depth.get("running")),
            oldest_available_age=float(age) if isinstance(age, int | float) else 0.0,
            arrival_rate=arrival,
            completion_rate=completion,
            paused=settings.get("paused") is True,
            rate_limit_per_second=float(rate_limit) if isinstance(rate_limit, int | float)
            else None,
            max_concurrency=concurrency if isinstance(concurrency, int) else None,
        ))
    return tuple(loads), Counts(at=now, active=active)


@dataclasses.dataclass
class Poll:
    """What one poll of the server (and Prometheus) found, gathered outside the lock."""

    reachable: bool = False
    server_error: str = ""
    rejected: list[str] = dataclasses.field(default_factory=list)
    configured: int = 0
    loads: tuple[scaling.QueueLoad, ...] | None = None  # None: no metric
    counts: Counts | None = None
    metric_error: str = ""

    @property
    def backlog(self) -> int | None:
        if self.loads is None:
            return None
        return sum(q.available + q.running for q in self.loads)

    @property
    def oldest(self) -> float | None:
        if self.loads is None:
            return None
        return max((q.oldest_available_age for q in self.loads), default=0.0)


async def _configure(rt: Runtime, spec: AsyncQueueSpec, config: OperatorConfig, poll: Poll,
                     queues: Sequence[Mapping[str, Any]]) -> None:
    """Apply the declared settings the server does not hold yet (also undoing API edits)."""
    base_url = config.server_url(spec.name, spec.namespace)
    timeout, token = config.http_timeout_seconds, config.api_token
    by_name = {queue.get("name"): queue for queue in queues}
    for name, settings in builders.build_queue_settings(spec).items():
        have = (by_name.get(name) or {}).get("settings") or {}
        if name in by_name and queue_server.settings_match(have, settings):
            poll.configured += 1
            continue
        try:
            await queue_server.put_queue(
                rt.http, base_url, name, settings, timeout=timeout, token=token
            )
            poll.configured += 1
        except queue_server.Rejected as exc:
            field = f" ({exc.field})" if exc.field else ""
            poll.rejected.append(f"queue {name!r}{field}: {exc}")
        except queue_server.Unreachable as exc:
            poll.reachable, poll.server_error = False, str(exc)
            break


async def observe(
    rt: Runtime, state: QueueState, spec: AsyncQueueSpec, config: OperatorConfig, now: float
) -> Poll:
    poll = Poll()
    base_url = config.server_url(spec.name, spec.namespace)
    timeout, token = config.http_timeout_seconds, config.api_token
    previous = state.counts
    window = (now - previous.at) if previous is not None else spec.carriers.poll_interval_seconds
    window = min(MAX_WINDOW_SECONDS, max(MIN_WINDOW_SECONDS, window))
    queues: list[dict[str, Any]] | None = None
    completed: dict[str, int] = {}
    try:
        queues = await queue_server.list_queues(rt.http, base_url, timeout=timeout, token=token)
        completed = await queue_server.completed_within(
            rt.http, base_url, window, timeout=timeout, token=token
        )
        poll.reachable = True
    except (queue_server.Unreachable, queue_server.Rejected) as exc:
        poll.server_error = str(exc)
        queues = queues if poll.reachable else None

    server_loads: tuple[scaling.QueueLoad, ...] | None = None
    if queues is not None and poll.reachable:
        await _configure(rt, spec, config, poll, queues)
        server_loads, poll.counts = loads_from_server(queues, completed, window, previous, now)

    metric = spec.carriers.metric
    if metric.type == "Prometheus" and metric.prometheus is not None:
        prom = metric.prometheus
        try:
            backlog = await queue_server.prometheus_query(
                rt.http, prom.server_address, prom.query, timeout=timeout
            )
            arrival = completion = None
            if prom.arrival_rate_query:
                arrival = await queue_server.prometheus_query(
                    rt.http, prom.server_address, prom.arrival_rate_query, timeout=timeout
                )
            if prom.completion_rate_query:
                completion = await queue_server.prometheus_query(
                    rt.http, prom.server_address, prom.completion_rate_query, timeout=timeout
                )
            served = [q for q in server_loads or () if not q.paused]
            if arrival is None and served:
                arrival = sum(q.arrival_rate or 0.0 for q in served)
            if completion is None and served:
                completion = sum(q.completion_rate or 0.0 for q in served)
            # The query's value is the backlog; the age still comes from the server.
            poll.loads = (scaling.QueueLoad(
                name="the Prometheus query", available=round(backlog),
                running=sum(q.running for q in served),
                oldest_available_age=max((q.oldest_available_age for q in served), default=0.0),
                arrival_rate=arrival, completion_rate=completion,
            ),)
        except queue_server.Unreachable as exc:
            poll.metric_error = str(exc)
    elif server_loads is not None:
        poll.loads = server_loads
    else:
        poll.metric_error = f"the server's stats are unavailable: {poll.server_error}"
    return poll


def _record(state: QueueState, spec: AsyncQueueSpec, poll: Poll) -> None:
    if poll.reachable:
        set_condition(state, conditions.server_answering(endpoint(spec.name, spec.namespace)))
    else:
        set_condition(state, conditions.server_unreachable(poll.server_error))
    if not spec.queues:
        set_condition(state, conditions.NO_QUEUES_DECLARED)
    elif poll.rejected:
        set_condition(state, conditions.queues_rejected(poll.rejected))
    elif poll.reachable and poll.configured == len(spec.queues):
        set_condition(state, conditions.queues_applied(poll.configured))
    else:
        set_condition(state, conditions.QUEUES_PENDING)
    if poll.backlog is None:
        set_condition(state, conditions.metrics_unavailable(poll.metric_error))
    else:
        prometheus = spec.carriers.metric.type == "Prometheus"
        set_condition(state, conditions.metrics_available(prometheus, poll.backlog))


async def autoscale_once(
    rt: Runtime, state: QueueState, logger: logging.Logger | logging.LoggerAdapter[Any],
    now: float | None = None, *, full: bool = True,
) -> None:
    """One poll: configure queues, observe the load, scale the carriers, write status.

    `full=False` (the frequent check while at zero) writes the status only when it scaled.
    """
    spec = state.spec
    if spec is None:
        return
    now = time.monotonic() if now is None else now
    poll = await observe(rt, state, spec, rt.config, now)
    async with state.lock:
        if state.spec != spec or state.scaler is None:
            return  # the spec changed meanwhile: the next poll uses the new one
        _record(state, spec, poll)
        if poll.loads is None:
            metrics.METRIC_ERRORS.labels(state.key).inc()
            observation = None
        else:
            state.counts = poll.counts or state.counts
            state.backlog = poll.backlog
            metrics.BACKLOG.labels(state.key).set(poll.backlog or 0)
            observation = scaling.Observation(
                queues=poll.loads, carriers_ready=state.carriers.ready,
                carrier_startup_seconds=state.carriers.take_startup_sample(),
            )
        state.oldest_available_age_seconds = poll.oldest
        decision = scaling.decide(policy_of(spec), state.scaler, observation, now)
        state.decision = decision
        if decision.changed:
            path = object_path("apps/v1", "Deployment", spec.namespace,
                               builders.carrier_deployment_name(spec.name))
            # A missing Deployment comes back through the drift watcher with these replicas;
            # a failed patch raises before the state moves, so the next poll tries again.
            await rt.kube.merge_patch(path, {"spec": {"replicas": decision.replicas}})
            state.carriers.requested(decision.replicas, now)
            state.last_scale_time = conditions.now_rfc3339()
            logger.info("Carriers %s: %s", decision.reason, decision.message)
            kopf.event(as_body(state.owner), type="Normal", reason=decision.reason,
                       message=decision.message[:1024])
        state.scaler = decision.state
        metrics.DESIRED_CARRIERS.labels(state.key).set(
            decision.recommended if decision.recommended is not None else decision.replicas
        )
        metrics.CARRIERS.labels(state.key).set(decision.replicas)
        if full or decision.changed:
            await write_status(rt.kube, state)


async def _sleep(stopped: kopf.DaemonStopped, seconds: float) -> None:
    """`stopped.wait(seconds)` in plain sleeps of at most ZERO_CHECK_SECONDS.

    kopf's timed wait runs a task per call that ends in TimeoutError when the time is up; kopf
    re-raises those that end while the operator exits, and with a wait every half second at
    zero one always does: the exit fails. The daemon's `cancellation_backoff` (handlers.py)
    gives these sleeps the time to notice the flag.
    """
    deadline = time.monotonic() + seconds
    # (kopf's flag has no event to await without that task: hence the polling sleep.)
    while not stopped and (left := deadline - time.monotonic()) > 0:  # noqa: ASYNC110
        await asyncio.sleep(min(left, ZERO_CHECK_SECONDS))


async def autoscale(
    rt: Runtime, namespace: str, name: str, stopped: kopf.DaemonStopped,
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> None:
    """The per-AsyncQueue loop: one poll every `spec.carriers.pollIntervalSeconds`, and a
    check every `ZERO_CHECK_SECONDS` in between while no carrier is requested."""
    next_full = 0.0
    while not stopped:
        state = rt.registry.get(namespace, name)
        if state is None or state.spec is None:
            await _sleep(stopped, 1.0)  # not reconciled yet, or an invalid spec
            continue
        now = time.monotonic()
        full = now >= next_full
        try:
            await autoscale_once(rt, state, logger, now, full=full)
        except KubeError as exc:
            logger.warning("Autoscaling poll failed: %s", exc)
        except Exception:
            # A bug must not stop the scaling of this queue for good: log it, poll again.
            logger.exception("Autoscaling poll failed unexpectedly")
        interval = float(state.spec.carriers.poll_interval_seconds if state.spec else 1.0)
        if full:
            next_full = now + interval
        at_zero = state.scaler is not None and state.scaler.replicas == 0
        wait = min(ZERO_CHECK_SECONDS, interval) if at_zero else max(0.0, next_full - now)
        await _sleep(stopped, wait)
