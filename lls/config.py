"""The typed config. Every key of config.example.yaml is a field here; unknown keys and bad
values stop start-up with a message that names the key (msgspec reports the path)."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import yaml
from msgspec import Meta, Struct

from lls import chat_templates
from proto.subjects import HOST_ID_RE

Port = Annotated[int, Meta(ge=1, le=65535)]
PositiveS = Annotated[float, Meta(gt=0)]
NonNegS = Annotated[float, Meta(ge=0)]
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
URL_SCHEMES = ("http://", "https://", "file://", "hf://", "modelscope://", "ollama://")
SPLIT_SUFFIX = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


class Strict(Struct, forbid_unknown_fields=True, kw_only=True):
    pass


Positive = Annotated[int, Meta(gt=0)]
KEY_NAME = r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}$"
# A Host name (no port) and a browser Origin (scheme://host[:port], no path), as the gateway's
# edge compares them (services/gateway/edge.py, BrowserChecks).
HOST_NAME = r"^(\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:]+|[A-Za-z0-9_]([A-Za-z0-9._-]{0,252}))$"
ORIGIN = r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_][A-Za-z0-9._-]{0,252})(:[0-9]{1,5})?$"


def key_label(key: str) -> str:
    """A key's default name: stable and non-secret (a hash prefix), for metrics and logs."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


class ApiKey(Strict):
    key: Annotated[str, Meta(min_length=8)]
    models: list[str] = []  # empty = every model
    admin: bool = False  # may use the dashboard and /metrics
    # Who the key is in /metrics and `lls usage`; never the key itself. Empty = key_label(key).
    name: Annotated[str, Meta(pattern=KEY_NAME)] = ""
    # Limits per key; None = unlimited. Past one: 429 with Retry-After (services/gateway/usage.py).
    requests_per_minute: Positive | None = None
    tokens_per_minute: Positive | None = None  # prompt + completion, counted after each answer
    max_concurrent: Positive | None = None  # requests of this key running at once
    # Its share of a model's slots while requests queue, against other keys' (fair queuing).
    weight: Annotated[float, Meta(gt=0, le=1000)] = 1.0
    # May choose llama-server's slot (`id_slot`) and prompt caching (`cache_prompt`); for
    # other keys the gateway drops both, so no tenant can aim at another's cached prompt.
    trusted: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            self.name = key_label(self.key)


class GatewayConfig(Strict):
    host: str = "127.0.0.1"
    port: Port = 5000
    cold_start_timeout: PositiveS = 120.0  # a cold request waits at most this long for ready
    request_timeout: PositiveS = 600.0  # upstream read deadline for one request
    ui_url: str = "http://127.0.0.1:5001"  # where /dashboard is proxied to
    # Gateway processes sharing the port (SO_REUSEPORT; the kernel spreads connections): for
    # hosts with cores to spare. Each is a gateway of its own (admission, queues, reports).
    workers: Annotated[int, Meta(ge=1, le=64)] = 1
    max_in_flight: Annotated[int, Meta(ge=1)] = 32  # per model, across its instances
    max_queue: Annotated[int, Meta(ge=0)] = 256  # per model; past it requests get 429
    queue_timeout: PositiveS = 60.0  # a queued request waits this long for a slot, then 429
    # While at most one client waits for a model, send one more request per slot on to wait
    # inside llama-server, so a finished slot starts the next at once (services/gateway/
    # admission.py); with two or more clients waiting, fair queuing holds as without it.
    overlap: bool = True
    api_keys: list[ApiKey] = []  # empty = open; else Bearer / x-api-key required
    # Host names a request may name besides loopback ones and `host` itself. Checked while the
    # gateway listens on loopback (a DNS-rebinding page names its own host) or once set.
    allowed_hosts: list[Annotated[str, Meta(pattern=HOST_NAME)]] = []
    # Origins (scheme://host[:port]) whose pages may send state-changing requests besides the
    # gateway's own (e.g. its public name behind a reverse proxy that rewrites Host).
    allowed_origins: list[Annotated[str, Meta(pattern=ORIGIN)]] = []
    # Where each host's instances may be reached: host id -> IP addresses, networks
    # (10.0.0.0/24) or host names. The gateway sends nothing to an endpoint outside its host's
    # list, whatever the host advertises. Empty: every host at loopback addresses only (one
    # machine); once set, a host not listed gets no traffic.
    allowed_upstreams: dict[str, list[str]] = {}
    # Which replica of a model serves a request (services/gateway/affinity.py): "prefix"
    # sends prompts that share a beginning to the same replica (its KV cache holds it),
    # within a load bound; "least_busy" ignores the prompt; "round_robin" is for benchmarks.
    routing: Literal["prefix", "least_busy", "round_robin"] = "prefix"
    prefix_chars: Annotated[int, Meta(ge=16, le=1_000_000)] = 2048  # the prompt start hashed
    # A replica may take up to this factor times the average load before prefix affinity
    # spills to the next one (consistent hashing with bounded load).
    prefix_load_factor: Annotated[float, Meta(ge=1.0, le=10.0)] = 1.25


