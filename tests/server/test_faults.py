"""Nothing accepted is ever lost: SIGKILL the server mid-delivery, restart PostgreSQL
mid-run, SIGTERM to drain — and count every message at the target."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from ap4k.core.embedded_pg import EmbeddedPostgres
from ap4k_testkit import (
    Api,
    Received,
    ServerProcess,
    count_rows,
    create_database,
    sink,
    wait_completed,
)


async def slow_ok(_: Received, __: int) -> int:
    await asyncio.sleep(0.05)
    return 200


async def test_sigkill_of_the_server_mid_delivery_loses_nothing(database_url: str) -> None:
    server = await ServerProcess(
        database_url, "--dispatchers", "16", "--lease-seconds", "2"
    ).start()
    api = Api(server.url)
    try:
        async with sink(slow_ok) as target:
            sent: set[str] = set()
            for _ in range(4):
                results = await api.send_batch(
                    "crashy", [{"target": target.url, "timeout_seconds": 1} for _ in range(500)]
                )
                sent.update(r["id"] for r in results)
            await target.wait_for(lambda: len(target.received) >= 300, timeout=30)
            server.kill()  # SIGKILL with deliveries in flight and leases held
            in_flight_at_kill = len(target.received)
            assert in_flight_at_kill < len(sent)
            await server.start()
            await target.wait_for(lambda: set(target.delivered_ids()) >= sent, timeout=90)
            assert set(target.delivered_ids()) == sent
            # Deliveries the killed process made but never recorded are made again (at
            # least once): wait until every message is recorded as completed.
            await wait_completed(database_url, len(sent), timeout=30)
    finally:
        await api.close()
        server.kill()


@pytest.fixture
def private_postgres() -> EmbeddedPostgres:
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="ap4k-pg-restart-")) / "data")
    pg.init()
    pg.start()
    yield pg  # type: ignore[misc]
    pg.remove()


async def test_postgres_restart_mid_run_loses_nothing(private_postgres: EmbeddedPostgres) -> None:
    database_url = await create_database(private_postgres.url)
    server = await ServerProcess(database_url, "--dispatchers", "8", "--lease-seconds", "2").start()
    api = Api(server.url)
    accepted: set[str] = set()

    async def producer(count: int) -> None:
        """Sends one message at a time and retries until each one is accepted."""
        n = 0
        while n < count:
            try:
                status, body = await api.call(
                    "POST",
                    "/v1/queues/restarts/messages",
                    json={"target": target.url, "body": {"n": n}, "timeout_seconds": 1},
                )
            except (aiohttp.ClientError, OSError):
                status, body = 0, None
            if status == 202:
                accepted.add(body["id"])
                n += 1
            else:
                assert status in (0, 503), (status, body)
                await asyncio.sleep(0.05)

    try:
        async with sink(slow_ok) as target:
            producing = asyncio.create_task(producer(600))
            await target.wait_for(lambda: len(target.received) >= 100, timeout=30)
            await asyncio.to_thread(private_postgres.stop, "immediate")
            await asyncio.sleep(2.0)
            await asyncio.to_thread(private_postgres.start)
            await producing
            await target.wait_for(lambda: set(target.delivered_ids()) >= accepted, timeout=90)
            assert len(accepted) == 600
            unfinished = "SELECT count(*) FROM ap4k_messages WHERE state <> 'completed'"
            for _ in range(300):
                if await count_rows(database_url, unfinished) == 0:
                    break
                await asyncio.sleep(0.1)
            assert await count_rows(database_url, unfinished) == 0
    finally:
        await api.close()
        server.kill()


async def test_sigterm_drains_in_flight_and_releases_the_rest(database_url: str) -> None:
    async def slow(_: Received, __: int) -> int:
        await asyncio.sleep(0.5)
        return 200

    server = await ServerProcess(database_url, "--dispatchers", "4", "--drain-seconds", "5").start()
    api = Api(server.url)
    try:
        async with sink(slow) as target:
            sent = {
                r["id"]
                for r in await api.send_batch(
                    "draining", [{"target": target.url} for _ in range(50)]
                )
            }
            await target.wait_for(lambda: len(target.received) >= 4, timeout=10)
            exit_code = await asyncio.to_thread(server.terminate)
            assert exit_code == 0
            started = {r.message_id for r in target.received}
            # What was in flight finished and was recorded; the rest went back, unspent.
            completed = await count_rows(
                database_url, "SELECT count(*) FROM ap4k_messages WHERE state = 'completed'"
            )
            assert completed == len(started)
            assert await count_rows(
                database_url,
                "SELECT count(*) FROM ap4k_messages WHERE state = 'available' AND attempt = 0",
            ) == len(sent) - len(started)
            await server.start()
            await target.wait_for(lambda: set(target.delivered_ids()) >= sent, timeout=60)
    finally:
        await api.close()
        server.kill()


async def test_a_delivery_cut_off_by_the_drain_counts_as_an_attempt(database_url: str) -> None:
    async def slow_first(_: Received, nth: int) -> int:
        if nth == 1:
            await asyncio.sleep(3.0)  # longer than the drain's grace
        return 200

    server = await ServerProcess(
        database_url, "--dispatchers", "2", "--drain-seconds", "0.5"
    ).start()
    api = Api(server.url)
    try:
        async with sink(slow_first) as target:
            await api.settings("cutoff", min_backoff_seconds=0.01, max_backoff_seconds=0.01)
            sent = await api.send("cutoff", {"target": target.url, "timeout_seconds": 10})
            await target.wait_for(lambda: len(target.received) == 1, timeout=10)
            assert await asyncio.to_thread(server.terminate) == 0
            # It may have reached the target: not handed back as untried (attempt 0), but
            # recorded as a failed attempt to retry. Its retry is due at once, so the
            # scheduler of the stopping server may already have made it available again.
            cut = await count_rows(
                database_url,
                "SELECT count(*) FROM ap4k_messages WHERE state IN ('retryable', 'available')"
                " AND attempt = 1 AND last_error LIKE 'abandoned%'",
            )
            assert cut == 1
            await server.start()
            done = await api.wait_state(sent["id"], "completed", timeout=20)
            assert done["attempt"] == 2
            assert [r.attempt for r in target.received] == [1, 2]
    finally:
        await api.close()
        server.kill()


RESTARTS = 12


async def test_postgres_restarted_under_enqueue_load_answers_only_202_or_503(
    private_postgres: EmbeddedPostgres,
) -> None:
    """PostgreSQL stopped (fast and immediate, by turns) and started again 12 times while
    16 producers enqueue: every answer is a 202 or a 503 with the JSON error and Retry-After,
    never a 500, and every message answered 202 reaches the target once PostgreSQL is back.

    Producers retry a refused message under the same dedup_key, as the outbox does: a 503
    may come after a commit whose acknowledgement was lost."""
    database_url = await create_database(private_postgres.url)
    server = await ServerProcess(database_url, "--dispatchers", "8", "--lease-seconds", "2").start()
    api = Api(server.url)
    accepted: dict[str, str] = {}  # dedup key -> id
    statuses: Counter[int] = Counter()
    bad: list[tuple[int, object, str | None]] = []
    stop = asyncio.Event()

    async def producer(p: int) -> None:
        n = 0
        while not stop.is_set():
            key = f"{p}-{n}"
            try:
                async with api.session.post(
                    server.url + "/v1/queues/restarts/messages",
                    json={"target": target.url, "body": {"k": key}, "dedup_key": key},
                    timeout=aiohttp.ClientTimeout(total=30),
                ) as response:
                    status = response.status
                    text = await response.text()
                    retry_after = response.headers.get("Retry-After")
                    content_type = response.content_type
            except (aiohttp.ClientError, OSError, TimeoutError):
                statuses[0] += 1  # the server never answers with a broken connection...
                await asyncio.sleep(0.05)
                continue
            statuses[status] += 1
            if status == 202:
                accepted[key] = json.loads(text)["id"]
                n += 1
                continue
            if (
                status != 503
                or content_type != "application/json"
                or retry_after is None
                or set(json.loads(text)["error"]) != {"code", "message", "field"}
            ):
                bad.append((status, text[:300], retry_after))
            await asyncio.sleep(0.02)

    try:
        async with sink() as target:
            producers = [asyncio.create_task(producer(p)) for p in range(16)]
            await asyncio.sleep(1.0)
            for restart in range(RESTARTS):
                mode = "immediate" if restart % 2 else "fast"
                await asyncio.to_thread(private_postgres.stop, mode)
                await asyncio.sleep(0.5)
                await asyncio.to_thread(private_postgres.start)
                await asyncio.sleep(1.0)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*producers)
            ids = set(accepted.values())
            print(
                f"{RESTARTS} restarts, {sum(statuses.values())} requests, statuses {statuses},"
                f" {len(ids)} accepted"
            )
            try:
                await target.wait_for(lambda: set(target.delivered_ids()) >= ids, timeout=60)
            except TimeoutError:
                missing = sorted(int(i) for i in ids - set(target.delivered_ids()))
                conn = await asyncpg.connect(database_url)
                rows = await conn.fetch(
                    "SELECT id, state, attempt, leased_by, lease_expires_at, scheduled_at,"
                    " last_error FROM ap4k_messages WHERE id = ANY($1) LIMIT 10", missing
                )
                await conn.close()
                raise AssertionError((len(missing), missing[:10], [dict(r) for r in rows],
                                      server.log()[-3000:])) from None
            assert not bad, bad[:5]
            assert set(statuses) <= {0, 202, 503}, statuses
            assert statuses[503] > 0, "PostgreSQL was never seen down: the test tested nothing"
            assert len(ids) == len(accepted)  # one id per key: no retry made a second message
            assert set(target.delivered_ids()) >= ids
        log = server.log()
        assert "Future exception was never retrieved" not in log, log[-3000:]
        assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:3000]
    finally:
        stop.set()


async def test_a_drain_fits_its_budget_with_targets_slower_than_it(database_url: str) -> None:
    """SIGTERM with every dispatcher stuck on a target slower than the whole shutdown budget:
    the server exits within the budget (not after the drain grace it was also given), the
    cut-off deliveries count as attempts, the rest go back untried, and after a restart
    every message is delivered."""
    released = asyncio.Event()

    async def slow_until_released(_: Received, __: int) -> int:
        await released.wait()
        return 200

    budget = 5.0
    server = await ServerProcess(
        database_url, "--dispatchers", "4", "--drain-seconds", "60",
        "--shutdown-seconds", str(budget),
    ).start()
    api = Api(server.url)
    try:
        async with sink(slow_until_released) as target:
            await api.settings("budget", min_backoff_seconds=0.01, max_backoff_seconds=0.01)
            sent = {
                r["id"]
                for r in await api.send_batch(
                    "budget", [{"target": target.url, "timeout_seconds": 120} for _ in range(12)]
                )
            }
            await target.wait_for(lambda: len(target.received) == 4, timeout=20)
            started = time.monotonic()
            assert await asyncio.to_thread(server.terminate) == 0
            took = time.monotonic() - started
            assert took < budget + 2, f"the drain took {took:.1f}s for a {budget:g}s budget"
            unfinished = await count_rows(
                database_url,
                "SELECT count(*) FROM ap4k_messages WHERE queue = 'budget'"
                " AND state IN ('retryable', 'available')",
            )
            cut_off = await count_rows(
                database_url,
                "SELECT count(*) FROM ap4k_messages WHERE queue = 'budget'"
                " AND attempt = 1 AND last_error LIKE 'abandoned%'",
            )
            assert (unfinished, cut_off) == (12, 4)
            released.set()
            before = len(target.received)
            await server.start()
            await target.wait_for(
                lambda: {r.message_id for r in target.received[before:]} >= sent, timeout=60
            )
    finally:
        await api.close()
        server.kill()


async def test_a_crashed_servers_deliveries_come_back_within_about_a_lease(
    database_url: str,
) -> None:
    """SIGKILL while direct hand-offs (messages inserted already leased) are in flight to a
    target that never answers: with a 3 s lease (renewed while the process lives) they are
    delivered again soon after, not after twice their 30 s timeout."""
    released = asyncio.Event()

    async def hang_first(_: Received, __: int) -> int:
        await released.wait()
        return 200

    server = await ServerProcess(
        database_url, "--dispatchers", "4", "--lease-seconds", "3"
    ).start()
    api = Api(server.url)
    try:
        async with sink(hang_first) as target:
            sent = [
                (await api.send("crash", {"target": target.url, "timeout_seconds": 30}))["id"]
                for _ in range(3)
            ]
            await target.wait_for(lambda: len(target.received) == 3, timeout=20)
            await asyncio.sleep(4)  # past one lease: only the heartbeat keeps them leased
            assert await count_rows(
                database_url,
                "SELECT count(*) FROM ap4k_messages WHERE queue = 'crash' AND state = 'running'"
                " AND lease_expires_at > now()",
            ) == 3
            server.kill()
            released.set()
            before = len(target.received)
            await server.start()
            # Lease (3 s) + the rescuer's round: well inside the old 61 s.
            await target.wait_for(
                lambda: {r.message_id for r in target.received[before:]} >= set(sent),
                timeout=25,
            )
    finally:
        await api.close()
        server.kill()


async def test_a_delivery_slower_than_its_lease_is_renewed_not_redelivered(
    database_url: str,
) -> None:
    async def slower_than_the_lease(_: Received, __: int) -> int:
        await asyncio.sleep(5)
        return 200

    server = await ServerProcess(
        database_url, "--dispatchers", "2", "--lease-seconds", "2"
    ).start()
    api = Api(server.url)
    try:
        async with sink(slower_than_the_lease) as target:
            sent = await api.send("renewed", {"target": target.url, "timeout_seconds": 30})
            done = await api.wait_state(sent["id"], "completed", timeout=30)
            assert done["attempt"] == 1
            assert [r.attempt for r in target.received] == [1]  # never handed out twice
    finally:
        await api.close()
        server.kill()
