"""The operator's RBAC rules (charts/ap4k/files/operator-rbac-rules.yaml): valid and minimal.

That they cover every call the operator makes is checked where it makes them: at the end of
the kmock tests (test_operator_kmock.py), against the requests kmock recorded.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate


def test_rules_are_a_valid_cluster_role(rbac_rules: Any) -> None:
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "ap4k-operator"}, "rules": rbac_rules,
    }
    kubernetes_validate.validate(role, "1.30.0", strict=True)


def test_least_privilege(rbac_rules: Any) -> None:
    for rule in rbac_rules:
        assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"]
        # Children go away with their owner (owner references); nothing is ever deleted.
        forbidden = {"delete", "deletecollection", "update", "escalate", "bind", "impersonate"}
        assert not forbidden & set(rule["verbs"])
    everything = {
        (g, r) for rule in rbac_rules for g in rule["apiGroups"] for r in rule["resources"]
    }
    # The database URL reaches the server pods through secretKeyRef: no Secret access at all.
    assert not {r for _, r in everything} & {"secrets", "configmaps", "pods", "pods/exec"}
    assert ("ap4k.dev", "asyncqueues/status") in everything
    assert rbac_rules.allows("create", "", "events")
    assert not rbac_rules.allows("create", "ap4k.dev", "asyncqueues")
