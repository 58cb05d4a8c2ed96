"""The records the control plane keeps after validation: slim, frozen, slotted (pure).

meshd/model.py validates every record with pydantic (ServiceIn, EndpointIn, PortIn) and
hands out these instead: at 10,000 services x 10 endpoints a pydantic model per endpoint
(an instance dict of 9 fields, ~360 B) is most of the registry's memory; a slotted object
of the same fields is ~110 B. Strings that repeat across records (namespace, node, zone,
protocol, policy words) are interned, and identical port specs and port mappings are one
object each, so what is left per endpoint is its own address.

They read like the pydantic models they replace: the same attribute names, `key`,
`is_serving`, `usable`, comparison and hashing by value, and `model_dump` /
`model_dump_json` / `model_copy(update=)` with pydantic's output (the record contract's
JSON shape). Constructing one directly (`PortSpec(name="http", port=80)`) validates it
through the pydantic model; `model_copy` does not (as pydantic's does not).
"""

from __future__ import annotations

import json
import sys
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, ClassVar

_intern = sys.intern


def intern(v: str | None) -> str | None:
    """The one shared copy of a string that many records repeat (None stays None)."""
    return None if v is None else _intern(v)


class Record:
    """Base: frozen, slotted, compared and hashed by its fields (`_fields`, in order).

    A subclass lists its fields in `_fields`; each is a slot, except those in `_packed`: they
    live together in one tuple in the slot `_rest`, one shared tuple per distinct combination
    (most endpoints have the same weight, conditions and no zone: one tuple for all of them),
    and read as properties."""

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()
    _packed: ClassVar[tuple[str, ...]] = ()
    _validate: ClassVar[Any] = None  # data -> record, set by meshd.model (the pydantic check)

    def __init__(self, **data: Any) -> None:
        made = type(self).model_validate(data)
        for f in self.__slots__:
            object.__setattr__(self, f, object.__getattribute__(made, f))

    @classmethod
    def model_validate(cls, data: Any):
        if cls._validate is None:
            raise TypeError(f"{cls.__name__}: meshd.model is not imported")
        return cls._validate(data)

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        own = tuple(f for f in cls._fields if f not in cls._packed)
        want = own + (("_rest",) if cls._packed else ())
        if tuple(cls.__dict__.get("__slots__", ())) != want:
            raise TypeError(f"{cls.__name__}.__slots__ must be {want}")
        for i, f in enumerate(cls._packed):
            setattr(cls, f, property(lambda self, i=i: self._rest[i], doc=f"(packed field {f})"))
        # _make(*values): one slot store per field through its descriptor (10^5 endpoints)
        env: dict[str, Any] = {f"_s_{f}": cls.__dict__[f].__set__ for f in want}
        env["_new"], env["_share"] = object.__new__, _share_rest
        body = "".join(f"    _s_{f}(o, {f})\n" for f in own)
        if cls._packed:
            body += f"    _s__rest(o, _share(({', '.join(cls._packed)},)))\n"
        exec(f"def _make(cls, {', '.join(cls._fields)}):\n    o = _new(cls)\n{body}    return o\n", env)
        cls._make = classmethod(env["_make"])  # type: ignore[assignment]

    @classmethod
    def _make(cls, *values: Any):
        """A record from already-validated field values, in _fields order (no checks)."""
        raise NotImplementedError  # made per subclass by __init_subclass__

    def _values(self) -> tuple:
        return tuple(getattr(self, f) for f in self._fields)

    def __setattr__(self, name: str, value: Any) -> None:
        # what pydantic's frozen models raise, so callers see the same error as before
        from pydantic_core import ValidationError
        raise ValidationError.from_exception_data(type(self).__name__, [
            {"type": "frozen_instance", "loc": (name,), "input": value}])

    def __delattr__(self, name: str) -> None:
        self.__setattr__(name, None)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self is other or self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._values()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{f}={getattr(self, f)!r}' for f in self._fields)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self._values()))

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False):
        """A copy with some fields replaced (not validated, as pydantic's model_copy)."""
        values = dict(zip(self._fields, self._values()))
        for k, v in (update or {}).items():
            if k not in values:
                raise TypeError(f"{type(self).__name__} has no field {k!r}")
            values[k] = v
        return type(self)._make(*values.values())

    def model_dump(self, *, mode: str = "python", exclude: set[str] | frozenset[str] = frozenset()
                   ) -> dict[str, Any]:
        """The record as pydantic's model_dump gives it (mode "json": JSON-ready types)."""
        js = mode == "json"
        return {f: _dump(getattr(self, f), js) for f in self._fields if f not in exclude}

    def model_dump_json(self, *, exclude: set[str] | frozenset[str] = frozenset()) -> str:
        return json.dumps(self.model_dump(mode="json", exclude=exclude), separators=(",", ":"))


_SHARED_MAX = 1 << 16
_rests: dict[tuple, tuple] = {}


