"""Facts about the node the daemon runs on."""

from __future__ import annotations

import ipaddress
import json
import subprocess


def local_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address configured on this network namespace's interfaces.

    A service VIP may never equal one of them: a registration must not be able to take
    over connections to a node service."""
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True)
    addrs = set()
    for link in json.loads(out.stdout or "[]"):
        for a in link.get("addr_info", []):
            try:
                addrs.add(ipaddress.ip_address(a["local"].split("%")[0]))
            except (KeyError, ValueError):
                continue
    return addrs
