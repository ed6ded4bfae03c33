"""The instances and hosts tables rebuilt from the event log (events as the history).

Every write of an instance record is followed by an `InstanceChanged` event carrying the
record and the KV revision of that write. Replaying the stream in any order gives, per
instance, the record of its highest revision: what KV holds, or held before the placer
purged an ended record. `diff` says where a rebuilt table and KV disagree.

Hosts: an agent says `HostJoined` (its GPUs and runtime) each time it starts; the leading
placer says `HostLost` and `HostBack`. Heartbeats are not events, so the hosts table is the
membership: who joined, with what, and whether the placer counts it lost now
(`rebuild_hosts`, in stream order; `diff_hosts` against KV and the placer's lost set).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, replace

import proto
from proto import InstanceRecord


def rebuild(events: Iterable[proto.Event]) -> dict[str, tuple[int, InstanceRecord]]:
    """instance id -> (revision, record) of the latest write the events carry."""
    table: dict[str, tuple[int, InstanceRecord]] = {}
    for ev in events:
        if not isinstance(ev, proto.InstanceChanged) or ev.record is None:
            continue
        seen = table.get(ev.instance_id)
        if seen is None or ev.revision > seen[0]:
            table[ev.instance_id] = (ev.revision, ev.record)
    return table


def diff(
    rebuilt: Mapping[str, tuple[int, InstanceRecord]], kv: Mapping[str, InstanceRecord]
) -> list[str]:
    """Where the rebuilt table and KV's records disagree, in words (empty: they agree). A
    record only the log has must have ended (the placer purges ended records from KV)."""
    problems = []
    for iid, rec in kv.items():
        got = rebuilt.get(iid)
        if got is None:
            problems.append(f"{iid}: in KV ({rec.state.value}) but no event carries it")
        elif got[1] != rec:
            problems.append(
                f"{iid}: KV says {rec.state.value} ({rec.reason!r}), the log "
                f"{got[1].state.value} ({got[1].reason!r})"
            )
    for iid, (_, rec) in rebuilt.items():
        if iid not in kv and rec.state not in proto.END_STATES:
            problems.append(f"{iid}: the log says {rec.state.value}, KV has no record")
    return problems


@dataclass(frozen=True)
class HostEntry:
    gpus: int
    runtime: str
    lost: bool = False
    reason: str = ""  # why it is lost, or back


def rebuild_hosts(events: Iterable[proto.Event]) -> dict[str, HostEntry]:
    """host id -> its membership as the log tells it; `events` in stream order."""
    table: dict[str, HostEntry] = {}
    for ev in events:
        if isinstance(ev, proto.HostJoined):
            table[ev.host_id] = HostEntry(ev.gpus, ev.runtime)
        elif isinstance(ev, proto.HostLost | proto.HostBack) and ev.host_id in table:
            lost = isinstance(ev, proto.HostLost)
            table[ev.host_id] = replace(table[ev.host_id], lost=lost, reason=ev.reason)
    return table


def diff_hosts(
    rebuilt: Mapping[str, HostEntry], kv: Mapping[str, proto.HostRecord], lost: Set[str]
) -> list[str]:
    """Where the rebuilt hosts and KV's host records (and the placer's `lost`) disagree."""
    problems = []
    for host, rec in kv.items():
        got = rebuilt.get(host)
        if got is None:
            problems.append(f"{host}: in KV but it never joined in the log")
            continue
        if got.runtime != rec.runtime or got.gpus != len(rec.gpus):
            problems.append(
                f"{host}: KV says {len(rec.gpus)} GPU(s), {rec.runtime}; the log "
                f"{got.gpus}, {got.runtime}"
            )
        if got.lost != (host in lost):
            problems.append(f"{host}: the log says {'lost' if got.lost else 'not lost'}")
    return problems
