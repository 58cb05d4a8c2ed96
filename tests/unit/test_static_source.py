"""meshd.sources.static: bad entries are reported and skipped, good ones still load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from meshd.errors import RegistryError
from meshd.sources.static import StaticSnapshot, load_services_file

REPO = Path(__file__).resolve().parents[2]

GOOD = """
  - namespace: shop
    name: web
    vips: [10.96.0.10]
    ports: [{name: http, port: 80}]
    endpoints:
      - {address: 10.1.0.1, ports: {http: 8080}}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "services.yaml"
    p.write_text(text)
    return p


def test_example_services_file_loads() -> None:
    snap = load_services_file(REPO / "config" / "services.yaml")
    assert snap.errors == ()
    assert len(snap.services) == 2
    assert any(e.weight != 1 for s in snap.services for e in s.endpoints)
    assert any(p.protocol == "UDP" for s in snap.services for p in s.ports)


def test_good_file(tmp_path: Path) -> None:
    snap = load_services_file(write(tmp_path, "services:" + GOOD))
    assert [s.key for s in snap.services] == ["shop/web"] and snap.errors == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.services = ()  # type: ignore[misc]


def test_bad_entry_is_skipped_and_named_good_ones_still_load(tmp_path: Path) -> None:
    p = write(tmp_path, "services:" + """
  - namespace: shop
    name: broken
    vips: [10.96.0.11]
    ports: [{name: http, port: 70000}]
  - just a string
  - {name: nameless-ns}
""" + GOOD)
    snap = load_services_file(p)
    assert [s.key for s in snap.services] == ["shop/web"]
    assert [str(e) for e in snap.errors][0] == \
        f"{p}: services[0] (shop/broken): ports[0].port: must be 1-65535 (got 70000)"
    assert snap.errors[1].where == f"{p}: services[1]" and "must be a mapping" in snap.errors[1].reason
    assert snap.errors[2].where == f"{p}: services[2] (?/nameless-ns)"


def test_duplicate_service_names_the_first_position(tmp_path: Path) -> None:
    p = write(tmp_path, "services:" + GOOD + GOOD.replace("10.96.0.10", "10.96.0.20"))
    snap = load_services_file(p)
    assert len(snap.services) == 1 and str(snap.services[0].vips[0]) == "10.96.0.10"
    assert [str(e) for e in snap.errors] == [
        f"{p}: services[1] (shop/web): duplicate service shop/web; first defined at services[0]"]


def test_commented_out_services_list_is_empty(tmp_path: Path) -> None:
    assert load_services_file(write(tmp_path, "services:\n#  - namespace: a\n")) == StaticSnapshot((), ())
    assert load_services_file(write(tmp_path, "services: []\n")) == StaticSnapshot((), ())


@pytest.mark.parametrize("text,expect", [
    ("", "the file is empty"),
    ("- namespace: a\n", "the top level is a list; put it under 'services:'"),
    ("hello\n", "expected a mapping with a 'services:' list"),
    ("servics: []\n", "unknown top-level key 'servics' (did you mean 'services'?)"),
    ("{}\n", "no 'services:' key"),
    ("services: {a: 1}\n", "'services' must be a list of service records (got dict)"),
    ("services: [\n", "invalid YAML at line 2, column 1"),
    ("services: []\npolicies: {a: 1}\n", "'policies' must be a list of policy records (got dict)"),
    ("policy: []\n", "unknown top-level key 'policy' (did you mean 'policies'?)"),
    ("services: []\nservices: []\n", "duplicate key 'services'"),
])
def test_structural_problems_raise_registry_error(tmp_path: Path, text: str, expect: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(RegistryError) as exc:
        load_services_file(p)
    msg = str(exc.value)
    assert msg.startswith(f"services file {p}: ") and expect in msg and "\n" not in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no such file"):
        load_services_file(tmp_path / "absent.yaml")


POLICY = """
  - namespace: shop
    name: web-to-db
    from: [{unit: web.service}, {cgroup: /lab/clients/, uid: 1000}]
    to: [{service: db, ports: [5432]}]
"""


def test_policies_load_next_to_services_bad_ones_are_named_and_skipped(tmp_path: Path) -> None:
    p = write(tmp_path, "services:" + GOOD + "policies:" + POLICY + """
  - {namespace: shop, name: typo, from: [{cgroup: lab}], to: [{service: db}]}
  - {namespace: shop, name: web-to-db, action: deny, from: [], to: [{service: db}]}
  - 7
""")
    snap = load_services_file(p)
    assert [s.key for s in snap.services] == ["shop/web"]
    assert [x.key for x in snap.policies] == ["shop/web-to-db"] and snap.policies[0].action == "allow"
    assert snap.policies[0].to[0].service == "shop/db" and snap.policies[0].from_[1].uid == 1000
    assert [str(e) for e in snap.errors] == [
        f"{p}: policies[1] (shop/typo): from[0].cgroup: must be a path below the cgroup2 mount starting "
        "with '/', such as /system.slice/web.service (got 'lab')",
        f"{p}: policies[2] (shop/web-to-db): duplicate policy shop/web-to-db; first defined at policies[0]",
        f"{p}: policies[3]: a policy record must be a mapping (got 7)"]


def test_a_file_of_policies_only(tmp_path: Path) -> None:
    snap = load_services_file(write(tmp_path, "policies:" + POLICY))
    assert snap.services == () and len(snap.policies) == 1 and snap.errors == ()
