"""Replicas that follow load: pure decisions (no I/O, no logging).

A model runs between `replicas.min` and `replicas.max` instances. `plan` looks at one model's
instances, the gateways' activity on them and the model's queue at the gateways, and says
what to do next: nothing, start one more instance, or stop one idle instance. At most one
action per pass, each with a sentence for users. `scaling.py` carries it out; where a new
instance goes is `placement.place` (free room only). See DESIGN.md section 8.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from lls.config import Replicas
from proto.messages import LIVE_STATES, InstanceActivity, InstanceRecord, InstanceState
from services.placer.turns import Waiting

__all__ = ["AddReplica", "StopReplica", "plan"]

_ON_ITS_WAY = (InstanceState.PENDING, InstanceState.DOWNLOADING, InstanceState.STARTING)


@dataclass(frozen=True)
class AddReplica:
    """Start one more instance of the model (where: `placement.place`, free room only)."""

    reason: str


@dataclass(frozen=True)
class StopReplica:
    """Stop this idle instance: the model has more than `replicas.min` ready."""

    instance_id: str
    reason: str


def _busy(n: int) -> str:
    if n == 1:
        return "its instance busy"
    return "both instances busy" if n == 2 else f"all {n} instances busy"


def _s(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def plan(
    model: str,
    instances: Sequence[InstanceRecord],
    activity: Mapping[str, InstanceActivity],
    queue: Waiting | None,
    cfg: Replicas,
    *,
    now: float,
    demanded: bool = False,
    others_waiting: Collection[str] = (),
) -> AddReplica | StopReplica | None:
    """The next replica step for `model`, or None.

    `instances`: the cluster's records (others' are ignored); `activity`: the gateways'
    in-flight counts and last use per instance, merged; `queue`: what waits for `model` at
    the gateways (requests beyond its instances' slots queue there, so a queue means every
    instance is busy); `demanded`: demand for it arrived lately (a cold start); and
    `others_waiting`: other models that wait for room (no live instance).

    Add, when another model does not wait for room (its turn comes before our throughput),
    and either
      - demand came and fewer than `min` instances are live or on their way (several start
        at once: the first by the demand path, the rest here), or
      - fewer than `max` are live, none is on its way (one at a time), at least one is READY,
        every READY one has a request in flight, and the oldest waiting request has waited
        `target_wait`.
    Stop, when nothing waits and more than `min` are READY: the longest idle READY instance
    with nothing in flight for `idle_after` (from its last request's end, or from ready_at).
    No live instance at all: nothing here (the demand path places the first; the model's
    idle_timeout stops the last ones).
    """
    mine = [i for i in instances if i.model == model and i.state in LIVE_STATES]
    if not mine:
        return None
    ready = [i for i in mine if i.state == InstanceState.READY]
    staying = [i for i in mine if i.state != InstanceState.DRAINING]  # draining ones go
    on_way = [i for i in mine if i.state in _ON_ITS_WAY]
    top = max(cfg.max, cfg.min)
    others = sorted(m for m in others_waiting if m != model)

    if len(staying) < cfg.min and len(mine) < top and demanded:
        if others:
            return None
        return AddReplica(
            f"{model} is wanted and runs at least {_s(cfg.min, 'instance')} (replicas.min); "
            f"{len(staying)} live"
        )

    if queue is not None and queue.waiting > 0:
        waited = now - queue.since
        busy = all(
            (a := activity.get(i.instance_id)) is not None and a.in_flight > 0 for i in ready
        )
        if (
            len(mine) < top
            and not on_way
            and ready
            and busy
            and waited >= cfg.target_wait
            and not others
        ):
            return AddReplica(
                f"{_s(queue.waiting, 'request')} {'has' if queue.waiting == 1 else 'have'} "
                f"waited {waited:.1f} s with {_busy(len(ready))} "
                f"(replicas.target_wait {cfg.target_wait:g} s, max {top})"
            )
        return None  # requests wait: nothing is stopped

    if len(ready) <= cfg.min:
        return None
    idle: list[tuple[float, str]] = []
    for inst in ready:
        act = activity.get(inst.instance_id)
        if act is not None and act.in_flight > 0:
            continue
        since = inst.ready_at if inst.ready_at is not None else inst.updated
        if act is not None:
            since = max(since, act.last_used)
        if now - since >= cfg.idle_after:
            idle.append((since, inst.instance_id))
    if not idle:
        return None
    since, iid = min(idle)  # the longest idle first
    return StopReplica(
        iid,
        f"idle for {now - since:.1f} s (replicas.idle_after {cfg.idle_after:g} s) with "
        f"{len(ready)} instances ready, more than replicas.min {cfg.min}",
    )
