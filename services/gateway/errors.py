"""OpenAI-style errors: {"error": {"message", "type", "code"}}, with Retry-After when useful."""

from __future__ import annotations

import msgspec
from starlette.responses import Response

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    502: "server_error",
    503: "service_unavailable",
    504: "server_error",
}


class ApiError(Exception):
    """Raised anywhere in a request; turned into an OpenAI-style error response."""

    def __init__(
        self, status: int, message: str, code: str, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after

    def response(self) -> Response:
        return error_response(self.status, self.message, self.code, self.retry_after)


def error_response(
    status: int, message: str, code: str, retry_after: float | None = None
) -> Response:
    body = {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "code": code}}
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return Response(
        msgspec.json.encode(body), status, headers=headers, media_type="application/json"
    )
