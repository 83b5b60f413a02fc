"""Bad input gets a clear 4xx with the JSON error body, and stores nothing.

Most cases run as one table against one server (a module fixture: each case checks that it
left the database as it found it, so the cases cannot disturb each other). Cases that need a
message in a particular state, a token, or a smaller body limit have their own tests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest

from ap4k.core import wire
from ap4k.core.embedded_pg import EmbeddedPostgres
from ap4k.server import validation
from ap4k.server.errors import ApiError
from ap4k.server.validation import parse_id
from ap4k_testkit import (
    Api,
    StartServer,
    count_rows,
    create_database,
    sink,
    undelivering_server,
)

OK_TARGET = "http://127.0.0.1:9/hook"  # never called: no case here is ever stored
NO_BODY = object()
LONG_KEY = "k" * 257


@dataclass(frozen=True)
class Shared:
    api: Api
    database_url: str


@pytest.fixture(scope="module")
async def shared(postgres: EmbeddedPostgres) -> AsyncIterator[Shared]:
    """One server for the table, with the queues the cases refer to."""
    database_url = await create_database(postgres.url, prefix="bad")
    async with undelivering_server(database_url) as api:
        await api.settings("existing")
        await api.settings("guarded", allowed_targets=["https://allowed.example/"])
        await api.settings("based", base_url="http://127.0.0.1:9/base/")
        yield Shared(api, database_url)


async def table_counts(database_url: str) -> tuple[int, int]:
    messages = await count_rows(database_url, "SELECT count(*) FROM ap4k_messages")
    queues = await count_rows(database_url, "SELECT count(*) FROM ap4k_queues")
    return messages, queues


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    body: Any  # JSON to send; `bytes` are sent raw; NO_BODY sends nothing
    status: int
    code: str
    field: str | None


def msg(**fields: Any) -> dict[str, Any]:
    """A valid message, with `fields` changed (a value of NO_BODY removes the field)."""
    message: dict[str, Any] = {"target": OK_TARGET, "body": {"n": 1}}
    message.update(fields)
    return {k: v for k, v in message.items() if v is not NO_BODY}


def nested(depth: int, open_: str = "[", close: str = "]") -> bytes:
    """JSON nested `depth` levels deep: [[[...1...]]]."""
    return (open_ * depth + "1" + close * depth).encode()


def raw_message(body: bytes) -> bytes:
    """A valid message whose body is the JSON text `body`, as raw bytes."""
    return b'{"target": "' + OK_TARGET.encode() + b'", "body": ' + body + b"}"


def enqueue(id: str, body: Any, field: str | None, code: str = "invalid_field") -> Case:
    return Case(id, "POST", "/v1/queues/fresh/messages", body, 400, code, field)


def refused_target(id: str, target: str, queue: str = "fresh") -> Case:
    path = f"/v1/queues/{queue}/messages"
    return Case(id, "POST", path, msg(target=target), 400, "target_not_allowed", "target")


def setting(id: str, body: Any, field: str | None) -> Case:
    # A queue that does not exist yet: a refused PUT must not create it either.
    return Case(id, "PUT", "/v1/queues/unborn", body, 400, "invalid_field", field)


def carrier(id: str, path: str, body: Any, field: str | None, code: str = "invalid_field") -> Case:
    return Case(id, "POST", path, body, 400, code, field)


ACK = {"id": "1", "attempt": 1, "outcome": "delivered"}
LEASE = {"id": "1", "attempt": 1}

CASES = [
    # -- the body as a whole
    enqueue("malformed-json", b'{"target": ', None, "malformed_json"),
    enqueue("empty-body", b"", None, "malformed_json"),
    enqueue("blank-body", b"  \n ", None, "malformed_json"),
    enqueue(
        "nan-is-not-json", b'{"target": "http://a/", "delay_seconds": NaN}', None, "malformed_json"
    ),
    enqueue("lone-surrogate", b'{"target": "http://a/\\ud800"}', None, "malformed_json"),
    enqueue("array-body", [OK_TARGET], "body"),
    enqueue("string-body", "http://a/", "body"),
    enqueue("null-body", b"null", "body"),
    enqueue("unknown-field", msg(tagret="http://a/"), "tagret"),
    # -- target
    enqueue("target-missing", msg(target=NO_BODY), "target"),
    enqueue("target-number", msg(target=5), "target"),
    enqueue("target-empty", msg(target=""), "target"),
    enqueue("target-too-long", msg(target="http://a/" + "x" * 4100), "target"),
    enqueue("target-crlf", msg(target="http://a/x\r\nX-Injected: 1"), "target"),
    enqueue("target-nul", msg(target="http://a/\x00"), "target"),
    enqueue("target-bad-port", msg(target="http://example.com:99999/x"), "target"),
    enqueue("target-unclosed-ipv6", msg(target="http://[::1/x"), "target"),
    # -- method
    enqueue("method-number", msg(method=5), "method"),
    enqueue("method-unknown", msg(method="TRACE"), "method"),
    enqueue("method-empty", msg(method=""), "method"),
    # -- headers
    enqueue("headers-array", msg(headers=["X-A: 1"]), "headers"),
    enqueue("headers-value-number", msg(headers={"X-A": 1}), "headers"),
    enqueue("headers-reserved-host", msg(headers={"Host": "evil.example"}), "headers"),
    enqueue("headers-reserved-length", msg(headers={"Content-Length": "1"}), "headers"),
    enqueue("headers-reserved-ap4k", msg(headers={"Ap4k-Message-Id": "1"}), "headers"),
    enqueue("headers-crlf", msg(headers={"X-A": "1\r\nX-Injected: 1"}), "headers"),
    enqueue("headers-nul", msg(headers={"X-A": "1\x00"}), "headers"),
    enqueue("headers-bad-name", msg(headers={"X A": "1"}), "headers"),
    enqueue("headers-name-newline", msg(headers={"X-A\n": "1"}), "headers"),
    enqueue("headers-too-many", msg(headers={f"X-{i}": "v" for i in range(65)}), "headers"),
    # Name and value over the 8,190 bytes an aiohttp target (or ap4k itself) would refuse.
    enqueue("headers-value-1-mb", msg(headers={"X-Big": "v" * 1_000_000}), "headers"),
    enqueue("headers-field-8191-bytes", msg(headers={"X-A": "v" * 8188}), "headers"),
    enqueue("headers-field-multibyte", msg(headers={"X-A": "\u00e9" * 4094}), "headers"),
    # -- delay_seconds / not_before
    enqueue("delay-string", msg(delay_seconds="5"), "delay_seconds"),
    enqueue("delay-negative", msg(delay_seconds=-1), "delay_seconds"),
    enqueue("delay-over-a-year", msg(delay_seconds=366 * 86400), "delay_seconds"),
    enqueue("delay-bool", msg(delay_seconds=True), "delay_seconds"),
    enqueue("not-before-number", msg(not_before=1893456000), "not_before"),
    enqueue("not-before-words", msg(not_before="tomorrow"), "not_before"),
    enqueue("not-before-no-zone", msg(not_before="2030-01-01T00:00:00"), "not_before"),
    enqueue("not-before-far-future", msg(not_before="9999-01-01T00:00:00Z"), "not_before"),
    enqueue("not-before-off-calendar", msg(not_before="0001-01-01T00:00:00+14:00"), "not_before"),
    enqueue(
        "delay-and-not-before",
        msg(delay_seconds=5, not_before="2030-01-01T00:00:00Z"),
        "delay_seconds",
    ),
    # -- priority
    enqueue("priority-too-high", msg(priority=1001), "priority"),
    enqueue("priority-too-low", msg(priority=-1001), "priority"),
    enqueue("priority-string", msg(priority="1"), "priority"),
    enqueue("priority-bool", msg(priority=True), "priority"),
    enqueue("priority-fraction", msg(priority=1.5), "priority"),
    # -- dedup_key / ordering_key
    enqueue("dedup-empty", msg(dedup_key=""), "dedup_key"),
    enqueue("dedup-too-long", msg(dedup_key=LONG_KEY), "dedup_key"),
    enqueue("dedup-number", msg(dedup_key=5), "dedup_key"),
    enqueue("dedup-nul", msg(dedup_key="a\x00b"), "dedup_key"),
    enqueue("ordering-empty", msg(ordering_key=""), "ordering_key"),
    enqueue("ordering-too-long", msg(ordering_key=LONG_KEY), "ordering_key"),
    enqueue("ordering-object", msg(ordering_key={"k": 1}), "ordering_key"),
    # -- max_attempts / timeout_seconds
    enqueue("max-attempts-zero", msg(max_attempts=0), "max_attempts"),
    enqueue("max-attempts-too-many", msg(max_attempts=1001), "max_attempts"),
    enqueue("max-attempts-string", msg(max_attempts="3"), "max_attempts"),
    enqueue("max-attempts-bool", msg(max_attempts=True), "max_attempts"),
    enqueue("max-attempts-fraction", msg(max_attempts=2.5), "max_attempts"),
    enqueue("timeout-zero", msg(timeout_seconds=0), "timeout_seconds"),
    enqueue("timeout-negative", msg(timeout_seconds=-1), "timeout_seconds"),
    enqueue("timeout-underflow", msg(timeout_seconds=1e-300), "timeout_seconds"),
    enqueue("timeout-too-long", msg(timeout_seconds=1801), "timeout_seconds"),
    enqueue("timeout-string", msg(timeout_seconds="5"), "timeout_seconds"),
    enqueue("timeout-bool", msg(timeout_seconds=True), "timeout_seconds"),
    # -- bodies nested deeper than MAX_BODY_DEPTH (500), or than the JSON reader goes at all
    enqueue("body-nested-501", raw_message(nested(501)), "body"),
    enqueue("body-nested-objects-600", raw_message(nested(600, '{"a":', "}")), "body"),
    enqueue("body-nested-1000", raw_message(nested(1000)), "body"),
    enqueue("body-nested-5000", raw_message(nested(5000)), "body"),
    enqueue(
        "batch-one-nested-body",
        b'{"messages": [' + raw_message(b"1") + b", " + raw_message(nested(600)) + b"]}",
        "messages[1].body",
    ),
    # -- batches: one bad message refuses the whole batch
    enqueue("batch-empty", {"messages": []}, "messages"),
    enqueue("batch-not-array", {"messages": msg()}, "messages"),
    enqueue("batch-over-1000", {"messages": [msg() for _ in range(1001)]}, "messages"),
    enqueue("batch-extra-field", {"messages": [msg()], "queue": "x"}, "queue"),
    enqueue("batch-item-not-object", {"messages": [msg(), "x"]}, "messages[1]"),
    enqueue(
        "batch-one-bad-priority",
        {"messages": [msg(), msg(), msg(priority=5000), msg()]},
        "messages[2].priority",
    ),
    enqueue(
        "batch-one-bad-target",
        {"messages": [msg(), msg(target="http://169.254.169.254/"), msg()]},
        "messages[1].target",
        "target_not_allowed",
    ),
    enqueue(
        "batch-one-target-with-controls",
        {"messages": [msg(), msg(target="http://a/\x01"), msg()]},
        "messages[1].target",
    ),
    enqueue(
        "batch-one-callback-with-controls",
        {"messages": [msg(), msg(callback="http://b/\x7f")]},
        "messages[1].callback",
    ),
    enqueue("failure-callback-crlf", msg(failure_callback="http://b/\r\nX: 1"), "failure_callback"),
    enqueue(
        "batch-one-callback-not-allowed",
        {"messages": [msg(), msg(), msg(callback="http://169.254.169.254/")]},
        "messages[2].callback",
        "target_not_allowed",
    ),
    enqueue(
        "batch-one-failure-callback-not-allowed",
        {"messages": [msg(), msg(failure_callback="http://[fe80::1]/"), msg()]},
        "messages[1].failure_callback",
        "target_not_allowed",
    ),
    # -- targets the queue may not reach
    refused_target("metadata-ipv4", "http://169.254.169.254/latest/meta-data/"),
    refused_target("link-local-ipv4", "http://169.254.1.1:8080/x"),
    refused_target("link-local-ipv6", "http://[fe80::1]/x"),
    refused_target("metadata-ipv4-mapped", "http://[::ffff:169.254.169.254]/x"),
    refused_target("metadata-google", "http://metadata.google.internal/computeMetadata/v1/"),
    refused_target("metadata-google-upper", "http://METADATA.GOOGLE.INTERNAL/x"),
    # The same hosts in the spellings the socket layer also reads (inet_aton, a trailing
    # dot, IPv4 inside IPv6, IDNA), and the unspecified addresses that reach this host.
    refused_target("metadata-decimal-integer", "http://2852039166/latest/meta-data/"),
    refused_target("metadata-octal", "http://0251.0376.0251.0376/x"),
    refused_target("metadata-two-parts-short", "http://169.254.43518/x"),
    refused_target("metadata-three-parts-short", "http://169.254.0xa9fe/x"),
    refused_target("metadata-hex-integer", "http://0xa9fea9fe/x"),
    refused_target("metadata-hex-dotted", "http://0xa9.0xfe.0xa9.0xfe/x"),
    refused_target("metadata-trailing-dot", "http://169.254.169.254./x"),
    refused_target("metadata-port-and-dot", "http://169.254.169.254.:80/x"),
    refused_target("metadata-ipv4-mapped-hex", "http://[::ffff:a9fe:a9fe]/x"),
    refused_target("metadata-nat64", "http://[64:ff9b::a9fe:a9fe]/x"),
    refused_target("metadata-6to4", "http://[2002:a9fe:a9fe::1]/x"),
    refused_target("link-local-ipv6-zone", "http://[fe80::1%25eth0]/x"),
    refused_target("metadata-aws-ipv6", "http://[fd00:ec2::254]/x"),
    refused_target("metadata-google-trailing-dot", "http://metadata.google.internal./x"),
    refused_target("metadata-google-mixed-case-dot", "http://Metadata.Google.Internal./x"),
    refused_target("metadata-google-fullwidth-dots", "http://metadata\uff0egoogle\uff0einternal/x"),
    refused_target("metadata-bare-name-dot", "http://metadata./x"),
    refused_target("unspecified-ipv4", "http://0.0.0.0:8080/x"),
    refused_target("unspecified-ipv4-integer", "http://0/x"),
    refused_target("unspecified-ipv6", "http://[::]:8080/x"),
    refused_target("unspecified-ipv4-mapped", "http://[::ffff:0.0.0.0]/x"),
    refused_target("scheme-ftp", "ftp://example.com/file"),
    refused_target("scheme-file", "file:///etc/passwd"),
    refused_target("scheme-javascript", "javascript:alert(1)"),
    refused_target("relative-without-base-url", "/hooks/order"),
    refused_target("not-in-allow-list", "https://other.example/x", queue="guarded"),
    refused_target("allow-list-prefix-trick", "https://allowed.example.evil/x", queue="guarded"),
    refused_target("allow-list-scheme", "http://allowed.example/x", queue="guarded"),
    refused_target("base-url-still-guarded", "http://169.254.169.254/", queue="based"),
    # -- queue names
    Case(
        "queue-name-space",
        "POST",
        "/v1/queues/bad%20name/messages",
        msg(),
        400,
        "invalid_queue_name",
        "queue",
    ),
    Case(
        "queue-name-leading-dash",
        "POST",
        "/v1/queues/-q/messages",
        msg(),
        400,
        "invalid_queue_name",
        "queue",
    ),
    Case(
        "queue-name-too-long",
        "POST",
        f"/v1/queues/{'q' * 129}/messages",
        msg(),
        400,
        "invalid_queue_name",
        "queue",
    ),
    Case(
        "queue-name-final-newline",
        "POST",
        "/v1/queues/q%0A/messages",
        msg(),
        400,
        "invalid_queue_name",
        "queue",
    ),
    Case(
        "queue-name-unicode",
        "POST",
        "/v1/queues/q%C3%BC/messages",
        msg(),
        400,
        "invalid_queue_name",
        "queue",
    ),
    Case(
        "queue-name-on-get", "GET", "/v1/queues/a%2Fb", NO_BODY, 400, "invalid_queue_name", "queue"
    ),
    Case(
        "queue-name-on-put",
        "PUT",
        "/v1/queues/a:b",
        {"paused": True},
        400,
        "invalid_queue_name",
        "queue",
    ),
    # -- unknown queues, messages, routes
    Case("unknown-queue", "GET", "/v1/queues/nope", NO_BODY, 404, "not_found", None),
    Case("unknown-queue-dead", "GET", "/v1/queues/nope/dead", NO_BODY, 404, "not_found", None),
    Case(
        "unknown-queue-redrive",
        "POST",
        "/v1/queues/nope/dead/redrive",
        NO_BODY,
        404,
        "not_found",
        None,
    ),
    Case("unknown-queue-purge", "DELETE", "/v1/queues/nope/dead", NO_BODY, 404, "not_found", None),
    Case("message-id-words", "GET", "/v1/messages/abc", NO_BODY, 404, "not_found", None),
    Case("message-id-negative", "GET", "/v1/messages/-1", NO_BODY, 404, "not_found", None),
    Case(
        "message-id-huge",
        "GET",
        "/v1/messages/99999999999999999999",
        NO_BODY,
        404,
        "not_found",
        None,
    ),
    Case("message-id-unknown", "GET", "/v1/messages/123456789", NO_BODY, 404, "not_found", None),
    Case("cancel-id-words", "DELETE", "/v1/messages/abc", NO_BODY, 404, "not_found", None),
    Case("cancel-id-unknown", "DELETE", "/v1/messages/123456789", NO_BODY, 404, "not_found", None),
    Case("unknown-route", "GET", "/v1/nothing-here", NO_BODY, 404, "not_found", None),
    Case(
        "wrong-method",
        "PATCH",
        "/v1/queues/existing",
        {"paused": True},
        405,
        "method_not_allowed",
        None,
    ),
    # -- dead letters of an existing queue
    Case(
        "dead-limit-zero",
        "GET",
        "/v1/queues/existing/dead?limit=0",
        NO_BODY,
        400,
        "invalid_field",
        "limit",
    ),
    Case(
        "dead-limit-too-big",
        "GET",
        "/v1/queues/existing/dead?limit=1001",
        NO_BODY,
        400,
        "invalid_field",
        "limit",
    ),
    Case(
        "dead-limit-words",
        "GET",
        "/v1/queues/existing/dead?limit=ten",
        NO_BODY,
        400,
        "invalid_field",
        "limit",
    ),
    Case(
        "dead-after-words",
        "GET",
        "/v1/queues/existing/dead?after=x",
        NO_BODY,
        400,
        "invalid_field",
        "after",
    ),
    Case(
        "redrive-ids-string",
        "POST",
        "/v1/queues/existing/dead/redrive",
        {"ids": "1"},
        400,
        "invalid_field",
        "ids",
    ),
    Case(
        "redrive-ids-words",
        "POST",
        "/v1/queues/existing/dead/redrive",
        {"ids": ["x"]},
        400,
        "invalid_field",
        "ids",
    ),
    Case(
        "redrive-unknown-field",
        "POST",
        "/v1/queues/existing/dead/redrive",
        {"all": True},
        400,
        "invalid_field",
        "body",
    ),
    Case(
        "redrive-malformed",
        "POST",
        "/v1/queues/existing/dead/redrive",
        b"{",
        400,
        "malformed_json",
        None,
    ),
    # -- queue settings, each field
    setting("settings-not-object", [1], "body"),
    Case("settings-empty-body", "PUT", "/v1/queues/unborn", b"", 400, "malformed_json", None),
    setting("settings-unknown", {"retries": 3}, "retries"),
    setting("settings-max-attempts-zero", {"max_attempts": 0}, "max_attempts"),
    setting("settings-max-attempts-bool", {"max_attempts": True}, "max_attempts"),
    setting("settings-max-attempts-string", {"max_attempts": "5"}, "max_attempts"),
    setting("settings-min-backoff-negative", {"min_backoff_seconds": -1}, "min_backoff_seconds"),
    setting("settings-min-backoff-string", {"min_backoff_seconds": "1"}, "min_backoff_seconds"),
    setting("settings-max-backoff-too-long", {"max_backoff_seconds": 86401}, "max_backoff_seconds"),
    setting(
        "settings-max-below-min-backoff",
        {"min_backoff_seconds": 10, "max_backoff_seconds": 5},
        "max_backoff_seconds",
    ),
    setting("settings-min-above-default-max", {"min_backoff_seconds": 4000}, "max_backoff_seconds"),
    setting("settings-rate-limit-zero", {"rate_limit_per_second": 0}, "rate_limit_per_second"),
    setting("settings-rate-limit-negative", {"rate_limit_per_second": -5}, "rate_limit_per_second"),
    setting(
        "settings-rate-limit-string", {"rate_limit_per_second": "fast"}, "rate_limit_per_second"
    ),
    setting("settings-concurrency-zero", {"max_concurrency": 0}, "max_concurrency"),
    setting("settings-concurrency-fraction", {"max_concurrency": 1.5}, "max_concurrency"),
    setting("settings-paused-string", {"paused": "yes"}, "paused"),
    setting("settings-paused-int", {"paused": 1}, "paused"),
    setting("settings-base-url-ftp", {"base_url": "ftp://example.com/"}, "base_url"),
    setting("settings-base-url-number", {"base_url": 5}, "base_url"),
    setting("settings-base-url-no-host", {"base_url": "http://"}, "base_url"),
    setting("settings-base-url-unclosed-ipv6", {"base_url": "http://[::1/"}, "base_url"),
    setting("settings-base-url-crlf", {"base_url": "http://a/\r\n"}, "base_url"),
    setting("settings-allowed-not-array", {"allowed_targets": "https://a/"}, "allowed_targets"),
    setting("settings-allowed-ftp", {"allowed_targets": ["ftp://a/"]}, "allowed_targets"),
    setting("settings-allowed-number", {"allowed_targets": [5]}, "allowed_targets"),
    setting("settings-allowed-nul", {"allowed_targets": ["https://a/\x00"]}, "allowed_targets"),
    setting(
        "settings-allowed-too-many",
        {"allowed_targets": [f"https://h{i}/" for i in range(101)]},
        "allowed_targets",
    ),
    setting("settings-secret-empty", {"signing_secret": ""}, "signing_secret"),
    setting("settings-secret-number", {"signing_secret": 5}, "signing_secret"),
    setting("settings-secret-too-long", {"signing_secret": "s" * 257}, "signing_secret"),
    setting("settings-secret-nul", {"signing_secret": "s\x00"}, "signing_secret"),
    Case(
        "existing-max-below-stored-min",
        "PUT",
        "/v1/queues/existing",
        {"max_backoff_seconds": 0.01},
        400,
        "invalid_field",
        "max_backoff_seconds",
    ),
    # -- the carrier protocol
    carrier("lease-empty", "/v1/leases", b"", None, "malformed_json"),
    carrier("lease-array", "/v1/leases", [], "body"),
    carrier("lease-no-carrier", "/v1/leases", {"wait_seconds": 0}, "carrier"),
    carrier("lease-carrier-empty", "/v1/leases", {"carrier": "", "wait_seconds": 0}, "carrier"),
    carrier("lease-carrier-long", "/v1/leases", {"carrier": "c" * 201}, "carrier"),
    carrier("lease-unknown", "/v1/leases", {"carrier": "c", "wait": 0}, "wait"),
    carrier("lease-max-zero", "/v1/leases", {"carrier": "c", "max_messages": 0}, "max_messages"),
    carrier(
        "lease-max-too-many", "/v1/leases", {"carrier": "c", "max_messages": 1001}, "max_messages"
    ),
    carrier(
        "lease-max-string", "/v1/leases", {"carrier": "c", "max_messages": "5"}, "max_messages"
    ),
    carrier(
        "lease-wait-too-long", "/v1/leases", {"carrier": "c", "wait_seconds": 61}, "wait_seconds"
    ),
    carrier(
        "lease-wait-negative", "/v1/leases", {"carrier": "c", "wait_seconds": -1}, "wait_seconds"
    ),
    carrier(
        "lease-seconds-zero", "/v1/leases", {"carrier": "c", "lease_seconds": 0}, "lease_seconds"
    ),
    carrier("lease-queues-string", "/v1/leases", {"carrier": "c", "queues": "q"}, "queues"),
    carrier("lease-queues-numbers", "/v1/leases", {"carrier": "c", "queues": [1]}, "queues"),
    carrier("ack-malformed", "/v1/acks", b"[", None, "malformed_json"),
    carrier("ack-no-carrier", "/v1/acks", {"acks": [ACK]}, "carrier"),
    carrier("ack-no-acks", "/v1/acks", {"carrier": "c"}, "acks"),
    carrier("ack-acks-object", "/v1/acks", {"carrier": "c", "acks": ACK}, "acks"),
    carrier("ack-item-number", "/v1/acks", {"carrier": "c", "acks": [5]}, "acks"),
    carrier("ack-id-number", "/v1/acks", {"carrier": "c", "acks": [{**ACK, "id": 1}]}, "acks.id"),
    carrier("ack-id-words", "/v1/acks", {"carrier": "c", "acks": [{**ACK, "id": "x"}]}, "acks.id"),
    carrier(
        "ack-attempt-zero",
        "/v1/acks",
        {"carrier": "c", "acks": [{**ACK, "attempt": 0}]},
        "acks.attempt",
    ),
    carrier(
        "ack-attempt-string",
        "/v1/acks",
        {"carrier": "c", "acks": [{**ACK, "attempt": "1"}]},
        "acks.attempt",
    ),
    carrier(
        "ack-outcome-unknown",
        "/v1/acks",
        {"carrier": "c", "acks": [{**ACK, "outcome": "maybe"}]},
        "acks.outcome",
    ),
    carrier(
        "ack-error-number",
        "/v1/acks",
        {"carrier": "c", "acks": [{**ACK, "outcome": "retry", "error": 5}]},
        "acks.error",
    ),
    carrier(
        "ack-retry-after-negative",
        "/v1/acks",
        {"carrier": "c", "acks": [{**ACK, "outcome": "retry", "retry_after": -1}]},
        "acks.retry_after",
    ),
    carrier(
        "ack-duration-negative",
        "/v1/acks",
        {"carrier": "c", "acks": [{**ACK, "duration_seconds": -1}]},
        "acks.duration_seconds",
    ),
    carrier("extend-no-carrier", "/v1/leases/extend", {"leases": [LEASE]}, "carrier"),
    carrier("extend-no-leases", "/v1/leases/extend", {"carrier": "c"}, "leases"),
    carrier(
        "extend-attempt-zero",
        "/v1/leases/extend",
        {"carrier": "c", "leases": [{**LEASE, "attempt": 0}]},
        "leases.attempt",
    ),
    carrier(
        "extend-id-number",
        "/v1/leases/extend",
        {"carrier": "c", "leases": [{**LEASE, "id": 1}]},
        "leases.id",
    ),
    carrier(
        "extend-seconds-too-long",
        "/v1/leases/extend",
        {"carrier": "c", "leases": [LEASE], "lease_seconds": 3601},
        "lease_seconds",
    ),
    carrier("release-not-object", "/v1/leases/release", "c", "body"),
    carrier(
        "release-leases-string", "/v1/leases/release", {"carrier": "c", "leases": "1"}, "leases"
    ),
    carrier(
        "release-item-array", "/v1/leases/release", {"carrier": "c", "leases": [["1", 1]]}, "leases"
    ),
]


async def call(api: Api, case_method: str, path: str, body: Any) -> tuple[int, str, Any]:
    """Send one request as the case says; (status, content type, parsed JSON or text)."""
    kwargs: dict[str, Any] = {}
    if isinstance(body, bytes):
        kwargs = {"data": body, "headers": {"Content-Type": "application/json"}}
    elif body is not NO_BODY:
        kwargs = {"json": body}
    async with api.session.request(
        case_method, api.base_url + path, timeout=aiohttp.ClientTimeout(total=30), **kwargs
    ) as response:
        text = await response.text()
        try:
            data: Any = json.loads(text) if text else None
        except ValueError:
            data = text
        return response.status, response.content_type, data


def assert_error(status: int, content_type: str, data: Any, case: Case) -> None:
    assert (status, content_type) == (case.status, "application/json"), (status, data)
    assert isinstance(data, dict), data
    assert set(data) == {"error"}, data
    error = data["error"]
    assert set(error) == {"code", "message", "field"}, error
    assert (error["code"], error["field"]) == (case.code, case.field), error
    assert isinstance(error["message"], str), error
    assert error["message"], error


# Bad input that once got a 5xx from api.py: kept as regression rows, with what went wrong.
UNICODE_DIGITS = "bug: str.isdigit() accepts '²', then int() raises: a 500, not a 4xx"
NUL_IN_TEXT = "bug: PostgreSQL text cannot hold NUL; the query fails and the API says 503"
KNOWN_BUGS = [
    pytest.param(case, id=case.id)
    for case, _reason in [
        (
            carrier(
                "ack-outcome-object",
                "/v1/acks",
                {"carrier": "c", "acks": [{**ACK, "outcome": {}}]},
                "acks.outcome",
            ),
            "bug: `outcome not in VERDICTS` raises TypeError for an object: a 500",
        ),
        (
            carrier(
                "ack-outcome-array",
                "/v1/acks",
                {"carrier": "c", "acks": [{**ACK, "outcome": []}]},
                "acks.outcome",
            ),
            "bug: `outcome not in VERDICTS` raises TypeError for an array: a 500",
        ),
        (
            Case(
                "message-id-superscript",
                "GET",
                "/v1/messages/%C2%B2",
                NO_BODY,
                404,
                "not_found",
                None,
            ),
            UNICODE_DIGITS,
        ),
        (
            Case(
                "cancel-id-superscript",
                "DELETE",
                "/v1/messages/%C2%B2",
                NO_BODY,
                404,
                "not_found",
                None,
            ),
            UNICODE_DIGITS,
        ),
        (
            Case(
                "dead-after-superscript",
                "GET",
                "/v1/queues/existing/dead?after=%C2%B2",
                NO_BODY,
                400,
                "invalid_field",
                "after",
            ),
            UNICODE_DIGITS,
        ),
        (
            Case(
                "dead-limit-superscript",
                "GET",
                "/v1/queues/existing/dead?limit=%C2%B2",
                NO_BODY,
                400,
                "invalid_field",
                "limit",
            ),
            UNICODE_DIGITS,
        ),
        (
            Case(
                "redrive-ids-superscript",
                "POST",
                "/v1/queues/existing/dead/redrive",
                {"ids": ["\u00b2"]},
                400,
                "invalid_field",
                "ids",
            ),
            UNICODE_DIGITS,
        ),
        (
            carrier(
                "extend-id-superscript",
                "/v1/leases/extend",
                {"carrier": "c", "leases": [{**LEASE, "id": "\u00b2"}]},
                "leases.id",
            ),
            UNICODE_DIGITS,
        ),
        (
            carrier(
                "extend-carrier-nul",
                "/v1/leases/extend",
                {"carrier": "c\x00", "leases": [LEASE]},
                "carrier",
            ),
            NUL_IN_TEXT,
        ),
        (
            carrier(
                "release-carrier-nul",
                "/v1/leases/release",
                {"carrier": "c\x00", "leases": [LEASE]},
                "carrier",
            ),
            NUL_IN_TEXT,
        ),
        (
            carrier(
                "ack-error-nul",
                "/v1/acks",
                {"carrier": "c", "acks": [{**ACK, "outcome": "fail", "error": "\x00"}]},
                "acks.error",
            ),
            NUL_IN_TEXT,
        ),
        (
            carrier(
                "lease-queue-nul",
                "/v1/leases",
                {"carrier": "c", "queues": ["\x00"], "wait_seconds": 0},
                "queues",
            ),
            NUL_IN_TEXT,
        ),
    ]
]


@pytest.mark.parametrize("case", [*CASES, *KNOWN_BUGS], ids=lambda c: c.id)
async def test_bad_input_is_refused_and_stores_nothing(shared: Shared, case: Case) -> None:
    before = await table_counts(shared.database_url)
    status, content_type, data = await call(shared.api, case.method, case.path, case.body)
    assert_error(status, content_type, data, case)
    assert await table_counts(shared.database_url) == before


async def test_405_names_the_allowed_methods(shared: Shared) -> None:
    async with shared.api.session.request(
        "PATCH", shared.api.base_url + "/v1/queues/existing"
    ) as response:
        assert response.status == 405
        allowed = set(response.headers.get("Allow", "").replace(" ", "").split(","))
        assert {"GET", "PUT"} <= allowed <= {"GET", "HEAD", "PUT"}, allowed


def test_the_table_has_no_duplicate_ids() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


async def test_valid_input_does_store_what_the_table_counts(shared: Shared) -> None:
    """The counts above would catch a write: a valid request on a new queue changes both."""
    messages, queues = await table_counts(shared.database_url)
    status, _, data = await call(shared.api, "POST", "/v1/queues/control/messages", msg())
    assert status == 202, data
    assert await table_counts(shared.database_url) == (messages + 1, queues + 1)


async def test_a_refused_batch_leaves_no_trace(shared: Shared) -> None:
    """999 good messages and one bad: nothing is stored, not even the first 999 or their
    dedup keys, and the queue is not created; the corrected batch then goes in whole."""
    good = [msg(dedup_key=f"order-{i}", body={"i": i}) for i in range(999)]
    before = await table_counts(shared.database_url)
    for bad in (msg(max_attempts=0), msg(target="http://[fe80::1]/")):
        status, _, data = await call(
            shared.api, "POST", "/v1/queues/all-or-nothing/messages", {"messages": [*good, bad]}
        )
        assert status == 400, data
        assert data["error"]["field"].startswith("messages[999]."), data
        assert await table_counts(shared.database_url) == before
    assert (await shared.api.call("GET", "/v1/queues/all-or-nothing"))[0] == 404

    accepted = await shared.api.send_batch("all-or-nothing", [*good, msg()])
    assert len(accepted) == 1000
    assert not any(m["duplicate"] for m in accepted)  # no key was left behind by the refusals
    assert await table_counts(shared.database_url) == (before[0] + 1000, before[1] + 1)


async def test_oversized_bodies_get_413_with_the_json_error(shared: Shared) -> None:
    before = await table_counts(shared.database_url)
    huge = "x" * (1024 * 1024 + 1)
    for case_method, path, body in [
        ("POST", "/v1/queues/big/messages", msg(body=huge)),
        ("POST", "/v1/queues/big/messages", {"messages": [msg(body="y" * 2000)] * 600}),
        ("PUT", "/v1/queues/big", {"signing_secret": huge}),
        ("POST", "/v1/acks", {"carrier": "c", "acks": [ACK] * 30_000}),
    ]:
        status, content_type, data = await call(shared.api, case_method, path, body)
        assert (status, content_type) == (413, "application/json"), (path, status, data)
        assert data["error"]["code"] == "body_too_large", data
        assert str(1024 * 1024) in data["error"]["message"], data
    assert await table_counts(shared.database_url) == before


async def test_a_chunked_body_past_the_limit_is_413_too(shared: Shared) -> None:
    """No Content-Length to refuse up front: the limit holds while the body streams in."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"target": "http://127.0.0.1:9/", "body": "'
        for _ in range(20):
            yield b"z" * 65536
        yield b'"}'

    before = await table_counts(shared.database_url)
    async with shared.api.session.post(
        shared.api.base_url + "/v1/queues/chunked/messages",
        data=chunks(),
        headers={"Content-Type": "application/json"},
    ) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "body_too_large"
    assert await table_counts(shared.database_url) == before


