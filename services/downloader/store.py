"""The host's model store: staging, a cross-process lock, verified publishing, and the decision
for one file: already there, reuse a local copy, or download.

Layout: `<store>/<filename>` holds only complete, verified files. Work in progress lives in
`<store>/.lls/`: `<filename>.part` (+ `.part.json` resume state), `<filename>.lock` (flock, so
two downloader processes never write one file; the kernel drops it on kill -9) and
`<filename>.sha256` (digest of the published file, keyed by size and mtime, so a store hit with
a checksum is not re-hashed every time), and `<filename>.written`: which model this downloader
wrote the file for, from which source, and the file's inode, size and mtime. A file in the store
that does not match its model's sha256 is replaced only when that record says this downloader
wrote exactly that file for that model; any other file (put there by hand, or by another
config) is reported and left alone. The record is on disk, so a restart keeps it.

A failed download never fills the disk: a part with resume state is kept (the next request
resumes it), any other part is deleted at once, and `sweep_partials` deletes parts that no
configured model uses or that nobody resumed for PARTIAL_MAX_AGE_S.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from services.downloader import reuse
from services.downloader.fetch import (
    FetchError,
    Options,
    Progress,
    copy_file,
    fetch_http,
    sha256_file,
    state_path,
)
from services.downloader.sources import Source

log = logging.getLogger(__name__)

STAGING_DIR = ".lls"
PARTIAL_MAX_AGE_S = 7 * 24 * 3600  # a part nobody resumed for a week is deleted
WRITTEN = ".written"  # suffix of a store file's write record in STAGING_DIR


@dataclass(frozen=True)
class Staging:
    dest: Path
    part: Path
    lock: Path
    digest: Path
    written: Path  # the write record (Writer)

    @classmethod
    def of(cls, store: Path, filename: str) -> Staging:
        base = store / STAGING_DIR / filename
        return cls(
            dest=store / filename,
            part=base.with_name(base.name + ".part"),
            lock=base.with_name(base.name + ".lock"),
            digest=base.with_name(base.name + ".sha256"),
            written=base.with_name(base.name + WRITTEN),
        )


@dataclass(frozen=True)
class Writer:
    """For whom and from where the downloader writes a store file (its write record)."""

    model: str
    url: str
    sha256: str | None = None


class StoreConflict(FetchError):
    """A file under the model's store name that does not match its sha256 and that this
    downloader did not write for that model: reported, never replaced."""

    def __init__(self, path: Path, model: str, expected: str, found: str):
        self.path, self.expected, self.found = path, expected, found
        super().__init__(
            f"{path} is in the store but its sha256 is {found}, not {expected} as model "
            f"{model}'s config says. This downloader did not write that file for {model} (or "
            "it was changed since), so it is left as it is: if it is yours, fix the model's "
            "sha256; otherwise delete the file and request the model again"
        )


@dataclass(frozen=True)
class Outcome:
    size: int
    reused: str | None  # "store", "ollama:<path>", "hf-cache:<path>"; None = downloaded


@asynccontextmanager
async def locked(path: Path, poll_s: float = 0.2) -> AsyncIterator[None]:
    """Exclusive flock on `path`, polled so the caller's deadline can cancel the wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(poll_s)
        yield
    finally:
        os.close(fd)  # releases the lock


def _identity(path: Path) -> list[int]:
    """What a write record pins: a file replaced (new inode) or rewritten (size, mtime) is no
    longer the one the downloader wrote. lstat: a symlink put in its place is not it either."""
    s = path.lstat()
    return [s.st_ino, s.st_size, s.st_mtime_ns]


def record_write(st: Staging, writer: Writer, path: Path) -> None:
    """Write `st`'s record for `path` (the part about to be renamed, or the published file:
    a rename keeps inode and mtime). Written before the rename, so a crash in between leaves
    a record of an inode that is not the store file, which proves nothing: harmless."""
    raw = {
        "model": writer.model,
        "url": writer.url,
        "sha256": writer.sha256,
        "file": _identity(path),
    }
    tmp = st.written.with_name(st.written.name + ".tmp")
    try:
        st.written.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(raw) + "\n")
        os.replace(tmp, st.written)
    except OSError as e:  # the file is still good; it only counts as not the downloader's
        log.warning("cannot record that %s was written for %s: %s", st.dest, writer.model, e)


