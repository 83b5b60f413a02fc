"""Dashboards and alerts, without a running server: every query parses, names only metrics
ap4k exports, the dashboards cover what operators look for, and the alerts fire (and stay
quiet) on synthetic series under `promtool test rules`, Prometheus' own rule evaluator."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import generate_latest

from ap4k.operator import metrics as operator_metrics
from tests.chart.conftest import (
    DOCUMENTED_CARRIER_METRICS,
    DOCUMENTED_OPERATOR_METRICS,
    DOCUMENTED_SERVER_METRICS,
    alert_rules,
    dashboard_panels,
    dashboard_queries,
    load_dashboards,
    metric_names,
)

KNOWN_METRICS = DOCUMENTED_SERVER_METRICS | DOCUMENTED_CARRIER_METRICS | DOCUMENTED_OPERATOR_METRICS
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def _alert_exprs() -> list[tuple[str, str]]:
    return [(r["alert"], r["expr"]) for group in alert_rules() for r in group["rules"]]


@pytest.mark.parametrize(("dashboard", "panel", "expr"), dashboard_queries())
def test_dashboard_query_parses_and_names_known_metrics(
    dashboard: str, panel: str, expr: str
) -> None:
    promql_parser.parse(expr)
    names = metric_names(expr)
    assert names, f"{dashboard} / {panel}: selects no metric"
    assert names <= KNOWN_METRICS, f"{dashboard} / {panel}: unknown {names - KNOWN_METRICS}"


def test_alert_expressions_parse_and_name_known_metrics() -> None:
    exprs = _alert_exprs()
    assert len(exprs) == 4
    for alert, expr in exprs:
        promql_parser.parse(expr)
        names = metric_names(expr)
        assert names and names <= KNOWN_METRICS, (alert, names - KNOWN_METRICS)


def test_the_metric_name_check_is_not_vacuous() -> None:
    assert metric_names('sum(rate(ap4k_nope_total{queue=~".*"}[1m]))') == {"ap4k_nope_total"}
    assert metric_names(
        "histogram_quantile(0.9, sum by (le) (rate(ap4k_delivery_duration_seconds_bucket[1m])))"
    ) == {"ap4k_delivery_duration_seconds"}
    assert metric_names("a and on (x) (changes(b[5m]) == 0) or c * 0") == {"a", "b", "c"}


def test_operator_metric_names_match_the_operators_registry() -> None:
    exposition = generate_latest(operator_metrics.REGISTRY).decode()
    exported = {line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE ")}
    # prometheus-client names a counter's family without `_total`.
    exported |= {f"{name}_total" for name in exported}
    assert exported >= DOCUMENTED_OPERATOR_METRICS


def test_carrier_metric_names_match_the_carriers_own() -> None:
    if importlib.util.find_spec("ap4k.carrier.metrics") is None:
        pytest.skip("the carrier is not built yet")
    import prometheus_client

    importlib.import_module("ap4k.carrier.metrics")  # registers in the default registry
    exposition = generate_latest(prometheus_client.REGISTRY).decode()
    exported = {line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE ")}
    exported |= {f"{name}_total" for name in exported}
    assert exported >= DOCUMENTED_CARRIER_METRICS


def test_dashboards_cover_what_operators_look_for() -> None:
    used: set[str] = set()
    selections: list[str] = []
    for _, _, expr in dashboard_queries():
        used |= metric_names(expr)
        selections.append(expr)
    assert {
        "ap4k_queue_depth",  # backlog per queue and state
        "ap4k_queue_oldest_available_age_seconds",
        "ap4k_messages_enqueued_total",  # enqueue rate
        "ap4k_deliveries_total",  # delivery rate, retries, dead letters
        "ap4k_delivery_duration_seconds",
        "ap4k_end_to_end_latency_seconds",
        "ap4k_operator_desired_carriers",  # carriers desired versus running
        "ap4k_operator_carriers",
    } <= used
    joined = "\n".join(selections)
    assert 'outcome="retried"' in joined and 'outcome="dead"' in joined
    assert "histogram_quantile(0.99" in joined and "histogram_quantile(0.5" in joined


def test_dashboards_are_well_formed_grafana_json() -> None:
    for name, dashboard in load_dashboards().items():
        assert dashboard["uid"].startswith("ap4k-") and dashboard["title"].startswith("ap4k")
        variables = {v["name"] for v in dashboard["templating"]["list"]}
        assert "datasource" in variables, name
        ids = [panel["id"] for panel in dashboard_panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in dashboard_panels(dashboard):
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, (name, panel["title"])
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "${datasource}"
                assert panel["targets"], (name, panel["title"])
                refs = [t["refId"] for t in panel["targets"]]
                assert len(refs) == len(set(refs))


# --- the alerts, evaluated by promtool ------------------------------------------------------


def series(metric: str, values: str, **labels: str) -> dict[str, str]:
    """One input series in promtool's notation ("0+60x30": 0, 60, 120, … 31 samples)."""
    selector = ",".join(f'{name}="{value}"' for name, value in labels.items())
    return {"series": f"{metric}{{{selector}}}", "values": values}


