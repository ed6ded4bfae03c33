"""Warm swaps: an instance's slot KV caches saved to a per-host folder before it stops, and
restored into the next compatible instance of the model on this host (README: Warm swaps).

Pure parts (naming, keying, which files to evict) are kept apart from the little I/O here
(listing, deleting, renaming) and from the HTTP calls, which live in slot_calls.py.

A saved slot is `<model file stem>.<fingerprint>.slot<i>.bin`. The fingerprint covers all
that shapes the KV cache and its file format: the model config's launch fingerprint (file,
ctx_size, args, embeddings), the GPU layers and the program that ran it (a llama-server build
or image). Only an instance launched the same way finds the file; one with another context
size or other flags never restores it (llama-server would accept some such files and
misbehave, or refuse them only late).

llama-server writes a save under a temporary name (`tmp.<instance hash>.slot<i>.bin`); the
agent renames it into place only once the save answered, so a save cut short by a deadline
or a crash never leaves a half-written file under a name a restore would read.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import msgspec

log = logging.getLogger(__name__)

SUFFIX = ".bin"
_SLOT_RE = re.compile(r"(?P<key>[A-Za-z0-9_.-]+\.[0-9a-f]{16})\.slot(?P<slot>[0-9]{1,4})\.bin")
_KEY_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}\.[0-9a-f]{16}")
_TEMP_RE = re.compile(r"tmp\.[0-9a-f]{12}\.slot[0-9]{1,4}\.bin")
MAX_SLOTS = 10_000  # the naming holds 4 digits
# A slot holding fewer prompt tokens than this is not saved: recomputing them costs less than
# writing and reading the file back (a save and a restore took 15-180 ms each on 2 busy cores
# in a swap storm of 37-token prompts, where the prefill they spare takes well under 1 ms).
MIN_TOKENS = 64


def all_idle(slots: object) -> bool:
    """Whether llama-server's GET /slots says no slot is processing a request (a stop may
    then kill it at once: there is nothing to finish, and SIGTERM costs ~110 ms more)."""
    return (
        isinstance(slots, list)
        and bool(slots)
        and all(isinstance(s, dict) and s.get("is_processing") is False for s in slots)
    )


def worth_saving(slots: object) -> list[int] | None:
    """The ids of the slots whose prompt is long enough to save, from llama-server's GET
    /slots; None when the answer is not understood (then every slot is tried)."""
    if not isinstance(slots, list):
        return None
    ids = []
    for slot in slots:
        if not isinstance(slot, dict) or not isinstance(slot.get("id"), int):
            return None
        n = slot.get("n_prompt_tokens", 0)
        if isinstance(n, int) and n >= MIN_TOKENS:
            ids.append(slot["id"])
    return ids


@dataclass(frozen=True)
class CachedFile:
    name: str
    size: int  # bytes
    mtime: float  # last save or restore (a restore touches it: oldest out = least used)


def cache_dir(configured: str, store: Path, host_id: str) -> Path:
    """The host's folder: `agent.slot_cache_dir` (or `<store>/slot-cache`), then the host id,
    so agents sharing a machine and a store never evict each other's files."""
    base = Path(os.path.expanduser(configured)) if configured else store / "slot-cache"
    return base.absolute() / host_id


def cache_key(model_filename: str, launch_fp: str, program: str, n_gpu_layers: int) -> str:
    """What a slot file of this launch is named by (without the slot index)."""
    stem = model_filename.removesuffix(".gguf")
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).lstrip(".") or "m"
    basis = msgspec.json.encode([launch_fp, program, n_gpu_layers])
    return f"{stem[:120]}.{hashlib.sha256(basis).hexdigest()[:16]}"


def is_key(key: str) -> bool:
    """A well-formed cache key (one read back from a state file or label names files)."""
    return _KEY_RE.fullmatch(key) is not None


