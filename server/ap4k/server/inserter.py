"""Group commit for enqueues: concurrent requests share INSERT statements and commits.

PostgreSQL commits one row at ~25,000/s but 100 rows at ~350,000 rows/s. Requests that
arrive while a statement is in flight wait for the next one and go in together, so a burst
of single-message POSTs costs a handful of commits. No request is answered before the
statement holding its rows has committed.

A second statement starts beside the one in flight once as many rows wait as it holds, so
that one statement's execution overlaps the other's commit and the server's parsing of the
next requests, without splitting groups (docs/performance.md, "The enqueue path, fifth
pass").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import asyncpg

from ap4k.server.store import EnqueueRow, Store

log = logging.getLogger("ap4k.inserter")

MAX_ROWS_PER_STATEMENT = 2000

Results = list[tuple[int, str, bool]]  # per row: id, state, duplicate
# Called with a request's results once the statement holding its rows ended (None: it failed).
Ended = Callable[[Results | None], None]
Pending = tuple[Sequence[EnqueueRow], "asyncio.Future[Results]", Ended | None]


class Inserter:
    def __init__(
        self,
        store: Store,
        on_committed: Callable[[Sequence[EnqueueRow], list[tuple[int, str, bool]]], None],
        concurrency: int = 2,
        lease_seconds: float = 30.0,
    ) -> None:
        self._store = store
        self._lease_seconds = lease_seconds
        self._on_committed = on_committed
        self._concurrency = concurrency
        self._pending: list[Pending] = []
        self._pending_rows = 0
        self._in_flight_rows = 0  # in the statements executing now
        self._flushers = 0
        self._flushing: set[asyncio.Task[None]] = set()

    async def drain(self) -> None:
        """Until every insert requested so far is committed or has failed (whether or not
        its request is still waiting: the flushers write whatever was submitted)."""
        await asyncio.gather(*self._flushing, return_exceptions=True)

    async def insert(self, rows: Sequence[EnqueueRow]) -> list[tuple[int, str, bool]]:
        return await self.submit(rows)

    def submit(
        self, rows: Sequence[EnqueueRow], ended: Ended | None = None
    ) -> asyncio.Future[Results]:
        """The future of the rows' results, set once the statement holding them committed
        (a future, not a coroutine: the enqueue route needs no task of its own per request).

        `ended` is called with the results (None: the statement failed) when the statement
        ends, before the future is answered and whatever became of it: a request cancelled
        (at shutdown) while its rows may still commit still gets its rows' follow-up done.
        A call rather than the future's done-callback and `asyncio.shield`, which cost every
        request a second future and three more callbacks through the event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Results] = loop.create_future()
        self._pending.append((rows, future, ended))
        self._pending_rows += len(rows)
        if self._flushers == 0 or (
            self._flushers < self._concurrency and self._full_group_waits()
        ):
            self._flushers += 1
            flusher = loop.create_task(self._flush())
            self._flushing.add(flusher)  # the loop holds tasks only weakly
            flusher.add_done_callback(self._flushing.discard)
        return future

    def _full_group_waits(self) -> bool:
        """Whether a statement may start beside the one in flight: as many rows wait as it
        holds. One started for whatever waits (the first request to arrive, say) would split
        the groups: statements would shrink, and what each costs per row would grow."""
        return 0 < self._in_flight_rows <= self._pending_rows

    async def _flush(self) -> None:
        """Statements for the waiting requests, one after another, while this is the only
        flusher or a full group waits. A flusher leaves the rest to the other one still
        running, and the last one takes whatever waits: no request is left behind."""
        try:
            while self._pending and (self._flushers == 1 or self._full_group_waits()):
                batch: list[Pending] = []
                count = 0
                while self._pending and (
                    not batch or count + len(self._pending[0][0]) <= MAX_ROWS_PER_STATEMENT
                ):
                    item = self._pending.pop(0)
                    batch.append(item)
                    count += len(item[0])
                self._pending_rows -= count
                self._in_flight_rows += count
                try:
                    if not await self._insert(batch):
                        # A row PostgreSQL refuses fails the whole statement: insert each
                        # request's rows on their own, so that only the request at fault fails.
                        for item in batch:
                            await self._insert([item])
                finally:
                    self._in_flight_rows -= count
        finally:
            self._flushers -= 1

    async def _insert(self, batch: list[Pending]) -> bool:
        """One statement for the batch; each request's future gets its results or the error.
        False (and nothing answered) when a batch of several requests met a DataError."""
        rows = [row for item_rows, _, _ in batch for row in item_rows]
        try:
            results = await self._store.enqueue(rows, self._lease_seconds)
        except asyncio.CancelledError:
            for _, future, ended in batch:
                _call(ended, None)
                future.cancel()
            raise
        except Exception as exc:
            if isinstance(exc, asyncpg.DataError) and len(batch) > 1:
                return False
            for _, future, ended in batch:
                _call(ended, None)
                if not future.done():
                    future.set_exception(exc)
            return True
        self._on_committed(rows, results)
        offset = 0
        for item_rows, future, ended in batch:
            mine = results[offset : offset + len(item_rows)]
            offset += len(item_rows)
            _call(ended, mine)
            if not future.done():
                future.set_result(mine)
        return True


def _call(ended: Ended | None, results: Results | None) -> None:
    """`ended(results)`; its failure is logged, never let through: the other requests of the
    statement must still be answered."""
    if ended is None:
        return
    try:
        ended(results)
    except Exception:
        log.exception("the follow-up of an enqueue failed")
