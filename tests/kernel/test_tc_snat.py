"""SNAT mode of the tc load balancer, packet by packet, through BPF_PROG_TEST_RUN.

A SNAT flow crosses both programs twice: the request is DNATed on ingress and leaves with
the node's address and a port of the range on egress; the reply to node:port gets the
client back on ingress and the VIP back on egress. The port is chosen by the program (a hash
of the flow, then the first free one), so each case reads it from the first translated
packet, checks it lies in the range, and from then on compares whole frames: every other
field and every checksum must be exactly what scapy builds. BPF_PROG_TEST_RUN runs with the
loopback device as skb->dev, so the node's SNAT addresses are recorded for ifindex 1.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, fragment
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from meshd.dataplane import structs as S
from meshd.metrics import read_tc_counters
from meshd.dataplane import tc
from testlib import BPFFS
from test_tc_packets import (CLIENT, CLIENT6, DNS_VIP, SHOT, UNSPEC, XLATED, VIP, VIP6, Env,
                             be4, be6, dns, dnat_tcp, eth, quote, rebuilt, syn, udp_req, web)

NODE, NODE6 = "10.0.9.1", "fd00:9::1"
LO, HI = 61000, 61999
LO_IFINDEX = 1  # skb->dev of BPF_PROG_TEST_RUN


def set_node_addresses(e: Env, v4: str | None = NODE, v6: str | None = NODE6) -> None:
    val = tc.TcAddr()
    if v4:
        val.v4 = S.pack_addr(ipaddress.ip_address(v4))
    if v6:
        val.v6 = S.pack_addr(ipaddress.ip_address(v6))
    e.tcmaps.addrs.update(ctypes.c_uint32(LO_IFINDEX), val)


@pytest.fixture
def snat():
    made: list[Env] = []

    def make(*services, ports=(LO, HI), v4=NODE, v6=NODE6) -> Env:
        e = Env(snat_ports=ports)
        made.append(e)
        e.apply(*(services or (web(), dns())))
        set_node_addresses(e, v4, v6)
        return e
    try:
        yield make
    finally:
        for e in made:
            e.close()


def run_ok(e: Env, direction: str, pkt) -> Ether:
    verdict, out = e.run(direction, pkt)
    assert verdict == XLATED, \
        f"{direction}: verdict {verdict}\n{Ether(bytes(pkt)).show2(dump=True)}"
    return Ether(out)


def same(got: Ether, want) -> None:
    assert bytes(got) == bytes(want), \
        f"--- got\n{got.show2(dump=True)}\n--- want\n{Ether(bytes(want)).show2(dump=True)}"


def snat_out(e: Env, forwarded, l4, node=NODE) -> tuple[Ether, int]:
    """Egress of a translated request: source node:port, port in range; returns it."""
    got = run_ok(e, "out", forwarded)
    ip = IPv6 if IPv6 in got else IP
    port = got[l4].sport
    assert LO <= port <= HI, port
    want = rebuilt(forwarded)
    want[ip].src, want[l4].sport = node, port
    same(got, want)
    return got, port


# ---- a whole flow, each protocol and family ------------------------------------------------
def test_tcp_flow_through_snat_and_back(snat):
    e = snat()
    sport = 42001
    b = be4(8080, "TCP", sport)
    p = syn(sport)
    fwd = run_ok(e, "in", p)
    same(fwd, dnat_tcp(p, b))
    _, port = snat_out(e, fwd, TCP)
    again, port2 = snat_out(e, fwd, TCP)  # a retransmitted SYN keeps its port
    assert port2 == port
    reply = eth(IP(src=b, dst=NODE) / TCP(sport=8080, dport=port, flags="SA", seq=5, ack=1001))
    back = run_ok(e, "in", reply)
    want = rebuilt(reply)
    want[IP].dst, want[TCP].dport = CLIENT, sport
    same(back, want)
    out = run_ok(e, "out", back)  # the routed layer restores the VIP as it leaves
    want2 = rebuilt(back)
    want2[IP].src, want2[TCP].sport = VIP, 80
    same(out, want2)
    c = e.counters()
    assert (c["dnat"], c["snat"], c["snat_new"], c["unsnat"], c["revnat"], c["snat_fail"],
            c["errors"]) == (1, 2, 1, 1, 1, 0, 0)
    assert read_tc_counters(BPFFS, e.instance) == c  # what Prometheus exports


def test_udp_flow_through_snat_and_back(snat):
    e = snat()
    sport = 42002
    b = be4(5353, "UDP", sport)
    fwd = run_ok(e, "in", udp_req(sport))
    assert (fwd[IP].dst, fwd[UDP].dport) == (b, 5353)
    _, port = snat_out(e, fwd, UDP)
    answer = eth(IP(src=b, dst=NODE) / UDP(sport=5353, dport=port) / Raw(b"answer"))
    back = run_ok(e, "in", answer)
    want = rebuilt(answer)
    want[IP].dst, want[UDP].dport = CLIENT, sport
    same(back, want)
    out = run_ok(e, "out", back)
    assert (out[IP].src, out[UDP].sport) == (DNS_VIP, 53)


def test_ipv6_tcp_flow_leaves_with_the_node_ipv6_address(snat):
    e = snat()
    sport = 42003
    b = be6(8080, "TCP", sport)
    p = eth(IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=sport, dport=80, flags="S", seq=7), v6=True)
    fwd = run_ok(e, "in", p)
    assert (fwd[IPv6].dst, fwd[TCP].dport) == (b, 8080)
    _, port = snat_out(e, fwd, TCP, node=NODE6)
    reply = eth(IPv6(src=b, dst=NODE6) / TCP(sport=8080, dport=port, flags="SA"), v6=True)
    back = run_ok(e, "in", reply)
    want = rebuilt(reply)
    want[IPv6].dst, want[TCP].dport = CLIENT6, sport
    same(back, want)


def test_distinct_clients_get_distinct_ports_to_one_backend(snat):
    e = snat(web(ids=(1,)))
    ports = set()
    for i in range(20):
        fwd = run_ok(e, "in", syn(43000, src=f"10.250.0.{i + 1}"))
        got = run_ok(e, "out", fwd)
        assert got[IP].src == NODE
        ports.add(got[TCP].sport)
    assert len(ports) == 20 and all(LO <= p <= HI for p in ports)


# ---- edges -----------------------------------------------------------------------------------
def test_port_range_exhausted_drops_and_counts(snat):
    e = snat(web(ids=(1,)), ports=(LO, LO + 1))
    verdicts = []
    for i in range(3):
        fwd = run_ok(e, "in", syn(43100, src=f"10.250.0.{i + 1}"))
        verdicts.append(e.run("out", fwd)[0])
    assert verdicts == [XLATED, XLATED, SHOT]
    c = e.counters()
    assert (c["snat_new"], c["snat_fail"]) == (2, 1)


def test_no_address_of_the_family_on_the_interface_drops_and_counts(snat):
    e = snat(v6=None)
    p = eth(IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=42004, dport=80, flags="S"), v6=True)
    fwd = run_ok(e, "in", p)
    assert e.run("out", fwd)[0] == SHOT
    assert e.counters()["snat_fail"] == 1


def test_what_is_no_snat_flow_passes_untouched(snat):
    e = snat()
    plain = eth(IP(src="10.0.9.11", dst="10.250.0.7") / TCP(sport=8080, dport=5000, flags="A"))
    assert e.run("out", plain)[0] == UNSPEC  # leaving, not a tracked request
    stray = eth(IP(src="10.0.9.11", dst=NODE) / TCP(sport=8080, dport=LO + 5, flags="A"))
    assert e.run("in", stray)[0] == UNSPEC  # to a SNAT port nobody holds
    below = eth(IP(src="10.0.9.11", dst=NODE) / TCP(sport=8080, dport=LO - 1, flags="A"))
    assert e.run("in", below)[0] == UNSPEC


def test_routed_mode_never_rewrites_the_source(snat):
    e = Env()  # no snat_ports: routed mode, the SNAT paths are not even verified in
    try:
        e.apply(web())
        set_node_addresses(e)
        sport = 42005
        fwd = run_ok(e, "in", syn(sport))
        assert e.run("out", fwd)[0] == UNSPEC
    finally:
        e.close()


def test_fragmented_request_every_fragment_leaves_with_the_node_address(snat):
    e = snat()
    sport = 42006
    dgram = udp_req(sport, payload=bytes(range(256)) * 2)
    b = be4(5353, "UDP", sport)
    frags = [eth(f) for f in fragment(dgram[IP], fragsize=200)]
    fwd = [run_ok(e, "in", f) for f in frags]
    first = run_ok(e, "out", fwd[0])
    port = first[UDP].sport
    assert first[IP].src == NODE and LO <= port <= HI
    whole = rebuilt(dgram)
    whole[IP].src, whole[IP].dst, whole[UDP].sport, whole[UDP].dport = NODE, b, port, 5353
    want = [eth(f) for f in fragment(Ether(bytes(whole))[IP], fragsize=200)]
    same(first, want[0])
    for f, w in zip(fwd[1:], want[1:]):
        same(run_ok(e, "out", f), w)


def test_icmp_errors_cross_both_layers(snat):
    """Port unreachable from the backend to node:port reaches the client quoting the VIP;
    an error from the client about a reply reaches the backend quoting node:port."""
    e = snat()
    sport = 42007
    b = be4(5353, "UDP", sport)
    fwd = run_ok(e, "in", udp_req(sport))
    _, port = snat_out(e, fwd, UDP)
    err = eth(IP(src=b, dst=NODE) / ICMP(type=3, code=3) /
              quote(NODE, b, port, 5353, b"query", id=4242, ttl=63))
    back = run_ok(e, "in", err)
    want = eth(IP(src=b, dst=CLIENT) / ICMP(type=3, code=3) /
               quote(CLIENT, b, sport, 5353, b"query", id=4242, ttl=63))
    same(back, rebuilt(want))
    out = run_ok(e, "out", back)
    want2 = eth(IP(src=DNS_VIP, dst=CLIENT) / ICMP(type=3, code=3) /
                quote(CLIENT, DNS_VIP, sport, 53, b"query", id=4242, ttl=63))
    same(out, rebuilt(want2))
    # the other way: the client says the VIP's reply was unwelcome
    cerr = eth(IP(src=CLIENT, dst=DNS_VIP) / ICMP(type=3, code=3) /
               quote(DNS_VIP, CLIENT, 53, sport, b"answer", id=9, ttl=60))
    inb = run_ok(e, "in", cerr)
    assert inb[IP].dst == b and inb[IPerror].src == b
    leaving = run_ok(e, "out", inb)
    want3 = eth(IP(src=NODE, dst=b) / ICMP(type=3, code=3) /
                quote(b, NODE, 5353, port, b"answer", id=9, ttl=60))
    same(leaving, rebuilt(want3))
    assert e.counters()["icmp_xlate"] == 4


def test_pins_of_the_older_layout_are_migrated_on_load():
    """An instance pinned before SNAT mode: smaller counter and interface-record values.
    libbpf cannot reuse them; load() recreates the counters and carries the record over."""
    import subprocess
    from meshd import names
    from meshd.dataplane import loader
    from testlib import CGROUP2, TEST_PREFIX, claim, release
    import secrets
    instance = TEST_PREFIX + secrets.token_hex(4)
    claim(instance)
    cgroup = CGROUP2 / instance
    cgroup.mkdir()
    maps = None
    try:
        maps = loader.load(BPFFS, instance, cgroup, 1021, metrics=False)
        pin_dir = names.pin_dir(BPFFS, instance)
        subprocess.run(["bpftool", "map", "create", str(pin_dir / names.MAP_TC_STATS), "type",
                        "percpu_array", "key", "4", "value", "80", "entries", "1", "name",
                        names.MAP_TC_STATS], check=True)
        subprocess.run(["bpftool", "map", "create", str(pin_dir / names.MAP_TC_IFS), "type",
                        "hash", "key", "16", "value", "24", "entries", "256", "name",
                        names.MAP_TC_IFS, "flags", "1"], check=True)
        key = bytes(tc.IfKey(netns_ino=4026531840, ifindex=7))
        val = b"eth7".ljust(16, b"\0") + (1234).to_bytes(4, "little") + (1).to_bytes(4, "little")
        subprocess.run(["bpftool", "map", "update", "pinned", str(pin_dir / names.MAP_TC_IFS),
                        "key", *map(str, key), "value", *map(str, val)], check=True)
        with tc.load(BPFFS, instance):
            pass
        assert tc.recorded_interfaces(BPFFS, instance) == [
            {"interface": "eth7", "ifindex": 7, "netns_ino": 4026531840, "mode": "routed",
             "snat_ports": None}]
        assert read_tc_counters(BPFFS, instance) == dict.fromkeys(tc.STATS_COUNTERS, 0)
    finally:
        if maps:
            maps.close()
        loader.remove(BPFFS, instance)
        cgroup.rmdir()
        release(instance)


def _ct(e: Env, direction: int) -> list:
    return [(k, v) for k, v in e.tcmaps.ct.items() if k.dir == direction]


def test_a_flow_whose_entries_were_evicted_gets_its_own_port_again(snat):
    e = snat()
    sport = 42010
    fwd = run_ok(e, "in", syn(sport))
    _, port = snat_out(e, fwd, TCP)
    for k, _v in _ct(e, tc.CT_FWD) + _ct(e, tc.CT_SNAT_OUT):  # as LRU would
        e.tcmaps.ct.delete(k)
    fwd2 = run_ok(e, "in", syn(sport, flags="A"))
    assert run_ok(e, "out", fwd2)[TCP].sport == port  # its SNAT_REV entry names this client


def test_a_flow_whose_port_was_taken_meanwhile_moves_instead_of_sharing_it(snat):
    e = snat()
    sport = 42011
    fwd = run_ok(e, "in", syn(sport))
    _, port = snat_out(e, fwd, TCP)
    (rk, rv), = _ct(e, tc.CT_SNAT_REV)
    rv.nat_addr = S.pack_addr(ipaddress.ip_address("10.250.0.99"))  # another client now
    e.tcmaps.ct.update(rk, rv)
    (ok, ov), = _ct(e, tc.CT_SNAT_OUT)
    ov.refreshed_ns = 0  # due for its once-a-second check
    e.tcmaps.ct.update(ok, ov)
    got = run_ok(e, "out", run_ok(e, "in", syn(sport, flags="A")))
    assert got[TCP].sport != port and LO <= got[TCP].sport <= HI
    mine = [v for k, v in _ct(e, tc.CT_SNAT_REV) if socket.ntohs(k.dport) == got[TCP].sport]
    assert len(mine) == 1 and mine[0].nat_port == socket.htons(sport)


# ---- ports come back: closed TCP flows, idle UDP flows ---------------------------------------
def _age_snat_rev(e: Env, seconds: float = 40) -> None:
    """Every SNAT_REV entry stamped `seconds` ago (instead of waiting out a reuse delay);
    the programs' clock is CLOCK_MONOTONIC (coarse)."""
    stamp = max(1, time.monotonic_ns() - int(seconds * 1e9))
    for k, v in _ct(e, tc.CT_SNAT_REV):
        v.refreshed_ns = stamp
        e.tcmaps.ct.update(k, v)


