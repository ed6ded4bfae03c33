"""Read what placement needs from a GGUF header, without loading the file.

GGUF layout (v2/v3, little- or big-endian):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: str, type: u32, value)            str = u64 length + bytes
    n_tensors x (name: str, n_dims: u32, dims: n_dims x u64, ggml_type: u32, offset: u64)
    padding to general.alignment, then tensor data (never read here)

`gguf.GGUFReader` parses every field and tensor up front (seconds on a 150k-token vocab) and
fails on quant types newer than the package. This reader walks the header once, keeps only
the scalar keys it needs and skips arrays (a string array is skipped by its lengths alone), so
it takes milliseconds. Local files are memory-mapped: only the header's pages are touched.

For remote files, call `read_summary_from_bytes` on a growing prefix: while the prefix is too
short it raises `TruncatedHeader` whose `needed` says how many bytes to fetch at least.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Callable
from typing import NoReturn, TypeVar

from gguf import GGML_QUANT_SIZES

from proto.messages import GgufSummary

__all__ = ["TruncatedHeader", "read_summary", "read_summary_from_bytes", "read_metadata"]

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_HEADER_BYTES = 1 << 30  # real headers are a few MB; beyond this the file is corrupt

# GGUF value types -> struct format of a scalar
_SCALAR_FMT = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9

# ggml type id -> (elements per block, bytes per block); ids the package does not know stay out
_TYPE_SIZES = {int(t): bs for t, bs in GGML_QUANT_SIZES.items()}


class TruncatedHeader(ValueError):
    """The data ends inside the header; `needed` is a lower bound on the bytes required."""

    def __init__(self, needed: int, have: int):
        super().__init__(
            f"GGUF header is truncated: it goes on past byte {have} (needs at least {needed} bytes)"
        )
        self.needed = needed
        self.have = have


def _truncated(needed: int, have: int) -> NoReturn:
    if needed > MAX_HEADER_BYTES:  # a garbage length: do not ask a caller to fetch gigabytes
        raise ValueError(
            f"corrupt GGUF header: a length field points past {MAX_HEADER_BYTES} bytes"
        )
    raise TruncatedHeader(needed, have)


class _Cursor:
    """A position in a buffer with typed reads; running past the end raises TruncatedHeader."""

    def __init__(self, buf: bytes | memoryview | mmap.mmap, endian: str):
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.endian = endian
        self._u32 = struct.Struct(endian + "I").unpack_from
        self._u64 = struct.Struct(endian + "Q").unpack_from

    def need(self, n: int) -> None:
        if self.pos + n > self.end:
            _truncated(self.pos + n, self.end)

    def u32(self) -> int:
        self.need(4)
        (v,) = self._u32(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        self.need(8)
        (v,) = self._u64(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self) -> str:
        n = self.u64()
        self.need(n)
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def scalar(self, vtype: int) -> object:
        if vtype == _STRING:
            return self.string()
        fmt = _SCALAR_FMT.get(vtype)
        if fmt is None:
            raise ValueError(f"GGUF: unknown value type {vtype} at byte {self.pos - 4}")
        size = struct.calcsize(fmt)
        self.need(size)
        (v,) = struct.unpack_from(self.endian + fmt, self.buf, self.pos)
        self.pos += size
        return v

    def skip_strings(self, count: int) -> None:
        # The hot loop on big vocabularies (150k tokens + 280k merges): locals only.
        u64, buf, pos, end = self._u64, self.buf, self.pos, self.end
        for _ in range(count):
            if pos + 8 > end:
                _truncated(pos + 8, end)
            (n,) = u64(buf, pos)
            pos += 8 + n
        if pos > end:
            _truncated(pos, end)
        self.pos = pos


# Arrays whose values we keep (small per-layer arrays); any other array is skipped.
_KEEP_ARRAY_SUFFIXES = (".attention.head_count", ".attention.head_count_kv")
_MAX_KEPT_ARRAY = 4096


def _array(cur: _Cursor, key: str) -> object:
    etype = cur.u32()
    count = cur.u64()
    if etype == _STRING:
        cur.skip_strings(count)
        return _ArrayInfo(count)
    if etype == _ARRAY:
        for _ in range(count):  # nested arrays: rare, skip element by element
            _array(cur, "")
        return _ArrayInfo(count)
    fmt = _SCALAR_FMT.get(etype)
    if fmt is None:
        raise ValueError(f"GGUF: unknown array element type {etype} in {key!r}")
    size = struct.calcsize(fmt) * count
    cur.need(size)
    keep = key.endswith(_KEEP_ARRAY_SUFFIXES) and count <= _MAX_KEPT_ARRAY
    value: object = _ArrayInfo(count)
    if keep:
        value = list(struct.unpack_from(f"{cur.endian}{count}{fmt}", cur.buf, cur.pos))
    cur.pos += size
    return value


class _ArrayInfo:
    """A skipped array: only its length is known."""

    __slots__ = ("count",)

    def __init__(self, count: int):
        self.count = count

    def __repr__(self) -> str:
        return f"<array of {self.count}>"


def _open(buf: bytes | memoryview | mmap.mmap) -> tuple[_Cursor, int]:
    if bytes(buf[:4]) != MAGIC[: len(buf)]:
        raise ValueError(f"not a GGUF file (magic {bytes(buf[:4])!r}, expected {MAGIC!r})")
    if len(buf) < 24:
        raise TruncatedHeader(24, len(buf))
    if bytes(buf[:4]) != MAGIC:
        raise ValueError(f"not a GGUF file (magic {bytes(buf[:4])!r}, expected {MAGIC!r})")
    (version,) = struct.unpack_from("<I", buf, 4)
    endian = "<"
    if version & 0xFFFF == 0:  # a big-endian file reads as e.g. 0x03000000
        (version,) = struct.unpack_from(">I", buf, 4)
        endian = ">"
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"unsupported GGUF version {version} (supported: 2, 3)")
    cur = _Cursor(buf, endian)
    cur.pos = 8
    return cur, version


def _parse(
    buf: bytes | memoryview | mmap.mmap,
) -> tuple[dict[str, object], int, list[tuple[str, list[int], int]]]:
    """(metadata, n_tensors, tensor infos as (name, dims, ggml type))."""
    cur, _ = _open(buf)
    n_tensors = cur.u64()
    n_kv = cur.u64()
    meta: dict[str, object] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.u32()
        meta[key] = _array(cur, key) if vtype == _ARRAY else cur.scalar(vtype)
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.u32()
        if n_dims > 8:
            raise ValueError(f"GGUF: tensor {name!r} has {n_dims} dimensions (corrupt header?)")
        dims = [cur.u64() for _ in range(n_dims)]
        ggml_type = cur.u32()
        cur.u64()  # data offset
        tensors.append((name, dims, ggml_type))
    return meta, n_tensors, tensors


def tensor_nbytes(dims: list[int], ggml_type: int) -> int | None:
    """Data size of one tensor, or None for a ggml type this gguf package does not know."""
    sizes = _TYPE_SIZES.get(ggml_type)
    if sizes is None:
        return None
    block, type_size = sizes
    n = 1
    for d in dims:
        n *= d
    return n // block * type_size


def _int(meta: dict[str, object], key: str, default: int = 0) -> int:
    """A scalar key, or the max of a per-layer array (the safe bound for memory)."""
    v = meta.get(key)
    if isinstance(v, list):
        return int(max(v)) if v else default
    if isinstance(v, bool) or not isinstance(v, int | float):
        return default
    return int(v)


def _summarize(meta: dict[str, object], tensors: list[tuple[str, list[int], int]]) -> GgufSummary:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ValueError("GGUF header has no general.architecture")
    a = arch + "."
    n_embd = _int(meta, a + "embedding_length")
    n_head = _int(meta, a + "attention.head_count")
    n_head_kv = _int(meta, a + "attention.head_count_kv", n_head)
    head_dim = n_embd // n_head if n_head else 0
    tokens = meta.get("tokenizer.ggml.tokens")
    n_vocab = tokens.count if isinstance(tokens, _ArrayInfo) else _int(meta, a + "vocab_size")
    sizes = [tensor_nbytes(dims, t) for _, dims, t in tensors]
    # An unknown quant type makes the sum meaningless: 0 lets callers fall back to file size.
    tensor_bytes = 0 if any(s is None for s in sizes) else sum(s for s in sizes if s)
    n_params = sum(math.prod(dims) for _, dims, _ in tensors)
    if _int(meta, "split.count") > 1:  # this part lists only its own tensors: size unknown
        tensor_bytes = n_params = 0
    kv_heads = meta.get(a + "attention.head_count_kv", meta.get(a + "attention.head_count"))
    file_type = meta.get("general.file_type")
    # llama-server takes the tool-use template as the default when only that one is there
    templates = (meta.get("tokenizer.chat_template"), meta.get("tokenizer.chat_template.tool_use"))
    return GgufSummary(
        architecture=arch,
        n_layers=_int(meta, a + "block_count"),
        n_ctx_train=_int(meta, a + "context_length"),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=_int(meta, a + "attention.key_length", head_dim),
        head_dim_v=_int(meta, a + "attention.value_length", head_dim),
        n_vocab=n_vocab,
        file_type=int(file_type) if isinstance(file_type, int) else None,
        tensor_bytes=tensor_bytes,
        kv_heads_total=int(sum(kv_heads)) if isinstance(kv_heads, list) else 0,
        n_params=n_params,
        has_chat_template=any(isinstance(t, str) and t for t in templates),
    )


def read_summary_from_bytes(data: bytes | memoryview | mmap.mmap) -> GgufSummary:
    """Parse a header from the first bytes of a GGUF file (raises TruncatedHeader if short)."""
    meta, _, tensors = _parse(data)
    return _summarize(meta, tensors)


T = TypeVar("T")


def _with_buffer(path: str | os.PathLike[str], fn: Callable[[mmap.mmap | bytes], T]) -> T:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return fn(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return fn(mm)


def read_summary(path: str | os.PathLike[str]) -> GgufSummary:
    """Summary of a local GGUF file; ValueError if it is not GGUF or is cut short."""
    try:
        return _with_buffer(path, read_summary_from_bytes)
    except TruncatedHeader as e:
        raise ValueError(f"{os.fspath(path)}: {e} (file is {e.have} bytes)") from None
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)}: {e}") from None


def read_metadata(path: str | os.PathLike[str]) -> dict[str, object]:
    """All scalar metadata keys of a local file (arrays appear as their length); for tools."""

    def meta_only(buf: mmap.mmap | bytes) -> dict[str, object]:
        meta, _, _ = _parse(buf)
        return {k: (v.count if isinstance(v, _ArrayInfo) else v) for k, v in meta.items()}

    return _with_buffer(path, meta_only)
