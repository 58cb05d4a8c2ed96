"""Every IP address the configured etcd endpoints name, host names resolved.

A VIP equal to an address of meshd's own etcd would capture the daemon's connections to its
registry and cut it off, so such VIPs are refused (model.check_services, `forbidden`). An
endpoint given by host name (https://etcd-1.example:2379) is resolved here, every address of
every name, so that it is protected as well as a literal one. Resolution is bounded in time and
never fatal: a name that does not resolve is logged and contributes nothing (the etcd client
cannot reach it either). unix:// endpoints have no address.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from ipaddress import IPv4Address, IPv6Address, ip_address
from urllib.parse import urlsplit

log = logging.getLogger("meshd.etcd")

RESOLVE_TIMEOUT = 2.0  # seconds for all names together


def _host(url: str) -> str | None:
    """The host of an http(s):// endpoint (brackets removed), None for unix:// or a bad URL."""
    try:
        u = urlsplit(url if "://" in url else f"http://{url}")
    except ValueError:
        return None
    return u.hostname if u.scheme in ("http", "https") and u.hostname else None


def _literal(host: str) -> IPv4Address | IPv6Address | None:
    try:
        return ip_address(host.split("%", 1)[0])  # fe80::1%eth0: the address without its zone
    except ValueError:
        return None


async def _lookup(host: str) -> set[IPv4Address | IPv6Address]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return {a for a in (_literal(str(info[4][0])) for info in infos) if a is not None}


async def resolve_etcd_addresses(urls: list[str], timeout: float = RESOLVE_TIMEOUT
                                 ) -> set[IPv4Address | IPv6Address]:
    """The addresses of every endpoint in `urls`: literals as they are, host names through
    getaddrinfo (all families, all addresses), together within `timeout` seconds. A name that
    fails or times out is logged (warning) and skipped; this never raises for a bad name."""
    out: set[IPv4Address | IPv6Address] = set()
    names: list[str] = []
    for url in urls:
        host = _host(url)
        if host is None:
            continue
        addr = _literal(host)
        if addr is not None:
            out.add(addr)
        elif host not in names:
            names.append(host)
    if not names:
        return out
    tasks = [asyncio.ensure_future(_lookup(h)) for h in names]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for host, task in zip(names, tasks):
        if task in pending:
            task.cancel()
            log.warning("etcd: resolving %s took longer than %gs; its addresses are not protected from "
                        "being used as VIPs until the next try", host, timeout)
        elif task.exception() is not None:
            e = task.exception()
            log.warning("etcd: cannot resolve %s (%s); its addresses are not protected from being used "
                        "as VIPs", host, getattr(e, "strerror", None) or e)
        else:
            out |= task.result()
    return out