async def test_body_limit_follows_the_setting(start_server: StartServer, database_url: str) -> None:
    _, api = await start_server(max_body_bytes=4096, dispatchers=0)
    small, big = msg(body="s" * 1000), msg(body="b" * 5000)
    status, content_type, data = await call(api, "POST", "/v1/queues/limited/messages", big)
    assert (status, content_type, data["error"]["code"]) == (
        413,
        "application/json",
        "body_too_large",
    )
    assert await table_counts(database_url) == (0, 0)
    assert (await call(api, "POST", "/v1/queues/limited/messages", small))[0] == 202
    assert await table_counts(database_url) == (1, 1)


async def test_cancelling_a_finished_message_is_409(start_server: StartServer) -> None:
    _, api = await start_server(dispatchers=2)
    async with sink() as target:
        delivered = await api.send("finish", {"target": target.url})
        await api.wait_state(delivered["id"], "completed")
    status, data = await api.call("DELETE", f"/v1/messages/{delivered['id']}")
    assert status == 409, data
    assert data["error"]["code"] == "already_finished", data
    assert (await api.message(delivered["id"]))["state"] == "completed"

    await api.settings("finish", paused=True)
    waiting = await api.send("finish", {"target": target.url})
    assert await api.ok("DELETE", f"/v1/messages/{waiting['id']}") == {
        "id": waiting["id"],
        "state": "cancelled",
    }
    status, data = await api.call("DELETE", f"/v1/messages/{waiting['id']}")
    assert (status, data["error"]["code"]) == (409, "already_finished"), data
    assert (await api.message(waiting["id"]))["state"] == "cancelled"


