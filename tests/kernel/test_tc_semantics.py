"""kube-proxy semantics on the tc path, packet by packet, through BPF_PROG_TEST_RUN.

Services are written by the reconciler (as in test_tc_packets.py); the semantics maps
(meshd_svc_ext_v1, meshd_srcrange_v1, meshd_aff_v1 / meshd_affcfg_v1 / meshd_member_v1) and
the frontend flags are written here directly through the map handles, so these fixtures do
not depend on the reconciler filling them. Whole frames are compared, checksums built by
scapy: REJECT replies (TCP RST, ICMP port unreachable, IPv4 and IPv6), source ranges, Local
with no endpoint (drop), affinity (followed, expired, broken), the override map, and
keep-source under SNAT mode.
"""

from __future__ import annotations

import ctypes
import ipaddress
import time

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from meshd.dataplane import structs as S
from meshd.dataplane import tc
from meshd.dataplane.kernel import KernelDataplane
from test_tc_packets import (CLIENT, CLIENT6, M, MAC_A, MAC_B, SHOT, UNSPEC, VIP, VIP6, XLATED,
                             Env, backends4, be4, dnat_tcp, eth, syn, web)
from test_tc_snat import LO, HI, set_node_addresses

REDIRECT = tc.TC_ACT_REDIRECT
EMPTY, EMPTY6 = "10.96.0.99", "fd00:96::99"
OTHER = "10.251.0.1"  # a client outside the allowed range


def empty() -> dict:
    return {"namespace": "t", "name": "empty", "vips": [EMPTY, EMPTY6],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                      {"name": "dns", "port": 53, "protocol": "UDP"}], "endpoints": []}


@pytest.fixture
def make():
    made: list[Env] = []

    def mk(*services, snat_ports=None) -> Env:
        e = Env(snat_ports=snat_ports)
        made.append(e)
        e.apply(*(services or (web(), empty())))
        return e
    try:
        yield mk
    finally:
        for e in made:
            e.close()


def key(vip: str, port: int = 80, proto: str = "TCP") -> S.SvcKey:
    return S.svc_key(ipaddress.ip_address(vip), port, proto)


def set_flags(e: Env, vip: str, flags: int, port: int = 80, proto: str = "TCP") -> S.SvcVal:
    """Adds `flags` to the frontend entry the reconciler wrote; returns it."""
    val = e.maps.svc.lookup(key(vip, port, proto))
    val.flags |= flags
    e.maps.svc.update(key(vip, port, proto), val)
    return val


def reply_eth(payload, v6=False):
    """A reply as the program sends it back: the request's Ethernet addresses swapped."""
    return Ether(src=MAC_B, dst=MAC_A, type=0x86DD if v6 else 0x0800) / payload


def run(e: Env, pkt, verdict: int, want=None) -> bytes:
    got_verdict, out = e.run("in", pkt)
    assert got_verdict == verdict, f"verdict {got_verdict}, want {verdict}"
    if want is not None:
        assert out == bytes(want), \
            f"--- got\n{Ether(out).show2(dump=True)}\n--- want\n{Ether(bytes(want)).show2(dump=True)}"
    return out


# ---- REJECT --------------------------------------------------------------------------------
def test_reject_tcp_syn_v4_gets_rst_ack(make):
    e = make()
    p = eth(IP(src=CLIENT, dst=EMPTY, options=[]) /
            TCP(sport=41000, dport=80, flags="S", seq=7000, options=[("MSS", 1460)]))
    want = reply_eth(IP(src=EMPTY, dst=CLIENT, id=0, flags="DF", ttl=64) /
                     TCP(sport=80, dport=41000, seq=0, ack=7001, flags="RA", window=0))
    run(e, p, REDIRECT, want)
    assert e.counters()["reject"] == 1


