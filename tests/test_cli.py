"""The operator CLI against a real stack: load, ps, stop, pull."""

from __future__ import annotations

import json
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

    # the history of what just happened, from the event stream
    ev = lls(stack, "events", "--since", "10m", "--model", "tiny")
    assert ev.returncode == 0, ev.stderr
    kinds = [line.split()[2] for line in ev.stdout.splitlines()]
    assert "placement.decided" in kinds and "instance.ready" in kinds, ev.stdout
    assert kinds.index("placement.decided") < kinds.index("instance.ready")
    assert all(line.split()[3] == "tiny" for line in ev.stdout.splitlines())
    only = lls(stack, "events", "--since", "10m", "--kind", "instance.ready", "--json")
    assert only.returncode == 0, only.stderr
    rows = [json.loads(line) for line in only.stdout.splitlines()]
    assert rows and all(r["kind"] == "instance" and r["state"] == "ready" for r in rows)
    assert lls(stack, "events", "--since", "soon").returncode == 2

    pull = lls(stack, "pull", "other")
    assert pull.returncode == 0, pull.stderr
    assert "other" in pull.stdout and "store" in pull.stdout
    assert (stack.tmp / "store" / stack.stored("other")).exists()


def test_unknown_model_is_refused_by_name(stack):
    r = lls(stack, "load", "nope")
    assert r.returncode != 0 and "nope" in r.stderr
