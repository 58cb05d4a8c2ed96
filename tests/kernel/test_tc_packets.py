"""The tc load balancer, packet by packet, through BPF_PROG_TEST_RUN.

Each case is a list of steps {direction, input packet, expected verdict, expected output
packet}, all built with scapy. An expected output is built with its checksums left to
scapy (chksum=None), so comparing bytes checks every field AND every checksum the program
patched incrementally. The backend a new flow should get is computed here from the Maglev
table (meshd.maglev) and the flow hash mirror (tc.flow_slot), not read from the kernel.
The programs run against the maps of a real instance (socket LB loaded into its own empty
cgroup, services written by the reconciler); nothing is attached to any interface.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import random
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror, IPOption_Router_Alert, \
    IPOption_RR, fragment
from scapy.layers.inet6 import ICMPv6DestUnreach, IPerror6, IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from meshd import maglev, names
from meshd.dataplane import libbpf as bpf
from meshd.dataplane import loader, tc
from meshd.dataplane import structs as S
from meshd.dataplane.kernel import KernelDataplane
from meshd.desired import desired_groups
from meshd.model import parse_service
from meshd.reconciler import Reconciler
from testlib import BPFFS, CGROUP2, TEST_PREFIX, claim, release

M = 1021
# A translated packet returns UNSPEC too (the filter chain goes on: later filters of other
# tools see it); TC_ACT_OK is never returned. Steps say XLATED (the output packet is
# compared) or UNSPEC (untouched): both are the verdict -1.
UNSPEC, SHOT, REDIRECT = tc.TC_ACT_UNSPEC, tc.TC_ACT_SHOT, tc.TC_ACT_REDIRECT
XLATED = UNSPEC
MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"  # explicit: scapy must not resolve
CLIENT, CLIENT6 = "10.250.0.1", "fd00:250::1"
VIP, VIP2, DNS_VIP, EMPTY_VIP = "10.96.0.10", "10.96.0.11", "10.96.0.53", "10.96.0.99"
VIP6, DNS_VIP6 = "fd00:96::10", "fd00:96::53"
ROUTER = "10.0.9.1"
TCP_P, UDP_P = 6, 17


def backends4(ids) -> list[str]:
    return [f"10.0.9.{10 + i}" for i in ids]


def backends6(ids) -> list[str]:
    return [f"fd00:9::{10 + i:x}" for i in ids]


def web(ids=(1, 2, 3), vips=(VIP, VIP2, VIP6), name="web") -> dict:
    eps = [{"address": a, "ports": {"http": 8080}} for a in backends4(ids) + backends6(ids)]
    return {"namespace": "t", "name": name, "vips": list(vips),
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}], "endpoints": eps}


def dns(ids=(1, 2, 3)) -> dict:
    eps = [{"address": a, "ports": {"dns": 5353}} for a in backends4(ids) + backends6(ids)]
    return {"namespace": "t", "name": "dns", "vips": [DNS_VIP, DNS_VIP6],
            "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}], "endpoints": eps}


def empty() -> dict:
    return {"namespace": "t", "name": "empty", "vips": [EMPTY_VIP],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}], "endpoints": []}


def expected_backend(addrs: list[str], port: int, proto: str, client: str, sport: int,
                     dport: int) -> str:
    """Which of `addrs` a new flow gets: Maglev over the stable names, slot from the hash."""
    refs = sorted((f"[{a}]:{port}/{proto}" if ":" in a else f"{a}:{port}/{proto}", a)
                  for a in addrs)
    table = maglev.build_table([(n, 1) for n, _a in refs], M)
    slot = tc.flow_slot(ipaddress.ip_address(client), sport, dport,
                        TCP_P if proto == "TCP" else UDP_P, M)
    return refs[table[slot]][1]


class Env:
    """An instance's maps (socket LB loaded, reconciler) with the tc object loaded on them."""

    def __init__(self, ct_max_entries: int | None = None, snat_ports=None):
        self.instance = TEST_PREFIX + secrets.token_hex(4)
        claim(self.instance)
        self.cgroup = CGROUP2 / self.instance
        self.cgroup.mkdir()
        self.maps = self.obj = None
        try:
            self.maps = loader.load(BPFFS, self.instance, self.cgroup, M, metrics=False)
            self.rec = Reconciler(KernelDataplane(self.maps))
            self.obj = tc.load(BPFFS, self.instance, ct_max_entries, snat_ports)
            self.fd = {"in": self.obj.prog_fd(names.TC_PROG_INGRESS),
                       "out": self.obj.prog_fd(names.TC_PROG_EGRESS)}
            self.tcmaps = tc.open_maps(BPFFS, self.instance)
        except BaseException:
            self.close()
            raise

    def apply(self, *services: dict) -> None:
        parsed = [parse_service(s, where=s["name"]) for s in services]
        report = self.rec.apply(desired_groups(parsed))
        assert not report.errors, report.errors

    def run(self, direction: str, pkt) -> tuple[int, bytes]:
        verdict, out, _ns = bpf.prog_test_run(self.fd[direction], bytes(pkt), direction)
        return verdict, out

    def counters(self) -> dict[str, int]:
        return self.tcmaps.counters()

    def close(self) -> None:
        if getattr(self, "tcmaps", None):
            self.tcmaps.close()
        if self.obj:
            self.obj.close()
        if self.maps:
            self.maps.close()
        loader.remove(BPFFS, self.instance)
        self.cgroup.rmdir()
        release(self.instance)


