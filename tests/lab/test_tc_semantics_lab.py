"""kube-proxy semantics on the tc path with real packets: a client namespace reaches a node
port and VIPs through node A's tc programs (routed mode; topology of test_tc_lab.py).

The reconciler does not write the semantics maps yet (meshd_svc_ext_v1, frontend flags,
meshd_srcrange_v1, meshd_affcfg_v1 / meshd_member_v1): services are applied through the
reconciler as usual, and what it will write for external_traffic_policy Local, source
ranges and affinity is written here DIRECTLY through the map handles (helpers below,
marked "direct"), to be switched to the reconciler once it does.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress

import numpy as np
import pytest

from meshd.dataplane import structs as S
from meshd.dataplane.kernel import KernelDataplane
from meshd.desired import NodePorts, desired_groups
from meshd.model import parse_service
from test_tc_lab import (CLIENT, WEB, Node, Topo, ask, sweep_leftovers, tcp_open,
                         udp_flow)

NODE_A = "10.250.1.1"  # node A's client-side address: node ports live there
NODE_PORT, EMPTY_NODE_PORT = 30080, 30099
EMPTY_UDP = "10.96.0.98"


def services() -> list:
    def eps(ids):
        return [{"address": Topo.backend(i), "ports": {"http": 8080}} for i in ids]
    svcs = [
        {"namespace": "t", "name": "web", "vips": [WEB],
         "ports": [{"name": "http", "port": 80, "protocol": "TCP", "node_port": NODE_PORT}],
         "endpoints": eps((1, 2, 3))},
        {"namespace": "t", "name": "none", "vips": ["10.96.0.97"],
         "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                    "node_port": EMPTY_NODE_PORT}], "endpoints": []},
        {"namespace": "t", "name": "none-udp", "vips": [EMPTY_UDP],
         "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}], "endpoints": []},
    ]
    return [parse_service(s, where=s["name"]) for s in svcs]


@pytest.fixture(scope="module")
def topo():
    sweep_leftovers()
    t = Topo()
    try:
        yield t.up()
    finally:
        t.down()


@pytest.fixture(scope="module")
def node(topo):
    n = Node(topo, "na", f"{topo.p}-ac")
    try:
        rep = n.rec.apply(desired_groups(services(), NodePorts(
            addresses=(ipaddress.ip_address(NODE_A),))))
        assert not rep.errors, rep.errors
        n.attach()
        yield n
    finally:
        n.close()


@pytest.fixture
def clean(node):
    """Every direct write of a test is undone after it."""
    keys: list = []
    yield keys
    for m, k in keys:
        m.delete(k)
    web = svc_key(WEB)
    val = node.maps.svc.lookup(web)
    val.flags = 0
    node.maps.svc.update(web, val)


def svc_key(addr: str, port: int = 80, proto: str = "TCP") -> S.SvcKey:
    return S.svc_key(ipaddress.ip_address(addr), port, proto)


def backend_id(node: Node, i: int) -> int:
    want = bytes(S.pack_addr(ipaddress.ip_address(Topo.backend(i))))
    return next(k.value for k, v in node.maps.backends.items() if bytes(v.addr) == want)


def names(topo: Topo, addr: str, port: int, n: int, timeout: float = 2.0) -> list[str]:
    out = []
    for _ in range(n):
        with tcp_open(topo, addr, port, timeout) as s:
            out.append(ask(s))
    return out


# ---- direct writes (what the reconciler will write) ------------------------------------------
def direct_local_group(node: Node, clean, local: tuple[int, ...], gid: int = 7001) -> None:
    """external_traffic_policy Local on the node port: the tc override of its frontend, a
    group holding the local endpoints only (none: count 0, drop when empty; keep source)."""
    flags = S.SVC_F_EXTERNAL | S.SVC_F_KEEP_SOURCE
    if local:
        ids = [backend_id(node, i) for i in local]
        table = np.array([ids[s % len(ids)] for s in range(node.maps.maglev_m)], np.uint32)
        KernelDataplane(node.maps).put_table(gid, table)
        clean.append((node.maps.maglev, ctypes.c_uint32(gid)))
    else:
        flags |= S.SVC_F_DROP_EMPTY
    key = svc_key(NODE_A, NODE_PORT)
    node.maps.svc_ext.update(key, S.SvcVal(id=gid, count=len(local), flags=flags))
    clean.insert(0, (node.maps.svc_ext, key))


def direct_flags(node: Node, addr: str, flags: int) -> int:
    val = node.maps.svc.lookup(svc_key(addr))
    val.flags |= flags
    node.maps.svc.update(svc_key(addr), val)
    return val.id


def direct_range(node: Node, clean, net: str) -> None:
    n = ipaddress.ip_network(net)
    k = S.SrcRangeKey(prefixlen=160 + 96 + n.prefixlen, vip=S.pack_addr(ipaddress.ip_address(WEB)),
                      port=S.port_be(80), proto=S.IPPROTO["TCP"],
                      src=S.pack_addr(n.network_address))
    node.maps.srcranges.update(k, ctypes.c_uint8(1))
    clean.append((node.maps.srcranges, k))


# ---- external_traffic_policy -------------------------------------------------------------------
def test_node_port_cluster_reaches_every_backend(topo, node, clean):
    assert set(names(topo, NODE_A, NODE_PORT, 40)) == {"b1", "b2", "b3"}


def test_node_port_local_reaches_only_local_endpoints(topo, node, clean):
    direct_local_group(node, clean, local=(2,))
    assert set(names(topo, NODE_A, NODE_PORT, 20)) == {"b2"}
    assert set(names(topo, WEB, 80, 40)) == {"b1", "b2", "b3"}  # the ClusterIP is internal


def test_node_port_local_without_local_endpoint_drops(topo, node, clean):
    """kube-proxy's DROP: no answer at all, the connect times out."""
    direct_local_group(node, clean, local=())
    before = node.counters()["drop_no_local"]
    with pytest.raises(OSError) as e:
        tcp_open(topo, NODE_A, NODE_PORT, timeout=0.7)
    assert isinstance(e.value, TimeoutError) or e.value.errno == errno.ETIMEDOUT
    assert node.counters()["drop_no_local"] > before


