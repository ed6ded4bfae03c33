"""Stored intent (KV desired): what the leading placer does about one model's request.

Pure: a DesiredModel and the instance records in, one step out. The placer's pass runs it
for every pending request (level-triggered), so a request written while no placer ran, or
taken up by a leader that then died, is carried out by whichever placer leads next.

    run   -> a READY instance: done ("ready ..."); one FAILED or refused since the request:
             done ("failed: ..."); else it is demand (the demand path places it)
    stop  -> live instances: stop them; some still STOPPING: wait; none: done ("stopped ...")
    any   -> past `until` (the asker's deadline): done ("expired ..."); model not in the
             config: done ("failed: ...")
    pinned, nothing pending -> no READY instance: demand (started again after it ended);
             pinned models are also never idle-stopped nor evicted (`pinned`)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import proto
from proto import DesiredModel, InstanceRecord, InstanceState


@dataclass(frozen=True)
class Done:
    outcome: str  # written to the record with wanted="" (the asker reads it)


@dataclass(frozen=True)
class DemandIt:
    """No instance is READY yet: the request counts as demand on this pass."""


@dataclass(frozen=True)
class StopThese:
    instance_ids: tuple[str, ...]


Step = Done | DemandIt | StopThese | None  # None: wait (instances are stopping)


def next_step(
    want: DesiredModel,
    instances: Iterable[InstanceRecord],
    *,
    configured: bool,
    refused: tuple[float, str] | None,
    now: float,
) -> Step:
    """`instances`: the records of hosts not lost; `refused`: when the placer last refused
    the model (PlacementFailed) and why."""
    if not want.wanted:
        if want.pinned and configured:
            mine = [r for r in instances if r.model == want.model]
            if not any(r.state == InstanceState.READY for r in mine):
                return DemandIt()
        return None
    if want.until is not None and now > want.until:
        return Done(f"expired: not done within {want.until - want.since:.0f} s")
    if not configured:
        return Done(f"failed: model {want.model!r} is not configured")
    mine = [r for r in instances if r.model == want.model]
    if want.wanted == proto.WANT_RUN:
        ready = sorted(
            (r for r in mine if r.state == InstanceState.READY), key=lambda r: r.instance_id
        )
        if ready:
            return Done(f"ready: {ready[0].instance_id} on {ready[0].host}")
        failed = [r for r in mine if r.state == InstanceState.FAILED and r.updated >= want.since]
        if failed:
            last = max(failed, key=lambda r: r.updated)
            return Done(f"failed: {last.instance_id} {last.reason}".rstrip())
        if refused is not None and refused[0] >= want.since:
            return Done(f"failed: {refused[1]}")
        return DemandIt()
    if want.wanted == proto.WANT_STOP:
        live = sorted(r.instance_id for r in mine if r.state in proto.LIVE_STATES)
        if live:
            return StopThese(tuple(live))
        if any(r.state == InstanceState.STOPPING for r in mine):
            return None
        stopped = [r for r in mine if r.state == InstanceState.STOPPED and r.updated >= want.since]
        n = len(stopped)
        return Done(f"stopped {n} instance{'s' if n != 1 else ''}" if n else "stopped: none ran")
    return Done(f"failed: unknown request {want.wanted!r}")


def pinned(desired: Mapping[str, DesiredModel]) -> frozenset[str]:
    """The models pinned in KV desired (by model name, whatever the key)."""
    return frozenset(w.model for w in desired.values() if w.pinned)


def preload_due(rec: DesiredModel | None, placer_started: float) -> bool:
    """Whether a leader writes the config's preload request for a model: none was ever
    written, or the last one finished and was asked before this placer process started.
    So a system (re)start preloads again; a standby that takes over, or the same placer
    later on, does not start a model that idled out again (and finishes a pending one)."""
    if rec is None:
        return True
    return not rec.wanted and rec.since < placer_started
