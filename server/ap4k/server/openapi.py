"""The OpenAPI 3.1 document served at /openapi.json (schemathesis tests the server against it)."""

from __future__ import annotations

from functools import cache
from typing import Any

from ap4k.core import names
from ap4k.server.validation import (
    HEADER_NAME,
    MAX_ATTEMPTS_LIMIT,
    MAX_BATCH,
    MAX_DELAY_SECONDS,
    MAX_HEADERS,
    MAX_KEY_LENGTH,
    MAX_TARGET_LENGTH,
    MAX_TIMEOUT_SECONDS,
    METHODS,
    MIN_TIMEOUT_SECONDS,
    PRIORITY_LIMIT,
)

# The largest attempt number the carrier protocol accepts (api.py refuses more).
MAX_LEASE_ATTEMPT = 1_000_000

STATES = ["scheduled", "available", "running", "retryable", "completed", "discarded", "cancelled"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _responses(ok: tuple[str, dict[str, Any], str], *errors: str) -> dict[str, Any]:
    status, schema, description = ok
    out = {status: _json(schema, description)}
    texts = {
        "400": "Invalid request (the error names the field)",
        "401": "Missing or wrong bearer token",
        "404": "Not found",
        "409": "Conflict with the message's state",
        "413": "Request body too large",
        "503": "Database unavailable; retry",
    }
    for code in ("401", "503", *errors):
        out[code] = _error(texts[code])
    return out


QUEUE_PARAM = {
    "name": "queue",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": names.QUEUE_NAME_PATTERN},
}
ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}

NULLABLE_STRING = {"type": ["string", "null"]}
# What validation.py refuses in text, as JSON Schema patterns.
NO_CONTROLS = "^[^\\u0000-\\u001f\\u007f]*$"
NO_NUL = "^[^\\u0000]*$"
HEADER_VALUE = "^[^\\u0000-\\u0008\\u000a-\\u001f\\u007f]*$"
URL_PREFIX = "^https?://[^\\u0000-\\u001f\\u007f]+$"


