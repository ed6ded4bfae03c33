"""The model store as the placer sees it: complete *.gguf files with their header summaries.

Files still being written (`x.gguf.part`, hidden or `.tmp` names) are not models yet. Header
summaries are cached by (mtime, size), so a heartbeat rescans in microseconds per file.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import proto
from lls.config import SPLIT_SUFFIX

log = logging.getLogger(__name__)

TEMP_MARKERS = (".part", ".tmp", ".partial", ".incomplete", ".download")

Reader = Callable[[Path], proto.GgufSummary]


def is_model_file(name: str) -> bool:
    """A complete GGUF that is a model by itself: parts 2..N of a split GGUF are not."""
    if not name.endswith(".gguf") or name.startswith("."):
        return False
    split = SPLIT_SUFFIX.search(name)
    if split and split.group(1) != "00001":
        return False
    stem = name[: -len(".gguf")]
    return not stem.endswith(TEMP_MARKERS)


def split_size(path: Path, size: int) -> int:
    """The size of all parts of a split GGUF (given its first part), else `size`."""
    split = SPLIT_SUFFIX.search(path.name)
    if not split:
        return size
    n = int(split.group(2))
    prefix = path.name[: split.start()]
    total = size
    for k in range(2, n + 1):
        with contextlib.suppress(OSError):
            total += (path.parent / f"{prefix}-{k:05d}-of-{n:05d}.gguf").stat().st_size
    return total


def model_name(filename: str) -> str:
    """A store file's name without `.gguf`: the model it holds when no configured model
    names it (the agent's heartbeat puts in the configured name where one does)."""
    return filename[: -len(".gguf")]


def _read_header(path: Path) -> proto.GgufSummary:
    from lls.gguf_header import read_summary  # lazily: the store works without it

    return read_summary(path)


class Store:
    def __init__(self, root: Path, reader: Reader = _read_header):
        self.root = root
        self.reader = reader
        self._cache: dict[str, tuple[int, int, proto.GgufSummary | None]] = {}

    def _summary(self, rel: str, path: Path, st: os.stat_result) -> proto.GgufSummary | None:
        hit = self._cache.get(rel)
        if hit and hit[0] == st.st_mtime_ns and hit[1] == st.st_size:
            return hit[2]
        try:
            summary = self.reader(path)
        except Exception as e:  # noqa: BLE001 - a bad header is reported as "unknown"
            log.warning("cannot read the GGUF header of %s: %s", path, e)
            summary = None
        self._cache[rel] = (st.st_mtime_ns, st.st_size, summary)
        return summary

    def scan(self) -> list[proto.FileInfo]:
        files = []
        seen = set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not is_model_file(name):
                    continue
                path = Path(dirpath) / name
                try:
                    st = path.stat()  # follows a symlink to a reused copy
                except OSError:
                    continue
                rel = path.relative_to(self.root).as_posix()
                seen.add(rel)
                files.append(
                    proto.FileInfo(
                        model=model_name(rel),
                        filename=rel,
                        size=split_size(path, st.st_size),
                        gguf=self._summary(rel, path, st),
                    )
                )
        for gone in set(self._cache) - seen:
            del self._cache[gone]
        return files