class NatsTls(Strict):
    ca: str  # the CA that signed the server's certificate: clients verify the server with it
    # This machine's certificate: the embedded server presents it, and clients present it
    # when the server verifies clients. Both or neither.
    cert: str = ""
    key: str = ""
    verify_client: bool = False  # the (embedded) server accepts only clients with a cert from ca


class NatsLimits(Strict):
    """Size limits of the streams and buckets. A key left out keeps what the server has (a
    limit an operator set there stays); on first creation the default below applies."""

    events_max_bytes: Annotated[int, Meta(gt=0)] | None = None  # created with 1 GiB
    # How long the event stream (the history `lls events` and the dashboard read) keeps an
    # event; created with 7 days. Whichever of age and bytes is reached first drops the oldest.
    events_max_age_days: Annotated[float, Meta(gt=0, le=3650)] | None = None
    commands_max_bytes: Annotated[int, Meta(gt=0)] | None = None  # created with 256 MiB
    bucket_max_bytes: Annotated[int, Meta(gt=0)] | None = None  # each KV bucket; 64 MiB
    max_msg_bytes: Annotated[int, Meta(gt=0)] | None = None  # one message or record; 1 MiB


class NatsConfig(Strict):
    # "embedded" starts nats-server; else nats://host:port or tls://host:port, or several
    # servers of one NATS cluster, comma-separated (seeds; clients fail over between them).
    url: str = "embedded"
    port: Port = 4222  # for the embedded server; a busy port falls back to a free one
    store_dir: str = "~/.cache/llama-scheduler/nats"
    # Identity files (<user>.json, 0600) and the server's auth config; empty = store_dir/auth
    credentials_dir: str = ""
    tls: NatsTls | None = None
    limits: NatsLimits = msgspec.field(default_factory=NatsLimits)
    # How many servers of a NATS cluster hold each stream and bucket (3 survives losing one).
    # Unset keeps what the server has; they are created with 1. At most the cluster's size.
    replicas: Annotated[int, Meta(ge=1, le=5)] | None = None


class SimulatedGpu(Strict):
    name: str
    memory_mib: Annotated[int, Meta(gt=0)]


class AgentConfig(Strict):
    host_id: str = ""  # empty = this machine's hostname
    runtime: Literal["auto", "docker", "process"] = "auto"
    gpus: Literal["auto"] | list[SimulatedGpu] = "auto"
    store: str = "~/.cache/llama-scheduler/models"
    llama_server: str = ""  # path of the binary for the process runtime; empty = the cached build
    image: str = ""  # docker image; empty = official image, or a local one built from the binary
    advertise_host: str = "127.0.0.1"  # address other services reach this host's instances at
    # where llama-server listens; empty = advertise_host (never every interface by default)
    bind_host: str = ""
    port_range: tuple[Port, Port] = (39000, 39999)
    start_timeout: PositiveS = 120.0  # /health must answer 200 within this
    heartbeat_s: PositiveS = 1.0
    ram_reserve_mib: Annotated[int, Meta(ge=0)] = 1024  # CPU-only hosts keep this much free
    # Warm swaps: before an instance stops, its slots' KV caches are saved here (per host),
    # and restored when the model starts again on this host. Oldest out past the size; 0 = off.
    slot_cache_mib: Annotated[int, Meta(ge=0)] = 4096
    slot_cache_dir: str = ""  # empty = <store>/slot-cache


