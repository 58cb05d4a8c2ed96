"""Socket LB end to end: real BPF on the lab's cgroup, real sockets in the lab's client
namespace, real backends in their own namespaces. The client namespace has no route to the
service range, so an untranslated VIP connect fails with ENETUNREACH instead of leaving."""

from __future__ import annotations

import pytest

from testlib import SocketLB

VIP4, VIP6, MAPPED = "10.96.0.10", "fd00:96::10", "::ffff:10.96.0.10"
# chi-square critical values at p = 0.001 for 1..5 degrees of freedom
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}




def service(lab, weights: dict[int, int] | None = None, *, name="web", port=80, proto="TCP",
            vips=(VIP4, VIP6), ready: dict[int, bool] | None = None) -> dict:
    """A service whose endpoints are lab backends b<i> (IPv4 and IPv6 addresses)."""
    weights = {1: 1, 2: 1, 3: 1} if weights is None else weights
    eps = []
    for i, w in weights.items():
        for fam in (4, 6):
            eps.append({"address": lab.backend_addr(i, fam), "ports": {"p": 8080}, "weight": w,
                        "ready": (ready or {}).get(i, True)})
    return {"namespace": "default", "name": name, "vips": list(vips),
            "ports": [{"name": "p", "port": port, "protocol": proto}], "endpoints": eps}


def tcp(lab, addr, count=30, cgroup=True, **kw) -> dict:
    return lab.agent("tcp", cgroup=cgroup, addr=addr, port=kw.pop("port", 80), count=count,
                     timeout=2, **kw)


def udp(lab, addr, count=30, connected=True, cgroup=True, port=80) -> dict:
    return lab.agent("udp", cgroup=cgroup, addr=addr, port=port, count=count, timeout=2,
                     **({"connected": True} if connected else {"unconnected": True}))


def chi_square(observed: dict[str, int], weights: dict[str, int]) -> float:
    n, w = sum(observed.values()), sum(weights.values())
    return sum((observed.get(k, 0) - n * wk / w) ** 2 / (n * wk / w) for k, wk in weights.items())


def test_tcp_via_vip_is_balanced_by_weight(lab, socklb):
    socklb.apply(service(lab, {1: 1, 2: 2, 3: 3}))
    res = tcp(lab, VIP4, count=600)
    assert res["errors"] == {}
    assert sum(res["by_backend"].values()) == 600
    stat = chi_square(res["by_backend"], {"b1": 1, "b2": 2, "b3": 3})
    assert stat < CHI2_CRIT[2], f"shares {res['by_backend']} do not follow weights 1:2:3"


def test_getpeername_returns_the_vip_not_the_backend(lab, socklb):
    socklb.apply(service(lab))
    assert tcp(lab, VIP4, count=10)["peers"] == [f"{VIP4}:80"]
    assert tcp(lab, VIP6, count=10)["peers"] == [f"[{VIP6}]:80"]


def test_ipv6_vip_reaches_ipv6_backends(lab, socklb):
    socklb.apply(service(lab))
    res = tcp(lab, VIP6, count=90)
    assert res["errors"] == {} and set(res["by_backend"]) == {"b1", "b2", "b3"}


def test_dual_stack_socket_to_ipv4_mapped_vip_is_translated(lab, socklb):
    socklb.apply(service(lab))
    res = tcp(lab, MAPPED, count=60)
    assert res["errors"] == {} and set(res["by_backend"]) == {"b1", "b2", "b3"}
    assert res["peers"] == [f"[{MAPPED}]:80"]


@pytest.mark.parametrize("connected", [True, False], ids=["connected", "unconnected"])
@pytest.mark.parametrize("vip", [VIP4, VIP6])
def test_udp_replies_come_from_the_vip(lab, socklb, connected, vip):
    socklb.apply(service(lab, proto="UDP"))
    res = udp(lab, vip, count=60, connected=connected)
    assert res["errors"] == {}
    assert set(res["by_backend"]) == {"b1", "b2", "b3"}
    host = vip if ":" not in vip else f"[{vip}]"
    assert res["sources"] == [f"{host}:80"], "recvfrom must show the VIP, not the backend"
    if connected:
        assert res["peers"] == [f"{host}:80"]


def test_service_without_usable_backends_refuses_connect(lab, socklb):
    socklb.apply(service(lab, ready={1: False, 2: False, 3: False}))
    assert tcp(lab, VIP4, count=5)["errors"] == {"ECONNREFUSED": 5}
    assert tcp(lab, VIP6, count=5)["errors"] == {"ECONNREFUSED": 5}
    socklb.apply(service(lab, proto="UDP", ready={1: False, 2: False, 3: False}))
    assert udp(lab, VIP4, count=5, connected=True)["errors"] == {"ECONNREFUSED": 5}


def test_removed_backend_gets_no_new_connection(lab, socklb):
    socklb.apply(service(lab))
    assert set(tcp(lab, VIP4, count=60)["by_backend"]) == {"b1", "b2", "b3"}
    socklb.apply(service(lab, {1: 1, 3: 1}))
    res = tcp(lab, VIP4, count=200)
    assert res["errors"] == {} and "b2" not in res["by_backend"]
    assert set(res["by_backend"]) == {"b1", "b3"}


def test_other_traffic_and_other_processes_are_untouched(lab, socklb):
    socklb.apply(service(lab))
    # a non-service destination from inside the cgroup: reaches exactly that backend
    direct = tcp(lab, lab.backend_addr(2), port=8080, count=5)
    assert direct["by_backend"] == {"b2": 5}
    assert direct["peers"] == [f"{lab.backend_addr(2)}:8080"]
    # the VIP's port on another port number is not a service
    assert tcp(lab, VIP4, port=81, count=3)["errors"] == {"ENETUNREACH": 3}
    # a process outside the cgroup is not translated: no route to the service range
    assert tcp(lab, VIP4, count=3, cgroup=False)["errors"] == {"ENETUNREACH": 3}


def test_teardown_leaves_no_pin_and_no_attachment(lab):
    s = SocketLB(lab)
    s.apply(service(lab))
    pin_dir = s.maps.pin_dir
    s.close()
    assert not pin_dir.exists()
    # the VIP is no longer translated for processes in the cgroup
    assert tcp(lab, VIP4, count=3)["errors"] == {"ENETUNREACH": 3}
