"""Idle stops (pure): READY instances idle past their model's idle_timeout, or the last
request's Ollama keep_alive, longest idle first (DESIGN.md section 4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from proto.messages import InstanceActivity, InstanceRecord, InstanceState
from services.placer.placement_eviction import _last_use

__all__ = ["idle_to_stop", "keep_alive_timeout"]


def _fmt_duration(s: float) -> str:
    s = int(s)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def keep_alive_timeout(keep_alive: float) -> float:
    """An Ollama request's keep_alive as an idle timeout: 0 unloads right after the answer,
    a negative value keeps the model loaded (our 0, never)."""
    if keep_alive < 0:
        return 0.0
    return keep_alive if keep_alive > 0 else 1e-6


def idle_to_stop(
    instances: Sequence[InstanceRecord],
    activity: Mapping[str, InstanceActivity],
    idle_timeouts: Mapping[str, float],
    default_idle: float,
    now: float,
) -> list[tuple[str, str]]:
    """(instance_id, reason) for READY instances idle past their timeout, longest idle first.

    Idle is measured from the end of the last request (activity.last_used), or from ready_at
    when never used; a timeout of 0 means never; an instance with requests in flight is
    never idle. The last request's Ollama keep_alive, when it set one, replaces the model's
    timeout.
    """
    out: list[tuple[float, str, str]] = []
    for inst in instances:
        if inst.state != InstanceState.READY:
            continue
        timeout = idle_timeouts.get(inst.model, default_idle)
        act = activity.get(inst.instance_id)
        if act is not None and act.keep_alive is not None:
            timeout = keep_alive_timeout(act.keep_alive)
        if timeout <= 0 or (act is not None and act.in_flight > 0):
            continue
        idle = now - _last_use(inst, act)
        if idle >= timeout:
            why = f"idle for {_fmt_duration(idle)} (idle_timeout {timeout:g} s)"
            if act is not None and act.keep_alive is not None:
                why = f"idle for {_fmt_duration(idle)} (the last request's keep_alive {act.keep_alive:g} s)"
            out.append((-idle, inst.instance_id, why))
    out.sort()
    return [(iid, why) for _, iid, why in out]
