"""The gateway's edge: what a hostile or broken client can do before the app sees a request.

uvicorn bounds neither how long a client may take to send its request head or body nor how
many connections it may hold open, so a few slow or idle sockets could exhaust the gateway.
`GuardedHttp` is uvicorn's httptools protocol with those bounds added at the protocol level
(one timer per request, no work per byte):

- the request head (request line and headers) must arrive within HEAD_TIMEOUT_S of the
  connection opening (or of its first byte after a keep-alive pause), and be at most
  MAX_HEAD_BYTES and MAX_HEADERS lines;
- the body must keep up a minimum rate (BODY_GRACE_S plus one second per MIN_BODY_RATE
  bytes received);
- at most `max_connections` connections (from the open-file limit); at the limit the longest
  idle connection (no request in progress) is closed to make room, so idle sockets cannot
  lock clients out, and only when every connection is busy is a new one refused with a 503.

Every refusal here is a JSON error in the route's style, like the app's own.

`check_depth` caps JSON nesting cheaply before any decoder (ours or llama-server's) sees it;
`read_body` caps a body's size (MAX_BODY_BYTES, a 413).

Browsers are the other hostile client: a web page may send requests to the gateway on its
visitor's machine. `BrowserChecks` refuses those that could change anything (a cross-site
POST, CSRF) and, while the gateway listens on loopback, every request naming a host that is
not this machine (DNS rebinding). `open_gateway_warning` says when the gateway is open to the
network with no API keys.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import httptools
import msgspec
from starlette.requests import Request
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from lls.config import GatewayConfig

from .errors import ApiError, error_body, style_of

log = logging.getLogger(__name__)
T = TypeVar("T")

HEAD_TIMEOUT_S = 10.0  # a request head (request line + headers) must arrive within this
BODY_GRACE_S = 10.0  # a body may take this long plus 1 s per MIN_BODY_RATE bytes
MIN_BODY_RATE = 64 << 10  # bytes/s a body upload must average after the grace time
MAX_HEAD_BYTES = 64 << 10  # request line + headers; nginx's default large buffers are 32 KB
MAX_HEADERS = 256
FDS_RESERVED = 256  # file descriptors kept for NATS, logs and the like
MAX_DEPTH = 64  # JSON nesting; real requests (chat, tools, schemas) use a handful of levels
MAX_BODY_BYTES = 32 << 20

# A string, or an unterminated one to the end: each byte is scanned once, however the
# quotes fall (a closing quote required would rescan from every quote: quadratic).
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def check_depth(body: bytes, limit: int = MAX_DEPTH) -> None:
    """400 when `body` nests JSON arrays/objects deeper than about `limit` levels.

    Bodies with fewer brackets than `limit` (almost all) cost two `count`s. Otherwise
    strings are blanked and one innermost level of brackets is removed per pass, all in C:
    a body still holding brackets after `limit` passes is deeper than `limit` (or broken).
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return
    rest = _STRING.sub(b"", body).translate(None, _NOT_BRACKET)
    for _ in range(limit):
        if not rest:
            return
        shorter = rest.replace(b"[]", b"").replace(b"{}", b"")
        if len(shorter) == len(rest):
            break  # unbalanced: no decoder would accept it either
        rest = shorter
    if rest:
        raise ApiError(400, f"request body nests JSON deeper than {limit} levels", "invalid_json")


