"""Validated, immutable control-plane types and the checks that need every record at once.

Owns:
  * what a service record *is*: the pydantic models PortIn, EndpointIn, LbSettings, ServiceIn
    (frozen, extra keys rejected) check it; what is kept after the check is the slim, slotted
    PortSpec, Endpoint, Service of meshd/records.py (same fields, hashable, comparable);
  * turning raw registry data (static file entries, etcd JSON) into those types with one-line,
    user-readable reasons: parse_service, parse_endpoint -> RecordError(where, reason);
  * explain_errors: pydantic ValidationError -> [(loc, message)] in meshd's wording (config.py
    reuses it for the config file);
  * check_services: VIPs inside service_cidrs, not a forbidden address, no frontend collisions.
Pure: stdlib + pydantic only, no I/O.
"""

from __future__ import annotations

import difflib
import reprlib
import re
import socket
import types
import weakref
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, PlainValidator,
                      StrictBool, StrictInt, StrictStr, ValidationError, model_validator)
from pydantic_core import PydanticCustomError

from meshd.errors import RecordError
from meshd.records import Endpoint, PortSpec, Record, Service, intern, share

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 40
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4
_repr.maxlevel = 2


def show(value: object) -> str:
    """A short, single-line repr of a user-supplied value for error messages."""
    return _repr.repr(value)


def _fail(kind: str, template: str, **ctx: Any) -> PydanticCustomError:
    """A validation error with `template.format(**ctx)` as its message, used verbatim later."""
    return PydanticCustomError(kind, "{msg}", {"msg": template.format(**ctx)})


def _in_range(lo: int, hi: int) -> AfterValidator:
    def check(v: int) -> int:
        if not lo <= v <= hi:
            raise _fail("range", "must be {lo}-{hi} (got {got})", lo=lo, hi=hi, got=v)
        return v
    return AfterValidator(check)


_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _label(maxlen: int) -> AfterValidator:
    def check(v: str) -> str:
        if len(v) > maxlen or not _LABEL.fullmatch(v):
            size = f", {len(v)} characters" if len(v) > maxlen else ""
            raise _fail("name", "must be 1-{n} lowercase letters, digits or '-', starting and ending "
                        "with a letter or digit (got {got}{size})", n=maxlen, got=show(v), size=size)
        return v
    return AfterValidator(check)


def _text(v: str) -> str:
    if not 1 <= len(v) <= 253 or any(not c.isprintable() or c.isspace() for c in v):
        raise _fail("text", "must be 1-253 printable characters without spaces (got {got})", got=show(v))
    return v


_BROADCAST = IPv4Address("255.255.255.255")


# A canonical dotted quad (no leading zeros, as ipaddress demands): the common case of
# 100,000s of endpoint records, parsed without ipaddress' pure-Python octet parser.
_DOTTED_QUAD = re.compile(r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
                          r"(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}")


def _not_unicast(addr: IPAddress) -> PydanticCustomError:
    return _fail("ip", "must be a unicast address, not unspecified, multicast or broadcast "
                 "(got {got})", got=str(addr))


def _ip(v: object) -> IPAddress:
    if type(v) is str and _DOTTED_QUAD.fullmatch(v):
        n = int.from_bytes(socket.inet_aton(v), "big")
        if n == 0 or n >> 28 == 0xE or n == 0xFFFFFFFF:  # unspecified, multicast, broadcast
            raise _not_unicast(IPv4Address(n))
        return IPv4Address(n)
    if isinstance(v, (IPv4Address, IPv6Address)):
        addr = v
    else:
        try:
            addr = ip_address(v) if isinstance(v, str) else None
        except ValueError:
            addr = None
        if addr is None:
            raise _fail("ip", "must be an IPv4 or IPv6 address (got {got})", got=show(v))
    if isinstance(addr, IPv6Address) and addr.scope_id:
        raise _fail("ip", "must not carry a zone index (got {got})", got=show(str(addr)))
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped:
        raise _fail("ip", "IPv4-mapped address; write it as {v4} (got {got})",
                    v4=addr.ipv4_mapped, got=show(v))
    if addr.is_unspecified or addr.is_multicast or addr == _BROADCAST:
        raise _not_unicast(addr)
    return addr


