"""Flow keys: per-key concurrency and rate limits, counted at a real target, held across two
server replicas and a carrier leasing from the same queue; a key behind two saturated keys
with deep backlogs starts at once (no head-of-line blocking)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict

from ap4k_testkit import Api, CarrierProcess, Received, StartServer, sink

CONCURRENCY = 2
RATE = 5.0
BUCKET = max(RATE, 1.0)  # a key may bank one second's worth of tokens
BACKLOG = 40  # per saturated key: 8 s of work at 5/s
DELIVERY_SECONDS = 0.3


async def test_per_key_limits_hold_across_replicas_and_a_carrier_without_blocking(
    start_server: StartServer,
) -> None:
    _, api = await start_server()
    second, api2 = await start_server()
    carrier = await CarrierProcess(f"http://127.0.0.1:{second.settings.port}").start()
    in_flight: dict[str, int] = defaultdict(int)
    peak: dict[str, int] = defaultdict(int)
    starts: dict[str, list[float]] = defaultdict(list)

    async def tenant(received: Received, _: int) -> int:
        key = json.loads(received.body)["key"]
        starts[key].append(received.at)
        in_flight[key] += 1
        peak[key] = max(peak[key], in_flight[key])
        await asyncio.sleep(DELIVERY_SECONDS)
        in_flight[key] -= 1
        return 200

    try:
        async with sink(tenant) as target:
            limits = {"max_concurrency": CONCURRENCY, "rate_limit_per_second": RATE}
            await api.settings("tenants", flow_limits=limits)
            for key in ("a", "b"):
                batch = [
                    {"target": target.url, "body": {"key": key}, "flow_key": key}
                    for _ in range(BACKLOG)
                ]
                await api.send_batch("tenants", batch)
            # a and b saturated, with deep backlogs.
            await target.wait_for(lambda: len(starts["a"]) >= 3 and len(starts["b"]) >= 3)
            busy = (await api2.ok("GET", "/v1/queues/tenants/flow-keys?limit=10"))["flow_keys"]
            by_key = {k["flow_key"]: k for k in busy}
            assert set(by_key) == {"a", "b"}
            for k in by_key.values():
                assert k["in_flight"] <= CONCURRENCY and k["waiting"] > 0, k

            sent_at = time.monotonic()
            batch = [{"target": target.url, "body": {"key": "c"}, "flow_key": "c"}] * 5
            await api2.send_batch("tenants", batch)
            await target.wait_for(lambda: len(starts["c"]) == 5)
            first_c = min(starts["c"]) - sent_at
            all_c = max(starts["c"]) - sent_at
            waiting = {
                k["flow_key"]: k["waiting"]
                for k in (await api.ok("GET", "/v1/queues/tenants/flow-keys"))["flow_keys"]
            }
            # c went while a and b still had most of their backlogs waiting.
            assert waiting.get("a", 0) > 10 and waiting.get("b", 0) > 10, waiting
            await target.wait_for(
                lambda: len(starts["a"]) == len(starts["b"]) == BACKLOG, timeout=120
            )
            print(
                f"\nc behind saturated a and b: first delivery {first_c:.3f} s after its "
                f"enqueue, all five by {all_c:.3f} s; peaks in flight {dict(peak)}"
            )

            for key, times in starts.items():
                assert peak[key] <= CONCURRENCY, (key, peak[key])
                times.sort()
                # The token bucket's bound: in any window of w seconds at most rate·w + bucket.
                for w in (1.0, 2.0, 4.0):
                    for i, t in enumerate(times):
                        within = sum(1 for u in times[i:] if u < t + w)
                        assert within <= RATE * w + BUCKET, (key, w, within)
            # The limit binds: a backlog of 40 cannot drain faster than its bucket allows.
            for key in ("a", "b"):
                span = starts[key][-1] - starts[key][0]
                assert span >= (BACKLOG - BUCKET) / RATE - 0.5, (key, span)
    finally:
        carrier.kill()


WAITING_KEYS = 2_000
HOT_BACKLOG = 3_000
HOT_DELIVERY_SECONDS = 0.02  # the hot key can go at most 50/s: its backlog outlasts the run


async def test_thousands_of_keys_flow_past_a_saturated_key_within_their_limits(
    start_server: StartServer,
) -> None:
    """One key saturated with a deep backlog at the head of the queue, 2,000 keys with two
    messages each behind it, and messages without a key: every waiting key's messages (and
    the unkeyed ones) are delivered while the hot key still has most of its backlog, no key
    ever has more than its one delivery in flight. (What a lease costs here is `ap4k bench
    --only flow`'s figure, not a test's.)"""
    _, api = await start_server()
    in_flight: dict[str, int] = defaultdict(int)
    peak: dict[str, int] = defaultdict(int)
    delivered: dict[str, int] = defaultdict(int)

    async def tenant(received: Received, _: int) -> int:
        key = json.loads(received.body)["k"]
        in_flight[key] += 1
        peak[key] = max(peak[key], in_flight[key])
        await asyncio.sleep(HOT_DELIVERY_SECONDS if key == "hot" else 0)
        in_flight[key] -= 1
        delivered[key] += 1
        return 200

    async with sink(tenant) as target:
        limits = {"max_concurrency": 1, "rate_limit_per_second": 1000}
        await api.settings("many", flow_limits=limits, paused=True)
        keyed = ["hot"] * HOT_BACKLOG + [f"key-{i:04}" for i in range(WAITING_KEYS)] * 2
        messages = [{"target": target.url, "body": {"k": k}, "flow_key": k} for k in keyed]
        messages += [{"target": target.url, "body": {"k": "-"}} for _ in range(100)]
        for start in range(0, len(messages), 1000):
            await api.send_batch("many", messages[start : start + 1000])
        await api.settings("many", paused=False)

        others = 2 * WAITING_KEYS + 100
        await target.wait_for(
            lambda: sum(n for k, n in delivered.items() if k != "hot") >= others, timeout=120
        )
        busy = (await api.ok("GET", "/v1/queues/many/flow-keys?limit=5"))["flow_keys"]
        await api.settings("many", paused=True)

    assert all(delivered[f"key-{i:04}"] == 2 for i in range(WAITING_KEYS)), "a key missed out"
    assert delivered["-"] == 100
    assert max(peak[k] for k in peak if k != "-") == 1, max(peak.items(), key=lambda p: p[1])
    # The waiting keys went past the hot key, not after it.
    assert delivered["hot"] < HOT_BACKLOG / 2, delivered["hot"]
    assert busy[0]["flow_key"] == "hot" and busy[0]["waiting"] > HOT_BACKLOG / 2, busy


async def test_flow_settings_and_fields_are_checked(api: Api) -> None:
    for bad, field in (
        ({"max_concurrency": 0}, "flow_limits.max_concurrency"),
        ({"rate_limit_per_second": 0}, "flow_limits.rate_limit_per_second"),
        ({"burst": 3}, "flow_limits.burst"),
    ):
        status, body = await api.call("PUT", "/v1/queues/flows", {"flow_limits": bad})
        assert status == 400, bad
        assert body["error"]["field"] == field, body
    shown = await api.settings("flows", flow_limits={"max_concurrency": 3})
    assert shown["settings"]["flow_limits"] == {"rate_limit_per_second": None, "max_concurrency": 3}
    status, body = await api.call(
        "POST", "/v1/queues/flows/messages", {"target": "http://127.0.0.1:9/", "flow_key": ""}
    )
    assert status == 400 and body["error"]["field"] == "flow_key"
    sent = await api.send(
        "flows", {"target": "http://127.0.0.1:9/", "flow_key": "acme", "delay_seconds": 60}
    )
    assert (await api.message(sent["id"]))["flow_key"] == "acme"
    status, body = await api.call("GET", "/v1/queues/flows/flow-keys?limit=0")
    assert status == 400 and body["error"]["field"] == "limit"
    status, _ = await api.call("GET", "/v1/queues/nowhere/flow-keys")
    assert status == 404