async def test_one_bad_ack_records_no_outcome_at_all(start_server: StartServer) -> None:
    """A carrier's acks are all or nothing: one bad item refuses the request, and the
    messages it named stay leased, their outcomes unrecorded."""
    _, api = await start_server(dispatchers=0)
    await api.send_batch("acked", [msg(), msg()])
    leased = await api.ok(
        "POST", "/v1/leases", {"carrier": "c1", "queues": ["acked"], "wait_seconds": 0}
    )
    first, second = ({"id": m["id"], "attempt": m["attempt"]} for m in leased["messages"])
    bad_acks = [{**first, "outcome": "delivered"}, {**second, "outcome": "delivered", "error": 1}]
    status, data = await api.call("POST", "/v1/acks", {"carrier": "c1", "acks": bad_acks})
    assert (status, data["error"]["field"]) == (400, "acks.error"), data
    for ref in (first, second):
        message = await api.message(ref["id"])
        assert (message["state"], message["finalized_at"]) == ("running", None)

    good_acks = [{**ref, "outcome": "delivered"} for ref in (first, second)]
    result = await api.ok("POST", "/v1/acks", {"carrier": "c1", "acks": good_acks})
    assert sorted(result["accepted"]) == sorted([first["id"], second["id"]])
    assert (await api.message(first["id"]))["state"] == "completed"