def _schemas() -> dict[str, Any]:
    message_in = {
        "type": "object",
        "additionalProperties": False,
        "required": ["target"],
        "properties": {
            "target": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_TARGET_LENGTH,
                "pattern": NO_CONTROLS,
                "description": "http(s) URL, or a path joined to the queue's base_url",
            },
            "method": {"type": "string", "enum": sorted(METHODS), "default": "POST"},
            "headers": {
                "type": ["object", "null"],
                "maxProperties": MAX_HEADERS,
                "propertyNames": {"pattern": HEADER_NAME.pattern},
                "additionalProperties": {"type": "string", "pattern": HEADER_VALUE},
            },
            "body": {"description": "Any JSON value, delivered as the JSON request body"},
            "delay_seconds": {
                "type": ["number", "null"],
                "minimum": 0,
                "maximum": MAX_DELAY_SECONDS,
            },
            "not_before": {"type": ["string", "null"], "format": "date-time"},
            "priority": {
                "type": "integer",
                "minimum": -PRIORITY_LIMIT,
                "maximum": PRIORITY_LIMIT,
                "default": 0,
            },
            "dedup_key": {
                "type": ["string", "null"],
                "minLength": 1,
                "maxLength": MAX_KEY_LENGTH,
                "pattern": NO_NUL,
            },
            "ordering_key": {
                "type": ["string", "null"],
                "minLength": 1,
                "maxLength": MAX_KEY_LENGTH,
                "pattern": NO_NUL,
            },
            "max_attempts": {
                "type": ["integer", "null"],
                "minimum": 1,
                "maximum": MAX_ATTEMPTS_LIMIT,
            },
            "timeout_seconds": {
                "type": ["number", "null"],
                "minimum": MIN_TIMEOUT_SECONDS,
                "maximum": MAX_TIMEOUT_SECONDS,
            },
        },
        # One way to delay a message, not two.
        "not": {
            "required": ["delay_seconds", "not_before"],
            "properties": {
                "delay_seconds": {"type": "number"},
                "not_before": {"type": "string"},
            },
        },
        "examples": [
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
        ],
    }
    accepted = {
        "type": "object",
        "required": ["id", "state", "duplicate"],
        "properties": {
            "id": {"type": "string"},
            "state": {"type": "string", "enum": STATES},
            "duplicate": {"type": "boolean"},
        },
    }
    message = {
        "type": "object",
        "required": ["id", "queue", "state", "target", "method", "attempt", "created_at"],
        "properties": {
            "id": {"type": "string"},
            "queue": {"type": "string"},
            "state": {"type": "string", "enum": STATES},
            "target": {"type": "string"},
            "method": {"type": "string"},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "body": {},
            "priority": {"type": "integer"},
            "dedup_key": NULLABLE_STRING,
            "ordering_key": NULLABLE_STRING,
            "attempt": {"type": "integer", "minimum": 0},
            "max_attempts": {"type": ["integer", "null"]},
            "timeout_seconds": {"type": "number"},
            "last_error": NULLABLE_STRING,
            "created_at": {"type": "string", "format": "date-time"},
            "scheduled_at": {"type": ["string", "null"], "format": "date-time"},
            "attempted_at": {"type": ["string", "null"], "format": "date-time"},
            "finalized_at": {"type": ["string", "null"], "format": "date-time"},
        },
    }
    settings_props: dict[str, Any] = {
        "max_attempts": {"type": "integer", "minimum": 1, "maximum": MAX_ATTEMPTS_LIMIT},
        "min_backoff_seconds": {"type": "number", "minimum": 0, "maximum": 86400},
        "max_backoff_seconds": {"type": "number", "minimum": 0, "maximum": 86400},
        "rate_limit_per_second": {
            "type": ["number", "null"],
            "exclusiveMinimum": 0,
            "maximum": 1e6,
        },
        "max_concurrency": {"type": ["integer", "null"], "minimum": 1, "maximum": 1_000_000},
        "paused": {"type": "boolean"},
        "base_url": {"type": ["string", "null"], "pattern": URL_PREFIX},
        "allowed_targets": {
            "type": ["array", "null"],
            "maxItems": 100,
            "items": {"type": "string", "pattern": URL_PREFIX},
        },
    }
    settings_in = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            **settings_props,
            "signing_secret": {
                "type": ["string", "null"],
                "minLength": 1,
                "maxLength": 256,
                "pattern": NO_NUL,
            },
        },
    }
    settings_out = {
        "type": "object",
        "properties": {
            **settings_props,
            "allowed_targets": {"type": "array", "items": {"type": "string"}},
            "signing_secret_set": {"type": "boolean"},
        },
    }
    depth = {
        "type": "object",
        "properties": {
            s: {"type": "integer", "minimum": 0}
            for s in ("available", "scheduled", "running", "retryable", "discarded")
        },
    }
    queue = {
        "type": "object",
        "required": ["name", "depth", "oldest_available_age_seconds", "settings"],
        "properties": {
            "name": {"type": "string"},
            "depth": depth,
            "oldest_available_age_seconds": {"type": "number", "minimum": 0},
            "settings": settings_out,
        },
    }
    error = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "field": NULLABLE_STRING,
                },
            }
        },
    }
    lease_ref = {
        "type": "object",
        "required": ["id", "attempt"],
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9]{1,18}$"},
            "attempt": {"type": "integer", "minimum": 1, "maximum": MAX_LEASE_ATTEMPT},
        },
    }
    carrier = {"type": "string", "minLength": 1, "maxLength": 200}
    return {
        "MessageIn": message_in,
        "Batch": {
            "type": "object",
            "additionalProperties": False,
            "required": ["messages"],
            "properties": {
                "messages": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_BATCH,
                    "items": _ref("MessageIn"),
                }
            },
        },
        "Accepted": accepted,
        "BatchAccepted": {
            "type": "object",
            "required": ["messages"],
            "properties": {"messages": {"type": "array", "items": _ref("Accepted")}},
        },
        "Message": message,
        "QueueSettings": settings_in,
        "Queue": queue,
        "Error": error,
        "LeaseRef": lease_ref,
        "LeaseRequest": {
            "type": "object",
            "additionalProperties": False,
            "required": ["carrier"],
            "properties": {
                "carrier": carrier,
                "max_messages": {"type": "integer", "minimum": 1, "maximum": 1000},
                "queues": {"type": "array", "items": {"type": "string"}},
                "wait_seconds": {"type": "number", "minimum": 0, "maximum": 60},
                "lease_seconds": {"type": "number", "minimum": 1, "maximum": 3600},
            },
        },
        "LeasedMessage": {
            "type": "object",
            "required": [
                "id",
                "queue",
                "attempt",
                "target",
                "method",
                "headers",
                "body_json",
                "timeout_seconds",
                "created_at",
            ],
            "properties": {
                "id": {"type": "string", "pattern": "^[0-9]{1,19}$"},
                "queue": {"type": "string"},
                "attempt": {"type": "integer", "minimum": 1},
                "max_attempts": {"type": "integer", "minimum": 1},
                "target": {"type": "string"},
                "method": {"type": "string", "enum": sorted(METHODS)},
                "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                "body_json": {
                    "type": ["string", "null"],
                    "description": "The body as stored JSON text: the exact bytes to send",
                },
                "timeout_seconds": {"type": "number", "exclusiveMinimum": 0},
                "created_at": {"type": "number", "description": "Enqueue time, epoch seconds"},
                "ordering_key": NULLABLE_STRING,
                "explicitly_allowed": {"type": "boolean"},
            },
        },
        "Leased": {
            "type": "object",
            "required": ["messages", "signing_secrets"],
            "properties": {
                "messages": {"type": "array", "items": _ref("LeasedMessage")},
                "signing_secrets": {
                    "type": "object",
                    "description": "Each leased queue's signing secret, by queue name",
                    "additionalProperties": {"type": "string"},
                },
            },
        },
        "AckRequest": {
            "type": "object",
            "required": ["carrier", "acks"],
            "properties": {
                "carrier": carrier,
                "acks": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "attempt", "outcome"],
                        "properties": {
                            "id": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                            "attempt": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_LEASE_ATTEMPT,
                            },
                            "outcome": {"type": "string", "enum": ["delivered", "retry", "fail"]},
                            "error": NULLABLE_STRING,
                            "retry_after": {
                                "type": ["number", "null"],
                                "minimum": 0,
                                "maximum": 86400,
                            },
                            "duration_seconds": {"type": ["number", "null"], "minimum": 0},
                            "queue": {"type": "string"},
                        },
                    },
                },
            },
        },
        "LeaseList": {
            "type": "object",
            "required": ["carrier", "leases"],
            "properties": {
                "carrier": carrier,
                "leases": {"type": "array", "items": _ref("LeaseRef")},
                "lease_seconds": {"type": "number", "minimum": 1, "maximum": 3600},
            },
        },
        "LeaseRelease": {
            "type": "object",
            "required": ["carrier", "leases"],
            "properties": {
                "carrier": carrier,
                "leases": {"type": "array", "items": _ref("LeaseRef")},
            },
        },
    }


