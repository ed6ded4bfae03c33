"""Subject names, stream and KV bucket definitions. Bump SCHEMA_VERSION on breaking changes."""

from __future__ import annotations

import re

SCHEMA_VERSION = 1

# Ids that become subject tokens, file names, container names and labels. No dots or
# wildcards (they would split or widen a NATS subject), no path separators.
HOST_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# What the placer makes: f"{kv_key(model)}-{new_id()[:8]}"; kv_key keeps [-_=.A-Za-z0-9].
# Not "." or ".." and no "/" anywhere, so it is always a plain file name.
INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9_=][A-Za-z0-9_=.-]{0,150}-[0-9a-f]{8}")

# Append-only domain events (limits retention): every decision and state change.
EVENTS_STREAM = "LLS_EVENTS"
EVENTS_SUBJECTS = "lls.evt.>"
EVENTS_MAX_AGE_S = 24 * 3600
EVENTS_MAX_MSGS = 200_000

# Commands (work-queue retention): one consumer per host and kind, acked after handling.
CMDS_STREAM = "LLS_CMDS"
CMDS_SUBJECTS = "lls.cmd.>"
CMD_DEDUP_WINDOW_S = 120  # Nats-Msg-Id dedup window: a command re-sent within it is dropped

# KV buckets (materialized views)
KV_HOSTS = "lls_hosts"  # host_id -> HostRecord (telemetry + heartbeat)
KV_INSTANCES = "lls_instances"  # instance_id -> InstanceRecord
KV_ACTIVITY = "lls_activity"  # gateway_id -> ActivityReport (in-flight and last use)
KV_LEASES = "lls_leases"  # "placer" -> LeaseRecord
KV_MODELS = "lls_models"  # model -> ModelInfo (its header, read before it is downloaded)
KV_DESIRED = "lls_desired"  # model -> DesiredModel (what was asked: run, stop)
# "<host>.<instance id>" -> InstanceKey: each instance's llama-server API key, issued by the
# placer. Readable by the gateways and the placer only (lls/auth.py), never by a host.
KV_INSTANCE_KEYS = "lls_instance_keys"


def evt(kind: str) -> str:
    """Subject of an event; `kind` is the event's tag, e.g. evt("instance.ready")."""
    return f"lls.evt.{kind}"


def cmd_agent(host_id: str) -> str:
    return f"lls.cmd.agent.{host_id}"


def cmd_download(host_id: str) -> str:
    return f"lls.cmd.download.{host_id}"


def logs(host_id: str) -> str:
    """LogTailRequest to a host's agent: a NATS core request/reply (no stream keeps them);
    only that host's agent may subscribe, only the UI and the operator may ask."""
    return f"lls.logs.{host_id}"


# A liveness probe of the server a client is attached to: no one may subscribe to it, so the
# server itself answers at once with "no responders". Unlike any JetStream API request it
# does not wait for a JetStream leader, so a raft election is not mistaken for a dead bus.
PROBE = "lls.probe"


def cmd_inspect() -> str:
    """InspectModel commands: one shared consumer, any downloader takes each."""
    return "lls.cmd.inspect"


def kv_key(name: str) -> str:
    """KV keys allow [-/_=.a-zA-Z0-9]; map anything else to '_' (model names may hold ':')."""
    return "".join(c if c.isalnum() or c in "-_=." else "_" for c in name)


def instance_key(host: str, instance_id: str) -> str:
    """An instance record's key in KV instances: `<host>.<instance id>`. Keyed by host, so a
    host's agent identity may write its own host's records and no other's (its NATS
    permission is `$KV.lls_instances.<host>.>`)."""
    return f"{kv_key(host)}.{kv_key(instance_id)}"


def instance_of_key(key: str) -> str:
    """The instance id in an instance record's key (host ids hold no dot; ids may)."""
    return key.split(".", 1)[1] if "." in key else key


def host_of_key(key: str) -> str:
    """The host in an instance record's key ("" for a key without one)."""
    return key.split(".", 1)[0] if "." in key else ""
