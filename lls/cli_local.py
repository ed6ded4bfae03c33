"""`lls usage` and `lls reload`: the commands that need no bus (the gateway's /metrics;
SIGHUP to this machine's `make run`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lls.config import Config
from lls.run import pid_file


def usage_rows(metrics_text: str) -> list[tuple[str, ...]]:
    """Per key and model, from the gateway's /metrics: requests, those refused by the key's
    limits (429), prompt and completion tokens."""
    table: dict[tuple[str, str], list[float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "lls_key_requests_total":
                row = table.setdefault((s.labels["key"], s.labels["model"]), [0.0] * 4)
                row[0] += s.value
                if s.labels.get("code") == "429":
                    row[1] += s.value
            elif s.name == "lls_tokens_total":
                row = table.setdefault((s.labels["key"], s.labels["model"]), [0.0] * 4)
                row[2 if s.labels.get("kind") == "prompt" else 3] += s.value
    return [(k, m, *(f"{v:.0f}" for v in row)) for (k, m), row in sorted(table.items())]


def gateway_url(cfg: Config) -> str:
    host = cfg.gateway.host
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    host = f"[{host}]" if ":" in host else host  # an IPv6 address
    return f"http://{host}:{cfg.gateway.port}"


def cmd_usage(cfg: Config, args: argparse.Namespace) -> int:
    base = (args.gateway or gateway_url(cfg)).rstrip("/")
    # /metrics needs an admin key when keys are set: --key, $LLS_API_KEY, else the config's
    key = args.key or os.environ.get("LLS_API_KEY", "")
    key = key or next((k.key for k in cfg.gateway.api_keys if k.admin), "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.get(f"{base}/metrics", headers=headers, timeout=10)
    except httpx.HTTPError as e:
        print(f"error: cannot reach the gateway at {base}: {e}", file=sys.stderr)
        return 2
    if r.status_code in (401, 403):
        print(f"error: {base}/metrics needs an admin key (--key or $LLS_API_KEY)", file=sys.stderr)
        return 1
    if r.status_code != 200:
        print(f"error: {base}/metrics answered {r.status_code}", file=sys.stderr)
        return 1
    rows = usage_rows(r.text)
    if not rows:
        print("no requests counted yet (counters start when the gateway starts)")
        return 0
    rows.insert(0, ("KEY", "MODEL", "REQUESTS", "REFUSED", "PROMPT_TOKENS", "COMPLETION_TOKENS"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_reload(cfg: Config, args: argparse.Namespace) -> int:
    """SIGHUP to `make run` (lls.run), which passes it to every service. The config was
    loaded before this runs, so a bad one is refused here already, naming the key."""
    path = pid_file(cfg)
    try:
        pid = int(path.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        print(
            f"error: no `make run` found ({path} names no running process). Services run "
            "apart reload on SIGHUP: send it to each (e.g. `docker kill -s HUP NAME`)",
            file=sys.stderr,
        )
        return 1
    if b"lls.run" not in cmdline:  # a stale pid file whose pid was taken by another process
        print(f"error: process {pid} from {path} is not `make run`", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGHUP)
    print(f"reloading {args.config}: every service re-reads it (see their logs and events)")
    return 0
