"""The dashboard's in-memory view of the cluster: pure state, no I/O.

Everything is kept as plain JSON-able dicts because its only consumer is the browser.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import msgspec

import proto
from lls import chat_templates
from lls.config import ModelConfig
from services.ui.history import History

Json = dict[str, Any]

MAX_EVENTS = 500  # the event log the page shows; older rows are dropped
MODEL_EVENTS = 400  # per model, for its timeline: it reaches further back than the shared log
MODEL_OF_MAX = 20_000  # instance id -> model, remembered to attribute evictions to the victim
DOWNLOAD_STALE_S = 120.0  # a download with no progress this long is assumed dead
ACTIVITY_STALE_S = 60.0  # KV TTL expiry is invisible to watchers: forget silent gateways
EVT_PREFIX = proto.EVENTS_SUBJECTS.removesuffix(">")  # "lls.evt."


def decode_event(subject: str, data: bytes) -> Json | None:
    """An event as a dict with its `name` (subject minus prefix, e.g. "instance.ready").

    Events of kinds this build does not know (a newer schema) are still shown, untyped.
    """
    try:
        ev = msgspec.to_builtins(proto.decode(data, proto.Event))
    except msgspec.DecodeError:  # includes ValidationError
        try:
            ev = msgspec.json.decode(data)
        except msgspec.DecodeError:
            return None
        if not isinstance(ev, dict):
            return None
    ev["name"] = subject.removeprefix(EVT_PREFIX)
    return ev


def replica_limits(models: Mapping[str, ModelConfig]) -> dict[str, Json]:
    """Each configured model's replicas {min, max}: the page shows "live/max" against them."""
    return {name: {"min": m.replicas.min, "max": m.replicas.max} for name, m in models.items()}


def slim_host(rec: Json, templates: Mapping[str, str] | None = None) -> Json:
    """Drop GGUF summaries from the file list: the page shows names and sizes only, and
    hosts heartbeat every second to every browser. A configured model's file whose GGUF has
    no chat template, while `templates` (model -> its chat_template) sets none, keeps a
    `warning` (chat_templates.warning) for the page to show by the model."""
    files = [f for f in rec.get("files") or [] if isinstance(f, dict)]
    rec["files"] = [_slim_file(f, templates or {}) for f in files]
    return rec


def _slim_file(f: Json, templates: Mapping[str, str]) -> Json:
    out = {"model": f.get("model"), "filename": f.get("filename"), "size": f.get("size")}
    gguf, model = f.get("gguf"), f.get("model")
    has = gguf.get("has_chat_template", True) if isinstance(gguf, dict) else None
    if model in templates and chat_templates.missing(templates[model], has):
        out["warning"] = chat_templates.warning(model)
    return out


def models_named(ev: Json, model_of: Mapping[str, str]) -> set[str]:
    """Every model an event tells something about: its own, and the models it makes yield
    (a swap), evicts (a placement: the victims' instance ids, mapped through `model_of`) or
    reconfigures. A model's timeline is the events that name it."""
    named = {ev.get("model")} | set(ev.get("yielding_models") or [])
    named |= {model_of.get(i) for i in ev.get("evicted") or [] if isinstance(i, str)}
    for key in ("added", "removed", "changed"):
        named |= set(ev.get(key) or [])
    return {m for m in named if isinstance(m, str) and m}


