"""One record per instance id, whichever hosts' keys claim it: the placer's and the gateway's
view of KV instances.

Instance records are keyed `<host>.<instance id>`, and every body names its own key
(proto.key_mismatch, applied by lls.bus.watch_kv). A host's agent may still write a record
of its own under an id the placer made for another host. These views index records by
instance id, so per id they take the record of the host the placer placed it on: the host
of its instance key (KV instance keys, written by the placer alone), or none while that
host has no record of it. Without a key to go by (not read yet, or a record from before
keys), the record seen first keeps the id. Any other claim is reported
(lls.bus.Bus.refuse_record) and never passed on, and deleting it deletes nothing.

The placer's view is stricter (`vouched_only`): a live record no key vouches for is not
passed on until its key is seen, so a host cannot make the placer count an instance it
never placed (a forged READY record would keep its model from being placed anywhere). A
record once passed on stays when its key is swept after it ended.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import proto
from proto import InstanceRecord


def choose(
    claims: Mapping[str, InstanceRecord], placed_on: str | None, held: str | None
) -> str | None:
    """The key whose record stands for an instance id among `claims` (key -> record): the
    one on the host it was placed on (None if that host has none: the others are not it);
    without a placement to go by, the one that already does (`held`), else the first key in
    order (None when there is none)."""
    if placed_on is not None:
        return next((key for key, rec in claims.items() if rec.host == placed_on), None)
    if held is not None and held in claims:
        return held
    return min(claims, default=None)


@dataclass
class InstanceIndex:
    """Sits between watch_kv and a view's callbacks: `put` and `delete` take what the watch
    gives, `placed` what KV instance keys say; the view's `on_put(key, record, revision)` and
    `on_delete(key)` see one record per instance id."""

    on_put: Callable[[str, InstanceRecord, int], None]
    on_delete: Callable[[str], None]
    report: Callable[[str, str, str], None]  # Bus.refuse_record(bucket, key, reason)
    _claims: dict[str, dict[str, tuple[InstanceRecord, int]]] = field(default_factory=dict)
    _chosen: dict[str, str] = field(default_factory=dict)  # instance id -> key passed on
    _placed_on: dict[str, str] = field(default_factory=dict)  # instance id -> its key's host
    vouched_only: bool = False  # the placer's view: live records only with their key

    def put(self, key: str, rec: InstanceRecord, rev: int) -> None:
        iid = rec.instance_id
        claims = self._claims.setdefault(iid, {})
        claims[key] = (rec, rev)
        placed_on = self._placed_on.get(iid)
        if len(claims) == 1 and (  # the usual case: the hot path
            placed_on == rec.host
            or (placed_on is None and (not self.vouched_only or rec.state in proto.END_STATES))
        ):
            self._chosen[iid] = key
            self.on_put(key, rec, rev)
        else:
            self._settle(iid, changed=key)

    def delete(self, key: str) -> None:
        iid = proto.instance_of_key(key)
        claims = self._claims.get(iid)
        if claims is None or claims.pop(key, None) is None:
            return
        if not claims:
            del self._claims[iid]
        if self._chosen.get(iid) != key:
            return  # a claim nobody saw: nothing changes
        if claims:
            self._settle(iid, changed=None)  # another claim, or none: on_put or on_delete
        else:
            del self._chosen[iid]
            self.on_delete(key)

    def placed(self, instance_id: str, host: str | None) -> None:
        """The host KV instance keys name for an instance (None: its key was deleted)."""
        if self._placed_on.get(instance_id) == host:
            return
        if host is None:
            self._placed_on.pop(instance_id, None)
        else:
            self._placed_on[instance_id] = host
        if instance_id in self._claims:
            self._settle(instance_id, changed=None)

    def _settle(self, iid: str, changed: str | None) -> None:
        claims = self._claims[iid]
        held = self._chosen.get(iid)
        placed_on = self._placed_on.get(iid)
        candidates = {k: r for k, (r, _) in claims.items()}
        unvouched = self.vouched_only and placed_on is None and held is None
        if unvouched:  # live claims wait for a key (no report: it may be on its way)
            candidates = {k: r for k, r in candidates.items() if r.state in proto.END_STATES}
        key = choose(candidates, placed_on, held)
        owner = claims[key][0].host if key is not None else placed_on
        for other in candidates if unvouched else claims:
            if other != key:
                why = f"instance {iid} is host {owner}'s; another host's claim to it is ignored"
                self.report(proto.KV_INSTANCES, other, why)
        if key is None:
            if held is not None:
                del self._chosen[iid]
                self.on_delete(held)
            return
        self._chosen[iid] = key
        if key != held or key == changed:
            rec, rev = claims[key]
            self.on_put(key, rec, rev)
