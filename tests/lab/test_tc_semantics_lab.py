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


# ---- the same through the Kubernetes API source -------------------------------------------------
def test_through_the_kubernetes_api_node_port_local_and_lb_source_ranges(topo, node, tmp_path):
    """A LoadBalancer Service with externalTrafficPolicy Local, a nodePort, an LB ingress IP and
    loadBalancerSourceRanges, and its EndpointSlice, created in the (test) Kubernetes API:
    the source translates them and the tc path enforces them for a client on another host
    (issue 10: kube-proxy's rules through the API source)."""
    import asyncio
    import contextlib
    import time

    from kubeapi.harness import KubeApiServer
    from kubeapi.objects import endpoint, endpoint_slice, service
    from meshd.config import KubernetesConfig
    from meshd.sources.kubernetes import KubernetesSource
    lb = "10.96.7.8"
    np_ = NodePorts(addresses=(ipaddress.ip_address(NODE_A),))

    def web(ranges):
        s = service("t", "web", [WEB], [{"name": "http", "port": 80, "targetPort": "http",
                                         "nodePort": NODE_PORT}], type_="LoadBalancer",
                    externalTrafficPolicy="Local", loadBalancerSourceRanges=ranges)
        s["status"] = {"loadBalancer": {"ingress": [{"ip": lb}]}}
        return s

    def probe(addr: str, port: int) -> str:
        try:
            with tcp_open(topo, addr, port, timeout=0.7) as s:
                return ask(s)
        except OSError:
            return "no answer"

    with KubeApiServer(tmp_path / "api", bookmark_interval=0.2) as api:
        api.create("services", web(["10.250.0.0/24"]))  # the client's network
        api.create("endpointslices", endpoint_slice(
            "t", "web-1", "web", [endpoint(Topo.backend(i), node=ENDPOINT_NODES[i])
                                  for i in (1, 2, 3)], [{"name": "http", "port": 8080}]))

        async def emit(snap) -> None:
            rep = node.rec.apply(desired_groups(list(snap.services), np_, THIS_NODE))
            assert not rep.errors, rep.errors

        async def until(pred, what: str) -> None:
            end = time.monotonic() + 15
            while not await asyncio.to_thread(pred):
                assert time.monotonic() < end, what
                await asyncio.sleep(0.2)

        async def body() -> None:
            src = KubernetesSource(KubernetesConfig(kubeconfig=api.kubeconfig(
                tmp_path / "kubeconfig")), node_name=THIS_NODE.name)
            task = asyncio.create_task(src.run(emit))
            try:
                # externalTrafficPolicy Local: only b2 (on node-a) behind the node port and
                # the LB IP; the ClusterIP keeps every endpoint
                await until(lambda: set(names(topo, NODE_A, NODE_PORT, 10)) == {"b2"},
                            "node port: local endpoint only")
                assert set(names(topo, lb, 80, 10)) == {"b2"}
                assert set(names(topo, WEB, 80, 30)) == {"b1", "b2", "b3"}
                # loadBalancerSourceRanges no longer admit the client: the LB IP goes quiet
                s = api.get("services", "t", "web")
                s["spec"]["loadBalancerSourceRanges"] = ["192.0.2.0/24"]
                api.replace("services", s)
                await until(lambda: probe(lb, 80) == "no answer", "source ranges enforced")
                assert probe(NODE_A, NODE_PORT) == "b2"  # ranges are for the LB IP only
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(task, 5)

        try:
            asyncio.run(asyncio.wait_for(body(), 90))
        finally:
            apply(node)
