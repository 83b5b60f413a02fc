"""The chart rendered by Helm's engine for the value combinations users install with, linted,
and every object validated against the Kubernetes 1.30 schemas (strict: unknown fields fail)."""

from __future__ import annotations

import re
import tomllib
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from tests.chart.conftest import (
    CHART,
    KUBE_VERSION,
    MONITORING_APIS,
    NAMESPACE,
    OPERATOR_CRD,
    RELEASE,
    REPO,
    Rendered,
    Renderer,
    helm_lint,
)
from tests.operator import apiserver

# name -> (values, API versions the cluster offers)
COMBINATIONS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "defaults": ({}, ()),
    "monitoring": (
        {
            "metrics": {
                "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                "podMonitor": {"enabled": True, "scrapeTimeout": "10s"},
                "prometheusRule": {"enabled": True, "alertLabels": {"team": "payments"}},
                "scrapeAnnotations": False,
            },
            "grafana": {"dashboards": {"enabled": True, "namespace": "monitoring"}},
        },
        MONITORING_APIS,
    ),
    "dev-postgresql": (
        {"postgresql": {"enabled": True}, "exampleQueue": {"enabled": True}},
        (),
    ),
    "dev-postgresql-ephemeral": (
        {
            "postgresql": {"enabled": True, "persistence": {"enabled": False}},
            "exampleQueue": {"enabled": True, "name": "orders"},
        },
        (),
    ),
    "namespaced": (
        {
            "operator": {"watchNamespaces": ["team-a", "team-b"]},
            "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
        },
        MONITORING_APIS,
    ),
    "everything": (
        {
            "image": {"repository": "registry.example/ap4k", "tag": "1.2.3"},
            "imagePullSecrets": [{"name": "regcred"}],
            "commonLabels": {"team": "platform"},
            "operator": {
                "watchNamespaces": ["team-a", NAMESPACE],
                "extraEnv": [{"name": "AP4K_API_TOKEN", "value": "x"}],
                "nodeSelector": {"kubernetes.io/os": "linux"},
                "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                "priorityClassName": "system-cluster-critical",
            },
            "crds": {"install": True, "keep": False},
            "postgresql": {"enabled": True, "persistence": {"storageClass": "fast"}},
            "exampleQueue": {"enabled": True},
            "metrics": {
                "serviceMonitor": {"enabled": True},
                "podMonitor": {"enabled": True},
                "prometheusRule": {"enabled": True},
            },
            "grafana": {"dashboards": {"enabled": True, "annotations": {"grafana_folder": "ap4k"}}},
        },
        MONITORING_APIS,
    ),
    "no-crd-no-rbac": (
        {"crds": {"install": False}, "operator": {"rbac": {"create": False}}},
        (),
    ),
}

CLUSTER_SCOPED = {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}


@pytest.fixture(params=sorted(COMBINATIONS))
def combination(request: pytest.FixtureRequest, render: Renderer) -> tuple[str, Rendered]:
    values, apis = COMBINATIONS[request.param]
    return request.param, render(values, api_versions=apis)


def test_lint_is_clean_for_every_combination() -> None:
    for name, (values, _) in COMBINATIONS.items():
        report = helm_lint(values)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [] and problems == [], (name, report)


