"""How far a llama-server build is, read from the status file scripts/build-llama-server.sh
keeps (lls.paths.build_status_file): for the agent of a host whose binary is still being
built (its heartbeat, the start it holds), the dashboard and waiting requests' comments.

The script rewrites the file (atomically) at each stage and each percent of compiling:
    {"stage": "compiling", "percent": 40, "started": 1733280000, "stage_started": ...,
     "updated": ..., "pid": 1234, "log": "/root/.cache/.../build.log", "error": ""}
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import proto
from lls.paths import CPU, build_status_file

RUNNING = ("downloading", "configuring", "compiling")
DONE, FAILED, STOPPED = "done", "failed", "stopped"
MIN_PERCENT_FOR_ETA = 5  # before this the pace says little (configure checks, first files)


def read(path: Path) -> dict[str, Any] | None:
    """The status file's fields, or None when there is none (or it is not the script's)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("stage"), str) else None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def eta_s(status: dict[str, Any], now: float) -> float | None:
    """Seconds left while compiling, from the pace so far (steps are of unequal cost, so this
    is a rough figure: said as "~2 min")."""
    percent = int(status.get("percent") or 0)
    if status.get("stage") != "compiling" or not MIN_PERCENT_FOR_ETA <= percent < 100:
        return None
    spent = now - float(status.get("stage_started") or now)
    return max(1.0, spent * (100 - percent) / percent) if spent > 0 else None


def in_words(seconds: float) -> str:
    return f"~{seconds:.0f} s left" if seconds < 90 else f"~{round(seconds / 60)} min left"


def progress(status: dict[str, Any] | None, now: float, alive: bool) -> proto.BuildProgress | None:
    """The build's stage for people and records; None when there is nothing to wait for (no
    build, or it finished). `alive`: whether the script's process still runs: a build that
    died half-way (Ctrl-C, killed) is "stopped", not "compiling" for ever."""
    if status is None or status.get("stage") == DONE:
        return None
    stage = str(status["stage"])
    log = str(status.get("log") or "")
    percent = max(0, min(100, int(status.get("percent") or 0)))
    if stage == FAILED:
        error = str(status.get("error") or "it failed")
        msg = f"the llama-server build failed ({error}); see {log}"
        return proto.BuildProgress(stage=FAILED, percent=percent, log=log, message=msg)
    if not alive or stage not in RUNNING:
        msg = f"the llama-server build stopped before it finished; see {log}"
        return proto.BuildProgress(stage=STOPPED, percent=percent, log=log, message=msg)
    eta = eta_s(status, now)
    if stage == "compiling":
        what = f"compiling {percent}%" + (f", {in_words(eta)}" if eta is not None else "")
    elif stage == "downloading":
        what = "downloading the llama.cpp source"
    else:
        what = "configuring"
    return proto.BuildProgress(
        stage=stage,
        percent=percent,
        eta_s=round(eta, 1) if eta is not None else None,
        log=log,
        message=f"building llama-server: {what}",
    )


def current(backend: str = CPU, cache: Path | None = None) -> proto.BuildProgress | None:
    """How far this machine's build for `backend` is now (None: none running or failed)."""
    status = read(build_status_file(backend, cache))
    alive = status is not None and pid_alive(int(status.get("pid") or 0))
    return progress(status, time.time(), alive)
