"""The names the operator shares with the CRD and the chart, spelled once.

The CRD (charts/ap4k/files/crds/asyncqueues.ap4k.dev.yaml) and the RBAC rules spell them too;
tests/operator/test_crd.py compares the CRD's with these.
"""

from __future__ import annotations

GROUP = "ap4k.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AsyncQueue"
PLURAL = "asyncqueues"

# kopf's bookkeeping annotations (`ap4k.dev/…`) and the finalizer of the autoscaling daemon.
ANNOTATIONS_PREFIX = GROUP
FINALIZER = f"{GROUP}/operator"

# Labels of the children. The drift watchers select on MANAGED_BY and find the owner by
# OWNER_LABEL; COMPONENT_LABEL tells the server from the carriers.
MANAGED_BY = "ap4k-operator"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
OWNER_LABEL = f"{GROUP}/asyncqueue"
COMPONENT_LABEL = "app.kubernetes.io/component"
CHILDREN_SELECTOR = {MANAGED_BY_LABEL: MANAGED_BY}

# The User-Agent of every call the operator makes itself (Kubernetes, servers, Prometheus).
USER_AGENT = "ap4k-operator"