def test_node_port_without_any_endpoint_is_refused_at_once(topo, node, clean):
    """kube-proxy's REJECT: the SYN is answered with a RST: connection refused, no wait."""
    before = node.counters()["reject"]
    with pytest.raises(ConnectionRefusedError):
        tcp_open(topo, NODE_A, EMPTY_NODE_PORT, timeout=3)
    with pytest.raises(ConnectionRefusedError):  # UDP: ICMP port unreachable
        udp_flow(topo, 46000, EMPTY_UDP, 53, timeout=3)
    assert node.counters()["reject"] >= before + 2


# ---- load_balancer_source_ranges ---------------------------------------------------------------
def test_source_ranges_allowed_and_refused(topo, node, clean):
    direct_flags(node, WEB, S.SVC_F_SOURCE_RANGES)
    direct_range(node, clean, "10.250.0.0/24")  # the client's network
    assert len(names(topo, WEB, 80, 5)) == 5
    node.maps.srcranges.delete(clean.pop()[1])
    direct_range(node, clean, "192.0.2.0/24")  # not the client's
    before = node.counters()["src_range"]
    with pytest.raises(OSError) as e:
        tcp_open(topo, WEB, 80, timeout=0.7)
    assert isinstance(e.value, TimeoutError) or e.value.errno == errno.ETIMEDOUT
    assert node.counters()["src_range"] > before


# ---- session affinity --------------------------------------------------------------------------
def test_affinity_15_requests_from_one_client_land_on_one_backend(topo, node, clean):
    gid = direct_flags(node, WEB, S.SVC_F_AFFINITY)
    node.maps.affcfg.update(ctypes.c_uint32(gid), ctypes.c_uint32(10800))
    clean.append((node.maps.affcfg, ctypes.c_uint32(gid)))
    for i in (1, 2, 3):
        k = S.MemberKey(group=gid, backend=backend_id(node, i))
        node.maps.members.update(k, ctypes.c_uint32(1))
        clean.append((node.maps.members, k))
    aff = S.AffKey(netns=0, addr=S.pack_addr(ipaddress.ip_address(CLIENT)), group=gid)
    clean.append((node.maps.affinity, aff))
    got = names(topo, WEB, 80, 15)
    assert len(set(got)) == 1, got
    assert node.maps.affinity.lookup(aff).backend == backend_id(node, int(got[0][1:]))
