"""The API's HTTP connections, below the handlers: what aiohttp's parser refuses answers the
API's JSON error, request heads have a deadline, and the connections held have a bound.

aiohttp answers a request its parser refuses (a header over 8,190 bytes, a bad token, a bare
CR, a duplicate Content-Length, ...) with `text/plain` and logs an ERROR with a traceback:
a client's mistake would read as a server fault. `ApiRequestHandler.handle_error` answers the
`{"error": {...}}` shape instead and logs one INFO line. Handler bugs (a 500) still log their
traceback: those are ours.

A connection must deliver a whole request head within `header_timeout` of opening, or of its
previous response (aiohttp's keep-alive timer counts from there and fires while the handler
still waits for a request, so it is the head's deadline and the idle limit at once): a client
trickling its headers ("slowloris") cannot hold a connection longer than that.

Every connection costs a descriptor. Past `limit` connections (below RLIMIT_NOFILE, with room
for the database pools and deliveries) the oldest connection that is not handling a request
is closed to admit the new one, so idle and slow connections cannot crowd out a health
check or a real request, and accept() never meets EMFILE.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from ap4k.core.limits import MAX_HEADER_FIELD_BYTES
from ap4k.core.logs import Throttled
from ap4k.server.api import json_response
from ap4k.server.errors import ApiError

log = logging.getLogger("ap4k.connections")

# Descriptors kept for what is not an API connection: the listening socket, the event loop,
# log files, DNS, the embedded PostgreSQL's pipes.
RESERVED_DESCRIPTORS = 64
LIMIT_REPORT_SECONDS = 10.0


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as Go's runtime does at start: the
    soft default of 1,024 dates from select()) and return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def default_connection_limit(other_descriptors: int) -> int:
    """The API connections this process can hold: its descriptors, less those it needs for
    everything else (`other_descriptors`: database pools and outgoing deliveries)."""
    return max(16, raise_descriptor_limit() - other_descriptors - RESERVED_DESCRIPTORS)


def parser_refusal(exc: BaseException | None, message: str | None) -> ApiError:
    """The API error for a request aiohttp's HTTP parser refused."""
    if isinstance(exc, LineTooLong):
        return ApiError(
            431,
            "header_too_large",
            f"the request line or a header field is longer than {MAX_HEADER_FIELD_BYTES} bytes",
        )
    text = message or (exc.message if isinstance(exc, HttpProcessingError) else None) or ""
    if "too many headers" in text.lower():
        return ApiError(431, "header_too_large", "the request has too many header fields")
    detail = " ".join(text.split())[:200]
    return ApiError(400, "malformed_request", f"the request is not valid HTTP/1.1: {detail}")


class ConnectionLimit:
    """The API connections open now, oldest first; past `limit`, the oldest one without a
    request in progress is closed (or, if every one is busy, the newcomer)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[ApiRequestHandler, None] = {}
        self._full = Throttled(log, LIMIT_REPORT_SECONDS)

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, handler: ApiRequestHandler) -> None:
        self._open[handler] = None
        if len(self._open) <= self.limit:
            return
        victim = next(
            (h for h in self._open if h is not handler and not h.busy), handler
        )
        self._open.pop(victim, None)
        victim.force_close()
        self._full.warning(
            "%d connections open, the limit: closed the oldest idle or slow one", self.limit
        )

    def closed(self, handler: ApiRequestHandler) -> None:
        self._open.pop(handler, None)


class ApiRequestHandler(web.RequestHandler):
    """aiohttp's HTTP/1.1 protocol, with the API's error shape and the connection limit."""

    def __init__(
        self, manager: web.Server, *, limit: ConnectionLimit, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._limit = limit

    @property
    def busy(self) -> bool:
        """A request of this connection is being handled (not: waiting for one to arrive)."""
        return self._request_in_progress

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._limit.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._limit.closed(self)
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response had begun; no error can be sent any more")
        if status == 500:
            log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
            error = ApiError(500, "internal_error", "the server failed; this is a bug in ap4k")
        elif status == 504:
            error = ApiError(504, "timeout", "the request took too long to handle")
        else:
            error = parser_refusal(exc, message)
            log.info("refused a malformed request from %s: %s", request.remote, error.message)
        # The error body is a wire object: encoded by msgspec as every API answer is.
        response = json_response(error.body(), error.status)
        response.force_close()
        return response


def protocol_factory(
    server: web.Server,
    limit: ConnectionLimit,
    header_timeout: float,
    access_log: logging.Logger | None = None,
) -> Any:
    """What `loop.create_server` calls for each new connection."""
    loop = asyncio.get_running_loop()

    def make() -> ApiRequestHandler:
        return ApiRequestHandler(
            server,
            limit=limit,
            loop=loop,
            keepalive_timeout=header_timeout,
            max_field_size=MAX_HEADER_FIELD_BYTES,
            max_line_size=MAX_HEADER_FIELD_BYTES,
            # After a refusal, read what the client still sends for at most this long, so
            # that it sees the answer before the connection closes.
            lingering_time=2.0,
            access_log=access_log,
        )

    return make
