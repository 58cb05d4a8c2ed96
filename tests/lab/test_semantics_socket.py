"""kube-proxy semantics through the real socket datapath: the reconciler the daemon uses,
the real BPF on the lab's cgroup, real connects from the lab's client namespace to backends
in their own namespaces. The client namespace has no route to the service range (nor to the
external addresses used here): anything not translated fails with ENETUNREACH, nothing
leaves the lab.

The table follows kube-proxy's rules (pkg/proxy/topology.go CategorizeEndpoints and the
REJECT/DROP rules of its proxiers), seen by an internal client: which backends answer,
ECONNREFUSED (no endpoint at all) vs EHOSTUNREACH (Local policy, none on this node: drop,
failed at once rather than left hanging)."""

from __future__ import annotations

import json
import sys
import time

import pytest

from meshd.desired import NodeInfo, NodePorts, desired_groups
from meshd.model import parse_service

VIP = "10.96.0.10"
EXT_IP = "10.203.9.9"  # an external IP: no route from the client namespace either
NODE = NodeInfo("node-1", "zone-a")
SOURCES = [f"10.204.0.{k}" for k in range(1, 11)]  # extra client addresses (bound sources)

CLIENT = r"""
import errno, json, socket, sys, time
addr, port, count, bind = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
by, errs, worst = {}, {}, 0.0
for _ in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    t0 = time.monotonic()
    try:
        if bind:
            s.bind((bind, 0))
        s.connect((addr, port))
        s.sendall(b"hi\n")
        name = s.recv(64).decode().strip()
        by[name] = by.get(name, 0) + 1
    except OSError as e:
        n = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
        errs[n] = errs.get(n, 0) + 1
    finally:
        worst = max(worst, time.monotonic() - t0)
        s.close()
print(json.dumps({"by_backend": by, "errors": errs, "worst_s": worst}))
"""


def connect(lab, addr=VIP, port=80, count=15, bind="") -> dict:
    cp = lab.exec("cli", [sys.executable, "-c", CLIENT, addr, str(port), str(count), bind],
                  cgroup=True, timeout=60)
    return json.loads(cp.stdout)


def ep(lab, i, node=None, **kw) -> dict:
    return {"address": lab.backend_addr(i), "ports": {"http": 8080}, "node": node, **kw}


def service(lab, eps, **over) -> dict:
    d = {"namespace": "t", "name": "web", "vips": [VIP],
         "ports": [{"name": "http", "port": 80, "protocol": "TCP"}], "endpoints": eps}
    d.update(over)
    return d


def apply(socklb, *records, node_ports=NodePorts()):
    parsed = [parse_service(r, where=r["name"]) for r in records]
    rep = socklb.rec.apply(desired_groups(parsed, node_ports, NODE))
    assert not rep.errors, rep.errors
    return rep


# (case, endpoints as (backend, node, conditions), service fields, expected answer):
# a set of backends that answer, or the errno every connect fails with
TABLE = [
    ("ready-only", [(1, None, {}), (2, None, {"ready": False}),
                    (3, None, {"ready": False, "serving": True, "terminating": True})],
     {}, {"b1"}),
    ("terminating-fallback", [(1, None, {"ready": False}),
                              (2, None, {"ready": False, "serving": True, "terminating": True}),
                              (3, None, {"ready": False, "serving": False, "terminating": True})],
     {}, {"b2"}),
    ("nothing-usable-refused", [(1, None, {"ready": False}),
                                (2, None, {"ready": False, "serving": False,
                                           "terminating": True})], {}, "ECONNREFUSED"),
    ("no-endpoints-refused", [], {}, "ECONNREFUSED"),
    ("itp-local-uses-local", [(1, "node-1", {}), (2, "node-2", {}), (3, "node-2", {})],
     {"internal_traffic_policy": "Local"}, {"b1"}),
    ("itp-local-none-here-drops", [(2, "node-2", {}), (3, "node-2", {})],
     {"internal_traffic_policy": "Local"}, "EHOSTUNREACH"),
    ("itp-local-no-endpoints-refused", [], {"internal_traffic_policy": "Local"},
     "ECONNREFUSED"),
    ("itp-local-terminating-local-fallback",
     [(1, "node-1", {"ready": False, "serving": True, "terminating": True}),
      (2, "node-2", {})], {"internal_traffic_policy": "Local"}, {"b1"}),
    ("hints-this-zone", [(1, None, {"zone": "zone-a", "hints_for_zones": ["zone-a"]}),
                         (2, None, {"zone": "zone-b", "hints_for_zones": ["zone-b"]}),
                         (3, None, {"zone": "zone-b", "hints_for_zones": ["zone-b"]})],
     {"topology_mode": "Auto"}, {"b1"}),
    ("hints-ignored-when-one-lacks-them",
     [(1, None, {"zone": "zone-a", "hints_for_zones": ["zone-a"]}),
      (2, None, {"zone": "zone-b", "hints_for_zones": ["zone-b"]}), (3, None, {})],
     {"traffic_distribution": "PreferClose"}, {"b1", "b2", "b3"}),
    ("hints-off-without-topology",
     [(1, None, {"zone": "zone-a", "hints_for_zones": ["zone-a"]}),
      (2, None, {"zone": "zone-b", "hints_for_zones": ["zone-b"]})], {}, {"b1", "b2"}),
]


