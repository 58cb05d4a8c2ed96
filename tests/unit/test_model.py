"""meshd.model: record validation, readable reasons, cross-record checks."""

from __future__ import annotations

import copy
import json
import pickle
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from meshd.errors import RecordError
from meshd.model import (LbSettings, PortSpec, Service, check_services, local_endpoint_problem,
                         parse_endpoint, parse_service)

CIDRS = [ip_network("10.96.0.0/12"), ip_network("fd00:96::/108")]


def record(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "namespace": "shop", "name": "web", "vips": ["10.96.0.10"],
        "ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}],
        "endpoints": [{"address": "10.1.0.1", "ports": {"http": 8080}}],
    }
    base.update(over)
    return base


def reason(data: object) -> str:
    with pytest.raises(RecordError) as exc:
        parse_service(data, where="svc")
    assert exc.value.where == "svc"
    assert "\n" not in exc.value.reason and "pydantic" not in exc.value.reason
    return exc.value.reason


# ---- valid records and defaults --------------------------------------------------------------

def test_valid_record_parses_with_documented_defaults() -> None:
    svc = parse_service(record(), where="x")
    assert svc.key == "shop/web"
    assert svc.vips == (IPv4Address("10.96.0.10"),)
    assert svc.ports == (PortSpec(name="http", port=80, protocol="TCP"), PortSpec(name="dns", port=53, protocol="UDP"))
    assert svc.session_affinity == "None"
    assert svc.lb == LbSettings(algorithm="maglev")
    ep = svc.endpoints[0]
    assert (ep.weight, ep.ready, ep.terminating, ep.zone, ep.node) == (1, True, False, None, None)
    assert ep.ports == {"http": 8080}


def test_optional_sections_accept_empty_and_null() -> None:
    assert parse_service(record(lb={}), "x").lb.algorithm == "maglev"
    svc = parse_service(record(lb=None, endpoints=None, session_affinity=None), "x")
    assert (svc.lb, svc.endpoints, svc.session_affinity) == (LbSettings(), (), "None")
    assert parse_service(record(session_affinity="ClientIP"), "x").session_affinity == "ClientIP"


def test_services_are_immutable_hashable_and_comparable() -> None:
    a, b = parse_service(record(), "x"), parse_service(record(), "y")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert parse_service(record(name="other"), "x") != a
    with pytest.raises(ValidationError):
        a.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        a.endpoints[0].ports["http"] = 1  # type: ignore[index]
    assert copy.deepcopy(a) == a and pickle.loads(pickle.dumps(a)) == a


def test_json_round_trip_for_registries() -> None:
    svc = parse_service(record(vips=["10.96.0.10", "fd00:96::a"], session_affinity="ClientIP"), "x")
    assert parse_service(json.loads(svc.model_dump_json()), "x") == svc
    assert parse_service(svc.model_dump(), "x") == svc
    ep = svc.endpoints[0]
    assert parse_endpoint(json.loads(ep.model_dump_json()), "ep") == ep


def test_ipv6_and_loopback_accepted_when_the_service_allows_local_endpoints() -> None:
    svc = parse_service(record(vips=["fd00:96::1"], allow_local_endpoints=True,
                               endpoints=[{"address": "::1", "ports": {"http": 80}},
                                          {"address": "127.0.0.2", "ports": {"http": 80}}]), "x")
    assert svc.vips == (IPv6Address("fd00:96::1"),)
    assert svc.endpoints[1].address == IPv4Address("127.0.0.2")