def written_for(st: Staging) -> str | None:
    """The model this downloader wrote the store file for, if the file is still exactly
    what it wrote; else None (no record, another file, or one changed since)."""
    try:
        raw = json.loads(st.written.read_text())
        same = raw["file"] == _identity(st.dest)
        return str(raw["model"]) if same else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def own_earlier_files(store: Path, model: str, but: str) -> list[str]:
    """Store files (other than `but`) this downloader wrote for `model` that are still what
    it wrote: under the names of the model's earlier url/sha256 (store names follow them)."""
    staging = store / STAGING_DIR
    if not staging.is_dir():
        return []
    names = []
    for rec in sorted(staging.rglob("*" + WRITTEN)):
        name = rec.relative_to(staging).as_posix()[: -len(WRITTEN)]
        if name != but and written_for(Staging.of(store, name)) == model:
            names.append(name)
    return names


def _stamp(path: Path) -> str:
    s = path.stat()
    return f"{s.st_size} {s.st_mtime_ns}"


def cached_digest(st: Staging) -> str | None:
    try:
        digest, stamp = st.digest.read_text().split(" ", 1)
        return digest if stamp.strip() == _stamp(st.dest) else None
    except (OSError, ValueError):
        return None


def remember_digest(st: Staging, digest: str) -> None:
    try:
        st.digest.write_text(f"{digest} {_stamp(st.dest)}\n")
    except OSError as e:  # only an optimisation
        log.debug("cannot record digest of %s: %s", st.dest, e)


async def store_digest(st: Staging) -> str:
    digest = cached_digest(st)
    if digest is None:
        digest = await asyncio.to_thread(sha256_file, st.dest)
        remember_digest(st, digest)
    return digest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(st: Staging) -> None:
    st.part.unlink(missing_ok=True)
    state_path(st.part).unlink(missing_ok=True)


def publish(st: Staging, digest: str | None, writer: Writer | None) -> None:
    """Atomic rename into the store: readers see the old name absent or the whole file.
    With a `writer`, the file's write record says the downloader wrote it for that model."""
    st.dest.parent.mkdir(parents=True, exist_ok=True)
    if writer is not None:
        record_write(st, writer, st.part)
    else:
        st.written.unlink(missing_ok=True)  # a record of the file this one replaces
    os.replace(st.part, st.dest)
    _fsync_dir(st.dest.parent)
    state_path(st.part).unlink(missing_ok=True)
    if digest:
        remember_digest(st, digest)


async def verify_and_publish(
    st: Staging,
    url: str,
    expected: int | None,
    sha256: str | None,
    digest: str | None,
    writer: Writer | None = None,
) -> int:
    size = st.part.stat().st_size
    if expected is not None and size != expected:
        discard(st)
        raise FetchError(
            f"{st.dest.name}: got {size} bytes but the server announced {expected}; "
            "the download was deleted, request the model again"
        )
    if sha256:
        digest = digest or await asyncio.to_thread(sha256_file, st.part)
        if digest != sha256.lower():
            discard(st)
            raise FetchError(
                f"sha256 mismatch for {st.dest.name}: expected {sha256.lower()}, got {digest}. "
                f"The file at {url} is not the configured one: fix the model's sha256 or its "
                "url. The downloaded file was deleted."
            )
    publish(st, digest, writer)
    return size


def file_url_path(url: str) -> Path:
    u = urlsplit(url)
    return Path(unquote(u.netloc + u.path))


