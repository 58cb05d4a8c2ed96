"""Kernel metrics end to end: real BPF on the lab's cgroup, real traffic from the client
namespace, counters read back through the same collector Prometheus scrapes.

What a user would notice: every connection shows up once in its service's and its
backend's latency histogram; refusals, timeouts and resets are counted as such; a slow
backend is visible in its own latency buckets and not in the others'; the exposition
parses; `meshd top --once` shows the services; metrics can be switched off and on."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshd import names, top
from meshd.config import Config
from meshd.dataplane import loader
from meshd.dataplane.kernel import KernelDataplane
from meshd.desired import desired_groups
from meshd.metrics import (ControlPlaneStats, KernelSource, MeshdCollector, quantile,
                           start_metrics_server)
from meshd.model import parse_service
from meshd.reconciler import Reconciler
from prometheus_client import CollectorRegistry, generate_latest

from testlib import BPFFS, TEST_PREFIX, claim, release

M = 1021
VIP4, VIP6 = "10.96.0.10", "fd00:96::10"
G4, G6 = "default/web:p/ipv4", "default/web:p/ipv6"


class MeteredLB:
    """The lab's data plane with metrics, driven by the daemon's reconciler."""

    def __init__(self, lab):
        self.instance = TEST_PREFIX + lab.prefix
        claim(self.instance)
        self.maps = loader.load(BPFFS, self.instance, lab.cgroup, M)
        self.rec = Reconciler(KernelDataplane(self.maps))
        self.source = KernelSource(BPFFS, self.instance)
        self.lab = lab

    def apply(self, *services: dict) -> None:
        parsed = [parse_service(s, where=s["name"]) for s in services]
        report = self.rec.apply(desired_groups(parsed))
        assert not report.errors, report.errors

    def by_group(self) -> dict:
        """group key -> Counters (all backends and refusals added up)."""
        snap = self.source.snapshot()
        return {snap.groups[g]: c for g, c in snap.by_group().items()}

    def by_backend(self, group: str) -> dict:
        """lab backend name (b1..) -> Counters of `group` on that backend."""
        snap = self.source.snapshot()
        out = {}
        for (gid, bid), c in snap.stats.items():
            if snap.groups.get(gid) == group and bid:
                addr = snap.backends[bid].rsplit(":", 1)[0].strip("[]")
                out[next(f"b{i}" for i in (1, 2, 3) for fam in (4, 6)
                         if self.lab.backend_addr(i, fam) == addr)] = c
        return out

    def scrape(self) -> dict:
        """Parsed exposition: {sample name: [(labels, value)]}."""
        reg = CollectorRegistry(auto_describe=False)
        reg.register(MeshdCollector(self.source, ControlPlaneStats()))
        out: dict = {}
        for fam in text_string_to_metric_families(generate_latest(reg).decode()):
            for s in fam.samples:
                out.setdefault(s.name, []).append((s.labels, s.value))
        return out

    def close(self) -> None:
        self.maps.close()
        loader.remove(BPFFS, self.instance)
        release(self.instance)


@pytest.fixture
def mlb(lab):
    s = MeteredLB(lab)
    try:
        yield s
    finally:
        s.close()


def service(lab, backends=(1, 2, 3), *, name="web", proto="TCP", target=8080, port=80,
            ready=True) -> dict:
    eps = [{"address": lab.backend_addr(i, fam), "ports": {"p": target}, "ready": ready}
           for i in backends for fam in (4, 6)]
    return {"namespace": "default", "name": name, "vips": [VIP4, VIP6],
            "ports": [{"name": "p", "port": port, "protocol": proto}], "endpoints": eps}


def tcp(lab, addr, count, timeout=2.0) -> dict:
    return lab.agent("tcp", cgroup=True, addr=addr, port=80, count=count, timeout=timeout)


def sample(scraped: dict, name: str, **labels) -> float:
    hits = [v for lv, v in scraped.get(name, []) if all(lv.get(k) == x for k, x in labels.items())]
    assert len(hits) == 1, f"{name}{labels}: {hits} in {scraped.get(name)}"
    return hits[0]


def test_every_connection_is_in_its_histograms_once(lab, mlb):
    mlb.apply(service(lab))
    r4, r6 = tcp(lab, VIP4, 60), tcp(lab, VIP6, 30)
    assert r4["errors"] == {} and r6["errors"] == {}
    groups = mlb.by_group()
    for key, n in ((G4, 60), (G6, 30)):
        c = groups[key]
        assert c.opened == n and c.established == n and c.closed == n, c
        assert sum(c.failures.values()) == 0
        assert c.tx_bytes == 3 * n and c.rx_bytes == 3 * n  # "hi\n" out, "bN\n" back
        assert sum(c.rtt_hist) == n  # one smoothed-RTT sample per closed connection
    per_be = {b: c.established for b, c in mlb.by_backend(G4).items()}
    assert per_be == r4["by_backend"]
    # the exposition says the same, as a Prometheus histogram in seconds
    s = mlb.scrape()
    lab4 = {"namespace": "default", "service": "web", "port": "p", "family": "ipv4"}
    assert sample(s, "meshd_service_connect_latency_seconds_count", **lab4) == 60
    assert sample(s, "meshd_service_connect_latency_seconds_bucket", le="+Inf", **lab4) == 60
    assert sample(s, "meshd_service_connections_opened_total", **lab4) == 60
    for b, n in r4["by_backend"].items():
        i = int(b[1:])
        assert sample(s, "meshd_backend_connect_latency_seconds_count",
                      backend=f"{lab.backend_addr(i)}:8080/TCP", **lab4) == n
    # the kernel's view of connect latency agrees with the client's (veth, same host)
    p50 = quantile(groups[G4].connect_hist, 0.5)
    assert 1e-6 <= p50 <= 2 * r4["connect_us"][0] * 1e-6 + 1e-3


def test_no_usable_backend_counts_refused_for_the_service(lab, mlb):
    mlb.apply(service(lab, ready=False))
    assert tcp(lab, VIP4, 5)["errors"] == {"ECONNREFUSED": 5}
    c = mlb.by_group()[G4]
    assert c.fail_refused == 5 and c.opened == 0 and c.established == 0
    assert sample(mlb.scrape(), "meshd_service_connection_failures_total", service="web",
                  family="ipv4", kind="refused") == 5


def test_backend_rst_counts_refused_for_that_backend(lab, mlb):
    mlb.apply(service(lab, backends=(2,), target=9))  # nothing listens on port 9
    assert tcp(lab, VIP4, 4)["errors"] == {"ECONNREFUSED": 4}
    c = mlb.by_backend(G4)["b2"]
    assert c.opened == 4 and c.fail_refused == 4 and c.established == 0


def test_unanswered_syn_counts_as_timeout(lab, mlb):
    """The backend's end of the link is down: SYNs vanish. The kernel reports the failure
    when the socket gives up: here the client's 0.3 s timeout closes it in SYN_SENT."""
    mlb.apply(service(lab, backends=(1,)))
    lab.set_backend_link(1, False)
    try:
        assert tcp(lab, VIP4, 3, timeout=0.3)["errors"] == {"ETIMEDOUT": 3}
    finally:
        lab.set_backend_link(1, True)
    c = mlb.by_backend(G4)["b1"]
    assert c.opened == 3 and c.fail_timeout == 3 and c.established == 0 and c.closed == 0


