"""Reconcile an AsyncQueue's children, and put them back when they drift.

- `reconcile()` (on create, update, resume): parse the spec, apply the children, write status;
- `correct_drift()` (on events of the children): put an edited or deleted child back.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf

from ap4k.operator import builders, conditions, metrics
from ap4k.operator.apply import apply, contains
from ap4k.operator.config import OperatorConfig
from ap4k.operator.constants import API_VERSION, KIND, OWNER_LABEL
from ap4k.operator.kube import KubeClient, KubeError, object_path
from ap4k.operator.scaling import ScalerState
from ap4k.operator.spec import AsyncQueueSpec, SpecError, parse_spec
from ap4k.operator.state import (
    Body,
    QueueState,
    Runtime,
    as_body,
    owner_of,
    policy_of,
    set_condition,
    write_status,
)


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
    config = rt.config
    async with state.lock:
        state.generation = meta.get("generation")
        state.owner = owner_of(body)
        try:
            spec = parse_spec(name, namespace, body.get("spec") or {})
        except SpecError as exc:
            # Nothing to retry until the spec changes: record it, tell the user, stop here.
            state.spec = None
            set_condition(state, conditions.invalid_spec(str(exc)))
            await write_status(rt.kube, state)
            kopf.event(as_body(body), type="Warning", reason="InvalidSpec", message=str(exc))
            metrics.RECONCILIATIONS.labels("invalid").inc()
            logger.warning("Invalid spec: %s", exc)
            return

        policy = policy_of(spec)
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
            set_condition(state, conditions.apply_failed(str(exc)))
            await write_status(rt.kube, state)
            metrics.RECONCILIATIONS.labels("error").inc()
            raise kopf.TemporaryError(f"applying the children failed: {exc}", delay=10) from exc

        set_condition(state, conditions.CHILDREN_APPLIED)
        if not spec.queues:
            set_condition(state, conditions.NO_QUEUES_DECLARED)
        elif state.conditions.get(conditions.QUEUES_CONFIGURED, None) is None:
            set_condition(state, conditions.QUEUES_PENDING)
        if conditions.SERVER_REACHABLE not in state.conditions:
            set_condition(state, conditions.SERVER_PENDING)
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
    owner_name = (meta.get("labels") or {}).get(OWNER_LABEL)
    namespace, name = meta.get("namespace"), meta.get("name")
    if not owner_name or not namespace or not name:
        return
    state = rt.registry.get(namespace, owner_name)
    if state is None:
        return  # not reconciled yet: the resume handler will
    if kind == "Deployment" and state.spec is not None and (
        name == builders.carrier_deployment_name(state.spec.name)
    ):
        ready = (child.get("status") or {}).get("readyReplicas") or 0
        state.carriers.observed(0 if event_type == "DELETED" else int(ready), time.monotonic())
    config = rt.config
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
