"""kube-proxy semantics on the tc path with real packets: a client namespace reaches a node
port, load-balancer IPs and VIPs through node A's tc programs (routed mode; topology of
test_tc_lab.py). Every case is a service record applied through the daemon's own path
(model -> desired groups -> reconciler -> maps): external_traffic_policy, no endpoint at
all, load_balancer_source_ranges, session affinity."""

from __future__ import annotations

import errno
import ipaddress

import pytest

from meshd.desired import NodeInfo, NodePorts, desired_groups
from meshd.model import parse_service
from test_tc_lab import (WEB, Node, Topo, ask, tcp_open, udp_flow,
                         topo)  # noqa: F401  (the lab topology fixture, one per module)

NODE_A = "10.250.1.1"  # node A's client-side address: node ports live there
NODE_PORT, EMPTY_NODE_PORT = 30080, 30099
EMPTY_UDP = "10.96.0.98"
THIS_NODE = NodeInfo("node-a")
ENDPOINT_NODES = {1: "node-x", 2: "node-a", 3: "node-y"}  # b2 is local to node A


def services(**web) -> list:
    def eps(ids):
        return [{"address": Topo.backend(i), "ports": {"http": 8080},
                 "node": ENDPOINT_NODES[i]} for i in ids]
    svcs = [
        {"namespace": "t", "name": "web", "vips": [WEB],
         "ports": [{"name": "http", "port": 80, "protocol": "TCP", "node_port": NODE_PORT}],
         "endpoints": eps(web.pop("backends", (1, 2, 3))), **web},
        {"namespace": "t", "name": "none", "vips": ["10.96.0.97"],
         "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                    "node_port": EMPTY_NODE_PORT}], "endpoints": []},
        {"namespace": "t", "name": "none-udp", "vips": [EMPTY_UDP],
         "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}], "endpoints": []},
    ]
    return [parse_service(s, where=s["name"]) for s in svcs]


def apply(node: Node, **web) -> None:
    rep = node.rec.apply(desired_groups(services(**web), NodePorts(
        addresses=(ipaddress.ip_address(NODE_A),)), THIS_NODE))
    assert not rep.errors, rep.errors


@pytest.fixture(scope="module")
def node(topo):
    n = Node(topo, "na", f"{topo.p}-ac")
    try:
        apply(n)
        n.attach()
        yield n
    finally:
        n.close()


@pytest.fixture
def clean(node):
    """Each test starts from, and leaves, the plain services."""
    apply(node)
    yield
    apply(node)


def names(topo: Topo, addr: str, port: int, n: int, timeout: float = 2.0) -> list[str]:
    out = []
    for _ in range(n):
        with tcp_open(topo, addr, port, timeout) as s:
            out.append(ask(s))
    return out


# ---- external_traffic_policy -------------------------------------------------------------------
def test_node_port_cluster_reaches_every_backend(topo, node, clean):
    assert set(names(topo, NODE_A, NODE_PORT, 40)) == {"b1", "b2", "b3"}


def test_node_port_local_reaches_only_local_endpoints(topo, node, clean):
    apply(node, external_traffic_policy="Local")
    assert set(names(topo, NODE_A, NODE_PORT, 20)) == {"b2"}
    assert set(names(topo, WEB, 80, 40)) == {"b1", "b2", "b3"}  # the ClusterIP is internal


def test_node_port_local_without_local_endpoint_drops(topo, node, clean):
    """kube-proxy's DROP: no answer at all, the connect times out."""
    apply(node, external_traffic_policy="Local", backends=(1, 3))  # none on node A
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
    lb = "10.96.7.7"  # a load-balancer IP of the service (routed to node A like the VIPs)
    apply(node, load_balancer_ips=[lb], load_balancer_source_ranges=["10.250.0.0/24"])
    assert len(names(topo, lb, 80, 5)) == 5  # the client's network
    apply(node, load_balancer_ips=[lb], load_balancer_source_ranges=["192.0.2.0/24"])
    assert len(names(topo, WEB, 80, 3)) == 3  # the VIP itself has no ranges
    before = node.counters()["src_range"]
    with pytest.raises(OSError) as e:
        tcp_open(topo, lb, 80, timeout=0.7)
    assert isinstance(e.value, TimeoutError) or e.value.errno == errno.ETIMEDOUT
    assert node.counters()["src_range"] > before


# ---- session affinity --------------------------------------------------------------------------
def test_affinity_15_requests_from_one_client_land_on_one_backend(topo, node, clean):
    plain = names(topo, WEB, 80, 30)
    assert len(set(plain)) > 1  # without affinity the client's connections spread
    apply(node, session_affinity="ClientIP", affinity_timeout_seconds=60)
    got = names(topo, WEB, 80, 15)
    assert len(set(got)) == 1, got
    assert node.counters()["aff_follow"] >= 14
