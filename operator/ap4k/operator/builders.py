"""Pure builders: the desired child objects of an AsyncQueue, rendered from its typed spec.

No I/O here: every function takes the spec (and the operator's settings) and returns plain
dicts, unit-tested without a cluster. `desired_children()` adds the owner references.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf
import msgspec

from ap4k.operator.config import CARRIER_METRICS_PORT, SERVER_PORT, OperatorConfig, endpoint
from ap4k.operator.constants import COMPONENT_LABEL, MANAGED_BY, MANAGED_BY_LABEL, OWNER_LABEL
from ap4k.operator.spec import AsyncQueueSpec

# Non-root like the image's USER (a numeric id, so that runAsNonRoot can verify it).
RUN_AS_USER = 10001

Body = dict[str, Any]

# Kubernetes sends SIGTERM, waits TERMINATION_GRACE_SECONDS, then SIGKILLs. A server or
# carrier exits within AP4K_SHUTDOWN_SECONDS of SIGTERM, its whole drain included; the 10 s
# left are room for a loaded node and for the endpoints to forget a server pod. Within the
# budget, deliveries in flight may take AP4K_DRAIN_SECONDS to finish; the rest of it records
# their outcomes (or sends a carrier's last acks), ends open requests and closes the database
# connections: a server keeps 8 s of a 35 s budget for that, a carrier 4 s.
TERMINATION_GRACE_SECONDS = 45
SHUTDOWN_SECONDS = TERMINATION_GRACE_SECONDS - 10
DRAIN_SECONDS = SHUTDOWN_SECONDS - 10


def _drain_env() -> list[Body]:
    return [
        {"name": "AP4K_SHUTDOWN_SECONDS", "value": str(SHUTDOWN_SECONDS)},
        {"name": "AP4K_DRAIN_SECONDS", "value": str(DRAIN_SECONDS)},
    ]


def server_deployment_name(name: str) -> str:
    return f"{name}-server"


def carrier_deployment_name(name: str) -> str:
    return f"{name}-carrier"


def selector_labels(name: str, component: str) -> dict[str, str]:
    # Selectors are immutable on Deployments: never add to these.
    return {
        "app.kubernetes.io/name": "ap4k",
        "app.kubernetes.io/instance": name,
        COMPONENT_LABEL: component,
    }


def labels(name: str, component: str) -> dict[str, str]:
    return {
        **selector_labels(name, component),
        "app.kubernetes.io/part-of": "ap4k",
        MANAGED_BY_LABEL: MANAGED_BY,
        OWNER_LABEL: name,
    }


def scrape_annotations(config: OperatorConfig, port: int) -> dict[str, str]:
    if not config.scrape_annotations:
        return {}
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }


def _pod_security_context() -> Body:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security_context() -> Body:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _http_probe(path: str, port: str, period: int, failures: int) -> Body:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _pod_spec(spec: AsyncQueueSpec, config: OperatorConfig, container: Body) -> Body:
    pod: Body = {
        # The pods talk to the ap4k server over HTTP, never to the Kubernetes API.
        "automountServiceAccountToken": False,
        # Service links would inject variables such as AP4K_PORT=tcp://… for a Service named
        # `ap4k`, and ap4k reads its settings from AP4K_* variables.
        "enableServiceLinks": False,
        "securityContext": _pod_security_context(),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "containers": [
            {
                "image": spec.image or config.image,
                "imagePullPolicy": spec.image_pull_policy,
                **container,
                "securityContext": _container_security_context(),
                # The root filesystem is read-only; the image keeps HOME and caches in /tmp.
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            }
        ],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
    }
    if config.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": secret} for secret in config.image_pull_secrets]
    return pod


def _deployment(
    name: str, namespace: str, component: str, replicas: int, annotations: Mapping[str, str],
    pod_spec: Body,
) -> Body:
    template_metadata: Body = {"labels": labels(name, component)}
    if annotations:
        template_metadata["annotations"] = dict(annotations)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": f"{name}-{component}",
            "namespace": namespace,
            "labels": labels(name, component),
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(name, component)},
            "template": {"metadata": template_metadata, "spec": pod_spec},
        },
    }


def build_server_deployment(spec: AsyncQueueSpec, config: OperatorConfig) -> Body:
    """Deployment `<name>-server`: `ap4k serve` with the database URL from the Secret."""
    container: Body = {
        "name": "server",
        "args": [
            "serve",
            "--host", "0.0.0.0",
            "--port", str(SERVER_PORT),
            "--dispatchers", str(spec.server.dispatchers),
        ],
        "env": [
            {
                "name": "AP4K_DATABASE_URL",
                "valueFrom": {
                    "secretKeyRef": {"name": spec.database.secret_name, "key": spec.database.key}
                },
            },
            {"name": "AP4K_LOG_FORMAT", "value": config.pod_log_format},
            *_drain_env(),
        ],
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "livenessProbe": _http_probe("/healthz", "http", period=10, failures=3),
        "readinessProbe": _http_probe("/readyz", "http", period=5, failures=2),
        "resources": dict(spec.server.resources),
    }
    return _deployment(
        spec.name, spec.namespace, "server", spec.server.replicas,
        scrape_annotations(config, SERVER_PORT), _pod_spec(spec, config, container),
    )


def build_service(spec: AsyncQueueSpec) -> Body:
    """Service `<name>`: what applications post to, `http://<name>.<namespace>.svc:7438`."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": labels(spec.name, "server"),
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(spec.name, "server"),
            "ports": [
                {"name": "http", "port": SERVER_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


def build_carrier_deployment(spec: AsyncQueueSpec, config: OperatorConfig, replicas: int) -> Body:
    """Deployment `<name>-carrier`: `ap4k carrier` pointed at the Service.

    `replicas` is the autoscaler's decision, which the operator alone owns.
    Carriers lease from every queue of the server, not only the declared ones: a carrier
    never leaves a message stranded.
    """
    container: Body = {
        "name": "carrier",
        "args": [
            "carrier",
            "--server", endpoint(spec.name, spec.namespace),
            "--concurrency", str(spec.carriers.concurrency),
            "--metrics-port", str(CARRIER_METRICS_PORT),
        ],
        "env": [
            {"name": "AP4K_LOG_FORMAT", "value": config.pod_log_format},
            *_drain_env(),
        ],
        "ports": [{"name": "metrics", "containerPort": CARRIER_METRICS_PORT, "protocol": "TCP"}],
        "livenessProbe": _http_probe("/healthz", "metrics", period=10, failures=3),
        # Often: the autoscaler learns the carriers' start-up time from their readiness.
        "readinessProbe": _http_probe("/healthz", "metrics", period=2, failures=2),
        "resources": dict(spec.carriers.resources),
    }
    return _deployment(
        spec.name, spec.namespace, "carrier", replicas,
        scrape_annotations(config, CARRIER_METRICS_PORT), _pod_spec(spec, config, container),
    )


def build_queue_settings(spec: AsyncQueueSpec) -> dict[str, dict[str, Any]]:
    """The body of `PUT /v1/queues/{name}` for each declared queue (snake_case; an object
    setting such as `circuit_breaker` as a JSON object with every field, as the server shows
    it back)."""
    return {queue.name: msgspec.to_builtins(dict(queue.settings)) for queue in spec.queues}


def desired_children(
    spec: AsyncQueueSpec, owner: Mapping[str, Any], config: OperatorConfig, carrier_replicas: int
) -> list[Body]:
    """Every child object, owned by the AsyncQueue `owner` (garbage-collected with it)."""
    children = [
        build_server_deployment(spec, config),
        build_service(spec),
        build_carrier_deployment(spec, config, carrier_replicas),
    ]
    kopf.adopt(children, owner=owner)  # type: ignore[arg-type]  # any Mapping body works
    return children
