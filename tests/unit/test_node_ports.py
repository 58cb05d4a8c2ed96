"""NodePort: the record field, its checks, the frontends it makes, and the config around it."""

from __future__ import annotations

from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

from meshd import node
from meshd.config import load_config
from meshd.desired import DesiredState, Frontend, NodePorts, desired_groups
from meshd.errors import ConfigError, RecordError
from meshd.model import check_services, parse_service

CIDRS = [ip_network("10.96.0.0/12"), ip_network("fd00:96::/108")]
NODE4, NODE4B, NODE6 = ip_address("192.168.5.10"), ip_address("10.0.9.1"), ip_address("fd00:9::1")
NP = NodePorts(addresses=(NODE4B, NODE4, NODE6))


def svc(name="web", node_port=30080, vips=("10.96.0.10",), proto="TCP", extra_ports=()):
    return parse_service({
        "namespace": "t", "name": name, "vips": list(vips),
        "ports": [{"name": "http", "port": 80, "protocol": proto, "node_port": node_port},
                  *extra_ports],
        "endpoints": [{"address": "10.1.0.1", "ports": {"http": 8080}},
                      {"address": "fd00:1::1", "ports": {"http": 8080}}]}, where=name)


def test_node_port_is_optional_and_defaults_to_none():
    s = parse_service({"namespace": "t", "name": "a", "vips": ["10.96.0.1"],
                       "ports": [{"name": "p", "port": 1}]}, where="a")
    assert s.ports[0].node_port is None


def test_node_port_gets_a_frontend_on_every_node_address_of_the_family():
    groups = desired_groups([svc(vips=("10.96.0.10", "fd00:96::10"))], NP)
    v4 = groups["t/web:http/ipv4"].frontends
    v6 = groups["t/web:http/ipv6"].frontends
    assert v4 == (Frontend(ip_address("10.96.0.10"), 80, "TCP"), Frontend(NODE4B, 30080, "TCP"),
                  Frontend(NODE4, 30080, "TCP"))
    assert v6 == (Frontend(ip_address("fd00:96::10"), 80, "TCP"), Frontend(NODE6, 30080, "TCP"))


def test_a_family_without_a_vip_is_served_on_node_addresses_alone():
    groups = desired_groups([svc(vips=("10.96.0.10",))], NP)
    assert groups["t/web:http/ipv6"].frontends == (Frontend(NODE6, 30080, "TCP"),)
    assert [b.address for b, _w in groups["t/web:http/ipv6"].backends] == [ip_address("fd00:1::1")]


def test_without_node_port_nothing_changes():
    assert [f.port for f in desired_groups([svc(node_port=None)], NP)["t/web:http/ipv4"]
            .frontends] == [80]


def test_node_port_outside_the_range_is_rejected_with_the_range():
    kept, errors = check_services([svc(node_port=8080)], CIDRS)
    assert kept == [] and len(errors) == 1
    assert errors[0].reason == "port 'http': node_port 8080 is outside node_ports.range (30000-32767)"
    kept, errors = check_services([svc(node_port=8080)], CIDRS, (), (8000, 9000))
    assert len(kept) == 1 and not errors


def test_two_services_on_one_node_port_first_key_wins():
    kept, errors = check_services([svc("b"), svc("a", vips=("10.96.0.11",))], CIDRS)
    assert [s.name for s in kept] == ["a"]
    assert errors[0].where == "t/b" and "node_port 30080/TCP already used by service t/a" in \
        errors[0].reason
    kept, errors = check_services([svc("b", proto="UDP"), svc("a", vips=("10.96.0.11",))], CIDRS)
    assert len(kept) == 2 and not errors  # another protocol: no clash


def test_one_node_port_twice_in_a_service_is_a_record_error():
    with pytest.raises(RecordError, match="node_port 30080/TCP is listed twice"):
        svc(extra_ports=[{"name": "alt", "port": 81, "node_port": 30080}])


def test_desired_state_revalidates_the_service_that_frees_a_node_port():
    d = DesiredState()
    a, b = svc("a"), svc("b", vips=("10.96.0.11",))
    groups, errors = d.update([a, b], CIDRS, (), NP)
    assert "t/a:http/ipv4" in groups and "t/b:http/ipv4" not in groups and len(errors) == 1
    groups, errors = d.update([b], CIDRS, (), NP)  # a leaves: b gets the node port
    assert "t/b:http/ipv4" in groups and not errors
    assert Frontend(NODE4, 30080, "TCP") in groups["t/b:http/ipv4"].frontends


def test_desired_state_follows_node_address_changes():
    d = DesiredState()
    groups, _ = d.update([svc()], CIDRS, (), NodePorts(addresses=(NODE4,)))
    assert Frontend(NODE4B, 30080, "TCP") not in groups["t/web:http/ipv4"].frontends
    groups, _ = d.update([svc()], CIDRS, (), NodePorts(addresses=(NODE4, NODE4B)))
    assert Frontend(NODE4B, 30080, "TCP") in groups["t/web:http/ipv4"].frontends


def test_node_port_addresses_skip_loopback_link_local_and_filter_by_cidr():
    local = {ip_address(a) for a in ("127.0.0.1", "::1", "fe80::1", "10.0.9.1", "192.168.5.10",
                                     "fd00:9::1")}
    assert node.node_port_addresses(local) == (NODE4B, NODE4, NODE6)
    assert node.node_port_addresses(local, [ip_network("192.168.0.0/16")]) == (NODE4,)


# ---- config -----------------------------------------------------------------------------------
def load(tmp_path: Path, text: str):
    p = tmp_path / "meshd.yaml"
    p.write_text(text)
    return load_config(p, {})


def test_config_defaults_and_forms(tmp_path):
    cfg = load(tmp_path, "")
    assert cfg.node_ports.range == (30000, 32767) and cfg.node_ports.addresses == []
    assert (cfg.tc.mode, cfg.tc.snat_ports) == ("routed", (1024, 29999))
    cfg = load(tmp_path, "tc: {mode: snat, snat_ports: 40000-40999}\n"
                         "node_ports: {range: 20000-20999, addresses: [10.0.9.0/24]}\n")
    assert (cfg.tc.mode, cfg.tc.snat_ports, cfg.node_ports.range) == \
        ("snat", (40000, 40999), (20000, 20999))
    assert load_config(None, {"MESHD_TC__SNAT_PORTS": "50000-50010"}).tc.snat_ports == \
        (50000, 50010)


@pytest.mark.parametrize("text, words", [
    ("tc: {snat_ports: 9-x}", "tc.snat_ports: must be a port range LOW-HIGH"),
    ("tc: {snat_ports: 70000-70001}", "within 1-65535"),
    ("tc: {mode: masquerade}", "tc.mode"),
    ("node_ports: {range: 5-1}", "node_ports.range"),
    ("tc: {mode: snat, snat_ports: 32000-33000}",
     "tc.snat_ports 32000-33000 overlaps node_ports.range 30000-32767"),
])
def test_config_errors_name_the_key(tmp_path, text, words):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text + "\n")
    assert words in str(exc.value)


def test_a_single_stack_service_is_not_served_on_the_other_family():
    s = parse_service({"namespace": "t", "name": "v4", "vips": ["10.96.0.10"],
                       "ports": [{"name": "http", "port": 80, "node_port": 30080}],
                       "endpoints": [{"address": "10.1.0.1", "ports": {"http": 8080}}]},
                      where="v4")
    assert sorted(desired_groups([s], NP)) == ["t/v4:http/ipv4"]