@pytest.mark.parametrize("addr, what", [
    ("127.0.0.1", "127.0.0.1 is a loopback address"), ("127.255.0.9", "is a loopback address"),
    ("::1", "::1 is a loopback address"), ("169.254.1.1", "169.254.1.1 is a link-local address"),
    ("fe80::1", "fe80::1 is a link-local address"),
    ("169.254.169.254", "169.254.169.254 is a cloud metadata address"),
    ("fd00:ec2::254", "fd00:ec2::254 is a cloud metadata address"),
    ("100.100.100.200", "is a cloud metadata address"), ("168.63.129.16", "is a cloud metadata address"),
])
def test_endpoints_on_this_machine_or_the_metadata_service_need_allow_local_endpoints(addr: str, what: str) -> None:
    """Issue 12 item 5: an endpoint must not send a service's clients to 127.0.0.1:22 or the
    metadata service unless the service opts in."""
    bad = record(endpoints=[{"address": "10.1.0.1", "ports": {"http": 8080}},
                            {"address": addr, "ports": {"http": 22}}])
    msg = reason(bad)
    assert msg.startswith("endpoints[1]: address ") and what in msg and "allow_local_endpoints: true" in msg
    assert "shop/web" in msg
    assert parse_service({**bad, "allow_local_endpoints": True}, "x").endpoints[1].address == ip_address(addr)


@pytest.mark.parametrize("addr", ["10.1.0.1", "192.168.0.9", "172.16.0.1", "fd00::1", "2001:db8::1",
                                  "100.100.100.201", "169.253.255.255", "128.0.0.1", "fe7f::1"])
def test_ordinary_backend_addresses_are_not_local(addr: str) -> None:
    assert local_endpoint_problem(ip_address(addr)) is None


def test_multicast_endpoints_stay_invalid_even_with_allow_local_endpoints() -> None:
    assert "must be a unicast address" in reason(record(allow_local_endpoints=True,
                                                        endpoints=[{"address": "224.0.0.1", "ports": {"http": 1}}]))


def test_allow_local_endpoints_must_be_a_boolean() -> None:
    assert "allow_local_endpoints: must be true or false" in reason(record(allow_local_endpoints="yes"))


@pytest.mark.parametrize("ready,terminating,weight,usable", [
    (True, False, 1, True), (False, False, 1, False), (True, True, 1, False), (True, False, 0, False)])
def test_endpoint_usable(ready: bool, terminating: bool, weight: int, usable: bool) -> None:
    ep = parse_endpoint({"address": "10.1.0.1", "ports": {"http": 80}, "ready": ready,
                         "terminating": terminating, "weight": weight}, "ep")
    assert ep.usable is usable


# ---- readable reasons ------------------------------------------------------------------------

def test_out_of_range_port_names_the_path_and_value() -> None:
    assert reason(record(ports=[{"name": "http", "port": 70000}], endpoints=[])) == \
        "ports[0].port: must be 1-65535 (got 70000)"


def test_unknown_key_is_named_with_a_hint() -> None:
    r = reason(record(ports=[{"name": "http", "prot": 80}]))
    assert "ports[0].prot: unknown key (did you mean 'port'?); valid keys: name, port, protocol" in r
    assert "lb.x: unknown key" in reason(record(lb={"x": 1}))


def test_missing_and_wrong_types() -> None:
    r = reason({"namespace": "shop"})
    for field in ("name", "vips", "ports"):
        assert f"{field}: required" in r
    assert reason(record(ports=[{"name": "http", "port": "80"}], endpoints=[])) == \
        "ports[0].port: must be an integer (got '80')"
    assert reason(record(ports=[{"name": "http", "port": 80, "protocol": "tcp"}], endpoints=[])) == \
        "ports[0].protocol: must be 'TCP' or 'UDP' (got 'tcp')"
    assert reason(["not", "a", "mapping"]).startswith("must be a mapping")
    assert reason(record(lb={"algorithm": "round-robin"})).startswith("lb.algorithm: must be 'maglev'")