def _check_prometheus_operator_object(obj: dict[str, Any]) -> None:
    """The monitoring.coreos.com/v1 fields we use, as the Prometheus Operator's CRDs define
    them (its schemas are not available offline)."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    spec = obj["spec"]
    if obj["kind"] in ("ServiceMonitor", "PodMonitor"):
        assert set(spec) <= {
            "selector",
            "namespaceSelector",
            "endpoints",
            "podMetricsEndpoints",
            "targetLabels",
            "podTargetLabels",
            "jobLabel",
        }, spec
        assert spec["selector"].get("matchLabels") or spec["selector"].get("matchExpressions")
        assert set(spec["namespaceSelector"]) <= {"any", "matchNames"}
        endpoints = spec["endpoints" if obj["kind"] == "ServiceMonitor" else "podMetricsEndpoints"]
        assert endpoints
        for endpoint in endpoints:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}, endpoint
            assert isinstance(endpoint["port"], str) and endpoint["path"] == "/metrics"
            assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    elif obj["kind"] == "PrometheusRule":
        assert set(spec) == {"groups"}
        for group in spec["groups"]:
            assert set(group) == {"name", "rules"} and group["rules"]
            for rule in group["rules"]:
                assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
                assert rule["alert"] and rule["expr"].strip()
                assert all(isinstance(v, str) for v in rule["labels"].values())
                assert all(isinstance(v, str) for v in rule["annotations"].values())
    else:
        raise AssertionError(f"unexpected monitoring kind {obj['kind']}")


def _check_asyncqueue(obj: dict[str, Any]) -> None:
    # As a real API server meets it: defaulted, pruned, then validated with the CEL rules.
    crd = yaml.safe_load(OPERATOR_CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    _, problems = apiserver.admit(schema, obj)
    assert problems == [], problems


def test_every_object_matches_the_kubernetes_schemas(combination: tuple[str, Rendered]) -> None:
    name, rendered = combination
    assert rendered.objects, name
    validated = 0
    for obj in rendered.objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            _check_prometheus_operator_object(obj)
            continue
        if obj["apiVersion"].startswith("ap4k.dev/"):
            _check_asyncqueue(obj)
            continue
        if obj["kind"] == "CustomResourceDefinition":
            # What the API server checks at CRD creation, beyond the object's own schema.
            assert apiserver.crd_problems(obj) == [], name
        # Strict: an unknown or misspelled field is an error, not silently dropped.
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        validated += 1
    if any(job["metadata"]["name"].endswith("-example") for job in rendered.find("Job")):
        _check_asyncqueue(rendered.example_asyncqueue())
    assert validated >= 3, name  # at least the operator Deployment, Service, ServiceAccount


def test_every_object_is_labelled_and_placed(combination: tuple[str, Rendered]) -> None:
    _, rendered = combination
    names = set()
    for obj in rendered.objects:
        metadata = obj["metadata"]
        labels = metadata["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/part-of"] == "ap4k"
        assert len(metadata["name"]) <= 63
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in metadata
        else:
            assert metadata["namespace"]
        key = (obj["kind"], metadata.get("namespace"), metadata["name"])
        assert key not in names, f"duplicate object {key}"
        names.add(key)


def test_pods_follow_the_security_conventions(combination: tuple[str, Rendered]) -> None:
    _, rendered = combination
    for workload in rendered.workloads():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        mounts = {v["name"] for v in pod["volumes"]}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["requests"] and container["resources"]["limits"]
            # With a read-only root filesystem, /tmp must be a volume.
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in mounts
            if workload["kind"] != "Job":
                assert container["livenessProbe"] and container["readinessProbe"]


def test_defaults_install_crd_operator_and_cluster_wide_rbac(render: Renderer) -> None:
    rendered = render()
    assert rendered.kinds() == sorted(
        [
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Service",
            "ServiceAccount",
        ]
    )
    operator = rendered.one("Deployment")
    container = operator["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/ap4k/ap4k:0.1.0"  # appVersion
    assert container["args"] == ["operator", "--all-namespaces"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert operator["spec"]["strategy"] == {"type": "Recreate"}
    assert (
        operator["spec"]["template"]["spec"]["serviceAccountName"]
        == (rendered.one("ServiceAccount")["metadata"]["name"])
    )
    # The metrics Service reaches the operator pod.
    service = rendered.one("Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    selector = service["spec"]["selector"]
    assert selector.items() <= operator["spec"]["template"]["metadata"]["labels"].items()
    # Nothing opt-in is on.
    assert not rendered.find("StatefulSet") and not rendered.find("ConfigMap")


def test_image_values_reach_operator_and_its_children(render: Renderer) -> None:
    rendered = render(
        {
            "image": {
                "repository": "registry.example/ap4k",
                "tag": "9.9.9",
                "pullPolicy": "Always",
            },
            "imagePullSecrets": [{"name": "a"}, {"name": "b"}],
        }
    )
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.example/ap4k:9.9.9"
    assert container["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "a"}, {"name": "b"}]
    env = {e["name"]: e["value"] for e in container["env"]}
    # The operator's default image for AsyncQueue children is its own.
    assert env["AP4K_OPERATOR_IMAGE"] == "registry.example/ap4k:9.9.9"
    assert env["AP4K_OPERATOR_IMAGE_PULL_SECRETS"] == "a,b"


def test_operator_resources_and_extra_settings(render: Renderer) -> None:
    resources = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    rendered = render(
        {
            "operator": {
                "resources": resources,
                "extraArgs": ["--verbose"],
                "extraEnv": [{"name": "AP4K_API_TOKEN", "value": "t"}],
                "serviceAccount": {"name": "custom", "annotations": {"a": "b"}},
            }
        }
    )
    container = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == resources
    assert container["args"][-1] == "--verbose"
    assert {"name": "AP4K_API_TOKEN", "value": "t"} in container["env"]
    assert rendered.one("ServiceAccount", "custom")["metadata"]["annotations"] == {"a": "b"}
    assert rendered.one("ClusterRoleBinding")["subjects"][0]["name"] == "custom"


def test_values_schema_rejects_mistakes() -> None:
    bad_values: list[dict[str, Any]] = [
        {"operator": {"watchNamespaces": ["Not_A_Namespace"]}},
        {"operator": {"watchNamspaces": ["typo"]}},
        {"image": {"pullPolicy": "Sometimes"}},
        {"metrics": {"serviceMonitor": {"enabled": "yes"}}},
        {"metrics": {"prometheusRule": {"backlogAgeFor": "five minutes"}}},
        {"postgresql": {"auth": {"username": "Robert'); DROP TABLE"}}},
        {"exampleQueue": {"name": "Upper"}},
    ]
    with helm_python.Chart.load(CHART) as chart:
        for values in bad_values:
            with pytest.raises(helm_python.HelmValuesError):
                chart.validate_schema(values)


def test_the_defaults_satisfy_the_schema() -> None:
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(chart.values)
        assert chart.metadata["name"] == "ap4k"
        # The default image tag is the appVersion: the package version it was built from.
        pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
        assert chart.metadata["appVersion"] == pyproject["project"]["version"]


def test_notes_tell_how_to_post_through_the_service_dns(render: Renderer) -> None:
    rendered = render({"postgresql": {"enabled": True}, "exampleQueue": {"enabled": True}})
    url = f"http://example.{NAMESPACE}.svc:7438/v1/queues/default/messages"
    assert url in rendered.notes
    assert "kubectl" in rendered.notes and "port-forward" in rendered.notes
    # Without the example, the notes show an AsyncQueue to apply and the same URL pattern.
    bare = render()
    assert "kind: AsyncQueue" in bare.notes
    assert f"http://example.{NAMESPACE}.svc:7438/v1/queues/default/messages" in bare.notes


def test_every_value_is_documented_for_helm_docs() -> None:
    """Each leaf of values.yaml, or a map above it, carries a helm-docs `# --` comment."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    comment: list[str] = []
    undocumented = []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        match = re.match(r"^(\s*)([A-Za-z_][\w.-]*):(.*)$", line)
        if not match:
            comment = []
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = bool(comment) and comment[0].startswith("# -- ")
        inherited = documented or any(d for _, d in stack)
        is_leaf = rest != ""
        if is_leaf and not inherited:
            undocumented.append(f"{number}: {key}")
        stack.append((indent, documented))
        comment = []
    assert not undocumented, undocumented


def test_the_values_users_look_for_exist_under_their_names() -> None:
    with helm_python.Chart.load(CHART) as chart:
        values = chart.values
    for dotted in (
        "image.repository", "image.tag", "crds.install", "operator.watchNamespaces",
        "operator.resources", "postgresql.enabled", "metrics.serviceMonitor.enabled",
        "metrics.podMonitor.enabled", "metrics.prometheusRule.enabled",
        "grafana.dashboards.enabled", "exampleQueue.enabled",
    ):  # fmt: skip
        node: Any = values
        for part in dotted.split("."):
            assert isinstance(node, dict) and part in node, dotted
            node = node[part]
    assert values["operator"]["watchNamespaces"] == []  # empty: all namespaces
