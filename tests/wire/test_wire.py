"""One declaration per wire object (`ap4k.core.wire`), read back from everything that uses it.

A queue setting's bound is one edit: these tests take each bound from the declaration and
find it in the server's request parser, the client's type, the OpenAPI document the server
serves and the CRD's schema for `spec.queues[]` (whose camelCase names are generated from the
declaration's snake_case ones), and in the operator's parser of an AsyncQueue.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, get_type_hints

import msgspec
import pytest
import yaml

from ap4k.client import models
from ap4k.core import wire
from ap4k.operator.spec import NOT_IN_RESOURCE, QUEUE_SETTINGS, SpecError, parse_spec
from ap4k.server.errors import ApiError
from ap4k.server.openapi import openapi_document
from ap4k.server.validation import parse_settings

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "charts/ap4k/files/crds/asyncqueues.ap4k.dev.yaml"
SETTINGS = wire.QueueSettingsUpdate.__struct_fields__
BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "maxLength", "minLength", "maxItems")


def _schema_of(struct: type[msgspec.Struct]) -> dict[str, Any]:
    _, components = msgspec.json.schema_components([struct])
    schema: dict[str, Any] = components[struct.__name__]
    return schema


def _value_schema(field: dict[str, Any]) -> dict[str, Any]:
    """A field's schema without its `null` alternative."""
    options = [o for o in field.get("anyOf", [field]) if o.get("type") != "null"]
    (option,) = options
    return option


def _bounds(field: dict[str, Any]) -> dict[str, Any]:
    option = _value_schema(field)
    out = {k: option[k] for k in BOUND_KEYS if k in option}
    if "items" in option:
        out["items"] = {k: option["items"][k] for k in BOUND_KEYS if k in option["items"]}
    return out


DECLARED = {
    name: _bounds(_schema_of(wire.QueueSettingsUpdate)["properties"][name]) for name in SETTINGS
}


def _crd_queue_item() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    item: dict[str, Any] = spec["properties"]["queues"]["items"]
    return item


def _crd_bounds(field: dict[str, Any]) -> dict[str, Any]:
    """The CRD's bounds in JSON Schema 2020-12 terms: OpenAPI 3.0's boolean
    `exclusiveMinimum` becomes the number it qualifies."""
    out = {k: field[k] for k in BOUND_KEYS if k in field}
    if out.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if "items" in field:
        out["items"] = {k: field["items"][k] for k in BOUND_KEYS if k in field["items"]}
    return out


def test_the_crd_spells_every_queue_setting_the_operator_carries() -> None:
    item = _crd_queue_item()
    carried = [name for name in SETTINGS if name not in NOT_IN_RESOURCE]
    assert {wire.snake_to_camel(name): name for name in carried} == QUEUE_SETTINGS
    assert set(item["properties"]) == {"name", *QUEUE_SETTINGS}
    assert QUEUE_SETTINGS["maxBackoffSeconds"] == "max_backoff_seconds"


# Settings that are objects (`circuit_breaker`): their fields, by "setting.field".
OBJECTS = wire.OBJECT_SETTINGS
NESTED = {
    f"{setting}.{field}": _bounds(_schema_of(struct)["properties"][field])
    for setting, struct in OBJECTS.items()
    for field in struct.__struct_fields__
}


@pytest.mark.parametrize("name", [n for n in SETTINGS if n not in NOT_IN_RESOURCE])
def test_the_crd_bounds_are_the_declared_ones(name: str) -> None:
    crd_field = _crd_queue_item()["properties"][wire.snake_to_camel(name)]
    assert _crd_bounds(crd_field) == DECLARED[name], name
    if name in OBJECTS:
        assert crd_field["type"] == "object"
        camel = {wire.snake_to_camel(f) for f in OBJECTS[name].__struct_fields__}
        assert set(crd_field["properties"]) == camel, name
        return
    json_type = _value_schema(_schema_of(wire.QueueSettingsUpdate)["properties"][name])["type"]
    assert crd_field["type"] == json_type, name


