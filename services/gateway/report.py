"""The gateway's activity report: what it uses, what waits here, which drains it has seen.

Every second, and soon after a drain may have finished or a queue formed (the router sets
`now`), one record in KV activity under the gateway's id. It is compact
(`ActivityReport.horizon`): only the instances used within REPORT_HORIZON_S, in flight, or
with an Ollama keep_alive, so it stays small with tens of thousands of instances (a record
is at most 1 MiB; a whole list of 40,000 instances with real model names is ~3 MB). The
placer rebuilds the rest from the reports it has seen (services/placer/activity.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import proto
from lls.aio import wait_event

from .admission import BY_ADDRESS

if TYPE_CHECKING:
    from .router import Router

log = logging.getLogger(__name__)

REPORT_EVERY_S = 1.0  # activity report period
REPORT_SOONEST_S = 0.005  # an early report waits this long for changes that come together
REPORT_HORIZON_S = 60.0  # instances used this recently are listed (and any in flight)


def count_clients(tickets: Iterable[int], client_of: Mapping[int, str]) -> dict[str, int]:
    """Waiting requests per client (a key's name, or BY_ADDRESS summing the addresses)."""
    return dict(Counter(client_of.get(t, BY_ADDRESS) for t in tickets))


def activity_report(r: Router, now: float) -> proto.ActivityReport:
    since = now - REPORT_HORIZON_S
    return proto.ActivityReport(
        gateway_id=r.gateway_id,
        ts=now,
        instances={
            iid: proto.InstanceActivity(
                r.in_flight.get(iid, 0), used, r.keep_alive.get(iid), r.busy_since.get(iid)
            )
            for iid, used in r.last_used.items()
            if used >= since or r.in_flight.get(iid) or iid in r.keep_alive
        },
        horizon=REPORT_HORIZON_S,
        queues={
            model: proto.ModelQueue(
                len(waits), min(waits.values()), count_clients(waits, r.queued_by)
            )
            for model, waits in r.queued.items()
            if waits
        },
        draining=sorted(r.draining),
        instances_rev=r.view_rev,
        serving=r.stats.report(),
        serving_since=r.stats.since,
        warnings=r.warnings,
    )


async def report_activity(r: Router, now: asyncio.Event, stop: asyncio.Event) -> None:
    """Report every REPORT_EVERY_S, and soon after `now` is set, until `stop`."""
    while not stop.is_set():
        await wait_event(now, REPORT_EVERY_S)
        await asyncio.sleep(REPORT_SOONEST_S)  # batch what changes together
        now.clear()
        r.forget_ended()
        try:
            await r.bus.put(r.bus.activity, r.gateway_id, activity_report(r, time.time()))
        except Exception as e:  # next second tries again
            log.warning("activity report failed: %s", e)
