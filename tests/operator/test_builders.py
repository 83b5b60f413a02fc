"""The pure builders: desired Deployments, Service and queue settings from a typed spec."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from ap4k.operator.builders import (
    build_carrier_deployment,
    build_queue_settings,
    build_server_deployment,
    build_service,
    desired_children,
)
from ap4k.operator.config import OperatorConfig
from ap4k.operator.queue_server import settings_match
from ap4k.operator.spec import parse_spec

CONFIG = OperatorConfig(image="registry.test/ap4k:9.9.9")
OWNER = {
    "apiVersion": "ap4k.dev/v1alpha1", "kind": "AsyncQueue",
    "metadata": {"name": "orders", "namespace": "shop", "uid": "u-1",
                 "labels": {"team": "payments"}},
}
K8S_VERSION = "1.30.0"


def spec(**raw: Any) -> Any:
    return parse_spec("orders", "shop", {"database": {"secretName": "orders-db"}, **raw})


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = only
    return result


def test_server_deployment() -> None:
    s = spec(server={"replicas": 3, "dispatchers": 0,
                     "resources": {"requests": {"cpu": "100m"}, "limits": {"memory": "256Mi"}}},
             database={"secretName": "pg", "key": "dsn"}, imagePullPolicy="Always")
    deployment = build_server_deployment(s, CONFIG)
    assert deployment["metadata"]["name"] == "orders-server"
    assert deployment["metadata"]["namespace"] == "shop"
    assert deployment["spec"]["replicas"] == 3
    c = container(deployment)
    assert c["image"] == "registry.test/ap4k:9.9.9"  # the operator's own image by default
    assert c["imagePullPolicy"] == "Always"
    assert c["args"] == ["serve", "--host", "0.0.0.0", "--port", "7438", "--dispatchers", "0"]
    assert c["env"] == [
        {"name": "AP4K_DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "pg", "key": "dsn"}}},
        {"name": "AP4K_LOG_FORMAT", "value": "json"},
        {"name": "AP4K_SHUTDOWN_SECONDS", "value": "35"},
        {"name": "AP4K_DRAIN_SECONDS", "value": "25"},
    ]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 45
    assert c["ports"] == [{"name": "http", "containerPort": 7438, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["resources"] == {"requests": {"cpu": "100m"}, "limits": {"memory": "256Mi"}}
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "7438",
        "prometheus.io/path": "/metrics",
    }
    # The selector is a subset of the pod labels, and only the stable ones.
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance",
                             "app.kubernetes.io/component"}


def test_pods_are_locked_down() -> None:
    for deployment in (build_server_deployment(spec(), CONFIG),
                       build_carrier_deployment(spec(), CONFIG, 1)):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        # A Service named e.g. `ap4k` would otherwise inject AP4K_PORT=tcp://… into the pods.
        assert pod["enableServiceLinks"] is False
        security = container(deployment)["securityContext"]
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container(deployment)["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]


def test_service_points_at_the_server_pods() -> None:
    service = build_service(spec())
    server = build_server_deployment(spec(), CONFIG)
    assert service["metadata"]["name"] == "orders"
    assert service["spec"]["selector"] == server["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 7438, "targetPort": "http", "protocol": "TCP"}
    ]


def test_carrier_deployment() -> None:
    s = spec(image="mine.test/ap4k:dev", carriers={"concurrency": 32})
    deployment = build_carrier_deployment(s, CONFIG, replicas=4)
    assert deployment["metadata"]["name"] == "orders-carrier"
    assert deployment["spec"]["replicas"] == 4
    c = container(deployment)
    assert c["image"] == "mine.test/ap4k:dev"
    assert c["args"] == ["carrier", "--server", "http://orders.shop.svc:7438",
                         "--concurrency", "32", "--metrics-port", "7439"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["ports"][0]["containerPort"] == 7439
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "7439"
    # Carriers hold no database credentials.
    assert c["env"] == [
        {"name": "AP4K_LOG_FORMAT", "value": "json"},
        {"name": "AP4K_SHUTDOWN_SECONDS", "value": "35"},
        {"name": "AP4K_DRAIN_SECONDS", "value": "25"},
    ]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 45


def test_the_whole_drain_fits_the_grace_period_with_room() -> None:
    """Kubernetes SIGKILLs a pod `terminationGracePeriodSeconds` after SIGTERM. The server's
    and the carrier's whole shutdown (AP4K_SHUTDOWN_SECONDS, kept as tests/server/test_faults.py
    and tests/carrier show) ends 10 s before; within it, the in-flight deliveries' drain
    (AP4K_DRAIN_SECONDS) leaves 10 s for what follows it, more than either needs (a server
    keeps 8 s of a 35 s budget for outcomes, open requests and the database; a carrier 4 s
    for its last acks), so the drain is not cut short either."""
    for deployment in (build_server_deployment(spec(), CONFIG),
                       build_carrier_deployment(spec(), CONFIG, 1)):
        env = {e["name"]: e.get("value") for e in container(deployment)["env"]}
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        shutdown, drain = float(env["AP4K_SHUTDOWN_SECONDS"]), float(env["AP4K_DRAIN_SECONDS"])
        assert shutdown + 10 <= grace
        assert drain + 10 <= shutdown


def test_scrape_annotations_and_pull_secrets_follow_the_operator_settings() -> None:
    config = OperatorConfig(image="x.test/ap4k:1", scrape_annotations=False,
                            image_pull_secrets=("regcred", "mirror"))
    for deployment in (build_server_deployment(spec(), config),
                       build_carrier_deployment(spec(), config, 0)):
        template = deployment["spec"]["template"]
        assert "annotations" not in template["metadata"]
        assert template["spec"]["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]


def test_queue_settings_are_snake_case() -> None:
    s = spec(queues=[
        {"name": "emails", "maxAttempts": 5, "minBackoffSeconds": 1, "maxBackoffSeconds": 60,
         "rateLimitPerSecond": 2.5, "maxConcurrency": 4, "paused": False,
         "baseUrl": "https://mail.internal/", "allowedTargets": ["https://mail.internal/"]},
        {"name": "bare"},
    ])
    assert build_queue_settings(s) == {
        "emails": {"max_attempts": 5, "min_backoff_seconds": 1, "max_backoff_seconds": 60,
                   "rate_limit_per_second": 2.5, "max_concurrency": 4, "paused": False,
                   "base_url": "https://mail.internal/",
                   "allowed_targets": ["https://mail.internal/"]},
        "bare": {},
    }


def test_children_are_owned_by_the_asyncqueue() -> None:
    children = desired_children(spec(), OWNER, CONFIG, carrier_replicas=2)
    assert [(c["kind"], c["metadata"]["name"]) for c in children] == [
        ("Deployment", "orders-server"), ("Service", "orders"), ("Deployment", "orders-carrier"),
    ]
    for child in children:
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": "ap4k.dev/v1alpha1", "kind": "AsyncQueue",
                       "name": "orders", "uid": "u-1", "controller": True,
                       "blockOwnerDeletion": True}
        assert child["metadata"]["namespace"] == "shop"
        assert child["metadata"]["labels"]["team"] == "payments"  # the owner's labels
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "ap4k-operator"


@pytest.mark.parametrize("raw", [
    {},
    {"server": {"resources": {"requests": {"cpu": "250m", "memory": "128Mi"}}},
     "carriers": {"resources": {"limits": {"cpu": 1}}}, "imagePullPolicy": "Never"},
])
def test_children_are_valid_kubernetes_objects(raw: dict[str, Any]) -> None:
    config = OperatorConfig(image="x.test/ap4k:1", image_pull_secrets=("regcred",))
    for child in desired_children(spec(**raw), OWNER, config, carrier_replicas=3):
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)


def test_builders_are_pure() -> None:
    s = spec(queues=[{"name": "a", "maxAttempts": 2}])
    assert build_server_deployment(s, CONFIG) == build_server_deployment(s, CONFIG)
    assert desired_children(s, OWNER, CONFIG, 1) == desired_children(s, OWNER, CONFIG, 1)


def test_object_settings_are_json_objects_that_match_the_servers_view() -> None:
    s = spec(queues=[{"name": "hooks", "circuitBreaker": {"openSeconds": 5},
                      "flowLimits": {"maxConcurrency": 2}}])
    desired = build_queue_settings(s)["hooks"]
    # Every field (the server's defaults filled in), as the PUT body and the server's view.
    assert desired == {
        "circuit_breaker": {"failure_ratio": 0.5, "min_attempts": 10, "window_seconds": 60.0,
                            "open_seconds": 5.0},
        "flow_limits": {"rate_limit_per_second": None, "max_concurrency": 2},
    }
    shown = {"max_attempts": 25, "circuit_breaker": {"failure_ratio": 0.5, "min_attempts": 10,
                                                     "window_seconds": 60, "open_seconds": 5},
             "flow_limits": {"rate_limit_per_second": None, "max_concurrency": 2}}
    assert settings_match(shown, desired)
    assert not settings_match({**shown, "circuit_breaker": None}, desired)
    changed = {**shown, "flow_limits": {"rate_limit_per_second": None, "max_concurrency": 3}}
    assert not settings_match(changed, desired)
