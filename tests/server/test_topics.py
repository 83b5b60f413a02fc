"""Fan-out topics: one message per subscription, each delivered once, a failing subscriber
retried on its own, dedup per subscription, and targets guarded like any target."""

from __future__ import annotations

import asyncio
import json

import pytest

from ap4k_testkit import Api, Received, sink


async def test_three_subscriptions_each_get_each_message_once(api: Api) -> None:
    async def down(_: Received, __: int) -> int:
        return 503

    async with sink() as a, sink() as b, sink(down) as broken:
        await api.settings("fanout", min_backoff_seconds=0.05, max_backoff_seconds=0.2)
        topic = await api.ok(
            "PUT",
            "/v1/topics/orders",
            {
                "subscriptions": [
                    {"name": "billing", "target": a.url + "/bill", "queue": "fanout"},
                    {"name": "mail", "target": b.url + "/mail", "headers": {"X-Who": "mail"}},
                    {"name": "broken", "target": broken.url + "/x", "queue": "fanout"},
                ]
            },
        )
        assert [s["name"] for s in topic["subscriptions"]] == ["billing", "mail", "broken"]
        published = []
        for n in range(5):
            answer = await api.ok(
                "POST", "/v1/topics/orders/messages", {"body": {"n": n}, "headers": {"X-N": str(n)}}
            )
            assert [m["subscription"] for m in answer["messages"]] == ["billing", "mail", "broken"]
            published.append(answer["messages"])
        await a.wait_for(lambda: len(a.received) == 5)
        await b.wait_for(lambda: len(b.received) == 5)
        # The broken subscriber has been retried meanwhile, without holding the others back.
        await broken.wait_for(lambda: len(broken.received) >= 10)
        await asyncio.sleep(0.3)
        for target, index, queue in ((a, 0, "fanout"), (b, 1, "orders")):
            assert len(target.received) == 5
            assert target.delivered_ids() == {m[index]["id"]: 1 for m in published}
            for n, r in enumerate(sorted(target.received, key=lambda r: json.loads(r.body)["n"])):
                assert json.loads(r.body) == {"n": n}
                assert r.headers["Ap4k-Topic"] == "orders"
                assert r.headers["Ap4k-Queue"] == queue
                assert r.headers["X-N"] == str(n)
        assert {r.headers["Ap4k-Subscription"] for r in a.received} == {"billing"}
        assert {r.headers["X-Who"] for r in b.received} == {"mail"}
        assert max(r.attempt for r in broken.received) >= 2
        assert (await api.ok("GET", "/v1/topics")) == {"topics": [topic]}


async def test_dedup_key_holds_per_subscription(api: Api) -> None:
    await api.settings("shared", paused=True)
    await api.ok(
        "PUT",
        "/v1/topics/t",
        {
            "subscriptions": [
                {"name": "one", "target": "https://one.example/", "queue": "shared"},
                {"name": "two", "target": "https://two.example/", "queue": "shared"},
            ]
        },
    )
    first = await api.ok("POST", "/v1/topics/t/messages", {"dedup_key": "order-1"})
    again = await api.ok("POST", "/v1/topics/t/messages", {"dedup_key": "order-1"})
    assert len({m["id"] for m in first["messages"]}) == 2
    assert [m["id"] for m in again["messages"]] == [m["id"] for m in first["messages"]]
    assert all(m["duplicate"] for m in again["messages"])
    assert not any(m["duplicate"] for m in first["messages"])
    queue = await api.ok("GET", "/v1/queues/shared")
    assert queue["depth"]["available"] == 2


async def test_subscription_targets_are_guarded_when_saved_and_when_published(api: Api) -> None:
    status, error = await api.call(
        "PUT",
        "/v1/topics/t",
        {"subscriptions": [{"name": "meta", "target": "http://169.254.169.254/latest"}]},
    )
    assert status == 400 and error["error"]["field"] == "subscriptions[0].target"
    await api.settings("fenced", allowed_targets=["https://ok.example/"])
    bad = {"name": "far", "target": "https://far.example/", "queue": "fenced"}
    status, error = await api.call("PUT", "/v1/topics/t", {"subscriptions": [bad]})
    assert status == 400 and error["error"]["code"] == "target_not_allowed"
    assert (await api.call("GET", "/v1/topics/t"))[0] == 404
    good = {"name": "near", "target": "https://ok.example/hook", "queue": "fenced"}
    await api.ok("PUT", "/v1/topics/t", {"subscriptions": [good]})
    await api.settings("fenced", allowed_targets=["https://other.example/"])
    status, error = await api.call("POST", "/v1/topics/t/messages", {"body": 1})
    assert status == 400 and error["error"]["field"] == "subscriptions[0].target"
    depth = (await api.ok("GET", "/v1/queues/fenced"))["depth"]
    assert sum(depth.values()) == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"subscriptions": [{"name": "a"}]}, "subscriptions[0].target"),
        (
            {"subscriptions": [{"name": "-a", "target": "https://x.example/"}]},
            "subscriptions[0].name",
        ),
        (
            {
                "subscriptions": [
                    {"name": "a", "target": "https://x.example/"},
                    {"name": "a", "target": "https://y.example/"},
                ]
            },
            "subscriptions[1].name",
        ),
        (
            {"subscriptions": [{"name": "a", "target": "https://x.example/", "queue": "a b"}]},
            "subscriptions[0].queue",
        ),
        (
            {
                "subscriptions": [
                    {"name": "a", "target": "https://x.example/", "headers": {"Host": "h"}}
                ]
            },
            "subscriptions[0].headers",
        ),
        ({"subscriptions": {}}, "subscriptions"),
        ({}, "subscriptions"),
    ],
)
async def test_bad_topic_is_refused_with_its_field(
    api: Api, body: dict[str, object], field: str
) -> None:
    status, error = await api.call("PUT", "/v1/topics/t", body)
    assert status == 400, error
    assert error["error"]["field"] == field, error
    assert (await api.call("GET", "/v1/topics/t"))[0] == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"target": "https://x.example/"}, "target"),
        ({"delay_seconds": 1, "not_before": "2030-01-01T00:00:00Z"}, "delay_seconds"),
        ({"priority": 5000}, "priority"),
        ({"callback": "http://169.254.169.254/"}, "callback"),
        ({"nope": 1}, "nope"),
    ],
)
async def test_bad_publish_is_refused_with_its_field(
    api: Api, body: dict[str, object], field: str
) -> None:
    await api.ok(
        "PUT", "/v1/topics/t", {"subscriptions": [{"name": "a", "target": "https://x.example/"}]}
    )
    status, error = await api.call("POST", "/v1/topics/t/messages", body)
    assert status == 400, error
    assert error["error"]["field"] == field, error


async def test_unknown_topic_and_delete(api: Api) -> None:
    status, error = await api.call("POST", "/v1/topics/none/messages", {})
    assert status == 404 and error["error"]["code"] == "not_found"
    await api.ok("PUT", "/v1/topics/t", {"subscriptions": []})
    assert (await api.ok("POST", "/v1/topics/t/messages", {})) == {"messages": []}
    assert (await api.ok("DELETE", "/v1/topics/t")) == {"deleted": "t"}
    assert (await api.call("DELETE", "/v1/topics/t"))[0] == 404
