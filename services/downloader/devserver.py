"""A small HTTP file server with Range support, per-connection throttling and failure
injection. The downloader's tests and benchmark run against it; it can also serve a folder of
GGUFs to other hosts on a LAN: `python -m services.downloader.devserver DIR [--port N]`.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

BLOCK = 16 * 1024


@dataclass
class Stats:
    requests: int = 0
    range_requests: int = 0
    bytes_sent: int = 0  # body bytes written to sockets
    paths: dict[str, int] = field(default_factory=dict)  # GETs per path
    authorized: set[str] = field(default_factory=set)  # paths that got an Authorization header


@dataclass
class Behaviour:
    ranges: bool = True  # honour Range; off = always 200 with the whole file
    rate_bps: float | None = None  # per connection
    drop_after: int | None = None  # close the connection after this many body bytes ...
    drops: int = 0  # ... for this many responses
    token: str | None = None  # require "Authorization: Bearer <token>" (not on redirect targets)
    redirects: dict[str, str] = field(default_factory=dict)  # path -> URL or path (302)
    target_uses: int | None = None  # each redirect signs its target for this many requests


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class FileServer:
    """Serves `files` (URL path -> bytes, or a Path read on demand) on 127.0.0.1."""

    def __init__(
        self, files: dict[str, bytes | Path] | None = None, behaviour: Behaviour | None = None
    ):
        self.files: dict[str, bytes | Path] = dict(files or {})
        self.behaviour = behaviour or Behaviour()
        self.stats = Stats()
        self.lock = threading.Lock()
        self.uses_left: dict[str, int] = {}  # signature of a redirect -> requests left
        self.httpd = _Server(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, **delta: int) -> None:
        with self.lock:
            for k, v in delta.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def take_drop(self) -> bool:
        with self.lock:
            if self.behaviour.drops > 0:
                self.behaviour.drops -= 1
                return True
            return False


class _Handler(BaseHTTPRequestHandler):
    """One request to the FileServer `fs` (each server gets its subclass: _handler)."""

    fs: FileServer
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        self._count(path)
        if self._turned_away(path):
            return
        src = self.fs.files.get(path)
        if src is None:
            return self._empty(404)
        data = src if isinstance(src, bytes) else None
        size = len(data) if data is not None else Path(src).stat().st_size  # type: ignore[arg-type]
        span = self._span(size)
        if span is None:
            return
        start, end, status = span
        self._head(path, size, start, end, status)
        if body:
            self._body(src, start, end)

    def _count(self, path: str) -> None:
        self.fs.count(requests=1)
        with self.fs.lock:
            self.fs.stats.paths[path] = self.fs.stats.paths.get(path, 0) + 1
            if self.headers.get("Authorization"):
                self.fs.stats.authorized.add(path)

    def _turned_away(self, path: str) -> bool:
        """Answered already: no token (401), a redirect (302) or an expired signature (403)."""
        b = self.fs.behaviour
        auth_ok = self.headers.get("Authorization") == f"Bearer {b.token}"
        targets = {urlsplit(u).path for u in b.redirects.values()}
        if b.token and not auth_ok and path not in targets:
            self._empty(401)  # like a CDN, signed redirect targets need no token
            return True
        if path in b.redirects:
            location = b.redirects[path]
            if b.target_uses is not None:  # a signed URL, like a CDN's
                with self.fs.lock:
                    sig = str(len(self.fs.uses_left))
                    self.fs.uses_left[sig] = b.target_uses
                location += f"?sig={sig}"
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True
        if b.target_uses is not None and path in targets:
            sig = self.path.partition("?sig=")[2]
            with self.fs.lock:
                left = self.fs.uses_left.get(sig, 0)
                self.fs.uses_left[sig] = left - 1
            if left <= 0:
                self._empty(403)  # an expired signature
                return True
        return False

    def _span(self, size: int) -> tuple[int, int, int] | None:
        """(start, end, status) of the answer: the Range asked for (206) or all (200); None
        when the range cannot be served (416 sent)."""
        rng = self.headers.get("Range")
        if not (rng and self.fs.behaviour.ranges):
            return 0, size, 200
        self.fs.count(range_requests=1)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
        if not m or int(m.group(1)) >= size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        start = int(m.group(1))
        end = min(size, int(m.group(2)) + 1) if m.group(2) else size
        return start, end, 206

    def _head(self, path: str, size: int, start: int, end: int, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("ETag", f'"{size}-{_tag(path)}"')
        if self.fs.behaviour.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()

    def _body(self, src: bytes | Path, start: int, end: int) -> None:
        b = self.fs.behaviour
        limit = end - start
        if b.drop_after is not None and self.fs.take_drop():
            limit = min(limit, b.drop_after)
            self.close_connection = True
        t0, sent = time.monotonic(), 0
        f = None if isinstance(src, bytes) else open(src, "rb")  # noqa: SIM115
        try:
            if f:
                f.seek(start)
            while sent < limit:
                n = min(BLOCK, limit - sent)
                if f:
                    chunk = f.read(n)
                else:
                    assert isinstance(src, bytes)
                    chunk = src[start + sent : start + sent + n]
                self.wfile.write(chunk)
                sent += len(chunk)
                self.fs.count(bytes_sent=len(chunk))
                if b.rate_bps:
                    ahead = sent / b.rate_bps - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            if f:
                f.close()

    def _empty(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    """The handler class of `server`: http.server makes one instance per connection."""
    return type("Handler", (_Handler,), {"fs": server})


def _tag(path: str) -> str:
    return hashlib.sha1(path.encode()).hexdigest()[:12]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--rate-mbps", type=float, default=0, help="per-connection limit, MB/s")
    args = ap.parse_args()
    files: dict[str, bytes | Path] = {
        "/" + str(p.relative_to(args.folder)): p for p in args.folder.rglob("*") if p.is_file()
    }
    srv = FileServer(files, Behaviour(rate_bps=args.rate_mbps * 1e6 or None))
    srv.httpd.server_close()
    srv.httpd = ThreadingHTTPServer(("0.0.0.0", args.port), _handler(srv))
    print(f"serving {len(files)} files from {args.folder} on port {args.port}")
    srv.httpd.serve_forever()


if __name__ == "__main__":
    main()
