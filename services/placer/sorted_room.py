"""The sorted indexes a placement from the index searches (`PlacementIndex.rooms`): free
room per GPU name; per (GPU name, k) the k-th most free GPU of each host, for splits; free
RAM of CPU-only hosts; what an even split over a host's GPUs holds; and per (GPU name, k)
and per k what stopping a GPU's k least recently used idle instances leaves free and how
stale the k-th of them is. `swap_room` and `swap_victims` move one host's or one GPU's
entries when they change (no I/O, no clock)."""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field

__all__ = ["SortedRoom"]


class _Sorted:
    """A sorted list of distinct tuples (bisect; a few thousand entries at most)."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[tuple] = []  # type: ignore[type-arg]

    def add(self, item: tuple) -> None:  # type: ignore[type-arg]
        insort(self.items, item)

    def discard(self, item: tuple) -> None:  # type: ignore[type-arg]
        i = bisect_left(self.items, item)
        if i < len(self.items) and self.items[i] == item:
            del self.items[i]


@dataclass
class _HostEntries:
    """What of one host is in the sorted indexes, to take out when it changes."""

    free: list[tuple[str, tuple[int, str, int]]] = field(default_factory=list)
    split: list[tuple[tuple[str, int], tuple[int, str]]] = field(default_factory=list)
    cpu: tuple[int, str] | None = None
    capacity: tuple[int, str] | None = None
    # GPU index -> (name, what its first k idle victims leave free, the k-th one's order)
    victims: dict[int, tuple[str, tuple[float, ...], tuple[float, ...]]] = field(
        default_factory=dict
    )


class SortedRoom:
    """The sorted entries, kept by `PlacementIndex` as hosts' room and GPUs' victims change."""

    def __init__(self) -> None:
        self.free: dict[str, _Sorted] = {}  # GPU name -> (free, host, index)
        self.split: dict[tuple[str, int], _Sorted] = {}  # (name, k) -> (k-th most free, host)
        self.cpu = _Sorted()  # (RAM free, host)
        self.capacity = _Sorted()  # (what an even split over the host's GPUs holds, host)
        self.vcap: dict[tuple[str, int], _Sorted] = {}  # (name, k) -> (free after k, host, i)
        self.vnew: dict[int, _Sorted] = {}  # k -> (order of the k-th victim, host, index)

    def swap_room(self, old: tuple, new: _HostEntries) -> None:  # type: ignore[type-arg]
        """One host's entries in the room indexes, from `old` (its free, split, cpu and
        capacity entries before) to `new`."""
        free, split, cpu, capacity = old
        if free != new.free:
            for name, e in set(free) - set(new.free):
                self.free[name].discard(e)
            for name, e in set(new.free) - set(free):
                self.free.setdefault(name, _Sorted()).add(e)
        if split != new.split:
            for key, e2 in set(split) - set(new.split):
                self.split[key].discard(e2)
            for key, e2 in set(new.split) - set(split):
                self.split.setdefault(key, _Sorted()).add(e2)
        for index, a, b in ((self.cpu, cpu, new.cpu), (self.capacity, capacity, new.capacity)):
            if a != b:
                if a is not None:
                    index.discard(a)
                if b is not None:
                    index.add(b)

    def swap_victims(
        self,
        host: str,
        i: int,
        old: tuple[str, tuple[float, ...], tuple[float, ...]] | None,
        new: tuple[str, tuple[float, ...], tuple[float, ...]] | None,
    ) -> None:
        """One GPU's entries in the victim indexes, from `old` to `new`: only the k whose
        sum or order changed (a use reported moves one victim; the ones before it stay)."""
        on, nn = old or ("", (), ()), new or ("", (), ())
        for k in range(1, max(len(on[1]), len(nn[1])) + 1):
            was = (on[0], on[1][k - 1], on[2][k - 1]) if k <= len(on[1]) else None
            now = (nn[0], nn[1][k - 1], nn[2][k - 1]) if k <= len(nn[1]) else None
            if was == now:
                continue
            if was is None or now is None or was[:2] != now[:2]:
                if was is not None:
                    self.vcap[(was[0], k)].discard((was[1], host, i))
                if now is not None:
                    self.vcap.setdefault((now[0], k), _Sorted()).add((now[1], host, i))
            if was is None or now is None or was[2] != now[2]:
                if was is not None:
                    self.vnew[k].discard((was[2], host, i))
                if now is not None:
                    self.vnew.setdefault(k, _Sorted()).add((now[2], host, i))
