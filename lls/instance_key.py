"""Per-instance llama-server API keys, known only to the gateways and the instance's host.

The placer issues a random key when it places an instance (so every start of a model is a
new key) and keeps it in KV instance keys (`proto.KV_INSTANCE_KEYS`, `<host>.<instance
id>`), which only the placer, the gateways and the operator may read (lls/auth.py); it sends
it to the chosen host alone, in the StartInstance command (each host may read only its own
commands). The agent passes it to llama-server (`LLAMA_API_KEY`, never argv) and finds it
again in the server's environment when it adopts the instance after a restart. Nothing is
derived from a shared secret: an agent of another host has nothing to derive a key from and
no right to read one. docs/security.md says who holds what.
"""

from __future__ import annotations

import re
import secrets
import time

from nats.js.errors import KeyNotFoundError

import proto
from lls.bus import Bus

KEY_BYTES = 32
KEY_RE = re.compile(r"[A-Za-z0-9_-]{32,128}")  # token_urlsafe: safe in an env var and a header


def new_key() -> str:
    return secrets.token_urlsafe(KEY_BYTES)


def issue(host: str, instance_id: str, model: str) -> proto.InstanceKey:
    """A new key for an instance placed on `host` (the placer writes it to KV)."""
    return proto.InstanceKey(
        instance_id=instance_id, host=host, model=model, key=new_key(), issued=time.time()
    )


async def read(bus: Bus, host: str, instance_id: str) -> proto.InstanceKey | None:
    """The key issued for an instance, read from KV (the placer, the gateway and the
    operator's identity may; hosts may not). None when none was issued."""
    key = proto.instance_key(host, instance_id)
    try:
        entry = await bus.instance_keys.get(key)
    except KeyNotFoundError:  # deleted keys too
        return None
    if not entry.value:
        return None
    rec = proto.decode(entry.value, proto.InstanceKey)
    return rec if proto.key_mismatch(key, rec) is None else None
