"""Group commit (inserter.py, store.enqueue) when things go wrong: a row PostgreSQL refuses
fails only its own request, and a duplicate whose original vanishes mid-enqueue is inserted
afresh instead of failing. Real PostgreSQL; the race is made deterministic with its locks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import aiohttp
import asyncpg
import pytest

from ap4k.core import wire
from ap4k.core.embedded_pg import free_port
from ap4k.server.app import Server, ServerSettings
from ap4k.server.inserter import Inserter
from ap4k.server.store import EnqueueRow, Store
from ap4k_testkit import Api, StartServer, count_rows, sink


def row(target: str, dedup_key: str | None = None) -> EnqueueRow:
    message = wire.MessageIn(target=target, dedup_key=dedup_key, timeout_seconds=30.0)
    return EnqueueRow(queue="grouped", message=message, target=target, body=b"{}")


async def test_a_row_postgresql_refuses_fails_only_its_own_request(database_url: str) -> None:
    store = await Store.connect(database_url, min_size=1, max_size=2)
    committed: list[Sequence[EnqueueRow]] = []
    try:
        await store.migrate()
        await store.ensure_queues(["grouped"])
        inserter = Inserter(store, lambda rows, _results: committed.append(rows))
        # Three requests that arrive together and share one statement; the middle one holds
        # a NUL, which no text column can store (validation refuses it before this point;
        # this is the backstop for whatever validation may miss).
        good_1, bad, good_2 = await asyncio.gather(
            inserter.insert([row("http://127.0.0.1:9/a"), row("http://127.0.0.1:9/b")]),
            inserter.insert([row("http://127.0.0.1:9/\x00")]),
            inserter.insert([row("http://127.0.0.1:9/c")]),
            return_exceptions=True,
        )
        assert isinstance(bad, asyncpg.DataError), bad
        assert isinstance(good_1, list) and len(good_1) == 2, good_1
        assert isinstance(good_2, list) and len(good_2) == 1, good_2
        assert await count_rows(database_url, "SELECT count(*) FROM ap4k_messages") == 3
        assert sorted(len(rows) for rows in committed) == [1, 2]
    finally:
        await store.close()


async def test_each_requests_follow_up_runs_when_its_statement_ends(database_url: str) -> None:
    """`ended` gets each request's results (None when its INSERT failed) even when the
    request stopped waiting, and one that fails leaves the other requests answered."""
    store = await Store.connect(database_url, min_size=1, max_size=2)
    ended: dict[str, list[tuple[int, str, bool]] | None] = {}

    def follow_up(name: str) -> Callable[[list[tuple[int, str, bool]] | None], None]:
        def record(results: list[tuple[int, str, bool]] | None) -> None:
            ended[name] = results
            if name == "failing":
                raise RuntimeError("a follow-up that fails")

        return record

    try:
        await store.migrate()
        await store.ensure_queues(["grouped"])
        inserter = Inserter(store, lambda rows, _results: None)
        gone = inserter.submit([row("http://127.0.0.1:9/gone")], follow_up("gone"))
        failing = inserter.submit([row("http://127.0.0.1:9/a")], follow_up("failing"))
        refused = inserter.submit([row("http://127.0.0.1:9/\x00")], follow_up("refused"))
        last = inserter.submit([row("http://127.0.0.1:9/b")], follow_up("last"))
        gone.cancel()  # its request went away (a shutdown): the rows still go in
        await inserter.drain()
        assert gone.cancelled()
        assert len(failing.result()) == 1 and len(last.result()) == 1
        assert isinstance(refused.exception(), asyncpg.DataError)
        assert ended["refused"] is None
        assert [len(ended[name] or []) for name in ("gone", "failing", "last")] == [1, 1, 1]
        assert await count_rows(database_url, "SELECT count(*) FROM ap4k_messages") == 3
    finally:
        await store.close()


async def test_a_second_statement_starts_only_once_a_full_group_waits(database_url: str) -> None:
    """The inserter overlaps two statements without splitting groups: requests that arrive
    while one statement is in flight wait until as many rows as it holds are waiting, and
    the last flusher left takes whatever still waits. The statements are held by a table
    lock, so that what is in flight at each step is known."""
    store = await Store.connect(database_url, min_size=1, max_size=4)
    committed: list[int] = []
    holder = await asyncpg.connect(database_url)
    observer = await asyncpg.connect(database_url)
    try:
        await store.migrate()
        await store.ensure_queues(["grouped"])
        inserter = Inserter(store, lambda rows, _results: committed.append(len(rows)))
        rows = [row(f"http://127.0.0.1:9/{i}") for i in range(10)]
        lock = holder.transaction()
        await lock.start()
        await holder.execute("LOCK TABLE ap4k_messages IN SHARE MODE")  # INSERTs wait on it
        first = inserter.submit(rows[:4])
        await wait_for_lock_waits(observer, 1)
        # 3 rows wait beside the 4 in flight: not a full group, no second statement.
        short = inserter.submit(rows[4:7])
        await asyncio.sleep(0.2)
        assert await lock_waits(observer) == 1
        # 5 rows wait: a second statement takes both requests.
        full = inserter.submit(rows[7:9])
        await wait_for_lock_waits(observer, 2)
        # One more, behind two statements: it must not be left behind.
        last = inserter.submit(rows[9:])
        await lock.rollback()
        results = await asyncio.wait_for(asyncio.gather(first, short, full, last), 10)
        await inserter.drain()
        assert [len(r) for r in results] == [4, 3, 2, 1]
        assert sorted(committed[:2]) == [4, 5] and committed[2:] == [1]  # either may end first
        assert await count_rows(database_url, "SELECT count(*) FROM ap4k_messages") == 10
    finally:
        await holder.close()
        await observer.close()
        await store.close()


async def lock_waits(conn: asyncpg.Connection) -> int:
    waiting: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    return waiting


async def test_a_duplicate_whose_original_is_deleted_mid_enqueue_is_inserted_afresh(
    start_server: StartServer, database_url: str
) -> None:
    """The enqueue's INSERT skips a dedup key committed concurrently (its snapshot cannot see
    the original), then looks the original up; if the original was purged or pruned in
    between, the message is inserted again, not refused with a 500.

    The interleaving is forced: another transaction holds an uncommitted row with the key (the
    INSERT waits for it), a table lock is queued behind the INSERT (so the look-up waits for
    it), and the lock holder deletes the original before letting the look-up run."""
    _, api = await start_server(dispatchers=0)
    await api.settings("racy", paused=True)
    original = await asyncpg.connect(database_url)
    locker = await asyncpg.connect(database_url)
    observer = await asyncpg.connect(database_url)
    try:
        original_tx = original.transaction()
        await original_tx.start()
        await original.execute(
            "INSERT INTO ap4k_messages (id, queue, state, target, lease_order, dedup_key)"
            " VALUES (nextval('ap4k_messages_id_seq'), 'racy', 'available',"
            " 'http://127.0.0.1:9/', 0, 'k')"
        )
        async with sink() as target:
            sending = asyncio.create_task(
                api.call(
                    "POST", "/v1/queues/racy/messages", {"target": target.url, "dedup_key": "k"}
                )
            )
            await wait_for_lock_waits(observer, 1)  # the INSERT waits for `original`
            locker_tx = locker.transaction()
            await locker_tx.start()
            locking = asyncio.create_task(
                locker.execute("LOCK TABLE ap4k_messages IN ACCESS EXCLUSIVE MODE")
            )
            await wait_for_lock_waits(observer, 2)  # and the table lock waits for the INSERT
            await original_tx.commit()
            await locking  # the INSERT skipped the key and committed; the look-up waits
            await locker.execute("DELETE FROM ap4k_messages WHERE dedup_key = 'k'")
            await locker_tx.commit()
            status, body = await sending
        assert status == 202, body
        assert body["duplicate"] is False, body
        stored = await api.message(body["id"])
        assert stored["dedup_key"] == "k" and stored["state"] == "available"
        assert await count_rows(database_url, "SELECT count(*) FROM ap4k_messages") == 1
    finally:
        for conn in (original, locker, observer):
            await conn.close()


async def wait_for_lock_waits(conn: asyncpg.Connection, count: int) -> None:
    for _ in range(500):
        if await lock_waits(conn) >= count:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"expected {count} sessions waiting for a lock")


async def test_an_enqueue_cancelled_at_shutdown_after_its_insert_gives_the_lease_back(
    database_url: str,
) -> None:
    """A message inserted leased to this server's dispatchers (direct hand-off) whose request
    was cancelled by the shutdown before its INSERT committed is released when the INSERT
    does commit: available at once for the next server, not `running` until its lease
    expires a minute later."""
    port = free_port()
    server = Server(
        ServerSettings(
            host="127.0.0.1", port=port, database_url=database_url, dispatchers=2,
            drain_grace_seconds=0.5, pool_size=4,
        )
    )
    await server.start()
    api = Api(f"http://127.0.0.1:{port}")
    blocker = await asyncpg.connect(database_url)
    try:
        await api.settings("cut")
        # An uncommitted row with the message's dedup key: its INSERT waits for this
        # transaction to end (and nothing else does).
        block = blocker.transaction()
        await block.start()
        await blocker.execute(
            "INSERT INTO ap4k_messages (id, queue, state, target, lease_order, dedup_key)"
            " VALUES (nextval('ap4k_messages_id_seq'), 'cut', 'scheduled',"
            " 'http://127.0.0.1:9/', 0, 'k')"
        )
        sending = asyncio.create_task(
            api.call(
                "POST",
                "/v1/queues/cut/messages",
                {"target": "http://127.0.0.1:9/", "dedup_key": "k"},
            )
        )
        observer = await asyncpg.connect(database_url)
        try:
            await wait_for_lock_waits(observer, 1)
        finally:
            await observer.close()
        stopping = asyncio.create_task(server.stop())
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await sending  # the shutdown cancelled the request
        await block.rollback()  # now the INSERT commits, leased to the stopped dispatchers
        await stopping
    finally:
        await blocker.close()
        await api.close()
    rows = await count_rows(
        database_url,
        "SELECT count(*) FROM ap4k_messages WHERE state = 'available' AND attempt = 0"
        " AND leased_by IS NULL",
    )
    assert rows == 1
