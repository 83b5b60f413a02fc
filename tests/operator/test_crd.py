"""The AsyncQueue CRD (charts/ap4k/files/crds/): valid, complete, and in step with the parser."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from ap4k.operator.spec import parse_spec

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
            "targetBacklogPerReplica": 200, "scaleDownStabilizationSeconds": 120,
            "pollIntervalSeconds": 10,
            "metric": {"type": "Prometheus", "prometheus": {
                "serverAddress": "http://prometheus.monitoring.svc:9090",
                "query": 'sum(ap4k_queue_depth{queue="emails",state=~"available|running"})',
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


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: absent fields with a default get it."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def test_crd_defaults_agree_with_the_parser(crd_schema: dict[str, Any]) -> None:
    minimal = {"database": {"secretName": "db"}, "queues": [{"name": "q"}]}
    defaulted = apply_defaults(crd_schema["properties"]["spec"], copy.deepcopy(minimal))
    # Every default the parser applies is one the API server applies too, and the same.
    assert set(defaulted) >= {"imagePullPolicy", "server", "carriers"}
    assert set(defaulted["carriers"]) >= {
        "minReplicas", "maxReplicas", "concurrency", "targetBacklogPerReplica",
        "scaleDownStabilizationSeconds", "pollIntervalSeconds", "metric",
    }
    assert set(defaulted["server"]) >= {"replicas", "dispatchers"}
    assert defaulted["database"]["key"] == "url"
    assert parse_spec("o", "ns", minimal) == parse_spec("o", "ns", defaulted)


def validator(schema: dict[str, Any]) -> jsonschema.Draft4Validator:
    # OpenAPI v3.0 schemas are close to JSON Schema draft 4 (boolean exclusiveMinimum);
    # the x-kubernetes-* extensions are ignored here and checked with CEL below.
    return jsonschema.Draft4Validator(schema)


def test_a_full_example_is_valid_and_parses(crd_schema: dict[str, Any]) -> None:
    validator(crd_schema).validate(FULL)
    parsed = parse_spec("orders", "shop", FULL["spec"])
    assert parsed.carriers.metric.type == "Prometheus"
    assert parsed.queues[0].settings["rate_limit_per_second"] == 50


@pytest.mark.parametrize(("path", "value"), [
    (("spec", "imagePullPolicy"), "Sometimes"),
    (("spec", "server", "replicas"), 0),
    (("spec", "carriers", "targetBacklogPerReplica"), 0),
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
    with pytest.raises(jsonschema.ValidationError):
        validator(crd_schema).validate(body)


# --- CEL (x-kubernetes-validations), evaluated with cel-python ------------------------------


def rules(schema: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    found = [(path, r["rule"]) for r in schema.get("x-kubernetes-validations", [])]
    for key, sub in schema.get("properties", {}).items():
        found += rules(sub, (*path, key))
    if "items" in schema:
        found += rules(schema["items"], (*path, "[]"))
    return found


def as_cel_values(schema: dict[str, Any], value: Any) -> Any:
    """JSON numbers of `type: number` fields are doubles in Kubernetes' CEL."""
    if schema.get("type") == "number" and isinstance(value, int):
        return float(value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return {k: as_cel_values(props.get(k, {}), v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_cel_values(schema.get("items", {}), v) for v in value]
    return value


def violations(schema: dict[str, Any], body: dict[str, Any]) -> list[str]:
    celpy = pytest.importorskip("celpy")
    env = celpy.Environment()
    failed = []
    for path, rule in rules(schema):
        program = env.program(env.compile(rule))
        targets = [(schema, body)]
        for key in path:
            step = []
            for sub_schema, value in targets:
                if key == "[]":
                    step += [(sub_schema["items"], item) for item in value]
                elif key in value:
                    step.append((sub_schema["properties"][key], value[key]))
            targets = step
        for sub_schema, value in targets:
            activation = {"self": celpy.json_to_cel(as_cel_values(sub_schema, value))}
            if not program.evaluate(activation):
                failed.append(rule)
    return failed


def test_cel_rules_accept_the_full_example(crd_schema: dict[str, Any]) -> None:
    assert len(rules(crd_schema)) == 4
    assert violations(crd_schema, FULL) == []


@pytest.mark.parametrize(("change", "rule_part"), [
    ({"metadata": {"name": "Orders"}}, "metadata.name"),
    ({"metadata": {"name": "x" * 64}}, "metadata.name"),
    ({"spec": {"carriers": {"minReplicas": 5, "maxReplicas": 4}}}, "maxReplicas >="),
    ({"spec": {"carriers": {"metric": {"type": "Server", "prometheus": {
        "serverAddress": "http://prometheus:9090", "query": "up"}}}}}, "Prometheus"),
    ({"spec": {"queues": [{"name": "q", "minBackoffSeconds": 5, "maxBackoffSeconds": 2.5}]}},
     "minBackoffSeconds <="),
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
    failed = violations(crd_schema, body)
    assert len(failed) == 1 and rule_part in failed[0]
