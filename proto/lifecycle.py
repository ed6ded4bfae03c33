"""The instance lifecycle as one table: which writer may move a record from which state to
which. Every writer of `lls_instances` asks `refusal` before its compare-and-set, so a stale
writer cannot undo a newer decision (an agent's READY over the placer's STOPPING or LOST),
and an ended or purged record never comes back.

The split follows spec and status: the placer decides (places, drains, stops, declares a
host lost); the agent reports what really happens on its host (started, ready, stopped,
crashed). docs/architecture.md draws the same graph. LOST is an end like STOPPED and FAILED:
a host that comes back stops what it still runs for a lost record, quietly, and the model
has been placed again elsewhere if anyone wanted it.
"""

from __future__ import annotations

from proto.messages import END_STATES, InstanceState

__all__ = ["AGENT", "PLACER", "WRITERS", "refusal", "table"]

PLACER = "placer"
AGENT = "agent"
WRITERS = (PLACER, AGENT)

_S = InstanceState
_WAITING = frozenset({_S.PENDING, _S.DOWNLOADING, _S.STARTING})
_RUNNING = frozenset({_S.READY, _S.DRAINING})
_LIVE = _WAITING | _RUNNING

# (writer, new state) -> the states it may come from; None = the record does not exist yet
_FROM: dict[tuple[str, InstanceState], frozenset[InstanceState | None]] = {
    (PLACER, _S.PENDING): frozenset({None}),
    (PLACER, _S.DOWNLOADING): frozenset({_S.PENDING}),
    (PLACER, _S.STARTING): frozenset({_S.PENDING, _S.DOWNLOADING}),
    (PLACER, _S.DRAINING): frozenset({_S.READY}),
    (PLACER, _S.READY): frozenset({_S.DRAINING}),  # a drain that ended without a stop
    (PLACER, _S.STOPPING): _LIVE,
    (PLACER, _S.FAILED): _WAITING,  # download failed, no longer fits, model removed
    (PLACER, _S.LOST): _LIVE | {_S.STOPPING},
    (AGENT, _S.STARTING): _WAITING,
    (AGENT, _S.READY): _WAITING,
    (AGENT, _S.STOPPING): _LIVE,
    (AGENT, _S.STOPPED): _LIVE | {_S.STOPPING},
    (AGENT, _S.FAILED): _LIVE | {_S.STOPPING},
}


def refusal(writer: str, old: InstanceState | None, new: InstanceState) -> str | None:
    """Why `writer` may not write `new` over a record in state `old` (None: no record), or
    None when it may. A write that keeps the state (a new reason, an endpoint) is allowed on
    a record that has not ended."""
    if old is not None and old == new:
        return f"the record has ended ({old.value})" if old in END_STATES else None
    if old in END_STATES:
        return f"the record has ended ({old.value}); it never changes again"
    allowed = _FROM.get((writer, new))
    if allowed is None:
        return f"the {writer} never writes {new.value}"
    if old not in allowed:
        was = "no record (never created, or purged)" if old is None else old.value
        return f"the {writer} may not move {was} to {new.value}"
    return None


def _from_words(writer: str, new: InstanceState) -> str:
    allowed = _FROM.get((writer, new))
    if allowed is None:
        return "never"
    if allowed == {None}:
        return "no record (it alone creates)"
    if allowed == _LIVE:
        return "any live"
    if allowed == _LIVE | {_S.STOPPING}:
        return "any live, stopping"
    return ", ".join(s.value for s in InstanceState if s in allowed)


def table() -> list[tuple[str, str, str]]:
    """(new state, the placer may write it from, the agent may write it from), in lifecycle
    order: the first three columns of docs/architecture.md's table, which a test keeps equal
    to this one."""
    return [(new.value, _from_words(PLACER, new), _from_words(AGENT, new)) for new in InstanceState]
