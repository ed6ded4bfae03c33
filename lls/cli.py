"""`lls`: an operator's view of the system, Ollama-like.

lls ps                 instances with host, GPUs, state and idle time; pending requests;
                       live gateways' warnings (open to the network with no API keys);
                       models whose GGUF has no chat template and none is configured
lls load MODEL         start MODEL now and wait until it is ready (stored request: a placer
                       that starts within --timeout still carries it out); --pin keeps
                       it loaded (no idle stop, no eviction) until unpinned or stopped
lls unpin MODEL        end the pin; the idle timeout applies again
lls stop MODEL         stop MODEL's instances and wait until none is left (same; ends a pin)
lls pull MODEL         download MODEL's file to a host's store, with a progress bar
lls hosts add HOST     NATS identities for a new GPU host (and what to copy there)
lls usage              requests and tokens per API key and model (the gateway's /metrics)
lls reload             every service of `make run` re-reads the config file (SIGHUP)
lls events             the event history: --since 1h, --model M, --kind swap, --follow

This module parses the arguments and dispatches; the commands are in lls/cli_views.py (ps,
events), lls/cli_requests.py (load, stop, unpin, pull) and lls/cli_local.py (usage, reload).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from lls import auth
from lls.bus import connect
from lls.cli_local import cmd_reload, cmd_usage
from lls.cli_requests import PICKUP_S, cmd_load, cmd_pull, cmd_stop, cmd_unpin
from lls.cli_views import cmd_events, cmd_ps
from lls.config import ConfigError, load

COMMANDS = {
    "ps": cmd_ps,
    "load": cmd_load,
    "unpin": cmd_unpin,
    "stop": cmd_stop,
    "pull": cmd_pull,
    "events": cmd_events,
}


def parser() -> argparse.ArgumentParser:
    """`lls`'s arguments: global options, then one subcommand."""
    ap = argparse.ArgumentParser(prog="lls", description="Operate a llama-scheduler cluster.")
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--nats", default="", help="NATS URL (default: the config's, or :4222)")
    ap.add_argument(
        "--nats-creds",
        default="",
        help="identity file (default: $LLS_NATS_CREDS, else nats.credentials_dir/cli.json)",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    ps = sub.add_parser("ps", help="list instances")
    ps.add_argument("-a", "--all", action="store_true", help="include stopped and failed ones")
    for name, helptext in (
        ("load", "start a model now and wait until it is ready"),
        ("stop", "stop a model's instances and wait until they are stopped"),
        ("pull", "download a model's file"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("model")
        p.add_argument(
            "--timeout",
            type=float,
            default=60 if name == "stop" else 600,
            help="seconds to wait for the outcome; then the request is withdrawn and the "
            f"exit code is 1 (also when no placer took it up within {PICKUP_S:.0f} s)"
            if name != "pull"
            else "seconds to wait for the download",
        )
        if name == "pull":
            p.add_argument("--host", default="", help="host id (default: the first alive host)")
        if name == "load":
            p.add_argument(
                "--pin",
                action="store_true",
                help="keep it loaded (never idle-stopped or evicted) until lls unpin or lls stop",
            )
    unpin = sub.add_parser("unpin", help="end a model's pin (lls load --pin)")
    unpin.add_argument("model")
    hosts = sub.add_parser("hosts", help="manage GPU hosts' NATS identities")
    hosts_sub = hosts.add_subparsers(dest="hosts_command", required=True)
    hosts_sub.add_parser("add", help="create agent-HOST and downloader-HOST").add_argument("host")
    sub.add_parser("reload", help="every service re-reads the config file")
    ev = sub.add_parser("events", help="the event history (placements, swaps, replicas...)")
    ev.add_argument("--since", default="1h", help="how far back: 90s, 10m, 1h, 2d (default 1h)")
    ev.add_argument("--model", dest="only_model", default="", help="only this model's events")
    ev.add_argument("--kind", default="", help="only kinds starting with this, e.g. swap")
    ev.add_argument("-f", "--follow", action="store_true", help="then keep printing new ones")
    ev.add_argument("--json", action="store_true", help="one JSON object per line")
    use = sub.add_parser("usage", help="requests and tokens per API key and model")
    use.add_argument("--gateway", default="", help="gateway URL (default: the config's)")
    use.add_argument(
        "--key", default="", help="admin API key (default: $LLS_API_KEY, else the config's)"
    )
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if args.command == "usage":  # the gateway's /metrics: no bus needed
        raise SystemExit(cmd_usage(cfg, args))
    if args.command == "reload":  # a signal to this machine's `make run`: no bus needed
        raise SystemExit(cmd_reload(cfg, args))
    if args.command == "hosts":  # files only: no bus needed
        try:
            print(auth.add_host(auth.credentials_dir(cfg), args.host, cfg.nats.tls))
        except (auth.AuthError, OSError) as e:
            raise SystemExit(f"error: {e}") from None
        return
    try:
        creds = auth.resolve(cfg, "cli", args.nats_creds)
    except auth.AuthError as e:
        raise SystemExit(f"error: {e}") from None
    if getattr(args, "model", None) and args.model not in cfg.models:
        raise SystemExit(f"error: model {args.model!r} is not in {args.config}")
    url = args.nats or (
        cfg.nats.url if cfg.nats.url != "embedded" else f"nats://127.0.0.1:{cfg.nats.port}"
    )

    async def go() -> int:
        try:
            bus = await connect(
                url,
                "cli",
                creds=creds,
                tls=cfg.nats.tls,
                deadline_s=10,
                limits=cfg.nats.limits,
                replicas=cfg.nats.replicas,
            )
        except Exception as e:  # noqa: BLE001
            print(f"error: cannot reach NATS at {url}: {e}", file=sys.stderr)
            return 2
        try:
            return await COMMANDS[args.command](bus, cfg, args)
        finally:
            await bus.close()

    raise SystemExit(asyncio.run(go()))


if __name__ == "__main__":
    main()
