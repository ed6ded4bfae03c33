"""The operator CLI against a real stack: load, ps, stop, pull."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT
from stack import Stack


@pytest.fixture
def stack(tmp_path, nats_url, llama_server_bin, tiny_gguf):
    s = Stack(
        tmp_path,
        nats_url,
        {
            "tiny": {"url": f"file://{tiny_gguf(6)}", "ctx_size": 512},
            "other": {"url": f"file://{tiny_gguf(7)}", "ctx_size": 512},
        },
    )
    s.start()
    yield s
    s.stop()


def lls(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lls.cli", "--config", str(stack.config), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_load_ps_stop_and_pull(stack):
    r = lls(stack, "load", "tiny")
    assert r.returncode == 0, r.stderr
    assert "ready" in r.stdout

    ps = lls(stack, "ps")
    assert ps.returncode == 0
    [header, row] = ps.stdout.strip().splitlines()
    assert header.split()[:5] == ["MODEL", "INSTANCE", "HOST", "GPUS", "STATE"]
    assert row.split()[0] == "tiny" and "ready" in row

    assert lls(stack, "stop", "tiny").returncode == 0
    for _ in range(50):
        if "tiny" not in lls(stack, "ps").stdout:
            break
    assert "tiny" not in lls(stack, "ps").stdout
    assert "stopped" in lls(stack, "ps", "--all").stdout

    pull = lls(stack, "pull", "other")
    assert pull.returncode == 0, pull.stderr
    assert "other" in pull.stdout and "store" in pull.stdout
    assert (stack.tmp / "store" / stack.stored("other")).exists()


def test_unknown_model_is_refused_by_name(stack):
    r = lls(stack, "load", "nope")
    assert r.returncode != 0 and "nope" in r.stderr