@pytest.mark.parametrize("case,eps,fields,expect", TABLE, ids=[t[0] for t in TABLE])
def test_kube_proxy_table_for_internal_clients(lab, socklb, case, eps, fields, expect):
    apply(socklb, service(lab, [ep(lab, i, node, **c) for i, node, c in eps], **fields))
    res = connect(lab, count=30 if isinstance(expect, set) else 5)
    if isinstance(expect, set):
        assert res["errors"] == {} and set(res["by_backend"]) == expect, res
    else:
        assert res["errors"] == {expect: 5}, res
        assert res["worst_s"] < 0.5, f"{expect} must come at once, not after a timeout: {res}"


def test_external_frontends_from_the_node_get_the_cluster_selection(lab, socklb):
    """A node port on a node address and an external IP, reached by a process on the node
    (in the cgroup): external_traffic_policy Local has no endpoint on this node, yet the
    node's own clients get every ready endpoint, as with kube-proxy."""
    node_addr = lab.client_addr(1)  # an address of this "node" (the client namespace)
    rec = service(lab, [ep(lab, 1, "node-2"), ep(lab, 2, "node-2")],
                  external_traffic_policy="Local", external_ips=[EXT_IP],
                  ports=[{"name": "http", "port": 80, "protocol": "TCP", "node_port": 30080}])
    from ipaddress import ip_address
    apply(socklb, rec, node_ports=NodePorts((ip_address(node_addr),), (30000, 32767)))
    for addr, port in ((node_addr, 30080), (EXT_IP, 80), (VIP, 80)):
        res = connect(lab, addr, port, count=30)
        assert res["errors"] == {} and set(res["by_backend"]) == {"b1", "b2"}, (addr, res)
    # the node port's number on an address that is not the node's: not a service
    assert connect(lab, "10.203.9.8", 30080, count=2)["errors"] == {"ENETUNREACH": 2}


def _bound_sources(lab) -> None:
    """Extra client addresses on the client namespace's loopback, routed back by every
    backend (all inside the lab)."""
    for a in SOURCES:
        lab.exec("cli", ["ip", "addr", "add", f"{a}/32", "dev", "lo"])
    for i in range(1, lab.backends + 1):
        lab.exec(f"b{i}", ["ip", "route", "add", "10.204.0.0/24", "via", lab.client_addr(i)])


AFF = {"session_affinity": "ClientIP", "affinity_timeout_seconds": 30}