async def obtain(
    src: Source,
    store: Path,
    sha256: str | None,
    opts: Options,
    progress: Progress,
    ollama_roots: list[Path] | None = None,
    hf_roots: list[Path] | None = None,
    legacy: str | None = None,
    *,
    model: str = "",
    opened: Callable[[Path], None] | None = None,
) -> Outcome:
    """Make `store/src.filename` a complete, verified copy of `src`, written for `model`.
    `legacy`: the file's name in this store before names followed the source
    (lls.config.legacy_store_filename), hard-linked when it matches `sha256`; without a
    checksum it could be any old version. So are the files this downloader wrote for `model`
    under the names of its earlier url/sha256. `opened`: the check of a file:// source's real
    path once it is open (the service's downloader.file_roots)."""
    st = Staging.of(store, src.filename)
    sha256 = sha256.lower() if sha256 else None
    writer = Writer(model, src.url, sha256)
    async with locked(st.lock):
        if st.dest.is_file():
            found = await store_digest(st) if sha256 else None
            if found == sha256:
                size = st.dest.stat().st_size
                progress.total = progress.done = progress.resumed = size
                return Outcome(size, "store")
            assert sha256 is not None and found is not None
            if written_for(st) != model:
                log.warning(
                    "%s does not match model %s's sha256: expected %s, found %s; not written "
                    "by this downloader for %s (or changed since), so not replaced",
                    st.dest,
                    model,
                    sha256,
                    found,
                    model,
                )
                raise StoreConflict(st.dest, model, sha256, found)
            log.warning(
                "%s, written here for %s, no longer matches its sha256 (expected %s, found %s): "
                "replacing it",
                st.dest,
                model,
                sha256,
                found,
            )

        hits = reuse.find(sha256, src.hf, src.ollama, ollama_roots, hf_roots)
        mine: dict[Path, Staging] = {}  # store files: their digests are cached
        if sha256:  # earlier copies in this store: only a checksum says they are this file
            earlier = own_earlier_files(store, model, src.filename) if model else []
            if legacy and legacy not in earlier:
                earlier.insert(0, legacy)
            for name in reversed(earlier):
                old = Staging.of(store, name)
                if old.dest.is_file() and old.dest != st.dest:
                    hits.insert(0, reuse.Hit(old.dest, f"store:{name}"))
                    mine[old.dest] = old
        for hit in hits:
            if sha256:
                there = mine.get(hit.path)
                if there is not None:
                    digest = await store_digest(there)
                else:
                    digest = await asyncio.to_thread(sha256_file, hit.path)
                if digest != sha256:
                    log.warning("%s does not match sha256 %s: not reused", hit.path, sha256)
                    continue
            size = await _link_or_copy(hit.path, st, progress, opts.min_free)
            publish(st, sha256, writer)
            log.info("%s: reused %s", src.filename, hit.origin)
            return Outcome(size, hit.origin)

        if src.url.startswith("ollama://"):
            dirs = ", ".join(str(d) for d in (ollama_roots or reuse.ollama_dirs()))
            raise FetchError(
                f"{src.url} is not in the Ollama models dirs ({dirs}): run `ollama pull` "
                "first, set LLS_OLLAMA_MODELS, or use an hf:// or https:// url"
            )
        try:
            if src.url.startswith("file://"):
                path = file_url_path(src.url)
                expected, digest = await copy_file(
                    path, st.part, progress, opts.min_free, opened=opened
                )
            else:
                expected, digest = await fetch_http(src.url, st.part, src.headers, opts, progress)
        except BaseException:
            if not state_path(st.part).exists():  # nothing to resume from: do not keep it
                discard(st)
            raise
        size = await verify_and_publish(st, src.url, expected, sha256, digest, writer)
        return Outcome(size, None)


async def _link_or_copy(src: Path, st: Staging, progress: Progress, margin: int) -> int:
    """A hard link costs nothing; across filesystems (or where links are refused) copy."""
    discard(st)
    st.part.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, st.part)
    except OSError as e:
        log.info("cannot hard-link %s (%s): copying", src, e.strerror)
        try:
            await copy_file(src, st.part, progress, margin)
        except BaseException:
            discard(st)
            raise
    size = st.part.stat().st_size
    progress.total = progress.done = size
    return size


def _lock_held(lock: Path) -> bool:
    """Whether a download holds this part's lock now (any process, this one included)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock


def sweep_partials(
    store: Path, keep: Iterable[str], max_age_s: float = PARTIAL_MAX_AGE_S
) -> list[Path]:
    """Delete unfinished downloads that will not be resumed: parts of files no configured
    model uses, parts untouched for `max_age_s`, and resume states without their part.
    Parts being written now (their lock is held) are left alone. Returns what was deleted."""
    staging = store / STAGING_DIR
    keep = set(keep)
    now = time.time()
    gone: list[Path] = []
    if not staging.is_dir():
        return gone
    for part in staging.rglob("*.part"):
        name = part.relative_to(staging).as_posix()[: -len(".part")]
        st = Staging.of(store, name)
        try:
            age = now - max(part.stat().st_mtime, _mtime(state_path(part)))
        except OSError:
            continue
        if (name in keep and age < max_age_s) or _lock_held(st.lock):
            continue
        discard(st)
        gone.append(part)
    for orphan in staging.rglob("*.part.json"):
        if not orphan.with_suffix("").exists():
            orphan.unlink(missing_ok=True)
            gone.append(orphan)
    if gone:
        log.info("deleted %d unfinished download(s) nobody will resume", len(gone))
    return gone


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


async def remove(store: Path, filename: str, lock_wait_s: float = 5.0) -> bool:
    """Delete `store/filename` with its digest cache and any unfinished download of it, under
    the file's lock (so no downloader process is writing it). Whether the file was there.
    TimeoutError: a download of it holds the lock (in this process or another)."""
    st = Staging.of(store, filename)
    async with asyncio.timeout(lock_wait_s), locked(st.lock):
        existed = st.dest.is_file()
        st.dest.unlink(missing_ok=True)
        st.digest.unlink(missing_ok=True)
        st.written.unlink(missing_ok=True)
        discard(st)
    if existed:
        _fsync_dir(st.dest.parent)
    return existed