def slot_file(key: str, slot: int) -> str:
    if not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"slot {slot} out of range")
    return f"{key}.slot{slot}{SUFFIX}"


def temp_file(instance_id: str, slot: int) -> str:
    """Where llama-server writes slot `slot` of `instance_id` before it is renamed in place."""
    digest = hashlib.sha256(instance_id.encode()).hexdigest()[:12]
    return f"tmp.{digest}.slot{slot}{SUFFIX}"


def temps_of(instance_id: str, names: list[str]) -> list[str]:
    """The temporary files of `instance_id`'s saves among `names`."""
    prefix = temp_file(instance_id, 0).removesuffix(f"0{SUFFIX}")
    return [n for n in names if n.startswith(prefix) and is_temp(n)]


def parse(name: str) -> tuple[str, int] | None:
    """(key, slot) of a slot file's name, None for any other name."""
    m = _SLOT_RE.fullmatch(name)
    return (m.group("key"), int(m.group("slot"))) if m else None


def is_ours(name: str) -> bool:
    """A file this cache wrote (a slot file or a temporary one); nothing else is touched."""
    return parse(name) is not None or _TEMP_RE.fullmatch(name) is not None


def is_temp(name: str) -> bool:
    return _TEMP_RE.fullmatch(name) is not None


def restorable(key: str, names: list[str], n_slots: int) -> dict[int, str]:
    """slot index -> file to restore into it: files of exactly this key, for slots the
    instance has."""
    out = {}
    for name in names:
        parsed = parse(name)
        if parsed is not None and parsed[0] == key and parsed[1] < n_slots:
            out[parsed[1]] = name
    return out


def evictions(files: list[CachedFile], limit_bytes: int) -> list[tuple[str, str]]:
    """(name, reason) of the files to delete so that the rest fit in `limit_bytes`: oldest
    first (by mtime, then name for a stable order). A limit of 0 deletes everything."""
    total = sum(f.size for f in files)
    out = []
    for f in sorted(files, key=lambda f: (f.mtime, f.name)):
        if total <= limit_bytes:
            break
        total -= f.size
        out.append((f.name, f"cache holds more than {limit_bytes} bytes; oldest out"))
    return out


# ---------------------------------------------------------------- the little I/O


def scan(folder: Path) -> list[CachedFile]:
    """This cache's files in `folder` (others are ignored and never deleted)."""
    out = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for e in entries:
        if not is_ours(e.name):
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        out.append(CachedFile(e.name, st.st_size, st.st_mtime))
    return out


def prune(folder: Path, limit_mib: int) -> list[str]:
    """Delete the oldest files past the limit; the names deleted."""
    gone = []
    for name, why in evictions(scan(folder), limit_mib * 1024 * 1024):
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning("slot cache: cannot delete %s: %s", name, e)
            continue
        log.info("slot cache: deleted %s (%s)", name, why)
        gone.append(name)
    return gone


def remove_temps(folder: Path) -> None:
    """Temporary files left by saves an agent crash cut short."""
    for f in scan(folder):
        if is_temp(f.name):
            with contextlib.suppress(OSError):
                (folder / f.name).unlink()


def commit(folder: Path, temp: str, final: str) -> None:
    """A finished save takes its place (atomically: a restore reads the old or the new)."""
    os.replace(folder / temp, folder / final)


def discard(folder: Path, *names: str) -> None:
    for name in names:
        with contextlib.suppress(OSError):
            (folder / name).unlink()


def touch(folder: Path, name: str) -> None:
    """A restored file counts as just used: the least used go first."""
    with contextlib.suppress(OSError):
        os.utime(folder / name)


def prepare(folder: Path, limit_mib: int) -> None:
    """At agent start: leftovers of cut-short saves go, and the folder is brought within its
    limit (0 = warm swaps off: the folder keeps nothing)."""
    if not folder.is_dir():
        return
    remove_temps(folder)
    prune(folder, limit_mib)
