"""Message types on the bus: KV records, commands and events.

Encode with `encode(obj)`; decode with the typed decoders below (`EVENT`, `AGENT_CMD`, ...),
which reject anything that does not match the schema.
"""

from __future__ import annotations

import enum
import time

import msgspec
from msgspec import Struct, field

from proto.subjects import SCHEMA_VERSION, evt

__all__ = [
    "ActivityReport",
    "AgentCommand",
    "BuildProgress",
    "CommandRefused",
    "ConfigRefused",
    "ConfigReloaded",
    "DeleteAnswered",
    "DeleteFile",
    "DeleteRequested",
    "DesiredModel",
    "DownloaderCommand",
    "Demand",
    "DownloadCompleted",
    "DownloadFailed",
    "DownloadFile",
    "DownloadProgress",
    "Event",
    "FileDeleteFailed",
    "FileDeleted",
    "FileInfo",
    "GgufSummary",
    "GpuInfo",
    "GpuProcess",
    "HostJoined",
    "HostLost",
    "HostBack",
    "HostRecord",
    "InstanceActivity",
    "InstanceChanged",
    "InstanceKey",
    "InstanceRecord",
    "InspectModel",
    "InstanceState",
    "LeaseRecord",
    "LogTail",
    "LogTailError",
    "LogTailReply",
    "LogTailRequest",
    "LOG_TAIL_MAX_BYTES",
    "LOG_TAIL_MAX_LINES",
    "MeasuredMemory",
    "ModelInfo",
    "ModelInspected",
    "PlacementDecided",
    "PlacementFailed",
    "PullAnswered",
    "PullRequested",
    "RecordRefused",
    "StartInstance",
    "StopInstance",
    "StopRequested",
    "WANT_RUN",
    "WANT_STOP",
    "SwapChanged",
    "ReplicaChanged",
    "SlotCacheChanged",
    "ModelQueue",
    "ModelServing",
    "SERVING_BUCKETS_S",
    "decode",
    "encode",
    "now",
    "LIVE_STATES",
    "END_STATES",
]


def now() -> float:
    return time.time()


def encode(obj: Struct) -> bytes:
    return msgspec.json.encode(obj)


# ---------------------------------------------------------------- host telemetry (KV hosts)


class GpuProcess(Struct, frozen=True):
    pid: int
    used_mib: int
    ours: bool = False  # started by this agent (one of our instances)


class GpuInfo(Struct, frozen=True):
    index: int
    uuid: str
    name: str
    memory_total_mib: int
    memory_used_mib: int  # live NVML usage, or the sum of our claims for simulated GPUs
    memory_claimed_mib: int = 0  # what our instances on this GPU were placed with
    utilization_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    processes: list[GpuProcess] = []
    simulated: bool = False


class GgufSummary(Struct, frozen=True):
    """What placement needs from a GGUF header (read without loading the weights)."""

    architecture: str
    n_layers: int
    n_ctx_train: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int = 0
    file_type: int | None = None
    tensor_bytes: int = 0  # sum of tensor data sizes (weights); 0 = unknown, use the file size
    kv_heads_total: int = 0  # KV heads summed over layers; 0 = n_layers x n_head_kv
    n_params: int = 0  # weights' element count; 0 = unknown (a split GGUF's first part)
    # Whether the header has tokenizer.chat_template (the text stays out: this rides on
    # every heartbeat). An older reader does not say: True, so it warns of nothing.
    has_chat_template: bool = True


class MeasuredMemory(Struct, frozen=True):
    """What one of this host's instances really holds on its GPUs: NVML per-process used
    memory of its process (or its container's processes), summed over the GPUs it runs on.
    Only where NVML reads it: never for simulated GPUs. The placer raises the model's need
    on this kind of GPU to it (services/placer/memory.py)."""

    instance_id: str
    model: str
    ctx_size: int  # the configured ctx_size it was started with (0 = the trained context)
    gpu_name: str  # the GPU kind, as NVML names it
    used_mib: int
    gpus: int = 1  # how many GPUs it spans


class FileInfo(Struct, frozen=True):
    """A model file present in a host's store."""

    model: str  # the configured model it is the store file of, else its name without .gguf
    filename: str
    size: int
    gguf: GgufSummary | None = None