@pytest.fixture(scope="module")
def env():
    e = Env()
    try:
        e.apply(web(), dns(), empty())
        yield e
    finally:
        e.close()


@pytest.fixture
def fresh():
    """A private instance, for cases that change services or fill the conntrack map."""
    made: list[Env] = []

    def make(*services, ct_max_entries=None) -> Env:
        e = Env(ct_max_entries)
        made.append(e)
        if services:
            e.apply(*services)
        return e
    try:
        yield make
    finally:
        for e in made:
            e.close()


# ---- the fixture table -------------------------------------------------------------------------
def eth(payload, v6=False):
    return Ether(src=MAC_A, dst=MAC_B, type=0x86DD if v6 else 0x0800) / payload


def quote(src, dst, sport, dport, payload, chksum=None, **ip):
    """What an ICMP error quotes: a whole UDP datagram as it was sent, checksums valid (the
    program must keep the quoted UDP checksum right for the translated quote); chksum=0: a
    datagram sent without a checksum."""
    l3 = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst, **ip)
    return Raw(bytes(l3 / UDP(sport=sport, dport=dport, chksum=chksum) / Raw(payload)))


def rebuilt(pkt):
    """A copy with every checksum left to scapy."""
    p = pkt.copy()
    for layer in p.iterpayloads():
        if "chksum" in layer.fields and not isinstance(layer, (UDPerror,)):
            if not (isinstance(layer, UDP) and layer.chksum == 0):
                del layer.chksum
        if "cksum" in layer.fields:
            del layer.cksum
    return p


def be4(port, proto, sport, dport=None, client=CLIENT):
    return expected_backend(backends4((1, 2, 3)), port, proto, client, sport, dport or
                            (80 if proto == "TCP" else 53))


def be6(port, proto, sport, dport=None):
    return expected_backend(backends6((1, 2, 3)), port, proto, CLIENT6, sport, dport or
                            (80 if proto == "TCP" else 53))


@dataclass
class Step:
    direction: str  # "in" (ingress program) or "out" (egress program)
    input: object
    verdict: int
    expected: object = None  # None: the packet must come out unchanged


@dataclass
class Case:
    description: str
    steps: list[Step] = field(default_factory=list)


def syn(sport, dst=VIP, dport=80, src=CLIENT, flags="S", **ip):
    return eth(IP(src=src, dst=dst, **ip) / TCP(sport=sport, dport=dport, flags=flags, seq=1000))


def dnat_tcp(pkt, backend, port=8080):
    out = rebuilt(pkt)
    out[IP].dst = backend
    out[TCP].dport = port
    return out


def udp_req(sport, dst=DNS_VIP, dport=53, payload=b"query", chksum=None, src=CLIENT):
    u = UDP(sport=sport, dport=dport) if chksum is None else UDP(sport=sport, dport=dport,
                                                                  chksum=chksum)
    return eth(IP(src=src, dst=dst, id=4242) / u / Raw(payload))


