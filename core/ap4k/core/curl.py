"""libcurl's multi interface (pycurl) on the running asyncio loop: the deliveries' HTTP client.

Why libcurl and not aiohttp: on the delivery path it costs less than half of aiohttp's CPU per
request (docs/performance.md, "Outbound HTTP clients"), because the whole exchange — request,
response parsing, keep-alive, per-request timeouts — runs in C; Python runs only when one of
the sockets is ready and when a transfer ends. pycurl's own AsyncCurlMulti drives libcurl
from the event loop; this module sets each request up and collects its answer.

What libcurl is told for every request: no redirects, no proxy from the environment, TLS
verified against the system's certificates, a total timeout, and (`guard`) a check of every
address right before the socket is opened, so that a name cannot resolve its way past the
link-local guard.
"""

from __future__ import annotations

import os
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


class CurlClient:
    """Concurrent HTTP requests over one libcurl multi handle (one pool of keep-alive
    connections, at most `max_connections` open). Use from one event loop."""

    def __init__(
        self, max_connections: int = 0, guard: Guard | None = None, keep_body_bytes: int = 65_536
    ) -> None:
        self._guard = guard
        self._keep_body_bytes = keep_body_bytes
        self._multi = pycurl.AsyncCurlMulti()
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
            await self._multi.perform(handle)
        except pycurl.error as exc:
            code, message = cast(tuple[int, str], exc.args)  # pycurl: (code, message)
            raise CurlError(code, message, transfer.refused) from None
        except RuntimeError as exc:  # closed
            raise CurlError(pycurl.E_FAILED_INIT, str(exc)) from None
        finally:
            del self._transfers[handle]
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
        await self._multi.aclose()
        for handle in self._idle:
            handle.close()
        self._idle.clear()