# Cloud metadata / host services reachable from every VM: AWS, GCP, Azure, OpenStack
# (169.254.169.254, also link-local), AWS over IPv6, Alibaba Cloud, Azure's WireServer.
METADATA_ADDRESSES = frozenset({IPv4Address("169.254.169.254"), IPv6Address("fd00:ec2::254"),
                                IPv4Address("100.100.100.200"), IPv4Address("168.63.129.16")})


def local_endpoint_problem(addr: IPAddress) -> str | None:
    """Why a backend at `addr` would send a service's connections to this machine itself or to
    its cloud's metadata service (loopback, link-local, metadata address), or None. Such an
    endpoint is refused unless its service sets allow_local_endpoints (multicast, broadcast and
    unspecified addresses are never valid, see _ip)."""
    if type(addr) is IPv4Address:
        n = int(addr)
        if n >> 24 == 127:
            return f"{addr} is a loopback address"
        if addr in METADATA_ADDRESSES:
            return f"{addr} is a cloud metadata address"
        if n >> 16 == 0xA9FE:
            return f"{addr} is a link-local address"
        return None
    if addr in METADATA_ADDRESSES:
        return f"{addr} is a cloud metadata address"
    if addr.is_loopback:
        return f"{addr} is a loopback address"
    if addr.is_link_local:
        return f"{addr} is a link-local address"
    return None


def local_endpoint_reason(addr: IPAddress, service: str) -> str:
    """The whole message for an endpoint refused by local_endpoint_problem."""
    return (f"address {local_endpoint_problem(addr)}: connections to service {service} would go to this "
            "machine itself or its metadata service; set allow_local_endpoints: true on the service "
            "if that is intended")


def _or_default(default: object) -> BeforeValidator:
    """YAML `key:` with nothing after it is null; treat it like the key being absent."""
    return BeforeValidator(lambda v: default if v is None else v)


class FrozenDict(dict):  # type: ignore[type-arg]
    """A dict that cannot change after creation and hashes by content (keeps Endpoint hashable)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (dict(self),))

    def _immutable(self, *_: object, **__: object) -> None:
        raise TypeError("FrozenDict is immutable")

    __setitem__ = __delitem__ = __ior__ = _immutable  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _immutable  # type: ignore[assignment]


# One FrozenDict per distinct port mapping: most endpoints of a fleet map the same names to
# the same numbers ({"http": 8080}), and 10^5 copies cost ~20 MB. Weak: unused ones go.
_PORTS: weakref.WeakValueDictionary[tuple[tuple[str, int], ...], FrozenDict] = \
    weakref.WeakValueDictionary()


def _frozen_ports(v: dict[str, int]) -> FrozenDict:
    if not v:
        raise _fail("empty", "must map at least one service port name to a port number")
    key = tuple(v.items())
    shared = _PORTS.get(key)
    if shared is None:
        shared = _PORTS[key] = FrozenDict(v)
    return shared


PortNumber = Annotated[StrictInt, _in_range(1, 65535)]
PortName = Annotated[StrictStr, _label(15)]
DnsLabel = Annotated[StrictStr, _label(63)]
IPAddr = Annotated[IPAddress, PlainValidator(_ip)]


class StrictModel(BaseModel):
    """Base of every meshd input type: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class PortIn(StrictModel):
    name: PortName
    port: PortNumber
    protocol: Literal["TCP", "UDP"] = "TCP"
    # NodePort: this port is also served on the node's own addresses (node_ports.addresses)
    # at this number, which must lie in node_ports.range (checked with the config).
    node_port: PortNumber | None = None


