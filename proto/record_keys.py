"""Whether a KV record's body belongs under its key: the one check every reader applies.

NATS permissions bind a writer to keys, not to what it writes: a host's agent may write only
`lls_hosts.<host>` and `lls_instances.<host>.*`, yet could put there a body naming another
host or instance. Readers index records by what the body says (the placer and the gateway by
instance id), so each record is checked against its key before anyone reads it
(lls.bus.watch_kv and kv_snapshot do it for every reader).
"""

from __future__ import annotations

from proto.messages import HostRecord, InstanceKey, InstanceRecord
from proto.subjects import HOST_ID_RE, kv_key

__all__ = ["key_mismatch"]


def key_mismatch(key: str, rec: object) -> str | None:
    """Why `rec` must not be read under `key`, or None. Host records: the key is the host
    id. Instance records and instance keys: the key is `<host>.<instance id>` of the body,
    exactly (a host id of HOST_ID_RE, an id that is its own KV key). Other records have no
    owner in their key: None."""
    if isinstance(rec, HostRecord):
        if not HOST_ID_RE.fullmatch(rec.host_id):
            return f"host id {rec.host_id[:80]!r} is not a host id"
        if key != rec.host_id:
            return f"the record is host {rec.host_id}'s, under another host's key"
        return None
    if isinstance(rec, InstanceRecord | InstanceKey):
        host, iid = rec.host or "", rec.instance_id
        if host and not HOST_ID_RE.fullmatch(host):
            return f"host {host[:80]!r} is not a host id"
        if not iid or kv_key(iid) != iid:
            return f"instance id {iid[:80]!r} cannot be a key"
        if key != f"{host}.{iid}":
            return f"the record is of instance {iid} on host {host or None}, not of its key"
        return None
    return None
