"""Socket LB end to end: real BPF on the lab's cgroup, real sockets in the lab's client
namespace, real backends in their own namespaces. The client namespace has no route to the
service range, so an untranslated VIP connect fails with ENETUNREACH instead of leaving."""

from __future__ import annotations

import subprocess
import sys

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


SELF_CLIENT = r"""
import errno, socket, sys
sys.stdin.readline()  # the data plane is told who "self" is first
for family, addr in ((socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect((addr, 80))
        s.sendall(b"hi\n")
        print("ok " + s.recv(64).decode().strip(), flush=True)
    except OSError as e:
        print("err " + errno.errorcode.get(e.errno, str(e.errno)), flush=True)
    finally:
        s.close()
"""


def test_the_daemons_own_connections_are_never_translated(lab, socklb):
    """A VIP equal to an address the daemon itself needs (an etcd endpoint) must not cut the
    daemon off: sockets of the process the data plane was loaded for ("self", by default
    the caller of loader.load(), i.e. the daemon) keep their destination; every other
    process in the cgroup is translated. Self's connect stays in the client namespace,
    which has no route to the service range: ENETUNREACH, nothing leaves."""
    from meshd.dataplane import loader
    from testlib import BPFFS
    socklb.apply(service(lab))
    procs = [lab.run("cli", [sys.executable, "-c", SELF_CLIENT, VIP4, VIP6], cgroup=True,
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    me, other = procs
    # what a restarted daemon does (programs swapped in place), told who it is
    loader.load(BPFFS, socklb.instance, lab.cgroup, 1021, self_pid=me.pid).close()
    out = {}
    for name, p in (("self", me), ("other", other)):
        out[name] = p.communicate("\n", timeout=15)[0].split("\n")[:2]
    assert out["self"] == ["err ENETUNREACH", "err ENETUNREACH"], out
    assert all(line.startswith("ok b") for line in out["other"]), out


PEER_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=2)
print(s.getpeername()[0], flush=True)
sys.stdin.readline()
print(s.getpeername()[0], flush=True)
s.sendall(b"hi\n")
print(s.recv(64).decode().strip(), flush=True)
"""


def test_a_long_lived_socket_keeps_the_vip_as_its_peer_whatever_the_lru_drops(lab, socklb):
    """getpeername() of a connected socket is the VIP for the socket's whole life: the
    translation is kept in the socket's own storage, not in the LRU meshd_revnat_v1, which
    only unconnected UDP uses and which evicts entries when other sockets come and go
    (here: every entry is dropped, as eviction would)."""
    socklb.apply(service(lab))
    p = lab.run("cli", [sys.executable, "-c", PEER_CLIENT, VIP4], cgroup=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == VIP4
    revnat = socklb.maps.revnat
    held = list(revnat.keys())
    for key in held:
        revnat.delete(key)
    out = p.communicate("\n", timeout=10)[0].split()
    assert out[0] == VIP4, out  # was the backend's address once its entry was gone
    assert out[1].startswith("b")
    assert held == [], "connect() needs no LRU entry"


def test_teardown_leaves_no_pin_and_no_attachment(lab):
    s = SocketLB(lab)
    s.apply(service(lab))
    pin_dir = s.maps.pin_dir
    s.close()
    assert not pin_dir.exists()
    # the VIP is no longer translated for processes in the cgroup
    assert tcp(lab, VIP4, count=3)["errors"] == {"ENETUNREACH": 3}