class BuildProgress(Struct, frozen=True):
    """The llama-server build a host without a binary waits for (scripts/build-llama-server.sh,
    started in the background by `make run`): its stage, for the dashboard and the comments
    of requests that wait for it."""

    stage: str  # downloading | configuring | compiling | failed | stopped
    percent: int = 0  # of the compile steps done
    eta_s: float | None = None  # seconds left, estimated from the pace so far
    log: str = ""  # the build's full log, on that host
    message: str = ""  # in words: "building llama-server: compiling 40%, ~2 min left"


class HostRecord(Struct):
    host_id: str
    ts: float  # heartbeat time; a stale one means the host is lost
    started_at: float
    runtime: str  # "process" | "docker"
    gpus: list[GpuInfo]
    cpu_count: int
    ram_total_mib: int
    ram_free_mib: int
    ram_reserve_mib: int | None = None  # this host's agent.ram_reserve_mib (None: the placer's)
    files: list[FileInfo] = []
    instances: list[str] = []  # instance ids this agent runs now
    # Where this host's instances listen: the gateway proxies only to these (a record
    # pointing anywhere else is forged or stale). Empty: an older agent, trusted with nothing.
    advertise_host: str = ""
    port_range: tuple[int, int] | None = None
    measured: list[MeasuredMemory] = []  # our instances' real GPU memory (empty without NVML)
    build: BuildProgress | None = None  # set while it waits for its llama-server build
    v: int = SCHEMA_VERSION


# ---------------------------------------------------------------- instances (KV instances)


class InstanceState(enum.StrEnum):
    PENDING = "pending"  # placed or being placed
    DOWNLOADING = "downloading"  # waiting for the model file on its host
    STARTING = "starting"  # llama-server launched, /health not yet 200
    READY = "ready"  # serving at `endpoint`
    DRAINING = "draining"  # yielding its memory: admits nothing new, in-flight requests finish
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"  # `reason` and `log_tail` say why
    LOST = "lost"  # its host stopped heartbeating


LIVE_STATES = frozenset(
    {
        InstanceState.PENDING,
        InstanceState.DOWNLOADING,
        InstanceState.STARTING,
        InstanceState.READY,
        InstanceState.DRAINING,
    }
)
END_STATES = frozenset({InstanceState.STOPPED, InstanceState.FAILED, InstanceState.LOST})


class InstanceRecord(Struct):
    instance_id: str
    model: str
    state: InstanceState
    created: float
    updated: float
    host: str | None = None
    gpus: list[int] = []  # GPU indexes on `host`; empty = CPU only
    memory_mib: int = 0  # what placement reserved for it
    endpoint: str | None = None  # base URL of llama-server once ready
    reason: str = ""  # why it is in this state (failure, stop cause, ...)
    placement: str = ""  # why placement chose this host and GPUs
    log_tail: str = ""  # last lines of the server log when it failed
    ready_at: float | None = None
    drain_for: str = ""  # DRAINING: the waiting model this instance yields its memory to
    drain_since: float | None = None  # DRAINING: when the drain began (its deadline counts)
    # Requests its llama-server runs at once (/props total_slots, read when it became ready);
    # 0 = not known (an older agent): the gateway then expects lls.config.slots_of(model).
    slots: int = 0
    # What runs it, set by the agent at STARTING: the llama-server path (or Docker image) and
    # its backend, "cpu" | "cuda" | "unknown" ("docker/cuda" etc. in a container)
    binary: str = ""
    backend: str = ""
    # lls.config.launch_fingerprint of the model config it was placed for ("" = unknown, an
    # older record): after a reload the placer replaces instances whose fingerprint is stale
    config_fp: str = ""
    v: int = SCHEMA_VERSION


class InstanceKey(Struct, kw_only=True):
    """KV instance keys, `<host>.<instance id>`: the API key of one instance's llama-server,
    issued by the placer when it places the instance (a new random key per instance, so a
    restart is a new key). Only the placer writes these and only the gateways and the placer
    read them (lls/auth.py): a host learns its own instances' keys from its start commands,
    never another host's. It is also the placer's word that the instance was placed there:
    the gateway sends traffic only to a READY record that matches one (host, id, model)."""

    instance_id: str
    host: str
    model: str
    key: str  # lls.instance_key.KEY_RE
    issued: float
    v: int = SCHEMA_VERSION


