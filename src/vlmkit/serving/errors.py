"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status.

Every message here is written by vlmkit for the client; exceptions from libraries are never echoed
(no tracebacks, file paths or object reprs). Anything unexpected becomes a generic 500.
"""

from __future__ import annotations

from typing import Any

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable"

_TYPE_FOR_STATUS = {401: AUTHENTICATION, 404: NOT_FOUND, 429: RATE_LIMIT, 503: UNAVAILABLE}
INTERNAL_MESSAGE = "the server had an internal error while processing the request"


class APIError(Exception):
    """An error answered to the client as-is: a status, a message written for them, and OpenAI's fields."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    @property
    def type(self) -> str:
        if self.status >= 500:
            return _TYPE_FOR_STATUS.get(self.status, SERVER_ERROR)
        return _TYPE_FOR_STATUS.get(self.status, INVALID_REQUEST)

    def body(self) -> dict[str, Any]:
        return error_body(message=self.message, type_=self.type, param=self.param, code=self.code)


def error_body(
    *, message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad_request(message: str, *, param: str | None = None, code: str = "invalid_request") -> APIError:
    return APIError(400, message, code=code, param=param)


def internal_error() -> APIError:
    return APIError(500, INTERNAL_MESSAGE, code="internal_error")