def share(cache: dict, value, key=None):
    """The one shared copy of `value` in `cache` (keyed by `key`, default the value itself).
    Past _SHARED_MAX distinct ones the cache starts over: that costs sharing, never
    correctness."""
    k = value if key is None else key
    got = cache.get(k)
    if got is None:
        if len(cache) >= _SHARED_MAX:
            cache.clear()
        got = cache[k] = value
    return got


def _share_rest(rest: tuple) -> tuple:
    """The one shared copy of a packed-fields tuple. Keyed with the types: 1 == True."""
    return share(_rests, rest, (rest, tuple(map(type, rest))))


def _rebuild(cls: type[Record], values: tuple) -> Record:
    return cls._make(*values)


def _dump(v: Any, js: bool) -> Any:
    if isinstance(v, Record) or hasattr(v, "model_dump"):
        return v.model_dump(mode="json" if js else "python")
    if isinstance(v, tuple):
        out = [_dump(x, js) for x in v]
        return out if js else tuple(out)
    if isinstance(v, dict):
        return {k: _dump(x, js) for k, x in v.items()}
    if js and isinstance(v, (IPv4Address, IPv6Address, IPv4Network, IPv6Network)):
        return str(v)
    return v


class PortSpec(Record):
    _fields = ("name", "port", "protocol", "node_port")
    __slots__ = _fields
    name: str
    port: int
    protocol: str  # "TCP" | "UDP"
    node_port: int | None  # NodePort: also served on the node's addresses at this number


class Endpoint(Record):
    """One backend. `ports` maps a service port name to the backend's port (a mapping
    shared by every endpoint with the same one: do not change it)."""

    _fields = ("address", "ports", "weight", "zone", "node", "ready", "serving", "terminating",
               "hints_for_zones")
    _packed = _fields[2:]
    __slots__ = ("address", "ports", "_rest")
    address: IPv4Address | IPv6Address
    ports: dict[str, int]
    weight: int
    zone: str | None
    node: str | None
    ready: bool
    serving: bool | None  # absent: follows `ready`
    terminating: bool
    hints_for_zones: tuple[str, ...] | None

    @property
    def is_serving(self) -> bool:
        return self.ready if self.serving is None else self.serving

    @property
    def usable(self) -> bool:
        """Gets new connections: ready, not terminating, weight > 0 (weight 0 = drained)."""
        return self.ready and not self.terminating and self.weight > 0


class Service(Record):
    _fields = ("namespace", "name", "vips", "ports", "session_affinity", "lb",
               "allow_local_endpoints", "endpoints", "internal_traffic_policy",
               "external_traffic_policy", "affinity_timeout_seconds", "external_ips",
               "load_balancer_ips", "load_balancer_source_ranges", "health_check_node_port",
               "topology_mode", "traffic_distribution")
    __slots__ = _fields
    namespace: str
    name: str
    vips: tuple
    ports: tuple[PortSpec, ...]
    session_affinity: str
    lb: Any  # meshd.model.LbSettings
    allow_local_endpoints: bool
    endpoints: tuple[Endpoint, ...]
    internal_traffic_policy: str
    external_traffic_policy: str
    affinity_timeout_seconds: int
    external_ips: tuple
    load_balancer_ips: tuple
    load_balancer_source_ranges: tuple
    health_check_node_port: int | None
    topology_mode: str | None
    traffic_distribution: str | None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# ---- authorization policies (validated by meshd.policy_model) --------------------------------

class Selector(Record):
    """One `from` item of a policy: exactly one of `cgroup` (a path relative to the cgroup2
    mount; ending in '/': every cgroup below it; '/' alone: every cgroup) or `unit` (a systemd
    unit: the cgroups whose path has this component, and all below), optionally one `uid`."""

    _fields = ("cgroup", "unit", "uid")
    __slots__ = _fields
    cgroup: str | None
    unit: str | None
    uid: int | None

    @property
    def workload(self) -> tuple[str, str]:
        """What selects the cgroups, without the uid: ("cgroup", path) or ("unit", name)."""
        return ("cgroup", self.cgroup) if self.cgroup is not None else ("unit", self.unit)  # type: ignore[return-value]


class Target(Record):
    """One `to` item: a service, always "namespace/name" once validated, and its ports
    (numbers or port names; None: every port)."""

    _fields = ("service", "ports")
    __slots__ = _fields
    service: str
    ports: tuple[int | str, ...] | None

    @property
    def namespace(self) -> str:
        return self.service.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.service.split("/", 1)[1]


class Policy(Record):
    """An L4 authorization policy. `from_` is the record's `from` (a Python keyword): it dumps
    as `from`, and `Policy(**record)` takes either spelling."""

    _fields = ("namespace", "name", "action", "from_", "to")
    __slots__ = _fields
    namespace: str
    name: str
    action: str  # "allow" | "deny"
    from_: tuple[Selector, ...]
    to: tuple[Target, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def model_dump(self, *, mode: str = "python", exclude: set[str] | frozenset[str] = frozenset()
                   ) -> dict[str, Any]:
        out = super().model_dump(mode=mode, exclude=exclude)
        return {("from" if k == "from_" else k): v for k, v in out.items()}