AGE = "ap4k_queue_oldest_available_age_seconds"
DEPTH = "ap4k_queue_depth"
DELIVERIES = "ap4k_deliveries_total"
DESIRED = "ap4k_operator_desired_carriers"
BACKLOG = "ap4k_operator_backlog"

# Each case: input series, then (when, alert, the label sets that must fire then, exactly).
ALERT_CASES: list[dict[str, Any]] = [
    {
        "name": "backlog age over the threshold for long enough",
        "series": [
            series(AGE, "0+60x30", namespace="a", queue="q", pod="s1"),
            # A second replica reports the same database: still one alert.
            series(AGE, "0+60x30", namespace="a", queue="q", pod="s2"),
            series(AGE, "5x30", namespace="a", queue="ok", pod="s1"),
        ],
        "checks": [
            ("4m", "Ap4kBacklogTooOld", []),  # 240s: under the threshold
            ("12m", "Ap4kBacklogTooOld", [{"namespace": "a", "queue": "q"}]),
        ],
    },
    {
        "name": "dead letters growing",
        "series": [
            series(DELIVERIES, "0x10 1+1x10 11x40", namespace="a", queue="q", outcome="dead"),
            series(DELIVERIES, "3x60", namespace="a", queue="fine", outcome="dead"),
        ],
        "checks": [
            ("5m", "Ap4kDeadLettersGrowing", []),
            ("15m", "Ap4kDeadLettersGrowing", [{"namespace": "a", "queue": "q"}]),
            ("55m", "Ap4kDeadLettersGrowing", []),  # stopped growing long ago
        ],
    },
    {
        "name": "no deliveries while the backlog grows, also when nothing was ever delivered",
        "series": [
            series(DEPTH, "0+10x60", namespace="a", queue="stuck", state="available"),
            series(DEPTH, "0+10x60", namespace="a", queue="busy", state="available"),
            series(DELIVERIES, "0+5x60", namespace="a", queue="busy", outcome="delivered"),
        ],
        "checks": [
            ("5m", "Ap4kNoDeliveriesWhileBacklogGrows", []),
            ("30m", "Ap4kNoDeliveriesWhileBacklogGrows", [{"namespace": "a", "queue": "stuck"}]),
        ],
    },
    {
        "name": "carriers pinned while the backlog grows",
        "series": [
            series(DESIRED, "10x60", namespace="ops", asyncqueue="a/full"),
            series(BACKLOG, "1000+100x60", namespace="ops", asyncqueue="a/full"),
            # Scaling along with its backlog: not pinned.
            series(DESIRED, "1+1x60", namespace="ops", asyncqueue="a/scaling"),
            series(BACKLOG, "100+100x60", namespace="ops", asyncqueue="a/scaling"),
            # Pinned but draining: not alarming.
            series(DESIRED, "10x60", namespace="ops", asyncqueue="a/draining"),
            series(BACKLOG, "10000-100x60", namespace="ops", asyncqueue="a/draining"),
        ],
        "checks": [
            ("10m", "Ap4kCarriersPinnedAtMax", []),
            ("45m", "Ap4kCarriersPinnedAtMax", [{"namespace": "ops", "asyncqueue": "a/full"}]),
        ],
    },
]


@pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool (Debian's prometheus) is absent")
@pytest.mark.parametrize("case", ALERT_CASES, ids=[c["name"] for c in ALERT_CASES])
def test_alert_fires_on_synthetic_series(case: dict[str, Any], tmp_path: Path) -> None:
    groups = alert_rules()
    # The full rules, annotations and all: Prometheus' own checker validates their templates.
    rules_file = tmp_path / "ap4k.rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": groups}))
    check = subprocess.run(
        [PROMTOOL, "check", "rules", str(rules_file)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr

    # The unit test compares labels only: promtool would also demand every annotation's text.
    bare = [
        {
            **group,
            "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in group["rules"]],
        }
        for group in groups
    ]
    bare_file = tmp_path / "ap4k.bare.rules.yaml"
    bare_file.write_text(yaml.safe_dump({"groups": bare}))
    alert_labels = {r["alert"]: r["labels"] for group in groups for r in group["rules"]}
    tests = {
        "rule_files": [str(bare_file)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": case["series"],
                "alert_rule_test": [
                    {
                        "eval_time": at,
                        "alertname": alert,
                        "exp_alerts": [
                            {"exp_labels": {**labels, **alert_labels[alert]}} for labels in expected
                        ],
                    }
                    for at, alert, expected in case["checks"]
                ],
            }
        ],
    }
    tests_file = tmp_path / "ap4k.rules.test.yaml"
    tests_file.write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(tests_file)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
