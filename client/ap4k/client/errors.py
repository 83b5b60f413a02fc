"""Exceptions of the client: one base class, one class per kind of refusal.

The one error hierarchy of every caller of the API (applications, the carrier, the operator,
the CLI). A 4xx from the server means "this request, as it is, will never succeed": it is
raised at once, never retried, and carries the server's own error code, message and field.
5xx, 429 and connection failures are retried (with failover across URLs) within the call's
`RetryPolicy`; when it runs out, `ServerUnavailable` comes out — or `OutcomeUnknown` when a
request that must not be sent twice may have been processed before the failure.
"""

from __future__ import annotations

from typing import Any


class Ap4kError(Exception):
    """Base class of every error the client raises."""


class ApiError(Ap4kError):
    """The server refused the request with a 4xx and said why."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        *,
        url: str = "",
        body: Any = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.url = url
        self.body = body  # the answer as sent (decoded JSON, or text)
        where = f" (field {field!r})" if field else ""
        super().__init__(f"{status} {code}: {message}{where}")


class BadRequest(ApiError):
    """400/422: the request is malformed or a field is invalid (see `field`)."""


class Unauthorized(ApiError):
    """401: missing or wrong bearer token."""


class Forbidden(ApiError):
    """403: the token is valid but may not do this (e.g. a target outside the allow-list)."""


class NotFound(ApiError):
    """404: no such message or queue."""


class Conflict(ApiError):
    """409: the request contradicts the current state (e.g. cancelling a finished message)."""


class PayloadTooLarge(ApiError):
    """413: the request body is over the server's size limit."""


class ServerUnavailable(Ap4kError):
    """Every attempt on every server URL failed (connection errors, timeouts, 5xx or 429)."""

    def __init__(
        self, message: str, *, attempts: int = 1, last_error: BaseException | str = ""
    ) -> None:
        self.attempts = attempts
        self.last_error = last_error
        if last_error != "":
            message = f"{message} after {attempts} attempt(s); last error: {last_error}"
        super().__init__(message)


class OutcomeUnknown(ServerUnavailable):
    """A request that is not safe to repeat (a POST of messages without dedup keys) failed
    after it was sent: the server may have committed it. The client does not resend it, so
    as not to enqueue it twice; give messages a `dedup_key` to have such failures retried.
    """


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: BadRequest,
}


def api_error(status: int, body: Any, *, url: str = "") -> ApiError:
    """The exception for a 4xx answer, built from its `{"error": {...}}` body if it has one."""
    code, message, field = f"http_{status}", "", None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or code)
        message = str(error.get("message") or "")
        field = None if error.get("field") is None else str(error.get("field"))
    elif isinstance(error, str):  # other JSON APIs (Prometheus) say it in one string
        message = error[:500]
    elif isinstance(body, str):
        message = body[:500]
    cls = _BY_STATUS.get(status, ApiError)
    return cls(status, code, message or f"HTTP {status}", field, url=url, body=body)