def body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


@cache
def openapi_document() -> dict[str, Any]:
    ids_body = {
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "type": ["object", "null"],
                    "additionalProperties": False,
                    "properties": {
                        "ids": {
                            "type": ["array", "null"],
                            "maxItems": 10_000,
                            "items": {
                                "oneOf": [
                                    {"type": "string", "pattern": "^[0-9]{1,18}$"},
                                    {"type": "integer", "minimum": 0},
                                ]
                            },
                        }
                    },
                }
            }
        },
    }
    paths: dict[str, Any] = {
        "/v1/queues/{queue}/messages": {
            "post": {
                "operationId": "enqueue",
                "summary": "Enqueue one message, or a batch of up to 1,000",
                "parameters": [QUEUE_PARAM],
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
                        {"oneOf": [_ref("Accepted"), _ref("BatchAccepted")]},
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
                "responses": _responses(("200", _ref("Message"), "The message"), "404"),
            },
            "delete": {
                "operationId": "cancelMessage",
                "parameters": [ID_PARAM],
                "responses": _responses(
                    (
                        "200",
                        {
                            "type": "object",
                            "required": ["id", "state"],
                            "properties": {
                                "id": {"type": "string"},
                                "state": {"const": "cancelled"},
                            },
                        },
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
                        {
                            "type": "object",
                            "required": ["queues"],
                            "properties": {"queues": {"type": "array", "items": _ref("Queue")}},
                        },
                        "Every queue with its depth and settings",
                    ),
                ),
            }
        },
        "/v1/queues/{queue}": {
            "get": {
                "operationId": "getQueue",
                "parameters": [QUEUE_PARAM],
                "responses": _responses(("200", _ref("Queue"), "The queue"), "400", "404"),
            },
            "put": {
                "operationId": "putQueue",
                "parameters": [QUEUE_PARAM],
                "requestBody": body("QueueSettings"),
                "responses": _responses(("200", _ref("Queue"), "The queue, updated"), "400", "413"),
            },
        },
        "/v1/queues/{queue}/dead": {
            "get": {
                "operationId": "listDead",
                "parameters": [
                    QUEUE_PARAM,
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                    {
                        "name": "after",
                        "in": "query",
                        "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                    },
                ],
                "responses": _responses(
                    (
                        "200",
                        {
                            "type": "object",
                            "required": ["messages", "next"],
                            "properties": {
                                "messages": {"type": "array", "items": _ref("Message")},
                                "next": NULLABLE_STRING,
                            },
                        },
                        "A page of dead letters",
                    ),
                    "400",
                    "404",
                ),
            },
            "delete": {
                "operationId": "purgeDead",
                "parameters": [QUEUE_PARAM],
                "responses": _responses(
                    (
                        "200",
                        {
                            "type": "object",
                            "required": ["purged"],
                            "properties": {"purged": {"type": "integer"}},
                        },
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
                        {
                            "type": "object",
                            "required": ["redriven"],
                            "properties": {"redriven": {"type": "integer"}},
                        },
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
                "requestBody": body("LeaseList"),
                "responses": _responses(
                    (
                        "200",
                        {
                            "type": "object",
                            "required": ["extended", "refused"],
                            "properties": {
                                "extended": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["id", "lease_expires_at"],
                                        "properties": {
                                            "id": {"type": "string"},
                                            "lease_expires_at": {
                                                "type": "string",
                                                "format": "date-time",
                                            },
                                        },
                                    },
                                },
                                "refused": {"type": "array", "items": {"type": "string"}},
                            },
                        },
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
                "requestBody": body("LeaseRelease"),
                "responses": _responses(
                    (
                        "200",
                        {
                            "type": "object",
                            "required": ["released"],
                            "properties": {
                                "released": {"type": "array", "items": {"type": "string"}}
                            },
                        },
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
                        {
                            "type": "object",
                            "required": ["accepted", "refused"],
                            "properties": {
                                "accepted": {"type": "array", "items": {"type": "string"}},
                                "refused": {"type": "array", "items": {"type": "string"}},
                            },
                        },
                        "Which outcomes were recorded; stale or foreign leases are refused",
                    ),
                    "400",
                    "413",
                ),
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