def _one_port_flow(e: Env, src: str, sport: int, pkt=None):
    pkt = pkt or syn(sport, src=src)
    fwd = run_ok(e, "in", pkt)
    return e.run("out", fwd)


def test_a_closed_tcp_flows_port_serves_a_new_flow_after_the_delay(snat):
    e = snat(web(ids=(1,)), ports=(LO, LO))
    v, out = _one_port_flow(e, "10.250.0.1", 42100)
    assert v == XLATED and Ether(out)[TCP].sport == LO
    assert _one_port_flow(e, "10.250.0.2", 42100)[0] == SHOT  # held by an open flow
    _age_snat_rev(e, 3600)
    assert _one_port_flow(e, "10.250.0.2", 42101)[0] == SHOT, "an open flow idle for an hour"
    rst = syn(42100, src="10.250.0.1", flags="R")
    run_ok(e, "out", run_ok(e, "in", rst))  # the client resets: the flow is closed
    (_k, rv), = _ct(e, tc.CT_SNAT_REV)
    assert rv.rst == 1
    assert _one_port_flow(e, "10.250.0.2", 42102)[0] == SHOT, "not before the delay"
    _age_snat_rev(e, 2)
    v, out = _one_port_flow(e, "10.250.0.2", 42103)
    assert v == XLATED and Ether(out)[TCP].sport == LO
    (_k, rv), = _ct(e, tc.CT_SNAT_REV)
    assert (rv.rst, socket.ntohs(rv.nat_port)) == (0, 42103)  # now the new client's
    old_client = bytes(S.pack_addr(ipaddress.ip_address("10.250.0.1")))
    outs = [(bytes(k.saddr), socket.ntohs(k.sport)) for k, _v in _ct(e, tc.CT_SNAT_OUT)]
    assert (old_client, 42100) not in outs, "the old flow's request entry went with its port"
    reply = eth(IP(src=be4(8080, "TCP", 0, client="10.250.0.2"), dst=NODE) /
                TCP(sport=8080, dport=LO, flags="SA"))
    assert run_ok(e, "in", reply)[IP].dst == "10.250.0.2"


