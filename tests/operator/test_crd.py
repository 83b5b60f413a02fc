"""The AsyncQueue CRD (charts/ap4k/files/crds/): valid, complete, and in step with the parser."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest

from ap4k.operator import constants
from ap4k.operator.spec import parse_spec
from tests.operator import apiserver

FULL = {
    "apiVersion": "ap4k.dev/v1alpha1",
    "kind": "AsyncQueue",
    "metadata": {"name": "orders", "namespace": "shop"},
    "spec": {
        "image": "ghcr.io/ap4k/ap4k:0.1.0",
        "imagePullPolicy": "IfNotPresent",
        "database": {"secretName": "orders-db", "key": "url"},
        "server": {"replicas": 2, "dispatchers": 8,
                   "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                                 "limits": {"memory": 268435456}}},
        "carriers": {
            "minReplicas": 0, "maxReplicas": 20, "concurrency": 16,
            "targetDelaySeconds": 5, "initialRatePerCarrier": 150, "initialStartupSeconds": 20,
            "scaleDownStabilizationSeconds": 120,
            "pollIntervalSeconds": 10,
            "metric": {"type": "Prometheus", "prometheus": {
                "serverAddress": "http://prometheus.monitoring.svc:9090",
                "query": 'sum(max by (queue) (ap4k_queue_depth{queue="emails",state="available"}))',
                "arrivalRateQuery": 'sum(rate(ap4k_messages_enqueued_total{queue="emails"}[1m]))',
                "completionRateQuery":
                    'sum(rate(ap4k_deliveries_total{queue="emails",outcome="delivered"}[1m]))',
            }},
        },
        "queues": [
            {"name": "emails", "maxAttempts": 10, "minBackoffSeconds": 1,
             "maxBackoffSeconds": 300, "rateLimitPerSecond": 50, "maxConcurrency": 20,
             "paused": False, "baseUrl": "http://mailer.shop.svc/",
             "allowedTargets": ["http://mailer.shop.svc/"]},
        ],
    },
}


def test_the_crd_is_a_valid_kubernetes_object(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, "1.30.0", strict=True)


def test_the_operator_spells_the_crds_names(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert (spec["group"], spec["versions"][0]["name"]) == (constants.GROUP, constants.VERSION)
    assert (spec["names"]["kind"], spec["names"]["plural"]) == (constants.KIND, constants.PLURAL)
    assert crd["metadata"]["name"] == f"{constants.PLURAL}.{constants.GROUP}"


def test_names_versions_and_subresources(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "asyncqueues.ap4k.dev"
    assert (spec["group"], spec["scope"]) == ("ap4k.dev", "Namespaced")
    assert spec["names"]["kind"] == "AsyncQueue"
    assert spec["names"]["plural"] == "asyncqueues"
    assert spec["names"]["shortNames"] == ["aq"]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}  # no scale: the operator owns replicas
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Backlog"] == ".status.backlog"
    assert columns["Carriers"] == ".status.carriers.replicas"
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Age"] == ".metadata.creationTimestamp"


def test_crd_defaults_agree_with_the_parser(crd_schema: dict[str, Any]) -> None:
    minimal = {"database": {"secretName": "db"}, "queues": [{"name": "q"}]}
    defaulted = apiserver.apply_defaults(crd_schema["properties"]["spec"], copy.deepcopy(minimal))
    # Every default the parser applies is one the API server applies too, and the same.
    assert set(defaulted) >= {"imagePullPolicy", "server", "carriers"}
    assert set(defaulted["carriers"]) >= {
        "minReplicas", "maxReplicas", "concurrency", "targetDelaySeconds", "initialStartupSeconds",
        "scaleDownStabilizationSeconds", "pollIntervalSeconds", "metric",
    }
    assert set(defaulted["server"]) >= {"replicas", "dispatchers"}
    assert defaulted["database"]["key"] == "url"
    assert parse_spec("o", "ns", minimal) == parse_spec("o", "ns", defaulted)


def test_a_full_example_is_valid_and_parses(crd_schema: dict[str, Any]) -> None:
    assert apiserver.admit(crd_schema, FULL)[1] == []
    parsed = parse_spec("orders", "shop", FULL["spec"])
    assert parsed.carriers.metric.type == "Prometheus"
    assert parsed.queues[0].settings["rate_limit_per_second"] == 50


@pytest.mark.parametrize(("path", "value"), [
    (("spec", "imagePullPolicy"), "Sometimes"),
    (("spec", "server", "replicas"), 0),
    (("spec", "carriers", "targetDelaySeconds"), 0),
    (("spec", "carriers", "initialRatePerCarrier"), 0),
    (("spec", "carriers", "initialStartupSeconds"), -1),
    (("spec", "carriers", "metric", "prometheus", "arrivalRateQuery"), ""),
    (("spec", "carriers", "pollIntervalSeconds"), 0),
    (("spec", "carriers", "metric", "type"), "Datadog"),
    (("spec", "carriers", "metric", "prometheus", "serverAddress"), "prometheus:9090"),
    (("spec", "queues", 0, "name"), "has space"),
    (("spec", "queues", 0, "rateLimitPerSecond"), 0),
    (("spec", "queues", 0, "allowedTargets"), ["mailer.shop.svc"]),
    (("spec", "server", "resources", "requests", "cpu"), "lots"),
    (("spec", "database"), None),
])
def test_the_schema_refuses_bad_values(
    crd_schema: dict[str, Any], path: tuple[Any, ...], value: Any
) -> None:
    body = copy.deepcopy(FULL)
    target: Any = body
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    assert apiserver.schema_problems(crd_schema, body)


# --- CEL (x-kubernetes-validations), evaluated with cel-python ------------------------------


def test_cel_rules_accept_the_full_example(crd_schema: dict[str, Any]) -> None:
    assert len(apiserver.rules(crd_schema)) == 4
    assert apiserver.cel_problems(crd_schema, FULL) == []


@pytest.mark.parametrize(("change", "rule_part"), [
    ({"metadata": {"name": "Orders"}}, "metadata.name must be"),
    ({"metadata": {"name": "x" * 64}}, "metadata.name must be"),
    ({"spec": {"carriers": {"minReplicas": 5, "maxReplicas": 4}}}, "maxReplicas must be >="),
    ({"spec": {"carriers": {"metric": {"type": "Server", "prometheus": {
        "serverAddress": "http://prometheus:9090", "query": "up"}}}}}, "metric.prometheus is"),
    ({"spec": {"queues": [{"name": "q", "minBackoffSeconds": 5, "maxBackoffSeconds": 2.5}]}},
     "minBackoffSeconds must be <="),
])
def test_cel_rules_refuse_cross_field_mistakes(
    crd_schema: dict[str, Any], change: dict[str, Any], rule_part: str
) -> None:
    body = copy.deepcopy(FULL)
    for section, values in change.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(body[section].get(key), dict):
                body[section][key] = {**body[section][key], **value}
            else:
                body[section][key] = value
    failed = apiserver.cel_problems(crd_schema, body)
    assert len(failed) == 1 and rule_part in failed[0]