class EndpointIn(StrictModel):
    """One backend (validation; kept as meshd.records.Endpoint). `ports` maps a service port
    name to the backend's port; an endpoint serves exactly the service ports it names."""

    address: IPAddr
    ports: Annotated[dict[PortName, PortNumber], AfterValidator(_frozen_ports)]
    weight: Annotated[StrictInt, _in_range(0, 65535)] = 1
    zone: Annotated[StrictStr, AfterValidator(_text)] | None = None
    node: Annotated[StrictStr, AfterValidator(_text)] | None = None
    ready: StrictBool = True
    # Kubernetes' EndpointConditions: serving = ready regardless of terminating; absent, it
    # follows `ready` (as the API says: "consumers should defer to the ready condition")
    serving: StrictBool | None = None
    terminating: StrictBool = False
    # topology hints (EndpointSlice hints.forZones): the zones this endpoint should serve
    hints_for_zones: Annotated[tuple[Annotated[StrictStr, AfterValidator(_text)], ...],
                               AfterValidator(_unique_zones)] | None = None



def _unique_zones(v: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(v)) != len(v):
        raise _fail("duplicate", "lists a zone twice (got {got})", got=show(list(v)))
    return v


def _source_range(v: object) -> IPNetwork:
    from ipaddress import ip_network
    if isinstance(v, (IPv4Network, IPv6Network)):
        return v
    try:
        return ip_network(v, strict=False) if isinstance(v, str) else None  # type: ignore[return-value]
    except ValueError:
        pass
    raise _fail("cidr", "must be a CIDR such as 203.0.113.0/24 (got {got})", got=show(v))


Policy = Annotated[Literal["Cluster", "Local"], _or_default("Cluster")]
SourceRange = Annotated[IPNetwork, PlainValidator(_source_range)]


class LbSettings(StrictModel):
    algorithm: Literal["maglev"] = "maglev"


def _check_vips(vips: tuple[IPAddress, ...]) -> tuple[IPAddress, ...]:
    """No VIP at all is a headless service: valid, and nothing is installed for it."""
    first: dict[IPAddress, int] = {}
    for i, vip in enumerate(vips):
        if vip in first:
            raise _fail("duplicate", "{vip} is listed twice (vips[{a}] and vips[{b}])",
                        vip=vip, a=first[vip], b=i)
        first[vip] = i
    return vips


def _check_ports(ports: tuple[PortIn, ...]) -> tuple[PortIn, ...]:
    if not ports:
        raise _fail("empty", "must list at least one port")
    names: dict[str, int] = {}
    numbers: dict[tuple[int, str], int] = {}
    node_ports: dict[tuple[int, str], int] = {}
    for i, p in enumerate(ports):
        if p.name in names:
            raise _fail("duplicate", "port name {n!r} is used twice (ports[{a}] and ports[{b}])",
                        n=p.name, a=names[p.name], b=i)
        if (p.port, p.protocol) in numbers:
            raise _fail("duplicate", "{port}/{proto} is listed twice (ports[{a}] and ports[{b}])",
                        port=p.port, proto=p.protocol, a=numbers[(p.port, p.protocol)], b=i)
        if p.node_port is not None and (p.node_port, p.protocol) in node_ports:
            raise _fail("duplicate", "node_port {port}/{proto} is listed twice (ports[{a}] and "
                        "ports[{b}])", port=p.node_port, proto=p.protocol,
                        a=node_ports[(p.node_port, p.protocol)], b=i)
        names[p.name] = i
        numbers[(p.port, p.protocol)] = i
        if p.node_port is not None:
            node_ports[(p.node_port, p.protocol)] = i
    return ports


