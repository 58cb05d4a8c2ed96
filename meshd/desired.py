"""Desired kernel state, derived from validated services (pure).

The kernel balances *frontend groups*: one per (service, port, address family). A group has
frontends (VIP, port, protocol) — every VIP of that family on that service port, and for a
port with a `node_port`, every node address of that family at the node port — and the
usable backends (endpoint address, the endpoint's number for that port name, weight) of the
same family, ordered by their stable name so Maglev sees the same input on every node.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from meshd.errors import RecordError
from meshd.model import NODE_PORT_RANGE, Service

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


@dataclass(frozen=True)
class NodePorts:
    """Where node ports are served: the node addresses that get a frontend for every
    `node_port`, and the range node ports must lie in (config node_ports)."""
    addresses: tuple[IPAddress, ...] = ()
    range: tuple[int, int] = NODE_PORT_RANGE


def group_key(namespace: str, name: str, port_name: str, family: int) -> str:
    return f"{namespace}/{name}:{port_name}/ipv{family}"


def desired_groups(services: Iterable[Service], node_ports: NodePorts = NodePorts()
                   ) -> dict[str, Group]:
    out: dict[str, Group] = {}
    for svc in services:
        if not svc.vips:
            continue  # headless: a valid record that installs nothing
        for port in svc.ports:
            for family in (4, 6):
                fronts = [Frontend(v, port.port, port.protocol)
                          for v in sorted(v for v in svc.vips if v.version == family)]
                if port.node_port is not None and (fronts or any(
                        ep.address.version == family for ep in svc.endpoints)):
                    # a family the service has VIPs or endpoints in; not every family the
                    # node has addresses in (a single-stack service stays single-stack)
                    fronts += [Frontend(a, port.node_port, port.protocol) for a in
                               sorted(a for a in node_ports.addresses if a.version == family)]
                if not fronts:
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
                    frontends=tuple(fronts),
                    backends=tuple(sorted(weights.items(), key=lambda bw: bw[0].name)),
                )
    return out


class DesiredState:
    """check_services + desired_groups, kept up to date incrementally.

    At 10,000 services a full pass costs over a second; a registry change touches one
    service. Sources hand back the *same* Service objects for records that did not change,
    so this compares by identity, re-validates only changed services and the services that
    share a frontend with them (VIP collisions are decided greedily in key order, exactly as
    check_services does), and keeps unchanged Group objects, so the reconciler can skip them
    by identity too.
    """

    def __init__(self) -> None:
        self._cidrs: tuple = ()
        self._forbidden: frozenset = frozenset()
        self._node_ports = NodePorts()
        self._svc: dict[str, Service] = {}  # key -> the service in use
        self._key_of: dict[int, str] = {}  # id(service in _svc) -> its key
        # group keys the last update touched; None = unknown (after a reset): compare all
        self.changed_groups: set[str] | None = set()
        self.changed_services: set[str] = set()  # service keys it re-validated
        self._claims: dict[Frontend, set[str]] = {}  # frontend -> service keys claiming it
        self._kept: set[str] = set()
        self._errors: dict[str, RecordError] = {}  # service key -> why it was rejected
        self._conflicts: list[RecordError] = []
        self._groups_of: dict[str, dict[str, Group]] = {}  # service key -> its groups
        self.groups: dict[str, Group] = {}

    def service(self, key: str) -> Service | None:
        return self._svc.get(key)

    @staticmethod
    def _frontends(svc: Service) -> set[Frontend]:
        fronts = {Frontend(v, p.port, p.protocol) for v in svc.vips for p in svc.ports}
        # a node port claims its number on every node address: vip None stands for them
        return fronts | {Frontend(None, p.node_port, p.protocol)  # type: ignore[arg-type]
                         for p in svc.ports if p.node_port is not None}

    def update(self, services: Iterable[Service], cidrs, forbidden,
               node_ports: NodePorts = NodePorts()
               ) -> tuple[dict[str, Group], list[RecordError]]:
        from meshd.model import check_services
        cidrs, forbidden = tuple(cidrs), frozenset(forbidden)
        reset = (cidrs, forbidden, node_ports) != (self._cidrs, self._forbidden,
                                                   self._node_ports)
        if reset:
            self.__init__()  # validation inputs changed: start over
            self._cidrs, self._forbidden, self._node_ports = cidrs, forbidden, node_ports
        # The key of a service object we saw before, by identity: `Service.key` builds a
        # string each time, and this loop runs over every service on every sync.
        key_of, svc_now = self._key_of, self._svc
        current: dict[str, Service] = {}
        dups: dict[str, list[Service]] = {}
        changed: set[str] = set()
        for s in services:
            key = key_of.get(id(s))
            if key is None or svc_now.get(key) is not s:
                key = s.key
                changed.add(key)  # new or replaced (a duplicate is re-checked below)
            if key in current:
                dups.setdefault(key, [current[key]]).append(s)
            else:
                current[key] = s
        self._conflicts = []
        for key, lst in dups.items():
            if all(s is lst[0] or s == lst[0] for s in lst):
                continue
            lst = sorted(lst, key=lambda s: s.model_dump_json())
            current[key] = lst[0]
            self._conflicts += [RecordError(key, "conflicting definitions from more than one "
                                            "source; another definition was kept")
                                for s in lst[1:] if s != lst[0]]
        changed = {k for k in changed if svc_now.get(k) is not current.get(k)}
        added = sum(1 for k in changed if k not in svc_now)
        if len(current) - added < len(svc_now):  # some key is gone: only then scan for it
            changed |= svc_now.keys() - current.keys()
        self.changed_groups = set()
        self.changed_services = set()
        if not changed:
            if reset:
                self.changed_groups = None
            return self.groups, list(self._errors.values()) + self._conflicts
        for key in changed:
            old, new = self._svc.get(key), current.get(key)
            for fe in self._frontends(old) if old is not None else ():
                claim = self._claims[fe]
                claim.discard(key)
                if not claim:
                    del self._claims[fe]
            for fe in self._frontends(new) if new is not None else ():
                self._claims.setdefault(fe, set()).add(key)
        affected = self._closure(changed, current)
        self.changed_services = affected
        self._svc = current
        if len(changed) > 64 or len(self._key_of) > 2 * len(current) + 64:
            self._key_of = {id(s): k for k, s in current.items()}
        else:  # stale ids are harmless: a hit is trusted only if _svc holds that very object
            for k in changed:
                if k in current:
                    self._key_of[id(current[k])] = k
        self._revalidate(affected, check_services)
        if reset:
            self.changed_groups = None  # unknown: groups from before the reset may be gone
        return self.groups, list(self._errors.values()) + self._conflicts

    def _closure(self, changed: set[str], current: dict[str, Service]) -> set[str]:
        """`changed` plus every service sharing a frontend with them, transitively."""
        seen, todo = set(changed), list(changed)
        while todo:
            key = todo.pop()
            svcs = [s for s in (self._svc.get(key), current.get(key)) if s is not None]
            for fe in set().union(*(self._frontends(s) for s in svcs)) if svcs else ():
                for other in self._claims.get(fe, ()):
                    if other not in seen:
                        seen.add(other)
                        todo.append(other)
        return seen

    def _revalidate(self, affected: set[str], check_services) -> None:
        present = sorted(k for k in affected if k in self._svc)
        kept, errors = check_services([self._svc[k] for k in present], self._cidrs,
                                      self._forbidden, self._node_ports.range)
        kept_keys = {s.key for s in kept}
        for key in affected:
            self._errors.pop(key, None)
            for gk in self._groups_of.pop(key, {}):
                self.groups.pop(gk, None)
                self.changed_groups.add(gk)
            self._kept.discard(key)
        for e in errors:
            self._errors[e.where] = e
        for s in kept:
            groups = desired_groups([s], self._node_ports)
            self._groups_of[s.key] = groups
            self.groups.update(groups)
            self.changed_groups.update(groups)
            self._kept.add(s.key)
        assert kept_keys <= self._kept
