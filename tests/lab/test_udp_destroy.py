"""Connected UDP sockets aimed at a removed backend are destroyed in the kernel, so
long-lived UDP clients (resolvers) move on; nothing else is touched."""

from __future__ import annotations

import subprocess
import sys


from meshd.dataplane.sockdestroy import destroy_udp


VIP = "10.96.0.53"

CLIENT = r"""
import errno, socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((addr, port))
s.send(b"hi\n")
print(s.recv(100).decode().strip(), flush=True)
sys.stdin.readline()
try:
    s.send(b"hi\n")
    print("ok " + s.recv(100).decode().strip(), flush=True)
except OSError as e:
    print("err " + errno.errorcode.get(e.errno, str(e.errno)), flush=True)
"""


def udp_service(lab, backends: list[int]) -> dict:
    return {"namespace": "kube-system", "name": "dns", "vips": [VIP],
            "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}],
            "endpoints": [{"address": lab.backend_addr(i), "ports": {"dns": 8080}}
                          for i in backends]}




def start_client(lab, addr: str, port: int):
    p = lab.run("cli", [sys.executable, "-c", CLIENT, addr, str(port)], cgroup=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    first = p.stdout.readline().strip()
    assert first.startswith("b"), f"client got no reply: {first!r}"
    return p, first


def finish(p) -> str:
    out, _ = p.communicate("\n", timeout=10)
    return out.strip()


def test_sockets_on_a_removed_backend_are_destroyed_and_only_those(lab, socklb):
    socklb.apply(udp_service(lab, [1, 2, 3]))
    clients = [start_client(lab, VIP, 53) for _ in range(12)]
    direct, _ = start_client(lab, lab.backend_addr(1), 8080)  # not translated by meshd
    on = {name for _p, name in clients}
    victim = sorted(on)[0]
    keep = [i for i in (1, 2, 3) if f"b{i}" != victim]
    rep = socklb.apply(udp_service(lab, keep))
    assert {be.name for _fe, be in rep.removed} == {
        f"{lab.backend_addr(int(victim[1:]))}:8080/UDP"}

    n = destroy_udp(socklb.maps.pin_dir, rep.removed, lab.cgroup)

    results = [(name, finish(p)) for p, name in clients]
    doomed = [r for name, r in results if name == victim]
    alive = [r for name, r in results if name != victim]
    assert n == len(doomed) >= 1
    # the socket is aborted and disconnected: the next send() fails with EDESTADDRREQ
    # (a receive would report the pending ECONNABORTED); the client reconnects elsewhere
    assert all(r in ("err EDESTADDRREQ", "err ECONNABORTED") for r in doomed), results
    assert all(r.startswith("ok b") for r in alive), results
    assert finish(direct) == "ok b1"  # a socket meshd did not translate is never touched


def test_nothing_to_destroy_costs_nothing(lab, socklb):
    rep = socklb.apply(udp_service(lab, [1, 2]))
    assert rep.removed == set()
    assert destroy_udp(socklb.maps.pin_dir, rep.removed, lab.cgroup) == 0


def test_more_pairs_than_the_doomed_map_holds_still_destroy(lab, socklb):
    """A sync that removes very many (VIP, backend) pairs (a large UDP service scaled down,
    or many services) goes to the kernel in passes: the doomed map holds 65,536 pairs, and
    one pair more used to fail the whole call, destroying nothing."""
    import ipaddress

    from meshd.dataplane.sockdestroy import DOOMED_MAX
    from meshd.desired import BackendRef, Frontend
    socklb.apply(udp_service(lab, [1, 2, 3]))
    clients = [start_client(lab, VIP, 53) for _ in range(9)]
    victim = sorted({name for _p, name in clients})[0]
    keep = [i for i in (1, 2, 3) if f"b{i}" != victim]
    rep = socklb.apply(udp_service(lab, keep))
    fe = Frontend(ipaddress.ip_address("10.96.200.1"), 53, "UDP")
    base = int(ipaddress.ip_address("10.240.0.0"))
    bogus = [(fe, BackendRef(ipaddress.ip_address(base + i), 53, "UDP"))
             for i in range(DOOMED_MAX + 10)]
    n = destroy_udp(socklb.maps.pin_dir, bogus + sorted(rep.removed), lab.cgroup)
    results = [(name, finish(p)) for p, name in clients]
    doomed = [r for name, r in results if name == victim]
    assert n == len(doomed) >= 1
    assert all(r in ("err EDESTADDRREQ", "err ECONNABORTED") for r in doomed), results
    assert all(r.startswith("ok b") for name, r in results if name != victim), results