# -- the API token ------------------------------------------------------------------------

TOKEN = "s3cret-token"
PROTECTED = [
    ("GET", "/v1/queues", NO_BODY),
    ("GET", "/v1/queues/locked", NO_BODY),
    ("PUT", "/v1/queues/locked", {"paused": True}),
    ("POST", "/v1/queues/locked/messages", msg()),
    ("POST", "/v1/queues/locked/messages", {"messages": [msg()]}),
    ("GET", "/v1/messages/1", NO_BODY),
    ("DELETE", "/v1/messages/1", NO_BODY),
    ("GET", "/v1/queues/locked/dead", NO_BODY),
    ("POST", "/v1/queues/locked/dead/redrive", NO_BODY),
    ("DELETE", "/v1/queues/locked/dead", NO_BODY),
    ("POST", "/v1/leases", {"carrier": "c", "wait_seconds": 0}),
    ("POST", "/v1/leases/extend", {"carrier": "c", "leases": []}),
    ("POST", "/v1/leases/release", {"carrier": "c", "leases": []}),
    ("POST", "/v1/acks", {"carrier": "c", "acks": []}),
    ("GET", "/v1/no-such-route", NO_BODY),
]


async def test_api_token_guards_every_v1_call(start_server: StartServer, database_url: str) -> None:
    _, api = await start_server(api_token=TOKEN, dispatchers=0)
    strangers = {
        "no token": {},
        "wrong token": {"Authorization": "Bearer not-the-token"},
        "token with a suffix": {"Authorization": f"Bearer {TOKEN}x"},
        "token without the scheme": {"Authorization": TOKEN},
        "basic auth": {"Authorization": "Basic czNjcmV0LXRva2Vu"},
    }
    for who, headers in strangers.items():
        stranger = Api(api.base_url)
        stranger.session.headers.update(headers)
        try:
            for case_method, path, body in PROTECTED:
                status, content_type, data = await call(stranger, case_method, path, body)
                assert (status, content_type) == (401, "application/json"), (who, path, data)
                assert data["error"]["code"] == "unauthorized", (who, path, data)
            # Health, metrics and the API description stay open (probes and scrapers).
            for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
                status, _, data = await call(stranger, "GET", path, NO_BODY)
                assert status == 200, (who, path, data)
        finally:
            await stranger.close()
    assert await table_counts(database_url) == (0, 0)

    # The right token opens every door.
    assert (await api.send("locked", msg()))["state"] == "available"
    assert [q["name"] for q in (await api.ok("GET", "/v1/queues"))["queues"]] == ["locked"]
    leased = await api.ok("POST", "/v1/leases", {"carrier": "c", "wait_seconds": 0})
    assert len(leased["messages"]) == 1