def test_peer_reset_counts_as_reset_and_own_rst_close_does_not(lab, mlb):
    """b1 answers the handshake, then its firewall resets the connection (nft reject with
    tcp reset on the client's first ACK): a reset by the peer. Clients that close with RST
    themselves (SO_LINGER 0, as connrate does) end normally."""
    mlb.apply(service(lab, backends=(1,)))
    cr = lab.agent("connrate", cgroup=True, addr=VIP4, port=80, duration=0.5, max=50, timeout=2)
    assert cr["errors"] == {} and cr["count"] > 0
    c = mlb.by_backend(G4)["b1"]
    assert c.closed == cr["count"] and sum(c.failures.values()) == 0
    lab.exec("b1", ["nft", "-f", "-"], input=(
        "table inet mtest_rst {\n"
        "  chain in {\n"
        "    type filter hook input priority 0;\n"
        "    tcp dport 8080 tcp flags & (syn | ack | rst) == ack reject with tcp reset\n"
        "  }\n"
        "}\n"))
    res = tcp(lab, VIP4, 5)
    assert sum(res["errors"].values()) == 5 and not res["by_backend"]
    c2 = mlb.by_backend(G4)["b1"]
    assert c2.established - c.established == 5  # the handshake itself completed
    assert c2.fail_reset == 5 and c2.closed - c.closed == 5


def test_slow_backend_shows_in_its_own_latency_buckets_only(lab, mlb):
    """b2 drops every other SYN (nft numgen in its namespace), so each of its sequential
    connections waits one SYN retransmission (1 s initial RTO)."""
    lab.exec("b2", ["nft", "-f", "-"], input=(
        "table inet mtest_slow {\n"
        "  chain in {\n"
        "    type filter hook input priority 0;\n"
        "    tcp dport 8080 tcp flags & (syn | ack) == syn numgen inc mod 2 == 0 drop\n"
        "  }\n"
        "}\n"))
    mlb.apply(service(lab, backends=(1, 2)))
    res = tcp(lab, VIP4, 12, timeout=3)
    assert res["errors"] == {} and set(res["by_backend"]) == {"b1", "b2"}
    be = mlb.by_backend(G4)
    assert be["b2"].established == res["by_backend"]["b2"]
    assert quantile(be["b2"].connect_hist, 0.5) >= 0.5  # one RTO: ~1 s
    assert quantile(be["b1"].connect_hist, 0.99) < 0.1  # untouched
    assert sum(be["b1"].connect_hist[20:]) == 0  # nothing >= 2^19 us (0.52 s) on b1


