"""NATS identities and what each may do on the bus.

Every process connects as one user: `gateway`, `placer`, `ui`, `cli` (the operator) and,
per GPU host, `agent-<host>` and `downloader-<host>`. Each user's password lives in its own
identity file `<credentials_dir>/<user>.json` (mode 0600, never printed); the NATS server
reads `nats-server.conf` from the same folder, written here from those files with the
per-role permissions of `permissions()`. docs/security.md explains the model.

    python -m lls.auth init [--config FILE] [--host HOST ...]   # create what is missing
    python -m lls.auth add-host HOST [--config FILE]            # = lls hosts add HOST
    python -m lls.auth rotate USER ... [--config FILE]          # new passwords
    python -m lls.auth tls DIR NAME ...                         # a CA and a certificate
    python -m lls.auth node NAME --host ADDR --route ADDR:6222 ... --store DIR
                                                 # one server of a NATS cluster: its config
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import proto
from proto.subjects import HOST_ID_RE

if TYPE_CHECKING:
    from lls.config import Config, NatsTls

SERVER_CONF = "nats-server.conf"
PID_FILE = "nats-server.pid"  # the embedded server's, so adding a host can reload it
SERVICES = ("gateway", "placer", "ui", "cli")  # one identity each, whatever the host
PER_HOST = ("agent", "downloader")  # one identity per host: agent-<host>, downloader-<host>
DECLARERS = ("placer", "cli")  # may create and update streams and buckets; others bind
ENV_CREDS = "LLS_NATS_CREDS"  # an identity file for anything started from this environment


class AuthError(RuntimeError):
    pass


@dataclass(frozen=True)
class Identity:
    user: str
    password: str

    @property
    def inbox_prefix(self) -> str:
        # Replies and deliveries go to this user's own inboxes, which no other user may
        # subscribe to (with the shared `_INBOX.>`, anyone could read everyone's replies).
        return f"_INBOX_{self.user}"

    @property
    def may_declare(self) -> bool:
        return self.user in DECLARERS


def service_user(service: str, host_id: str) -> str:
    """The identity a service runs as: agents and downloaders have one per host."""
    return f"{service}-{host_id}" if service in PER_HOST else service


def identity_file(folder: Path, user: str) -> Path:
    return folder / f"{user}.json"


def credentials_dir(cfg: Config) -> Path:
    """`nats.credentials_dir`, or `auth/` beside the embedded server's data."""
    from lls.config import expand

    return expand(cfg.nats.credentials_dir or str(Path(cfg.nats.store_dir) / "auth"))


