"""A host's silence, as the placer counts it (services/placer/watches.py)."""

from __future__ import annotations

import time

from test_memory import _placer_with


def test_a_record_delivered_again_by_a_new_watch_is_not_a_heartbeat() -> None:
    # A watch set up again (its NATS server was cut off) delivers every host's record anew.
    # A lost host's old record must not restart its silence: it was judged 8 s late.
    placer = _placer_with("h1", [], [])
    w = placer.watches
    rec = w.hosts["h1"]
    w.received["h1"] = 0.0  # last heard long ago
    w.on_host("h1", rec, 1)  # the same revision again
    assert w.received["h1"] == 0.0
    w.on_host("h1", rec, 2)  # a new heartbeat
    assert time.time() - w.received["h1"] < 5