def test_reject_tcp_ack_v4_gets_rst_with_its_ack_as_seq(make):
    e = make()
    p = eth(IP(src=CLIENT, dst=EMPTY) /
            TCP(sport=41001, dport=80, flags="PA", seq=10, ack=99999) / Raw(b"GET /"))
    want = reply_eth(IP(src=EMPTY, dst=CLIENT, id=0, flags="DF", ttl=64) /
                     TCP(sport=80, dport=41001, seq=99999, ack=0, flags="R", window=0))
    run(e, p, REDIRECT, want)


def test_reject_never_answers_a_rst(make):
    e = make()
    run(e, eth(IP(src=CLIENT, dst=EMPTY) / TCP(sport=41002, dport=80, flags="R")), SHOT)


def test_reject_tcp_syn_v6_gets_rst_ack(make):
    e = make()
    p = eth(IPv6(src=CLIENT6, dst=EMPTY6) / TCP(sport=41003, dport=80, flags="S", seq=5),
            v6=True)
    want = reply_eth(IPv6(src=EMPTY6, dst=CLIENT6, hlim=64) /
                     TCP(sport=80, dport=41003, seq=0, ack=6, flags="RA", window=0), v6=True)
    run(e, p, REDIRECT, want)


@pytest.mark.parametrize("size", [5, 6, 7, 64, 1000])
def test_reject_udp_v4_gets_icmp_port_unreachable_quoting_the_datagram(make, size):
    """Odd sizes: the quote's last byte is padded for the checksum; 1000: the quote is cut
    so the reply stays within 576 bytes (RFC 1812, as Linux)."""
    e = make()
    d = IP(src=CLIENT, dst=EMPTY, id=4242) / UDP(sport=41004, dport=53) / \
        Raw((bytes(range(256)) * 4)[:size])
    want = reply_eth(IP(src=EMPTY, dst=CLIENT, id=0, ttl=64) / ICMP(type=3, code=3) /
                     Raw(bytes(d)[:548]))
    run(e, eth(d), REDIRECT, want)
    assert len(bytes(want)) <= 14 + 576


@pytest.mark.parametrize("size", [3, 1300])
def test_reject_udp_v6_gets_icmpv6_port_unreachable(make, size):
    e = make()
    d = IPv6(src=CLIENT6, dst=EMPTY6) / UDP(sport=41005, dport=53) / Raw(b"\x5a" * size)
    want = reply_eth(IPv6(src=EMPTY6, dst=CLIENT6, hlim=64) / ICMPv6DestUnreach(code=4) /
                     Raw(bytes(d)[:1232]), v6=True)
    run(e, eth(d, v6=True), REDIRECT, want)
    assert len(bytes(want)) <= 14 + 1280


def test_reject_udp_frame_padding_is_not_quoted(make):
    """A short frame padded to 60 bytes on the wire: the quote ends with the datagram."""
    e = make()
    d = IP(src=CLIENT, dst=EMPTY) / UDP(sport=41006, dport=53) / Raw(b"x")
    frame = bytes(eth(d)) + b"\0" * (60 - len(bytes(eth(d))))
    want = reply_eth(IP(src=EMPTY, dst=CLIENT, id=0, ttl=64) / ICMP(type=3, code=3) /
                     Raw(bytes(d)))
    verdict, out = e.run("in", frame)
    assert verdict == REDIRECT and out == bytes(want)


# ---- Local with no endpoint: DROP ------------------------------------------------------------
def test_drop_empty_drops_and_counts(make):
    e = make()
    set_flags(e, EMPTY, S.SVC_F_DROP_EMPTY)
    run(e, syn(41010, dst=EMPTY), SHOT)
    c = e.counters()
    assert (c["drop_no_local"], c["reject"]) == (1, 0)


# ---- the override map ------------------------------------------------------------------------
def put_group(e: Env, gid: int, backend_addr: str) -> None:
    """A group whose Maglev table holds one backend (the reconciler's existing id)."""
    want = bytes(S.pack_addr(ipaddress.ip_address(backend_addr)))
    bid = next(k.value for k, v in e.maps.backends.items() if bytes(v.addr) == want)
    KernelDataplane(e.maps).put_table(gid, np.full(M, bid, dtype=np.uint32))


