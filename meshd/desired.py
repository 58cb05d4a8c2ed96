"""Desired kernel state, derived from validated services (pure).

The kernel balances *frontend groups*: one per (service, port, address family). A group has
frontends (VIP, port, protocol) — every VIP of that family on that service port — and the
usable backends (endpoint address, the endpoint's number for that port name, weight) of the
same family, ordered by their stable name so Maglev sees the same input on every node.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from meshd.model import Service

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Frontend(NamedTuple):
    vip: IPAddress
    port: int
    protocol: str  # "TCP" | "UDP"

    def __str__(self) -> str:
        host = f"[{self.vip}]" if self.vip.version == 6 else str(self.vip)
        return f"{host}:{self.port}/{self.protocol}"


class BackendRef(NamedTuple):
    address: IPAddress
    port: int
    protocol: str

    @property
    def name(self) -> str:
        """Stable name used to order backends for Maglev: "10.0.0.1:80/TCP", "[fd00::1]:80/TCP"."""
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}/{self.protocol}"


@dataclass(frozen=True)
class Group:
    key: str  # "namespace/name:port-name/ipv4"
    frontends: tuple[Frontend, ...]
    backends: tuple[tuple[BackendRef, int], ...]  # (backend, weight), usable only, by name


def group_key(namespace: str, name: str, port_name: str, family: int) -> str:
    return f"{namespace}/{name}:{port_name}/ipv{family}"


def desired_groups(services: Iterable[Service]) -> dict[str, Group]:
    out: dict[str, Group] = {}
    for svc in services:
        for port in svc.ports:
            for family in (4, 6):
                vips = sorted(v for v in svc.vips if v.version == family)
                if not vips:
                    continue
                weights: dict[BackendRef, int] = {}
                for ep in svc.endpoints:
                    number = ep.ports.get(port.name)
                    if not ep.usable or number is None or ep.address.version != family:
                        continue
                    ref = BackendRef(ep.address, number, port.protocol)
                    weights[ref] = weights.get(ref, 0) + ep.weight  # same addr twice: add up
                key = group_key(svc.namespace, svc.name, port.name, family)
                out[key] = Group(
                    key=key,
                    frontends=tuple(Frontend(v, port.port, port.protocol) for v in vips),
                    backends=tuple(sorted(weights.items(), key=lambda bw: bw[0].name)),
                )
    return out