# ---------------------------------------------------------------- desired state (KV desired)

WANT_RUN = "run"  # start the model: demand that lasts until an instance is READY
WANT_STOP = "stop"  # stop the model's live instances


class DesiredModel(Struct, kw_only=True):
    """What someone asked for a model (KV desired, keyed by model): the spec to the instance
    records' status. Written with compare-and-set by the CLI (`lls load`/`lls stop`) and the
    placer (the config's `preload`, a StopRequested event); only the leading placer acts on
    it, level-triggered, on every pass, so a request outlives a placer restart or a change of
    leader. Once carried out (or failed, or withdrawn) the placer, or the asker, writes
    `wanted=""` with the `outcome`: a request never pins a model beyond its own completion.
    """

    model: str
    wanted: str = ""  # WANT_RUN | WANT_STOP | "" (nothing pending)
    since: float = 0.0  # when it was asked
    by: str = ""  # who asked: "cli", "preload", a StopRequested's requested_by
    request_id: str = ""  # the asker's id: its request's outcome, not a later one's
    reason: str = ""
    until: float | None = None  # a pending request past this is dropped ("expired")
    seen_by: str = ""  # the placer that took the request up ("" = no placer has yet)
    outcome: str = ""  # when done: "ready ...", "stopped ...", "failed: ...", "withdrawn ..."
    done_at: float | None = None
    # Pinned (`lls load --pin`): kept running, started again when it ends, never stopped for
    # idleness and never evicted, until `lls unpin` or `lls stop`. Outlives its request.
    pinned: bool = False
    pinned_by: str = ""
    v: int = SCHEMA_VERSION


class InstanceActivity(Struct, omit_defaults=True):
    in_flight: int
    last_used: float  # end of the last request (or start of one in flight)
    keep_alive: float | None = None  # the last request's Ollama keep_alive, seconds (<0: keep)
    # When its current busy spell began: the first request after it was idle for over a
    # second (the placer's turns count from here: placer.min_turn, and a burst's first moments)
    busy_since: float | None = None


class ModelQueue(Struct):
    """Requests for one model waiting at a gateway: for an instance, or for an admission slot."""

    waiting: int
    since: float  # when the oldest of them began to wait
    # waiting requests per client: API key name, or "(by address)" summed when keys are off
    clients: dict[str, int] = {}


# Upper bounds (seconds) of ModelServing's histogram buckets, the same for every gateway so
# that readers can sum buckets across gateways. Changing them is a breaking change.
SERVING_BUCKETS_S: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0
)  # fmt: skip


class ModelServing(Struct, omit_defaults=True):
    """One model's requests through one gateway since `ActivityReport.serving_since`.

    Cumulative counters, so a reader gets rates and quantiles over any window by differencing
    two reports, and a cluster's by summing gateways. A histogram holds one count per bucket
    of SERVING_BUCKETS_S plus one for slower than the last bound (not cumulative)."""

    requests: int = 0  # finished requests, whatever their status
    errors: int = 0  # of them, answered with a status >= 400
    latency: list[int] = []  # request to last byte
    ttft: list[int] = []  # request to first chunk (streamed requests only)


class ActivityReport(Struct):
    """Published by each gateway every second, and at once when a drain needs to know: what
    it uses, what waits, and which draining instances it has stopped admitting to."""

    gateway_id: str
    ts: float
    instances: dict[str, InstanceActivity] = {}
    # 0: `instances` lists every instance this gateway has used. Above 0 (a compact report,
    # which stays small however many instances there are): it lists those with requests in
    # flight, with a keep_alive, or used within `horizon` seconds before `ts`; any other was
    # last used here before ts - horizon, if ever. The placer rebuilds the whole picture
    # from the reports it has seen (services/placer/activity.py, ReportedUse).
    horizon: float = 0.0
    queues: dict[str, ModelQueue] = {}  # model -> what waits for it here
    draining: list[str] = []  # DRAINING instance ids this gateway sends nothing new to
    instances_rev: int = 0  # the KV instances revision this gateway's view has reached
    serving: dict[str, ModelServing] = {}  # model -> requests served here (for the dashboard)
    serving_since: float = 0.0  # when `serving` began counting: a new value means a restart
    # What an operator must know about this gateway, shown by `lls ps`: e.g. that it listens
    # beyond loopback with no API keys (services/gateway/edge.py, open_gateway_warning)
    warnings: list[str] = []


