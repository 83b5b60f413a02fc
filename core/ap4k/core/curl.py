"""libcurl's multi interface (pycurl) on the running asyncio loop: the deliveries' HTTP client.

Why libcurl and not aiohttp: on the delivery path it costs less than half of aiohttp's CPU per
request (docs/performance.md, "Outbound HTTP clients"), because the whole exchange — request,
response parsing, keep-alive, per-request timeouts — runs in C; Python runs only when one of
the sockets is ready and when a transfer ends. `LoopMulti` drives libcurl from the event loop
(libcurl's multi-socket API); `CurlClient` sets each request up and collects its answer.

What libcurl is told for every request: no redirects, no proxy from the environment, TLS
verified against the system's certificates, a total timeout, and (`guard`) a check of every
address right before the socket is opened, so that a name cannot resolve its way past the
link-local guard.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import pycurl

# What the guard says about an address it refuses: None allows it.
Guard = Callable[[str], str | None]


def _ca_file() -> str | None:
    """The system's certificate bundle, as Python's ssl module finds it (the wheel's libcurl
    looks where its build machine kept one)."""
    paths = ssl.get_default_verify_paths()
    for path in (os.environ.get(paths.openssl_cafile_env), paths.cafile, paths.openssl_cafile):
        if path and os.path.exists(path):
            return path
    return None


CA_FILE = _ca_file()


class CurlError(Exception):
    """A transfer that got no answer: libcurl's error code and message, or the guard's
    refusal (`refused`)."""

    def __init__(self, code: int, message: str, refused: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.refused = refused

    @property
    def timed_out(self) -> bool:
        return self.code == pycurl.E_OPERATION_TIMEDOUT


@dataclass(slots=True)
class Answer:
    status: int
    head: list[bytes]  # the header lines as received, status line first
    body: bytes  # its first `keep_body_bytes` (CurlClient): the rest was read and dropped

    @property
    def reason(self) -> str:
        for line in reversed(self.head):
            if line.startswith(b"HTTP/"):
                parts = line.decode("latin-1").strip().split(" ", 2)
                return parts[2] if len(parts) > 2 else ""
        return ""

    def header(self, name: str) -> str | None:
        prefix = name.lower().encode() + b":"
        for line in reversed(self.head):
            if line[: len(prefix)].lower() == prefix:
                return line[len(prefix) :].decode("latin-1").strip()
        return None


@dataclass(slots=True)
class _Transfer:
    keep_bytes: int
    head: list[bytes] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)
    kept: int = 0
    refused: str | None = None

    def write(self, chunk: bytes) -> None:
        """Keep the body's first `keep_bytes`; read the rest and drop it, so an endless or
        huge answer costs no memory and the connection stays reusable."""
        if self.kept < self.keep_bytes:
            chunk = chunk[: self.keep_bytes - self.kept]
            self.body.append(chunk)
            self.kept += len(chunk)


class LoopMulti:
    """A libcurl multi handle driven by the running event loop (libcurl's multi-socket API):
    libcurl says which sockets it waits on and when its next timeout is due; the loop calls it
    back when one is ready or due. Use from one event loop.

    Why not pycurl's own AsyncCurlMulti: its socket callback alone took 6-7 % of the server's
    busy time (docs/performance.md, "the delivery path"). libcurl lets go of a keep-alive
    connection's socket after every transfer (CURL_POLL_REMOVE) and asks for it again with the
    next one, and each time AsyncCurlMulti removed and re-added a reader on the event loop: on
    uvloop 7.5 epoll_ctl calls per transfer, as libuv checks every new poll handle with an
    extra add and delete. Here libcurl's sockets are watched in an epoll set of their own, one
    epoll_ctl each time libcurl starts or stops waiting on a socket, and the event loop watches
    only that set's descriptor: one callback takes every socket that is ready. (Where there
    is no epoll, each socket gets its own reader on the loop, as AsyncCurlMulti does it.)
    Also per transfer: no done-callback, libcurl's finished transfers are collected only when
    its count of running ones falls, and a timer is re-armed only when libcurl's next timeout
    comes sooner (one that fires early asks libcurl for the current one).
    """

    def __init__(self, use_epoll: bool = hasattr(select, "epoll")) -> None:
        self._multi = pycurl.CurlMulti()
        self._multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self._multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self._epoll = select.epoll() if use_epoll else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[pycurl.Curl, asyncio.Future[tuple[int, str]]] = {}
        self._watched: dict[int, int] = {}  # fd -> what it is watched for (POLL_IN | POLL_OUT)
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._timer_at = 0.0
        self._closed = False

    def setopt(self, option: int, value: int) -> None:
        self._multi.setopt(option, value)

    async def perform(self, handle: pycurl.Curl) -> tuple[int, str]:
        """Runs one transfer: (0, "") once it has ended well, else libcurl's error code and
        message. Cancelling the caller removes the transfer."""
        if self._closed:
            return pycurl.E_FAILED_INIT, "the HTTP client is closed"
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            if self._epoll is not None:
                self._loop.add_reader(self._epoll.fileno(), self._ready)
        done: asyncio.Future[tuple[int, str]] = self._loop.create_future()
        self._pending[handle] = done
        try:
            self._multi.add_handle(handle)
        except pycurl.error as exc:
            del self._pending[handle]
            return cast(tuple[int, str], tuple(exc.args))  # pycurl: (code, message)
        try:
            return await done
        finally:
            if self._pending.pop(handle, None) is not None:  # cancelled: not ended by libcurl
                self._multi.remove_handle(handle)

    # -- what libcurl waits for ---------------------------------------------------------------

    def _on_socket(self, what: int, fd: int, _multi: object, _socketp: object) -> None:
        wanted = 0 if what in (pycurl.POLL_REMOVE, pycurl.POLL_NONE) else what
        watched = self._watched.get(fd, 0)
        if wanted == watched or (wanted and self._closed):
            return
        if self._epoll is not None:
            self._watch_in_epoll(self._epoll, fd, watched, wanted)
        elif self._loop is not None:
            self._watch_on_loop(self._loop, fd, watched, wanted)
        if wanted:
            self._watched[fd] = wanted
        else:
            del self._watched[fd]

    @staticmethod
    def _watch_in_epoll(epoll: select.epoll, fd: int, watched: int, wanted: int) -> None:
        events = (select.EPOLLIN if wanted & pycurl.POLL_IN else 0) | (
            select.EPOLLOUT if wanted & pycurl.POLL_OUT else 0
        )
        try:
            if not wanted:
                epoll.unregister(fd)
            elif watched:
                epoll.modify(fd, events)
            else:
                epoll.register(fd, events)
        except OSError:  # a socket libcurl closed already: the kernel dropped it from the set
            pass

    def _watch_on_loop(
        self, loop: asyncio.AbstractEventLoop, fd: int, watched: int, wanted: int
    ) -> None:
        for bit, add, remove, mask in (
            (pycurl.POLL_IN, loop.add_reader, loop.remove_reader, pycurl.CSELECT_IN),
            (pycurl.POLL_OUT, loop.add_writer, loop.remove_writer, pycurl.CSELECT_OUT),
        ):
            if wanted & bit and not watched & bit:
                add(fd, self._drive, fd, mask)
            elif watched & bit and not wanted & bit:
                remove(fd)

    def _ready(self) -> None:
        """libcurl's epoll set has ready sockets: hand each to libcurl."""
        assert self._epoll is not None
        for fd, events in self._epoll.poll(0):
            mask = (
                (pycurl.CSELECT_IN if events & (select.EPOLLIN | select.EPOLLHUP) else 0)
                | (pycurl.CSELECT_OUT if events & select.EPOLLOUT else 0)
                | (pycurl.CSELECT_ERR if events & select.EPOLLERR else 0)
            )
            self._drive(fd, mask)

    # -- timers -------------------------------------------------------------------------------

    def _on_timer(self, timeout_ms: int) -> None:
        loop = self._loop
        if loop is None or self._closed:
            return
        if timeout_ms < 0:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        at = loop.time() + timeout_ms / 1000
        if self._timer is not None:
            if self._timer_at <= at:
                return  # it fires first, and then asks libcurl for the next timeout
            self._timer.cancel()
        self._timer_at = at
        # Never from within the libcurl call that set the timer: the loop calls back.
        if timeout_ms == 0:
            self._timer = loop.call_soon(self._fire)
        else:
            self._timer = loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._drive(pycurl.SOCKET_TIMEOUT, 0)
        # A timer that fired early finds nothing due, and libcurl need not announce its next
        # timeout again: ask for it.
        if self._timer is None and not self._closed:
            self._on_timer(self._multi.timeout())

    # -- running libcurl ----------------------------------------------------------------------

    def _drive(self, fd: int, mask: int) -> None:
        if self._closed:
            return
        try:
            _, running = self._multi.socket_action(fd, mask)
        except pycurl.error as exc:
            self._end_all(cast(tuple[int, str], tuple(exc.args)))  # pycurl: (code, message)
            return
        if running < len(self._pending):
            self._collect()

    def _collect(self) -> None:
        while True:
            queued, ok, failed = self._multi.info_read()
            for handle in ok:
                self._end(handle, (0, ""))
            for handle, code, message in failed:
                self._end(handle, (code, message))
            if not queued:
                return

    def _end(self, handle: pycurl.Curl, result: tuple[int, str]) -> None:
        done = self._pending.pop(handle, None)
        if done is None:
            return
        self._multi.remove_handle(handle)
        if not done.done():
            done.set_result(result)

    def _end_all(self, result: tuple[int, str]) -> None:
        for handle in list(self._pending):
            self._end(handle, result)

    async def close(self) -> None:
        """Ends every transfer under way (as failed) and closes the connections."""
        if self._closed:
            return
        self._end_all((pycurl.E_FAILED_INIT, "the HTTP client is closed"))
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._multi.close()  # closes the pooled connections (POLL_REMOVE for each first)
        if self._loop is not None:
            if self._epoll is not None:
                self._loop.remove_reader(self._epoll.fileno())
            else:
                for fd, watched in list(self._watched.items()):
                    self._watch_on_loop(self._loop, fd, watched, 0)
        self._watched.clear()
        if self._epoll is not None:
            self._epoll.close()