@pytest.mark.parametrize("path", NESTED)
def test_the_crd_and_both_parsers_hold_the_declared_bounds_of_object_settings(path: str) -> None:
    setting, field = path.split(".")
    crd = _crd_queue_item()["properties"][wire.snake_to_camel(setting)]["properties"]
    crd_field = crd[wire.snake_to_camel(field)]
    assert _crd_bounds(crd_field) == NESTED[path], path
    served = openapi_document()["components"]["schemas"][OBJECTS[setting].__name__]
    assert _bounds(served["properties"][field]) == NESTED[path], path
    for value, accepted in _edges(NESTED[path]):
        body = {setting: {field: value}}
        spec = {
            "database": {"secretName": "db"},
            "queues": [
                {"name": "q", wire.snake_to_camel(setting): {wire.snake_to_camel(field): value}}
            ],
        }
        if accepted:
            assert getattr(parse_settings(json.dumps(body).encode())[setting], field) == value
            parsed = parse_spec("orders", "shop", spec).queues[0].settings[setting]
            assert getattr(parsed, field) == value
            continue
        with pytest.raises(ApiError) as refused:
            parse_settings(json.dumps(body).encode())
        assert refused.value.field == path, (value, refused.value.message)
        with pytest.raises(SpecError) as invalid:
            parse_spec("orders", "shop", spec)
        assert invalid.value.field.startswith("spec.queues[0]."), (value, invalid.value)


@pytest.mark.parametrize("name", SETTINGS)
def test_the_openapi_document_and_the_client_carry_the_declared_bounds(name: str) -> None:
    served = openapi_document()["components"]["schemas"]["QueueSettingsUpdate"]["properties"]
    assert _bounds(served[name]) == DECLARED[name], name
    # The client's settings type is the declaration itself, with nothing of its own.
    assert issubclass(models.QueueSettings, wire.QueueSettingsUpdate)
    assert models.QueueSettings.__struct_fields__ == SETTINGS
    client = _schema_of(models.QueueSettings)["properties"][name]
    assert _bounds(client) == DECLARED[name], name


def _edges(bounds: dict[str, Any]) -> list[tuple[float, bool]]:
    """(value, accepted) pairs at a numeric field's bounds."""
    edges: list[tuple[float, bool]] = []
    if "minimum" in bounds:
        edges += [(bounds["minimum"], True), (bounds["minimum"] - 1, False)]
    if "exclusiveMinimum" in bounds:
        low = bounds["exclusiveMinimum"]
        edges += [(low, False), (math.nextafter(low, math.inf), True)]
    if "maximum" in bounds:
        edges += [(bounds["maximum"], True), (bounds["maximum"] + 1, False)]
    return edges


NUMERIC = [n for n in SETTINGS if any(k in DECLARED[n] for k in ("minimum", "maximum"))]


@pytest.mark.parametrize("name", NUMERIC)
def test_the_server_and_the_operator_enforce_the_declared_bounds(name: str) -> None:
    edges = _edges(DECLARED[name])
    assert edges, name
    camel = wire.snake_to_camel(name)
    for value, accepted in edges:
        spec = {"database": {"secretName": "db"}, "queues": [{"name": "q", camel: value}]}
        if accepted:
            assert parse_settings(json.dumps({name: value}).encode()) == {name: value}
            assert parse_spec("orders", "shop", spec).queues[0].settings == {name: value}
            continue
        with pytest.raises(ApiError) as refused:
            parse_settings(json.dumps({name: value}).encode())
        assert refused.value.field == name, (value, refused.value.message)
        with pytest.raises(SpecError) as invalid:
            parse_spec("orders", "shop", spec)
        assert invalid.value.field == f"spec.queues[0].{camel}", (value, invalid.value)


def test_the_send_keywords_are_the_message_fields() -> None:
    """Every `send`/`enqueue` takes `target`, `body` and `**options: MessageOptions`."""
    assert ("target", "body", *models.MessageOptions.__annotations__) == (
        wire.MessageIn.__struct_fields__
    )
    hints = get_type_hints(models.MessageOptions)
    assert set(hints) == set(wire.MessageIn.__struct_fields__) - {"target", "body"}


