"""etcd records: the key schema, per-record checks and the incremental registry state.

Keys under the prefix (default /meshd/), values JSON:
    <prefix>services/<namespace>/<name>                   a service record, without `endpoints`
    <prefix>endpoints/<namespace>/<name>/<endpoint-id>    one endpoint of that service
    <prefix>policies/<namespace>/<name>                   an authorization policy (meshd.policy_model)

Owns the checks shared by the watching source (meshd.sources.etcd) and the write side
(meshd.registry), and RegistryState: the parsed records keyed by etcd key, changed one record
at a time, with cheap snapshots (only services whose records changed are composed again;
unchanged Service objects are handed out again, which the daemon relies on to skip them).
Pure: no I/O, no grpc.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import Any, NamedTuple

from meshd.errors import RecordError
from meshd.model import (Endpoint, Service, local_endpoint_problem, local_endpoint_reason, parse_endpoint,
                         parse_service, show)
from meshd.policy_model import parse_policy
from meshd.records import Policy

log = logging.getLogger("meshd.etcd")

MAX_VALUE_BYTES = 256 * 1024  # a record larger than this is rejected (etcd's own limit is 1.5 MiB)

ENDPOINT_ID = re.compile(r"[A-Za-z0-9._-]{1,253}")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")

# ---- key schema ------------------------------------------------------------------------------


def service_key(prefix: str, namespace: str, name: str) -> str:
    return f"{prefix}services/{namespace}/{name}"


def policy_key(prefix: str, namespace: str, name: str) -> str:
    return f"{prefix}policies/{namespace}/{name}"


def endpoints_prefix(prefix: str, namespace: str, name: str) -> str:
    return f"{prefix}endpoints/{namespace}/{name}/"


def endpoint_key(prefix: str, namespace: str, name: str, endpoint_id: str) -> str:
    return f"{prefix}endpoints/{namespace}/{name}/{endpoint_id}"


def key_text(key: bytes) -> str:
    """An etcd key for messages: UTF-8, undecodable bytes shown as \\xNN."""
    return key.decode("utf-8", "backslashreplace")


def label_problem(what: str, v: str) -> str | None:
    """Why `v` cannot be a namespace/name (the model's DNS-label rule), or None."""
    if len(v) <= 63 and _LABEL.fullmatch(v):
        return None
    return (f"{what} {show(v)} in the key must be 1-63 lowercase letters, digits or '-', starting "
            "and ending with a letter or digit")


def endpoint_id_problem(v: str) -> str | None:
    if ENDPOINT_ID.fullmatch(v):
        return None
    return f"endpoint id {show(v)} in the key must be 1-253 characters of A-Z a-z 0-9 . _ -"


class KeyInfo(NamedTuple):
    kind: str  # "service" | "endpoint" | "policy"
    namespace: str
    name: str
    endpoint_id: str | None

    @property
    def service(self) -> str:
        return f"{self.namespace}/{self.name}"


# The shape of every valid key below the prefix, matched at once (10^5 keys in a list); a key
# that does not match goes the long way, which says what is wrong with it.
_LABEL_B = rb"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_VALID_KEY = re.compile(rb"(services|endpoints|policies)/(%s)/(%s)(?:/([A-Za-z0-9._-]{1,253}))?"
                        % (_LABEL_B, _LABEL_B))
_KINDS = {b"services": "service", b"endpoints": "endpoint", b"policies": "policy"}


def classify_key(prefix: str, key: bytes) -> KeyInfo | None:
    """What a key under `prefix` holds. None: outside the services/, endpoints/ and policies/
    subtrees (not ours). RecordError: inside them but not of the schema's shape."""
    pre = prefix.encode()
    if not key.startswith(pre):
        return None
    raw = key[len(pre):]
    m = _VALID_KEY.fullmatch(raw)
    if m is not None and (m[1] == b"endpoints") == (m[4] is not None):
        eid = m[4]
        return KeyInfo(_KINDS[m[1]], m[2].decode(), m[3].decode(), None if eid is None else eid.decode())
    head = raw.split(b"/", 1)[0]
    if head not in _KINDS:
        return None
    where = key_text(key)
    try:
        rest = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(where, f"key is not UTF-8 (bad byte at offset {len(pre) + e.start})") from None
    parts = rest.split("/")
    if head in (b"services", b"policies"):
        kind = _KINDS[head]
        if len(parts) != 3 or not all(parts):
            raise RecordError(where, f"malformed key: a {kind} lives at {prefix}{head.decode()}/<namespace>/<name>")
        problems = [p for p in (label_problem("namespace", parts[1]), label_problem("name", parts[2])) if p]
        if problems:
            raise RecordError(where, "; ".join(problems))
        return KeyInfo(kind, parts[1], parts[2], None)
    if len(parts) != 4 or not all(parts):
        raise RecordError(where, f"malformed key: an endpoint lives at "
                          f"{prefix}endpoints/<namespace>/<name>/<endpoint-id>")
    problems = [p for p in (label_problem("namespace", parts[1]), label_problem("name", parts[2]),
                            endpoint_id_problem(parts[3])) if p]
    if problems:
        raise RecordError(where, "; ".join(problems))
    return KeyInfo("endpoint", parts[1], parts[2], parts[3])


