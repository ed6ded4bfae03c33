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

    def start(self, timeout: float = 60) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lls.run", "--config", str(self.config)],
            cwd=ROOT,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stack exited early:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gateway not healthy in {timeout} s:\n{self.log.read_text()[-4000:]}")

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
