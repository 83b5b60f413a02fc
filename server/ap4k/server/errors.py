"""The one error shape of the API: {"error": {"code", "message", "field"}} with a 4xx."""

from __future__ import annotations

from ap4k.core import wire


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def body(self) -> wire.ErrorBody:
        return wire.ErrorBody(wire.ErrorDetail(self.code, self.message, self.field))


def invalid(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_field", message, field)


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")