def cases() -> list[Case]:
    out = []

    def case(desc, *steps):
        out.append(Case(desc, list(steps)))

    # ---- translation, IPv4
    p = syn(40001)
    case("TCP SYN to a VIP:port goes to the Maglev backend, checksums patched",
         Step("in", p, XLATED, dnat_tcp(p, be4(8080, "TCP", 40001))))
    p = udp_req(40002)
    out_p = rebuilt(p)
    out_p[IP].dst, out_p[UDP].dport = be4(5353, "UDP", 40002), 5353
    case("UDP to a VIP:port goes to the Maglev backend", Step("in", p, XLATED, out_p))
    p = udp_req(40003, chksum=0)
    out_p = rebuilt(p)
    out_p[IP].dst, out_p[UDP].dport, out_p[UDP].chksum = be4(5353, "UDP", 40003), 5353, 0
    case("UDP without checksum (0) keeps 0", Step("in", p, XLATED, out_p))
    b = be4(8080, "TCP", 40004)
    p = syn(40004)
    reply = eth(IP(src=b, dst=CLIENT) / TCP(sport=8080, dport=40004, flags="SA", seq=5, ack=1001))
    back = rebuilt(reply)
    back[IP].src, back[TCP].sport = VIP, 80
    case("the reply gets the VIP:port back as its source",
         Step("in", p, XLATED, dnat_tcp(p, b)), Step("out", reply, XLATED, back))
    p = syn(40005, options=[IPOption_Router_Alert()])
    case("IP options (ihl 6): the TCP header is found at ihl*4",
         Step("in", p, XLATED, dnat_tcp(p, be4(8080, "TCP", 40005))))
    p = syn(40006, options=[IPOption_RR(routers=["10.0.0.%d" % i for i in range(1, 10)])])
    case("IP options (ihl 15, the maximum)",
         Step("in", p, XLATED, dnat_tcp(p, be4(8080, "TCP", 40006))))
    p1, p2 = syn(40007, dst=VIP), syn(40007, dst=VIP2)
    b = be4(8080, "TCP", 40007)
    case("daddr is not hashed: the same flow to two VIPs of a service, same backend",
         Step("in", p1, XLATED, dnat_tcp(p1, b)), Step("in", p2, XLATED, dnat_tcp(p2, b)))

    # ---- untouched
    case("TCP to a VIP on a port that is no service: untouched",
         Step("in", syn(40010, dport=81), UNSPEC))
    case("UDP to a TCP-only VIP:port: untouched", Step("in", udp_req(40011, dst=VIP, dport=80),
                                                        UNSPEC))
    case("TCP to an address that is no VIP: untouched",
         Step("in", syn(40012, dst="10.0.9.11", dport=8080), UNSPEC))
    case("ICMP echo to a VIP: untouched",
         Step("in", eth(IP(src=CLIENT, dst=VIP) / ICMP(type=8, id=7, seq=1)), UNSPEC))
    case("ARP: untouched", Step("in", Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") /
                                ARP(psrc=CLIENT, pdst=VIP, hwsrc=MAC_A), UNSPEC))
    case("GRE to a VIP: untouched", Step("in", eth(IP(src=CLIENT, dst=VIP, proto=47) /
                                                   Raw(b"\0" * 8)), UNSPEC))
    case("a reply of no tracked flow leaves untouched",
         Step("out", eth(IP(src="10.0.9.11", dst=CLIENT) / TCP(sport=8080, dport=40013,
                                                               flags="SA")), UNSPEC))
    rst = Ether(src=MAC_B, dst=MAC_A) / IP(src=EMPTY_VIP, dst=CLIENT, id=0, flags="DF", ttl=64) / \
        TCP(sport=80, dport=40014, seq=0, ack=1001, flags="RA", window=0)
    case("a VIP:port without backends: the SYN is answered with RST+ACK (REJECT), sent back",
         Step("in", syn(40014, dst=EMPTY_VIP), REDIRECT, rst))

    # ---- a client reusing a VIP flow's tuple to reach the backend directly
    sport = 40050
    b = be4(8080, "TCP", sport)
    p = syn(sport)
    direct = syn(sport, dst=b, dport=8080)
    synack = eth(IP(src=b, dst=CLIENT) / TCP(sport=8080, dport=sport, flags="SA"))
    case("a client reusing a closed VIP flow's port to reach the backend directly: its "
         "replies are left alone",
         Step("in", p, XLATED, dnat_tcp(p, b)), Step("in", syn(sport, flags="R"), XLATED,
                                                 dnat_tcp(syn(sport, flags="R"), b)),
         Step("in", direct, UNSPEC), Step("out", synack, UNSPEC))
    sport = 40051
    b = be4(8080, "TCP", sport)
    p = syn(sport)
    ack = eth(IP(src=b, dst=CLIENT) / TCP(sport=8080, dport=sport, flags="A"))
    ack_vip = rebuilt(ack)
    ack_vip[IP].src, ack_vip[TCP].sport = VIP, 80
    case("a stray non-SYN packet straight to the backend does not end a VIP flow",
         Step("in", p, XLATED, dnat_tcp(p, b)), Step("in", syn(sport, dst=b, dport=8080,
                                                          flags="A"), UNSPEC),
         Step("out", ack, XLATED, ack_vip))
    sport = 40052
    b = be4(5353, "UDP", sport)
    p = udp_req(sport)
    p_out = rebuilt(p)
    p_out[IP].dst, p_out[UDP].dport = b, 5353
    answer = eth(IP(src=b, dst=CLIENT) / UDP(sport=5353, dport=sport) / Raw(b"a"))
    case("UDP: a datagram straight to the backend from a VIP flow's tuple ends that flow",
         Step("in", p, XLATED, p_out), Step("in", udp_req(sport, dst=b, dport=5353), UNSPEC),
         Step("out", answer, UNSPEC))

    # ---- fragments
    dgram = eth(IP(src=CLIENT, dst=DNS_VIP, id=777) / UDP(sport=40020, dport=53) /
                Raw(bytes(range(256)) * 2))
    b = be4(5353, "UDP", 40020)
    xlated = rebuilt(dgram)
    xlated[IP].dst, xlated[UDP].dport = b, 5353
    frags_in = [eth(f) for f in fragment(dgram[IP], fragsize=200)]
    frags_out = [eth(f) for f in fragment(Ether(bytes(xlated))[IP], fragsize=200)]
    assert len(frags_in) == 3
    case("IPv4 fragments: the first is translated (UDP checksum of the whole datagram), "
         "later ones follow it (IP checksum)",
         *[Step("in", fi, XLATED, fo) for fi, fo in zip(frags_in, frags_out)])
    stray = frags_in[1].copy()
    stray[IP].id = 778
    case("a later fragment of an unknown datagram: untouched", Step("in", stray, UNSPEC))
    rdgram = eth(IP(src=b, dst=CLIENT, id=999) / UDP(sport=5353, dport=40020) /
                 Raw(bytes(range(200)) * 3))
    rx = rebuilt(rdgram)
    rx[IP].src, rx[UDP].sport = DNS_VIP, 53
    case("fragmented reply: every fragment gets the VIP back",
         *[Step("out", eth(fi), XLATED, eth(fo)) for fi, fo in
           zip(fragment(rdgram[IP], fragsize=256), fragment(Ether(bytes(rx))[IP], fragsize=256))])

    # ---- ICMP errors about tracked flows
    sport = 40030
    b = be4(5353, "UDP", sport)
    req = udp_req(sport)
    err = eth(IP(src=b, dst=CLIENT) / ICMP(type=3, code=3) /
              quote(CLIENT, b, sport, 5353, b"query", id=4242, ttl=63))
    want = eth(IP(src=DNS_VIP, dst=CLIENT) / ICMP(type=3, code=3) /
               quote(CLIENT, DNS_VIP, sport, 53, b"query", id=4242, ttl=63))
    req_out = rebuilt(req)
    req_out[IP].dst, req_out[UDP].dport = b, 5353
    case("ICMP port unreachable from the backend: outer source and quoted destination "
         "become the VIP", Step("in", req, XLATED, req_out), Step("out", err, XLATED, want))
    sport = 40031
    b = be4(8080, "TCP", sport)
    p = syn(sport)
    tcp8 = bytes(TCP(sport=sport, dport=8080, seq=1000))[:8]
    tcp8_vip = bytes(TCP(sport=sport, dport=80, seq=1000))[:8]
    err = eth(IP(src=ROUTER, dst=CLIENT) / ICMP(type=3, code=4, nexthopmtu=1400) /
              IPerror(src=CLIENT, dst=b, len=1500, flags="DF", proto=6) / Raw(tcp8))
    want = eth(IP(src=ROUTER, dst=CLIENT) / ICMP(type=3, code=4, nexthopmtu=1400) /
               IPerror(src=CLIENT, dst=VIP, len=1500, flags="DF", proto=6) / Raw(tcp8_vip))
    case("ICMP fragmentation needed from a router: the router's source stays, the quoted "
         "flow is translated", Step("in", p, XLATED, dnat_tcp(p, b)), Step("out", err, XLATED, want))
    sport = 40032
    b = be4(5353, "UDP", sport)
    req = udp_req(sport)
    req_out = rebuilt(req)
    req_out[IP].dst, req_out[UDP].dport = b, 5353
    err = eth(IP(src=CLIENT, dst=DNS_VIP) / ICMP(type=3, code=3) /
              quote(DNS_VIP, CLIENT, 53, sport, b"answer"))
    want = eth(IP(src=CLIENT, dst=b) / ICMP(type=3, code=3) /
               quote(b, CLIENT, 5353, sport, b"answer"))
    case("ICMP port unreachable from the client about a reply: sent on to the backend",
         Step("in", req, XLATED, req_out), Step("in", err, XLATED, want))
    err0 = eth(IP(src=CLIENT, dst=DNS_VIP) / ICMP(type=3, code=3) /
               quote(DNS_VIP, CLIENT, 53, sport, b"nocsum", chksum=0))
    want0 = eth(IP(src=CLIENT, dst=b) / ICMP(type=3, code=3) /
                quote(b, CLIENT, 5353, sport, b"nocsum", chksum=0))
    case("ICMP error quoting a UDP datagram sent without checksum: the quoted 0 stays 0",
         Step("in", err0, XLATED, want0))
    case("ICMP error quoting no tracked flow: untouched",
         Step("out", eth(IP(src="10.0.9.11", dst=CLIENT) / ICMP(type=3, code=3) /
                         IPerror(src=CLIENT, dst="10.0.9.11") /
                         UDPerror(sport=40033, dport=5353, chksum=1)), UNSPEC))

    # ---- IPv6
    sport = 40040
    b = be6(8080, "TCP", sport)
    p = eth(IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=sport, dport=80, flags="S"), v6=True)
    p_out = rebuilt(p)
    p_out[IPv6].dst, p_out[TCP].dport = b, 8080
    r = eth(IPv6(src=b, dst=CLIENT6) / TCP(sport=8080, dport=sport, flags="SA"), v6=True)
    r_out = rebuilt(r)
    r_out[IPv6].src, r_out[TCP].sport = VIP6, 80
    case("IPv6 TCP: VIP -> backend and back", Step("in", p, XLATED, p_out), Step("out", r, XLATED, r_out))
    sport = 40041
    b = be6(5353, "UDP", sport)
    p = eth(IPv6(src=CLIENT6, dst=DNS_VIP6) / UDP(sport=sport, dport=53) / Raw(b"q6"), v6=True)
    p_out = rebuilt(p)
    p_out[IPv6].dst, p_out[UDP].dport = b, 5353
    err = eth(IPv6(src=b, dst=CLIENT6) / ICMPv6DestUnreach(code=4) /
              quote(CLIENT6, b, sport, 5353, b"q6"), v6=True)
    want = eth(IPv6(src=DNS_VIP6, dst=CLIENT6) / ICMPv6DestUnreach(code=4) /
               quote(CLIENT6, DNS_VIP6, sport, 53, b"q6"), v6=True)
    case("ICMPv6 port unreachable from the backend: translated (pseudo header too)",
         Step("in", p, XLATED, p_out), Step("out", err, XLATED, want))
    case("IPv6 with an extension header (fragment) to a VIP: untouched",
         Step("in", eth(IPv6(src=CLIENT6, dst=VIP6, nh=44) /
                        Raw(bytes([6, 0, 0, 0, 0, 0, 0, 1]) + bytes(TCP(sport=40042, dport=80))),
                        v6=True), UNSPEC))
    return out


