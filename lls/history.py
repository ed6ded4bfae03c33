"""The instances table rebuilt from the event log (issue 10: events as the history).

Every write of an instance record is followed by an `InstanceChanged` event carrying the
record and the KV revision of that write. Replaying the stream in any order gives, per
instance, the record of its highest revision: what KV holds, or held before the placer
purged an ended record. `diff` says where a rebuilt table and KV disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
