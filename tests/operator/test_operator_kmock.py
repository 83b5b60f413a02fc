"""The real operator (kopf, in a thread) against kmock's Kubernetes API emulator.

kmock stores what it is given and emits watch events; it does not default, validate or garbage-
collect. So the AsyncQueues created here carry what the API server would add (uid,
generation, resourceVersion), and a spec change bumps the generation by hand.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from ap4k.core.embedded_pg import free_port
from ap4k.operator import config

NS = "queues"
UID = "0c7a3b5e-1f0a-4e8e-9a55-5c2b3a1f0001"
AQ, DEPLOYMENTS, SERVICES = "ap4k.dev/v1alpha1/asyncqueues", "apps/v1/deployments", "v1/services"
AQ_PATH = f"/apis/ap4k.dev/v1alpha1/namespaces/{NS}/asyncqueues"
DEPLOY_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments"
SERVICE_PATH = f"/api/v1/namespaces/{NS}/services"


def asyncqueue(name: str = "orders", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ap4k.dev/v1alpha1",
        "kind": "AsyncQueue",
        "metadata": {
            "name": name, "namespace": NS, "uid": UID, "generation": 1, "resourceVersion": "1",
        },
        "spec": {"database": {"secretName": "orders-db"}, **spec},
    }


def settings(cluster: Any, **overrides: Any) -> config.OperatorConfig:
    values: dict[str, Any] = {
        "image": "example.test/ap4k:1.2.3",
        "kubernetes_url": cluster.url,
        # Nothing listens here: these tests are about the Kubernetes side.
        "server_url_template": "http://127.0.0.1:9/{namespace}/{name}",
        "metrics_port": 0,
        "http_timeout_seconds": 1.0,
        # kmock cannot list cluster-scoped namespaces (it reads /api/v1/namespaces as a
        # namespaced path): kopf's restricted mode, as with RBAC without namespace access.
        "scanning": False,
    }
    return config.OperatorConfig(**{**values, **overrides})


def condition(obj: Any, kind: str) -> dict[str, Any] | None:
    for item in (obj or {}).get("status", {}).get("conditions", []):
        if item["type"] == kind:
            return dict(item)
    return None


def container(deployment: Any) -> dict[str, Any]:
    return dict(deployment["spec"]["template"]["spec"]["containers"][0])


async def test_applying_an_asyncqueue_creates_owned_children_and_status(
    cluster: Any, run_operator: Any
) -> None:
    async with run_operator(settings(cluster)):
        await cluster.create(asyncqueue(server={"replicas": 3, "dispatchers": 4},
                                        carriers={"minReplicas": 1, "concurrency": 16}))
        carrier = await cluster.eventually(
            lambda: cluster.get(DEPLOYMENTS, "orders-carrier"), what="the carrier Deployment"
        )
        server = cluster.get(DEPLOYMENTS, "orders-server")
        service = cluster.get(SERVICES, "orders")

        for child in (server, service, carrier):
            (ref,) = child["metadata"]["ownerReferences"]
            assert (ref["kind"], ref["name"], ref["uid"]) == ("AsyncQueue", "orders", UID)
            assert ref["controller"] is True
            assert child["metadata"]["labels"]["ap4k.dev/asyncqueue"] == "orders"

        assert server["spec"]["replicas"] == 3
        serve = container(server)
        assert serve["image"] == "example.test/ap4k:1.2.3"
        assert serve["args"] == ["serve", "--host", "0.0.0.0", "--port", "7438",
                                 "--dispatchers", "4"]
        assert serve["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "orders-db", "key": "url"}
        assert service["spec"]["ports"][0]["port"] == 7438
        assert service["spec"]["selector"] == server["spec"]["selector"]["matchLabels"]

        assert carrier["spec"]["replicas"] == 1  # minReplicas, until the autoscaler knows more
        assert container(carrier)["args"] == [
            "carrier", "--server", "http://orders.queues.svc:7438", "--concurrency", "16",
            "--metrics-port", "7439",
        ]

        # Status: the endpoint, the generation seen, and conditions with reasons. The server
        # does not answer (nothing listens), so Ready is False and says why.
        aq = await cluster.eventually(
            lambda: (obj := cluster.get(AQ, "orders"))
            and (condition(obj, "ServerReachable") or {}).get("status") == "False" and obj,
            what="ServerReachable=False",
        )
        status = aq["status"]
        assert status["endpoint"] == "http://orders.queues.svc:7438"
        assert status["observedGeneration"] == 1
        assert condition(aq, "Reconciled") == {
            "type": "Reconciled", "status": "True", "reason": "Applied",
            "message": "the server and carrier Deployments and the Service match the spec",
            "lastTransitionTime": condition(aq, "Reconciled")["lastTransitionTime"],  # type: ignore[index]
            "observedGeneration": 1,
        }
        ready = condition(aq, "Ready")
        assert ready is not None
        assert (ready["status"], ready["reason"]) == ("False", "Unreachable")
        metrics = condition(aq, "MetricsAvailable")
        assert metrics is not None
        assert (metrics["status"], metrics["reason"]) == ("False", "MetricsUnavailable")
        # A failing metric source leaves the carriers where they are.
        assert status["carriers"]["replicas"] == 1
        assert cluster.get(DEPLOYMENTS, "orders-carrier")["spec"]["replicas"] == 1


async def test_a_spec_change_patches_the_children(cluster: Any, run_operator: Any) -> None:
    async with run_operator(settings(cluster)):
        await cluster.create(asyncqueue())
        await cluster.eventually(lambda: cluster.get(DEPLOYMENTS, "orders-carrier"))
        await cluster.patch(f"{AQ_PATH}/orders", {
            "metadata": {"generation": 2},
            "spec": {
                "image": "example.test/ap4k:2.0.0",
                "server": {"replicas": 4, "dispatchers": 0},
                "carriers": {"minReplicas": 2, "maxReplicas": 6, "concurrency": 3},
                "database": {"secretName": "other-db", "key": "dsn"},
            },
        })
        server = await cluster.eventually(
            lambda: (d := cluster.get(DEPLOYMENTS, "orders-server"))
            and d["spec"]["replicas"] == 4 and d,
            what="the patched server Deployment",
        )
        assert container(server)["args"][-2:] == ["--dispatchers", "0"]
        assert container(server)["image"] == "example.test/ap4k:2.0.0"
        assert container(server)["env"][0]["valueFrom"]["secretKeyRef"] == {
            "name": "other-db", "key": "dsn",
        }
        # Moved up into the new bounds, and the new concurrency.
        carrier = await cluster.eventually(
            lambda: (d := cluster.get(DEPLOYMENTS, "orders-carrier"))
            and d["spec"]["replicas"] == 2 and d,
            what="the patched carrier Deployment",
        )
        assert container(carrier)["args"][3:5] == ["--concurrency", "3"]
        await cluster.eventually(
            lambda: cluster.get(AQ, "orders")["status"]["observedGeneration"] == 2,
            what="observedGeneration 2",
        )


def assert_covered_by_rbac(cluster: Any, rules: Any) -> None:
    calls = cluster.operator_requests()
    assert calls, "kmock recorded no calls by the operator"
    missing = {(verb, group, resource) for verb, group, resource, _ in calls
               if not rules.allows(verb, group, resource)}
    assert not missing, f"calls the RBAC rules do not allow: {sorted(missing)}"
    # With --namespace, everything happens inside the watched namespace (a Role suffices).
    assert {namespace for *_, namespace in calls} == {NS}


async def test_deleted_or_edited_children_come_back(
    cluster: Any, run_operator: Any, rbac_rules: Any
) -> None:
    async with run_operator(settings(cluster)):
        await cluster.create(asyncqueue(carriers={"minReplicas": 2}))
        await cluster.eventually(lambda: cluster.get(SERVICES, "orders"))
        await cluster.eventually(lambda: cluster.get(DEPLOYMENTS, "orders-carrier"))

        await cluster.delete(f"{SERVICE_PATH}/orders")
        service = await cluster.eventually(lambda: cluster.get(SERVICES, "orders"),
                                           what="the Service to come back")
        assert service["metadata"]["ownerReferences"][0]["uid"] == UID

        await cluster.delete(f"{DEPLOY_PATH}/orders-server")
        await cluster.eventually(lambda: cluster.get(DEPLOYMENTS, "orders-server"),
                                 what="the server Deployment to come back")

        # Someone scales the carriers by hand and edits the server's command line.
        await cluster.patch(f"{DEPLOY_PATH}/orders-carrier", {"spec": {"replicas": 9}})
        edited = cluster.raw(DEPLOYMENTS, "orders-server")["spec"]["template"]["spec"]
        edited["containers"][0]["args"] = ["serve", "--dispatchers", "99"]
        await cluster.patch(f"{DEPLOY_PATH}/orders-server",
                            {"spec": {"template": {"spec": edited}}})

        await cluster.eventually(
            lambda: cluster.get(DEPLOYMENTS, "orders-carrier")["spec"]["replicas"] == 2,
            what="the carrier replicas restored",
        )
        await cluster.eventually(
            lambda: container(cluster.get(DEPLOYMENTS, "orders-server"))["args"][-1] == "10",
            what="the server's args restored",
        )
    assert_covered_by_rbac(cluster, rbac_rules)


async def test_a_bad_spec_gets_its_condition_and_event(
    cluster: Any, run_operator: Any, rbac_rules: Any
) -> None:
    async with run_operator(settings(cluster)) as runner:
        # The CRD's CEL rule would refuse this at admission; kmock (like a cluster with an
        # older CRD) lets it through, and the operator must not crash-loop on it.
        await cluster.create(asyncqueue(carriers={"minReplicas": 5, "maxReplicas": 2}))
        aq = await cluster.eventually(
            lambda: (obj := cluster.get(AQ, "orders")) and condition(obj, "Ready") and obj,
            what="a Ready condition",
        )
        ready = condition(aq, "Ready")
        assert ready is not None
        assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
        assert "spec.carriers.maxReplicas" in ready["message"]
        events = await cluster.eventually(lambda: cluster.events("InvalidSpec"),
                                          what="an InvalidSpec event")
        assert events[0]["type"] == "Warning"
        assert events[0]["involvedObject"]["name"] == "orders"
        assert cluster.get(DEPLOYMENTS, "orders-server") is None

        # Fixing the spec brings the children.
        await cluster.patch(f"{AQ_PATH}/orders", {
            "metadata": {"generation": 2}, "spec": {"carriers": {"maxReplicas": 8}},
        })
        await cluster.eventually(lambda: cluster.get(DEPLOYMENTS, "orders-carrier"),
                                 what="children after the fix")
        await cluster.eventually(
            lambda: condition(cluster.get(AQ, "orders"), "Reconciled")["status"] == "True",
            what="Reconciled=True",
        )
    # Recorded, not raised: the handler succeeded rather than failing and retrying.
    assert "reconcile_asyncqueue' failed" not in runner.output
    assert "reconcile_asyncqueue' succeeded" in runner.output
    assert ("create", "", "events", NS) in cluster.operator_requests()
    assert_covered_by_rbac(cluster, rbac_rules)


async def test_operator_serves_metrics_and_healthz(cluster: Any, run_operator: Any) -> None:
    port = free_port()
    async with run_operator(settings(cluster, metrics_port=port)), aiohttp.ClientSession() as http:
        async def get(path: str) -> tuple[int, str]:
            async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
                return resp.status, await resp.text()

        async def healthy() -> bool:
            try:
                return (await get("/healthz"))[0] == 200
            except aiohttp.ClientError:
                return False

        await cluster.eventually(healthy, what="/healthz")
        await cluster.create(asyncqueue())
        await cluster.eventually(lambda: cluster.get(DEPLOYMENTS, "orders-carrier"))

        async def reconciled() -> str:
            status, text = await get("/metrics")
            assert status == 200
            return text if 'ap4k_operator_reconciliations_total{result="applied"}' in text else ""

        text = await cluster.eventually(reconciled, what="the reconciliation counter")
        assert "ap4k_operator_metric_errors_total" in text


async def test_deleting_the_asyncqueue_lets_its_children_go(
    cluster: Any, run_operator: Any
) -> None:
    async with run_operator(settings(cluster)) as runner:
        await cluster.create(asyncqueue())
        await cluster.eventually(lambda: cluster.get(DEPLOYMENTS, "orders-carrier"))
        await cluster.eventually(
            lambda: "ap4k.dev/operator" in cluster.get(AQ, "orders")["metadata"]["finalizers"],
            what="kopf's finalizer (for the autoscaling daemon)",
        )
        await cluster.delete(f"{AQ_PATH}/orders")
        # The daemon stops and kopf releases the object.
        await cluster.eventually(lambda: cluster.get(AQ, "orders") is None,
                                 what="the AsyncQueue gone")
        # What Kubernetes' garbage collector does next (kmock has none): the owned children
        # go, and the operator must not bring them back.
        await cluster.delete(f"{SERVICE_PATH}/orders")
        await cluster.delete(f"{DEPLOY_PATH}/orders-server")
        await cluster.delete(f"{DEPLOY_PATH}/orders-carrier")
        await asyncio.sleep(1.5)
        assert cluster.get(SERVICES, "orders") is None
        assert cluster.get(DEPLOYMENTS, "orders-server") is None
        assert cluster.get(DEPLOYMENTS, "orders-carrier") is None
    assert "Daemon 'autoscale_carriers' succeeded" in runner.output