CASES = cases()


def show(frame: bytes) -> str:
    return Ether(frame).show2(dump=True)


@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
def test_packet(env, case):
    for i, step in enumerate(case.steps):
        verdict, out = env.run(step.direction, step.input)
        assert verdict == step.verdict, f"step {i}: verdict {verdict}, want {step.verdict}"
        want = bytes(step.input) if step.expected is None else bytes(step.expected)
        if step.verdict == SHOT:
            continue
        assert out == want, f"step {i}:\n--- got\n{show(out)}\n--- want\n{show(want)}"


def test_expected_outputs_have_valid_checksums():
    """The expectations themselves: scapy's checksums, re-verified by rebuilding (not for
    fragments: their L4 checksum covers the whole datagram, which the case builds whole)."""
    for case in CASES:
        for step in case.steps:
            if step.expected is not None:
                frame = bytes(step.expected)
                if IP in Ether(frame) and (Ether(frame)[IP].flags.MF or Ether(frame)[IP].frag):
                    continue
                assert bytes(rebuilt(Ether(frame))) == frame, case.description


def test_counters_follow_what_happened(fresh):
    e = fresh(web(), empty())
    e.run("in", syn(41000))
    e.run("in", syn(41000, flags="A"))
    e.run("in", syn(41001, dst=EMPTY_VIP))
    e.run("in", syn(41002, dport=81))
    c = e.counters()
    assert (c["dnat"], c["ct_new"], c["reject"], c["no_backend"], c["errors"]) == (2, 1, 1, 0, 0)


