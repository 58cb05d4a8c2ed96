"""The static services file: a YAML mapping whose `services:` list holds service records
(same shape as in etcd, endpoints inline under `endpoints:`).

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

TOP_LEVEL_KEYS = ("services",)


@dataclass(frozen=True)
class StaticSnapshot:
    services: tuple[Service, ...]
    errors: tuple[RecordError, ...]


def _entries(doc: object, path: Path) -> list[object]:
    """The raw `services:` list, or RegistryError saying what the file should look like."""
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
                            f"{did_you_mean(unknown[0], TOP_LEVEL_KEYS)}; the only key is 'services'")
    if "services" not in doc:
        raise RegistryError(f"services file {path}: no 'services:' key; expected {shape}")
    services = doc["services"]
    if services is None:  # `services:` with every entry commented out
        return []
    if not isinstance(services, list):
        raise RegistryError(f"services file {path}: 'services' must be a list of service records "
                            f"(got {type(services).__name__})")
    return services


def _where(path: Path, i: int, entry: object) -> str:
    where = f"{path}: services[{i}]"
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
    return StaticSnapshot(services=tuple(services), errors=tuple(errors))