def decode_body(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """A request body decoded and type-checked by `decoder`, or a 400 that says what is
    wrong (empty, not JSON, too deep, not an object, no `model`, a field of a wrong type)."""
    if not body:
        raise ApiError(400, "request body is empty; expected a JSON object", "invalid_json")
    check_depth(body)  # llama-server parses the same bytes: no deep nesting reaches it
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        msg = str(e)
        if "missing required field `model`" in msg:
            raise ApiError(400, "missing required field `model`", "missing_model") from None
        if msg.startswith("Expected `object`"):
            raise ApiError(400, "request body must be a JSON object", "invalid_request") from None
        raise ApiError(400, f"invalid request body: {msg}", "invalid_request") from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_json") from None


async def read_body(request: Request) -> bytes:
    """A request's body, at most MAX_BODY_BYTES: a 413 past it (before reading any, when the
    declared length already says so)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES >> 20} MiB", "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES >> 20} MiB", "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------- browsers

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # change nothing here: no Origin check
UNCHECKED_PATHS = frozenset({"/health"})  # probes may name any host
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """Whether `host` (a listen address or a Host name) means this machine only: localhost,
    *.localhost (browsers resolve those to loopback themselves), 127.0.0.0/8, ::1. Other
    names are not resolved: they count as beyond this machine."""
    name = host_name(host)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(host: str) -> str:
    """The name in a Host header or listen address: lowercase, without port or brackets."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1] or [::1]:5000
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        host = host.partition(":")[0]
    return host.rstrip(".")


def _shown(value: str) -> str:
    return repr(value[:100])  # the client's own header, cut short


@dataclass(frozen=True)
class BrowserChecks:
    """Which requests a browser could have been tricked into sending are refused (403).

    - Host: while the gateway listens on loopback, or once `gateway.allowed_hosts` is set,
      a request must name a loopback host, the listen address or an allowed host. A page
      that rebinds its own name to 127.0.0.1 still sends that name.
    - Origin: a request that may change something (any method but GET, HEAD, OPTIONS) and
      carries an Origin must come from the gateway's own origin (Origin's host:port is the
      Host) or an allowed one. Browsers always send Origin on such requests; other clients
      (OpenAI and Ollama libraries, curl) send none and are not affected.
    """

    hosts: frozenset[str] | None  # Host names accepted besides loopback ones; None: any
    origins: frozenset[str]  # allowed Origins besides the gateway's own, lowercase

    @classmethod
    def of(cls, g: GatewayConfig, bound: str) -> BrowserChecks:
        """From the gateway's config; `bound` is the address it listens on (read once at
        start: a reloaded `gateway.host` is used only after a restart)."""
        checked = is_loopback(bound) or bool(g.allowed_hosts)
        names = {host_name(h) for h in (bound, *g.allowed_hosts)} | LOOPBACK_NAMES
        return cls(
            frozenset(names) if checked else None, frozenset(o.lower() for o in g.allowed_origins)
        )

    def refusal(
        self, method: str, path: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> ApiError | None:
        """The 403 for a request (method, path, raw ASGI headers), or None to serve it."""
        if path in UNCHECKED_PATHS:
            return None
        host = origin = None
        for k, v in headers:
            if k == b"host":
                host = v.decode("latin-1")
            elif k == b"origin":
                origin = v.decode("latin-1")
        if self.hosts is not None and host is not None:
            name = host_name(host)
            if name not in self.hosts and not is_loopback(name):
                return ApiError(
                    403,
                    f"this gateway does not answer to the host {_shown(host)} (a page that "
                    "points its own name at this machine names it); list it in "
                    "gateway.allowed_hosts if clients really use it",
                    "host_not_allowed",
                )
        if origin is not None and method not in SAFE_METHODS:
            given = origin.strip().lower().rstrip("/")
            if given.partition("://")[2] != (host or "").strip().lower() and (
                given not in self.origins
            ):
                return ApiError(
                    403,
                    f"a page at {_shown(origin)} may not send this request here (cross-site); "
                    "gateway.allowed_origins lists the pages that may",
                    "origin_not_allowed",
                )
        return None


def open_gateway_warning(g: GatewayConfig, bound: str) -> list[str]:
    """Lines to log loudly (and for `lls ps`) when anyone on the network may use the gateway:
    it listens beyond loopback and has no API keys. Empty when it does not."""
    if g.api_keys or is_loopback(bound):
        return []
    return [
        f"OPEN GATEWAY: listening on {bound} (beyond this machine) with no API keys.",
        "Anyone who can reach it may run every model, pull and delete model files on every "
        "host, and open the dashboard.",
        "Fix: set gateway.api_keys (an admin key for the dashboard and /metrics),",
        "or listen on this machine only: gateway.host: 127.0.0.1",
    ]


def open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (idle clients each hold a socket)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit from %d: %s", soft, e)
    return soft if soft != resource.RLIM_INFINITY else 1 << 16


def connection_budget(fd_limit: int) -> int:
    """Client connections the gateway accepts: each may need an upstream socket too."""
    return max(32, (fd_limit - FDS_RESERVED) // 2)


class _Refuse(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with head/body deadlines and a connection budget."""

    max_connections = 10_000  # set by the service from the open-file limit

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._headers = 0
        self._body_started = 0.0
        self._body_bytes = 0
        self._busy = False  # a request is being read or answered
        self._refused = False
        # Connections with no request in progress, oldest first (a dict keeps order).
        self._idle: dict[GuardedHttp, None] = self.server_state.__dict__.setdefault("lls_idle", {})

    # ------------------------------------------------------------ connection budget

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        while len(self.connections) > self.max_connections and self._idle:
            oldest = next(iter(self._idle))
            self._idle.pop(oldest, None)
            oldest.transport.close()  # its client may reconnect; a new one gets served
        if len(self.connections) > self.max_connections:
            self._send_refusal(503, "the gateway has too many open connections", "overloaded")
            return
        self._idle[self] = None
        self._arm(HEAD_TIMEOUT_S, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._idle.pop(self, None)
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------ request head

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            why = e.__context__
            if isinstance(why, _Refuse):
                self._send_refusal(why.status, why.message, why.code)
            else:
                self._send_refusal(400, "invalid HTTP request", "invalid_http")
        except httptools.HttpParserUpgrade:
            self._send_refusal(400, "protocol upgrades are not supported", "invalid_http")
        except httptools.HttpParserError:
            self._send_refusal(400, "invalid HTTP request", "invalid_http")

    def send_400_response(self, msg: str) -> None:  # uvicorn's is plain text
        self._send_refusal(400, msg, "invalid_http")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._busy = True
        self._idle.pop(self, None)
        self._head_bytes = self._headers = 0
        if self._timer is None:  # after a keep-alive pause: the head deadline starts now
            self._arm(HEAD_TIMEOUT_S, self._head_timeout)

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _Refuse(414, f"request URL over {MAX_HEAD_BYTES >> 10} KiB", "url_too_long")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        self._headers += 1
        if self._head_bytes > MAX_HEAD_BYTES or self._headers > MAX_HEADERS:
            raise _Refuse(
                431,
                f"request headers over {MAX_HEAD_BYTES >> 10} KiB or {MAX_HEADERS} lines",
                "headers_too_large",
            )
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.more_body:
            self._body_started = time.monotonic()
            self._body_bytes = 0
            self._arm(BODY_GRACE_S, self._body_check)

    def _head_timeout(self) -> None:
        self._timer = None
        if self._busy:
            log.info("client %s too slow sending its request head: closed", self.client)
            self._send_refusal(408, "request head not received in time", "request_timeout")
        else:
            self.transport.close()  # never sent anything

    # ------------------------------------------------------------ request body

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _body_check(self) -> None:
        self._timer = None
        if self.cycle is None or not self.cycle.more_body or self.transport.is_closing():
            return
        allowed = BODY_GRACE_S + self._body_bytes / MIN_BODY_RATE
        left = self._body_started + allowed - time.monotonic()
        if left > 0:
            self._arm(left, self._body_check)
            return
        log.info("client %s too slow sending its request body: closed", self.client)
        if self.cycle.response_started:
            self.transport.close()
        else:
            self.cycle.response_started = True  # the app's own answer goes nowhere now
            self._send_refusal(408, "request body not received in time", "request_timeout")

    def on_response_complete(self) -> None:
        self._busy = False
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._idle[self] = None

    # ------------------------------------------------------------ refusals

    def _send_refusal(self, status: int, message: str, code: str) -> None:
        """An error answer written straight to the socket, then the connection closed."""
        self._refused = True
        self._disarm()
        self._idle.pop(self, None)
        if self.transport.is_closing():
            return
        url = getattr(self, "url", b"") or b""
        body = error_body(status, message, code, style_of(url.decode("latin-1")))
        reason = {
            408: b"Request Timeout",
            414: b"URI Too Long",
            431: b"Request Header Fields Too Large",
        }
        head = b"HTTP/1.1 %d %s\r\n" % (status, reason.get(status, b"Error"))
        head += b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
        if status == 503:
            head += b"retry-after: 1\r\n"
        self.transport.write(head + b"connection: close\r\n\r\n" + body)
        self.transport.close()