class DownloaderConfig(Strict):
    connections: Annotated[int, Meta(ge=1, le=64)] = 8
    timeout: PositiveS = 3600.0  # deadline for one whole download
    max_parallel: Annotated[int, Meta(ge=1, le=64)] = 4  # downloads at once per host
    # Existing stores searched before downloading; empty = the usual places
    # (OLLAMA_MODELS or ~/.ollama/models; HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub).
    ollama_dirs: list[str] = []
    hf_cache_dirs: list[str] = []
    # Folders file:// models may be copied from; empty = the folders of this config's own
    # file:// models. /proc, /dev and /sys never.
    file_roots: list[str] = []
    # Free space the store keeps after a download (the NATS data may share its disk).
    min_free_mib: Annotated[int, Meta(ge=0)] = 1024


class ClusterConfig(Strict):
    # Scopes labels, run directories and adoption, so two stacks on one machine never touch
    # each other's instances. Empty = derived from nats.url (or the embedded server's store_dir).
    id: str = ""


class PlacerConfig(Strict):
    host_lost_after: PositiveS = 10.0  # a host without heartbeat this long is lost
    failure_backoff: PositiveS = 30.0  # a model that failed to start is not retried sooner
    strategy: Literal["binpack", "spread"] = "binpack"
    # Taking turns when more models are wanted than fit (services/placer/DESIGN.md, 7):
    # A model with requests queued keeps its turn at least this long (the anti-thrash floor);
    # one with nothing queued yields at once.
    min_turn: NonNegS = 5.0
    # After this (or min_turn, if longer) a model yields to one that waits, queue or not.
    max_turn: PositiveS = 30.0
    drain_timeout: PositiveS = 60.0  # in-flight requests of a yielding model get this long


class Replicas(Strict):
    """How many instances of a model may run (services/placer/replicas.py)."""

    min: Annotated[int, Meta(ge=1, le=64)] = 1  # started on demand; idle ones above it go first
    max: Annotated[int, Meta(ge=1, le=64)] = 1
    # Another replica starts when a request has waited this long while every instance is busy.
    target_wait: PositiveS = 2.0
    # A replica above `min` that has been idle this long is stopped (the model's idle_timeout
    # still applies to the others).
    idle_after: PositiveS = 60.0


class ModelConfig(Strict):
    url: str
    sha256: str | None = None
    ctx_size: Annotated[int, Meta(ge=0)] = 4096  # 0 = the model's trained context
    memory_mib: Annotated[int, Meta(gt=0)] | None = None  # overrides the estimate
    args: list[str] = []  # extra llama-server flags
    embeddings: bool = False
    aliases: list[str] = []  # other names clients may use for this model
    defaults: dict[str, object] = {}  # request fields set when the client leaves them out
    idle_timeout: NonNegS | None = None  # overrides the global idle_timeout; 0 = never
    keep_loaded: bool = False  # never evicted to make room for another model
    preload: bool = False  # started when the system starts, not on first request
    host: str | None = None  # pin to this host id
    gpus: list[Annotated[int, Meta(ge=0)]] = []  # pin to these GPU indexes
    group: str | None = None  # exclusive group: at most one model of a group runs at a time
    replicas: Replicas = msgspec.field(default_factory=Replicas)
    # "" = the GGUF's own; a built-in name (lls/chat_templates.py BUILTIN); Jinja text (has
    # {{ or {%); else a Jinja file relative to the config's folder. Loaded, a file's text
    # replaces its path (lls/chat_templates.py).
    chat_template: str = ""