# ---- values ----------------------------------------------------------------------------------

class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false",
               type(None): "null"}


def decode_value(where: str, value: bytes) -> dict[str, Any]:
    """A record's bytes -> its JSON object; RecordError(where, reason) otherwise."""
    if len(value) > MAX_VALUE_BYTES:
        raise RecordError(where, f"value is {len(value)} bytes; a record may be at most {MAX_VALUE_BYTES}")
    if not value.strip():
        raise RecordError(where, "value is empty; expected a JSON object")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(where, f"value is not UTF-8 text (bad byte at offset {e.start})") from None
    try:
        data = _DECODER.decode(text)
    except _DuplicateKey as e:
        raise RecordError(where, f"value is not valid JSON: key {show(e.args[0])} appears twice") from None
    except json.JSONDecodeError as e:
        raise RecordError(where, f"value is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None
    except RecursionError:
        raise RecordError(where, "value is not valid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise RecordError(where, f"value is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RecordError(where, f"value must be a JSON object (got {_JSON_TYPES.get(type(data), 'JSON')})")
    return data


def endpoints_in_service_reason(prefix: str, namespace: str, name: str) -> str:
    return (f"'endpoints' is not allowed in a service record in etcd: each endpoint is its own key, "
            f"{endpoints_prefix(prefix, namespace, name)}<endpoint-id>")


def parse_service_value(prefix: str, info: KeyInfo, where: str, value: bytes) -> Service:
    """Validate the value of <prefix>services/<ns>/<name>; RecordError(where, reason) if bad."""
    data = decode_value(where, value)
    if "endpoints" in data:
        raise RecordError(where, endpoints_in_service_reason(prefix, info.namespace, info.name))
    svc = parse_service(data, where)
    if (svc.namespace, svc.name) != (info.namespace, info.name):
        raise RecordError(where, f"the key names service {info.service} but the record says "
                          f"{svc.namespace}/{svc.name}; they must match")
    return svc


def parse_endpoint_value(where: str, value: bytes) -> Endpoint:
    return parse_endpoint(decode_value(where, value), where)


def parse_policy_value(info: KeyInfo, where: str, value: bytes) -> Policy:
    """Validate the value of <prefix>policies/<ns>/<name>; RecordError(where, reason) if bad."""
    pol = parse_policy(decode_value(where, value), where)
    if (pol.namespace, pol.name) != (info.namespace, info.name):
        raise RecordError(where, f"the key names policy {info.service} but the record says "
                          f"{pol.key}; they must match")
    return pol


def check_record(prefix: str, key: bytes, value: bytes) -> tuple[KeyInfo, Service | Endpoint | Policy] | None:
    """Classify and validate one key/value on its own. None: not a meshd key. RecordError if bad.
    Never raises anything else (whatever the bytes)."""
    try:
        info = classify_key(prefix, key)
        if info is None:
            return None
        where = key_text(key)
        if info.kind == "service":
            return info, parse_service_value(prefix, info, where, value)
        if info.kind == "policy":
            return info, parse_policy_value(info, where, value)
        return info, parse_endpoint_value(where, value)
    except RecordError:
        raise
    except Exception as e:  # a bug or a pathological input: the record is skipped, not the source
        log.debug("etcd: unexpected error reading %s", key_text(key), exc_info=True)
        raise RecordError(key_text(key), f"could not be read ({type(e).__name__}: {e})") from None


def _hostport(ep: Endpoint, port: int) -> str:
    return f"[{ep.address}]:{port}" if isinstance(ep.address, IPv6Address) else f"{ep.address}:{port}"


# ---- state -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RegistrySnapshot:
    services: tuple[Service, ...]  # sorted by namespace/name; endpoints composed in, sorted by endpoint-id
    errors: tuple[RecordError, ...]  # sorted by etcd key
    revision: int  # etcd revision this snapshot reflects
    orphan_endpoints: int  # valid endpoint records with no valid service record
    # unix times of the changes this snapshot is the first to carry, as their source stamped
    # them (Kubernetes: EndpointSlice last-change-trigger-time), for the programming latency
    triggers: tuple[float, ...] = ()
    policies: tuple[Policy, ...] = ()  # valid policy records, sorted by namespace/name
    # service key -> its service in this snapshot, for every service that may differ from
    # the previous snapshot (the others are the same objects); None: unknown (services
    # came or went, or the first snapshot). Lets the daemon validate only what changed.
    updates: dict | None = None


class RegistryState:
    """The records under one prefix, parsed, keyed by etcd key. put/delete change one record and
    re-validate only it; snapshot() composes only the services whose records changed since the
    last snapshot, so a one-endpoint change costs the same with 10 or 10,000 services."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        # Memory matters here (10^5 records): neither keys nor values are kept. A valid
        # record is filed under its service key and endpoint id (its etcd key is made again
        # from them when needed: every part of a valid key is ASCII), and a put whose record
        # equals the one filed changes nothing (so a re-list converges without touching an
        # unchanged service; it parses every value again, which a re-list after compaction
        # can afford, a copy of 10^5 keys and value hashes -- ~17 MB -- it could not).
        self._errors: dict[bytes, RecordError] = {}  # records that failed on their own
        self._services: dict[str, Service] = {}  # "ns/name" -> valid service record (no endpoints)
        self._endpoints: dict[str, dict[str, Endpoint]] = {}  # "ns/name" -> endpoint id -> endpoint
        self._policies: dict[str, Policy] = {}  # "ns/name" -> valid policy record
        self._policies_out: tuple[Policy, ...] | None = ()
        # composed output, kept between snapshots
        self._composed: dict[str, Service] = {}
        self._compose_errors: dict[str, tuple[RecordError, ...]] = {}
        self._orphans: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._order: list[str] = []
        self._index: dict[str, int] = {}
        self._slots: list[Service] = []
        self._order_stale = True
        self._patched: set[str] = set()
        self._services_out: tuple[Service, ...] = ()
        self._errors_out: tuple[RecordError, ...] | None = ()

    def __len__(self) -> int:
        return len(self._errors) + len(self._services) + len(self._policies) + \
            sum(map(len, self._endpoints.values()))

    # -- changes --
    def put(self, key: bytes, value: bytes) -> bool:
        """Apply a put; False if nothing changed (an equal record, or a key that is not ours)."""
        try:
            checked = check_record(self.prefix, key, value)
        except RecordError as e:
            old = self._errors.get(key)
            if old is not None and old.reason == e.reason:
                return False
            self._forget(key)
            self._errors[key] = e
            self._errors_out = None
            return True
        if checked is None:
            log.debug("etcd: ignoring %s: not under %sservices/, endpoints/ or policies/", key_text(key),
                      self.prefix)
            return False
        info, record = checked
        skey = sys.intern(info.service)  # one string per service in every index below
        if info.kind == "policy":
            assert isinstance(record, Policy)
            if self._policies.get(skey) == record:
                return False
            if key in self._errors:
                self._forget(key, info)
            self._policies[skey] = record
            self._policies_out = None
            return True
        if info.kind == "service":
            assert isinstance(record, Service)
            if self._services.get(skey) == record:
                return False
            if key in self._errors:  # (a valid record replaces a valid one in place)
                self._forget(key, info)
            self._services[skey] = record
        else:
            assert isinstance(record, Endpoint) and info.endpoint_id is not None
            eps = self._endpoints.get(skey)
            if eps is not None and eps.get(info.endpoint_id) == record:
                return False
            if key in self._errors:
                self._forget(key, info)
            self._endpoints.setdefault(skey, {})[info.endpoint_id] = record
        self._dirty.add(skey)
        return True

    def delete(self, key: bytes) -> bool:
        return self._forget(key)

    def replace(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        """Converge to exactly these key/values (a full list): keys not listed are deleted,
        a record equal to the one held changes nothing."""
        for _ in self.replace_steps(items, step=0):
            pass

    def replace_steps(self, items: Iterable[tuple[bytes, bytes]], step: int = 2000) -> Iterable[None]:
        """replace() in slices of `step` records (yields between them, so a caller on an event loop
        can let other tasks run; step=0: no pauses). Do not snapshot until it is exhausted."""
        new = dict(items)
        n = 0
        self.retain(new)
        for key, value in new.items():
            self.put(key, value)
            n += 1
            if step and n % step == 0:
                yield

    def keys(self) -> Iterable[bytes]:
        """Every key that holds a record (valid or not)."""
        yield from self._errors
        pre = self.prefix
        for skey in self._services:
            yield f"{pre}services/{skey}".encode()
        for skey, eps in self._endpoints.items():
            for eid in eps:
                yield f"{pre}endpoints/{skey}/{eid}".encode()
        for skey in self._policies:
            yield f"{pre}policies/{skey}".encode()

    def retain(self, keys: set[bytes] | dict[bytes, object]) -> None:
        """Delete every key not in `keys` (after a full list: what it did not list is gone)."""
        for key in [k for k in self.keys() if k not in keys]:
            self.delete(key)

    def _forget(self, key: bytes, info: KeyInfo | None = None) -> bool:
        """Remove what the key's previous value contributed; False if it had none."""
        if self._errors.pop(key, None) is not None:
            self._errors_out = None
            return True  # a record that failed on its own contributed nothing else
        if info is None:
            try:
                info = classify_key(self.prefix, key)
            except RecordError:
                return False  # not a valid key: only ever filed under _errors
            if info is None:
                return False
        skey = info.service
        if info.kind == "policy":
            if self._policies.pop(skey, None) is None:
                return False
            self._policies_out = None
            return True
        if info.kind == "service":
            if self._services.pop(skey, None) is None:
                return False
        else:
            eps = self._endpoints.get(skey)
            if eps is None or eps.pop(info.endpoint_id or "", None) is None:
                return False
            if not eps:
                del self._endpoints[skey]
        self._dirty.add(skey)
        return True

    # -- output --
    def _compose(self, skey: str) -> None:
        svc = self._services.get(skey)
        eps = self._endpoints.get(skey, {})
        if self._compose_errors.pop(skey, None):
            self._errors_out = None
        if svc is None:
            if self._composed.pop(skey, None) is not None:
                self._order_stale = True
            if eps:
                self._orphans[skey] = len(eps)
            else:
                self._orphans.pop(skey, None)
            return
        self._orphans.pop(skey, None)
        known = {p.name for p in svc.ports}
        backends: dict[tuple[str, tuple[int, int], int], str] = {}
        kept: list[Endpoint] = []
        problems: list[RecordError] = []
        ns, name = skey.split("/")
        at = lambda eid: endpoint_key(self.prefix, ns, name, eid)  # noqa: E731  (ids are ASCII)
        for eid in sorted(eps):
            ep = eps[eid]
            unknown = () if known.issuperset(ep.ports) else sorted(p for p in ep.ports if p not in known)
            if unknown:
                problems.append(RecordError(at(eid), f"ports: unknown port name {show(unknown[0])} "
                                            f"(service {skey} has ports: {', '.join(sorted(known))})"))
                continue
            if not svc.allow_local_endpoints and local_endpoint_problem(ep.address):
                problems.append(RecordError(at(eid), local_endpoint_reason(ep.address, skey)))
                continue
            # keyed by the address' int and family: hashing an ip_address object runs Python
            # code (hex() of the int), 3x per endpoint here
            addr = (ep.address._ip, ep.address._version)
            dup = next(((p, n) for p, n in ep.ports.items() if (p, addr, n) in backends), None)
            if dup is not None:
                p, n = dup
                problems.append(RecordError(at(eid), f"{_hostport(ep, n)} for port {p!r} duplicates "
                                            f"endpoint {backends[(p, addr, n)]} of service {skey}"))
                continue
            for p, n in ep.ports.items():
                backends[(p, addr, n)] = eid
            kept.append(ep)
        if problems:
            self._compose_errors[skey] = tuple(problems)
            self._errors_out = None
        composed = svc.model_copy(update={"endpoints": tuple(kept)})
        if skey not in self._composed:
            self._order_stale = True
        self._composed[skey] = composed
        self._patched.add(skey)

    def snapshot(self, revision: int) -> RegistrySnapshot:
        for skey in self._dirty:
            self._compose(skey)
        self._dirty.clear()
        updates: dict | None = None
        if self._order_stale:
            self._order = sorted(self._composed)
            self._index = {k: i for i, k in enumerate(self._order)}
            self._slots = [self._composed[k] for k in self._order]
            self._services_out = tuple(self._slots)
            self._order_stale = False
        else:
            updates = {skey: self._composed[skey] for skey in self._patched}
            if self._patched:
                for skey in self._patched:
                    self._slots[self._index[skey]] = self._composed[skey]
                self._services_out = tuple(self._slots)
        self._patched.clear()
        if self._errors_out is None:
            errs = list(self._errors.values())
            for group in self._compose_errors.values():
                errs.extend(group)
            errs.sort(key=lambda e: e.where)
            self._errors_out = tuple(errs)
        if self._policies_out is None:
            self._policies_out = tuple(self._policies[k] for k in sorted(self._policies))
        return RegistrySnapshot(services=self._services_out, errors=self._errors_out, revision=revision,
                                orphan_endpoints=sum(self._orphans.values()), policies=self._policies_out,
                                updates=updates)