def test_affinity_holds_per_client_and_differs_between_clients(lab, socklb):
    apply(socklb, service(lab, [ep(lab, i) for i in (1, 2, 3)], **AFF))
    res = connect(lab, count=15)
    assert res["errors"] == {} and len(res["by_backend"]) == 1, res  # 15 on one backend
    _bound_sources(lab)
    seen = {}
    for a in SOURCES:  # each bound source address is another client
        r = connect(lab, count=15, bind=a)
        assert r["errors"] == {} and len(r["by_backend"]) == 1, (a, r)
        seen[a] = next(iter(r["by_backend"]))
    # 10 clients over 3 backends all on one: p = 3^-9
    assert len(set(seen.values())) > 1, seen
    # each kept its backend
    again = {a: next(iter(connect(lab, count=3, bind=a)["by_backend"])) for a in SOURCES[:3]}
    assert again == {a: seen[a] for a in SOURCES[:3]}
    # keyed on the client's netns cookie and its bound address
    keys = list(socklb.maps.affinity.keys())
    assert len(keys) == 1 + len(SOURCES) and len({k.netns for k in keys}) == 1
    assert keys[0].netns != 0


def test_without_affinity_one_client_spreads(lab, socklb):
    apply(socklb, service(lab, [ep(lab, i) for i in (1, 2, 3)]))
    assert len(connect(lab, count=30)["by_backend"]) > 1
    assert list(socklb.maps.affinity.keys()) == []


def test_affinity_expires_after_its_timeout(lab, socklb):
    apply(socklb, service(lab, [ep(lab, i) for i in (1, 2, 3)], session_affinity="ClientIP",
                          affinity_timeout_seconds=1))
    first = connect(lab, count=5)["by_backend"]
    assert len(first) == 1
    chosen = {next(iter(first))}
    for _ in range(10):  # each round: wait out the timeout, then a fresh pick sticks again
        time.sleep(1.2)
        r = connect(lab, count=5)["by_backend"]
        assert len(r) == 1, r  # within the timeout: one backend
        chosen.add(next(iter(r)))
        if len(chosen) > 1:
            break
    assert len(chosen) > 1, "after the timeout the client must be balanced afresh"


def test_a_backend_leaving_the_selection_breaks_affinity_to_it(lab, socklb):
    apply(socklb, service(lab, [ep(lab, i) for i in (1, 2, 3)], **AFF))
    r = connect(lab, count=5)["by_backend"]
    assert len(r) == 1
    gone = int(next(iter(r))[1:])
    apply(socklb, service(lab, [ep(lab, i) for i in (1, 2, 3) if i != gone], **AFF))
    r2 = connect(lab, count=15)
    assert r2["errors"] == {} and len(r2["by_backend"]) == 1, r2
    assert f"b{gone}" not in r2["by_backend"]
    # coming back does not pull the client back: its new entry is followed
    apply(socklb, service(lab, [ep(lab, i) for i in (1, 2, 3)], **AFF))
    assert connect(lab, count=15)["by_backend"] == r2["by_backend"]


def test_deleted_service_vip_is_not_translated_while_its_endpoints_remain(lab, etcd,
                                                                          make_meshd):
    """kube-proxy forgets a deleted Service at once; meshd must not REFUSE its VIP (that
    would still be a translation): with the endpoint records still in etcd, the VIP is
    plain again (ENETUNREACH here: the lab has no route to it)."""
    from meshdlib import b64, backends, be, group
    m = make_meshd({"endpoints": [etcd.url], "dial_timeout": 2})
    m.start()
    m.wait(m.synced, "first sync")
    m.cli("service", "put", "default/web", "--vip", VIP, "--port", "http=80/TCP")
    m.cli("endpoint", "add", "default/web", "b1", "--address", lab.backend_addr(1),
          "--port", "http=8080")
    m.wait(lambda r: backends(r, group("web")) == {be(lab, 1)}, "endpoint b1")
    assert connect(lab, count=5)["by_backend"] == {"b1": 5}
    etcd.api("/v3/kv/deleterange", {"key": b64("/meshd/services/default/web")})
    left = etcd.api("/v3/kv/range", {"key": b64("/meshd/endpoints/default/web/"),
                                     "range_end": b64("/meshd/endpoints/default/web0")})
    assert int(left.get("count", 0)) == 1  # the endpoint record is still there
    m.wait(lambda r: group("web") not in {g["group"] for g in r["services"]
                                          if g.get("state") != "missing"}, "service gone")
    assert connect(lab, count=3)["errors"] == {"ENETUNREACH": 3}