class ModelInfo(Struct):
    """A model's header, read from its source before any host holds the file (KV models).

    Written by a downloader on an InspectModel command, so the placer knows the memory need
    before choosing where to download. Keyed by model; `url` tells whether it is current.
    """

    model: str
    url: str
    ts: float
    size: int | None = None  # bytes, all parts of a split GGUF; None if the server hides it
    gguf: GgufSummary | None = None
    error: str = ""  # why the header could not be read (the placer then decides without it)
    v: int = SCHEMA_VERSION


class LeaseRecord(Struct):
    """KV leases "placer": who leads, and the epoch it leads in (services/placer/lease.py).

    `epoch` grows by one at each take-over (written by compare-and-set, so two placers never
    own one epoch) and stays the same through renewals. `holder` "" = handed over on a clean
    stop: a standby may take it at once. `ts` is the writer's wall clock, for people only: no
    one judges the lease by it, clocks across hosts are not compared.

    A standby placer keeps a record of its own, key "standby.<host>": its `holder` id and
    `node`, the NATS server it is attached to, where the leader puts the lease bucket's raft
    leader (services/placer/stream_leaders.py)."""

    holder: str
    ts: float
    epoch: int = 0
    node: str = ""


# ---------------------------------------------------------------- commands (stream LLS_CMDS)