# llama-server's own slot count when -np is not given (its "auto": 4 slots sharing one
# unified KV cache of -c, each able to use all of it).
DEFAULT_SLOTS = 4


def slots_of(m: ModelConfig) -> int:
    """Requests one instance of `m` is expected to serve at once: its `-np`/`--parallel`,
    else llama-server's default. An instance's record says what its server really has
    (InstanceRecord.slots, read from its /props once it is ready): that wins."""
    args = m.args
    for i, a in enumerate(args):
        flag, eq, value = a.partition("=")
        if flag in ("-np", "--parallel"):
            if not eq:
                value = args[i + 1] if i + 1 < len(args) else ""
            try:
                n = int(value)
            except ValueError:
                return DEFAULT_SLOTS
            return n if n > 0 else DEFAULT_SLOTS
    return DEFAULT_SLOTS


def launch_fingerprint(m: ModelConfig) -> str:
    """A short hash of what an instance of `m` was launched with (its file, llama-server
    flags and chat template). A reload that changes it makes the placer replace the model's
    instances; keys that only steer placement or the gateway (aliases, defaults, pins...) do
    not count."""
    launch: tuple[object, ...] = (m.url, (m.sha256 or "").lower(), m.ctx_size, m.args, m.embeddings)
    if m.chat_template:  # only when set: models without one keep their fingerprint
        launch += (m.chat_template,)
    return hashlib.sha256(msgspec.json.encode(launch)).hexdigest()[:16]


def _stem(model: str) -> str:
    """A model name as one plain file name: no separators, nothing a shell or path reads."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model)


def store_filename(model: str, url: str = "", sha256: str | None = "") -> str:
    """The model's file name in a host's store (the downloader writes it, the agent runs it):
    `<model>-<source hash>.gguf`, the hash of its `url` and `sha256`. A changed source is a
    new file, fetched like any other; the old one is simply no longer referenced (and stays
    until deleted, so an instance still running from it is never pulled from under it).

    A split GGUF keeps its `-00001-of-0000N.gguf` suffix: llama-server finds the other
    parts from the first part's name.
    """
    source = hashlib.sha256(f"{url}\n{(sha256 or '').lower()}".encode()).hexdigest()[:8]
    stem = f"{_stem(model)}-{source}"
    split = SPLIT_SUFFIX.search(url)
    return f"{stem}-{split.group(1)}-of-{split.group(2)}.gguf" if split else f"{stem}.gguf"


def store_filename_of(model: str, m: ModelConfig) -> str:
    """store_filename of a configured model: the one way call sites name its file."""
    return store_filename(model, m.url, m.sha256)


def legacy_store_filename(model: str) -> str:
    """The name a model's file had before names followed the source (one per model): the
    downloader reuses such a file when it matches the model's configured sha256."""
    return f"{_stem(model)}.gguf"


