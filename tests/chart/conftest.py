"""Shared helpers for the chart, image and dashboard tests.

The chart is rendered by Helm's own engine (the `helm-python-sdk` wheel binds Helm's Go SDK
through ctypes): no helm binary, no cluster. Rendering is offline, like `helm template`, with a
chosen Kubernetes version and set of available APIs (`--kube-version`, `--api-versions`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml
from helm_python import _native

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "ap4k"
DASHBOARDS = CHART / "dashboards"
OPERATOR_CRD = CHART / "files" / "crds" / "asyncqueues.ap4k.dev.yaml"
OPERATOR_RBAC = CHART / "files" / "operator-rbac-rules.yaml"

# The oldest Kubernetes the objects are validated against (kubernetes-validate's schemas).
KUBE_VERSION = "1.30.0"
RELEASE = "ap4k"
NAMESPACE = "ap4k-system"
MONITORING_APIS = (
    "monitoring.coreos.com/v1",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PodMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
)

# Metric names the brief documents for the components whose /metrics the Prometheus test does
# not scrape (carriers and the operator run inside Kubernetes). Server names are checked
# against a live server's /metrics instead.
DOCUMENTED_SERVER_METRICS = frozenset(
    {
        "ap4k_messages_enqueued_total",
        "ap4k_deliveries_total",
        "ap4k_queue_depth",
        "ap4k_queue_oldest_available_age_seconds",
        "ap4k_delivery_duration_seconds",
        "ap4k_end_to_end_latency_seconds",
        "ap4k_leases_expired_total",
        "ap4k_dispatchers_in_flight",
    }
)
DOCUMENTED_CARRIER_METRICS = frozenset(
    {
        "ap4k_carrier_leases_in_flight",
        "ap4k_carrier_leased_total",
        "ap4k_carrier_deliveries_total",
        "ap4k_carrier_delivery_duration_seconds",
    }
)
DOCUMENTED_OPERATOR_METRICS = frozenset(
    {
        "ap4k_operator_desired_carriers",
        "ap4k_operator_carriers",
        "ap4k_operator_backlog",
        "ap4k_operator_metric_errors_total",
        "ap4k_operator_reconciliations_total",
    }
)

Manifest = dict[str, Any]


def render_chart(
    values: dict[str, Any] | None = None,
    *,
    api_versions: tuple[str, ...] = (),
    namespace: str = NAMESPACE,
    kube_version: str = KUBE_VERSION,
) -> dict[str, str]:
    """Render the chart like `helm template`; returns {template path: rendered text}.

    `Chart.render()` does not expose Helm's `--api-versions`/`--kube-version`, but the
    library's render call takes them as options (`api_versions`, `kube_version` in its JSON
    options, see `strings libhelm_c.so`), so we call it directly.
    """
    options = {
        "name": RELEASE,
        "namespace": namespace,
        "is_install": True,
        "kube_version": f"v{kube_version}",
        "api_versions": list(api_versions),
    }
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(values or {})
        rendered = _native.call_string(
            "helm_render", chart._raw(), json.dumps(values or {}), json.dumps(options)
        )
    manifests: dict[str, str] = json.loads(rendered)
    return manifests


def parse_manifests(rendered: dict[str, str]) -> list[Manifest]:
    """Every object of a render, in template order (NOTES.txt left out)."""
    objects: list[Manifest] = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(document for document in yaml.safe_load_all(rendered[path]) if document)
    return objects


class Rendered:
    """One render of the chart: its objects and its NOTES.txt."""

    def __init__(self, rendered: dict[str, str]) -> None:
        self.objects = parse_manifests(rendered)
        self.notes = next(
            (text for path, text in rendered.items() if path.endswith("NOTES.txt")), ""
        )

    def find(self, kind: str, name: str | None = None) -> list[Manifest]:
        return [
            obj
            for obj in self.objects
            if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
        ]

    def one(self, kind: str, name: str | None = None) -> Manifest:
        found = self.find(kind, name)
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
        return found[0]

    def kinds(self) -> list[str]:
        return sorted(obj["kind"] for obj in self.objects)

    def example_job(self) -> Manifest:
        """The post-install Job that creates the example AsyncQueue."""
        return next(job for job in self.find("Job") if job["metadata"]["name"].endswith("-example"))

    def example_asyncqueue(self) -> Manifest:
        """The example AsyncQueue, as the Job will create it."""
        container = self.example_job()["spec"]["template"]["spec"]["containers"][0]
        raw = next(e["value"] for e in container["env"] if e["name"] == "AP4K_EXAMPLE_ASYNCQUEUE")
        asyncqueue: Manifest = json.loads(raw)
        return asyncqueue

    def workloads(self) -> Iterator[Manifest]:
        """Every object with a pod template."""
        for obj in self.objects:
            if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
                yield obj


Renderer = Callable[..., Rendered]


@pytest.fixture
def render() -> Renderer:
    """`render(values, api_versions=..., namespace=...)`: the chart rendered by Helm."""

    def _render(values: dict[str, Any] | None = None, **kwargs: Any) -> Rendered:
        return Rendered(render_chart(values, **kwargs))

    return _render


# --- PromQL in dashboards and rules ----------------------------------------------------------

# Grafana's variables, replaced by what "All" / the defaults mean, so a query can be parsed and
# sent to Prometheus as is.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$namespace": ".*",
    "$queue": ".*",
    "$asyncqueue": ".*",
}


def grafana_to_promql(expr: str) -> str:
    # Longest names first: `$__rate_interval` before `$__range`.
    for variable in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(variable, GRAFANA_VARIABLES[variable])
    leftover = re.findall(r"\$\w+", expr)
    assert not leftover, f"unknown Grafana variables {leftover} in {expr}"
    return expr


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels folded into a collapsed row


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL) for every panel target of every dashboard."""
    queries = []
    for name, dashboard in load_dashboards().items():
        for panel in dashboard_panels(dashboard):
            for target in panel.get("targets", []):
                queries.append((name, panel["title"], grafana_to_promql(target["expr"])))
    return queries


def alert_rules(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The rule groups of the chart's PrometheusRule, as Prometheus' rule-file format wants."""
    rendered = Rendered(
        render_chart(
            {"metrics": {"prometheusRule": {"enabled": True, **(values or {})}}},
            api_versions=MONITORING_APIS,
        )
    )
    groups: list[dict[str, Any]] = rendered.one("PrometheusRule")["spec"]["groups"]
    return groups


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (histogram series folded to their family)."""
    import promql_parser

    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    names.add(matcher.value)
        for attribute in ("expr", "lhs", "rhs", "vector_selector", "param"):
            child = getattr(node, attribute, None)
            if child is not None and not isinstance(child, (str, int, float)):
                visit(child)
        for child in getattr(node, "args", None) or ():
            visit(child)

    visit(promql_parser.parse(expr))
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}


def helm_lint(values: dict[str, Any] | None = None) -> dict[str, Any]:
    report: dict[str, Any] = helm_python.lint(
        CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    return report
