"""The AsyncQueue CRD against what a real kube-apiserver checks (tests/operator/apiserver.py).

kmock serves any CRD; a real API server refused the first one (`helm install` failed): its
`carriers` rule read `self.maxReplicas` from `default: {}`. These tests run the API server's
checks, at CRD creation and on every object, so that class of defect fails here first.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from ap4k.core import names
from ap4k.operator.spec import SpecError, parse_spec
from ap4k.server import validation
from tests.operator import apiserver

MINIMAL = {
    "apiVersion": "ap4k.dev/v1alpha1",
    "kind": "AsyncQueue",
    "metadata": {"name": "orders", "namespace": "shop"},
    "spec": {"database": {"secretName": "orders-db"}},
}


def test_the_api_server_accepts_the_crd(crd: dict[str, Any]) -> None:
    assert apiserver.crd_problems(crd) == []


def _carriers(crd: dict[str, Any]) -> dict[str, Any]:
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    carriers: dict[str, Any] = spec["properties"]["carriers"]
    return carriers


def test_a_rule_reading_a_key_its_default_lacks_is_refused(crd: dict[str, Any]) -> None:
    # The defect a real API server found: the rule as it was, against `default: {}`.
    broken = copy.deepcopy(crd)
    rule = _carriers(broken)["x-kubernetes-validations"][0]
    rule["rule"] = "self.maxReplicas >= self.minReplicas"
    (problem,) = apiserver.crd_problems(broken)
    assert "properties[carriers].default" in problem
    assert "maxReplicas" in problem and "evaluating rule" in problem


def _schema_of(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


# Each mutation is one the API server refuses at CRD creation; the checker must see it too.
BROKEN_CRDS: list[tuple[str, Any, str]] = [
    # structural: metadata at the root may restrict name and generateName only
    ("metadata description", lambda s: s["properties"]["metadata"].update(description="x"),
     "must not specify anything other than name and generateName"),
    # structural: every field has a type
    ("untyped field", lambda s: s["properties"]["spec"]["properties"]["server"]["properties"]
     ["replicas"].pop("type"), "must not be empty for specified object fields"),
    # structural: value validations only under anyOf
    ("description under anyOf", lambda s: s["properties"]["spec"]["properties"]["server"]
     ["properties"]["resources"]["properties"]["requests"]["additionalProperties"]["anyOf"][0]
     .update(description="x"), "must be empty to be structural"),
    # defaults must be pruned
    ("unknown field in a default", lambda s: s["properties"]["spec"]["properties"]["carriers"]
     ["properties"]["metric"].update(default={"type": "Server", "extra": 1}),
     "must not have unknown fields"),
    # defaults must validate against their schema
    ("default below minimum", lambda s: s["properties"]["spec"]["properties"]["server"]
     ["properties"]["replicas"].update(default=0), "less than the minimum"),
    # list-type map keys are required or defaulted
    ("map key not required", lambda s: s["properties"]["spec"]["properties"]["queues"]["items"]
     .update(required=[]), "all map keys must be required or have a default"),
    # rules compile against the declared type
    ("rule naming an undeclared field", lambda s: s["properties"]["spec"]["properties"]
     ["carriers"]["x-kubernetes-validations"].append({"rule": "self.maxReplica > 0"}),
     "undefined field 'maxReplica'"),
    # estimated cost: a string rule inside a list without bounds
    ("unbounded rule cost", lambda s: (
        s["properties"]["spec"]["properties"]["queues"].pop("maxItems"),
        s["properties"]["spec"]["properties"]["queues"]["items"]["x-kubernetes-validations"]
        .append({"rule": "self.name.matches('^a')"}),
        s["properties"]["spec"]["properties"]["queues"]["items"]["properties"]["name"]
        .pop("maxLength"),
    ), "exceeds budget"),
    # uniqueItems is refused outright
    ("uniqueItems", lambda s: s["properties"]["spec"]["properties"]["queues"]["items"]
     ["properties"]["allowedTargets"].update(uniqueItems=True), "uniqueItems"),
]


@pytest.mark.parametrize(
    ("what", "mutate", "expected"), BROKEN_CRDS, ids=[b[0] for b in BROKEN_CRDS]
)
def test_the_checks_refuse_what_the_api_server_refuses(
    crd: dict[str, Any], what: str, mutate: Any, expected: str
) -> None:
    broken = copy.deepcopy(crd)
    mutate(_schema_of(broken))
    problems = apiserver.crd_problems(broken)
    assert any(expected in p for p in problems), (what, problems)


# --- Objects, as a create request meets them: defaulted, pruned, validated ---------------------


def test_a_minimal_asyncqueue_is_admitted_with_every_default(crd_schema: dict[str, Any]) -> None:
    stored, problems = apiserver.admit(crd_schema, MINIMAL)
    assert problems == []
    carriers = stored["spec"]["carriers"]
    # Nested defaults apply to what defaulting inserts: `carriers: {}` becomes a full object.
    assert carriers["minReplicas"] == 0 and carriers["maxReplicas"] >= 1
    assert carriers["metric"] == {"type": "Server"}
    assert stored["spec"]["database"]["key"] == "url"
    # The operator reads the stored object the same as the minimal one.
    assert parse_spec("orders", "shop", stored["spec"]) == parse_spec(
        "orders", "shop", MINIMAL["spec"]
    )


def _with_spec(**spec: Any) -> dict[str, Any]:
    body = copy.deepcopy(MINIMAL)
    body["spec"].update(spec)
    return body


@pytest.mark.parametrize(("body", "expected"), [
    # the meaning the fix keeps: min above the default max is still refused
    (_with_spec(carriers={"minReplicas": 15}), "maxReplicas must be >= carriers.minReplicas"),
    (_with_spec(carriers={"minReplicas": 5, "maxReplicas": 4}), "maxReplicas must be >="),
    (_with_spec(carriers={"metric": {"type": "Prometheus"}}), "metric.prometheus is required"),
    (_with_spec(queues=[{"name": "orders:eu"}]), "does not match"),
    (_with_spec(queues=[{"name": "q" * 129}]), "is too long"),
    (_with_spec(server={"replicas": 0}), "less than the minimum"),
])
def test_bad_asyncqueues_are_refused(
    crd_schema: dict[str, Any], body: dict[str, Any], expected: str
) -> None:
    _, problems = apiserver.admit(crd_schema, body)
    assert any(expected in p for p in problems), problems


def test_unknown_fields_are_pruned_not_refused(crd_schema: dict[str, Any]) -> None:
    stored, problems = apiserver.admit(
        crd_schema, _with_spec(carriers={"maxReplicas": 3, "speed": "fast"}, extra=True)
    )
    assert problems == []
    assert "extra" not in stored["spec"] and "speed" not in stored["spec"]["carriers"]


# --- One queue-name rule: the server's -----------------------------------------------------


def test_the_crd_queue_name_is_the_servers_rule(crd_schema: dict[str, Any]) -> None:
    name = crd_schema["properties"]["spec"]["properties"]["queues"]["items"]["properties"]["name"]
    assert name["pattern"] == names.QUEUE_NAME_PATTERN == validation.QUEUE_NAME.pattern
    assert name["maxLength"] == names.QUEUE_NAME_MAX_LENGTH


@pytest.mark.parametrize("queue", [
    "orders", "Orders.v2_eu-1", "q" * 128, "q" * 129, "orders:eu", "-orders", ".x", "a b",
    "orders\n", "",
])
def test_server_operator_and_crd_agree_on_queue_names(
    crd_schema: dict[str, Any], queue: str
) -> None:
    server_accepts = validation.QUEUE_NAME.fullmatch(queue) is not None
    _, problems = apiserver.admit(crd_schema, _with_spec(queues=[{"name": queue}]))
    try:
        parse_spec("o", "shop", {"database": {"secretName": "db"}, "queues": [{"name": queue}]})
        operator_accepts = True
    except SpecError:
        operator_accepts = False
    assert server_accepts == operator_accepts == (problems == []), problems


# --- kubectl explain: every field says what it is --------------------------------------------


def test_every_field_has_a_description(crd_schema: dict[str, Any]) -> None:
    missing = [
        path for path, node in apiserver.nodes(crd_schema)
        if re.search(r"properties\[[^\]]+\]$", path) and not node.get("description")
        # metadata at the root may carry nothing but its type (a structural-schema rule)
        and path != "openAPIV3Schema.properties[metadata]"
    ]
    assert missing == []