def test_ext_override_takes_precedence(make):
    e = make()
    only = backends4((3,))[0]
    put_group(e, 9001, only)
    e.maps.svc_ext.update(key(VIP), S.SvcVal(id=9001, count=1, flags=S.SVC_F_EXTERNAL))
    for sport in range(41020, 41040):
        p = syn(sport)
        run(e, p, XLATED, dnat_tcp(p, only))
    e.maps.svc_ext.update(key(VIP), S.SvcVal(id=9001, count=0,
                                             flags=S.SVC_F_EXTERNAL | S.SVC_F_DROP_EMPTY))
    run(e, syn(41041), SHOT)  # Local, no local endpoint: dropped though meshd_svc_v1 has 3
    assert e.counters()["drop_no_local"] == 1
    e.maps.svc_ext.delete(key(VIP))
    p = syn(41042)
    run(e, p, XLATED, dnat_tcp(p, be4(8080, "TCP", 41042)))  # back to meshd_svc_v1


# ---- source ranges ---------------------------------------------------------------------------
def allow(e: Env, vip: str, net: str, port: int = 80, proto: str = "TCP") -> None:
    n = ipaddress.ip_network(net)
    plen = 160 + (96 + n.prefixlen if n.version == 4 else n.prefixlen)
    e.maps.srcranges.update(
        S.SrcRangeKey(prefixlen=plen, vip=S.pack_addr(ipaddress.ip_address(vip)),
                      port=S.port_be(port), proto=S.IPPROTO[proto],
                      src=S.pack_addr(n.network_address)), ctypes.c_uint8(1))


def test_source_ranges_allow_and_refuse(make):
    e = make()
    set_flags(e, VIP, S.SVC_F_SOURCE_RANGES)
    allow(e, VIP, "10.250.0.0/24")
    allow(e, VIP2 := "10.96.0.11", "10.251.0.0/16")  # another frontend's range: not VIP's
    p = syn(41050)
    run(e, p, XLATED, dnat_tcp(p, be4(8080, "TCP", 41050)))
    run(e, syn(41051, src=OTHER), SHOT)
    assert e.counters()["src_range"] == 1
    p = syn(41052, src=OTHER, dst=VIP2)  # VIP2 has no SOURCE_RANGES flag: served
    run(e, p, XLATED, dnat_tcp(p, be4(8080, "TCP", 41052, client=OTHER)))


def test_source_ranges_v6(make):
    e = make()
    set_flags(e, VIP6, S.SVC_F_SOURCE_RANGES)
    allow(e, VIP6, "fd00:250::/64")
    ok = eth(IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=41053, dport=80, flags="S"), v6=True)
    assert e.run("in", ok)[0] == XLATED
    bad = eth(IPv6(src="fd00:251::1", dst=VIP6) / TCP(sport=41054, dport=80, flags="S"), v6=True)
    run(e, bad, SHOT)


def test_source_ranges_no_range_refuses_all(make):
    e = make()
    set_flags(e, VIP, S.SVC_F_SOURCE_RANGES)
    run(e, syn(41055), SHOT)


# ---- session affinity ------------------------------------------------------------------------
def affinity(e: Env, timeout: int = 10800) -> int:
    """Turns ClientIP affinity on for web's IPv4 group; returns its id."""
    gid = set_flags(e, VIP, S.SVC_F_AFFINITY).id
    e.maps.affcfg.update(ctypes.c_uint32(gid), ctypes.c_uint32(timeout))
    for k, v in e.maps.backends.items():
        if v.family == 2 and S.port_host(v.port) == 8080:
            e.maps.members.update(S.MemberKey(group=gid, backend=k.value), ctypes.c_uint32(1))
    return gid


def aff_key(gid: int, client: str = CLIENT) -> S.AffKey:
    return S.AffKey(netns=0, addr=S.pack_addr(ipaddress.ip_address(client)), group=gid)


