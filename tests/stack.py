"""A whole system for end-to-end tests: `python -m lls.run` with a generated config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from conftest import ROOT, free_port
from lls import auth
from lls.config import load, store_filename_of


def wait_healthy(base: str, timeout: float, gave_up=lambda: False) -> bool:  # noqa: ANN001
    """Whether the gateway at `base` answers /health within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not gave_up():
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def nats_identities(*hosts: str) -> Path:
    """The test NATS server's identity folder, with identities for these hosts added (the
    server reloads). conftest's nats_server names its operator identity in $LLS_NATS_CREDS."""
    folder = Path(os.environ[auth.ENV_CREDS]).parent
    for host in hosts:
        auth.add_host(folder, host)
    return folder


class Stack:
    def __init__(self, tmp: Path, nats_url: str, models: dict, **overrides: object):
        self.tmp = tmp
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cfg: dict = {
            "gateway": {
                "port": self.port,
                "ui_url": f"http://127.0.0.1:{free_port()}",
                "cold_start_timeout": 30,
            },
            "nats": {"url": nats_url},
            "idle_timeout": 300,
            "agent": {
                "host_id": "h1",
                "runtime": "process",
                "store": str(tmp / "store"),
                "port_range": [free_port(), free_port()],
                "start_timeout": 30,
            },
            "placer": {"failure_backoff": 10},
            "models": models,
        }
        for key, value in overrides.items():
            section, _, field = key.partition("__")
            if field:
                cfg[section][field] = value
            else:
                cfg[section] = value
        lo, hi = sorted(cfg["agent"]["port_range"])
        cfg["agent"]["port_range"] = [lo, max(hi, lo + 50)]
        if cfg["nats"]["url"] != "embedded":  # lls.run hands each service its identity
            folder = nats_identities(cfg["agent"]["host_id"])
            cfg["nats"].setdefault("credentials_dir", str(folder))
        self.config = tmp / "config.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = tmp / "stack.log"
        self.proc: subprocess.Popen | None = None

    def patch_config(self, **sections: dict) -> None:
        """Merge keys into config sections before start()."""
        cfg = yaml.safe_load(self.config.read_text())
        for name, values in sections.items():
            cfg.setdefault(name, {}).update(values)
        self.config.write_text(yaml.safe_dump(cfg))

    def stored(self, model: str) -> str:
        """Model `model`'s file name in the store, as the config file says now."""
        return store_filename_of(model, load(self.config).models[model])

    def start(self, timeout: float = 60) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lls.run", "--config", str(self.config)],
            cwd=ROOT,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        proc = self.proc

        def exited() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"stack exited early:\n{self.log.read_text()[-4000:]}")
            return False

        if not wait_healthy(self.base, timeout, exited):
            raise RuntimeError(f"gateway not healthy in {timeout} s:\n{self.logs()[-4000:]}")

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def llama_server_pids(marker: str) -> list[int]:
    """Pids of llama-server processes whose command line mentions `marker` (a tmp path)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"llama-server") and marker.encode() in b" ".join(argv):
            pids.append(int(proc.name))
    return pids


class Cluster:
    """Services started one by one (several agents, several placers) on one NATS server.

    Each agent gets its own host id, simulated GPUs, store and port range, like a real host.
    """

    def __init__(self, tmp: Path, nats_url: str, models: dict, **top: object):
        self.tmp = tmp
        self.nats_url = nats_url
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.shared = {
            "gateway": {"port": self.port, "cold_start_timeout": 30},
            "nats": {"url": nats_url, "credentials_dir": str(nats_identities())},
            "placer": {"host_lost_after": 3, "failure_backoff": 5},
            "models": models,
            **top,
        }
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def _config(self, name: str, agent: dict | None = None) -> Path:
        cfg = dict(self.shared)
        if agent is not None:
            lo = free_port()
            cfg["agent"] = {
                "runtime": "process",
                "port_range": [lo, lo + 40],
                "start_timeout": 30,
                **agent,
            }
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def spawn(
        self, service: str, name: str = "", agent: dict | None = None, port: int | None = None
    ) -> subprocess.Popen:
        name = name or service
        cfg = self._config(name, agent)
        cmd = [sys.executable, "-m", f"services.{service}", "--config", str(cfg)]
        cmd += ["--nats", self.nats_url]
        if port is not None:
            cmd += ["--port", str(port)]
        host = ""
        if agent is not None:
            host = agent["host_id"]
            cmd += ["--host-id", host]
            nats_identities(host)
        # Its own identity, as in production (not the operator's from $LLS_NATS_CREDS).
        folder = Path(self.shared["nats"]["credentials_dir"])
        cmd += ["--nats-creds", str(auth.identity_file(folder, auth.service_user(service, host)))]
        log = (self.tmp / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.procs.append((name, proc))
        return proc

    def agent(self, host_id: str, gpus: list[dict] | None = None) -> subprocess.Popen:
        """An agent and its downloader for one simulated host."""
        spec = {"host_id": host_id, "store": str(self.tmp / f"store-{host_id}")}
        if gpus is not None:
            spec["gpus"] = gpus
        self.spawn("downloader", f"downloader-{host_id}", spec)
        return self.spawn("agent", f"agent-{host_id}", spec)

    def wait_gateway(self, timeout: float = 30) -> None:
        if not wait_healthy(self.base, timeout):
            raise RuntimeError("gateway did not come up")

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logs(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")
