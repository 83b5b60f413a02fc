"""Property-based: whatever JSON arrives as an enqueue or a queue-settings body, the server
answers 2xx or a 4xx with the JSON error, never a 5xx.

hypothesis builds the bodies from the shapes the API knows (every message field and setting,
batches) filled with adversarial values: arbitrary JSON in every field, strings with controls,
NUL and astral characters, numbers at and past every bound, bodies nested past what orjson
writes back, targets in every spelling of a blocked host. The search is derandomised (the
same examples on every run) so that CI is reproducible; a failure prints the body to replay.

Examples per run: ENQUEUE_EXAMPLES (single and batch bodies) + SETTINGS_EXAMPLES.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ap4k.core.embedded_pg import EmbeddedPostgres
from ap4k_testkit import Api, create_database, undelivering_server

ENQUEUE_EXAMPLES = 400
SETTINGS_EXAMPLES = 250

PROFILE = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


class Nested:
    """A JSON array nested `depth` levels deep, serialised as such (see `dumps`)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def __repr__(self) -> str:
        return f"Nested({self.depth})"


def dumps(value: Any) -> str:
    """JSON text of `value`; a Nested is written out as [[[…1…]]] without recursion."""
    if isinstance(value, Nested):
        return "[" * value.depth + "1" + "]" * value.depth
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value, allow_nan=False)


texts = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from("\x00\r\n\t\x7f"),
    max_size=60,
)
huge_texts = st.integers(min_value=250, max_value=20_000).map(lambda n: "x" * n)
targets = st.sampled_from(
    [
        "http://127.0.0.1:9/hook",
        "https://example.com/a?b=c#d",
        "/relative/path",
        "relative",
        "http://2852039166/",
        "http://0251.0376.0251.0376/",
        "http://169.254.43518/",
        "http://0xa9fea9fe/",
        "http://169.254.169.254./",
        "http://metadata.google.internal./",
        "http://[::ffff:a9fe:a9fe]/",
        "http://0.0.0.0/",
        "http://[::]/",
        "http://[fe80::1%25eth0]/",
        "http://[::1/",
        "http://host:99999/",
        "http://host:port/",
        "http://exa mple.com/",
        "ftp://example.com/",
        "http://",
        "http:///path",
        "http://xn--n3h.example/",
        "http://\u2603.example/",
        "http://example.com/" + "a" * 5000,
    ]
) | texts | json_values
numbers = (
    st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0, -1, 1, 0.0005, 1e-300, 1e300, 1800, 1801, 1000, 1001, 2**31, 2**63])
)
timestamps = st.sampled_from(
    [
        "2030-01-01T00:00:00Z",
        "2030-01-01T00:00:00",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59-14:00",
        "9001-01-01T00:00:00Z",
        "2030-13-01T00:00:00Z",
        "yesterday",
        "",
    ]
) | texts
headers = st.dictionaries(
    st.sampled_from(["X-A", "Host", "ap4k-x", "Content-Length", "X A", "X-\u00e9", ""]) | texts,
    texts | huge_texts | json_values,
    max_size=5,
) | json_values
bodies = json_values | st.integers(min_value=240, max_value=1100).map(Nested)

message_fields = {
    "target": targets,
    "method": st.sampled_from(["GET", "post", "PATCH", "TRACE", "", "G\x00T"]) | json_values,
    "headers": headers,
    "body": bodies,
    "delay_seconds": numbers | json_values,
    "not_before": timestamps | json_values,
    "priority": numbers | json_values,
    "dedup_key": texts | huge_texts | json_values,
    "ordering_key": texts | huge_texts | json_values,
    "max_attempts": numbers | json_values,
    "timeout_seconds": numbers | json_values,
    "surprise": json_values,
}


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    chosen = draw(st.sets(st.sampled_from(sorted(message_fields)), max_size=len(message_fields)))
    message = {name: draw(message_fields[name]) for name in sorted(chosen)}
    if draw(st.booleans()):  # mostly near-valid: a good target lets the other fields matter
        message["target"] = "http://127.0.0.1:9/hook"
    return message


enqueue_bodies = (
    messages()
    | st.fixed_dictionaries({"messages": st.lists(messages(), min_size=0, max_size=4)})
    | st.fixed_dictionaries({"messages": json_values})
    | json_values
)

setting_fields = {
    "max_attempts": numbers | json_values,
    "min_backoff_seconds": numbers | json_values,
    "max_backoff_seconds": numbers | json_values,
    "rate_limit_per_second": numbers | json_values,
    "max_concurrency": numbers | json_values,
    "paused": st.booleans() | json_values,
    "base_url": targets,
    "allowed_targets": st.lists(targets, max_size=3) | json_values,
    "signing_secret": texts | huge_texts | json_values,
    "surprise": json_values,
}


@st.composite
def settings_bodies(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    chosen = draw(st.sets(st.sampled_from(sorted(setting_fields)), max_size=4))
    return {name: draw(setting_fields[name]) for name in sorted(chosen)}


@pytest.fixture(scope="module")
async def fuzzed(postgres: EmbeddedPostgres) -> AsyncIterator[Api]:
    database_url = await create_database(postgres.url, prefix="fuzz")
    async with undelivering_server(database_url) as api:
        await api.settings("fuzz-based", base_url="http://127.0.0.1:9/base/", paused=True)
        await api.settings("fuzz", paused=True)
        yield api


async def check_answer(api: Api, method: str, path: str, body: Any) -> None:
    status, answer = await api.call(
        method, path, data=dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    assert status < 500, (status, answer)
    if status >= 400:
        assert isinstance(answer, dict) and set(answer) == {"error"}, (status, answer)
        assert set(answer["error"]) == {"code", "message", "field"}, (status, answer)


@settings(PROFILE, max_examples=ENQUEUE_EXAMPLES)
@given(body=enqueue_bodies, queue=st.sampled_from(["fuzz", "fuzz-based"]))
async def test_no_enqueue_body_gets_a_5xx(fuzzed: Api, body: Any, queue: str) -> None:
    await check_answer(fuzzed, "POST", f"/v1/queues/{queue}/messages", body)


@settings(PROFILE, max_examples=SETTINGS_EXAMPLES)
@given(body=settings_bodies(), queue=st.sampled_from(["fuzz-settings", "fuzz-settings-2"]))
async def test_no_settings_body_gets_a_5xx(fuzzed: Api, body: Any, queue: str) -> None:
    await check_answer(fuzzed, "PUT", f"/v1/queues/{queue}", body)