# ---- conntrack ---------------------------------------------------------------------------
def backend_of(e: Env, pkt) -> str:
    verdict, out = e.run("in", pkt)
    assert verdict == XLATED
    return Ether(out)[IP].dst


def test_flows_stay_on_their_backend_while_backends_are_added(fresh):
    e = fresh(web((1, 2, 3)))
    before = {s: backend_of(e, syn(s)) for s in range(42000, 42300)}
    e.apply(web((1, 2, 3, 4, 5, 6)))
    after = {s: backend_of(e, syn(s, flags="A")) for s in before}
    assert after == before
    new = {s: backend_of(e, syn(s)) for s in range(43000, 43300)}
    assert new == {s: expected_backend(backends4((1, 2, 3, 4, 5, 6)), 8080, "TCP", CLIENT, s, 80)
                   for s in new}
    assert set(new.values()) & set(backends4((4, 5, 6))), "new flows use the new backends"


def backend_id(e: Env, addr: str) -> int:
    want = bytes(S.pack_addr(ipaddress.ip_address(addr)))
    return next(k.value for k, v in e.maps.backends.items() if bytes(v.addr) == want)


def test_removing_a_backend_moves_only_its_flows(fresh):
    """Once a backend is gone from meshd_be_v1 (its drain is over), its flows move."""
    e = fresh(web((1, 2, 3)))
    before = {s: backend_of(e, syn(s)) for s in range(44000, 44300)}
    gone = backends4((2,))[0]
    gone_id = backend_id(e, gone)
    e.apply(web((1, 3)))
    e.maps.backends.delete(ctypes.c_uint32(gone_id))  # the reconciler may hold it: drain over
    after = {s: backend_of(e, syn(s, flags="A")) for s in before}
    moved = {s for s in before if after[s] != before[s]}
    assert moved == {s for s in before if before[s] == gone}
    for s in moved:  # re-balanced by the current table
        assert after[s] == expected_backend(backends4((1, 3)), 8080, "TCP", CLIENT, s, 80)
    assert e.counters()["ct_repick"] == len(moved) > 0


