"""Opt-in monitoring: Prometheus Operator objects only where their API exists, monitors that
select what the operator really creates, scrape settings handed to the operator, dashboards
as ConfigMaps for Grafana's sidecar."""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python
import pytest

from ap4k.operator.builders import desired_children
from ap4k.operator.config import OperatorConfig
from ap4k.operator.spec import parse_spec
from tests.chart.conftest import (
    DASHBOARDS,
    MONITORING_APIS,
    NAMESPACE,
    REPO,
    Manifest,
    Renderer,
    render_chart,
)

MONITORS_ON = {
    "metrics": {
        "serviceMonitor": {"enabled": True},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
    }
}


@pytest.mark.parametrize(
    ("flag", "kind"),
    [
        ("serviceMonitor", "ServiceMonitor"),
        ("podMonitor", "PodMonitor"),
        ("prometheusRule", "PrometheusRule"),
    ],
)
def test_monitoring_objects_fail_clearly_without_their_api(flag: str, kind: str) -> None:
    with pytest.raises(helm_python.HelmRenderError) as failure:
        render_chart({"metrics": {flag: {"enabled": True}}})
    message = str(failure.value)
    assert f"metrics.{flag}.enabled=true" in message
    assert f"no monitoring.coreos.com/v1 {kind} API" in message
    assert f"--api-versions monitoring.coreos.com/v1/{kind}" in message


def test_monitoring_is_off_by_default(render: Renderer) -> None:
    rendered = render(api_versions=MONITORING_APIS)
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"):
        assert not rendered.find(kind)


def _example_children(**config: Any) -> list[Manifest]:
    """What the operator itself creates for an AsyncQueue (its own builders)."""
    spec = parse_spec("orders", "team-a", {"database": {"secretName": "db"}})
    owner = {
        "apiVersion": "ap4k.dev/v1alpha1",
        "kind": "AsyncQueue",
        "metadata": {"name": "orders", "namespace": "team-a", "uid": "1"},
    }
    return desired_children(spec, owner, OperatorConfig(image="img", **config), 1)


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def _namespace_selected(selector: dict[str, Any], namespace: str) -> bool:
    return bool(selector.get("any")) or namespace in selector.get("matchNames", [])


@pytest.mark.parametrize("watch", [[], ["team-a", "team-b"]])
def test_pod_monitor_scrapes_every_server_and_carrier_the_operator_creates(
    render: Renderer, watch: list[str]
) -> None:
    values = {**MONITORS_ON, "operator": {"watchNamespaces": watch}}
    rendered = render(values, api_versions=MONITORING_APIS)
    monitor = next(m for m in rendered.find("PodMonitor") if "asyncqueues" in m["metadata"]["name"])
    assert _namespace_selected(monitor["spec"]["namespaceSelector"], "team-a")
    assert not watch or not _namespace_selected(monitor["spec"]["namespaceSelector"], "elsewhere")
    ports = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    scraped = set()
    for child in _example_children():
        if child["kind"] != "Deployment":
            continue
        template = child["spec"]["template"]
        assert _matches(monitor["spec"]["selector"], template["metadata"]["labels"])
        container_ports = {p["name"] for p in template["spec"]["containers"][0]["ports"]}
        assert container_ports & ports, f"{child['metadata']['name']} exposes no scraped port"
        scraped.add(child["metadata"]["name"])
    assert scraped == {"orders-server", "orders-carrier"}


