"""What a config reload asks of the running instances: a pure function, level-triggered.

Each instance record carries the launch fingerprint of the model config it was placed for
(`InstanceRecord.config_fp`, `lls.config.launch_fingerprint`), so this needs no memory of
the config before the reload: a restarted placer sees the same records and decides the same.

    model removed, instance not serving yet    -> stop
    model removed, instance serving            -> retire: drain (in-flight requests finish),
                                                  then stop
    fingerprint stale, not serving yet         -> stop (demand places a current one)
    fingerprint stale, serving, and
      a current instance is READY              -> retire the stale one
      a current instance is on its way         -> wait for it
      none                                     -> replace: place a current one beside it

So a changed model is never without a ready instance: the stale one serves until its
replacement is READY. A changed `url` or `sha256` needs nothing more here: the store file
name follows the source (`lls.config.store_filename`), so the replacement is placed on a new
file, downloaded first like any cold start, while the stale instance keeps its old file. A
record with no fingerprint (written before reloads existed) is left alone: what it runs with
is unknown.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lls.config import ModelConfig, launch_fingerprint
from proto import InstanceRecord, InstanceState

_SERVING = (InstanceState.READY, InstanceState.DRAINING)
_ON_ITS_WAY = (InstanceState.PENDING, InstanceState.DOWNLOADING, InstanceState.STARTING)


@dataclass(frozen=True)
class ReloadPlan:
    stop: list[tuple[str, str]]  # (instance id, reason): not serving, stop at once
    retire: list[tuple[str, str]]  # serving: drain, then stop
    replace: list[str]  # models that need a current instance placed beside a stale one


def plan(models: Mapping[str, ModelConfig], instances: Iterable[InstanceRecord]) -> ReloadPlan:
    """What to do about instances of models removed from the config, or changed in a key that
    their launch used. `instances` are the live records (anything else is ignored); a
    DRAINING one that yields to another model is left to that swap."""
    live = [r for r in instances if r.state in _SERVING or r.state in _ON_ITS_WAY]
    fps = {name: launch_fingerprint(m) for name, m in models.items()}
    stop: list[tuple[str, str]] = []
    retire: list[tuple[str, str]] = []
    replace: list[str] = []
    for rec in sorted(live, key=lambda r: r.instance_id):
        if rec.state == InstanceState.DRAINING and rec.drain_for:
            continue  # yielding in a swap: that decides its end
        if rec.model not in fps:
            why = f"{rec.model} was removed from the config"
        elif rec.config_fp and rec.config_fp != fps[rec.model]:
            why = f"{rec.model}'s config changed (reload)"
        else:
            continue
        if rec.state in _ON_ITS_WAY:
            stop.append((rec.instance_id, why))
            continue
        if rec.state == InstanceState.DRAINING:
            continue  # retiring already
        current = [r for r in live if r.model == rec.model and r.config_fp == fps.get(rec.model)]
        if rec.model not in fps or any(r.state == InstanceState.READY for r in current):
            retire.append((rec.instance_id, why + ("" if rec.model not in fps else "; replaced")))
        elif not current and rec.model not in replace:
            replace.append(rec.model)
    return ReloadPlan(stop=stop, retire=retire, replace=replace)