class ServiceIn(StrictModel):
    """A service record (validation; kept as meshd.records.Service)."""
    namespace: DnsLabel
    name: DnsLabel
    vips: Annotated[tuple[IPAddr, ...], AfterValidator(_check_vips)]
    ports: Annotated[tuple[PortIn, ...], AfterValidator(_check_ports)]
    session_affinity: Annotated[Literal["None", "ClientIP"], _or_default("None")] = "None"
    lb: Annotated[LbSettings, _or_default({})] = LbSettings()
    # Endpoints on loopback, link-local or a metadata address are refused unless this is true
    # (local_endpoint_problem): anyone who can write an endpoint could otherwise send the
    # service's clients to a port of this machine (sshd on 127.0.0.1:22) or to 169.254.169.254.
    allow_local_endpoints: StrictBool = False
    endpoints: Annotated[tuple[EndpointIn, ...], _or_default(())] = ()
    # kube-proxy semantics (docs/services.md; meshd/selection.py decides)
    internal_traffic_policy: Policy = "Cluster"  # frontends on VIPs
    external_traffic_policy: Policy = "Cluster"  # node ports, external IPs, LB IPs (tc path)
    affinity_timeout_seconds: Annotated[StrictInt, _in_range(1, 86400)] = 10800
    external_ips: Annotated[tuple[IPAddr, ...], _or_default(())] = ()  # spec.externalIPs
    load_balancer_ips: Annotated[tuple[IPAddr, ...], _or_default(())] = ()  # LB ingress IPs
    load_balancer_source_ranges: Annotated[tuple[SourceRange, ...], _or_default(())] = ()
    health_check_node_port: PortNumber | None = None
    topology_mode: Annotated[StrictStr, AfterValidator(_text)] | None = None  # "Auto" = hints
    traffic_distribution: Annotated[StrictStr, AfterValidator(_text)] | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @model_validator(mode="after")
    def _endpoints_match_ports(self) -> ServiceIn:
        known = {p.name for p in self.ports}
        problems: list[str] = []
        backends: dict[tuple[str, IPAddress, int], int] = {}
        for i, ep in enumerate(self.endpoints):
            if not self.allow_local_endpoints and local_endpoint_problem(ep.address):
                problems.append(f"endpoints[{i}]: " + local_endpoint_reason(ep.address, self.key))
            for pname, number in ep.ports.items():
                if pname not in known:
                    problems.append(f"endpoints[{i}].ports: unknown port name {pname!r} "
                                    f"(service ports: {', '.join(sorted(known))})")
                elif (pname, ep.address, number) in backends:
                    problems.append(f"endpoints[{i}]: {_hostport(ep.address, number)} for port {pname!r} "
                                    f"duplicates endpoints[{backends[(pname, ep.address, number)]}]")
                else:
                    backends[(pname, ep.address, number)] = i
        if problems:
            raise _fail("endpoints", "{p}", p="; ".join(problems))
        return self


# ---- ValidationError -> one line -------------------------------------------------------------

