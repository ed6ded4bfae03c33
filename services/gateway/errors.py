"""Errors in the route's own style, with Retry-After when useful.

OpenAI routes (and every other route): `{"error": {"message", "type", "code"}}`.
Ollama routes (`/api/...`): `{"error": "message"}`, as Ollama answers and its clients expect.
Anthropic routes (`/v1/messages...`): `{"type": "error", "error": {"type", "message"}}`, the
shape the official `anthropic` client reads (it picks its exception class by status).
"""

from __future__ import annotations

from typing import Literal

import msgspec
from starlette.responses import Response

Style = Literal["openai", "ollama", "anthropic"]

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

# Anthropic's documented error types (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",  # Anthropic says 529; the status stays ours, the type says why
    504: "timeout_error",
    529: "overloaded_error",
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

    def response(self, style: Style = "openai") -> Response:
        return error_response(self.status, self.message, self.code, self.retry_after, style)


def is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def is_anthropic(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def style_of(path: str) -> Style:
    """The error style a route's clients expect, from its path."""
    if is_ollama(path):
        return "ollama"
    if is_anthropic(path):
        return "anthropic"
    return "openai"


def error_body(status: int, message: str, code: str, style: Style = "openai") -> bytes:
    body: object
    if style == "ollama":
        body = {"error": message}
    elif style == "anthropic":
        kind = _ANTHROPIC_TYPES.get(
            status, "invalid_request_error" if status < 500 else "api_error"
        )
        body = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        body = {"error": {"message": message, "type": kind, "code": code}}
    try:
        return msgspec.json.encode(body)
    except UnicodeEncodeError:  # a lone surrogate from the client's JSON, quoted back
        safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
        return error_body(status, safe, code, style)


def error_response(
    status: int,
    message: str,
    code: str,
    retry_after: float | None = None,
    style: Style = "openai",
) -> Response:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return Response(
        error_body(status, message, code, style),
        status,
        headers=headers,
        media_type="application/json",
    )


def sse_error(error: ApiError, style: Style = "openai") -> bytes:
    """An error as one server-sent event, for a stream whose 200 head is already sent.

    OpenAI clients read a `data:` line holding `{"error": ...}`; the Anthropic client reads
    only named events, and raises on `event: error`."""
    data = error_body(error.status, error.message, error.code, style)
    if style == "anthropic":
        return b"event: error\ndata: " + data + b"\n\n"
    return b"data: " + data + b"\n\n"
