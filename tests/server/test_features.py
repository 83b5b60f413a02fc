"""Delays, priorities, ordering keys, dedup keys, pause, limits, signing: each does what
the README says, observed at a real HTTP target."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from ap4k.core.curl import CurlClient, CurlError
from ap4k.core.delivery import Deliverer, Delivery, Verdict
from ap4k.core.targets import refuse_address
from ap4k.core.workers import freeze_start_up_objects
from ap4k_testkit import Api, Received, StartServer, count_rows, sink


async def test_delay_and_not_before(api: Api) -> None:
    async with sink() as target:
        started = time.monotonic()
        delayed = await api.send("later", {"target": target.url, "delay_seconds": 1.0})
        at = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat()
        scheduled = await api.send("later", {"target": target.url, "not_before": at})
        assert delayed["state"] == scheduled["state"] == "scheduled"
        queue = await api.ok("GET", "/v1/queues/later")
        assert queue["depth"]["scheduled"] == 2
        await target.wait_for(lambda: len(target.received) == 2, timeout=10)
        by_id = {r.message_id: r.at - started for r in target.received}
        assert 0.9 <= by_id[delayed["id"]] < 3.0
        assert 1.4 <= by_id[scheduled["id"]] < 3.5


async def test_higher_priority_first(start_server: StartServer) -> None:
    _, api = await start_server(dispatchers=1)
    async with sink() as target:
        await api.settings("prio", paused=True)
        low = await api.send_batch("prio", [{"target": target.url, "priority": 0}] * 5)
        high = await api.send_batch("prio", [{"target": target.url, "priority": 10}] * 5)
        urgent = await api.send("prio", {"target": target.url, "priority": 100})
        await api.settings("prio", paused=False)
        await target.wait_for(lambda: len(target.received) == 11)
        order = [r.message_id for r in target.received]
        assert order[0] == urgent["id"]
        assert set(order[1:6]) == {m["id"] for m in high}
        assert order[6:] == [m["id"] for m in low]  # FIFO within a priority


async def test_ordering_key_delivers_one_at_a_time_in_order(api: Api) -> None:
    in_flight: dict[str, int] = {}
    overlaps: list[str] = []

    async def slow(received: Received, nth: int) -> int:
        key = json.loads(received.body)["key"]
        in_flight[key] = in_flight.get(key, 0) + 1
        if in_flight[key] > 1:
            overlaps.append(key)
        await asyncio.sleep(0.01)
        in_flight[key] -= 1
        # Some first attempts fail: the order must survive retries.
        return 503 if nth == 1 and json.loads(received.body)["n"] % 7 == 3 else 200

    async with sink(slow) as target:
        await api.settings("ordered", min_backoff_seconds=0.01, max_backoff_seconds=0.02)
        messages = [
            {"target": target.url, "ordering_key": f"k{k}", "body": {"key": f"k{k}", "n": n}}
            for n in range(20)
            for k in range(3)
        ]
        messages += [{"target": target.url, "body": {"key": "none", "n": n}} for n in range(20)]
        await api.send_batch("ordered", messages)
        await target.wait_for(
            lambda: len({(r.message_id) for r in target.received}) == 80, timeout=30
        )
        assert overlaps == [] or set(overlaps) == {"none"}
        for k in range(3):
            successes = [
                json.loads(r.body)["n"]
                for r in target.received
                if json.loads(r.body)["key"] == f"k{k}"
            ]
            # Each failed first attempt is immediately followed by its retry, never by n+1.
            deduped = [n for i, n in enumerate(successes) if i == 0 or successes[i - 1] != n]
            assert deduped == list(range(20))


async def test_dedup_key_returns_the_existing_message(api: Api, database_url: str) -> None:
    async with sink() as target:
        await api.settings("dedup", paused=True)
        first = await api.send("dedup", {"target": target.url, "dedup_key": "order-1"})
        again = await api.send("dedup", {"target": target.url, "dedup_key": "order-1"})
        assert again == {"id": first["id"], "state": "available", "duplicate": True}
        assert first["duplicate"] is False
        batch = await api.send_batch(
            "dedup",
            [
                {"target": target.url, "dedup_key": "order-2"},
                {"target": target.url, "dedup_key": "order-2"},
                {"target": target.url, "dedup_key": "order-1"},
            ],
        )
        assert batch[0]["id"] == batch[1]["id"] and batch[1]["duplicate"]
        assert batch[2]["id"] == first["id"]
        # The same key in another queue is another message.
        other = await api.send("dedup-other", {"target": target.url, "dedup_key": "order-1"})
        assert other["id"] != first["id"]
        # Concurrent duplicates collapse too.
        results = await asyncio.gather(
            *[api.send("dedup", {"target": target.url, "dedup_key": "order-3"}) for _ in range(20)]
        )
        assert len({r["id"] for r in results}) == 1
        assert (
            await count_rows(
                database_url, "SELECT count(*) FROM ap4k_messages WHERE queue = 'dedup'"
            )
            == 3
        )
        await api.settings("dedup", paused=False)
        await target.wait_for(lambda: len(target.received) == 4)  # 3 in dedup, 1 in the other
        assert sorted(r.queue for r in target.received).count("dedup") == 3


async def test_pause_holds_messages_until_resumed(api: Api) -> None:
    async with sink() as target:
        await api.settings("pausable", paused=True)
        sent = await api.send_batch("pausable", [{"target": target.url}] * 10)
        await asyncio.sleep(1.5)
        assert target.received == []
        queue = await api.ok("GET", "/v1/queues/pausable")
        assert queue["depth"]["available"] == 10 and queue["settings"]["paused"] is True
        await api.settings("pausable", paused=False)
        await target.wait_for(lambda: len(target.received) == 10, timeout=10)
        assert {r.message_id for r in target.received} == {m["id"] for m in sent}


async def test_rate_limit_spreads_deliveries(start_server: StartServer) -> None:
    # Two servers share the queue: the limit holds across both.
    _, api = await start_server()
    _, api2 = await start_server()
    async with sink() as target:
        await api.settings("limited", rate_limit_per_second=10, paused=True)
        await api.send_batch("limited", [{"target": target.url}] * 30)
        await api2.settings("limited", paused=False)
        await target.wait_for(lambda: len(target.received) == 30, timeout=20)
        span = target.received[-1].at - target.received[0].at
        # 30 deliveries at 10/s, with at most one second's burst banked: >= ~1.9 s.
        assert span >= 1.8, span
        for start in range(len(target.received)):
            window = [r for r in target.received if 0 <= r.at - target.received[start].at < 1.0]
            assert len(window) <= 21


async def test_concurrency_limit_holds_across_servers(start_server: StartServer) -> None:
    _, api = await start_server()
    _, api2 = await start_server()
    current = 0
    peak = 0

    async def busy(_: Received, __: int) -> int:
        nonlocal current, peak
        current += 1
        peak = max(peak, current)
        await asyncio.sleep(0.05)
        current -= 1
        return 200

    async with sink(busy) as target:
        await api.settings("narrow", max_concurrency=3, paused=True)
        await api.send_batch("narrow", [{"target": target.url}] * 40)
        await api2.settings("narrow", paused=False)
        await target.wait_for(lambda: len(target.received) == 40, timeout=30)
        assert peak == 3


async def test_headers_method_signature_and_base_url(api: Api) -> None:
    async with sink() as target:
        await api.settings("signed", signing_secret="s3cret", base_url=target.url + "/hooks")
        sent = await api.send(
            "signed",
            {
                "target": "/orders/created",
                "method": "PUT",
                "headers": {"X-Tenant": "acme"},
                "body": {"order": 42},
            },
        )
        await target.wait_for(lambda: len(target.received) == 1)
        got = target.received[0]
        assert got.headers[":path"] == "/hooks/orders/created"
        assert got.headers[":method"] == "PUT"
        assert got.headers["X-Tenant"] == "acme"
        assert got.headers["Ap4k-Message-Id"] == sent["id"]
        assert got.headers["Ap4k-Queue"] == "signed"
        assert got.headers["Ap4k-Attempt"] == "1"
        assert json.loads(got.body) == {"order": 42}
        timestamp = got.headers["Ap4k-Timestamp"]
        expected = hmac.new(
            b"s3cret", timestamp.encode() + b"." + got.body, hashlib.sha256
        ).hexdigest()
        assert got.headers["Ap4k-Signature"] == f"t={timestamp},v1={expected}"
        queue = await api.ok("GET", "/v1/queues/signed")
        assert queue["settings"]["signing_secret_set"] is True
        assert "s3cret" not in json.dumps(queue)


async def test_cancel(api: Api) -> None:
    async with sink() as target:
        sent = await api.send("cancels", {"target": target.url, "delay_seconds": 60})
        assert await api.ok("DELETE", f"/v1/messages/{sent['id']}") == {
            "id": sent["id"],
            "state": "cancelled",
        }
        status, body = await api.call("DELETE", f"/v1/messages/{sent['id']}")
        assert status == 409 and body["error"]["code"] == "already_finished"


async def test_allow_list(api: Api) -> None:
    async with sink() as target:
        await api.settings("fenced", allowed_targets=[target.url + "/ok/"])
        ok = await api.send("fenced", {"target": target.url + "/ok/1"})
        status, body = await api.call(
            "POST", "/v1/queues/fenced/messages", json={"target": target.url + "/elsewhere"}
        )
        assert status == 400 and body["error"]["code"] == "target_not_allowed"
        await api.wait_state(ok["id"], "completed")
        # Narrowing the list later refuses already-queued messages at delivery time.
        await api.settings("fenced", paused=True)
        queued = await api.send("fenced", {"target": target.url + "/ok/2"})
        await api.settings("fenced", allowed_targets=[target.url + "/other/"], paused=False)
        dead = await api.wait_state(queued["id"], "discarded")
        assert "allowed_targets" in dead["last_error"]


async def test_link_local_needs_explicit_allowance(api: Api) -> None:
    status, body = await api.call(
        "POST",
        "/v1/queues/meta/messages",
        json={"target": "http://169.254.169.254/latest/meta-data"},
    )
    assert status == 400 and "link-local" in body["error"]["message"]
    await api.settings("meta", allowed_targets=["http://169.254.169.254/"], paused=True)
    accepted = await api.send("meta", {"target": "http://169.254.169.254/latest/meta-data"})
    assert accepted["state"] == "available"


async def test_delivery_guard_refuses_names_resolving_to_link_local() -> None:
    """The guard runs on the addresses a name resolved to, right before connecting: with a
    guard that refuses loopback, `localhost` is refused although its name is harmless."""

    def refuse_loopback(address: str) -> str | None:
        return f"{address} is loopback" if address in ("127.0.0.1", "::1") else None

    async with sink() as target:
        url = f"http://localhost:{target.port}/"
        client, real = CurlClient(guard=refuse_loopback), CurlClient(guard=refuse_address)
        try:
            with pytest.raises(CurlError) as refused:
                await client.request("POST", url, [], b"{}", 2.0)
            assert refused.value.refused is not None and "loopback" in refused.value.refused
            assert target.received == []
            # The real guard allows loopback (in-cluster targets are private addresses).
            answer = await real.request("POST", url, [], b"{}", 2.0)
            assert answer.status == 200 and len(target.received) == 1
        finally:
            await client.close()
            await real.close()
    deliverer = Deliverer()
    try:
        outcome = await deliverer.deliver(
            Delivery(
                id=1,
                queue="q",
                attempt=1,
                max_attempts=3,
                target="http://[fe80::1]:9/x",
                method="POST",
                headers=None,
                body=b"{}",
                timeout_seconds=1,
                created_at=0,
            )
        )
        assert outcome.verdict is Verdict.FAIL and "refused" in (outcome.error or "")
    finally:
        await deliverer.close()


async def test_queue_springs_into_being_and_lists(api: Api) -> None:
    async with sink() as target:
        status, _ = await api.call("GET", "/v1/queues/fresh")
        assert status == 404
        await api.send("fresh", {"target": target.url})
        queues = await api.ok("GET", "/v1/queues")
        assert "fresh" in [q["name"] for q in queues["queues"]]


async def test_metrics_are_exported(api: Api) -> None:
    async with sink() as target:
        sent = await api.send("metered", {"target": target.url})
        await api.wait_state(sent["id"], "completed")
        status, text = await api.call("GET", "/metrics")
        assert status == 200
        for name in (
            'ap4k_messages_enqueued_total{queue="metered"} 1.0',
            'ap4k_deliveries_total{outcome="delivered",queue="metered"} 1.0',
            "ap4k_delivery_duration_seconds_bucket",
            "ap4k_end_to_end_latency_seconds_bucket",
        ):
            assert name in text, name


async def test_the_event_loop_lag_is_sampled(api: Api) -> None:
    deadline = time.monotonic() + 10
    count = 0.0
    while count == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        _, text = await api.call("GET", "/metrics")
        for line in text.splitlines():
            if line.startswith("ap4k_event_loop_lag_seconds_count"):
                count = float(line.split()[-1])
    assert count > 0


def test_start_up_objects_are_put_out_of_the_collectors_reach() -> None:
    """`ap4k serve` freezes what start-up made (`freeze_start_up_objects`): a full
    collection then no longer walks it."""
    made = [[i] for i in range(1000)]
    frozen_before = gc.get_freeze_count()
    try:
        freeze_start_up_objects()
        assert gc.get_freeze_count() >= frozen_before + len(made)
        assert not any(o is made for o in gc.get_objects(generation=2))
    finally:
        gc.unfreeze()


async def test_an_idle_server_hands_new_messages_straight_to_a_dispatcher(api: Api) -> None:
    async with sink() as target:
        await api.send("direct", {"target": target.url})  # the queue now exists
        await asyncio.sleep(1.5)  # and the dispatchers have seen it empty
        sent = [await api.send("direct", {"target": target.url}) for _ in range(5)]
        assert all(m["state"] == "running" for m in sent)  # inserted already leased
        for m in sent:
            done = await api.wait_state(m["id"], "completed")
            assert done["attempt"] == 1
        ordered = await api.send("direct", {"target": target.url, "ordering_key": "k"})
        delayed = await api.send("direct", {"target": target.url, "delay_seconds": 0.2})
        assert (ordered["state"], delayed["state"]) == ("available", "scheduled")
        await api.settings("direct", paused=True)
        paused = await api.send("direct", {"target": target.url})
        assert paused["state"] == "available"


async def test_a_message_left_to_the_lease_statement_does_not_stop_the_hand_off(
    api: Api,
) -> None:
    """A message that cannot be handed off (here: its ordering key) is inserted available
    and leased by the lease statement. The enqueues that arrive meanwhile are still handed
    off: the queue has no backlog the dispatchers know of, only that one message. (They were
    refused while that lease ran, so each refused one hinted the next lease, and a steady
    stream went through the lease statement from then on: docs/performance.md, "Latency
    tail".)"""
    async with sink() as target:
        await api.send("steady", {"target": target.url})  # the queue now exists
        for _ in range(5):
            ordered = await api.send("steady", {"target": target.url, "ordering_key": "k"})
            assert ordered["state"] == "available"
            plain = await asyncio.gather(
                *[api.send("steady", {"target": target.url}) for _ in range(4)]
            )
            assert [m["state"] for m in plain] == ["running"] * 4
        await target.wait_for(lambda: len(target.received) >= 26)


@pytest.mark.parametrize(
    "host",
    ["2852039166", "0251.0376.0251.0376", "169.254.43518", "0xa9fea9fe", "169.254.169.254.",
     "[::ffff:a9fe:a9fe]", "metadata.google.internal.", "0.0.0.0", "[::]"],
)
async def test_delivery_refuses_every_spelling_of_a_blocked_host(host: str) -> None:
    """A message stored before a guard was in place (or queued while its queue allowed the
    host) is refused at delivery time in whatever spelling it names the host."""
    deliverer = Deliverer()
    try:
        outcome = await deliverer.deliver(
            Delivery(1, "q", 1, 3, f"http://{host}:9/x", "POST", None, b"{}", 2.0, time.time())
        )
    finally:
        await deliverer.close()
    assert outcome.verdict is Verdict.FAIL, outcome
    assert outcome.error is not None and outcome.error.startswith("refused:"), outcome


@pytest.mark.parametrize("host", ["0.0.0.0", "2852039166", "0xa9fea9fe", "169.254.43518"])
async def test_delivery_guard_checks_what_numeric_spellings_resolve_to(host: str) -> None:
    """Past the check on the URL, the connect-time guard sees the address libcurl reads."""
    client = CurlClient(guard=refuse_address)
    try:
        with pytest.raises(CurlError) as refused:
            await client.request("POST", f"http://{host}:9/", [], b"{}", 2.0)
        assert refused.value.refused is not None, refused.value
    finally:
        await client.close()


async def test_unspecified_address_reaches_this_host_only_when_explicitly_allowed(
    api: Api,
) -> None:
    """0.0.0.0 connects to the loopback interface: refused by default, and delivered to the
    local target once the queue's allow-list names it."""
    async with sink() as target:
        url = f"http://0.0.0.0:{target.port}/hook"
        status, body = await api.call("POST", "/v1/queues/local/messages", json={"target": url})
        assert status == 400 and body["error"]["field"] == "target", body
        assert "unspecified" in body["error"]["message"]
        await api.settings("local", allowed_targets=[f"http://0.0.0.0:{target.port}/"])
        sent = await api.send("local", {"target": url})
        await api.wait_state(sent["id"], "completed")
        assert target.delivered_ids() == {sent["id"]: 1}


async def test_throughput_counts_deliveries_per_queue_over_a_window(api: Api) -> None:
    async with sink() as target:
        await api.send_batch("counted", [{"target": target.url}] * 7)
        await api.send_batch("other", [{"target": target.url}] * 2)
        await target.wait_for(lambda: len(target.received) == 9, timeout=10)

        async def completed() -> dict[str, int]:
            answer = await api.ok("GET", "/v1/throughput?seconds=60")
            assert answer["seconds"] == 60
            return {q["name"]: q["completed"] for q in answer["queues"]}

        # The 2xx reaches the target before the outcome is recorded: wait for the counts.
        for _ in range(100):
            if await completed() == {"counted": 7, "other": 2}:
                break
            await asyncio.sleep(0.05)
        assert await completed() == {"counted": 7, "other": 2}
        await asyncio.sleep(0.3)
        recent = await api.ok("GET", "/v1/throughput?seconds=0.2")
        assert recent["queues"] == []  # all of them finished earlier than that
    for bad in ("0", "-1", "3601", "nan", "inf", "soon"):
        status, body = await api.call("GET", f"/v1/throughput?seconds={bad}")
        assert status == 400, (bad, body)
        assert body["error"]["field"] == "seconds"