def test_a_flow_closed_by_the_backend_frees_its_port_too(snat):
    e = snat(web(ids=(1,)), ports=(LO, LO))
    _one_port_flow(e, "10.250.0.1", 42110)
    b = "10.0.9.11"
    for k, _v in _ct(e, tc.CT_FWD):  # as LRU would: the mark must not need it
        e.tcmaps.ct.delete(k)
    rst_b = eth(IP(src=b, dst=NODE) / TCP(sport=8080, dport=LO, flags="R"))
    run_ok(e, "out", run_ok(e, "in", rst_b))
    assert [rv.rst for _k, rv in _ct(e, tc.CT_SNAT_REV)] == [1]
    e = snat(web(ids=(1,)), ports=(LO, LO))  # and by FINs, each side one
    _one_port_flow(e, "10.250.0.1", 42110)
    fin_b = eth(IP(src=b, dst=NODE) / TCP(sport=8080, dport=LO, flags="FA"))
    run_ok(e, "out", run_ok(e, "in", fin_b))  # un-SNAT, then the routed REV layer
    run_ok(e, "out", run_ok(e, "in", syn(42110, flags="FA")))  # the client's FIN
    _age_snat_rev(e)
    assert _one_port_flow(e, "10.250.0.2", 42111)[0] == XLATED


