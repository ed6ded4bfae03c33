"""Per-key timing kept between passes (`Backoff`: (kind, key) -> Try): the one place the
placer keeps it. The executor notes outcomes; the planner reads `Backoff.view()` through the
View. Timing that must survive a change of leader is read from the records instead."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["HEADER_WAIT", "INSPECT", "NO_ROOM", "NO_SWAP", "Backoff", "Key", "Try"]


# Backoff kinds
NO_SWAP = "no_swap"  # model -> no new drain for it before `until` (its last one was abandoned)
NO_ROOM = "no_room"  # instance -> first found without room after its file came (BUSY_WAIT_S)
INSPECT = "inspect"  # model -> its header was last asked for (INSPECT_RETRY_S)
HEADER_WAIT = "header_wait"  # model -> its demand has been held for its header since


@dataclass(frozen=True)
class Try:
    """The timing of one key: since when it has waited, how often, and until when not again."""

    since: float  # the first time (kept over later notes until the key is cleared)
    last: float  # the latest time
    until: float  # nothing of this kind for this key before this
    count: int = 1


Key = tuple[str, str]  # (kind, key)


class Backoff:
    """Per-key retry and backoff state, (kind, key) -> Try: the one place the placer keeps
    timing between passes. The executor notes outcomes; the planner reads `view()`."""

    def __init__(self) -> None:
        self._tries: dict[Key, Try] = {}

    def get(self, kind: str, key: str) -> Try | None:
        return self._tries.get((kind, key))

    def note(self, kind: str, key: str, now: float, wait: float = 0.0) -> Try:
        """Another try (or wait) for `key` at `now`, not again for `wait` seconds."""
        cur = self._tries.get((kind, key))
        t = Try(
            since=cur.since if cur is not None else now,
            last=now,
            until=now + wait,
            count=cur.count + 1 if cur is not None else 1,
        )
        self._tries[(kind, key)] = t
        return t

    def since(self, kind: str, key: str, now: float) -> float:
        """When `key` first waited: noted now if it was not waiting yet."""
        cur = self._tries.get((kind, key))
        return cur.since if cur is not None else self.note(kind, key, now).since

    def clear(self, kind: str, key: str) -> None:
        self._tries.pop((kind, key), None)

    def keys(self, kind: str) -> list[str]:
        return [k for (c, k) in self._tries if c == kind]

    def holding(self, kind: str, key: str, now: float) -> bool:
        t = self._tries.get((kind, key))
        return t is not None and now < t.until

    def prune(self, kind: str, keep: Iterable[str]) -> None:
        """Forget the keys of `kind` that are not in `keep` (instances purged, say)."""
        alive = set(keep)
        for k in [k for (c, k) in self._tries if c == kind and k not in alive]:
            del self._tries[(kind, k)]

    def view(self) -> Mapping[Key, Try]:
        return MappingProxyType(dict(self._tries))