class StartInstance(
    Struct, tag="start", kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """Model and placement only: the agent builds llama-server's argv from its own config
    (ctx_size, args, embeddings), so a command can never carry flags. Unknown fields (an old
    placer's `args`) are rejected rather than silently dropped. Fields at their defaults are
    left out, so an agent older than a field still takes a start that does not use it."""

    cmd_id: str
    instance_id: str  # proto.INSTANCE_ID_RE
    model: str  # a model in the agent's config
    filename: str  # in the host's store: must be lls.config.store_filename of the model
    n_gpu_layers: int  # 0 = CPU only
    gpus: list[int] = []  # GPU indexes on this host; several = split across them
    memory_mib: int = 0
    # The sending leader's epoch (LeaseRecord.epoch): agents and downloaders refuse a command
    # whose epoch is lower than the highest they have seen (a deposed leader's). 0 = not
    # sent by a leader (`lls pull`, tests, a placer older than epochs): never refused. An
    # agent older than this field refuses the whole start (unknown field): upgrade agents
    # and downloaders before placers.
    epoch: int = 0
    # The model's chat template as the placer's config resolved it: a built-in name or Jinja
    # text (lls/chat_templates.py); "" = the GGUF's own. The agent runs it only when it is
    # its own config's too, and writes Jinja text to a file it names itself.
    chat_template: str = ""
    # The instance's llama-server API key, issued by the placer (KV instance keys, which only
    # the gateways read): the agent passes it to llama-server and to nobody else. Required by
    # agents that know this field: a start without one is refused (lls.instance_key.KEY_RE).
    api_key: str = ""


class StopInstance(Struct, tag="stop", kw_only=True):
    cmd_id: str
    instance_id: str
    reason: str = ""
    epoch: int = 0  # the sending leader's epoch (see StartInstance.epoch)


AgentCommand = StartInstance | StopInstance


class DownloadFile(Struct, tag="download", kw_only=True):
    cmd_id: str
    model: str
    url: str
    filename: str
    sha256: str | None = None
    epoch: int = 0  # the sending leader's epoch (see StartInstance.epoch)


class DeleteFile(Struct, tag="delete", kw_only=True):
    """Remove a model's file (all parts of a split GGUF) from the host's store. The downloader
    deletes only `lls.config.store_filename` of a model in its own config; an absent file is
    success, so a resent command does no harm."""

    cmd_id: str
    model: str
    filename: str
    epoch: int = 0  # the sending leader's epoch (see StartInstance.epoch)


DownloaderCommand = DownloadFile | DeleteFile


class InspectModel(Struct, tag="inspect", kw_only=True):
    """Read a model's header from its source into KV models (any downloader may take it)."""

    cmd_id: str
    model: str
    url: str
    filename: str
    epoch: int = 0  # the sending leader's epoch (see StartInstance.epoch)


# ---------------------------------------------------------------- log tails (request/reply)

LOG_TAIL_MAX_LINES = 200  # an agent never sends more lines than this...
LOG_TAIL_MAX_BYTES = 64 * 1024  # ...nor more of its log than this, whatever was asked


class LogTailRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """Ask a host's agent (subject `logs(host)`) for the end of an instance's llama-server
    log. The agent answers only for instances it runs and reads only their own log: the
    request names an instance, never a file."""

    instance_id: str  # proto.INSTANCE_ID_RE
    lines: int = 100  # clamped to 1..LOG_TAIL_MAX_LINES


class LogTail(Struct, tag="log_tail", kw_only=True):
    instance_id: str
    lines: list[str]
    truncated: bool = False  # the log holds more than these lines


class LogTailError(Struct, tag="log_tail.error", kw_only=True):
    instance_id: str
    code: str  # "invalid" (bad request), "not_found" (not running here), "unavailable"
    reason: str


LogTailReply = LogTail | LogTailError


# ---------------------------------------------------------------- events (stream LLS_EVENTS)


class _Event(Struct, kw_only=True, tag_field="kind"):
    ts: float = field(default_factory=now)
    v: int = SCHEMA_VERSION

    def subject(self) -> str:
        return evt(type(self).__struct_config__.tag)


class Demand(_Event, tag="demand"):
    model: str
    gateway_id: str
    waiting: int = 1  # requests waiting at that gateway


class PlacementDecided(_Event, tag="placement.decided"):
    model: str
    instance_id: str
    host: str
    gpus: list[int]
    memory_mib: int
    reason: str
    evicted: list[str] = []


class PlacementFailed(_Event, tag="placement.failed"):
    model: str
    reason: str
    retry_after_s: float = 5.0


class DownloadProgress(_Event, tag="download.progress"):
    model: str
    host: str
    bytes: int
    total: int | None = None
    rate_bps: float = 0.0
    eta_s: float | None = None


class DownloadCompleted(_Event, tag="download.completed"):
    model: str
    host: str
    filename: str
    size: int
    reused: str | None = None  # where an existing copy came from, if not downloaded


class DownloadFailed(_Event, tag="download.failed"):
    model: str
    host: str
    reason: str


class ModelInspected(_Event, tag="model.inspected"):
    model: str
    summary: str  # e.g. "llama, 32 layers, 4.58 GiB", or why the header could not be read
    ok: bool = True


class InstanceChanged(_Event, tag="instance"):
    instance_id: str
    model: str
    state: InstanceState
    host: str | None = None
    endpoint: str | None = None
    reason: str = ""
    # The whole record as written, and the KV revision of that write: the event log is the
    # history, and lls.history.rebuild replays it into the instances table.
    record: InstanceRecord | None = None
    revision: int = 0

    def subject(self) -> str:
        return evt(f"instance.{self.state.value}")


class StopRequested(_Event, tag="stop.requested"):
    """An operator asks for a model's instances to stop (the placer carries it out)."""

    model: str
    requested_by: str = "cli"


class SwapChanged(_Event, tag="swap"):
    """A planned swap: `yielding` instances drain so that `model`, which waits, can run."""

    model: str  # the waiting model
    stage: str  # "draining" | "done" | "abandoned" | "cancelled"
    yielding: list[str] = []  # instance ids
    yielding_models: list[str] = []
    reason: str = ""
    drain_s: float | None = None  # how long the drain took (done/abandoned)

    def subject(self) -> str:
        return evt(f"swap.{self.stage}")


class ReplicaChanged(_Event, tag="replica"):
    """The placer adds a replica of a busy model, or stops an idle one above replicas.min."""

    model: str
    stage: str  # "added" | "removed"
    instance_id: str
    replicas: int  # live instances of the model after the change
    reason: str = ""

    def subject(self) -> str:
        return evt(f"replica.{self.stage}")


class SlotCacheChanged(_Event, tag="slots"):
    """An agent saved an instance's slot KV caches before it stopped (warm swap), or
    restored them when the model started again on that host."""

    model: str
    host: str
    instance_id: str
    stage: str  # "saved" | "restored" | "failed"
    slots: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    reason: str = ""

    def subject(self) -> str:
        return evt(f"slots.{self.stage}")


class PullRequested(_Event, tag="pull.requested"):
    """A client asks (through a gateway) for a model's file on the host it would run on."""

    model: str
    request_id: str
    gateway_id: str = ""


class PullAnswered(_Event, tag="pull.answered"):
    """The placer's answer to a PullRequested. `status`: "present" (`host` has the file),
    "downloading" (DownloadFile sent to `host`: its download.* events follow) or "refused"
    (`reason` says why)."""

    model: str
    request_id: str
    status: str
    host: str = ""
    filename: str = ""
    reason: str = ""


class DeleteRequested(_Event, tag="delete.requested"):
    """A client asks (through a gateway) for a model's file to leave every host's store."""

    model: str
    request_id: str
    gateway_id: str = ""


class DeleteAnswered(_Event, tag="delete.answered"):
    """The placer's answer to a DeleteRequested. `status`: "deleting" (DeleteFile sent to each
    of `hosts`: file.* events follow), "absent" (no host holds it) or "refused" (`reason`:
    e.g. the model runs)."""

    model: str
    request_id: str
    status: str
    hosts: list[str] = []
    filename: str = ""
    reason: str = ""


class FileDeleted(_Event, tag="file.deleted"):
    model: str
    host: str
    filename: str
    cmd_id: str = ""
    existed: bool = True  # False: it was not there (a resent command)


class FileDeleteFailed(_Event, tag="file.delete_failed"):
    model: str
    host: str
    filename: str
    reason: str
    cmd_id: str = ""
    busy: bool = False  # refused because the file is in use (being downloaded): try later


class CommandRefused(_Event, tag="command.refused"):
    """An agent or downloader refused a command (one that does not match its config, or one
    from a deposed leader: "stale leader epoch 3 < 4"); nothing was run."""

    host: str
    command: str  # "start" | "stop"
    instance_id: str
    model: str = ""
    reason: str = ""
    cmd_id: str = ""


class RecordRefused(_Event, tag="record.refused"):
    """A service ignores a KV record: its body does not match its key (another host or
    instance than the key names), another host's record claims the same instance, or (the
    gateway) a READY record no placement vouches for or whose endpoint the config does not
    allow. Reported once per record and reason by each service that ignores it."""

    bucket: str
    key: str
    reason: str
    service: str = ""  # who ignores it (its NATS connection's name)


class ConfigReloaded(_Event, tag="config.reloaded"):
    """A service re-read its config file (SIGHUP or `lls reload`) and follows it now."""

    service: str
    host: str
    added: list[str] = []  # models
    removed: list[str] = []
    changed: list[str] = []
    restart_needed: list[str] = []  # changed keys that take effect only at the next start


class ConfigRefused(_Event, tag="config.refused"):
    """A service refused a new config (the reason names the key); the running one stays."""

    service: str
    host: str
    reason: str


class HostJoined(_Event, tag="host.joined"):
    host_id: str
    gpus: int
    runtime: str


class HostLost(_Event, tag="host.lost"):
    host_id: str
    reason: str


class HostBack(_Event, tag="host.back"):
    """A lost host heard again (without restarting: a restart says HostJoined)."""

    host_id: str
    reason: str


Event = (
    Demand
    | PlacementDecided
    | PlacementFailed
    | DownloadProgress
    | DownloadCompleted
    | DownloadFailed
    | ModelInspected
    | InstanceChanged
    | StopRequested
    | SwapChanged
    | ReplicaChanged
    | SlotCacheChanged
    | HostJoined
    | HostLost
    | HostBack
    | CommandRefused
    | ConfigReloaded
    | ConfigRefused
    | RecordRefused
    | PullRequested
    | PullAnswered
    | DeleteRequested
    | DeleteAnswered
    | FileDeleted
    | FileDeleteFailed
)

_DECODERS: dict[object, msgspec.json.Decoder] = {}


def decode(data: bytes, typ):  # type: ignore[no-untyped-def]
    """Decode `data` as `typ` (a Struct or a Union such as Event or AgentCommand)."""
    dec = _DECODERS.get(typ)
    if dec is None:
        dec = _DECODERS[typ] = msgspec.json.Decoder(typ)
    return dec.decode(data)
