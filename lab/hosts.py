"""Several real network hosts on this machine: a HostLab runs the services on network
namespaces on a bridge (lab/network.py).

Each host (h1..hN) is a network namespace with its own address on a private /24; this
machine (the root namespace) holds the bridge's address, so tests, benchmarks and a browser
here reach every host. A three-node NATS cluster (JetStream, streams and buckets replicated
3 ways) runs on h1..h3; every host runs an agent (process runtime, simulated GPUs, the same
port range everywhere) and a downloader, each with its own NATS identity and store; placers
and gateways run on h1 and h2. Only namespace addresses are used: nothing leaves the machine.

Faults are real too: `link_down(host)` sets the host's cable (its veth) down, `kill_nats`
kills a NATS node, `kill(service, host)` kills a service. `make cluster` (lab/cluster.py)
runs one by hand. `tls=True` runs the cluster with TLS from clients to nodes and between
nodes (one CA, made by auth.make_tls).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import yaml

from lab.network import (
    SUBNET_BASE,
    TMP_PREFIX,
    Host,
    Lab,
    LabError,
    add_bridge,
    add_host,
    free_subnet,
    ip,
    kill_netns,
    nats_server_binary,
    netns_pids,
    remove_network,
    remove_stale,
    unavailable,
)
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
STOP_GRACE_S = 20.0
_seq = itertools.count()


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
        for pid in netns_pids(self.host(host).ns):
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
        lab = Lab(tag=self.tag, bridge=f"{self.tag}br", subnet=free_subnet())
        self.lab = lab  # from here on close() removes what exists
        add_bridge(lab)
        for i in range(1, self.n + 1):
            h = add_host(lab, i, self.dir / f"h{i}")
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
        ip("link", "set", self.host(host).veth, "down")

    def link_up(self, host: str) -> None:
        ip("link", "set", self.host(host).veth, "up")

    # ------------------------------------------------------------------ stop

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        lab = self.lab
        if lab is not None:
            for h in lab.hosts:  # a service cut off would wait for its bus in vain
                ip("link", "set", h.veth, "up", check=False)
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
                kill_netns(h.ns)  # whatever did not stop (a killed agent's llama-server)
            for proc in [*self.procs.values(), *self.nats_procs.values()]:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            remove_network(lab)
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