def test_a_draining_backend_keeps_its_flows(fresh):
    """Drain (issue 9 item 2): a backend that left the Maglev table but is still in
    meshd_be_v1 keeps its established flows (before: they were re-picked mid-flow and the
    new backend answered with RST); new flows avoid it."""
    e = fresh(web((1, 2, 3)))
    before = {s: backend_of(e, syn(s)) for s in range(44000, 44300)}
    draining = backends4((2,))[0]
    bid = backend_id(e, draining)
    kept = e.maps.backends.lookup(ctypes.c_uint32(bid))
    e.apply(web((1, 3)))  # the table without it
    e.maps.backends.update(ctypes.c_uint32(bid), kept)  # held while flows point at it
    assert any(b == draining for b in before.values())
    after = {s: backend_of(e, syn(s, flags="A")) for s in before}
    assert after == before
    assert e.counters()["ct_repick"] == 0
    new = {s: backend_of(e, syn(s)) for s in range(45500, 45700)}
    assert draining not in new.values()


def test_a_reused_backend_id_does_not_inherit_flows(fresh):
    """Backend ids are reused (smallest free): a flow pinned to a removed backend must not
    follow its id to whatever backend gets it next. (While b2's flows live it drains and
    keeps its id; the drain ends at its deadline at the latest.)"""
    import time
    e = fresh(web((1, 2, 3)))
    flows = {s: backend_of(e, syn(s)) for s in range(45000, 45200)}
    on_b2 = [s for s, b in flows.items() if b == backends4((2,))[0]]
    e.apply(web((1, 3)))
    e.rec.collect_drained(now=time.monotonic() + 10**6)  # the drain is over (its deadline)
    e.apply(web((1, 3, 7)))  # takes b2's freed id
    for s in on_b2:
        assert backend_of(e, syn(s, flags="A")) == expected_backend(
            backends4((1, 3, 7)), 8080, "TCP", CLIENT, s, 80)


