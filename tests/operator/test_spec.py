"""Parsing the AsyncQueue spec: the CRD's defaults, and what the schema cannot guarantee."""

from __future__ import annotations

from typing import Any

import pytest

from ap4k.operator.spec import (
    AsyncQueueSpec,
    CarrierSpec,
    DatabaseSpec,
    MetricSpec,
    PrometheusMetric,
    ServerSpec,
    SpecError,
    parse_spec,
)


def parse(name: str = "orders", **raw: Any) -> AsyncQueueSpec:
    return parse_spec(name, "shop", {"database": {"secretName": "db"}, **raw})


def test_defaults() -> None:
    assert parse() == AsyncQueueSpec(
        name="orders", namespace="shop", database=DatabaseSpec("db", "url"),
        image=None, image_pull_policy="IfNotPresent", server=ServerSpec(replicas=2, dispatchers=10),
        carriers=CarrierSpec(min_replicas=0, max_replicas=10, concurrency=10,
                             target_delay_seconds=2.0, initial_rate_per_carrier=None,
                             initial_startup_seconds=10.0,
                             scale_down_stabilization_seconds=300, poll_interval_seconds=15,
                             metric=MetricSpec("Server")),
        queues=(),
    )


def test_prometheus_metric() -> None:
    carriers = parse(carriers={"metric": {"type": "Prometheus", "prometheus": {
        "serverAddress": "http://prometheus.monitoring.svc:9090/", "query": "sum(up)",
    }}}).carriers
    assert carriers.metric == MetricSpec(
        "Prometheus", PrometheusMetric("http://prometheus.monitoring.svc:9090", "sum(up)")
    )


@pytest.mark.parametrize(("name", "raw", "field"), [
    ("orders", {"database": None}, "spec.database"),
    ("orders", {"database": {"key": "url"}}, "spec.database.secretName"),
    ("orders", {"carriers": {"minReplicas": 4, "maxReplicas": 3}}, "spec.carriers.maxReplicas"),
    ("orders", {"carriers": {"maxReplicas": 0}}, "spec.carriers.maxReplicas"),
    ("orders", {"carriers": {"targetDelaySeconds": 0}}, "spec.carriers.targetDelaySeconds"),
    ("orders", {"carriers": {"initialRatePerCarrier": "fast"}},
     "spec.carriers.initialRatePerCarrier"),
    ("orders", {"carriers": {"initialStartupSeconds": True}},
     "spec.carriers.initialStartupSeconds"),
    ("orders", {"carriers": {"pollIntervalSeconds": True}}, "spec.carriers.pollIntervalSeconds"),
    ("orders", {"server": {"replicas": "2"}}, "spec.server.replicas"),
    ("orders", {"server": {"dispatchers": -1}}, "spec.server.dispatchers"),
    ("orders", {"imagePullPolicy": "Sometimes"}, "spec.imagePullPolicy"),
    ("orders", {"carriers": {"metric": {"type": "Prometheus"}}},
     "spec.carriers.metric.prometheus"),
    ("orders", {"carriers": {"metric": {"type": "Server", "prometheus": {
        "serverAddress": "http://p:9090", "query": "up"}}}}, "spec.carriers.metric.prometheus"),
    ("orders", {"carriers": {"metric": {"type": "Prometheus", "prometheus": {
        "serverAddress": "prometheus:9090", "query": "up"}}}},
     "spec.carriers.metric.prometheus.serverAddress"),
    ("orders", {"carriers": {"metric": {"type": "Datadog"}}}, "spec.carriers.metric.type"),
    ("orders", {"queues": [{"name": "a"}, {"name": "a"}]}, "spec.queues[1].name"),
    ("orders", {"queues": [{"name": "a", "maxAttemps": 3}]}, "spec.queues[0].maxAttemps"),
    ("orders", {"queues": [{"name": "a", "minBackoffSeconds": 9, "maxBackoffSeconds": 1}]},
     "spec.queues[0].minBackoffSeconds"),
    ("orders", {"queues": [{"name": "a", "rateLimitPerSecond": 0}]},
     "spec.queues[0].rateLimitPerSecond"),
    ("orders", {"queues": [{"name": "a", "allowedTargets": ["mail.internal"]}]},
     "spec.queues[0].allowedTargets"),
    ("orders", {"queues": [{"name": "a", "paused": "yes"}]}, "spec.queues[0].paused"),
    ("orders", {"queues": [{"name": "no spaces"}]}, "spec.queues[0].name"),
    ("Orders", {}, "metadata.name"),
    ("o" * 64, {}, "metadata.name"),
])
def test_invalid_specs_name_the_field(name: str, raw: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(name, "shop", {"database": {"secretName": "db"}, **raw})
    assert caught.value.field == field
    assert str(caught.value).startswith(field)
