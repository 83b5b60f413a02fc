"""The HTTP side of forwarding: outbox rows → POSTs of `{"messages": [...]}` to the server.

Rows are grouped per queue (queues are sent concurrently), kept in outbox order within a
queue, and cut into POSTs under `max_request_bytes`. A 4xx for a chunk means one of its
messages is refused for good (say, a target outside the allow-list, or a body over the size
limit); it must not block the outbox, so the chunk is split until the culprit is found, the
others go through and that row is reported as rejected. A 4xx that is about the forwarder's
own setup (wrong token, wrong URL) is not the messages' fault: it stops the round instead.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import orjson

from ap4k.client.async_client import AsyncClient
from ap4k.client.errors import ApiError, ServerUnavailable
from ap4k.client.models import JSON

# A 4xx with these statuses is about the forwarder's setup (token, URL), not one message:
# back off and keep the rows rather than reject them all.
SETUP_ERROR_STATUSES = frozenset({401, 404, 405})


@dataclass(slots=True)
class Row:
    """A claimed outbox row."""

    id: int
    queue: str
    message: str  # the stored JSON text
    ordering_key: str | None
    delay_seconds: float  # what is left of the delay


@dataclass(slots=True)
class Outcome:
    acked: list[int] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    # Why the rest was not sent (server down, setup error); what was acked still counts.
    error: Exception | None = None


class Relay:
    def __init__(self, client: AsyncClient, key_prefix: str, max_request_bytes: int) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.max_request_bytes = max_request_bytes

    async def send(self, rows: list[Row]) -> Outcome:
        """POST the rows, per queue (queues concurrently), in outbox order within each."""
        by_queue: dict[str, list[Row]] = {}
        for row in rows:
            by_queue.setdefault(row.queue, []).append(row)
        results = await asyncio.gather(
            *(self._send_queue(queue, group) for queue, group in by_queue.items())
        )
        outcome = Outcome()
        for result in results:
            outcome.acked.extend(result.acked)
            outcome.rejected.extend(result.rejected)
            outcome.error = outcome.error or result.error
        return outcome

    async def _send_queue(self, queue: str, rows: list[Row]) -> Outcome:
        """One queue's rows, chunk after chunk; stop at the first chunk that fails so that
        no later row overtakes it."""
        outcome = Outcome()
        for chunk in self._chunks(rows):
            try:
                done = await self._send_chunk(queue, chunk)
            except (ServerUnavailable, ApiError) as exc:
                outcome.error = exc
                break
            outcome.acked.extend(done.acked)
            outcome.rejected.extend(done.rejected)
        return outcome

    def _chunks(self, rows: list[Row]) -> list[list[Row]]:
        chunks: list[list[Row]] = []
        current: list[Row] = []
        size = 0
        for row in rows:
            # The stored JSON's length is close to what goes on the wire (+ the dedup key).
            row_size = len(row.message) + 100
            if current and size + row_size > self.max_request_bytes:
                chunks.append(current)
                current, size = [], 0
            current.append(row)
            size += row_size
        if current:
            chunks.append(current)
        return chunks

    async def _send_chunk(self, queue: str, rows: list[Row]) -> Outcome:
        try:
            await self.client.send_json_batch(queue, [self.payload(r) for r in rows])
        except ApiError as exc:
            if exc.status in SETUP_ERROR_STATUSES:
                raise
            if len(rows) == 1:
                return Outcome(rejected=[(rows[0].id, str(exc))])
            # Which message is it? Split until found; the others go through (the server
            # wrote nothing of a refused batch, so nothing is sent twice).
            middle = len(rows) // 2
            head = await self._send_chunk(queue, rows[:middle])
            tail = await self._send_chunk(queue, rows[middle:])
            return Outcome(head.acked + tail.acked, head.rejected + tail.rejected)
        return Outcome(acked=[r.id for r in rows])

    def payload(self, row: Row) -> dict[str, JSON]:
        """The API form of a row: its dedup key is the outbox's identity and the row id
        (unless the application chose one), and what is left of its delay."""
        message: dict[str, JSON] = orjson.loads(row.message)
        if message.get("dedup_key") is None:
            message["dedup_key"] = f"{self.key_prefix}{row.id}"
        if row.delay_seconds and row.delay_seconds > 0:
            message["delay_seconds"] = round(row.delay_seconds, 3)
        return message