@pytest.mark.parametrize("bad", ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255", "10.96.0.300", ""])
def test_bad_addresses_rejected(bad: str) -> None:
    assert reason(record(vips=[bad])).startswith("vips[0]: ")
    with pytest.raises(RecordError, match=r"^ep: address: "):
        parse_endpoint({"address": bad, "ports": {"http": 80}}, "ep")


def test_names_must_be_dns_labels() -> None:
    assert reason(record(namespace="Shop")).startswith("namespace: must be 1-63 lowercase")
    assert "name: must be 1-63" in reason(record(name="a" * 64))
    assert reason(record(ports=[{"name": "a-very-long-port-name", "port": 80}])).startswith("ports[0].name: must be 1-15")


def test_duplicates_within_a_service() -> None:
    assert "vips: 10.96.0.10 is listed twice" in reason(record(vips=["10.96.0.10", "10.96.0.10"]))
    assert "port name 'http' is used twice" in reason(record(ports=[{"name": "http", "port": 80}, {"name": "http", "port": 81}]))
    assert "80/TCP is listed twice" in reason(record(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 80}]))
    # same number on different protocols is fine
    parse_service(record(ports=[{"name": "a", "port": 53}, {"name": "b", "port": 53, "protocol": "UDP"}], endpoints=[]), "x")
    assert "endpoints[1]: 10.1.0.1:8080 for port 'http' duplicates endpoints[0]" in reason(
        record(endpoints=[{"address": "10.1.0.1", "ports": {"http": 8080}}] * 2))


def test_empty_ports_rejected_and_no_vip_is_a_headless_service() -> None:
    assert reason(record(ports=[], endpoints=[])) == "ports: must list at least one port"
    headless = parse_service(record(vips=[]), "x")
    from meshd.desired import desired_groups
    assert headless.vips == () and desired_groups([headless]) == {}  # installs nothing


def test_endpoint_port_names_must_exist_on_the_service() -> None:
    r = reason(record(endpoints=[{"address": "10.1.0.1", "ports": {"htp": 8080}}]))
    assert "endpoints[0].ports: unknown port name 'htp'" in r and "dns, http" in r


def test_endpoint_validates_on_its_own() -> None:
    ep = parse_endpoint({"address": "10.1.0.9", "ports": {"http": 80}, "weight": 0, "zone": "a", "node": "n1"}, "ep")
    assert not ep.usable and ep.zone == "a"
    for bad, path in [({"address": "10.1.0.9", "ports": {}}, "ports"),
                      ({"address": "10.1.0.9", "ports": {"http": 80}, "weight": 70000}, "weight"),
                      ({"address": "10.1.0.9", "ports": {"http": 80}, "ready": "yes"}, "ready"),
                      ({"address": "10.1.0.9", "ports": {"http": 80}, "colour": "red"}, "colour")]:
        with pytest.raises(RecordError, match=rf"^ep: {path}: "):
            parse_endpoint(bad, "ep")


def test_many_errors_stay_on_one_short_line() -> None:
    r = reason({f"k{i}": i for i in range(50)})
    assert "\n" not in r and "more)" in r and len(r) < 1000


# ---- property: junk never escapes as anything but RecordError -------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)
keys = st.sampled_from(["namespace", "name", "vips", "ports", "session_affinity", "lb", "endpoints",
                        "address", "port", "protocol", "weight"]) | st.text(max_size=10) | st.integers()


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, json_values, max_size=8) | json_values)
def test_random_junk_only_raises_record_error(data: object) -> None:
    try:
        parse_service(data, where="junk")
    except RecordError as e:
        assert e.reason and "\n" not in e.reason


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["namespace", "name", "vips", "ports", "session_affinity", "lb", "endpoints"]),
       st.sampled_from([None, 0, 1]), json_values)
def test_junk_inside_an_otherwise_valid_record_only_raises_record_error(field: str, where: int | None,
                                                                          junk: object) -> None:
    data = record()
    value = data.get(field)
    if isinstance(value, list) and value and where is not None:  # junk inside a list element
        value = list(value)
        value[min(where, len(value) - 1)] = junk
        data[field] = value
    else:
        data[field] = junk
    try:
        parse_service(data, where="junk")
    except RecordError as e:
        assert e.reason and "\n" not in e.reason


# ---- check_services ---------------------------------------------------------------------------

