"""`Client`: the same API for synchronous code (Django, Flask, scripts, Celery tasks).

It runs an `AsyncClient` on a private event loop in a daemon thread and waits for each
call. One implementation of failover, retries and errors serves both clients, the
connections are kept alive across calls, and the client can be shared by many threads
(every call is handed to the one loop). It is fork-aware: a child process that inherits a
`Client` (gunicorn's preload) transparently starts its own loop on first use.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

from ap4k.client.async_client import DEFAULT_SERVER_URL, AsyncClient
from ap4k.client.models import (
    JSON,
    Cancelled,
    DeadLetters,
    Enqueued,
    Message,
    MessageOptions,
    NewMessage,
    Queue,
    QueueSettings,
)
from ap4k.core.retry import RetryPolicy

T = TypeVar("T")


class _LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="ap4k-client-loop", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            raise RuntimeError("Client called from its own loop thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


class Client:
    """A synchronous client; the arguments are those of `AsyncClient`."""

    def __init__(
        self,
        urls: str | Iterable[str] = DEFAULT_SERVER_URL,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        connect_timeout: float = 3.0,
        retry: RetryPolicy | None = None,
        user_agent: str = "ap4k-client",
        max_request_bytes: int = 512 * 1024,
    ) -> None:
        self._options: dict[str, Any] = {
            "max_request_bytes": max_request_bytes,
            "urls": list(urls) if not isinstance(urls, str) else urls,
            "token": token,
            "timeout": timeout,
            "connect_timeout": connect_timeout,
            "retry": retry,
            "user_agent": user_agent,
        }
        self._lock = threading.Lock()
        self._pid = -1
        self._runner: _LoopThread | None = None
        self._async: AsyncClient | None = None
        self.urls = AsyncClient(**self._options).urls  # validates the URLs up front

    def _call(self, make: Any, *args: Any, **kwargs: Any) -> Any:
        runner, client = self._ensure()
        return runner.run(make(client, *args, **kwargs))

    def _ensure(self) -> tuple[_LoopThread, AsyncClient]:
        with self._lock:
            if self._runner is None or self._async is None or self._pid != os.getpid():
                # First use, or a forked child: the parent's thread does not exist here.
                self._runner = _LoopThread()
                self._async = AsyncClient(**self._options)
                self._pid = os.getpid()
            return self._runner, self._async

    @property
    def current_url(self) -> str:
        return self._async.current_url if self._async is not None else self.urls[0]

    def close(self) -> None:
        with self._lock:
            runner, client = self._runner, self._async
            self._runner = self._async = None
        if runner is not None and client is not None and self._pid == os.getpid():
            runner.run(client.close())
            runner.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def send(
        self,
        queue: str,
        target: str,
        body: JSON = None,
        *,
        retry: RetryPolicy | None = None,
        **options: Unpack[MessageOptions],
    ) -> Enqueued:
        """Enqueue one message; returns once the server has committed it (retried as
        `AsyncClient.send` is)."""
        message = NewMessage(target, body, **options)
        return self.send_message(queue, message, retry=retry)

    def send_message(
        self, queue: str, message: NewMessage, *, retry: RetryPolicy | None = None
    ) -> Enqueued:
        result: Enqueued = self._call(AsyncClient.send_message, queue, message, retry=retry)
        return result

    def send_many(
        self,
        queue: str,
        messages: Sequence[NewMessage | Mapping[str, JSON]],
        *,
        retry: RetryPolicy | None = None,
    ) -> list[Enqueued]:
        result: list[Enqueued] = self._call(AsyncClient.send_many, queue, messages, retry=retry)
        return result

    def get(self, message_id: str) -> Message:
        result: Message = self._call(AsyncClient.get, message_id)
        return result

    def cancel(self, message_id: str) -> Cancelled:
        result: Cancelled = self._call(AsyncClient.cancel, message_id)
        return result

    def queues(self) -> list[Queue]:
        result: list[Queue] = self._call(AsyncClient.queues)
        return result

    def queue(self, name: str) -> Queue:
        result: Queue = self._call(AsyncClient.queue, name)
        return result

    def set_queue(self, name: str, settings: QueueSettings | None = None, **fields: JSON) -> Queue:
        result: Queue = self._call(AsyncClient.set_queue, name, settings, **fields)
        return result

    def dead_letters(
        self, queue: str, *, limit: int = 100, after: str | None = None
    ) -> DeadLetters:
        result: DeadLetters = self._call(AsyncClient.dead_letters, queue, limit=limit, after=after)
        return result

    def iter_dead_letters(self, queue: str, *, page_size: int = 100) -> Iterator[Message]:
        after: str | None = None
        while True:
            page = self.dead_letters(queue, limit=page_size, after=after)
            yield from page.messages
            if page.next is None or not page.messages:
                return
            after = page.next

    def redrive(self, queue: str, ids: Sequence[str] | None = None) -> int:
        result: int = self._call(AsyncClient.redrive, queue, ids)
        return result

    def purge_dead(self, queue: str) -> int:
        result: int = self._call(AsyncClient.purge_dead, queue)
        return result

    def ready(self) -> bool:
        result: bool = self._call(AsyncClient.ready)
        return result