class Config(Strict):
    gateway: GatewayConfig = msgspec.field(default_factory=GatewayConfig)
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    agent: AgentConfig = msgspec.field(default_factory=AgentConfig)
    downloader: DownloaderConfig = msgspec.field(default_factory=DownloaderConfig)
    placer: PlacerConfig = msgspec.field(default_factory=PlacerConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    idle_timeout: NonNegS = 300.0  # stop an instance idle this long; 0 = never
    models: dict[str, ModelConfig] = {}

    def resolve_model(self, name: str) -> str | None:
        """The configured model a client's name (or alias) refers to."""
        if name in self.models:
            return name
        for real, m in self.models.items():
            if name in m.aliases:
                return real
        return None

    def host_id(self) -> str:
        return self.agent.host_id or sanitize_host_id(socket.gethostname())

    def cluster_id(self) -> str:
        """This stack's id: two stacks on one machine differ by their NATS."""
        if self.cluster.id:
            return self.cluster.id
        if self.nats.url == "embedded":
            basis = f"embedded:{expand(self.nats.store_dir).absolute()}"
        else:  # the same cluster whichever seed a host lists first
            basis = ",".join(sorted(nats_servers(self.nats.url)))
        return hashlib.sha256(basis.encode()).hexdigest()[:12]

    def store_dir(self) -> Path:
        return expand(self.agent.store)


class ConfigError(ValueError):
    pass


def sanitize_host_id(name: str) -> str:
    """A hostname as a host id: a dot or a wildcard would split or widen NATS subjects
    (lls.cmd.agent.<host>), so everything but [A-Za-z0-9_-] becomes '-'."""
    short = re.sub(r"[^A-Za-z0-9_-]", "-", name)[:64].strip("-")
    return short or "host"


def expand(path: str) -> Path:
    return Path(os.path.expanduser(os.path.expandvars(path)))


def nats_servers(url: str) -> list[str]:
    """The server URLs in a `nats.url` (one, or several comma-separated)."""
    return [u.strip() for u in url.split(",") if u.strip()]


def _validate_nats(nats: NatsConfig) -> None:
    if nats.url != "embedded":
        urls = nats_servers(nats.url)
        bad = [u for u in urls if not re.match(r"^(nats|tls)://[^\s/,]+$", u)]
        if not urls or bad:
            raise ConfigError(
                "nats.url: 'embedded', or nats://host:port or tls://host:port, or several of "
                f"those comma-separated (not {', '.join(bad) or 'empty'})"
            )
    if nats.url == "embedded" and (nats.replicas or 1) > 1:
        raise ConfigError("nats.replicas: the embedded server is one server; use 1 or a cluster")
    tls = nats.tls
    if tls is None:
        return
    if bool(tls.cert) != bool(tls.key):
        raise ConfigError("nats.tls: set both cert and key, or neither")
    if nats.url == "embedded" and not tls.cert:
        raise ConfigError("nats.tls.cert: the embedded server needs a certificate and key")
    if tls.verify_client and not tls.cert:
        raise ConfigError("nats.tls.verify_client: clients need cert and key to present")
    for key in ("ca", "cert", "key"):
        path = getattr(tls, key)
        if path and not expand(path).is_file():
            raise ConfigError(f"nats.tls.{key}: no such file: {path}")


def _validate(cfg: Config) -> None:
    _validate_nats(cfg.nats)
    for name, m in cfg.models.items():
        where = f"models.{name}"
        if not re.match(MODEL_NAME, name):
            raise ConfigError(f"{where}: model names use letters, digits and ._:/- only")
        if not m.url.startswith(URL_SCHEMES):
            raise ConfigError(f"{where}.url: must start with one of {', '.join(URL_SCHEMES)}")
        if m.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", m.sha256):
            raise ConfigError(f"{where}.sha256: expected 64 hex digits")
        if m.replicas.min > m.replicas.max:
            raise ConfigError(f"{where}.replicas.min: must not exceed replicas.max")
        if (why := chat_templates.check(m.chat_template, m.args)) is not None:
            raise ConfigError(f"{where}.chat_template: {why}")
    seen: dict[str, str] = {}
    for name, m in cfg.models.items():
        for alias in m.aliases:
            if alias in cfg.models or alias in seen:
                raise ConfigError(f"models.{name}.aliases: {alias!r} already names a model")
            seen[alias] = name
    lo, hi = cfg.agent.port_range
    if lo > hi:
        raise ConfigError("agent.port_range: the first port must not exceed the second")
    if cfg.agent.host_id and not HOST_ID_RE.fullmatch(cfg.agent.host_id):
        raise ConfigError("agent.host_id: 1 to 64 letters, digits, '-' and '_' only")
    if cfg.cluster.id and not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", cfg.cluster.id):
        raise ConfigError("cluster.id: 1 to 32 letters, digits, '-' and '_' only")
    for host, entries in cfg.gateway.allowed_upstreams.items():
        if not HOST_ID_RE.fullmatch(host):
            raise ConfigError(
                f"gateway.allowed_upstreams: {host[:80]!r} is not a host id (1 to 64 letters, "
                "digits, '-' and '_')"
            )
        for i, entry in enumerate(entries):
            if upstream_entry(entry) is None:
                raise ConfigError(
                    f"gateway.allowed_upstreams.{host}[{i}]: {entry[:80]!r} is not an IP "
                    "address, a network (10.0.0.0/24) or a host name"
                )
    for host_key in ("advertise_host", "bind_host"):
        value = getattr(cfg.agent, host_key)
        if value and not re.fullmatch(r"[A-Za-z0-9.:_-]{1,253}", value):
            raise ConfigError(f"agent.{host_key}: an IP address or host name")
    if not cfg.agent.advertise_host:
        raise ConfigError("agent.advertise_host: must not be empty")
    names: set[str] = set()
    secrets = {k.key for k in cfg.gateway.api_keys}
    for i, k in enumerate(cfg.gateway.api_keys):
        # One name, one set of counters and limits; and a name is printed, so never a secret.
        if k.name in names:
            same = sum(o.key == k.key for o in cfg.gateway.api_keys) > 1
            why = "the same key is listed twice" if same else f"{k.name!r} names another key too"
            raise ConfigError(f"gateway.api_keys[{i}]: {why}")
        if k.name in secrets:
            raise ConfigError(f"gateway.api_keys[{i}].name: is an API key; names are not secret")
        names.add(k.name)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def upstream_entry(text: str) -> Network | str | None:
    """An entry of gateway.allowed_upstreams: a network (an address is a /32 or /128), or a
    lower-case host name; None when it is neither (a URL, a port, a wildcard...)."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    if re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", text):
        return text.lower()
    return None


def _retired_keys(data: object) -> None:
    """Keys that once existed: an error that says what replaced them, not just "unknown"."""
    cluster = data.get("cluster") if isinstance(data, dict) else None
    if isinstance(cluster, dict) and "secret_file" in cluster:
        raise ConfigError(
            "cluster.secret_file: no longer used: the placer issues each instance's API key "
            "and only the gateways and the instance's host learn it (docs/security.md). "
            "Remove the line, and the old secret file from every host"
        )


def parse(data: object, source: str = "config", base: Path | None = None) -> Config:
    """The config from YAML data; `base` is the folder its relative files are in (the
    config file's; the current folder when None)."""
    try:
        _retired_keys(data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if isinstance(models, dict):  # one by one, so an error names the model
        for name, m in models.items():
            try:
                msgspec.convert(m, ModelConfig)
            except msgspec.ValidationError as e:
                msg = str(e).replace("`$.", f"`models.{name}.").replace("`$`", f"`models.{name}`")
                if " - at `" not in msg:
                    msg += f" - at `models.{name}`"
                raise ConfigError(f"{source}: {msg}") from None
    try:
        cfg = msgspec.convert(data if data is not None else {}, Config)
    except msgspec.ValidationError as e:
        # msgspec says e.g. "Object contains unknown field `prot` - at `$.gateway`"
        msg = str(e).replace("`$.", "`").replace("`$`", "top level")
        raise ConfigError(f"{source}: {msg}") from None
    try:
        _resolve_chat_templates(cfg, base or Path.cwd())
        _validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    cfg = parse(data, str(path), path.parent)
    return _resolve_relative_urls(cfg, path.parent)


def _resolve_chat_templates(cfg: Config, base: Path) -> None:
    """A chat_template file's text replaces its path (read once, here: a reload reads it
    again, and a changed text changes the launch fingerprint)."""
    for name, m in cfg.models.items():
        try:
            m.chat_template = chat_templates.resolve(m.chat_template, base)
        except ValueError as e:
            raise ConfigError(f"models.{name}.chat_template: {e}") from None


def _resolve_relative_urls(cfg: Config, base: Path) -> Config:
    """file://relative/path in a config is relative to the config file's folder."""
    for m in cfg.models.values():
        if m.url.startswith("file://") and not m.url.startswith("file:///"):
            m.url = "file://" + str((base / m.url[len("file://") :]).resolve())
    return cfg