@pytest.mark.parametrize("connected", [True, False], ids=["connected", "unconnected"])
@pytest.mark.parametrize("vip,group", [(VIP4, G4), (VIP6, G6)], ids=["ipv4", "ipv6"])
def test_udp_datagrams_and_bytes_per_service(lab, mlb, connected, vip, group):
    mlb.apply(service(lab, proto="UDP"))
    res = lab.agent("udp", cgroup=True, addr=vip, port=80, count=20, timeout=2,
                    **({"connected": True} if connected else {"unconnected": True}))
    assert res["errors"] == {}
    c = mlb.by_group()[group]
    # payload only: "hi\n" out (3 bytes), "bN" back (2 bytes), IP and UDP headers not counted
    assert (c.tx_packets, c.rx_packets, c.tx_bytes, c.rx_bytes) == (20, 20, 60, 40)
    assert c.opened == (20 if connected else 0)  # each exchange: a new (connected) socket
    per_be = {b: x.tx_packets for b, x in mlb.by_backend(group).items()}
    assert per_be == res["by_backend"]


def test_metrics_server_serves_a_parseable_exposition_over_ipv6(lab, mlb):
    mlb.apply(service(lab))
    tcp(lab, VIP4, 10)
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    control = ControlPlaneStats()
    control.record_sync({"put_backend": 6, "put_frontend": 2}, errors=0, rejected=1,
                        lag_seconds=0.25)
    server = start_metrics_server(f"[::1]:{port}", MeshdCollector(mlb.source, control))
    try:
        text = urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["meshd_service_connect_latency_seconds"].type == "histogram"
    assert fams["meshd_service_connections_opened"].type == "counter"
    assert fams["meshd_dataplane_up"].samples[0].value == 1
    assert fams["meshd_registry_rejected_records"].samples[0].value == 1
    ops = {s.labels["op"]: s.value for s in fams["meshd_map_ops"].samples
           if s.name == "meshd_map_ops_total"}
    assert ops == {"put_backend": 6, "put_frontend": 2}


def test_top_once_shows_services_backends_and_failures(lab, mlb, capsys):
    mlb.apply(service(lab), service(lab, name="down", port=81, ready=False))
    tcp(lab, VIP4, 20)
    lab.agent("tcp", cgroup=True, addr=VIP4, port=81, count=3, timeout=1)
    cfg = Config(instance=mlb.instance, bpffs=BPFFS)
    assert top.main(cfg, interval=0.1, once=True) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines()[2:]}
    assert lines[G4][2] == "20"  # CONNS
    assert lines["default/down:p/ipv4"][5] == "3/0/0"  # refused/timeout/reset
    assert out.splitlines()[2].split()[0] == "default/down:p/ipv4"  # failures first
    print(out)
    assert f"{lab.backend_addr(1)}:8080/TCP" in lines or f"{lab.backend_addr(2)}:8080/TCP" in lines


def test_top_without_a_data_plane_says_so(capsys):
    cfg = Config(instance=TEST_PREFIX + "nothing-here", bpffs=BPFFS)
    assert top.main(cfg, interval=0.01, once=True) == 1
    assert "no metrics maps" in capsys.readouterr().err


def test_metrics_off_keeps_balancing_and_stops_counting(lab, mlb):
    mlb.apply(service(lab))
    loader.set_metrics(BPFFS, mlb.instance, lab.cgroup, False)
    assert not loader.metrics_attached(mlb.maps.pin_dir)
    res = tcp(lab, VIP4, 10)
    assert res["errors"] == {} and sum(res["by_backend"].values()) == 10
    assert mlb.by_group()[G4].opened == 0
    loader.set_metrics(BPFFS, mlb.instance, lab.cgroup, True)
    assert loader.metrics_attached(mlb.maps.pin_dir)
    tcp(lab, VIP4, 10)
    assert mlb.by_group()[G4].established == 10


def test_counters_of_removed_services_are_pruned(lab, mlb):
    mlb.apply(service(lab), service(lab, name="other", port=81))
    tcp(lab, VIP4, 5)
    lab.agent("tcp", cgroup=True, addr=VIP4, port=81, count=5, timeout=2)
    mlb.apply(service(lab))  # "other" is gone; its group id may be reused later
    mm = loader.open_metrics(BPFFS, mlb.instance)
    try:
        assert mm.prune() > 0
        left = {mm.group_names().get(g) for g, _b in mm.read_stats()}
    finally:
        mm.close()
    assert left == {G4}
    assert names.MAP_STATS in {p.name for p in mlb.maps.pin_dir.iterdir()}


def attached_metrics(cgroup) -> dict[str, list[int]]:
    import os
    from meshd.dataplane import libbpf as bpf
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {a: bpf.prog_query(fd, a) for a in names.METRICS_PROGRAMS.values()}
    finally:
        os.close(fd)


def test_metrics_programs_are_attached_once_and_removed_with_the_instance(lab):
    s = MeteredLB(lab)
    try:
        assert all(len(ids) == 1 for ids in attached_metrics(lab.cgroup).values())
        loader.load(BPFFS, s.instance, lab.cgroup, M).close()  # a restart: swapped in place
        assert all(len(ids) == 1 for ids in attached_metrics(lab.cgroup).values())
    finally:
        s.close()
    assert all(ids == [] for ids in attached_metrics(lab.cgroup).values())