class View:
    """Hosts, instances, gateway activity, running downloads and the recent event log."""

    def __init__(self, models: list[str] | None = None, host_lost_after: float = 10.0):
        self.models = sorted(models or [])  # configured model names
        self.replicas: dict[str, Json] = {}  # model -> {min, max} from the config (set_models)
        self.templates: dict[str, str] = {}  # model -> its chat_template (set_models)
        self.host_lost_after = host_lost_after
        self.hosts: dict[str, Json] = {}
        self.instances: dict[str, Json] = {}
        self.activity: dict[str, Json] = {}  # gateway id -> ActivityReport
        self.desired: dict[str, Json] = {}  # model key -> DesiredModel (who asked what)
        self.downloads: dict[str, Json] = {}  # "host/model" -> last DownloadProgress
        self.events: deque[Json] = deque(maxlen=MAX_EVENTS)
        self.events_cut = False  # the log dropped its oldest events (older pages: the stream)
        self.by_model: dict[str, deque[Json]] = {}  # model -> the events naming it (timeline)
        self.overflowed: set[str] = set()  # models whose timeline lost its oldest events
        self.model_of: dict[str, str] = {}  # instance id -> model
        self.replay_from = 0  # the stream sequence the replay began at (0: its first)
        self.last_seq = 0
        self.history = History(self.models)  # the charts' samples over the last hour

    def set_models(self, models: Mapping[str, ModelConfig]) -> None:
        """Follow a reloaded config: the configured models and their replica limits."""
        self.models = sorted(models)
        self.replicas = replica_limits(models)
        self.templates = {name: m.chat_template for name, m in models.items()}
        self.history.models = list(self.models)

    def sample(self, now: float | None = None) -> Json:
        """One chart point per series from the current tables; the delta for browsers."""
        now = now or time.time()
        self.prune(now)
        # A lost host's record stays in KV, its last heartbeat frozen: charting it would add
        # a flat line per GPU for every host ever seen. Unheard, its series age out instead.
        heard = {
            k: h for k, h in self.hosts.items() if h.get("ts", 0) >= now - self.host_lost_after
        }
        return self.history.sample(now, heard, self.instances, self.activity)

    def apply_event(self, seq: int, ev: Json) -> bool:
        """Fold one event in; False when it was already seen (a consumer redelivery)."""
        if seq <= self.last_seq:
            return False
        self.last_seq = seq
        ev["seq"] = seq
        kind = ev.get("kind")
        if kind in ("download.progress", "download.completed", "download.failed"):
            key = f"{ev.get('host')}/{ev.get('model')}"
            if kind == "download.progress":
                self.downloads[key] = ev
                return True  # progress swamps the log; the page shows it as a bar instead
            self.downloads.pop(key, None)
        self.events_cut |= len(self.events) == self.events.maxlen
        self.events.append(ev)
        self._file_by_model(ev)
        return True

    def _file_by_model(self, ev: Json) -> None:
        iid, model = ev.get("instance_id"), ev.get("model")
        if isinstance(iid, str) and isinstance(model, str):
            self._remember(iid, model)
        for m in models_named(ev, self.model_of):
            ring = self.by_model.setdefault(m, deque(maxlen=MODEL_EVENTS))
            if len(ring) == MODEL_EVENTS:
                self.overflowed.add(m)
            ring.append(ev)

    def _remember(self, iid: str, model: str) -> None:
        self.model_of.pop(iid, None)  # re-inserted last: the oldest ids go first
        self.model_of[iid] = model
        if len(self.model_of) > MODEL_OF_MAX:
            del self.model_of[next(iter(self.model_of))]

    def timeline(self, model: str) -> Json:
        """The events naming `model`, oldest first. `held_from`: the stream sequence from
        which every one of them is held here (older ones were dropped from its ring, or came
        before the replay began); `complete` when that is the stream's start."""
        events = list(self.by_model.get(model, ()))
        held_from = events[0]["seq"] if model in self.overflowed else self.replay_from
        return {"model": model, "events": events, "complete": not held_from, "held_from": held_from}

    def apply_kv(self, bucket: str, key: str, rec: Json | None) -> None:
        table = self._table(bucket)
        if rec is None:
            table.pop(key, None)
        else:
            table[key] = slim_host(rec, self.templates) if bucket == proto.KV_HOSTS else rec
            if bucket == proto.KV_INSTANCES and rec.get("instance_id") and rec.get("model"):
                self._remember(rec["instance_id"], rec["model"])

    def _table(self, bucket: str) -> dict[str, Json]:
        return {
            proto.KV_HOSTS: self.hosts,
            proto.KV_INSTANCES: self.instances,
            proto.KV_ACTIVITY: self.activity,
            proto.KV_DESIRED: self.desired,
        }[bucket]

    def prune(self, now: float | None = None) -> None:
        now = now or time.time()
        for table, max_age in (
            (self.downloads, DOWNLOAD_STALE_S),
            (self.activity, ACTIVITY_STALE_S),
        ):
            for key in [k for k, r in table.items() if r.get("ts", 0) < now - max_age]:
                del table[key]

    def snapshot(self) -> Json:
        self.prune()
        return {
            "now": time.time(),
            "models": self.models,
            "replicas": self.replicas,
            "host_lost_after": self.host_lost_after,
            "hosts": self.hosts,
            "instances": self.instances,
            "activity": self.activity,
            "desired": self.desired,
            "downloads": self.downloads,
            "events": list(self.events),
            # The log holds every event since the stream's start: no older page to read.
            "events_complete": not self.events_cut and not self.replay_from,
            "last_seq": self.last_seq,
            "history": self.history.snapshot(),
        }
