"""Whether a READY instance record may get traffic: placed where it says by the placer
(its instance key) and at an endpoint its host advertises and the operator's config allows.

Pure checks on records and config, kept apart from the router's view upkeep (router.Router
calls them whenever it re-indexes a model) and tested directly.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit

import proto
from lls.config import upstream_entry
from proto import InstanceRecord


def upstream_allowed(host_id: str, address: str, allowed: Mapping[str, list[str]]) -> bool:
    """Whether the operator's config lets host `host_id`'s instances be reached at `address`
    (gateway.allowed_upstreams: its addresses, networks or names; with none configured, a
    loopback address, whatever the host)."""
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        ip = None
    if not allowed:
        return address.lower() == "localhost" or (ip is not None and ip.is_loopback)
    for text in allowed.get(host_id, ()):
        entry = upstream_entry(text)
        if isinstance(entry, str):
            if address.lower() == entry:
                return True
        elif entry is not None and ip is not None and ip.version == entry.version:
            if ip in entry:
                return True
    return False


def endpoint_refusal(
    rec: InstanceRecord,
    hosts: Mapping[str, proto.HostRecord],
    allowed: Mapping[str, list[str]],
) -> str | None:
    """Why a READY record's endpoint must get no traffic, or None. Its address must be one
    the operator allows for the record's host (`allowed`: gateway.allowed_upstreams) and
    the address that host advertises in its heartbeat, with a port in its agent's range: a
    forged or stale record pointing anywhere else would receive clients' requests."""
    host = hosts.get(rec.host or "")
    if host is None:
        return f"host {rec.host!r} is not known from heartbeats"
    if not host.advertise_host or host.port_range is None:
        return f"host {rec.host} does not advertise its address and ports (an older agent?)"
    try:
        u = urlsplit(rec.endpoint or "")
        port = u.port
    except ValueError:
        return "not a URL"
    lo, hi = host.port_range
    if (
        u.scheme != "http"
        or u.hostname != host.advertise_host.lower()
        or port is None
        or not lo <= port <= hi
        or u.username is not None
        or u.path not in ("", "/")
        or u.query
        or u.fragment
    ):
        return f"not http://{host.advertise_host}:<{lo}-{hi}> as host {rec.host} advertises"
    if not upstream_allowed(host.host_id, u.hostname, allowed):
        where = "a loopback address" if not allowed else f"gateway.allowed_upstreams.{rec.host}"
        return f"{u.hostname} is not an address the config allows for host {rec.host} ({where})"
    return None


def placement_refusal(rec: InstanceRecord, key: proto.InstanceKey | None) -> str | None:
    """Why a READY record was never placed where it says, or None: the placer's instance key
    (KV instance keys, which only the placer writes) must name its host and model. A host's
    agent may write its own records, but not the placer's word."""
    if key is None:
        return "no placement vouches for it (the placer issued no key for this instance)"
    if key.host != rec.host or key.model != rec.model:
        return f"it was placed as {key.model} on host {key.host}, not {rec.model} on {rec.host}"
    return None
