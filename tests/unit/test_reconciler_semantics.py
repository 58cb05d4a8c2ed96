"""Reconciler and kube-proxy semantics: frontend flags, tc overrides of external frontends,
affinity timeouts and members, source ranges, draining backends -- against the in-memory
kernel of test_reconciler.py, whose check() asserts after every map operation that nothing
a flag makes the datapath read is missing, and no backend goes while a tc flow names it."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from hypothesis import given, settings, strategies as st

from meshd.desired import (FE_EXTERNAL, FE_KEEP_SOURCE, FE_SOURCE_RANGES, G_AFFINITY,
                           G_DROP_EMPTY, Frontend, NodeInfo, NodePorts, desired_groups)
from meshd.model import parse_service
from meshd.reconciler import TABLE_B, Reconciler
from test_reconciler import FakeKernel

NODE = NodeInfo("node-1", "zone-a")
NODE_IP = ip_address("192.0.2.10")
NP = NodePorts((NODE_IP,), (30000, 32767))
LB = "198.51.100.7"


def svc(eps, name="web", vip="10.96.0.10", **over):
    d = {"namespace": "t", "name": name, "vips": [vip],
         "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
         "endpoints": [{"address": f"10.1.0.{i}", "ports": {"http": 8080}, "node": node}
                       for i, node in eps]}
    d.update(over)
    return parse_service(d, f"t/{name}")


def fe(addr, port=80):
    return Frontend(ip_address(addr), port, "TCP")


def apply(r, *services):
    rep = r.apply(desired_groups(services, NP, NODE))
    assert not rep.errors, rep.errors
    return rep


def gid(k, key):
    return next(g for g, name in k.names.items() if name == key)


def members(k, key):
    g = gid(k, key)
    return {k.backends[b].name.split(":")[0] for (gg, b) in k.members if gg == g}


def test_flags_reach_each_frontend_and_tc_overrides_go_to_their_own_map():
    k = FakeKernel()
    r = Reconciler(k)
    s = svc([(1, "node-1"), (2, "node-2")], external_traffic_policy="Local",
            load_balancer_ips=[LB], load_balancer_source_ranges=["203.0.113.0/24"],
            ports=[{"name": "http", "port": 80, "protocol": "TCP", "node_port": 30080}])
    apply(r, s)
    # the Cluster selection is the internal one: one group serves VIP, node port and LB IP
    internal, external = gid(k, "t/web:http/ipv4"), gid(k, "t/web:http/ipv4/external")
    cluster = internal
    assert k.frontends[fe("10.96.0.10")] == (internal, 2, 0)
    ext_flags = FE_EXTERNAL | FE_KEEP_SOURCE
    # node-local clients (socket path) get the Cluster selection without FE flags' effects
    assert k.frontends[fe(NODE_IP, 30080)] == (cluster, 2, ext_flags)
    assert k.frontends[fe(LB)] == (cluster, 2, ext_flags | FE_SOURCE_RANGES)
    # tc: the Local selection (one local endpoint) for node port and LB IP
    assert k.ext == {fe(NODE_IP, 30080): (external, 1, ext_flags),
                     fe(LB): (external, 1, ext_flags | FE_SOURCE_RANGES)}
    assert k.srcranges == {(fe(LB), ip_network("203.0.113.0/24"))}
    # the policy back to Cluster: the override and its group go, the ranges stay for the LB IP
    s2 = svc([(1, "node-1"), (2, "node-2")], load_balancer_ips=[LB],
             load_balancer_source_ranges=["203.0.113.0/24", "2001:db8::/32"],
             ports=[{"name": "http", "port": 80, "protocol": "TCP", "node_port": 30080}])
    apply(r, s2)
    assert k.ext == {} and "t/web:http/ipv4/external" not in k.names.values()
    assert k.srcranges == {(fe(LB), ip_network("203.0.113.0/24"))}  # IPv6 range: not for v4
    apply(r)
    assert (k.frontends, k.ext, k.srcranges, k.names) == ({}, {}, set(), {})


def test_local_without_local_endpoint_is_flagged_drop():
    k = FakeKernel()
    r = Reconciler(k)
    apply(r, svc([(2, "node-2")], internal_traffic_policy="Local"))
    (val,) = k.frontends.values()
    assert val[1] == 0 and val[2] & G_DROP_EMPTY


def test_affinity_timeout_and_members_follow_the_selection_and_go_with_the_group():
    k = FakeKernel()
    r = Reconciler(k)
    aff = {"session_affinity": "ClientIP", "affinity_timeout_seconds": 5}
    apply(r, svc([(1, None), (2, None)], **aff))
    key = "t/web:http/ipv4"
    g = gid(k, key)
    assert k.affcfg == {g: 5} and members(k, key) == {"10.1.0.1", "10.1.0.2"}
    assert k.frontends[fe("10.96.0.10")][2] == G_AFFINITY
    apply(r, svc([(2, None), (3, None)], **{**aff, "affinity_timeout_seconds": 7}))
    assert k.affcfg == {g: 7} and members(k, key) == {"10.1.0.2", "10.1.0.3"}
    apply(r, svc([(3, None)]))  # affinity off: flag first, then its entries
    assert k.affcfg == {} and k.members == {} and k.frontends[fe("10.96.0.10")][2] == 0
    apply(r, svc([(3, None)], **aff))
    apply(r)
    assert (k.affcfg, k.members, k.backends) == ({}, {}, {})


def test_restart_adopts_flags_overrides_affinity_and_ranges_without_a_write():
    k = FakeKernel()
    s = [svc([(1, "node-1"), (2, "node-2")], external_traffic_policy="Local",
             session_affinity="ClientIP", load_balancer_ips=[LB],
             load_balancer_source_ranges=["203.0.113.0/24"]),
         svc([(3, None)], name="db", vip="10.96.0.11", internal_traffic_policy="Local")]
    apply(Reconciler(k), *s)
    before = k.ops
    r2 = Reconciler(k)
    r2.adopt(k.snapshot())
    rep = apply(r2, *s)
    assert sum(rep.ops.values()) == 0 and k.ops == before
    # and a stale entry of a group no one names any more is removed after adoption
    k.affcfg[999] = 1
    k.srcranges.add((fe("198.51.100.99"), ip_network("10.0.0.0/8")))
    r3 = Reconciler(k)
    r3.adopt(k.snapshot())
    apply(r3, *s)
    assert 999 not in k.affcfg and (fe("198.51.100.99"), ip_network("10.0.0.0/8")) \
        not in k.srcranges


def test_removed_backend_drains_while_a_tc_flow_names_it():
    k = FakeKernel()
    k.conntrack = set()
    r = Reconciler(k, drain_seconds=60)
    apply(r, svc([(1, None), (2, None)]))
    b2 = next(b for b, ref in k.backends.items() if str(ref.address) == "10.1.0.2")
    k.conntrack = {b2}  # an established tc flow to 10.1.0.2
    apply(r, svc([(1, None)]))
    assert b2 in k.backends and b2 not in set(k.tables[gid(k, "t/web:http/ipv4")].tolist())
    assert r.draining == 1 and r.collect_drained() == 0 and b2 in k.backends
    k.conntrack = set()  # the flow closed
    assert r.collect_drained() == 1 and b2 not in k.backends and r.draining == 0


def test_drain_ends_at_the_deadline_and_a_returning_backend_keeps_its_id():
    import time
    k = FakeKernel()
    k.conntrack = set()
    r = Reconciler(k, drain_seconds=60)
    apply(r, svc([(1, None), (2, None)]))
    b2 = next(b for b, ref in k.backends.items() if str(ref.address) == "10.1.0.2")
    k.conntrack = {b2}
    apply(r, svc([(1, None)]))
    apply(r, svc([(1, None), (2, None)]))  # back while draining
    assert r.draining == 0 and k.backends[b2].name == "10.1.0.2:8080/TCP"
    apply(r, svc([(1, None)]))
    assert r.collect_drained(time.monotonic() + 30) == 0
    k.conntrack = None  # (the fake would object to deleting under a live flow)
    k.conntrack = set()
    assert r.collect_drained(time.monotonic() + 61) == 1 and b2 not in k.backends


def test_without_the_tc_path_a_removed_backend_goes_at_once():
    k = FakeKernel()
    r = Reconciler(k)
    apply(r, svc([(1, None), (2, None)]))
    rep = apply(r, svc([(1, None)]))
    assert rep.ops["delete_backend"] == 1 and len(k.backends) == 1 and r.draining == 0


eps_st = st.lists(st.tuples(st.integers(1, 6), st.sampled_from([None, "node-1", "node-2"])),
                  max_size=4, unique_by=lambda t: t[0])
svc_st = st.builds(
    lambda i, eps, itp, etp, aff, lb, ranges: svc(
        eps, name=f"s{i}", vip=f"10.96.0.{i}", internal_traffic_policy=itp,
        external_traffic_policy=etp, session_affinity="ClientIP" if aff else "None",
        load_balancer_ips=[f"198.51.100.{i}"] if lb else [],
        load_balancer_source_ranges=ranges,
        ports=[{"name": "http", "port": 80, "protocol": "TCP", "node_port": 30000 + i}]),
    st.integers(1, 4), eps_st, st.sampled_from(["Cluster", "Local"]),
    st.sampled_from(["Cluster", "Local"]), st.booleans(), st.booleans(),
    st.sampled_from([[], ["203.0.113.0/24"], ["203.0.113.0/24", "192.0.2.0/28"]]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(svc_st, max_size=4, unique_by=lambda s: s.name), min_size=1,
                max_size=5), st.booleans())
def test_any_sequence_converges_is_never_half_written_and_adopts_without_writes(states, tc):
    k = FakeKernel()
    k.conntrack = set() if tc else None
    r = Reconciler(k)
    for services in states:
        groups = desired_groups(services, NP, NODE)
        assert not r.apply(groups).errors  # check() ran after every operation
        fresh = FakeKernel()
        Reconciler(fresh).apply(groups)
        # (the table half a frontend names depends on history, not on the desired state)
        shape = lambda kk: ({str(f): (kk.names[v[0]], v[1], v[2] & ~TABLE_B) for f, v in kk.frontends.items()},  # noqa: E731
                            {str(f): (kk.names[v[0]], v[1], v[2] & ~TABLE_B) for f, v in kk.ext.items()},
                            {kk.names[g]: t for g, t in kk.affcfg.items()},
                            {(kk.names[g], kk.backends[b].name) for g, b in kk.members},
                            kk.srcranges)
        assert shape(k) == shape(fresh)
    r.collect_drained()
    r2 = Reconciler(k)
    r2.adopt(k.snapshot())
    assert sum(r2.apply(desired_groups(states[-1], NP, NODE)).ops.values()) == 0


def test_an_ipv6_range_inside_the_mapped_prefix_reads_back_as_ipv6():
    """Review finding: ::ffff:203.0.113.0/120 on an IPv6 frontend came back as IPv4 and the
    first sync after a restart deleted it."""
    from ipaddress import ip_address, ip_network
    from meshd.dataplane import structs as S
    vip, net = ip_address("2001:db8::9"), ip_network("::ffff:203.0.113.0/120")
    k = S.srcrange_key(vip, 80, "TCP", net)
    assert S.parse_srcrange_key(k) == (vip, 80, "TCP", net)