def test_a_message_round_trips_between_client_and_server() -> None:
    message = models.NewMessage("http://a.example/", {"n": 1}, priority=3, dedup_key="d")
    decoded = msgspec.json.decode(msgspec.json.encode(message), type=wire.MessageIn)
    assert (decoded.target, decoded.body, decoded.priority, decoded.dedup_key) == (
        "http://a.example/",
        {"n": 1},
        3,
        "d",
    )
    assert models.NewMessage("http://a.example/").to_json() == {"target": "http://a.example/"}


def _old_shape(struct: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """The struct as declared before it left out its defaults: the same fields, types,
    defaults and `forbid_unknown_fields`, every field written on encode."""
    hints = get_type_hints(struct, include_extras=True)
    info = struct.__struct_config__
    fields: list[Any] = []
    given = struct.__struct_defaults__
    defaults = dict(zip(struct.__struct_fields__[len(struct.__struct_fields__) - len(given):],
                        given, strict=True))
    for name in struct.__struct_fields__:
        if name in defaults:
            fields.append((name, hints[name], defaults[name]))
        else:
            fields.append((name, hints[name]))
    old = msgspec.defstruct(
        struct.__name__, fields, forbid_unknown_fields=info.forbid_unknown_fields
    )
    assert not old.__struct_config__.omit_defaults
    return old


_LEASED = {
    "id": "42", "queue": "q", "attempt": 1, "max_attempts": 5, "target": "http://t/x",
    "method": "POST", "headers": {}, "body_json": "{}", "timeout_seconds": 30.0,
    "created_at": 1.5,
}


@pytest.mark.parametrize(
    ("struct", "given"),
    [
        (wire.Ack, {"id": "42", "attempt": 1, "outcome": "delivered", "queue": "q",
                    "duration_seconds": 0.01, "status": 200}),
        (wire.Ack, {"id": "42", "attempt": 3, "outcome": "retry", "error": "HTTP 503",
                    "retry_after": 2.0, "duration_seconds": 0.5, "queue": "q", "status": 503,
                    "response_excerpt": "busy"}),
        (wire.LeasedMessage, _LEASED),
        (wire.LeasedMessage, {**_LEASED, "ordering_key": "k", "explicitly_allowed": True}),
    ],
)
def test_acks_and_leased_messages_interoperate_with_the_shape_before_omit_defaults(
    struct: type[msgspec.Struct], given: dict[str, Any]
) -> None:
    """`Ack` and `LeasedMessage` leave fields at their default out of the JSON; carriers and
    servers from before write every field: each side reads the other's encoding."""
    old = _old_shape(struct)
    new_value = msgspec.convert(given, struct)
    old_value = msgspec.convert(given, old)
    new_bytes = msgspec.json.encode(new_value)
    old_bytes = msgspec.json.encode(old_value)
    # The old decoder (forbid_unknown_fields as before) reads the new encoding, and the
    # new decoder the old, to the same values.
    assert msgspec.json.decode(new_bytes, type=old) == old_value
    assert msgspec.json.decode(old_bytes, type=struct) == new_value
    # What is left out is exactly the fields at their default (`given` sets none to it).
    assert set(msgspec.json.decode(new_bytes)) == set(given)
    assert set(msgspec.json.decode(old_bytes)) == set(struct.__struct_fields__)
    assert len(new_bytes) <= len(old_bytes)


def test_a_typical_ack_is_shorter_and_unknown_fields_are_still_refused() -> None:
    ack = wire.Ack(id="42", attempt=1, outcome="delivered", queue="q",
                   duration_seconds=0.01, status=200)
    assert len(msgspec.json.encode(ack)) < len(msgspec.json.encode(_old_shape(wire.Ack)(
        id="42", attempt=1, outcome="delivered", queue="q",
        duration_seconds=0.01, status=200)))
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.json.decode(b'{"id":"1","attempt":1,"outcome":"delivered","x":1}', type=wire.Ack)
