"""Errors in the route's own style, with Retry-After when useful.

OpenAI routes (and every other route): `{"error": {"message", "type", "code"}}`.
Ollama routes (`/api/...`): `{"error": "message"}`, as Ollama answers and its clients expect.
"""

from __future__ import annotations

import msgspec
from starlette.responses import Response

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    499: "client_closed_request",
    502: "server_error",
    503: "service_unavailable",
    504: "server_error",
}


class ApiError(Exception):
    """Raised anywhere in a request; turned into an error response in the route's style."""

    def __init__(
        self, status: int, message: str, code: str, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after

    def response(self, ollama: bool = False) -> Response:
        return error_response(self.status, self.message, self.code, self.retry_after, ollama)


def is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def error_body(status: int, message: str, code: str, ollama: bool = False) -> bytes:
    if ollama:
        body: object = {"error": message}
    else:
        kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        body = {"error": {"message": message, "type": kind, "code": code}}
    try:
        return msgspec.json.encode(body)
    except UnicodeEncodeError:  # a lone surrogate from the client's JSON, quoted back
        safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
        return error_body(status, safe, code, ollama)


def error_response(
    status: int,
    message: str,
    code: str,
    retry_after: float | None = None,
    ollama: bool = False,
) -> Response:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return Response(
        error_body(status, message, code, ollama),
        status,
        headers=headers,
        media_type="application/json",
    )