_TYPE_WORDS = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "string_type": "a string",
    "bool_type": "true or false", "bool_parsing": "true or false", "model_type": "a mapping",
    "dict_type": "a mapping", "model_attributes_type": "a mapping", "list_type": "a list",
    "tuple_type": "a list", "path_type": "a path", "finite_number": "a finite number",
}
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def format_loc(loc: Sequence[int | str]) -> str:
    """('ports', 0, 'port') -> 'ports[0].port'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _PLAIN_KEY.fullmatch(part):
            out += f"[{show(part)}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def did_you_mean(word: object, valid: Iterable[str]) -> str:
    """' (did you mean 'port'?)' or ''."""
    close = difflib.get_close_matches(str(word), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unwrap(t: Any) -> Any:
    while True:
        if get_origin(t) is Annotated:
            t = get_args(t)[0]
        elif get_origin(t) in (Union, types.UnionType):
            args = [a for a in get_args(t) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            t = models[0] if models else args[0]
        else:
            return t


def _model_at(root: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    t: Any = root
    for part in loc:
        t = _unwrap(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            field = t.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            t = field.annotation
        elif get_origin(t) in (list, tuple, set, frozenset) and isinstance(part, int):
            t = get_args(t)[0]
        elif get_origin(t) is dict:
            t = get_args(t)[1]
        else:
            return None
    t = _unwrap(t)
    return t if isinstance(t, type) and issubclass(t, BaseModel) else None


def _message(err: Any, root: type[BaseModel], hide_input: bool) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    got = "" if hide_input or "input" not in err else f" (got {show(err['input'])})"
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        model = _model_at(root, err["loc"][:-1])
        valid = list(model.model_fields) if model else []
        return (f"unknown key{did_you_mean(err['loc'][-1], valid)}"
                + (f"; valid keys: {', '.join(valid)}" if valid else ""))
    if kind in _TYPE_WORDS:
        return f"must be {_TYPE_WORDS[kind]}{got}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected', 'one of the allowed values')}{got}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op, bound = next((_BOUNDS[k], v) for k, v in ctx.items() if k in _BOUNDS)
        return f"must be {op} {bound}{got}"
    msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if set(ctx) == {"msg"}:  # our own PydanticCustomError: already worded for users
        return msg
    return (msg[:1].lower() + msg[1:] + got).replace("\n", " ")


def explain_errors(exc: ValidationError, root: type[BaseModel],
                   secret_keys: frozenset[str] = frozenset()) -> list[tuple[tuple[int | str, ...], str]]:
    """[(loc, message)] per pydantic error, worded for users; values under `secret_keys` are not echoed."""
    out = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        if err["type"] == "invalid_key":
            out.append((loc[:-1], f"key {show(loc[-1])}: keys must be strings"))
            continue
        # a bad dict key: name the key, not a path through it (a record may also have a
        # literal "[key]" key: that is an unknown key, reported as such below)
        if len(loc) >= 2 and loc[-1] == "[key]" and err["type"] != "extra_forbidden":
            out.append((loc[:-2], f"key {show(loc[-2])}: {_message(err, root, True)}"))
            continue
        out.append((loc, _message(err, root, any(p in secret_keys for p in loc))))
    return out


def _reason(exc: ValidationError, root: type[BaseModel], limit: int = 6) -> str:
    parts = [f"{format_loc(loc)}: {msg}" if loc else msg for loc, msg in explain_errors(exc, root)]
    more = f"; (+{len(parts) - limit} more)" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more


def parse_service(data: object, where: str) -> Service:
    """Validate one raw service record; RecordError(where, one-line reason) if it is bad."""
    try:
        return _service(ServiceIn.model_validate(data))
    except ValidationError as e:
        raise RecordError(where, _reason(e, ServiceIn)) from None


def parse_endpoint(data: object, where: str) -> Endpoint:
    """Validate one raw endpoint record on its own (etcd stores endpoints separately)."""
    try:
        return _endpoint(EndpointIn.model_validate(data))
    except ValidationError as e:
        raise RecordError(where, _reason(e, EndpointIn)) from None


# ---- validated model -> kept record ----------------------------------------------------------
# Values many records repeat are shared: one object per distinct value. The caches only grow
# with distinct values (port specs, zone-hint lists), bounded by records.share.
_shared: dict[object, object] = {}


def _one(value):
    return share(_shared, value)


def _port(p: PortIn) -> PortSpec:
    d = p.__dict__
    return _one(PortSpec._make(d["name"], d["port"], intern(d["protocol"]), d["node_port"]))


def _endpoint(m: EndpointIn) -> Endpoint:
    d = m.__dict__
    hints = d["hints_for_zones"]
    if hints is not None:
        hints = _one(tuple(map(intern, hints)))
    return Endpoint._make(d["address"], d["ports"], d["weight"], intern(d["zone"]),
                          intern(d["node"]), d["ready"], d["serving"], d["terminating"], hints)


def _service(m: ServiceIn) -> Service:
    d = m.__dict__
    return Service._make(
        intern(d["namespace"]), d["name"], d["vips"], _one(tuple(map(_port, d["ports"]))),
        intern(d["session_affinity"]), _one(d["lb"]), d["allow_local_endpoints"],
        tuple(map(_endpoint, d["endpoints"])), intern(d["internal_traffic_policy"]),
        intern(d["external_traffic_policy"]), d["affinity_timeout_seconds"], d["external_ips"],
        d["load_balancer_ips"], d["load_balancer_source_ranges"], d["health_check_node_port"],
        intern(d["topology_mode"]), intern(d["traffic_distribution"]))


def _check_mirror(kept: type[Record], model: type[BaseModel]) -> None:
    """The kept record has exactly the validated model's fields, in its order."""
    if tuple(kept._fields) != tuple(model.model_fields):
        raise TypeError(f"{kept.__name__}._fields {kept._fields} != {model.__name__} fields "
                        f"{tuple(model.model_fields)}")


