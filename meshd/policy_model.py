"""Validation of authorization policy records (pure: stdlib + pydantic, no I/O).

A policy record (etcd `<prefix>policies/<namespace>/<name>`, or an entry of the services
file's `policies:` list) is checked by the pydantic models below, which reject unknown keys
(with a did-you-mean) and word every problem as meshd.model does for services; what is kept
is the slim, frozen meshd.records.Policy (with Selector and Target items). The shape:

    namespace: default
    name: web-to-db
    action: allow                 # allow (default) | deny
    from:                         # an empty list selects nothing
      - cgroup: /system.slice/web.service   # exact path below the cgroup2 mount
      - cgroup: /lab/clients/               # ends in '/': every cgroup below it
      - unit: web.service                   # a systemd unit (and everything below it)
        uid: 1000                           # optional on any item
    to:
      - service: db               # in the policy's namespace, or "ns/name"
        ports: [5432, "http"]     # optional: numbers or port names; default every port

parse_policy(data, where) -> Policy, or RecordError(where, one-line reason).
What the records mean (who may connect where) is meshd.policy's.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, PlainValidator, StrictInt, StrictStr, ValidationError, create_model, \
    model_validator

from meshd.errors import RecordError
from meshd.model import DnsLabel, StrictModel, _fail, _in_range, _or_default, _reason, show
from meshd.records import Policy, Selector, Target, intern

UID_MAX = 2**32 - 2  # 2^32-1 is (uid_t)-1, "no uid", and the verdict map's MESHD_UID_ANY
PATH_MAX = 4096
_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_SERVICE = re.compile(rf"(?:({_LABEL})/)?({_LABEL})")
_PORT_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,13}[a-z0-9])?")


def _cgroup_path(v: str) -> str:
    if not v.startswith("/"):
        raise _fail("cgroup", "must be a path below the cgroup2 mount starting with '/', such as "
                    "/system.slice/web.service (got {got})", got=show(v))
    if len(v) > PATH_MAX or any(not c.isprintable() for c in v):
        raise _fail("cgroup", "must be at most {n} printable characters (got {got})", n=PATH_MAX,
                    got=show(v))
    parts = v[1:-1].split("/") if v.endswith("/") else v[1:].split("/")
    if v != "/" and any(p in ("", ".", "..") for p in parts):
        raise _fail("cgroup", "must not contain '//', '.' or '..' components: write the path as "
                    "the kernel shows it, e.g. /system.slice/web.service (got {got})", got=show(v))
    return v


def _unit(v: str) -> str:
    if not 1 <= len(v) <= 255 or v in (".", "..") or "/" in v or \
            any(not c.isprintable() or c.isspace() for c in v):
        raise _fail("unit", "must be a systemd unit name such as web.service (1-255 printable "
                    "characters, no '/' or spaces; for a path use `cgroup:`) (got {got})", got=show(v))
    return v


def _service(v: str) -> str:
    if not _SERVICE.fullmatch(v):
        raise _fail("service", "must be a service name, or namespace/name, of 1-63 lowercase "
                    "letters, digits or '-' each (got {got})", got=show(v))
    return v


def _port(v: object) -> int | str:
    if type(v) is int:
        if not 1 <= v <= 65535:
            raise _fail("range", "port numbers must be 1-65535 (got {got})", got=v)
        return v
    if type(v) is str:
        if not _PORT_NAME.fullmatch(v):
            raise _fail("name", "must be a port number 1-65535 or a port name (1-15 lowercase "
                        "letters, digits or '-') (got {got})", got=show(v))
        return intern(v)  # type: ignore[return-value]
    raise _fail("port", "must be a port number 1-65535 or a port name (got {got})", got=show(v))


def _ports(v: tuple[int | str, ...] | None) -> tuple[int | str, ...] | None:
    if v is None:
        return None
    if not v:
        raise _fail("empty", "must list at least one port; leave `ports` out for every port")
    if len(set(v)) != len(v):
        dup = next(p for i, p in enumerate(v) if p in v[:i])
        raise _fail("duplicate", "lists port {p!r} twice", p=dup)
    return v


class SelectorIn(StrictModel):
    """One `from` item."""
    cgroup: Annotated[StrictStr, AfterValidator(_cgroup_path)] | None = None
    unit: Annotated[StrictStr, AfterValidator(_unit)] | None = None
    uid: Annotated[StrictInt, _in_range(0, UID_MAX)] | None = None

    @model_validator(mode="after")
    def _one_workload(self) -> SelectorIn:
        if (self.cgroup is None) == (self.unit is None):
            raise _fail("selector", "needs exactly one of `cgroup` (a path) or `unit` (a systemd "
                        "unit name){both}", both=" (got both)" if self.cgroup is not None else "")
        return self


class TargetIn(StrictModel):
    """One `to` item."""
    service: Annotated[StrictStr, AfterValidator(_service)]
    ports: Annotated[tuple[Annotated[int | str, PlainValidator(_port)], ...] | None,
                     AfterValidator(_ports)] = None


def _targets(v: tuple[TargetIn, ...]) -> tuple[TargetIn, ...]:
    if not v:
        raise _fail("empty", "must list at least one target, such as `- service: db`")
    return v


# `from` is a Python keyword: the model is made with create_model so that its field (and so
# every error location and the valid-key list of an unknown-key error) is spelled `from`.
PolicyIn = create_model(
    "PolicyIn", __base__=StrictModel, __doc__="A policy record (validation; kept as meshd.records.Policy).",
    namespace=(DnsLabel, ...),
    name=(DnsLabel, ...),
    action=(Annotated[Literal["allow", "deny"], _or_default("allow")], "allow"),
    **{"from": (tuple[SelectorIn, ...], ...)},
    to=(Annotated[tuple[TargetIn, ...], AfterValidator(_targets)], ...),
)


def _selector(m: SelectorIn) -> Selector:
    d = m.__dict__
    return Selector._make(d["cgroup"], d["unit"], d["uid"])


def _policy(m: Any) -> Policy:
    d = m.__dict__
    ns = intern(d["namespace"])
    targets = tuple(Target._make(t.service if "/" in t.service else f"{ns}/{t.service}", t.ports)
                    for t in d["to"])
    return Policy._make(ns, d["name"], intern(d["action"]), tuple(map(_selector, d["from"])), targets)


def parse_policy(data: object, where: str) -> Policy:
    """Validate one raw policy record; RecordError(where, one-line reason) if it is bad."""
    if not isinstance(data, dict):
        raise RecordError(where, f"a policy record must be a mapping (got {show(data)})")
    try:
        return _policy(PolicyIn.model_validate(data))
    except ValidationError as e:
        raise RecordError(where, _reason(e, PolicyIn)) from None


def _validate_policy(data: dict[str, Any]) -> Policy:
    if "from_" in data and "from" not in data:  # Policy(from_=...) as well as Policy(**record)
        data = {("from" if k == "from_" else k): v for k, v in data.items()}
    return _policy(PolicyIn.model_validate(data))


Policy._validate = staticmethod(_validate_policy)
Selector._validate = staticmethod(lambda data: _selector(SelectorIn.model_validate(data)))
Target._validate = staticmethod(lambda data: Target._make(*TargetIn.model_validate(data).__dict__.values()))