class CurlClient:
    """Concurrent HTTP requests over one libcurl multi handle (one pool of keep-alive
    connections, at most `max_connections` open). Use from one event loop."""

    def __init__(
        self, max_connections: int = 0, guard: Guard | None = None, keep_body_bytes: int = 65_536
    ) -> None:
        self._guard = guard
        self._keep_body_bytes = keep_body_bytes
        self._multi = LoopMulti()
        if max_connections:
            self._multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, max_connections)
        self._transfers: dict[pycurl.Curl, _Transfer] = {}
        self._idle: list[pycurl.Curl] = []

    async def request(
        self, method: str, url: str, headers: list[bytes], body: bytes | None, timeout: float
    ) -> Answer:
        """The answer, or CurlError. `headers`: `b"Name: value"` lines."""
        handle = self._idle.pop() if self._idle else self._new_handle()
        transfer = _Transfer(self._keep_body_bytes)
        handle.setopt(pycurl.URL, url)
        # No "Expect: 100-continue" round trip before a large body.
        handle.setopt(pycurl.HTTPHEADER, [*headers, b"Expect:"])
        handle.setopt(pycurl.TIMEOUT_MS, max(int(timeout * 1000), 1))
        handle.setopt(pycurl.CUSTOMREQUEST, method)
        if method == "GET" and not body:
            handle.setopt(pycurl.HTTPGET, 1)
        else:
            handle.setopt(pycurl.POSTFIELDS, body or b"")
        handle.setopt(pycurl.HEADERFUNCTION, transfer.head.append)
        handle.setopt(pycurl.WRITEFUNCTION, transfer.write)
        self._transfers[handle] = transfer
        try:
            code, message = await self._multi.perform(handle)
        finally:
            del self._transfers[handle]
        if code:
            raise CurlError(code, message, transfer.refused)
        self._idle.append(handle)
        status = handle.getinfo(pycurl.RESPONSE_CODE)
        return Answer(status, transfer.head, b"".join(transfer.body))

    def _new_handle(self) -> pycurl.Curl:
        """An easy handle with the options every request shares (the rest are set, and so
        replaced, by each request)."""
        c = pycurl.Curl()
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.FOLLOWLOCATION, 0)
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.NOPROXY, "*")
        c.setopt(pycurl.DNS_CACHE_TIMEOUT, 10)
        if CA_FILE is not None:
            c.setopt(pycurl.CAINFO, CA_FILE)
        if self._guard is not None:
            guard = self._guard

            def open_socket(_purpose: int, address: pycurl.CurlSockAddr) -> object:
                host = address.addr[0] if isinstance(address.addr, tuple) else ""
                refused = guard(host)
                if refused is not None:
                    transfer = self._transfers.get(c)
                    if transfer is not None:
                        transfer.refused = refused
                    return pycurl.SOCKET_BAD
                return socket.socket(address.family, address.socktype, address.protocol)

            c.setopt(pycurl.OPENSOCKETFUNCTION, open_socket)
        return c

    async def close(self) -> None:
        await self._multi.close()
        for handle in self._idle:
            handle.close()
        self._idle.clear()
