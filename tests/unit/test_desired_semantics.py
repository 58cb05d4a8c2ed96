"""kube-proxy semantics in the desired state: which groups, frontends, backends and flags a
service record becomes (meshd/desired.py over meshd/selection.py)."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from meshd.desired import (FE_EXTERNAL, FE_KEEP_SOURCE, FE_SOURCE_RANGES, G_AFFINITY,
                           G_DROP_EMPTY, DesiredState, NodeInfo, NodePorts, desired_groups)
from meshd.model import parse_service

NODE = NodeInfo("node-1", "zone-a")
NP = NodePorts((ip_address("192.0.2.10"),), (30000, 32767))
CIDRS = [ip_network("10.96.0.0/12")]


def svc(eps, **over):
    d = {"namespace": "t", "name": "web", "vips": ["10.96.0.10"],
         "ports": [{"name": "http", "port": 80, "protocol": "TCP"}], "endpoints": eps}
    d.update(over)
    return parse_service(d, "t/web")


def ep(i, **kw):
    return {"address": f"10.1.0.{i}", "ports": {"http": 8080}, **kw}


def names(g):
    return sorted(str(ref.address) for ref, _w in g.backends)


def fes(frontends):
    return sorted(str(f) for f in frontends)


def test_cluster_service_is_one_group_of_ready_endpoints():
    g = desired_groups([svc([ep(1), ep(2, ready=False), ep(3, ready=False, terminating=True)])],
                       NP, NODE)
    assert list(g) == ["t/web:http/ipv4"]
    assert names(g["t/web:http/ipv4"]) == ["10.1.0.1"] and g["t/web:http/ipv4"].flags == 0


def test_no_ready_endpoint_falls_back_to_serving_terminating_ones():
    g = desired_groups([svc([ep(1, ready=False), ep(2, ready=False, serving=True,
                                                     terminating=True),
                             ep(3, ready=False, serving=False, terminating=True)])], NP, NODE)
    assert names(g["t/web:http/ipv4"]) == ["10.1.0.2"]


def test_nothing_usable_refuses():
    g = desired_groups([svc([ep(1, ready=False)])], NP, NODE)["t/web:http/ipv4"]
    assert g.backends == () and not g.flags & G_DROP_EMPTY


def test_internal_local_uses_local_endpoints_and_drops_without_one():
    s = svc([ep(1, node="node-1"), ep(2, node="node-2")], internal_traffic_policy="Local")
    g = desired_groups([s], NP, NODE)["t/web:http/ipv4"]
    assert names(g) == ["10.1.0.1"]
    g = desired_groups([s], NP, NodeInfo("node-3"))["t/web:http/ipv4"]
    assert g.backends == () and g.flags & G_DROP_EMPTY  # others exist: DROP, not REJECT


def test_external_local_gets_a_tc_only_group_that_keeps_the_source():
    s = svc([ep(1, node="node-1"), ep(2, node="node-2")], external_traffic_policy="Local",
            ports=[{"name": "http", "port": 80, "protocol": "TCP", "node_port": 30080}])
    g = desired_groups([s], NP, NODE)
    assert sorted(g) == ["t/web:http/ipv4", "t/web:http/ipv4/external"]
    base, ext = g["t/web:http/ipv4"], g["t/web:http/ipv4/external"]
    # the VIP and, for clients on this node, the node port: every ready endpoint
    assert fes(base.frontends) == ["10.96.0.10:80/TCP", "192.0.2.10:30080/TCP"]
    assert names(base) == ["10.1.0.1", "10.1.0.2"] and base.tc_frontends == ()
    # from outside (tc): local endpoints only, client address kept
    assert fes(ext.tc_frontends) == ["192.0.2.10:30080/TCP"] and ext.frontends == ()
    assert names(ext) == ["10.1.0.1"]
    nodeport = ext.tc_frontends[0]
    assert ext.frontend_flags(nodeport) == FE_EXTERNAL | FE_KEEP_SOURCE
    assert base.frontend_flags(nodeport) == FE_EXTERNAL | FE_KEEP_SOURCE
    assert base.frontend_flags(base.frontends[0]) == 0  # the VIP


def test_internal_local_external_cluster_splits_socket_external_to_the_cluster_group():
    s = svc([ep(1, node="node-1"), ep(2, node="node-2")], internal_traffic_policy="Local",
            ports=[{"name": "http", "port": 80, "protocol": "TCP", "node_port": 30080}])
    g = desired_groups([s], NP, NODE)
    assert sorted(g) == ["t/web:http/ipv4", "t/web:http/ipv4/cluster"]
    assert names(g["t/web:http/ipv4"]) == ["10.1.0.1"]
    assert fes(g["t/web:http/ipv4/cluster"].frontends) == ["192.0.2.10:30080/TCP"]
    assert names(g["t/web:http/ipv4/cluster"]) == ["10.1.0.1", "10.1.0.2"]


def test_affinity_flag_and_timeout():
    g = desired_groups([svc([ep(1)], session_affinity="ClientIP",
                            affinity_timeout_seconds=60)], NP, NODE)["t/web:http/ipv4"]
    assert g.flags & G_AFFINITY and g.affinity == 60
    g = desired_groups([svc([ep(1)])], NP, NODE)["t/web:http/ipv4"]
    assert not g.flags & G_AFFINITY and g.affinity == 0


def test_topology_hints_for_my_zone_only_when_enabled():
    eps = [ep(1, hints_for_zones=["zone-a"]), ep(2, hints_for_zones=["zone-b"])]
    on = desired_groups([svc(eps, topology_mode="Auto")], NP, NODE)["t/web:http/ipv4"]
    off = desired_groups([svc(eps)], NP, NODE)["t/web:http/ipv4"]
    dist = desired_groups([svc(eps, traffic_distribution="PreferClose")], NP, NODE)
    assert names(on) == ["10.1.0.1"] and names(off) == ["10.1.0.1", "10.1.0.2"]
    assert names(dist["t/web:http/ipv4"]) == ["10.1.0.1"]


def test_external_ips_only_inside_external_ip_cidrs_the_rest_of_the_service_serves():
    s = svc([ep(1)], external_ips=["203.0.113.5", "198.51.100.7"],
            load_balancer_ips=["203.0.113.9"], load_balancer_source_ranges=["192.0.2.0/24"])
    d = DesiredState()
    groups, errors = d.update([s], CIDRS, set(), NP, NODE, [ip_network("203.0.113.0/24")])
    g = groups["t/web:http/ipv4"]
    assert fes(g.frontends) == ["10.96.0.10:80/TCP", "203.0.113.5:80/TCP", "203.0.113.9:80/TCP"]
    assert [e.where for e in errors] == ["t/web"] and d.served == 1
    assert "external_ip 198.51.100.7 dropped: outside external_ip_cidrs" in errors[0].reason
    lb = next(f for f in g.frontends if str(f.vip) == "203.0.113.9")
    assert g.frontend_flags(lb) == FE_EXTERNAL | FE_SOURCE_RANGES
    assert g.source_ranges == (ip_network("192.0.2.0/24"),)
    ext = next(f for f in g.frontends if str(f.vip) == "203.0.113.5")
    assert g.frontend_flags(ext) == FE_EXTERNAL


def test_no_external_ip_cidrs_means_no_external_ip_and_node_addresses_never():
    s = svc([ep(1)], external_ips=["203.0.113.5"], load_balancer_ips=["192.0.2.10", "127.0.0.9"])
    groups, errors = DesiredState().update([s], CIDRS, {ip_address("192.0.2.10")}, NP, NODE)
    assert fes(groups["t/web:http/ipv4"].frontends) == ["10.96.0.10:80/TCP"]
    reason = errors[0].reason
    assert "203.0.113.5 dropped: outside external_ip_cidrs (none configured)" in reason
    assert "load_balancer_ip 192.0.2.10 dropped" in reason and "127.0.0.9 dropped" in reason


def test_external_ip_taken_by_another_service_is_dropped_from_the_later_one():
    a = svc([ep(1)], external_ips=["203.0.113.5"])
    b = svc([ep(2)], name="zzz", vips=["10.96.0.11"], external_ips=["203.0.113.5"])
    groups, errors = DesiredState().update([a, b], CIDRS, set(), NP, NODE,
                                           [ip_network("203.0.113.0/24")])
    assert "203.0.113.5:80/TCP" in fes(groups["t/web:http/ipv4"].frontends)
    assert fes(groups["t/zzz:http/ipv4"].frontends) == ["10.96.0.11:80/TCP"]
    assert "already used by service t/web" in errors[0].reason


def test_health_check_node_port_only_with_external_local():
    bad = svc([ep(1)], health_check_node_port=32000)
    kept, errors = DesiredState().update([bad], CIDRS, set(), NP, NODE)
    assert kept == {} and "only for external_traffic_policy Local" in errors[0].reason


def test_headless_and_sctp():
    assert desired_groups([svc([ep(1)], vips=[])], NP, NODE) == {}
    from meshd.errors import RecordError
    import pytest
    with pytest.raises(RecordError, match="SCTP|TCP"):
        svc([ep(1)], ports=[{"name": "http", "port": 80, "protocol": "SCTP"}])


def test_an_external_ip_never_takes_a_later_services_vip():
    """Review finding: external IPs were claimed in key order before later services' VIPs
    were checked, so an external IP could reject another service's ClusterIP."""
    a = svc([ep(1)], name="a", vips=["10.96.0.60"], external_ips=["10.96.0.50"])
    b = svc([ep(2)], name="b", vips=["10.96.0.50"])
    groups, errors = DesiredState().update([a, b], CIDRS, set(), NP, NODE,
                                           [ip_network("10.96.0.0/12")])
    assert fes(groups["t/b:http/ipv4"].frontends) == ["10.96.0.50:80/TCP"]
    assert fes(groups["t/a:http/ipv4"].frontends) == ["10.96.0.60:80/TCP"]
    assert "external_ip 10.96.0.50 dropped: already used by service t/b" in errors[0].reason


def test_source_ranges_apply_per_family():
    s = svc([ep(1), {"address": "fd00::1", "ports": {"http": 8080}}],
            vips=["10.96.0.10", "fd00:96::10"], load_balancer_ips=["203.0.113.9", "2001:db8::9"],
            load_balancer_source_ranges=["192.0.2.0/24"])
    g = desired_groups([s], NP, NODE)
    v4 = g["t/web:http/ipv4"]
    v6 = g["t/web:http/ipv6"]
    lb4 = next(f for f in v4.frontends if str(f.vip) == "203.0.113.9")
    lb6 = next(f for f in v6.frontends if str(f.vip) == "2001:db8::9")
    assert v4.frontend_flags(lb4) & FE_SOURCE_RANGES
    assert not v6.frontend_flags(lb6) & FE_SOURCE_RANGES  # no IPv6 range: no firewall
