"""The static services file: a YAML mapping whose `services:` list holds service records
(same shape as in etcd, endpoints inline under `endpoints:`) and whose optional `policies:`
list holds authorization policy records (meshd.policy_model; same shape as in etcd).

Owns reading that file into a StaticSnapshot. Each entry is validated on its own: a bad entry
becomes a RecordError and is skipped, the good ones still load. Only structural problems (file
missing or unreadable, not YAML, no `services:` list) raise RegistryError. Cross-record checks
(service_cidrs, frontend collisions) are not done here: the daemon runs model.check_services
after merging every source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meshd.config import YamlFileError, read_yaml
from meshd.errors import RecordError, RegistryError
from meshd.model import Service, did_you_mean, parse_service, show
from meshd.policy_model import parse_policy
from meshd.records import Policy

TOP_LEVEL_KEYS = ("services", "policies")


@dataclass(frozen=True)
class StaticSnapshot:
    services: tuple[Service, ...]
    errors: tuple[RecordError, ...]
    policies: tuple[Policy, ...] = ()


def _entries(doc: object, path: Path, key: str = "services") -> list[object]:
    """The raw `services:` (or `policies:`) list, or RegistryError saying what the file should
    look like."""
    shape = "a mapping with a 'services:' list of service records"
    if doc is None:
        raise RegistryError(f"services file {path}: the file is empty; expected {shape}")
    if isinstance(doc, list):
        raise RegistryError(f"services file {path}: the top level is a list; put it under 'services:'")
    if not isinstance(doc, dict):
        raise RegistryError(f"services file {path}: expected {shape} (got {show(doc)})")
    unknown = [k for k in doc if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise RegistryError(f"services file {path}: unknown top-level key {show(unknown[0])}"
                            f"{did_you_mean(unknown[0], TOP_LEVEL_KEYS)}; the keys are 'services' and "
                            "'policies'")
    if "services" not in doc and "policies" not in doc:
        raise RegistryError(f"services file {path}: no 'services:' key; expected {shape}")
    entries = doc.get(key)
    if entries is None:  # absent, or `services:` with every entry commented out
        return []
    if not isinstance(entries, list):
        what = "service" if key == "services" else "policy"
        raise RegistryError(f"services file {path}: '{key}' must be a list of {what} records "
                            f"(got {type(entries).__name__})")
    return entries


def _where(path: Path, i: int, entry: object, key: str = "services") -> str:
    where = f"{path}: {key}[{i}]"
    if isinstance(entry, dict):
        ns, name = entry.get("namespace"), entry.get("name")
        if isinstance(ns, str) or isinstance(name, str):
            where += f" ({ns if isinstance(ns, str) else '?'}/{name if isinstance(name, str) else '?'})"
    return where


def load_services_file(path: Path) -> StaticSnapshot:
    """Read the services file. Good entries load even when others are bad; the first valid
    definition of a namespace/name wins and later ones are errors naming its position."""
    path = Path(path)
    try:
        doc = read_yaml(path)
    except YamlFileError as e:
        raise RegistryError(f"services file {path}: {e}") from None
    services: list[Service] = []
    errors: list[RecordError] = []
    first: dict[str, int] = {}
    for i, entry in enumerate(_entries(doc, path)):
        where = _where(path, i, entry)
        try:
            svc = parse_service(entry, where=where)
        except RecordError as e:
            errors.append(e)
            continue
        if svc.key in first:
            errors.append(RecordError(where, f"duplicate service {svc.key}; first defined at "
                                      f"services[{first[svc.key]}]"))
            continue
        first[svc.key] = i
        services.append(svc)
    policies: list[Policy] = []
    first.clear()
    for i, entry in enumerate(_entries(doc, path, "policies")):
        where = _where(path, i, entry, "policies")
        try:
            pol = parse_policy(entry, where=where)
        except RecordError as e:
            errors.append(e)
            continue
        if pol.key in first:
            errors.append(RecordError(where, f"duplicate policy {pol.key}; first defined at "
                                      f"policies[{first[pol.key]}]"))
            continue
        first[pol.key] = i
        policies.append(pol)
    return StaticSnapshot(services=tuple(services), errors=tuple(errors), policies=tuple(policies))
