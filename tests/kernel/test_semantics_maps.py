"""The reconciler's kube-proxy-semantics entries in the real pinned maps: frontend flags,
tc overrides, affinity timeouts and members, LPM source ranges -- written, read back by a
restarted daemon's snapshot, adopted without a write -- and draining against the real tc
conntrack map."""

from __future__ import annotations

import ctypes as C
import socket
from ipaddress import ip_address, ip_network

from meshd import names
from meshd.dataplane import libbpf as bpf
from meshd.dataplane import loader, tc
from meshd.dataplane import structs as S
from meshd.dataplane.kernel import KernelDataplane, coarse_now_ns
from meshd.desired import NodeInfo, NodePorts, desired_groups
from meshd.model import parse_service
from meshd.reconciler import Reconciler

BPFFS = loader.Path("/sys/fs/bpf")
M = 251
NP = NodePorts((ip_address("192.0.2.10"),), (30000, 32767))
NODE = NodeInfo("node-1")


def services(eps=(1, 2)):
    return [parse_service({
        "namespace": "t", "name": "web", "vips": ["10.96.0.10"],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "node_port": 30080}],
        "session_affinity": "ClientIP", "affinity_timeout_seconds": 30,
        "external_traffic_policy": "Local", "load_balancer_ips": ["198.51.100.7"],
        "load_balancer_source_ranges": ["203.0.113.0/24", "198.18.0.0/15"],
        "endpoints": [{"address": f"10.1.0.{i}", "ports": {"http": 8080},
                       "node": "node-1" if i == 1 else "node-2"} for i in eps]}, "t/web")]


def test_semantics_entries_round_trip_and_adopt_without_a_write(kernel_instance):
    inst, cg = kernel_instance
    maps = loader.load(BPFFS, inst, cg, M)
    try:
        rep = Reconciler(KernelDataplane(maps)).apply(desired_groups(services(), NP, NODE))
        assert not rep.errors
        assert rep.ops["put_ext_frontend"] == 2 and rep.ops["put_affinity"] == 2
        # LPM: an address inside a range of the LB IP's frontend matches, one outside not
        probe = S.srcrange_key(ip_address("198.51.100.7"), 80, "TCP",
                               ip_network("203.0.113.99/32"))
        assert maps.srcranges.lookup(probe) is not None
        outside = S.srcrange_key(ip_address("198.51.100.7"), 80, "TCP",
                                 ip_network("192.0.2.1/32"))
        assert maps.srcranges.lookup(outside) is None
        key = probe
        assert key.prefixlen == 160 + 128
    finally:
        maps.close()
    maps2 = loader.load(BPFFS, inst, cg, M)  # a restarted daemon
    try:
        dp = KernelDataplane(maps2)
        snap = dp.snapshot()
        flags = {str(fe): v[2] for fe, v in snap.frontends.items()}
        assert flags == {"10.96.0.10:80/TCP": 0x2, "192.0.2.10:30080/TCP": 0x2 | 0x4 | 0x8,
                         "198.51.100.7:80/TCP": 0x2 | 0x4 | 0x8 | 0x10}
        assert {str(fe) for fe in snap.ext_frontends} == {"192.0.2.10:30080/TCP",
                                                          "198.51.100.7:80/TCP"}
        assert sorted(snap.affinity.values()) == [30, 30]
        assert sorted(len(m) for m in snap.members.values()) == [1, 2]
        assert {(str(fe), str(n)) for fe, n in snap.srcranges} == {
            ("198.51.100.7:80/TCP", "203.0.113.0/24"), ("198.51.100.7:80/TCP", "198.18.0.0/15")}
        r = Reconciler(dp)
        r.adopt(snap)
        assert sum(r.apply(desired_groups(services(), NP, NODE)).ops.values()) == 0
        rep = r.apply({})
        assert not rep.errors
        for m in (maps2.svc, maps2.svc_ext, maps2.affcfg, maps2.members, maps2.srcranges,
                  maps2.backends):
            assert list(m.keys()) == [], m.name
    finally:
        maps2.close()


def _ct_entry(ct: bpf.Map, bid: int, proto: int, dport: int, **val) -> None:
    key = tc.CtKey(saddr=S.pack_addr(ip_address("10.201.9.9")),
                   daddr=S.pack_addr(ip_address("10.96.0.10")), sport=socket.htons(40000),
                   dport=socket.htons(dport), proto=proto, dir=tc.CT_FWD)
    ct.update(key, tc.CtVal(backend=bid, **val))


def test_a_removed_backend_drains_until_no_live_tc_flow_names_it(kernel_instance):
    inst, cg = kernel_instance
    maps = loader.load(BPFFS, inst, cg, M)
    tc.load(BPFFS, inst).close()  # pins meshd_tcct_v1: the tc path is loaded
    ct = bpf.Map(bpf.obj_get(names.pin_dir(BPFFS, inst) / names.MAP_TC_CT), names.MAP_TC_CT,
                 tc.CtKey, tc.CtVal)
    try:
        dp = KernelDataplane(maps)
        r = Reconciler(dp)
        assert not r.apply(desired_groups(services((1, 2)), NP, NODE)).errors
        ids = {str(ref.address): bid for ref, bid in r.backend_ids.items()}
        now = coarse_now_ns()
        _ct_entry(ct, ids["10.1.0.2"], socket.IPPROTO_TCP, 80, refreshed_ns=now)
        _ct_entry(ct, ids["10.1.0.1"], socket.IPPROTO_TCP, 81, rst=1)  # closed: no hold
        _ct_entry(ct, ids["10.1.0.1"], socket.IPPROTO_UDP, 82,
                  refreshed_ns=now - 31 * 10**9)  # quiet UDP: no hold
        assert dp.flow_backends() == {ids["10.1.0.2"]}
        assert not r.apply(desired_groups(services((3,)), NP, NODE)).errors
        assert r.draining == 2 and maps.backends.lookup(C.c_uint32(ids["10.1.0.2"]))
        assert r.collect_drained() == 1  # 10.1.0.1: nothing live names it
        assert maps.backends.lookup(C.c_uint32(ids["10.1.0.1"])) is None
        assert maps.backends.lookup(C.c_uint32(ids["10.1.0.2"])) is not None
        _ct_entry(ct, ids["10.1.0.2"], socket.IPPROTO_TCP, 80, fin_fwd=1, fin_rev=1)
        assert r.collect_drained() == 1 and r.draining == 0
        assert maps.backends.lookup(C.c_uint32(ids["10.1.0.2"])) is None
    finally:
        ct.close()
        maps.close()
