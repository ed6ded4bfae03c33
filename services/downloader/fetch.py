"""Fetching one URL into a staging file: parallel Range requests, resume from disk, retries.

The staging file (`<name>.part`) is pre-allocated to the full size and written with pwrite at
each chunk's offset. A sidecar state file (`<name>.part.json`) records, per chunk, how many
bytes are on disk; it is rewritten only after an fdatasync of the data, so it never claims
bytes the disk does not have (kill -9, power loss). A resumed download fetches only what the
state does not cover: at most what was in flight since the last save.

This module never touches the final name; store.py verifies and publishes.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

MiB = 1 << 20
CHUNK_MIN = 1 * MiB
CHUNK_MAX = 64 * MiB
WRITE_BLOCK = 256 * 1024  # bytes buffered per connection before a pwrite
COPY_BLOCK = 8 * MiB
STATE_EVERY_S = 0.5  # how often resume state is saved: bounds what a kill -9 loses
DISK_MARGIN = 16 * MiB  # keep some room so the filesystem is not driven to exactly zero


class FetchError(Exception):
    """A failure whose message a user can act on (it becomes DownloadFailed.reason)."""


class _Retry(Exception):
    """A transient failure: the request is retried with backoff."""


@dataclass
class Progress:
    """Shared, mutable counters; the service samples them to emit progress events."""

    done: int = 0  # bytes of the file on disk
    total: int | None = None
    resumed: int = 0  # bytes found on disk at start (not counted in the rate)


@dataclass(frozen=True)
class Options:
    connections: int = 8
    connect_timeout: float = 15.0
    read_timeout: float = 30.0  # no byte for this long: the request is retried
    chunk_deadline: float = 600.0  # one ranged request; progress is kept when it expires
    attempts: int = 6  # per chunk, reset whenever a try made progress
    backoff_s: float = 0.5  # doubled per failed try, capped at 8 s
    min_free: int = DISK_MARGIN  # bytes the store's disk keeps free (downloader.min_free_mib)


@dataclass
class _State:
    total: int
    validator: str  # ETag or Last-Modified: a changed file on the server restarts the download
    chunk: int
    done: list[int] = field(default_factory=list)

    def chunk_range(self, i: int) -> tuple[int, int]:
        start = i * self.chunk
        return start, min(self.total, start + self.chunk)


def chunk_size(total: int, connections: int) -> int:
    """About four chunks per connection, so fast connections steal work from slow ones."""
    size = total // max(1, connections * 4)
    return max(CHUNK_MIN, min(CHUNK_MAX, size))


def backoff(attempt: int, base: float) -> float:
    return min(8.0, base * (2 ** (attempt - 1)))


def content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 0-0/1234' -> (0, 1234); 'bytes */1234' -> (None, 1234); total None if '*'."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def check_disk(folder: Path, need: int, margin: int = DISK_MARGIN) -> None:
    """Refuse a write of `need` bytes that would leave less than `margin` free: the store's
    disk may hold the NATS data too, which must never run out."""
    free = shutil.disk_usage(folder).free
    if need + margin > free:
        raise FetchError(
            f"not enough disk space in {folder}: the download needs {_gib(need)} and "
            f"{_gib(free)} is free, of which downloader.min_free_mib ({_gib(margin)}) is kept "
            "free; free some space or point agent.store at a larger disk"
        )


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{n / MiB:.1f} MiB"


def status_error(r: httpx.Response, url: str) -> Exception | None:
    """None for success; FetchError for what retrying cannot fix; _Retry otherwise."""
    code = r.status_code
    if code in (200, 206, 416):
        return None
    if code in (401, 403):
        return FetchError(
            f"access denied (HTTP {code}) for {url}: for a gated or private Hugging Face repo, "
            "accept its terms on the website and set HF_TOKEN for the downloader"
        )
    if code == 404:
        return FetchError(
            f"not found (HTTP 404): {url}; check the repository, revision and file name"
        )
    if code in (408, 425, 429) or code >= 500:
        return _Retry(f"HTTP {code} from the server")
    return FetchError(f"HTTP {code} from {url}")


def _user_error(e: BaseException, url: str, attempts: int) -> FetchError:
    if isinstance(e, FetchError):
        return e
    if isinstance(e, httpx.ConnectError):
        why = f"could not connect ({e})"
    elif isinstance(e, httpx.TimeoutException | TimeoutError):
        why = "the server stopped sending data (timed out)"
    else:
        why = str(e) or type(e).__name__
    return FetchError(
        f"download of {url} failed after {attempts} tries: {why}; check the network and the "
        "server, then request the model again (what was downloaded is kept and resumes)"
    )


_RETRYABLE = (httpx.TransportError, httpx.StreamError, _Retry, TimeoutError)


@dataclass
class _Probe:
    total: int | None
    validator: str
    ranged: bool
    target: str  # the URL after redirects (e.g. a CDN's signed URL)


async def _probe(client: httpx.AsyncClient, url: str, auth: dict[str, str]) -> _Probe:
    """One GET for byte 0: tells the size, the validator and whether Range is honoured."""
    async with client.stream("GET", url, headers={**auth, "Range": "bytes=0-0"}) as r:
        if err := status_error(r, url):
            raise err
        validator = r.headers.get("etag") or r.headers.get("last-modified") or ""
        start, total = content_range(r.headers.get("content-range"))
        target = str(r.url)
        if r.status_code == 206 and start == 0 and total is not None:
            return _Probe(total, validator, True, target)
        if r.status_code == 416:  # only an empty file has no byte 0
            return _Probe(total or 0, validator, False, target)
        length = r.headers.get("content-length")
        size = int(length) if length and length.isdigit() else None
        return _Probe(size, validator, False, target)


async def _retrying(what, opts: Options, url: str):  # type: ignore[no-untyped-def]
    for attempt in range(1, opts.attempts + 1):
        try:
            return await what()
        except _RETRYABLE as e:
            if attempt == opts.attempts:
                raise _user_error(e, url, attempt) from e
            log.info("retrying %s after: %s", url, e)
            await asyncio.sleep(backoff(attempt, opts.backoff_s))
    raise AssertionError("unreachable")


def http_client(opts: Options) -> httpx.AsyncClient:
    n = opts.connections + 1
    return httpx.AsyncClient(
        # identity: byte offsets must be offsets of the file, not of a compressed body
        headers={"Accept-Encoding": "identity"},
        timeout=httpx.Timeout(opts.read_timeout, connect=opts.connect_timeout),
        limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        follow_redirects=True,
    )


async def fetch_http(
    url: str,
    part: Path,
    headers: dict[str, str],
    opts: Options,
    progress: Progress,
) -> tuple[int | None, str | None]:
    """Download `url` into `part`. Returns (expected size or None, sha256 if computed on the way).

    `headers` (a bearer token) go only to `url` itself: httpx drops them on a cross-origin
    redirect, and chunks fetched straight from the redirect target never carry them.
    """
    async with http_client(opts) as client:
        probe = await _retrying(lambda: _probe(client, url, headers), opts, url)
        progress.total = probe.total
        if probe.ranged and probe.total:
            try:
                await _Ranged(client, url, headers, part, probe, opts, progress).run()
            except OSError as e:  # the part is kept: a disk error may be fixed, then resumed
                raise FetchError(f"cannot write {part}: {e.strerror or e}") from e
            return probe.total, None
        log.info("%s: no Range support, one stream (no resume)", url)
        return await _single(client, url, headers, part, opts, progress)


# ---------------------------------------------------------------- parallel ranged download


def state_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def load_state(path: Path, total: int, validator: str, part: Path) -> _State | None:
    """The saved state if it describes this very file on the server and the part is intact."""
    try:
        raw = json.loads(path.read_text())
        st = _State(int(raw["total"]), str(raw["validator"]), int(raw["chunk"]), list(raw["done"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    n = -(-st.total // st.chunk) if st.chunk > 0 else -1
    ok = (
        st.total == total
        and st.validator == validator
        and len(st.done) == n
        and all(
            0 <= d <= st.chunk_range(i)[1] - st.chunk_range(i)[0] for i, d in enumerate(st.done)
        )
        and part.exists()
        and part.stat().st_size == total
    )
    return st if ok else None


def _write_state(path: Path, st: _State) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(
        json.dumps(
            {"total": st.total, "validator": st.validator, "chunk": st.chunk, "done": st.done}
        )
    )
    os.replace(tmp, path)


class _Ranged:
    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        auth: dict[str, str],
        part: Path,
        probe: _Probe,
        opts: Options,
        progress: Progress,
    ):
        self.client = client
        self.url = url
        self.auth = auth
        # Chunks go straight to the redirect target: one round trip less each, and no load
        # on the resolver (Hugging Face rate-limits its resolve endpoint).
        self.target = probe.target
        self.part = part
        self.opts = opts
        self.progress = progress
        assert probe.total
        self.total = probe.total
        self.state_file = state_path(part)
        st = load_state(self.state_file, probe.total, probe.validator, part)
        self.fresh = st is None
        if st is None:
            size = chunk_size(probe.total, opts.connections)
            st = _State(probe.total, probe.validator, size, [0] * (-(-probe.total // size)))
        self.st = st
        self.fd = -1

    async def run(self) -> None:
        resumed = sum(self.st.done)
        self.progress.done = self.progress.resumed = resumed
        if resumed:
            log.info("%s: resuming at %d of %d bytes", self.part.name, resumed, self.total)
        self._open()
        saved = list(self.st.done)
        saver = asyncio.create_task(self._save_loop(saved))
        todo: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(self.st.done)):
            start, end = self.st.chunk_range(i)
            if start + self.st.done[i] < end:
                todo.put_nowait(i)
        workers = [
            asyncio.create_task(self._worker(todo))
            for _ in range(min(self.opts.connections, todo.qsize()))
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for t in workers:
                t.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            saver.cancel()
            await asyncio.gather(saver, return_exceptions=True)
            try:
                await self._save(saved)  # what is on disk stays usable for the next try
            finally:
                os.close(self.fd)

    def _open(self) -> None:
        self.part.parent.mkdir(parents=True, exist_ok=True)
        if self.fresh:
            check_disk(self.part.parent, self.total, self.opts.min_free)
            self.state_file.unlink(missing_ok=True)
            self.fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:  # reserve the space now: a full disk fails here, not half-way
                os.posix_fallocate(self.fd, 0, self.total)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    os.close(self.fd)
                    self.part.unlink(missing_ok=True)
                    check_disk(self.part.parent, self.total, self.opts.min_free)
                    raise FetchError(f"disk full in {self.part.parent}") from e
                os.ftruncate(self.fd, self.total)  # filesystem without fallocate
        else:
            self.fd = os.open(self.part, os.O_RDWR)

    async def _save_loop(self, saved: list[int]) -> None:
        while True:
            await asyncio.sleep(STATE_EVERY_S)
            await self._save(saved)

    async def _save(self, saved: list[int]) -> None:
        snap = list(self.st.done)  # taken before the sync: never more than what is synced
        if snap == saved and self.state_file.exists():
            return
        await asyncio.to_thread(os.fdatasync, self.fd)
        await asyncio.to_thread(
            _write_state,
            self.state_file,
            _State(self.st.total, self.st.validator, self.st.chunk, snap),
        )
        saved[:] = snap

    async def _worker(self, todo: asyncio.Queue[int]) -> None:
        while not todo.empty():
            await self._chunk(todo.get_nowait())

    async def _chunk(self, i: int) -> None:
        start, end = self.st.chunk_range(i)
        failures = 0
        while start + self.st.done[i] < end:
            before = self.st.done[i]
            try:
                async with asyncio.timeout(self.opts.chunk_deadline):
                    await self._get(i, start + self.st.done[i], end)
                if start + self.st.done[i] < end:
                    raise _Retry("the server closed the connection early")
            except _RETRYABLE as e:
                failures = 0 if self.st.done[i] > before else failures
                failures += 1
                if failures >= self.opts.attempts:
                    raise _user_error(e, self.url, failures) from e
                log.info("%s chunk %d: %s; retrying", self.part.name, i, e or type(e).__name__)
                await asyncio.sleep(backoff(failures, self.opts.backoff_s))

    async def _get(self, i: int, pos: int, end: int) -> None:
        buf = bytearray()
        url = self.target
        headers = {"Range": f"bytes={pos}-{end - 1}"}
        if url == self.url:
            headers.update(self.auth)
        try:
            async with self.client.stream("GET", url, headers=headers) as r:
                if url != self.url and r.status_code in (401, 403, 404, 410):
                    self.target = self.url  # a signed target expired: resolve again
                    raise _Retry(f"HTTP {r.status_code} from the redirect target")
                if err := status_error(r, self.url):
                    raise err
                if url == self.url:
                    self.target = str(r.url)
                start, _ = content_range(r.headers.get("content-range"))
                if r.status_code != 206 or start != pos:
                    raise _Retry(f"the server answered a Range request with HTTP {r.status_code}")
                async for data in r.aiter_raw():
                    take = min(len(data), end - pos - len(buf))
                    buf += data[:take]
                    if len(buf) >= WRITE_BLOCK or pos + len(buf) >= end:
                        pos = await self._flush(i, buf, pos)
                    if pos >= end:
                        break
        finally:
            if buf:  # keep what arrived before a drop
                await self._flush(i, buf, pos)

    async def _flush(self, i: int, buf: bytearray, pos: int) -> int:
        data = bytes(buf)
        buf.clear()
        await asyncio.to_thread(_pwrite_all, self.fd, data, pos)
        self.st.done[i] += len(data)
        self.progress.done += len(data)
        return pos + len(data)


def _pwrite_all(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


# ---------------------------------------------------------------- single stream (no Range)


async def _single(
    client: httpx.AsyncClient,
    url: str,
    auth: dict[str, str],
    part: Path,
    opts: Options,
    progress: Progress,
) -> tuple[int | None, str | None]:
    """Without Range support there is no resume: each try starts from byte 0."""
    state_path(part).unlink(missing_ok=True)
    part.parent.mkdir(parents=True, exist_ok=True)

    async def once() -> tuple[int | None, str | None]:
        h = hashlib.sha256()
        progress.done = progress.resumed = 0
        f = await asyncio.to_thread(open, part, "wb")
        with f:
            async with client.stream("GET", url, headers=auth) as r:
                if err := status_error(r, url):
                    raise err
                if r.status_code != 200:
                    raise _Retry(f"HTTP {r.status_code} for a plain GET")
                length = r.headers.get("content-length")
                expected = int(length) if length and length.isdigit() else None
                progress.total = expected
                if expected is not None:
                    check_disk(part.parent, expected, opts.min_free)
                buf = bytearray()
                async for data in r.aiter_raw():
                    buf += data
                    if len(buf) >= WRITE_BLOCK:
                        await _append(f, h, buf, progress)
                await _append(f, h, buf, progress)
            if expected is not None and progress.done != expected:
                raise _Retry("the server closed the connection early")
            await asyncio.to_thread(os.fsync, f.fileno())
        return expected, h.hexdigest()

    try:
        return await _retrying(once, opts, url)
    except OSError as e:
        raise _disk_error(e, part) from e


async def _append(f, h, buf: bytearray, progress: Progress) -> None:  # type: ignore[no-untyped-def]
    data = bytes(buf)
    buf.clear()
    h.update(data)
    await asyncio.to_thread(f.write, data)
    progress.done += len(data)


def _disk_error(e: OSError, part: Path) -> Exception:
    part.unlink(missing_ok=True)
    if e.errno == errno.ENOSPC:
        return FetchError(f"disk full in {part.parent}; free some space and retry")
    return FetchError(f"cannot write {part}: {e.strerror or e}")


# ---------------------------------------------------------------- file:// and local copies


async def copy_file(
    src: Path,
    part: Path,
    progress: Progress,
    margin: int = DISK_MARGIN,
    opened: Callable[[Path], None] | None = None,
) -> tuple[int, str]:
    """Copy `src` into `part` block by block (progress, no event-loop stall); returns size, sha256.
    `opened` is called with the real path of the file actually opened, before a byte is read
    (it raises to refuse it): a check of the name before the open could be raced by a link."""
    try:
        fi = await asyncio.to_thread(open, src, "rb")
    except FileNotFoundError:
        raise FetchError(f"file not found: {src}; check the model's url") from None
    except OSError as e:
        raise FetchError(f"cannot read {src}: {e.strerror or e}") from None
    with fi:
        if opened is not None:
            opened(opened_path(fi.fileno(), src))
        size = os.fstat(fi.fileno()).st_size
        part.parent.mkdir(parents=True, exist_ok=True)
        check_disk(part.parent, size, margin)
        progress.total, progress.done, progress.resumed = size, 0, 0
        h = hashlib.sha256()
        try:
            fo = await asyncio.to_thread(open, part, "wb")
            with fo:

                def step() -> int:
                    block = fi.read(COPY_BLOCK)
                    h.update(block)
                    fo.write(block)
                    return len(block)

                while n := await asyncio.to_thread(step):
                    progress.done += n
                await asyncio.to_thread(os.fsync, fo.fileno())
        except OSError as e:
            raise _disk_error(e, part) from e
    return progress.done, h.hexdigest()


def opened_path(fd: int, name: Path) -> Path:
    """The real path of an open file (Linux: /proc/self/fd), else `name` resolved now."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return Path(os.path.realpath(name))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(COPY_BLOCK):
            h.update(block)
    return h.hexdigest()