def _tuple_that_moves(old_ids, new_ids, start) -> int:
    for s in range(start, start + 5000):
        if expected_backend(backends4(old_ids), 8080, "TCP", CLIENT, s, 80) != \
                expected_backend(backends4(new_ids), 8080, "TCP", CLIENT, s, 80):
            return s
    raise AssertionError("no flow moves between the two tables")


@pytest.mark.parametrize("ending", ["rst-from-client", "rst-from-backend", "fin-both-ways"])
def test_a_new_syn_after_close_is_balanced_afresh(fresh, ending):
    e = fresh(web((1, 2, 3)))
    s = _tuple_that_moves((1, 2, 3), (1, 2, 3, 4, 5, 6), 46000)
    first = backend_of(e, syn(s))
    e.apply(web((1, 2, 3, 4, 5, 6)))
    assert backend_of(e, syn(s)) == first, "a retransmitted SYN keeps its backend"
    reply = eth(IP(src=first, dst=CLIENT) / TCP(sport=8080, dport=s, flags="A"))
    if ending == "rst-from-client":
        backend_of(e, syn(s, flags="R"))
    elif ending == "rst-from-backend":
        reply[TCP].flags = "R"
        assert e.run("out", reply)[0] == XLATED
    else:
        backend_of(e, syn(s, flags="FA"))
        assert backend_of(e, syn(s, flags="A")) == first, "half closed: still pinned"
        reply[TCP].flags = "FA"
        assert e.run("out", reply)[0] == XLATED
    assert e.counters()["ct_closed"] == 1
    assert backend_of(e, syn(s, flags="A")) == first, "the last ACK still reaches it"
    assert backend_of(e, syn(s)) == expected_backend(backends4((1, 2, 3, 4, 5, 6)), 8080,
                                                     "TCP", CLIENT, s, 80)
    assert e.counters()["ct_repick"] == 1


def test_conntrack_full_evicts_lru_and_flows_keep_their_backend(fresh):
    """256 entries = 128 flows; 2,000 flows go through. Evicted flows come back to the same
    backend (Maglev over the same table), replies of live flows are still restored."""
    e = fresh(web((1, 2, 3)), ct_max_entries=256)
    want = {s: expected_backend(backends4((1, 2, 3)), 8080, "TCP", CLIENT, s, 80)
            for s in range(47000, 49000)}
    for s, b in want.items():
        assert backend_of(e, syn(s)) == b
    assert len(list(e.tcmaps.ct.keys())) <= 256
    for s in list(want)[:50]:  # long evicted
        assert backend_of(e, syn(s, flags="A")) == want[s]
        reply = eth(IP(src=want[s], dst=CLIENT) / TCP(sport=8080, dport=s, flags="A"))
        verdict, out = e.run("out", reply)
        assert verdict == XLATED and Ether(out)[IP].src == VIP
    assert e.counters()["errors"] == 0


def test_two_nodes_with_the_same_state_pick_the_same_backend(fresh):
    """Two instances (two nodes) fed the same services in a different order: different
    backend ids, same choice for every flow (Maglev over stable names; daddr not hashed)."""
    a = fresh(web((1, 2, 3, 4, 5)))
    b = fresh()
    b.apply(dns((5, 4)), web((1, 2, 3, 4, 5)))  # other ids for the same backends
    ids_a = {bytes(v.addr): k.value for k, v in a.maps.backends.items()}
    ids_b = {bytes(v.addr): k.value for k, v in b.maps.backends.items()}
    assert any(ids_a[k] != ids_b[k] for k in ids_a), "the test needs different ids"
    rnd = random.Random(7)
    for _ in range(300):
        client = str(ipaddress.IPv4Address(rnd.getrandbits(32)))
        p = syn(rnd.randrange(1024, 65536), src=client)
        ra, rb = a.run("in", p), b.run("in", p)
        assert ra == rb and ra[0] == XLATED


def test_distribution_follows_the_table(fresh):
    e = fresh(web((1, 2, 3)))
    rnd = random.Random(3)
    seen = {}
    for _ in range(3000):
        client = str(ipaddress.IPv4Address(rnd.getrandbits(32)))
        b = backend_of(e, syn(rnd.randrange(1024, 65536), src=client))
        seen[b] = seen.get(b, 0) + 1
    assert set(seen) == set(backends4((1, 2, 3)))
    assert all(800 < n < 1200 for n in seen.values()), seen


