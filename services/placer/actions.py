"""What the pure planner asks for (`Action`): small frozen dataclasses, each with its
reason, that the executor (`executor.Executor.execute`) carries out in order."""

from __future__ import annotations

from dataclasses import dataclass

from services.placer.placement import Need, Placed

__all__ = [
    "Action",
    "Create",
    "Download",
    "Drain",
    "EndDrain",
    "Fail",
    "Hold",
    "HostBack",
    "HostLost",
    "MarkLost",
    "Purge",
    "Refuse",
    "ResendStart",
    "ResendStop",
    "Stop",
    "Wait",
]


@dataclass(frozen=True)
class HostLost:
    """Newly lost: announce it (HostLost event) and count it lost from now on."""

    host: str
    reason: str


@dataclass(frozen=True)
class HostBack:
    """Heard again (or its record is gone): no longer counted lost."""

    host: str
    reason: str


@dataclass(frozen=True)
class MarkLost:
    instance_id: str
    reason: str
    # It was serving (requests in flight, or used within REPLACE_USED_S): its model counts
    # as demanded now, so it is placed again without waiting for a request to ask.
    replace: bool = False


@dataclass(frozen=True)
class Stop:
    instance_id: str
    reason: str


@dataclass(frozen=True)
class Fail:
    instance_id: str
    reason: str


@dataclass(frozen=True)
class ResendStart:
    """Rewrite the STARTING record's reason and send its (idempotent) start again."""

    instance_id: str
    reason: str


@dataclass(frozen=True)
class ResendStop:
    """Rewrite the STOPPING record's reason and send its stop again, with a new id."""

    instance_id: str
    reason: str  # the record's new reason
    stop_reason: str  # what the StopInstance says (the reason it is stopping)
    cmd_id: str


@dataclass(frozen=True)
class Download:
    """Send the instance's DownloadFile to its host's downloader; `first`: record the
    PENDING instance DOWNLOADING first."""

    instance_id: str
    reason: str
    first: bool


@dataclass(frozen=True)
class EndDrain:
    """The instance serves again; `stage` is the swap event's ("cancelled", "abandoned")."""

    instance_id: str
    stage: str
    reason: str


@dataclass(frozen=True)
class Refuse:
    """Tell the model's waiting requests it cannot be served now (PlacementFailed)."""

    model: str
    reason: str
    retry_after: float


@dataclass(frozen=True)
class Hold:
    """Note a backoff: nothing of `kind` for `key` before `until`."""

    kind: str
    key: str
    until: float
    reason: str


@dataclass(frozen=True)
class Purge:
    """Delete an ended record from KV (its history stays in the event stream)."""

    instance_id: str
    reason: str


@dataclass(frozen=True)
class Wait:
    """Nothing to do for the model this pass; the reason says what it waits for."""

    model: str
    reason: str


@dataclass(frozen=True)
class Drain:
    """The first step of a swap: `victims` stop taking requests for `model`'s sake
    (DRAINING, drain_for=model), and a SwapChanged("draining") tells why."""

    model: str
    victims: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Create:
    """Record a new instance of `model` PENDING where `decision` placed it, stop what it
    evicts (each drained for it already), and take its first step."""

    model: str
    need: Need
    decision: Placed
    reason: str


Action = (
    HostLost
    | HostBack
    | MarkLost
    | Stop
    | Fail
    | ResendStart
    | ResendStop
    | Download
    | EndDrain
    | Refuse
    | Hold
    | Purge
    | Wait
    | Drain
    | Create
)