for _kept, _model, _conv in ((PortSpec, PortIn, _port), (Endpoint, EndpointIn, _endpoint),
                             (Service, ServiceIn, _service)):
    _check_mirror(_kept, _model)
    _kept._validate = staticmethod(lambda data, _m=_model, _c=_conv: _c(_m.model_validate(data)))


# ---- cross-record checks ---------------------------------------------------------------------

def _hostport(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def _by_key_then_content(services: Iterable[Service]) -> list[Service]:
    """Sorted by (key, JSON content); the JSON only for keys that occur more than once
    (serialising 10,000 services costs ~0.3 s on every full validation)."""
    out = sorted(services, key=lambda s: s.key)
    i = 0
    while i < len(out):
        j = i + 1
        while j < len(out) and out[j].key == out[i].key:
            j += 1
        if j - i > 1:
            out[i:j] = sorted(out[i:j], key=lambda s: s.model_dump_json())
        i = j
    return out


NODE_PORT_RANGE = (30000, 32767)  # the default of node_ports.range (as Kubernetes)


def check_services(services: Iterable[Service], service_cidrs: Sequence[IPNetwork],
                   forbidden: Iterable[IPAddress | str] = (),
                   node_port_range: tuple[int, int] = NODE_PORT_RANGE,
                   external_ip_cidrs: Sequence[IPNetwork] = (),
                   ) -> tuple[list[Service], list[RecordError]]:
    """Keep services whose VIPs all lie in `service_cidrs`, are not `forbidden` (node/etcd
    addresses), whose node ports lie in `node_port_range`, and whose (vip, port, protocol)
    frontends and (node_port, protocol) are free. Services are processed in (key, content)
    order, so the same set always yields the same winners; identical duplicates are merged
    silently. Returns (kept in that order, errors with where=service key).

    External addresses never reject a service: an external IP outside `external_ip_cidrs`
    (CVE-2020-8554: anyone who can write a service could otherwise capture any address), or
    an external / load-balancer IP that is forbidden, loopback, or taken by another service,
    is dropped from the kept service with an error naming it; its VIPs keep serving."""
    cidrs = tuple(service_cidrs)
    ext_cidrs = tuple(external_ip_cidrs)
    banned = {ip_address(str(a)) for a in forbidden}
    owner: dict[tuple[IPAddress | None, int, str], str] = {}  # None: a node port
    hc_owner: dict[int, str] = {}
    kept: dict[str, Service] = {}
    errors: list[RecordError] = []
    for svc in _by_key_then_content(services):
        if svc.key in kept:
            if kept[svc.key] != svc:
                errors.append(RecordError(svc.key, "conflicting definitions from more than one "
                                          "source; another definition was kept"))
            continue
        problems: list[str] = []
        for vip in svc.vips:
            if not any(vip in net for net in cidrs):
                problems.append(f"vip {vip} is outside service_cidrs "
                                f"({', '.join(map(str, cidrs)) or 'none configured'})")
            if vip in banned:
                problems.append(f"vip {vip} is an address of this node or of etcd; pick another VIP")
        lo, hi = node_port_range
        for p in svc.ports:
            if p.node_port is not None and not lo <= p.node_port <= hi:
                problems.append(f"port {p.name!r}: node_port {p.node_port} is outside "
                                f"node_ports.range ({lo}-{hi})")
        hc = svc.health_check_node_port
        if hc is not None:
            if svc.external_traffic_policy != "Local":
                problems.append("health_check_node_port is only for external_traffic_policy "
                                "Local (a node without local endpoints answers 503)")
            elif hc in hc_owner:
                problems.append(f"health_check_node_port {hc} already used by service "
                                f"{hc_owner[hc]}")
        taken: dict[str, list[str]] = {}
        for vip in svc.vips:
            for p in svc.ports:
                other = owner.get((vip, p.port, p.protocol))
                if other:
                    taken.setdefault(other, []).append(f"{_hostport(vip, p.port)}/{p.protocol}")
        for p in svc.ports:
            other = owner.get((None, p.node_port, p.protocol)) if p.node_port else None
            if other:
                taken.setdefault(other, []).append(f"node_port {p.node_port}/{p.protocol}")
        for other, fronts in taken.items():
            problems.append(f"frontend{'s' if len(fronts) > 1 else ''} {', '.join(fronts)} "
                            f"already used by service {other}")
        if problems:
            errors.append(RecordError(svc.key, "; ".join(problems)))
            continue
        kept[svc.key] = svc
        if hc is not None:
            hc_owner[hc] = svc.key
        owner.update({(vip, p.port, p.protocol): svc.key for vip in svc.vips for p in svc.ports})
        owner.update({(None, p.node_port, p.protocol): svc.key for p in svc.ports if p.node_port})
    # External and LB IPs second, once every VIP and node port is claimed: an external
    # address never takes a frontend from another service's VIP (it is dropped instead)
    for key, svc in kept.items():
        if not (svc.external_ips or svc.load_balancer_ips):
            continue
        svc, dropped = _external_addresses(svc, ext_cidrs, banned, owner)
        errors += [RecordError(svc.key, why) for why in dropped]
        kept[key] = svc
        owner.update({(a, p.port, p.protocol): svc.key for a in
                      (*svc.external_ips, *svc.load_balancer_ips) for p in svc.ports})
    return list(kept.values()), errors


def _external_addresses(svc: Service, ext_cidrs, banned, owner) -> tuple[Service, list[str]]:
    """`svc` without the external / LB IPs it may not use, and why each was dropped."""
    why: list[str] = []

    def usable(addr: IPAddress, what: str, need_cidr: bool) -> bool:
        if need_cidr and not any(addr.version == n.version and addr in n for n in ext_cidrs):
            why.append(f"{what} {addr} dropped: outside external_ip_cidrs "
                       f"({', '.join(map(str, ext_cidrs)) or 'none configured'}); the rest of "
                       "the service is served")
            return False
        if addr in banned or addr.is_loopback or addr.is_link_local:
            why.append(f"{what} {addr} dropped: an address of this node, of etcd, loopback or "
                       "link-local may not be a service address")
            return False
        if svc.vips and addr in svc.vips:
            why.append(f"{what} {addr} dropped: it is also a VIP of the service")
            return False
        others = {owner.get((addr, p.port, p.protocol)) for p in svc.ports} - {None, svc.key}
        if others:
            why.append(f"{what} {addr} dropped: already used by service {', '.join(sorted(others))}")
            return False
        return True

    ext = tuple(a for a in svc.external_ips if usable(a, "external_ip", True))
    lbs = tuple(a for a in svc.load_balancer_ips
                if a in ext or usable(a, "load_balancer_ip", False))
    if ext == svc.external_ips and lbs == svc.load_balancer_ips:
        return svc, why
    return svc.model_copy(update={"external_ips": ext, "load_balancer_ips": lbs}), why