def load_identity(path: str | Path) -> Identity:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return Identity(user=str(data["user"]), password=str(data["password"]))
    except FileNotFoundError:
        raise AuthError(f"NATS identity file {path} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AuthError(f"NATS identity file {path} is unreadable: {e!r}") from None


def resolve(cfg: Config, user: str, explicit: str = "") -> Path:
    """The identity file a process uses: `--nats-creds`, else $LLS_NATS_CREDS, else
    `<credentials_dir>/<user>.json`. Missing: an error that says how to get one."""
    check_user(user)
    path = Path(explicit or os.environ.get(ENV_CREDS) or identity_file(credentials_dir(cfg), user))
    if not path.is_file():
        host = next((user[len(p) + 1 :] for p in PER_HOST if user.startswith(p + "-")), "")
        how = f"lls hosts add {host}" if host else "python -m lls.auth init"
        raise AuthError(
            f"no NATS identity for {user}: {path} does not exist. Where the NATS server runs, "
            f"`{how}` creates it; copy it here (mode 0600), or pass --nats-creds FILE"
        )
    return path


# ------------------------------------------------------------------ permissions

JS = "$JS.API"
KV_BUCKETS = (
    proto.KV_HOSTS,
    proto.KV_INSTANCES,
    proto.KV_ACTIVITY,
    proto.KV_LEASES,
    proto.KV_MODELS,
    proto.KV_DESIRED,  # written by the operator (cli) and the placer only
)


def _kv(*buckets: str) -> tuple[str, ...]:
    return tuple(f"KV_{b}" for b in buckets)


VIEWS = (proto.EVENTS_STREAM, *_kv(*KV_BUCKETS))  # what every service may read
# Instance API keys (lls/instance_key.py): read by the placer, which issues them, and the
# gateways, which send them; never by a host's agent or downloader, nor by the UI.
KEYS = _kv(proto.KV_INSTANCE_KEYS)
KEY_READERS = ("gateway", "placer")
DECLARED = (proto.CMDS_STREAM, *VIEWS, *KEYS)  # what the placer creates and updates


# The streams each role follows with nats-py's ordered consumers (its KV watches and the
# dashboard's event feed): with their own command durables (_consume), the only consumers
# any service creates. A service that starts watching another bucket needs its line here.
WATCHES: dict[str, tuple[str, ...]] = {
    "gateway": _kv(proto.KV_INSTANCES, proto.KV_HOSTS, proto.KV_INSTANCE_KEYS),  # router.py
    "placer": _kv(  # services/placer/service.py
        proto.KV_HOSTS,
        proto.KV_INSTANCES,
        proto.KV_MODELS,
        proto.KV_ACTIVITY,
        proto.KV_DESIRED,
        proto.KV_INSTANCE_KEYS,
    ),
    "ui": (  # services/ui/feed.py, older.py
        *_kv(proto.KV_HOSTS, proto.KV_INSTANCES, proto.KV_ACTIVITY, proto.KV_DESIRED),
        proto.EVENTS_STREAM,
    ),
    "agent": _kv(proto.KV_LEASES),  # lls/fence.py: the placer's epoch
    "downloader": _kv(proto.KV_LEASES),
}


def role_of(user: str) -> str:
    """What an identity is: `agent-gpu-a` -> `agent`; a service's user is its role."""
    check_user(user)
    return next((p for p in PER_HOST if user.startswith(p + "-")), user)


def _read(stream: str) -> list[str]:
    """Read single messages of a stream or bucket: `kv.get` and kv_snapshot's scan (no
    consumer is created for either)."""
    return [
        f"{JS}.DIRECT.GET.{stream}",
        f"{JS}.DIRECT.GET.{stream}.>",
        f"{JS}.STREAM.MSG.GET.{stream}",
    ]


def _watch(stream: str) -> list[str]:
    """Follow a stream with an ordered consumer: nats-py creates it through the one API
    subject without a name (on which the server refuses a durable), asks its info, and
    answers flow control. No named consumer: the server keeps this one only while it is
    followed. Its delivery subject is in the request body, which permissions cannot see:
    docs/security.md says what stops a hostile one."""
    return [
        f"{JS}.CONSUMER.CREATE.{stream}",
        f"{JS}.CONSUMER.INFO.{stream}.*",
        f"$JS.FC.{stream}.>",
    ]


def _consume(durable: str, subject: str) -> list[str]:
    """One durable consumer of the command stream and nothing else: the create subject
    carries the filter, so the server refuses one that would read another host's commands."""
    s = proto.CMDS_STREAM
    return [
        f"{JS}.CONSUMER.CREATE.{s}.{durable}.{subject}",
        f"{JS}.CONSUMER.INFO.{s}.{durable}",
        f"{JS}.CONSUMER.MSG.NEXT.{s}.{durable}",
        f"$JS.ACK.{s}.{durable}.>",
    ]


def permissions(user: str) -> dict[str, object] | None:
    """nats-server publish/subscribe allow lists of a user; None = everything (the operator).

    The durable names (`agent-<host>`, `downloader-<host>`, `inspector`) are the ones the
    services use, and WATCHES the streams they follow; a new consumer needs its line here.
    """
    if user == "cli":
        return None
    role = role_of(user)
    pub = [f"{JS}.INFO", f"{JS}.STREAM.INFO.*"]  # binding to streams and buckets
    pub += [proto.PROBE]  # lls/bus.py's liveness probe; no one may subscribe to it
    sub = [f"_INBOX_{user}.>", proto.EVENTS_SUBJECTS]
    for stream in VIEWS:
        pub += _read(stream)  # every service may read the views and the events
    if role in KEY_READERS:
        for stream in KEYS:
            pub += _read(stream)
    for stream in WATCHES[role]:
        pub += _watch(stream)
    # Every service says when it reloaded or refused its config (lls.service), and which KV
    # records it ignores (lls.bus.Bus.refuse_record), for the log.
    pub += [proto.evt("config.reloaded"), proto.evt("config.refused"), proto.evt("record.refused")]
    if user == "gateway":
        pub += [proto.evt("demand"), f"$KV.{proto.KV_ACTIVITY}.>"]
        # Ollama's pull and delete: requests the placer weighs, never commands to a host.
        pub += [proto.evt("pull.requested"), proto.evt("delete.requested")]
    elif user == "placer":  # the coordinator: commands, every view, stream declarations
        pub += ["lls.evt.>", "lls.cmd.>", "$KV.>"]
        # Creates and updates the streams and buckets; never deletes or purges them.
        pub += [f"{JS}.STREAM.{op}.{s}" for s in DECLARED for op in ("CREATE", "UPDATE")]
        # Keeps the raft leaders on its own server (services/placer/stream_leaders.py).
        pub += [f"{JS}.STREAM.LEADER.STEPDOWN.{s}" for s in DECLARED]
        pub += [f"{JS}.CONSUMER.LIST.{proto.CMDS_STREAM}"]
        pub += [f"{JS}.CONSUMER.LEADER.STEPDOWN.{proto.CMDS_STREAM}.*"]
    elif user == "ui":
        # Reads, and asks agents for log tails (the dashboard's); replies come to its inbox.
        pub += [proto.logs("*")]
    elif role == "agent":
        host = user[len("agent-") :]
        pub += [proto.evt("host.joined"), proto.evt("instance.>"), proto.evt("command.refused")]
        pub += [proto.evt("slots.>")]  # warm swaps: its slot saves and restores
        # Its own host's records only: instance records are keyed `<host>.<instance id>`.
        pub += [f"$KV.{proto.KV_HOSTS}.{host}", f"$KV.{proto.KV_INSTANCES}.{host}.>"]
        pub += _consume(user, proto.cmd_agent(host))
        sub += [proto.logs(host)]  # its own host's log tail requests only
    else:  # a downloader
        host = user[len("downloader-") :]
        pub += [proto.evt("download.>"), proto.evt("model.inspected")]
        pub += [proto.evt("command.refused"), f"$KV.{proto.KV_MODELS}.>"]
        pub += [proto.evt("file.deleted"), proto.evt("file.delete_failed")]
        pub += _consume(user, proto.cmd_download(host)) + _consume("inspector", proto.cmd_inspect())
    out: dict[str, object] = {"publish": {"allow": pub}, "subscribe": {"allow": sub}}
    if role == "agent":
        # Answers the log tail requests it received (one reply each, to the asker's inbox)
        # without any right to publish to inboxes otherwise.
        out["allow_responses"] = {"max": 1, "expires": "10s"}
    return out


def check_user(user: str) -> None:
    if user in SERVICES:
        return
    for p in PER_HOST:
        if user.startswith(p + "-") and HOST_ID_RE.fullmatch(user[len(p) + 1 :]):
            return
    raise AuthError(
        f"unknown NATS identity {user!r}: one of {', '.join(SERVICES)}, or agent-HOST / "
        "downloader-HOST with a host id of letters, digits, '-' and '_'"
    )


# ------------------------------------------------------------------ files


def _write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600 from the start (never briefly world-readable)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _new_identity(folder: Path, user: str) -> None:
    secret = {"user": user, "password": secrets.token_urlsafe(32)}
    _write_private(identity_file(folder, user), json.dumps(secret) + "\n")


def users_for(hosts: list[str]) -> list[str]:
    for h in hosts:
        if not HOST_ID_RE.fullmatch(h):
            raise AuthError(f"host id {h!r}: 1 to 64 letters, digits, '-' and '_' only")
    return [*SERVICES, *(f"{p}-{h}" for h in hosts for p in PER_HOST)]


def ensure(folder: Path, hosts: list[str], tls: NatsTls | None = None) -> list[str]:
    """Create the identities that are missing (the services' and these hosts') and write the
    server config from every identity in `folder`. Returns the users created."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    created = []
    for user in users_for(hosts):
        if not identity_file(folder, user).exists():
            _new_identity(folder, user)
            created.append(user)
    write_server_conf(folder, tls)
    return created


def rotate(folder: Path, users: list[str], tls: NatsTls | None = None) -> None:
    """New passwords for these users (the old ones stop working at the server's reload)."""
    for user in users:
        check_user(user)
        _new_identity(folder, user)
    write_server_conf(folder, tls)


def write_server_conf(folder: Path, tls: NatsTls | None = None) -> Path:
    """nats-server config (JSON is valid NATS config): users, permissions and TLS. Listen
    address, port and store come from the command line, so one file serves any setup."""
    users = []
    for path in sorted(folder.glob("*.json")):
        ident = load_identity(path)
        check_user(ident.user)
        entry: dict[str, object] = {"user": ident.user, "password": ident.password}
        perms = permissions(ident.user)
        if perms is not None:
            entry["permissions"] = perms
        users.append(entry)
    conf: dict[str, object] = {"authorization": {"users": users, "timeout": 5}}
    if tls is not None:
        from lls.config import expand

        conf["tls"] = {
            "ca_file": str(expand(tls.ca)),
            "cert_file": str(expand(tls.cert)),
            "key_file": str(expand(tls.key)),
            "verify": tls.verify_client,
            "timeout": 5,
        }
    path = folder / SERVER_CONF
    _write_private(path, json.dumps(conf, indent=1) + "\n")
    return path


ROUTE_SECRET = "cluster-route.secret"  # what NATS servers of one cluster present to each other


def write_node_conf(
    folder: Path,
    name: str,
    host: str,
    routes: list[str],
    store_dir: Path,
    tls: NatsTls | None = None,
    client_port: int = 4222,
    cluster_port: int = 6222,
    cluster_name: str = "lls",
) -> Path:
    """Config of one server of a NATS cluster: `nats-<name>.conf` beside the identities.

    It includes `nats-server.conf`, so identities added later (`lls hosts add`) reach every
    node at its reload (SIGHUP each). `routes` are the other nodes' host:port cluster
    addresses. Nodes authenticate to each other with the secret in `cluster-route.secret`
    (created 0600 when absent; copy the folder to every NATS host), and with TLS when `tls`
    is set (the same CA, certificate and key as for clients).
    """
    if not (folder / SERVER_CONF).exists():
        write_server_conf(folder, tls)
    secret_path = folder / ROUTE_SECRET
    if not secret_path.exists():
        _write_private(secret_path, secrets.token_urlsafe(32) + "\n")
    password = secret_path.read_text().strip()
    scheme = "nats-route"
    cluster: dict[str, object] = {
        "name": cluster_name,
        "listen": f"{host}:{cluster_port}",
        "authorization": {"user": "route", "password": password, "timeout": 5},
        "routes": [f"{scheme}://route:{password}@{r}" for r in routes],
    }
    if tls is not None:
        from lls.config import expand

        cluster["tls"] = {
            "ca_file": str(expand(tls.ca)),
            "cert_file": str(expand(tls.cert)),
            "key_file": str(expand(tls.key)),
            "verify": True,
            "timeout": 5,
        }
    node = {
        "server_name": name,
        "listen": f"{host}:{client_port}",
        "jetstream": {"store_dir": str(store_dir)},
        "cluster": cluster,
    }
    # Top-level keys in JSON form (valid NATS config), then the shared users and client TLS.
    body = "\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in node.items())
    path = folder / f"nats-{name}.conf"
    _write_private(path, f"{body}\ninclude ./{SERVER_CONF}\n")
    return path


def reload_server(folder: Path) -> bool:
    """SIGHUP the embedded nats-server whose pid file is in `folder`, if it runs."""
    try:
        pid = int((folder / PID_FILE).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    if b"nats-server" not in cmdline:  # a stale pid file: the pid is someone else's now
        return False
    os.kill(pid, signal.SIGHUP)
    return True


def add_host(folder: Path, host: str, tls: NatsTls | None = None) -> str:
    """Identities for a new host; returns what to tell the operator."""
    created = ensure(folder, [host], tls)
    files = [identity_file(folder, f"{p}-{host}") for p in PER_HOST]
    if not created:
        head = f"host {host} already has its identities"
    elif reload_server(folder):
        head = f"created identities for {host}; the embedded NATS server reloaded them"
    else:
        conf = folder / SERVER_CONF
        head = (
            f"created identities for {host}; reload the NATS server to let them in "
            f"(nats-server --signal reload, SIGHUP, or docker compose kill -s HUP nats), "
            f"with {conf} as its config"
        )
    copy = "\n".join(f"  {f}" for f in files)
    return f"{head}.\nCopy these to {host}'s nats.credentials_dir (keep them mode 0600):\n{copy}"


def make_tls(folder: Path, names: list[str], days: int = 825) -> tuple[Path, Path]:
    """A CA (made once, kept in `folder`) and a certificate for `names` (DNS names or IPs)
    usable by a server and as a client certificate. Returns (cert, key)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = folder / "ca.pem", folder / "ca.key"

    def openssl(*args: str) -> None:
        r = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise AuthError(f"openssl {args[0]} failed: {r.stderr.strip()}")

    if not ca.exists():
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
                "-out", str(ca), "-days", str(days), "-subj", "/CN=llama-scheduler CA")  # fmt: skip
        os.chmod(ca_key, 0o600)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in names[0])
    cert, key, csr = folder / f"{stem}.pem", folder / f"{stem}.key", folder / f"{stem}.csr"
    sans = ",".join(
        f"IP:{n}" if n.replace(".", "").isdigit() or ":" in n else f"DNS:{n}" for n in names
    )
    ext = folder / f"{stem}.ext"
    ext.write_text(
        f"subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n"
        "basicConstraints=CA:FALSE\n"
    )
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", f"/CN={names[0]}")  # fmt: skip
    os.chmod(key, 0o600)
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", str(days), "-extfile", str(ext))  # fmt: skip
    csr.unlink()
    ext.unlink()
    return cert, key


# ------------------------------------------------------------------ command line


def main(argv: list[str] | None = None) -> None:
    from lls.config import ConfigError, load

    ap = argparse.ArgumentParser(prog="python -m lls.auth", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--dir", default="", help="identity folder (default: nats.credentials_dir)")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="create missing identities and the server config")
    p.add_argument("--host", action="append", default=[], help="a GPU host id (repeatable)")
    p = sub.add_parser("add-host", help="identities for one more GPU host")
    p.add_argument("host")
    p = sub.add_parser("rotate", help="new passwords for these users")
    p.add_argument("users", nargs="+")
    p = sub.add_parser("tls", help="a CA and a certificate (openssl)")
    p.add_argument("tls_dir")
    p.add_argument("names", nargs="+", help="DNS names and IPs the certificate is valid for")
    p = sub.add_parser("node", help="config of one server of a NATS cluster")
    p.add_argument("name", help="this server's name, unique in the cluster")
    p.add_argument("--host", required=True, help="the address it listens on")
    p.add_argument("--route", action="append", default=[], help="another server's ADDR:6222")
    p.add_argument("--store", required=True, help="its JetStream folder")
    args = ap.parse_args(argv)
    try:
        if args.command == "tls":
            cert, key = make_tls(Path(args.tls_dir), args.names)
            print(f"CA {Path(args.tls_dir) / 'ca.pem'}\ncertificate {cert}\nkey {key}")
            return
        cfg = load(args.config)
        folder = Path(args.dir) if args.dir else credentials_dir(cfg)
        if args.command == "init":
            created = ensure(folder, args.host, cfg.nats.tls)
            print(f"{folder}: created {', '.join(created) or 'nothing (all there)'}")
            print(f"server config: {folder / SERVER_CONF}")
        elif args.command == "add-host":
            print(add_host(folder, args.host, cfg.nats.tls))
        elif args.command == "node":
            path = write_node_conf(
                folder, args.name, args.host, args.route, Path(args.store), cfg.nats.tls
            )
            print(f"nats-server -c {path}")
        else:
            rotate(folder, args.users, cfg.nats.tls)
            done = "reloaded" if reload_server(folder) else "reload the NATS server now"
            print(f"new passwords for {', '.join(args.users)}; {done}. Restart those services")
    except (AuthError, ConfigError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
