"""Facts about the node the daemon runs on."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path


IGNORED_LINKS = ("kube-ipvs0",)


def local_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address configured on this network namespace's interfaces.

    A service VIP may never equal one of them: a registration must not be able to take
    over connections to a node service. Not kube-proxy's IPVS dummy device (kube-ipvs0),
    which holds every ClusterIP: during a migration from kube-proxy in IPVS mode those are
    the services' own addresses, not the node's."""
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True)
    addrs = set()
    for link in json.loads(out.stdout or "[]"):
        if link.get("ifname") in IGNORED_LINKS:
            continue
        for a in link.get("addr_info", []):
            try:
                addrs.add(ipaddress.ip_address(a["local"].split("%")[0]))
            except (KeyError, ValueError):
                continue
    return addrs


def node_ports(local, cfg_node_ports):
    """desired.NodePorts from the node's addresses and the config's node_ports section (the
    daemon and `meshd services` decide the same way)."""
    from meshd.desired import NodePorts
    return NodePorts(node_port_addresses(local, cfg_node_ports.addresses), cfg_node_ports.range)


def node_port_addresses(local, cidrs=()) -> tuple:
    """The node addresses that serve node ports: `local` without loopback, link-local and
    multicast addresses; with `cidrs` (config node_ports.addresses), only those inside them."""
    out = [a for a in local if not (a.is_loopback or a.is_link_local or a.is_multicast)]
    if cidrs:
        out = [a for a in out if any(a.version == n.version and a in n for n in cidrs)]
    return tuple(sorted(out, key=lambda a: (a.version, a)))


def ephemeral_ports() -> tuple[int, int] | None:
    """net.ipv4.ip_local_port_range of this network namespace (None if unreadable)."""
    try:
        lo, hi = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return None


def cgroup2_mount(mountinfo: str | None = None) -> Path:
    """Where the cgroup2 hierarchy is mounted (/proc/self/mountinfo): /sys/fs/cgroup on a pure
    v2 host, /sys/fs/cgroup/unified on a hybrid one. /sys/fs/cgroup when none is found (the
    loader then names the problem)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            mountinfo = ""
    found = []
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        fields = pre.split()
        if sep and post.split()[:1] == ["cgroup2"] and len(fields) >= 5:
            found.append(fields[4].replace("\\040", " "))
    for want in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if want in found:
            return Path(want)
    return Path(found[0]) if found else Path("/sys/fs/cgroup")