def first_backend_and_a_port_maglev_sends_elsewhere(start: int) -> tuple[str, int]:
    b = be4(8080, "TCP", start)
    other = next(s for s in range(start + 1, start + 200) if be4(8080, "TCP", s) != b)
    return b, other


def backend_of(e: Env, pkt) -> str:
    verdict, out = e.run("in", pkt)
    assert verdict == XLATED
    return Ether(out)[IP].dst


def test_affinity_followed_and_refreshed(make):
    e = make()
    gid = affinity(e)
    b, other = first_backend_and_a_port_maglev_sends_elsewhere(41100)
    assert backend_of(e, syn(41100)) == b
    stored = e.maps.affinity.lookup(aff_key(gid))
    assert stored is not None and stored.backend != 0
    seen = stored.seen_ns
    p = syn(other)
    run(e, p, XLATED, dnat_tcp(p, b))  # Maglev would say otherwise: affinity wins
    assert e.maps.affinity.lookup(aff_key(gid)).seen_ns > seen
    assert all(backend_of(e, syn(s)) == b for s in range(41200, 41215))
    assert e.counters()["aff_follow"] == 16
    # another client is balanced on its own
    assert e.maps.affinity.lookup(aff_key(gid, OTHER)) is None


def test_affinity_expired_by_an_old_seen_ns(make):
    e = make()
    gid = affinity(e, timeout=60)
    b, other = first_backend_and_a_port_maglev_sends_elsewhere(41300)
    assert backend_of(e, syn(41300)) == b
    v = e.maps.affinity.lookup(aff_key(gid))
    v.seen_ns = time.monotonic_ns() - 61 * 10**9  # bpf_ktime_get_ns is CLOCK_MONOTONIC
    e.maps.affinity.update(aff_key(gid), v)
    fresh_pick = be4(8080, "TCP", other)
    assert backend_of(e, syn(other)) == fresh_pick
    stored = e.maps.affinity.lookup(aff_key(gid))
    assert stored.backend != v.backend and stored.seen_ns > v.seen_ns
    assert e.counters()["aff_follow"] == 0


def test_affinity_broken_when_the_backend_is_no_member(make):
    e = make()
    gid = affinity(e)
    b, other = first_backend_and_a_port_maglev_sends_elsewhere(41400)
    assert backend_of(e, syn(41400)) == b
    bid = e.maps.affinity.lookup(aff_key(gid)).backend
    e.maps.members.delete(S.MemberKey(group=gid, backend=bid))
    assert backend_of(e, syn(other)) == be4(8080, "TCP", other)
    assert e.counters()["aff_follow"] == 0


def test_affinity_without_a_timeout_entry_is_plain_maglev(make):
    e = make()
    set_flags(e, VIP, S.SVC_F_AFFINITY)
    _b, other = first_backend_and_a_port_maglev_sends_elsewhere(41500)
    backend_of(e, syn(41500))
    assert backend_of(e, syn(other)) == be4(8080, "TCP", other)


# ---- keep source under SNAT mode -------------------------------------------------------------
def test_keep_source_is_not_snatted_in_snat_mode(make):
    e = make(snat_ports=(LO, HI))
    set_node_addresses(e)
    sport = 41600
    p = syn(sport)
    fwd = Ether(run(e, p, XLATED, dnat_tcp(p, be4(8080, "TCP", sport))))
    got_verdict, out = e.run("out", fwd)
    assert got_verdict == XLATED and Ether(out)[IP].src == "10.0.9.1"  # SNATed as before
    set_flags(e, VIP, S.SVC_F_KEEP_SOURCE | S.SVC_F_EXTERNAL)
    sport = 41601
    p = syn(sport)
    fwd = Ether(run(e, p, XLATED, dnat_tcp(p, be4(8080, "TCP", sport))))
    run_out = e.run("out", fwd)
    assert run_out == (UNSPEC, bytes(fwd))  # leaves with the client's address
    assert e.counters()["snat"] == 1