def test_a_syn_reopening_a_closed_flow_keeps_its_port_and_clears_the_mark(snat):
    e = snat(web(ids=(1,)), ports=(LO, LO + 100))
    v, out = _one_port_flow(e, "10.250.0.1", 42120)
    port = Ether(out)[TCP].sport
    run_ok(e, "out", run_ok(e, "in", syn(42120, flags="R")))
    v, out = _one_port_flow(e, "10.250.0.1", 42120)  # the same tuple again, a new SYN
    assert v == XLATED and Ether(out)[TCP].sport == port
    assert [rv.rst for _k, rv in _ct(e, tc.CT_SNAT_REV)] == [0]


def test_an_idle_udp_flows_port_serves_a_new_flow(snat):
    e = snat(dns(ids=(1,)), ports=(LO, LO))
    assert _one_port_flow(e, "", 0, udp_req(42130))[0] == XLATED
    assert _one_port_flow(e, "", 0, udp_req(42131))[0] == SHOT  # busy (not idle 30 s)
    _age_snat_rev(e, 20)
    assert _one_port_flow(e, "", 0, udp_req(42133))[0] == SHOT  # idle 20 s: still its own
    _age_snat_rev(e, 31)
    v, out = _one_port_flow(e, "", 0, udp_req(42132))
    assert v == XLATED and Ether(out)[UDP].sport == LO


