"""The CRD and the operator's RBAC come from the operator's own files: the chart must render
them faithfully, keep the CRD on uninstall, and scope the rules to what is watched."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.chart.conftest import (
    NAMESPACE,
    OPERATOR_CRD,
    OPERATOR_RBAC,
    Rendered,
    Renderer,
)

CLUSTER_SCOPED_RESOURCES = {"customresourcedefinitions", "namespaces", "clusterkopfpeerings"}


def _operator_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = yaml.safe_load(OPERATOR_RBAC.read_text())
    return rules


def _grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples: rules compared regardless of how they are grouped."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule["verbs"]
    }


def _is_cluster_scoped(resource: str) -> bool:
    return resource.split("/")[0] in CLUSTER_SCOPED_RESOURCES


def test_crd_is_the_operators_own_with_keep_policy(render: Renderer) -> None:
    crd = render().one("CustomResourceDefinition")
    source = yaml.safe_load(OPERATOR_CRD.read_text())
    metadata = crd.pop("metadata")
    source_metadata = source.pop("metadata")
    assert crd == source  # spec and all, untouched by the fromYaml/toYaml round trip
    assert metadata["name"] == source_metadata["name"] == "asyncqueues.ap4k.dev"
    assert metadata["annotations"]["helm.sh/resource-policy"] == "keep"
    assert metadata["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_crd_is_optional_and_keep_can_be_turned_off(render: Renderer) -> None:
    assert not render({"crds": {"install": False}}).find("CustomResourceDefinition")
    crd = render({"crds": {"keep": False}}).one("CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in crd["metadata"].get("annotations", {})


def test_crd_lives_under_templates_not_crds() -> None:
    # Helm never upgrades what is in crds/; the chart must not ship one there.
    chart_dir = OPERATOR_CRD.parents[2]
    assert not (chart_dir / "crds").exists()
    assert (chart_dir / "templates" / "crds").is_dir()


def test_cluster_wide_watch_grants_exactly_the_operators_rules(render: Renderer) -> None:
    rendered = render()
    assert not rendered.find("Role") and not rendered.find("RoleBinding")
    role = rendered.one("ClusterRole")
    assert _grants(role["rules"]) == _grants(_operator_rules())
    binding = rendered.one("ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    sa = rendered.one("ServiceAccount")["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["name"], "namespace": NAMESPACE}
    ]


SCANNING_RESOURCES = {"customresourcedefinitions", "namespaces"}


def _scanning_env(rendered: Rendered) -> str:
    container = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    value: str = next(e["value"] for e in container["env"] if e["name"] == "AP4K_OPERATOR_SCANNING")
    return value


@pytest.mark.parametrize("namespaces", [["team-a"], ["team-a", "team-b", NAMESPACE]])
def test_namespaced_watch_gets_one_role_per_namespace_and_nothing_cluster_wide(
    render: Renderer, namespaces: list[str]
) -> None:
    rendered = render({"operator": {"watchNamespaces": namespaces}})
    container = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["operator", *(f"--namespace={ns}" for ns in namespaces)]

    roles = rendered.find("Role")
    bindings = rendered.find("RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(namespaces)
    assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(namespaces)
    namespaced = {g for g in _grants(_operator_rules()) if not _is_cluster_scoped(g[1])}
    assert namespaced, "the operator needs namespaced permissions"
    for role in roles:
        # Namespaced resources only, and all of them.
        assert _grants(role["rules"]) == namespaced
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == NAMESPACE

    # kopf takes the namespaces as given (no cluster scanning), so no ClusterRole at all.
    assert _scanning_env(rendered) == "false"
    assert not rendered.find("ClusterRole") and not rendered.find("ClusterRoleBinding")


def test_namespaced_watch_with_cluster_scanning(render: Renderer) -> None:
    rendered = render({"operator": {"watchNamespaces": ["team-a"], "clusterScanning": True}})
    assert _scanning_env(rendered) == "true"
    cluster = {g for g in _grants(_operator_rules()) if _is_cluster_scoped(g[1])}
    assert cluster and _grants(rendered.one("ClusterRole")["rules"]) == cluster
    assert rendered.one("ClusterRoleBinding")["roleRef"]["kind"] == "ClusterRole"
    # Nothing about Deployments, Services or AsyncQueues is granted cluster-wide.
    assert all(_is_cluster_scoped(resource) for _, resource, _ in cluster)


def test_cluster_wide_without_scanning_drops_the_scanning_rules(render: Renderer) -> None:
    rendered = render({"operator": {"clusterScanning": False}})
    assert _scanning_env(rendered) == "false"
    everything = _grants(_operator_rules())
    expected = {g for g in everything if g[1].split("/")[0] not in SCANNING_RESOURCES}
    assert _grants(rendered.one("ClusterRole")["rules"]) == expected
    assert _scanning_env(render()) == "true"  # on by default cluster-wide


def test_rbac_can_be_left_to_the_user(render: Renderer) -> None:
    rendered = render({"operator": {"rbac": {"create": False}, "watchNamespaces": ["a"]}})
    for kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
        assert not rendered.find(kind)