def test_service_monitor_scrapes_the_server_service_and_the_operator(render: Renderer) -> None:
    rendered = render(MONITORS_ON, api_versions=MONITORING_APIS)
    monitors = {m["metadata"]["name"]: m for m in rendered.find("ServiceMonitor")}
    servers = next(m for name, m in monitors.items() if name.endswith("-servers"))
    service = next(c for c in _example_children() if c["kind"] == "Service")
    assert _matches(servers["spec"]["selector"], service["metadata"]["labels"])
    assert servers["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert servers["spec"]["endpoints"][0]["path"] == "/metrics"
    # The operator's own metrics Service.
    operator = next(m for name, m in monitors.items() if name.endswith("-operator"))
    metrics_service = rendered.one("Service")
    assert _matches(operator["spec"]["selector"], metrics_service["metadata"]["labels"])
    assert operator["spec"]["endpoints"][0]["port"] == metrics_service["spec"]["ports"][0]["name"]
    assert operator["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_monitor_labels_and_intervals_come_from_values(render: Renderer) -> None:
    values = {
        "metrics": {
            "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "kps"}},
            "podMonitor": {"enabled": True, "interval": "20s", "scrapeTimeout": "5s"},
        }
    }
    rendered = render(values, api_versions=MONITORING_APIS)
    for monitor in rendered.find("ServiceMonitor"):
        assert monitor["metadata"]["labels"]["release"] == "kps"
        assert all(e["interval"] == "15s" for e in monitor["spec"]["endpoints"])
    for monitor in rendered.find("PodMonitor"):
        endpoints = monitor["spec"]["podMetricsEndpoints"]
        assert all(e["interval"] == "20s" and e["scrapeTimeout"] == "5s" for e in endpoints)


@pytest.mark.parametrize("annotate", [True, False])
def test_scrape_annotations_are_propagated_through_the_operator_env(
    render: Renderer, annotate: bool
) -> None:
    deployment = render({"metrics": {"scrapeAnnotations": annotate}}).one("Deployment")
    pod = deployment["spec"]["template"]
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env["AP4K_OPERATOR_SCRAPE_ANNOTATIONS"] == str(annotate).lower()
    assert ("prometheus.io/scrape" in pod["metadata"].get("annotations", {})) is annotate
    # The operator reads that variable, and then annotates the pods it creates.
    children = _example_children(scrape_annotations=annotate)
    for child in children:
        if child["kind"] == "Deployment":
            annotations = child["spec"]["template"]["metadata"].get("annotations", {})
            assert (annotations.get("prometheus.io/scrape") == "true") is annotate


def test_every_env_variable_given_to_the_operator_is_one_it_reads(render: Renderer) -> None:
    deployment = render({"imagePullSecrets": [{"name": "x"}]}).one("Deployment")
    names = {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    source = "\n".join(
        path.read_text() for path in (REPO / "operator" / "ap4k" / "operator").glob("*.py")
    )
    # `env("NAME", …)` in the settings, `add_flag(…, env_name="NAME", …)` on the command line.
    read = {f"AP4K_{name}" for name in re.findall(r'(?:env\(\s*|env_name=)"([A-Z0-9_]+)"', source)}
    assert names, "the operator gets no environment"
    assert names <= read, f"set but never read by the operator: {names - read}"


def test_dashboards_ship_as_labelled_config_maps(render: Renderer) -> None:
    values = {
        "grafana": {
            "dashboards": {"enabled": True, "namespace": "grafana", "annotations": {"f": "ap4k"}}
        }
    }
    config_maps = render(values).find("ConfigMap")
    files = {path.name: json.loads(path.read_text()) for path in DASHBOARDS.glob("*.json")}
    assert len(files) >= 2 and len(config_maps) == len(files)
    shipped = {}
    for config_map in config_maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["namespace"] == "grafana"
        assert config_map["metadata"]["annotations"] == {"f": "ap4k"}
        for name, text in config_map["data"].items():
            shipped[name] = json.loads(text)
    assert shipped == files
    # Dashboard uids are unique, so both can live in one Grafana.
    assert len({d["uid"] for d in files.values()}) == len(files)


def test_prometheus_rule_carries_the_four_alerts(render: Renderer) -> None:
    values = {
        "metrics": {
            "prometheusRule": {
                "enabled": True,
                "backlogAgeSeconds": 120,
                "alertLabels": {"team": "payments"},
                "labels": {"release": "kps"},
            }
        }
    }
    rule = render(values, api_versions=MONITORING_APIS).one("PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == {
        "Ap4kBacklogTooOld",
        "Ap4kDeadLettersGrowing",
        "Ap4kCarriersPinnedAtMax",
        "Ap4kNoDeliveriesWhileBacklogGrows",
    }
    assert "> 120" in alerts["Ap4kBacklogTooOld"]["expr"]
    for alert in alerts.values():
        assert alert["labels"] == {"severity": "warning", "team": "payments"}
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
        # Prometheus' own templating survived Helm's.
        assert "{{ $labels." in alert["annotations"]["summary"]