def test_a_flow_whose_fwd_entry_alone_was_evicted_keeps_its_port_without_a_new_pick(snat):
    e = snat()
    sport = 42140
    _, port = snat_out(e, run_ok(e, "in", syn(sport)), TCP)
    for k, _v in _ct(e, tc.CT_FWD):
        e.tcmaps.ct.delete(k)
    picks = e.counters()["snat_new"]
    got = run_ok(e, "out", run_ok(e, "in", syn(sport, flags="A")))
    assert got[TCP].sport == port and e.counters()["snat_new"] == picks


def test_an_open_tcp_flow_idle_six_hours_gives_its_port_up(snat):
    e = snat(web(ids=(1,)), ports=(LO, LO))
    _one_port_flow(e, "10.250.0.1", 42150)
    _age_snat_rev(e, 5 * 3600)
    assert _one_port_flow(e, "10.250.0.2", 42151)[0] == SHOT
    if time.monotonic() > 6 * 3600 + 60:  # the clock must reach back that far
        _age_snat_rev(e, 6 * 3600 + 10)
        assert _one_port_flow(e, "10.250.0.2", 42152)[0] == XLATED
    for k, v in _ct(e, tc.CT_SNAT_REV):  # stamped 0 by an older object: unknown age, kept
        v.refreshed_ns = 0
        e.tcmaps.ct.update(k, v)
    assert _one_port_flow(e, "10.250.0.3", 42153)[0] == SHOT
