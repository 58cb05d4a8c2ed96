"""Desired kernel state, derived from validated services (pure).

The kernel balances *frontend groups*: one per (service, port, address family) and
selection. A group has frontends (VIP, port, protocol) and backends (endpoint address, the
endpoint's number for that port name, weight) of the same family, ordered by their stable
name so Maglev sees the same input on every node. Which endpoints: meshd/selection.py
(kube-proxy's rules).

Frontend classes: *internal* (the service VIPs) follow internal_traffic_policy; *external*
(node ports on the node's addresses, external IPs, load-balancer IPs) follow
external_traffic_policy on the tc path, while clients on the node itself (socket hooks)
reaching them get the Cluster selection, as with kube-proxy. One service port therefore has
up to three selections; groups are made only for the distinct ones:

    <ns>/<name>:<port>/ipv4            internal frontends (+ whatever shares its selection)
    <ns>/<name>:<port>/ipv4/cluster    external frontends, socket path (when it differs)
    <ns>/<name>:<port>/ipv4/external   external frontends, tc path (when it differs)

`frontends` go to the frontend map both paths read; `tc_frontends` to the tc-only override
map (tc looks there first). Per-frontend flags (FE_*) say what the datapath does beyond
balancing; group flags (G_*) apply to all of a group's frontends.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from operator import itemgetter
from socket import inet_ntoa as _inet_ntoa
from typing import Callable, Iterable, NamedTuple

from meshd.errors import RecordError
from meshd.model import NODE_PORT_RANGE, Service
from meshd.selection import categorize, topology_wanted

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_third = itemgetter(2)


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


# Flags of a frontend entry (struct meshd_svc_val.flags; the same bits in bpf/include).
G_DROP_EMPTY = 0x1  # no backend: drop (EHOSTUNREACH on the socket path), not refuse
G_AFFINITY = 0x2  # session affinity ClientIP (timeout: Group.affinity)
FE_EXTERNAL = 0x4  # node port, external IP or LB IP (reached from outside through tc)
FE_KEEP_SOURCE = 0x8  # tc: never SNAT (external_traffic_policy Local keeps the client's address)
FE_SOURCE_RANGES = 0x10  # tc: only sources in Group.source_ranges may use this frontend
G_POLICY = 0x40  # a policy selects the group: callers need a verdict (Group.verdicts)
G_POLICY_OPEN = 0x80  # with G_POLICY: only deny policies: a caller with no verdict may pass


@dataclass(frozen=True, slots=True)
class Group:
    key: str  # "namespace/name:port-name/ipv4[/cluster|/external]"
    frontends: tuple[Frontend, ...]
    backends: tuple[tuple[BackendRef, int], ...]  # (backend, weight), selected only, by name
    flags: int = 0  # G_* for every frontend of the group
    affinity: int = 0  # ClientIP affinity timeout, seconds (with G_AFFINITY)
    tc_frontends: tuple[Frontend, ...] = ()  # tc-path overrides of external frontends
    fe_flags: tuple[tuple[Frontend, int], ...] = ()  # FE_* per frontend (absent: 0)
    source_ranges: tuple = ()  # networks allowed on FE_SOURCE_RANGES frontends
    # with G_POLICY: ((identity, uid), (action, flags, policy id)) entries (meshd/verdicts.py)
    verdicts: frozenset = frozenset()

    def frontend_flags(self, fe: Frontend) -> int:
        return self.flags | dict(self.fe_flags).get(fe, 0)


@dataclass(frozen=True)
class NodeInfo:
    """This node: endpoints with `node == name` are local; `zone` picks hinted endpoints."""
    name: str = ""
    zone: str | None = None


@dataclass(frozen=True)
class NodePorts:
    """Where node ports are served: the node addresses that get a frontend for every
    `node_port`, and the range node ports must lie in (config node_ports)."""
    addresses: tuple[IPAddress, ...] = ()
    range: tuple[int, int] = NODE_PORT_RANGE


def group_key(namespace: str, name: str, port_name: str, family: int) -> str:
    return f"{namespace}/{name}:{port_name}/ipv{family}"


def desired_groups(services: Iterable[Service], node_ports: NodePorts = NodePorts(),
                   node: NodeInfo = NodeInfo()) -> dict[str, Group]:
    out: dict[str, Group] = {}
    for svc in services:
        if not svc.vips:
            continue  # headless: a valid record that installs nothing
        topology = topology_wanted(svc.topology_mode, svc.traffic_distribution)
        for port in svc.ports:
            for family in (4, 6):
                out.update(_port_groups(svc, port, family, node_ports, node, topology))
    return out


def _port_groups(svc: Service, port, family: int, node_ports: NodePorts, node: NodeInfo,
                 topology: bool) -> dict[str, Group]:
    internal = [Frontend(v, port.port, port.protocol)
                for v in sorted(v for v in svc.vips if v.version == family)]
    has_eps = any(ep.address.version == family for ep in svc.endpoints)
    external: list[Frontend] = []
    lb: set[Frontend] = set()
    if port.node_port is not None and (internal or has_eps):
        # a family the service has VIPs or endpoints in; not every family the node has
        # addresses in (a single-stack service stays single-stack)
        external += [Frontend(a, port.node_port, port.protocol) for a in
                     sorted(a for a in node_ports.addresses if a.version == family)]
    external += [Frontend(a, port.port, port.protocol)
                 for a in sorted(a for a in svc.external_ips if a.version == family)]
    for a in sorted(a for a in svc.load_balancer_ips if a.version == family):
        fe = Frontend(a, port.port, port.protocol)
        if fe not in external:
            external.append(fe)
        lb.add(fe)
    if not internal and not external:
        return {}
    candidates = [ep for ep in svc.endpoints
                  if ep.address.version == family and port.name in ep.ports]
    sel = categorize(_View.of(candidates), node=node.name, zone=node.zone, topology=topology)
    memo: dict[tuple, tuple] = {}

    def backends(policy: str) -> tuple[tuple[tuple[BackendRef, int], ...], int]:
        chosen, empty = sel.for_policy(policy)
        flags = G_DROP_EMPTY if empty == "drop" and not chosen else 0  # matters only empty
        ids = tuple(map(id, chosen))  # the same endpoints: the same backends tuple
        if ids in memo:
            return memo[ids], flags
        # address int, family, number -> [ref, weight, name]: hashing ip_address objects
        # runs Python code; 10^5 endpoints pass here on a cold start
        acc: dict[tuple[int, int, int], list] = {}
        pname, proto = port.name, port.protocol
        for v in chosen:
            ep = getattr(v, "ep", v)
            a, number = ep.address, ep.ports[pname]
            k = (a._ip, a._version, number)
            got = acc.get(k)
            if got is None:
                acc[k] = [BackendRef(a, number, proto), ep.weight, None]
            else:
                got[1] += ep.weight  # same address twice: add up
        for item in acc.values():
            ref = item[0]
            item[2] = f"{_inet_ntoa(ref.address._ip.to_bytes(4, 'big'))}:{ref.port}/{proto}" \
                if ref.address._version == 4 else ref.name  # == ref.name, without ipaddress' str
        out = memo[ids] = tuple((r, w) for r, w, _n in sorted(acc.values(), key=_third))
        return out, flags

    affinity = svc.affinity_timeout_seconds if svc.session_affinity == "ClientIP" else 0
    gflags = G_AFFINITY if affinity else 0
    base = group_key(svc.namespace, svc.name, port.name, family)
    ext_flags = FE_EXTERNAL | (FE_KEEP_SOURCE if svc.external_traffic_policy == "Local" else 0)
    # source ranges per family, as kube-proxy: a family without a range has no firewall
    ranged = any(n.version == family for n in svc.load_balancer_source_ranges)
    fe_flags = {fe: ext_flags | (FE_SOURCE_RANGES if fe in lb and ranged else 0)
                for fe in external}
    # [backends, empty-action flags, key, frontends, tc_frontends] per distinct selection
    # (at most 3: a list, so equal selections -- usually the same tuple -- are found without
    # hashing every backend)
    made: list[list] = []

    def put(key: str, sel_flags, fronts=(), tc_fronts=()) -> None:
        bk, sflags = sel_flags
        slot = next((m for m in made if m[1] == sflags and (m[0] is bk or m[0] == bk)), None)
        if slot is None:
            slot = [bk, sflags, key, [], []]
            made.append(slot)
        slot[3] += fronts
        slot[4] += tc_fronts

    internal_sel = backends(svc.internal_traffic_policy)
    put(base, internal_sel, internal)
    if external:
        sock_sel = backends("Cluster")
        tc_sel = backends(svc.external_traffic_policy)
        put(base + "/cluster", sock_sel, external)
        if tc_sel[1] != sock_sel[1] or (tc_sel[0] is not sock_sel[0] and tc_sel[0] != sock_sel[0]):
            put(base + "/external", tc_sel, (), external)
    out = {}
    for bk, sflags, key, fronts, tc_fronts in made:
        if not fronts and not tc_fronts:
            continue
        members = set(fronts) | set(tc_fronts)
        out[key] = Group(key=key, frontends=tuple(fronts), backends=bk, flags=gflags | sflags,
                         affinity=affinity, tc_frontends=tuple(tc_fronts),
                         fe_flags=tuple((fe, f) for fe, f in fe_flags.items()
                                        if f and fe in members),
                         source_ranges=tuple(svc.load_balancer_source_ranges)
                         if any(fe in lb for fe in members) else ())
    return out


class _View(NamedTuple):
    """An endpoint as meshd.selection sees it (serving defaults to ready)."""
    ep: object
    ready: bool
    serving: bool
    terminating: bool
    weight: int
    node: str | None
    hints_for_zones: tuple | None

    @classmethod
    def of(cls, eps) -> list:
        # `ready` as kube-proxy reads it: a terminating endpoint is normally not ready (the
        # EndpointSlice controller says so), but with publishNotReadyAddresses it is, and
        # kube-proxy keeps sending it new connections: so does meshd. `serving` is read
        # only together with `terminating`: when none is terminating the endpoints
        # themselves read the same (the common case: no view per endpoint)
        if not any(e.terminating for e in eps):
            return eps
        return [cls(e, e.ready, e.is_serving, e.terminating, e.weight, e.node,
                    e.hints_for_zones) for e in eps]


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
        self._node = NodeInfo()
        self._ext_cidrs: tuple = ()
        self._svc: dict[str, Service] = {}  # key -> the service in use
        self._key_of: dict[int, str] = {}  # id(service in _svc) -> its key
        # group keys the last update touched; None = unknown (after a reset): compare all
        self.changed_groups: set[str] | None = set()
        self.changed_services: set[str] = set()  # service keys it re-validated
        # frontend -> the service key claiming it, or a set of them when several do (one set
        # per frontend would be ~200 B x 10^4)
        self._claims: dict[Frontend, str | set[str]] = {}
        self._kept: set[str] = set()
        self._hc: dict[str, Service] = {}  # kept services with a health_check_node_port
        self._errors: dict[str, RecordError] = {}  # service key -> why it was rejected
        self._conflicts: list[RecordError] = []
        self._groups_of: dict[str, tuple[str, ...]] = {}  # service key -> its group keys
        self.groups: dict[str, Group] = {}

    def service(self, key: str) -> Service | None:
        return self._svc.get(key)

    def health_checks(self, node: str) -> dict[int, tuple[str, str, int]]:
        """health_check_node_port -> (namespace, name, local ready endpoints) of every kept
        service that has one (kube-proxy counts the service's ready endpoints on this node)."""
        out = {}
        for s in self._hc.values():  # (not a walk of every service on every sync)
            local = {ep.address for ep in s.endpoints if ep.node == node and ep.ready
                     and not ep.terminating and ep.weight > 0}
            out[s.health_check_node_port] = (s.namespace, s.name, len(local))
        return out

    @property
    def served(self) -> int:
        """Services kept (installed), including those with dropped external addresses."""
        return len(self._kept)

    @staticmethod
    def _frontends(svc: Service) -> set[Frontend]:
        fronts = {Frontend(v, p.port, p.protocol) for v in
                  (*svc.vips, *svc.external_ips, *svc.load_balancer_ips) for p in svc.ports}
        # a node port claims its number on every node address: vip None stands for them
        return fronts | {Frontend(None, p.node_port, p.protocol)  # type: ignore[arg-type]
                         for p in svc.ports if p.node_port is not None}

    def update(self, services: Iterable[Service] | Callable[[], Iterable[Service]], cidrs,
               forbidden, node_ports: NodePorts = NodePorts(), node: NodeInfo = NodeInfo(),
               external_ip_cidrs=(), updates: dict[str, Service | None] | None = None,
               ) -> tuple[dict[str, Group], list[RecordError]]:
        """`services`: every service of every source (or a function returning them, called
        only if needed). `updates`: service key -> service (None: gone) for the only keys
        that may differ from the last call's services, whose other keys are the same
        objects now; then `services` is not looked at (a one-service change costs what it
        touches, not a pass over 10,000 services), unless the validation inputs changed or
        the last call kept one of several definitions of a key."""
        from meshd.model import check_services
        cidrs, forbidden, ext = tuple(cidrs), frozenset(forbidden), tuple(external_ip_cidrs)
        inputs = (cidrs, forbidden, node_ports, node, ext)
        reset = inputs != (self._cidrs, self._forbidden, self._node_ports, self._node,
                           self._ext_cidrs)
        if reset:
            self.__init__()  # validation inputs changed: start over
            (self._cidrs, self._forbidden, self._node_ports, self._node,
             self._ext_cidrs) = inputs
        svc_now = self._svc
        if updates is not None and not reset and not self._conflicts:
            changed = {k for k, s in updates.items() if svc_now.get(k) is not s}
            current = svc_now
            if changed:
                current = dict(svc_now)
                for k in changed:
                    if updates[k] is None:
                        current.pop(k, None)
                    else:
                        current[k] = updates[k]
        else:
            current, changed = self._compare(services() if callable(services) else services)
        self.changed_groups = set()
        self.changed_services = set()
        if not changed:
            if reset:
                self.changed_groups = None
            return self.groups, list(self._errors.values()) + self._conflicts
        for key in changed:
            old, new = self._svc.get(key), current.get(key)
            claims = self._claims
            for fe in self._frontends(old) if old is not None else ():
                claim = claims[fe]
                if type(claim) is str:
                    del claims[fe]
                else:
                    claim.discard(key)
                    if len(claim) == 1:
                        claims[fe] = next(iter(claim))
            for fe in self._frontends(new) if new is not None else ():
                claim = claims.get(fe)
                if claim is None:
                    claims[fe] = key
                elif type(claim) is str:
                    claims[fe] = {claim, key}
                else:
                    claim.add(key)
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

    def _compare(self, services: Iterable[Service]) -> tuple[dict[str, Service], set[str]]:
        """(key -> service now, the keys that differ from the last call): a pass over every
        service, one definition kept per key (conflicts noted)."""
        # The key of a service object we saw before, by identity: `Service.key` builds a
        # string each time, and this loop runs over every service.
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
        return current, changed

    def _closure(self, changed: set[str], current: dict[str, Service]) -> set[str]:
        """`changed` plus every service sharing a frontend with them, transitively."""
        seen, todo = set(changed), list(changed)
        while todo:
            key = todo.pop()
            svcs = [s for s in (self._svc.get(key), current.get(key)) if s is not None]
            for fe in set().union(*(self._frontends(s) for s in svcs)) if svcs else ():
                claim = self._claims.get(fe, ())
                for other in (claim,) if type(claim) is str else claim:
                    if other not in seen:
                        seen.add(other)
                        todo.append(other)
        return seen

    def _revalidate(self, affected: set[str], check_services) -> None:
        present = sorted(k for k in affected if k in self._svc)
        kept, errors = check_services([self._svc[k] for k in present], self._cidrs,
                                      self._forbidden, self._node_ports.range, self._ext_cidrs)
        kept_keys = {s.key for s in kept}
        for key in affected:
            self._errors.pop(key, None)
            for gk in self._groups_of.pop(key, ()):
                self.groups.pop(gk, None)
                self.changed_groups.add(gk)
            self._kept.discard(key)
            self._hc.pop(key, None)
        for e in errors:
            if e.where in self._errors:  # a kept service with several dropped addresses
                e = RecordError(e.where, f"{self._errors[e.where].reason}; {e.reason}")
            self._errors[e.where] = e
        for s in kept:
            key = self._key_of.get(id(s))  # (the one string object per service)
            if key is None or self._svc.get(key) is not s:  # (a stale id, or a copy)
                key = s.key
            groups = desired_groups([s], self._node_ports, self._node)
            self._groups_of[key] = tuple(groups)
            self.groups.update(groups)
            self.changed_groups.update(groups)
            self._kept.add(key)
            if s.health_check_node_port is not None:
                self._hc[key] = s
        assert kept_keys <= self._kept