def test_untouched_packets_cost_little(env):
    """Mean run time of what most traffic is (BPF_PROG_TEST_RUN, repeat 20,000): a packet
    to no service going in, a packet of no tracked flow going out. (A translated packet
    cannot be timed this way: after the first run it is no longer addressed to the VIP.)"""
    cost = {}
    for label, d, p in (("in, not a service", "in", syn(50000, dport=81, flags="A")),
                        ("in, not a service, SYN", "in", syn(50000, dport=81)),
                        ("out, not tracked", "out", eth(IP(src="10.0.9.11", dst=CLIENT) /
                                                        TCP(sport=8080, dport=50001)))):
        _v, _o, ns = bpf.prog_test_run(env.fd[d], bytes(p), label, repeat=20000)
        cost[label] = ns
    print("tc_lb ns/packet (test run):", cost)
    assert all(ns < 1000 for ns in cost.values()), cost


# ---- the Python mirrors match the object's BTF ----------------------------------------------
def _btf_structs() -> dict:
    if shutil.which("bpftool") is None:
        pytest.fail("bpftool is not installed: run scripts/setup")
    out = subprocess.run(["bpftool", "btf", "dump", "file",
                          str(loader.object_path(names.OBJ_TC_LB)), "-j"],
                         check=True, capture_output=True, text=True).stdout
    return {t["name"]: t for t in json.loads(out)["types"]
            if t["kind"] == "STRUCT" and t.get("name")}


@pytest.mark.parametrize("cname", sorted(tc.MIRRORS))
def test_mirror_matches_btf(cname):
    btf = _btf_structs()
    mirror = tc.MIRRORS[cname]
    assert cname in btf, f"struct {cname} is not in the object's BTF"
    assert ctypes.sizeof(mirror) == btf[cname]["size"], f"{cname}: size differs"
    c_fields = [(m["name"], m["bits_offset"] // 8) for m in btf[cname]["members"]]
    assert [(f[0], getattr(mirror, f[0]).offset) for f in mirror._fields_] == c_fields


def _map_defs(obj: str) -> dict[str, dict]:
    """map name -> {field: decoded value} from the object's BTF: __uint(f, N) is a pointer
    to an array of N elements; __type(f, T) a pointer to T (name and size compared)."""
    out = subprocess.run(["bpftool", "btf", "dump", "file", str(loader.object_path(obj)), "-j"],
                         check=True, capture_output=True, text=True).stdout
    types = json.loads(out)["types"]
    by_id = {t["id"]: t for t in types}
    sec = next(t for t in types if t["kind"] == "DATASEC" and t["name"] == ".maps")

    def decode(type_id):
        t = by_id[by_id[type_id]["type_id"]]  # the pointee
        while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE"):
            t = by_id[t["type_id"]]
        if t["kind"] == "ARRAY":
            return t["nr_elems"]
        if t["kind"] == "STRUCT" and t["name"] == "(anon)":  # __array(values, inner def)
            return {m["name"]: decode(m["type_id"]) for m in t["members"]}
        return (t.get("name"), t.get("size"))

    defs = {}
    for v in sec["vars"]:
        var = by_id[v["type_id"]]
        struct = by_id[var["type_id"]]
        defs[var["name"]] = {m["name"]: decode(m["type_id"]) for m in struct["members"]}
    return defs


def test_shared_map_definitions_are_identical_to_the_socket_lb():
    """bpf_map__reuse_fd needs the same type, key/value types and max_entries."""
    sock, tcl = _map_defs(names.OBJ_SOCK_LB), _map_defs(names.OBJ_TC_LB)
    for name in names.SOCK_LB_MAPS:
        assert tcl[name] == sock[name], name
    assert tcl[names.MAP_SVC]["max_entries"] == 65536  # the decoder sees real values


def test_rodata_holds_only_the_cfg_struct():
    out = subprocess.run(["bpftool", "btf", "dump", "file",
                          str(loader.object_path(names.OBJ_TC_LB)), "-j"],
                         check=True, capture_output=True, text=True).stdout
    rodata = [t for t in json.loads(out)["types"]
              if t["kind"] == "DATASEC" and t["name"] == ".rodata"]
    assert len(rodata) == 1 and [v["size"] for v in rodata[0]["vars"]] == [8]


def test_flow_hash_mirror_is_stable():
    """Golden values: changing the hash moves every flow on a rolling upgrade."""
    got = [tc.flow_hash(ipaddress.ip_address(a), sp, dp, pr) for a, sp, dp, pr in
           (("10.250.0.1", 40000, 80, 6), ("fd00:250::1", 1, 53, 17))]
    assert got == GOLDEN_HASHES


GOLDEN_HASHES = [257680627, 3000465176]
