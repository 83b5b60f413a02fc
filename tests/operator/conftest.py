"""Fixtures for the operator's tests: the CRD, kmock serving it, the real operator running."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from ap4k.operator import config

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "charts" / "ap4k" / "files" / "crds" / "asyncqueues.ap4k.dev.yaml"
RBAC_PATH = ROOT / "charts" / "ap4k" / "files" / "operator-rbac-rules.yaml"
NAMESPACE = "queues"

AQ = "ap4k.dev/v1alpha1/asyncqueues"
DEPLOYMENTS = "apps/v1/deployments"
SERVICES = "v1/services"
EVENTS = "v1/events"
NAMESPACES = "v1/namespaces"
CRDS = "apiextensions.k8s.io/v1/customresourcedefinitions"


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return loaded


@pytest.fixture(scope="session")
def crd_schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


async def eventually(
    probe: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll `probe` (sync or async) until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = probe()
            if isinstance(result, Awaitable):
                result = await result
            last = result
            if result:
                return result
        except (KeyError, IndexError, TypeError, AssertionError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or probe}: last {last!r}")
        await asyncio.sleep(interval)


def declare_resources(kmock: Any, crd: dict[str, Any]) -> None:
    """What the API server's discovery would show: the CRD's resource and the children's."""
    names = crd["spec"]["names"]
    version = crd["spec"]["versions"][0]
    kmock.resources[AQ] = kmock.ResourceInfo(
        kind=names["kind"], singular=names["singular"], namespaced=True,
        shortnames=set(names["shortNames"]), categories=set(names["categories"]),
        subresources=set(version["subresources"]),
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
    )
    for key, kind in ((DEPLOYMENTS, "Deployment"), (SERVICES, "Service"), (EVENTS, "Event")):
        kmock.resources[key] = kmock.ResourceInfo(
            kind=kind, namespaced=True,
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        )
    # kopf watches namespaces and CRDs (its "backbone") before it serves anything.
    for key, kind in ((NAMESPACES, "Namespace"), (CRDS, "CustomResourceDefinition")):
        kmock.resources[key] = kmock.ResourceInfo(
            kind=kind, namespaced=False, verbs={"get", "list", "watch"},
        )
    kmock.objects[NAMESPACES, None, NAMESPACE] = {
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE},
    }
    kmock.objects[CRDS, None, crd["metadata"]["name"]] = crd


class Cluster:
    """kmock as a Kubernetes API for one test: discovery, writes through the API, lookups."""

    NAMESPACE = NAMESPACE
    AQ, DEPLOYMENTS, SERVICES, EVENTS = AQ, DEPLOYMENTS, SERVICES, EVENTS

    def __init__(self, kmock: Any, crd: dict[str, Any]) -> None:
        self.kmock = kmock
        declare_resources(kmock, crd)

    @property
    def url(self) -> str:
        return str(self.kmock.url).rstrip("/")

    def get(self, resource: str, name: str, namespace: str = NAMESPACE) -> Any:
        """The stored object, or None when absent or deleted."""
        try:
            obj = self.kmock.objects[resource, namespace, name]
        except KeyError:
            return None
        return None if obj.deleted else obj

    def raw(self, resource: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
        """A plain (JSON-serializable) deep copy of the stored object."""
        return copy.deepcopy(dict(self.kmock.objects[resource, namespace, name].raw))

    async def create(self, body: dict[str, Any]) -> None:
        path = f"/apis/ap4k.dev/v1alpha1/namespaces/{body['metadata']['namespace']}/asyncqueues"
        async with self.kmock.post(path, json=body) as resp:
            assert resp.status < 300, await resp.text()

    async def patch(self, path: str, patch: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.kmock.patch(path, json=patch, headers=headers) as resp:
            assert resp.status < 300, await resp.text()

    async def delete(self, path: str) -> None:
        async with self.kmock.delete(path) as resp:
            assert resp.status < 300, await resp.text()

    def events(self, reason: str) -> list[Any]:
        return [
            obj for (resource, _, _), obj in self.kmock.objects.items()
            if resource == EVENTS and not obj.deleted and obj.get("reason") == reason
        ]

    def operator_requests(self) -> list[tuple[str, str, str, str | None]]:
        """(verb, API group, resource[/subresource], namespace) of every API call the operator
        made (kopf's and its own), as RBAC sees them; the test's own calls left out."""
        seen = []
        for request in self.kmock._requests:
            agent = request.headers.get("User-Agent", "")
            if request.resource is None or not request.resource.plural or agent.startswith("kmock"):
                continue  # discovery (allowed to every user) or the test itself
            method = str(request.method.value if hasattr(request.method, "value")
                         else request.method).upper()
            verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(
                method, "watch" if request.params.get("watch") in ("true", "1") else
                "get" if request.name else "list")
            resource = request.resource.plural
            if request.subresource:
                resource = f"{resource}/{request.subresource}"
            seen.append((verb, request.resource.group, resource, request.namespace))
        return seen

    eventually = staticmethod(eventually)


class Rules(list[dict[str, Any]]):
    """The operator's RBAC rules, as PolicyRule dicts."""

    def allows(self, verb: str, group: str, resource: str) -> bool:
        return any(
            group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
            for rule in self
        )


@pytest.fixture(scope="session")
def rbac_rules() -> Rules:
    return Rules(yaml.safe_load(RBAC_PATH.read_text()))


@pytest.fixture
def cluster(kmock: Any, crd: dict[str, Any]) -> Cluster:
    return Cluster(kmock, crd)


@pytest.fixture
def run_operator() -> Callable[..., contextlib.AbstractAsyncContextManager[Any]]:
    return running_operator


@contextlib.asynccontextmanager
async def running_operator(
    settings: config.OperatorConfig, namespace: str = NAMESPACE
) -> AsyncIterator[Any]:
    """The real operator (`kopf run -m ap4k.operator.handlers`) in a thread of its own.

    Entering and leaving happen off the test's event loop: kmock serves on that loop, and the
    operator talks to it while it starts and stops.
    """
    from kopf.testing import KopfRunner

    config.configure(settings)
    runner = KopfRunner(
        ["run", "--standalone", "--namespace", namespace, "-m", "ap4k.operator.handlers"],
        timeout=60,
    )
    await asyncio.to_thread(runner.__enter__)
    try:
        yield runner
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)
        config.configure(None)
