"""A model's GGUF header, read before the model is downloaded anywhere.

The placer needs a model's memory to pick a GPU, and the memory comes from the header. Rather
than fetch gigabytes to the host with the most room and re-check afterwards, the downloader
reads just the header: one streamed GET that stops as soon as the header parses (a few KiB to
a few MiB of a multi-GiB file), with or without Range support. Local copies (file://, the
Ollama store, the Hugging Face cache) are read in place.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import httpx

from lls.gguf_header import TruncatedHeader, read_summary, read_summary_from_bytes
from proto import GgufSummary
from services.downloader import reuse
from services.downloader.fetch import FetchError, Options, content_range, http_client, status_error
from services.downloader.sources import Source, resolve
from services.downloader.store import file_url_path

FIRST_READ = 256 * 1024  # most headers fit; big vocabularies need a few MiB


@dataclass(frozen=True)
class Peeked:
    summary: GgufSummary
    size: int | None  # all parts of a split GGUF; None when a server does not say


async def peek(
    url: str,
    filename: str,
    opts: Options,
    ollama_roots: list[Path] | None = None,
    hf_roots: list[Path] | None = None,
) -> Peeked:
    """The header summary and total size of the model at `url` (raises ValueError, FetchError,
    SourceError with a message for the user)."""
    sources = resolve(url, filename)
    sizes: list[int | None] = []
    summary: GgufSummary | None = None
    async with http_client(opts) as client:
        for i, src in enumerate(sources):
            local = _local_copy(src, ollama_roots, hf_roots)
            if local is not None:
                if i == 0:
                    summary = await asyncio.to_thread(read_summary, local)
                sizes.append(local.stat().st_size)
            elif i == 0:
                summary, size = await _remote_header(client, src)
                sizes.append(size)
            else:
                sizes.append(await _remote_size(client, src))
    assert summary is not None
    total = None if None in sizes else sum(s for s in sizes if s is not None)
    return Peeked(summary, total)


def _local_copy(
    src: Source, ollama_roots: list[Path] | None, hf_roots: list[Path] | None
) -> Path | None:
    if src.url.startswith("file://"):
        path = file_url_path(src.url)
        if not path.is_file():
            raise FetchError(f"{src.url}: no such file")
        return path
    hits = reuse.find(None, src.hf, src.ollama, ollama_roots, hf_roots)
    if hits:
        return hits[0].path
    if src.ollama is not None:
        raise FetchError(f"{src.url}: not in any Ollama store (ollama:// is local only)")
    return None


async def _remote_header(client: httpx.AsyncClient, src: Source) -> tuple[GgufSummary, int | None]:
    """Stream from byte 0 until the header parses, then drop the connection."""
    headers = {**src.headers, "Range": "bytes=0-"}
    async with client.stream("GET", src.url, headers=headers) as r:
        if err := status_error(r, src.url):
            raise err
        size = _size_of(r)
        buf = bytearray()
        want = FIRST_READ
        async for chunk in r.aiter_raw():
            buf += chunk
            if len(buf) < want:
                continue
            try:
                return read_summary_from_bytes(buf), size
            except TruncatedHeader as e:
                want = max(e.needed, len(buf) * 3 // 2)  # grow geometrically: few re-parses
            except ValueError as e:
                raise ValueError(f"{src.url}: {e}") from None
        try:
            return read_summary_from_bytes(buf), size
        except ValueError as e:  # TruncatedHeader too: the file ends inside its header
            raise ValueError(f"{src.url}: {e} (the file is {len(buf)} bytes)") from None


async def _remote_size(client: httpx.AsyncClient, src: Source) -> int | None:
    async with client.stream("GET", src.url, headers={**src.headers, "Range": "bytes=0-0"}) as r:
        if err := status_error(r, src.url):
            raise err
        return _size_of(r)


def _size_of(r: httpx.Response) -> int | None:
    if r.status_code == 206:
        return content_range(r.headers.get("content-range"))[1]
    length = r.headers.get("content-length", "")
    return int(length) if length.isdigit() else None