def svc(name: str, vips: list[str], port: int = 80, protocol: str = "TCP", ns: str = "shop") -> Service:
    return parse_service({"namespace": ns, "name": name, "vips": vips,
                          "ports": [{"name": "p", "port": port, "protocol": protocol}]}, "x")


def test_vip_outside_service_cidrs_rejected() -> None:
    kept, errors = check_services([svc("a", ["10.96.0.1"]), svc("b", ["192.168.1.1"])], CIDRS)
    assert [s.key for s in kept] == ["shop/a"]
    assert errors[0].where == "shop/b"
    assert "vip 192.168.1.1 is outside service_cidrs (10.96.0.0/12, fd00:96::/108)" in errors[0].reason


def test_forbidden_addresses_rejected() -> None:
    kept, errors = check_services([svc("a", ["10.96.0.1"]), svc("b", ["fd00:96::5"])], CIDRS,
                                  forbidden=[IPv4Address("10.96.0.1"), "fd00:96::5"])
    assert kept == [] and len(errors) == 2 and "address of this node or of etcd" in errors[0].reason


def test_frontend_collision_is_deterministic_and_names_the_winner() -> None:
    a, b, c = svc("a", ["10.96.0.1"]), svc("b", ["10.96.0.1"]), svc("c", ["10.96.0.1"], protocol="UDP")
    for order in ([a, b, c], [c, b, a], [b, c, a]):
        kept, errors = check_services(order, CIDRS)
        assert [s.key for s in kept] == ["shop/a", "shop/c"]
        assert [(e.where, e.reason) for e in errors] == [
            ("shop/b", "frontend 10.96.0.1:80/TCP already used by service shop/a")]


def test_rejected_service_does_not_claim_frontends() -> None:
    bad = svc("a", ["10.96.0.1", "192.168.0.1"])  # outside cidrs: rejected, claims nothing
    kept, errors = check_services([bad, svc("b", ["10.96.0.1"])], CIDRS)
    assert [s.key for s in kept] == ["shop/b"] and [e.where for e in errors] == ["shop/a"]


def test_same_key_from_two_sources() -> None:
    kept, errors = check_services([svc("a", ["10.96.0.1"]), svc("a", ["10.96.0.1"])], CIDRS)
    assert len(kept) == 1 and errors == []
    one, two = svc("a", ["10.96.0.1"]), svc("a", ["10.96.0.2"])
    results = {tuple(k.vips for k in check_services(o, CIDRS)[0]) for o in ([one, two], [two, one])}
    assert len(results) == 1  # same winner either way
    assert "conflicting definitions" in check_services([one, two], CIDRS)[1][0].reason


def test_ipv6_frontend_collision_message() -> None:
    _, errors = check_services([svc("a", ["fd00:96::1"], 53, "UDP"), svc("b", ["fd00:96::1"], 53, "UDP")], CIDRS)
    assert errors[0].reason == "frontend [fd00:96::1]:53/UDP already used by service shop/a"


def test_a_literal_bracket_key_is_reported_not_crashed_on() -> None:
    """Found by the junk-record property: a record with a key spelled "[key]"."""
    with pytest.raises(RecordError, match=r"\['\[key\]'\]: unknown key"):
        parse_service({"[key]": None}, "x")


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["{}", "0{}", " {}", "{}.0", "{} "]))
def test_fast_ipv4_parse_agrees_with_ipaddress(n: int, form: str) -> None:
    """model._ip parses canonical dotted quads itself: it must accept, reject and return
    exactly what the ipaddress-based path does."""
    from ipaddress import ip_address
    from meshd.model import _ip
    text = form.format(str(IPv4Address(n)))
    try:
        want = ip_address(text)
        bad = want.is_unspecified or want.is_multicast or int(want) == 2**32 - 1
    except ValueError:
        want, bad = None, True
    if bad:
        with pytest.raises(Exception):
            _ip(text)
    else:
        assert _ip(text) == want and type(_ip(text)) is IPv4Address
