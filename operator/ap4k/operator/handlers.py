"""The kopf handlers: thin decorators, each delegating to `reconcile` or `autoscale`.

Run with `ap4k operator` (see cli.py), or `kopf run -m ap4k.operator.handlers`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf

from ap4k.operator import autoscale, config, metrics, reconcile, state
from ap4k.operator.constants import (
    ANNOTATIONS_PREFIX,
    CHILDREN_SELECTOR,
    FINALIZER,
    GROUP,
    PLURAL,
    VERSION,
)

health = metrics.Health()


def _runtime(memo: kopf.Memo) -> state.Runtime:
    """This operator's runtime, kept in kopf's memo (one per operator run: the tests run
    several, one after the other, in a process). The settings are read once, here."""
    runtime = memo.get("runtime")
    if runtime is None:
        # The login may come before the start-up handler: whichever is first creates it.
        runtime = memo["runtime"] = state.Runtime(config=config.current())
    assert isinstance(runtime, state.Runtime)
    return runtime


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    runtime = _runtime(memo)
    # kopf's own bookkeeping goes to annotations: the status belongs to the AsyncQueue.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATIONS_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATIONS_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    # One operator owns the carrier replicas; no peering (and no peering CRD to install).
    settings.peering.standalone = True
    settings.scanning.disabled = not runtime.config.scanning
    # Only warnings and errors of kopf's per-object logs become Kubernetes events: a
    # "Handler succeeded" event on every Deployment status change would be noise. The
    # operator's own events (InvalidSpec, ScaledUp, …) are posted explicitly.
    settings.posting.level = logging.WARNING
    port = runtime.config.metrics_port
    if port:
        memo["metrics_runner"] = await metrics.serve(health, "0.0.0.0", port)
    health.started_at = time.monotonic()


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    health.started_at = None
    runner = memo.get("metrics_runner")
    if runner is not None:
        await runner.cleanup()
    runtime = _runtime(memo)
    await runtime.http.close()
    await runtime.kube.close()


@kopf.on.login()
def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """The usual logins (in-cluster, kubeconfig), or a fixed URL without credentials.

    The fixed URL (`AP4K_OPERATOR_KUBERNETES_URL`) is for `kubectl proxy` and the tests' API
    mock. Either way the operator's own API client gets the same credentials as kopf.
    """
    runtime = _runtime(memo)
    url = runtime.config.kubernetes_url
    info: kopf.ConnectionInfo | None
    if url:
        info = kopf.ConnectionInfo(server=url, default_namespace="default")
    else:
        info = (
            kopf.login_via_client(**kwargs)
            or kopf.login_with_service_account(**kwargs)
            or kopf.login_with_kubeconfig(**kwargs)
        )
    if info is not None:
        runtime.kube.set_credentials(info)
    return info


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def reconcile_asyncqueue(
    body: kopf.Body, logger: kopf.Logger, memo: kopf.Memo, **_: Any
) -> None:
    await reconcile.reconcile(_runtime(memo), body, logger)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
async def forget_asyncqueue(
    name: str, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:
    # Kubernetes deletes the children (owner references); only the memory is left to clear.
    _runtime(memo).registry.forget(namespace or "", name)


# The daemon sleeps in slices of ZERO_CHECK_SECONDS (see autoscale._sleep): give it longer
# than one to notice the stop flag before kopf cancels it.
@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_backoff=1.0, cancellation_timeout=10)
async def autoscale_carriers(
    name: str, namespace: str | None, stopped: kopf.DaemonStopped, logger: kopf.Logger,
    memo: kopf.Memo, **_: Any,
) -> None:
    await autoscale.autoscale(_runtime(memo), namespace or "", name, stopped, logger)


@kopf.on.event("apps", "v1", "deployments", labels=CHILDREN_SELECTOR)
async def deployment_event(
    event: kopf.RawEvent, body: kopf.Body, logger: kopf.Logger, memo: kopf.Memo, **_: Any
) -> None:
    await reconcile.correct_drift(
        _runtime(memo), "Deployment", event.get("type"), body, logger
    )


@kopf.on.event("", "v1", "services", labels=CHILDREN_SELECTOR)
async def service_event(
    event: kopf.RawEvent, body: kopf.Body, logger: kopf.Logger, memo: kopf.Memo, **_: Any
) -> None:
    await reconcile.correct_drift(_runtime(memo), "Service", event.get("type"), body, logger)
