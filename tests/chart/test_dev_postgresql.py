"""`helm install --set postgresql.enabled=true,exampleQueue.enabled=true` on an empty cluster:
a database, a Secret with its URL under `url`, and an AsyncQueue that the CRD's schema and the
operator's own parser both accept and that points at that Secret."""

from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import unquote, urlsplit

import helm_python
import jsonschema
import pytest
import yaml

from ap4k.operator.spec import parse_spec
from tests.chart.conftest import NAMESPACE, OPERATOR_CRD, Rendered, Renderer, render_chart

DEV = {"postgresql": {"enabled": True}, "exampleQueue": {"enabled": True}}


def _secret_data(secret: dict[str, Any]) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}


def _crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(OPERATOR_CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _validate_against_crd(obj: dict[str, Any]) -> None:
    # The CRD's structural schema is OpenAPI 3.0, whose keywords (boolean exclusiveMinimum,
    # no $schema) are JSON Schema draft 4's; x-kubernetes-* extensions are ignored here, and
    # the one CEL rule that matters for a chart-made object (the name) is checked by hand.
    jsonschema.Draft4Validator(_crd_schema()).validate(obj)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])


def test_database_secret_statefulset_and_service_agree(render: Renderer) -> None:
    rendered = render(DEV)
    secret = rendered.one("Secret")
    data = _secret_data(secret)
    service = rendered.one("Service", secret["metadata"]["name"])
    url = urlsplit(data["url"])
    assert url.scheme == "postgresql"
    assert url.hostname == f"{service['metadata']['name']}.{NAMESPACE}.svc"
    assert url.port == service["spec"]["ports"][0]["port"] == 5432
    assert url.username == data["username"] == "ap4k"
    assert unquote(url.password or "") == data["password"]
    assert url.path == f"/{data['database']}"
    assert len(data["password"]) >= 24  # generated

    statefulset = rendered.one("StatefulSet")
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    pod = statefulset["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    for variable, key in {
        "POSTGRES_USER": "username",
        "POSTGRES_PASSWORD": "password",
        "POSTGRES_DB": "database",
    }.items():
        assert refs[variable] == {"name": secret["metadata"]["name"], "key": key}
    # Data on a claim by default; PGDATA below the mount point (lost+found).
    claim = statefulset["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    pgdata = next(e["value"] for e in container["env"] if e["name"] == "PGDATA")
    data_mount = next(m for m in container["volumeMounts"] if m["name"] == "data")
    assert pgdata.startswith(data_mount["mountPath"] + "/")


def test_explicit_password_is_url_encoded(render: Renderer) -> None:
    password = "p@ss:w/rd?#% +x"
    rendered = render({"postgresql": {"enabled": True, "auth": {"password": password}}})
    data = _secret_data(rendered.one("Secret"))
    assert data["password"] == password
    assert unquote(urlsplit(data["url"]).password or "") == password


def test_ephemeral_storage_uses_an_empty_dir(render: Renderer) -> None:
    rendered = render({"postgresql": {"enabled": True, "persistence": {"enabled": False}}})
    statefulset = rendered.one("StatefulSet")
    assert "volumeClaimTemplates" not in statefulset["spec"]
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}


def _example(rendered: Rendered) -> dict[str, Any]:
    return rendered.example_asyncqueue()


def test_example_queue_matches_the_crd_and_the_operator_parser(render: Renderer) -> None:
    rendered = render(DEV)
    queue = _example(rendered)
    _validate_against_crd(queue)
    secret = rendered.one("Secret")
    assert queue["spec"]["database"] == {"secretName": secret["metadata"]["name"], "key": "url"}
    assert "url" in secret["data"]
    # The operator accepts it as is.
    spec = parse_spec(queue["metadata"]["name"], queue["metadata"]["namespace"], queue["spec"])
    assert spec.database.secret_name == secret["metadata"]["name"]
    assert [q.name for q in spec.queues] == ["default"]
    # Created by a post-install hook Job once the CRD is served, not by Helm itself.
    assert not rendered.find("AsyncQueue")
    job = rendered.example_job()
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install"


def test_example_queue_with_a_user_database_and_spec(render: Renderer) -> None:
    values = {
        "exampleQueue": {
            "enabled": True,
            "name": "orders",
            "databaseSecretName": "prod-db",
            "databaseSecretKey": "uri",
            "carriers": {"minReplicas": 1, "maxReplicas": 20, "metric": {"type": "Server"}},
            "queues": [
                {
                    "name": "emails",
                    "rateLimitPerSecond": 50,
                    "allowedTargets": ["https://hooks.example.com/"],
                },
                {"name": "webhooks", "maxAttempts": 5, "minBackoffSeconds": 1},
            ],
        }
    }
    rendered = render(values)
    assert not rendered.find("StatefulSet")
    queue = _example(rendered)
    _validate_against_crd(queue)
    assert queue["spec"]["database"] == {"secretName": "prod-db", "key": "uri"}
    parse_spec("orders", NAMESPACE, queue["spec"])


def test_the_crd_schema_check_is_not_vacuous(render: Renderer) -> None:
    queue = _example(render(DEV))
    queue["spec"]["carriers"]["minReplicas"] = -1
    with pytest.raises(jsonschema.ValidationError):
        _validate_against_crd(queue)
    del queue["spec"]["database"]
    with pytest.raises(jsonschema.ValidationError):
        _validate_against_crd(queue)


def test_example_queue_without_a_database_fails_clearly() -> None:
    with pytest.raises(helm_python.HelmRenderError) as failure:
        render_chart({"exampleQueue": {"enabled": True}})
    assert "postgresql.enabled=true" in str(failure.value)
    assert "exampleQueue.databaseSecretName" in str(failure.value)


def test_example_queue_must_be_in_a_watched_namespace(render: Renderer) -> None:
    values = {**DEV, "operator": {"watchNamespaces": ["team-a"]}}
    with pytest.raises(helm_python.HelmRenderError) as failure:
        render_chart(values)
    assert f"release namespace {NAMESPACE}" in str(failure.value)
    values["operator"] = {"watchNamespaces": ["team-a", NAMESPACE]}
    assert render(values).example_asyncqueue()["metadata"]["namespace"] == NAMESPACE
