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


def _records(doc, path: Path, key: str, what: str, parse, errors: list[RecordError]) -> list:
    """The valid records of one top-level list; the bad ones and later duplicates of a
    namespace/name go to `errors`, naming their position."""
    out: list = []
    first: dict[str, int] = {}
    for i, entry in enumerate(_entries(doc, path, key)):
        where = _where(path, i, entry, key)
        try:
            rec = parse(entry, where=where)
        except RecordError as e:
            errors.append(e)
            continue
        if rec.key in first:
            errors.append(RecordError(where, f"duplicate {what} {rec.key}; first defined at "
                                      f"{key}[{first[rec.key]}]"))
            continue
        first[rec.key] = i
        out.append(rec)
    return out


def load_services_file(path: Path) -> StaticSnapshot:
    """Read the services file. Good entries load even when others are bad; the first valid
    definition of a namespace/name wins and later ones are errors naming its position."""
    path = Path(path)
    try:
        doc = read_yaml(path)
    except YamlFileError as e:
        raise RegistryError(f"services file {path}: {e}") from None
    errors: list[RecordError] = []
    services = _records(doc, path, "services", "service", parse_service, errors)
    policies = _records(doc, path, "policies", "policy", parse_policy, errors)
    return StaticSnapshot(services=tuple(services), errors=tuple(errors), policies=tuple(policies))