@pytest.mark.parametrize("field", ["target", "callback", "failure_callback"])
@pytest.mark.parametrize("text", ["http://a/\x00", "http://a/x\r\nX: 1", "http://a/\x7f", "/\t"])
def test_urls_with_controls_are_refused_in_msgspecs_words(field: str, text: str) -> None:
    """The enqueue route checks its URL fields' pattern once per distinct string rather than
    in msgspec's decoding (validation._DecodedMessage): the refusal is the one msgspec gives
    for the declared wire.MessageIn, word for word, alone and in a batch."""
    message = {"target": "http://a/", field: text}
    try:
        msgspec.json.decode(orjson.dumps(message), type=wire.MessageIn)
    except msgspec.ValidationError as exc:
        declared = validation.refusal(exc).body()
    else:
        raise AssertionError("the wire type accepted it")
    batch = {"messages": [{"target": "http://a/"}, message]}
    for body, prefix in ((message, ""), (batch, "messages[1].")):
        with pytest.raises(ApiError) as refused:
            validation.parse_enqueue(orjson.dumps(body))
        error = refused.value.body().error
        assert error.code == declared.error.code == "invalid_field"
        assert error.field == prefix + field
        assert error.message == prefix + declared.error.message


def test_parse_id_takes_ascii_digits_only() -> None:
    """The helper api.py can use for ids in paths, queries and bodies (see KNOWN_BUGS)."""
    assert [parse_id(v) for v in ("0", "42", str(2**63 - 1))] == [0, 42, 2**63 - 1]
    for bad in ("\u00b2", "\u0661\u0662", str(2**63), "", "-1", " 1", "1\n", "1.0", 5, None):
        assert parse_id(bad) is None, bad
