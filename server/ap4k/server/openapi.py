"""The OpenAPI 3.1 document served at /openapi.json (schemathesis tests the server against it).

The schemas are generated from the wire objects (`ap4k.core.wire`, msgspec's JSON Schema
output, which is OpenAPI 3.1's dialect); this module only lays out the paths around them.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import msgspec

from ap4k.core import wire


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("ErrorBody"), description)


def _responses(ok: tuple[str, dict[str, Any], str], *errors: str) -> dict[str, Any]:
    status, schema, description = ok
    out = {status: _json(schema, description)}
    texts = {
        "400": "Invalid request (the error names the field)",
        "401": "Missing or wrong bearer token",
        "404": "Not found",
        "409": "Conflict with the message's or the queue's state",
        "413": "Request body too large",
        "503": "Database unavailable; retry",
    }
    for code in ("401", "503", *errors):
        out[code] = _error(texts[code])
    return out


def _name_param(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": wire.QUEUE_NAME_PATTERN},
    }


def _named_resource(
    collection: str, param: str, kind: str, what: str
) -> dict[str, Any]:
    """The paths of a resource kept by name: list it all, put, get and delete one."""
    parameters = [_name_param(param)]
    view = _ref(f"{kind}View")
    return {
        f"/v1/{collection}": {
            "get": {
                "operationId": f"list{kind}s",
                "responses": _responses(("200", _ref(f"{kind}List"), f"Every {kind.lower()}")),
            }
        },
        f"/v1/{collection}/{{{param}}}": {
            "put": {
                "operationId": f"put{kind}",
                "summary": f"Create or replace {what}",
                "parameters": parameters,
                "requestBody": body(f"{kind}In"),
                "responses": _responses(("200", view, f"The {kind.lower()}"), "400", "413"),
            },
            "get": {
                "operationId": f"get{kind}",
                "parameters": parameters,
                "responses": _responses(("200", view, f"The {kind.lower()}"), "400", "404"),
            },
            "delete": {
                "operationId": f"delete{kind}",
                "parameters": parameters,
                "responses": _responses(("200", _ref("Deleted"), "Deleted"), "400", "404"),
            },
        },
    }


QUEUE_PARAM = {
    "name": "queue",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": wire.QUEUE_NAME_PATTERN},
}
PAGE_LIMIT = {
    "name": "limit",
    "in": "query",
    "schema": {"type": "integer", "minimum": 1, "maximum": wire.MAX_PAGE},
}
PAGE_AFTER = {
    "name": "after",
    "in": "query",
    "description": "the `next` of the previous page",
    "schema": {"type": "string", "pattern": wire.MESSAGE_ID_PATTERN},
}
ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}

# Every body the API takes or gives; their components come along.
WIRE_OBJECTS: tuple[type[msgspec.Struct], ...] = (
    wire.MessageIn,
    wire.Batch,
    wire.Enqueued,
    wire.BatchEnqueued,
    wire.MessageView,
    wire.MessageDetail,
    wire.Cancelled,
    wire.MessagePage,
    wire.IdList,
    wire.Redriven,
    wire.Purged,
    wire.QueueSettingsUpdate,
    wire.QueueView,
    wire.QueueList,
    wire.Throughput,
    wire.LeaseRequest,
    wire.Leased,
    wire.AckRequest,
    wire.AckResult,
    wire.ExtendRequest,
    wire.Extended,
    wire.ReleaseRequest,
    wire.Released,
    wire.ScheduleIn,
    wire.ScheduleView,
    wire.ScheduleList,
    wire.Deleted,
    wire.TopicIn,
    wire.TopicView,
    wire.TopicList,
    wire.PublishedMessage,
    wire.Published,
    wire.CallbackBody,
    wire.CircuitList,
    wire.FlowKeyList,
    wire.NewSigningSecret,
    wire.SigningSecretsCount,
    wire.ErrorBody,
)


def _schemas() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        WIRE_OBJECTS, ref_template="#/components/schemas/{name}"
    )
    message_in = components["MessageIn"]
    # What a type cannot say: one way to delay a message, not two; a target where one is
    # needed, none where the subscriptions name them (wire.MessageBase says why the type
    # has it optional).
    for name in ("MessageIn", "PublishedMessage"):
        components[name]["not"] = {
            "required": ["delay_seconds", "not_before"],
            "properties": {
                "delay_seconds": {"type": "number"},
                "not_before": {"type": "string"},
            },
        }
    for name in ("MessageIn", "ScheduledMessage"):
        components[name]["required"] = ["target"]
    del components["PublishedMessage"]["properties"]["target"]
    message_in["examples"] = [
        {"target": "https://example.com/hooks/order", "body": {"order": 42}},
        {
            "target": "https://example.com/hooks/invoice",
            "method": "PUT",
            "headers": {"X-Tenant": "acme"},
            "body": {"invoice": 7},
            "delay_seconds": 60,
            "priority": 5,
            "dedup_key": "invoice-7",
            "ordering_key": "acme",
            "max_attempts": 10,
            "timeout_seconds": 5,
        },
    ]
    for name in ("Enqueued", "MessageView", "MessageDetail"):
        components[name]["properties"]["state"]["enum"] = list(wire.STATES)
    return dict(components)


def body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


# What ap4k POSTs to a message's callback (delivered) and failure_callback (dead letter).
CALLBACKS = {
    name: {
        f"{{$request.body#/{field}}}": {
            "post": {
                "requestBody": body("CallbackBody"),
                "responses": {"200": {"description": "Any 2xx; other answers are retried"}},
            }
        }
    }
    for name, field in (("delivered", "callback"), ("deadLettered", "failure_callback"))
}


@cache
def openapi_document() -> dict[str, Any]:
    ids_body = {
        "required": False,
        "content": {"application/json": {"schema": _ref("IdList")}},
    }
    paths: dict[str, Any] = {
        "/v1/queues/{queue}/messages": {
            "get": {
                "operationId": "listMessages",
                "summary": "Browse a queue's messages in any state, paged by id",
                "parameters": [
                    QUEUE_PARAM,
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"type": "string", "enum": list(wire.STATES)},
                    },
                    {
                        "name": "order",
                        "in": "query",
                        "description": "newest (the default) or oldest first",
                        "schema": {"type": "string", "enum": ["newest", "oldest"]},
                    },
                    {
                        "name": "dedup_key",
                        "in": "query",
                        "description": "only the message with this dedup key",
                        "schema": {
                            "type": "string",
                            "maxLength": wire.MAX_KEY_LENGTH,
                            "pattern": wire.NO_NUL,
                        },
                    },
                    PAGE_LIMIT,
                    PAGE_AFTER,
                ],
                "responses": _responses(
                    ("200", _ref("MessagePage"), "A page of messages"), "400", "404"
                ),
            },
            "post": {
                "operationId": "enqueue",
                "summary": "Enqueue one message, or a batch of up to 1,000",
                "parameters": [QUEUE_PARAM],
                "callbacks": CALLBACKS,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"oneOf": [_ref("MessageIn"), _ref("Batch")]}
                        }
                    },
                },
                "responses": _responses(
                    (
                        "202",
                        {"oneOf": [_ref("Enqueued"), _ref("BatchEnqueued")]},
                        "Committed to the database",
                    ),
                    "400",
                    "413",
                ),
            }
        },
        "/v1/messages/{id}": {
            "get": {
                "operationId": "getMessage",
                "parameters": [ID_PARAM],
                "responses": _responses(
                    ("200", _ref("MessageDetail"), "The message and its attempts, oldest first"),
                    "404",
                ),
            },
            "delete": {
                "operationId": "cancelMessage",
                "parameters": [ID_PARAM],
                "responses": _responses(
                    (
                        "200",
                        _ref("Cancelled"),
                        "Cancelled",
                    ),
                    "404",
                    "409",
                ),
            },
        },
        "/v1/queues": {
            "get": {
                "operationId": "listQueues",
                "responses": _responses(
                    (
                        "200",
                        _ref("QueueList"),
                        "Every queue with its depth and settings",
                    ),
                ),
            }
        },
        "/v1/throughput": {
            "get": {
                "operationId": "getThroughput",
                "parameters": [{
                    "name": "seconds", "in": "query", "required": False,
                    "schema": {"type": "number", "exclusiveMinimum": 0,
                               "maximum": wire.MAX_THROUGHPUT_WINDOW, "default": 60},
                }],
                "responses": _responses(
                    (
                        "200",
                        _ref("Throughput"),
                        "Messages delivered per queue over the last `seconds`, counted in "
                        "PostgreSQL (once across server replicas); queues with none are left "
                        "out",
                    ),
                    "400",
                ),
            }
        },
        "/v1/queues/{queue}": {
            "get": {
                "operationId": "getQueue",
                "parameters": [QUEUE_PARAM],
                "responses": _responses(("200", _ref("QueueView"), "The queue"), "400", "404"),
            },
            "put": {
                "operationId": "putQueue",
                "parameters": [QUEUE_PARAM],
                "requestBody": body("QueueSettingsUpdate"),
                "responses": _responses(
                    ("200", _ref("QueueView"), "The queue, updated"), "400", "413"
                ),
            },
        },
        "/v1/queues/{queue}/signing-secrets": {
            "post": {
                "operationId": "addSigningSecret",
                "summary": "Generate a Standard Webhooks secret and add it (shown this once)",
                "parameters": [QUEUE_PARAM],
                "responses": _responses(
                    ("201", _ref("NewSigningSecret"), "The new secret"), "400", "409"
                ),
            }
        },
        "/v1/queues/{queue}/signing-secrets/oldest": {
            "delete": {
                "operationId": "dropOldestSigningSecret",
                "summary": "Drop the oldest signing secret (the end of a rotation)",
                "parameters": [QUEUE_PARAM],
                "responses": _responses(
                    ("200", _ref("SigningSecretsCount"), "How many secrets remain"), "400", "404"
                ),
            }
        },
        "/v1/queues/{queue}/circuits": {
            "get": {
                "operationId": "listCircuits",
                "summary": "Target origins whose circuit is open or half-open",
                "parameters": [QUEUE_PARAM],
                "responses": _responses(
                    ("200", _ref("CircuitList"), "Open and half-open circuits"), "400", "404"
                ),
            }
        },
        "/v1/queues/{queue}/flow-keys": {
            "get": {
                "operationId": "listFlowKeys",
                "summary": "The busiest flow keys: in flight, then waiting",
                "parameters": [
                    QUEUE_PARAM,
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": wire.MAX_PAGE},
                    },
                ],
                "responses": _responses(
                    ("200", _ref("FlowKeyList"), "Flow keys with their counts"), "400", "404"
                ),
            }
        },
        "/v1/queues/{queue}/dead": {
            "get": {
                "operationId": "listDead",
                "parameters": [QUEUE_PARAM, PAGE_LIMIT, PAGE_AFTER],
                "responses": _responses(
                    (
                        "200",
                        _ref("MessagePage"),
                        "A page of dead letters, oldest first",
                    ),
                    "400",
                    "404",
                ),
            },
            "delete": {
                "operationId": "purgeDead",
                "summary": "Delete the dead letters for good: all, or those of the ids given",
                "parameters": [QUEUE_PARAM],
                "requestBody": ids_body,
                "responses": _responses(
                    (
                        "200",
                        _ref("Purged"),
                        "Purged",
                    ),
                    "400",
                    "404",
                ),
            },
        },
        "/v1/queues/{queue}/dead/redrive": {
            "post": {
                "operationId": "redriveDead",
                "parameters": [QUEUE_PARAM],
                "requestBody": ids_body,
                "responses": _responses(
                    (
                        "200",
                        _ref("Redriven"),
                        "Redriven",
                    ),
                    "400",
                    "404",
                    "413",
                ),
            }
        },
        "/v1/leases": {
            "post": {
                "operationId": "lease",
                "summary": "Carrier protocol: lease messages (long-polls up to wait_seconds)",
                "requestBody": body("LeaseRequest"),
                "responses": _responses(("200", _ref("Leased"), "Leased messages"), "400", "413"),
            }
        },
        "/v1/leases/extend": {
            "post": {
                "operationId": "extendLeases",
                "requestBody": body("ExtendRequest"),
                "responses": _responses(
                    (
                        "200",
                        _ref("Extended"),
                        "Which leases were extended; expired or foreign ones are refused",
                    ),
                    "400",
                    "413",
                ),
            }
        },
        "/v1/leases/release": {
            "post": {
                "operationId": "releaseLeases",
                "requestBody": body("ReleaseRequest"),
                "responses": _responses(
                    (
                        "200",
                        _ref("Released"),
                        "The leases given back; the messages are available again",
                    ),
                    "400",
                    "413",
                ),
            }
        },
        "/v1/acks": {
            "post": {
                "operationId": "ack",
                "requestBody": body("AckRequest"),
                "responses": _responses(
                    (
                        "200",
                        _ref("AckResult"),
                        "Which outcomes were recorded; stale or foreign leases are refused",
                    ),
                    "400",
                    "413",
                ),
            }
        },
        **_named_resource("schedules", "name", "Schedule", "a recurring schedule"),
        **_named_resource("topics", "topic", "Topic", "a fan-out topic and its subscriptions"),
        "/v1/topics/{topic}/messages": {
            "post": {
                "operationId": "publish",
                "summary": "Publish a message: one message per subscription, in one transaction",
                "parameters": [_name_param("topic")],
                "requestBody": body("PublishedMessage"),
                "responses": _responses(
                    ("202", _ref("Published"), "Committed: one message per subscription"),
                    "400",
                    "404",
                    "413",
                ),
                "callbacks": CALLBACKS,
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ap4k",
            "version": "1",
            "description": "Asynchronous processing for Kubernetes",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }
