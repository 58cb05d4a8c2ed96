"""The tc load balancer end to end: a client namespace reaches VIPs through a routing "node"
namespace running meshd's tc programs; backends sit on a LAN behind the node.

    P-cli                    P-na (node A)                 P-lan               P-b1 .. P-b5
    lo 10.250.0.1 ─ P-ca ═══ P-ac  [tc in/out]  P-al ═══ P-la ─┐              10.0.9.11..15
                   10.250.1.2      10.250.1.1  10.0.9.1        br0 ─ P-l<i> ═══ P-e<i>
                 ─ P-cb ═══ P-bc  [tc in/out]  P-bl ═══ P-lb ─┘
                   10.250.2.2   P-nb (node B)  10.0.9.2
                                10.250.2.1

The client talks from 10.250.0.1 and routes the service range via node A (or B); backends
route the client via the same node, so the node is on the return path (routed mode).
ip_forward is on only inside the two node namespaces; no namespace has a default route or
any link to the root namespace. P = "mtc" + 5 hex digits, claimed like test instances so a
crashed run's namespaces are swept by the next session (never a live session's).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshd.dataplane import libbpf as bpf
from meshd.dataplane import structs as S
from meshd.dataplane import loader, tc
from meshd.dataplane.kernel import KernelDataplane
from meshd.desired import NodePorts, desired_groups
from meshd.errors import DataplaneError
from meshd.model import parse_service
from meshd.reconciler import Reconciler
from testlib import BPFFS, CGROUP2, TEST_PREFIX, claim, owner_alive, release

AGENT = Path(__file__).resolve().parents[2] / "netns_lab" / "agent.py"
NS_PREFIX = "mtc"
CLIENT = "10.250.0.1"
WEB, DNS, CLOSED, EMPTY = "10.96.0.10", "10.96.0.53", "10.96.0.9", "10.96.0.99"
BACKENDS = 5


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and cp.returncode:
        raise RuntimeError(f"{' '.join(argv)}: exit {cp.returncode}: {cp.stderr.strip()}")
    return cp


def sweep_leftovers() -> None:
    """Namespaces of crashed runs of this module (owner dead), by prefix."""
    out = sh("ip", "netns", "list", check=False).stdout.split()
    for ns in out:
        if ns.startswith(NS_PREFIX) and "-" in ns:
            prefix = ns.split("-", 1)[0]
            if not owner_alive(prefix):
                sh("ip", "netns", "del", ns, check=False)
                release(prefix)


class Topo:
    def __init__(self) -> None:
        self.p = NS_PREFIX + secrets.token_hex(3)[:5]
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def ns(self, short: str) -> str:
        return f"{self.p}-{short}"

    def path(self, short: str) -> str:
        return f"/run/netns/{self.ns(short)}"

    def ip(self, short: str, *args: str) -> None:
        sh("ip", "-n", self.ns(short), *args)

    def veth(self, a: str, a_if: str, a_idx: int, b: str, b_if: str, b_idx: int) -> None:
        # distinct ifindexes on the two ends: equal ones delay carrier by up to 1 s
        sh("ip", "link", "add", f"{self.p}-{a_if}", "index", str(a_idx), "netns", self.ns(a),
           "type", "veth", "peer", "name", f"{self.p}-{b_if}", "index", str(b_idx),
           "netns", self.ns(b))
        self.ip(a, "link", "set", f"{self.p}-{a_if}", "up")
        self.ip(b, "link", "set", f"{self.p}-{b_if}", "up")

    def up(self) -> "Topo":
        claim(self.p)
        shorts = ["cli", "na", "nb", "lan"] + [f"b{i}" for i in range(1, BACKENDS + 1)]
        for s in shorts:
            sh("ip", "netns", "add", self.ns(s))
            self.namespaces.append(self.ns(s))
            self.ip(s, "link", "set", "lo", "up")
        self.ip("cli", "addr", "add", f"{CLIENT}/32", "dev", "lo")
        self.veth("cli", "ca", 11, "na", "ac", 12)
        self.veth("cli", "cb", 13, "nb", "bc", 14)
        self.ip("lan", "link", "add", "br0", "type", "bridge")
        self.ip("lan", "link", "set", "br0", "up")
        self.veth("na", "al", 15, "lan", "la", 16)
        self.veth("nb", "bl", 17, "lan", "lb", 18)
        self.ip("lan", "link", "set", f"{self.p}-la", "master", "br0")
        self.ip("lan", "link", "set", f"{self.p}-lb", "master", "br0")
        self.ip("cli", "addr", "add", "10.250.1.2/24", "dev", f"{self.p}-ca")
        self.ip("cli", "addr", "add", "10.250.2.2/24", "dev", f"{self.p}-cb")
        self.ip("na", "addr", "add", "10.250.1.1/24", "dev", f"{self.p}-ac")
        self.ip("nb", "addr", "add", "10.250.2.1/24", "dev", f"{self.p}-bc")
        self.ip("na", "addr", "add", "10.0.9.1/24", "dev", f"{self.p}-al")
        self.ip("nb", "addr", "add", "10.0.9.2/24", "dev", f"{self.p}-bl")
        self.ip("na", "route", "add", f"{CLIENT}/32", "via", "10.250.1.2")
        self.ip("nb", "route", "add", f"{CLIENT}/32", "via", "10.250.2.2")
        for node in ("na", "nb"):  # forwarding only inside the node namespaces
            sh("nsenter", f"--net={self.path(node)}", "--", "sysctl", "-qw",
               "net.ipv4.ip_forward=1")
        for i in range(1, BACKENDS + 1):
            self.veth(f"b{i}", f"e{i}", 40 + i, "lan", f"l{i}", 20 + i)
            self.ip("lan", "link", "set", f"{self.p}-l{i}", "master", "br0")
            self.ip(f"b{i}", "addr", "add", f"{self.backend(i)}/24", "dev", f"{self.p}-e{i}")
        self.via("a")
        for i in range(1, BACKENDS + 1):
            log = open(os.devnull, "wb")
            self.procs.append(subprocess.Popen(
                ["nsenter", f"--net={self.path(f'b{i}')}", "--", sys.executable, "-I", "-S",
                 str(AGENT), "serve", "--name", f"b{i}", "--port", "8080", "--udp"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log))
        deadline = time.monotonic() + 10
        for i in range(1, BACKENDS + 1):  # plain routing, no meshd yet: wait until it works
            while True:
                try:
                    assert tcp_names(self, self.backend(i), 8080, 1, timeout=0.5) == [f"b{i}"]
                    break
                except (OSError, AssertionError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        return self

    @staticmethod
    def backend(i: int) -> str:
        return f"10.0.9.{10 + i}"

    def via(self, node: str) -> None:
        """Client and backends route through node "a" or "b"."""
        gw_cli, gw_lan = ("10.250.1.1", "10.0.9.1") if node == "a" else ("10.250.2.1", "10.0.9.2")
        for net in ("10.96.0.0/16", "10.0.9.0/24"):
            self.ip("cli", "route", "replace", net, "via", gw_cli, "src", CLIENT)
        for i in range(1, BACKENDS + 1):
            self.ip(f"b{i}", "route", "replace", "10.250.0.0/16", "via", gw_lan)

    def down(self) -> None:
        for proc in self.procs:  # by PID, the ones we started
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)
        for ns in self.namespaces:  # takes veths, the bridge and tc filters with it
            sh("ip", "netns", "del", ns, check=False)
        release(self.p)


def client_socket(topo: Topo, kind: int) -> socket.socket:
    """A socket in the client namespace (a socket keeps the namespace it was made in)."""
    box: list[socket.socket] = []
    bpf.in_netns(topo.path("cli"))(lambda: box.append(socket.socket(socket.AF_INET, kind)))
    return box[0]


def tcp_open(topo: Topo, addr: str, port: int, timeout: float = 2.0) -> socket.socket:
    s = client_socket(topo, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.bind((CLIENT, 0))
        s.connect((addr, port))
    except BaseException:
        s.close()
        raise
    return s


def ask(s: socket.socket) -> str:
    s.sendall(b"hi\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(64)
        if not chunk:
            raise ConnectionError("EOF")
        buf += chunk
    return buf.decode().strip()


def tcp_names(topo: Topo, addr: str, port: int, n: int, timeout: float = 2.0) -> list[str]:
    out = []
    for _ in range(n):
        with tcp_open(topo, addr, port, timeout) as s:
            out.append(ask(s))
    return out


def udp_flow(topo: Topo, sport: int, addr: str = DNS, port: int = 53,
             timeout: float = 2.0) -> str:
    """One datagram from CLIENT:sport; the answer must come from addr:port (connected)."""
    s = client_socket(topo, socket.SOCK_DGRAM)
    with s:
        s.settimeout(timeout)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((CLIENT, sport))
        s.connect((addr, port))
        s.send(b"x")
        return s.recv(64).decode()


def services(backends=(1, 2, 3), dummy: bool = False) -> list:
    def eps(port_name, port, ids):
        return [{"address": Topo.backend(i), "ports": {port_name: port}} for i in ids]
    svcs = [
        {"namespace": "t", "name": "web", "vips": [WEB],
         "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
         "endpoints": eps("http", 8080, backends)},
        {"namespace": "t", "name": "dns", "vips": [DNS],
         "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}],
         "endpoints": eps("dns", 8080, backends)},
        {"namespace": "t", "name": "closed", "vips": [CLOSED],
         "ports": [{"name": "p", "port": 9, "protocol": "UDP"}],
         "endpoints": eps("p", 9999, backends)},
        {"namespace": "t", "name": "empty", "vips": [EMPTY],
         "ports": [{"name": "http", "port": 80, "protocol": "TCP"}], "endpoints": []},
    ]
    if dummy:  # written first: the same backends get other ids than on the other node
        svcs.insert(0, {"namespace": "t", "name": "aaa", "vips": ["10.96.1.1"],
                        "ports": [{"name": "p", "port": 1, "protocol": "TCP"}],
                        "endpoints": eps("p", 1, (5, 4))})
    return [parse_service(s, where=s["name"]) for s in svcs]


class Node:
    """One meshd instance: socket LB maps (own empty cgroup), reconciler, tc filters."""

    def __init__(self, topo: Topo, node: str, interface: str):
        self.topo, self.node, self.interface = topo, node, interface
        self.instance = TEST_PREFIX + topo.p + node
        claim(self.instance)
        self.cgroup = CGROUP2 / self.instance
        self.cgroup.mkdir()
        self.maps = None
        self.maps = loader.load(BPFFS, self.instance, self.cgroup, 1021, metrics=False)
        self.rec = Reconciler(KernelDataplane(self.maps))

    def apply(self, svcs) -> None:
        rep = self.rec.apply(desired_groups(svcs))
        assert not rep.errors, rep.errors

    def attach(self, interfaces=None) -> dict[str, int]:
        return tc.attach_interfaces(BPFFS, self.instance, interfaces or [self.interface],
                                    netns=self.topo.ns(self.node))

    def counters(self) -> dict[str, int]:
        m = tc.open_maps(BPFFS, self.instance)
        try:
            return m.counters()
        finally:
            m.close()

    def close(self) -> None:
        try:
            tc.detach_all(BPFFS, self.instance)
        finally:
            if self.maps:
                self.maps.close()
            loader.remove(BPFFS, self.instance)
            self.cgroup.rmdir()
            release(self.instance)


@pytest.fixture(scope="module")
def topo():
    sweep_leftovers()
    t = Topo()
    try:
        yield t.up()
    finally:
        t.down()


@pytest.fixture(scope="module")
def node_a(topo):
    n = Node(topo, "na", f"{topo.p}-ac")
    try:
        n.apply(services())
        n.attach()
        yield n
    finally:
        n.close()


@pytest.fixture
def reset_a(node_a):
    """Node A back to 3 backends and routing through A after a test that changed them."""
    yield node_a
    node_a.apply(services())
    node_a.topo.via("a")


# ---- tests --------------------------------------------------------------------------------
def test_tcp_and_udp_through_the_node_reach_every_backend(topo, node_a):
    got = tcp_names(topo, WEB, 80, 60)
    assert set(got) == {"b1", "b2", "b3"}
    udp = {udp_flow(topo, sport) for sport in range(41000, 41030)}
    assert udp == {"b1", "b2", "b3"}  # the reply came from DNS:53 (connected socket)
    c = node_a.counters()
    assert c["dnat"] > 0 and c["revnat"] > 0 and c["errors"] == 0


def test_traffic_to_no_service_passes_untouched(topo, node_a):
    before = node_a.counters()
    assert tcp_names(topo, Topo.backend(2), 8080, 3) == ["b2"] * 3
    after = node_a.counters()
    assert (after["dnat"], after["revnat"]) == (before["dnat"], before["revnat"])


def test_long_flows_stay_on_their_backend_while_backends_are_added(topo, reset_a):
    node = reset_a
    held = [tcp_open(topo, WEB, 80) for _ in range(40)]
    try:
        first = [ask(s) for s in held]
        node.apply(services((1, 2, 3, 4, 5)))
        assert [ask(s) for s in held] == first
        tc.attach_interfaces(BPFFS, node.instance, [node.interface], netns=topo.ns("na"))
        assert [ask(s) for s in held] == first, "a program swap (restart) keeps the flows"
    finally:
        for s in held:
            s.close()
    assert {"b4", "b5"} & set(tcp_names(topo, WEB, 80, 60)), "new flows use new backends"


def test_a_removed_backend_drains_then_only_its_flows_move(topo, reset_a):
    """Drain (issue 9 item 2): a backend that leaves the selection leaves the Maglev table at
    once (new flows avoid it) but keeps the flows it has while they live (before: they were
    re-picked mid-flow, and the new backend answered with a reset); once its drain is over,
    only its own flows move."""
    import time
    node = reset_a
    sports = range(42000, 42060)
    before = {s: udp_flow(topo, s) for s in sports}
    assert set(before.values()) == {"b1", "b2", "b3"}
    node.apply(services((1, 3)))
    assert node.rec.draining >= 1  # b2 on each service port it served
    during = {s: udp_flow(topo, s) for s in sports}
    assert during == before, "an established flow moved while its backend drained"
    new = {udp_flow(topo, s) for s in range(42100, 42160)}
    assert new <= {"b1", "b3"}, "a new flow went to the draining backend"
    node.rec.collect_drained()  # b2's ports without flows go; the UDP one has live flows
    left = node.rec.draining
    assert left >= 1
    assert node.rec.collect_drained(now=time.monotonic() + 10**6) == left  # the deadline
    after = {s: udp_flow(topo, s) for s in sports}
    for s in sports:
        if before[s] == "b2":
            assert after[s] in ("b1", "b3")
        else:
            assert after[s] == before[s], f"flow {s} moved from {before[s]} to {after[s]}"


def test_two_nodes_with_the_same_state_choose_the_same_backend(topo, node_a, reset_a):
    """The same 5-tuple through node A, then through node B (other backend ids): the same
    backend, without any state shared between the nodes."""
    node_b = Node(topo, "nb", f"{topo.p}-bc")
    try:
        node_b.apply(services(dummy=True))
        ids = lambda n: {bytes(v.addr): k.value for k, v in n.maps.backends.items()}  # noqa: E731
        assert ids(node_a) != ids(node_b), "the test needs different ids on the two nodes"
        node_b.attach()
        sports = range(43000, 43040)
        via_a = {s: udp_flow(topo, s) for s in sports}
        topo.via("b")
        via_b = {s: udp_flow(topo, s) for s in sports}
        assert via_b == via_a
        assert len(set(via_a.values())) == 3
        assert node_b.counters()["dnat"] >= len(sports)
    finally:
        topo.via("a")
        node_b.close()


def test_icmp_port_unreachable_reaches_the_client_as_the_vip(topo, node_a):
    """The backend's ICMP error quotes the backend; translated back it matches the client's
    connected socket (peer VIP:9), which then sees ECONNREFUSED instead of a timeout."""
    with pytest.raises(ConnectionRefusedError):
        udp_flow(topo, 44000, CLOSED, 9, timeout=3)
    assert node_a.counters()["icmp_xlate"] >= 1


def test_a_service_without_backends_is_refused(topo, node_a):
    """kube-proxy's REJECT: the SYN is answered with a RST (before: dropped, a timeout)."""
    before = node_a.counters()["reject"]
    with pytest.raises(ConnectionRefusedError):
        tcp_open(topo, EMPTY, 80, timeout=3)
    assert node_a.counters()["reject"] > before


def _filters(topo: Topo, node: str, dev: str) -> list[str]:
    out = []
    for hook in ("ingress", "egress"):
        cp = sh("tc", "-n", topo.ns(node), "filter", "show", "dev", dev, hook)
        out += [f"{hook} {line}" for line in cp.stdout.splitlines() if " handle " in line]
    return out


def test_attach_detach_and_a_clear_error_for_an_unknown_interface(topo, node_a):
    dev_c, dev_l = f"{topo.p}-ac", f"{topo.p}-al"
    with pytest.raises(DataplaneError, match=r"no interface 'nosuch0' in network namespace "
                       r".*fix tc.interfaces"):
        tc.attach_interfaces(BPFFS, node_a.instance, [dev_c, "nosuch0"], netns=topo.ns("na"))
    assert len(_filters(topo, "na", dev_c)) == 2, "a failed call attaches nothing new"
    try:
        assert node_a.attach([dev_c, dev_l]) == {dev_c: 12, dev_l: 15}
        assert len(_filters(topo, "na", dev_c)) == 2, "re-attaching replaces, never adds"
        assert len(_filters(topo, "na", dev_l)) == 2
        node_a.attach([dev_c])  # the list shrank: the other interface is detached
        assert _filters(topo, "na", dev_l) == []
        assert tc.detach_interfaces(BPFFS, node_a.instance, None, netns=topo.ns("na")) == [dev_c]
        assert _filters(topo, "na", dev_c) == []
        with pytest.raises(OSError):  # node A has no route for the VIPs: not translated
            tcp_open(topo, WEB, 80, timeout=0.5)
        node_a.attach()
        assert tc.detach_all(BPFFS, node_a.instance) == [dev_c]
        assert _filters(topo, "na", dev_c) == []
    finally:
        node_a.attach()
    assert tcp_names(topo, WEB, 80, 3)


def test_an_l3_device_is_refused_by_name_and_nothing_is_attached(topo, node_a):
    """A tun device (like WireGuard or an ipip tunnel) carries bare IP packets: the programs
    parse Ethernet frames and would rewrite bytes 14 too far. attach refuses it, naming it,
    before anything is attached."""
    dev_c, tun = f"{topo.p}-ac", f"{topo.p}-tn"
    topo.ip("na", "tuntap", "add", "mode", "tun", "name", tun)
    try:
        topo.ip("na", "link", "set", tun, "up")
        with pytest.raises(DataplaneError, match=rf"tc.interfaces: '{tun}' \(link type none\) "
                           r"in network namespace .* not Ethernet frames .*remove it from "
                           r"tc.interfaces"):
            tc.attach_interfaces(BPFFS, node_a.instance, [dev_c, tun], netns=topo.ns("na"))
        assert _filters(topo, "na", tun) == []
        assert len(_filters(topo, "na", dev_c)) == 2
    finally:
        topo.ip("na", "link", "del", tun)
    assert tcp_names(topo, WEB, 80, 3)


def _mirrored(topo: Topo, node: str, dev: str, hook: str) -> int:
    """Packets the mirror action of `dev`'s filter at priority 50 on `hook` has seen."""
    cp = sh("tc", "-n", topo.ns(node), "-s", "-j", "filter", "show", "dev", dev, hook)
    return sum(a["stats"]["packets"] for f in json.loads(cp.stdout) if f.get("pref") == 50
               for a in f.get("options", {}).get("actions", []))


def test_filters_of_other_tools_after_ours_see_translated_packets(topo, node_a):
    """Another tool's filters at a later priority on the same hooks (here a traffic tap: u32
    + mirred, as a capture or IDS would add) run after meshd's and see the packets as meshd
    left them: requests to the backend, replies from the VIP. With TC_ACT_OK they never ran."""
    dev = f"{topo.p}-ac"
    tap_ns = topo.ns("tap")
    sh("ip", "netns", "add", tap_ns)
    topo.namespaces.append(tap_ns)
    try:  # the mirror's copies leave by a veth into a namespace that drops them
        sh("ip", "-n", topo.ns("na"), "link", "add", f"{topo.p}-tp", "type", "veth", "peer",
           "name", f"{topo.p}-tq", "netns", tap_ns)
        topo.ip("na", "link", "set", f"{topo.p}-tp", "up")
        sh("ip", "-n", tap_ns, "link", "set", f"{topo.p}-tq", "up")
        for hook, match in (("ingress", ["dst", "10.0.9.0/24"]), ("egress", ["src", WEB])):
            sh("tc", "-n", topo.ns("na"), "filter", "add", "dev", dev, hook, "prio", "50",
               "protocol", "ip", "u32", "match", "ip", *match, "action", "mirred", "egress",
               "mirror", "dev", f"{topo.p}-tp")
        n = 5
        assert len(tcp_names(topo, WEB, 80, n)) == n  # the chain goes on: still served
        # every request packet (SYN, data, ACKs, FIN) and every reply: at least 3 each way
        assert _mirrored(topo, "na", dev, "ingress") >= 3 * n
        assert _mirrored(topo, "na", dev, "egress") >= 3 * n
    finally:
        for hook in ("ingress", "egress"):
            sh("tc", "-n", topo.ns("na"), "filter", "del", "dev", dev, hook, "prio", "50",
               check=False)
        sh("ip", "netns", "del", tap_ns, check=False)  # takes the veth pair with it
        topo.namespaces.remove(tap_ns)


# ---- SNAT mode and NodePort -------------------------------------------------------------------
NODE_B_CLIENT_SIDE, NODE_B_LAN = "10.250.2.1", "10.0.9.2"
SNAT_PORTS = (61000, 61999)


def snat_services(backends=(1, 2, 3)) -> list:
    """services() with node ports: web on 30080/TCP, dns on 30053/UDP."""
    out = []
    for s in services(backends):
        d = s.model_dump(mode="json")
        if d["name"] in ("web", "dns"):
            d["ports"][0]["node_port"] = 30080 if d["name"] == "web" else 30053
        out.append(parse_service(d, where=d["name"]))
    return out


def tcp_from(topo: Topo, ns_short: str, addr: str, port: int, timeout: float = 2.0) -> str:
    """One TCP exchange from a socket made in namespace `ns_short`."""
    box: list[socket.socket] = []
    bpf.in_netns(topo.path(ns_short))(lambda: box.append(socket.socket()))
    with box[0] as s:
        s.settimeout(timeout)
        s.connect((addr, port))
        return ask(s)


@pytest.fixture
def node_b_snat(topo, node_a):
    """Node B serving the services and node ports; backends have NO route to the client, so
    only a reply addressed to the node (SNAT) can come back. Yields (node, attach(snat))."""
    node_b = Node(topo, "nb", f"{topo.p}-bc")
    lan = f"{topo.p}-bl"
    try:
        ports = NodePorts(addresses=(ipaddress.ip_address(NODE_B_CLIENT_SIDE),
                                     ipaddress.ip_address(NODE_B_LAN)))
        rep = node_b.rec.apply(desired_groups(snat_services(), ports))
        assert not rep.errors, rep.errors
        topo.via("b")
        for i in range(1, BACKENDS + 1):
            topo.ip(f"b{i}", "route", "del", "10.250.0.0/16")

        def attach(snat: bool) -> None:
            tc.attach_interfaces(BPFFS, node_b.instance, [node_b.interface, lan],
                                 netns=topo.ns("nb"), snat_ports=SNAT_PORTS if snat else None)
        yield node_b, attach
    finally:
        topo.via("a")
        node_b.close()


def test_snat_mode_serves_clients_whose_backends_cannot_route_back(topo, node_b_snat):
    node, attach = node_b_snat
    attach(snat=False)  # routed mode: the backends' replies have nowhere to go
    with pytest.raises(OSError):
        tcp_open(topo, WEB, 80, timeout=0.5)
    attach(snat=True)
    assert set(tcp_names(topo, WEB, 80, 40)) == {"b1", "b2", "b3"}
    assert {udp_flow(topo, sport) for sport in range(45000, 45030)} == {"b1", "b2", "b3"}
    with pytest.raises(ConnectionRefusedError):  # ICMP through both layers, as the VIP
        udp_flow(topo, 45100, CLOSED, 9, timeout=3)
    c = node.counters()
    assert c["snat_new"] >= 40 + 30 and c["unsnat"] > 0 and c["icmp_xlate"] >= 2
    assert (c["snat_fail"], c["errors"]) == (0, 0)
    m = tc.open_maps(BPFFS, node.instance)
    try:  # every reply entry is for the node's LAN address and a port of the range
        rev = [(k, v) for k, v in m.ct.items() if k.dir == tc.CT_SNAT_REV]
    finally:
        m.close()
    assert rev and all(bytes(k.daddr)[-4:] == socket.inet_aton(NODE_B_LAN) and
                       SNAT_PORTS[0] <= socket.ntohs(k.dport) <= SNAT_PORTS[1] for k, _v in rev)


def test_node_port_on_the_node_address(topo, node_b_snat):
    node, attach = node_b_snat
    attach(snat=True)
    assert set(tcp_names(topo, NODE_B_CLIENT_SIDE, 30080, 40)) == {"b1", "b2", "b3"}
    assert {udp_flow(topo, sport, NODE_B_CLIENT_SIDE, 30053)
            for sport in range(45200, 45230)} == {"b1", "b2", "b3"}
    with pytest.raises(OSError):  # a port that is no node port is the node's own business
        tcp_open(topo, NODE_B_CLIENT_SIDE, 30081, timeout=0.5)


def test_hairpin_a_backend_reaches_its_own_service_through_the_node(topo, node_b_snat):
    """b1 calls the VIP via node B; some flows land on b1 itself. With SNAT the backend sees
    the node as the peer, so even those replies go back through the node."""
    node, attach = node_b_snat
    attach(snat=True)
    topo.ip("b1", "route", "replace", "10.96.0.0/16", "via", NODE_B_LAN)
    try:
        got = [tcp_from(topo, "b1", WEB, 80) for _ in range(40)]
    finally:
        topo.ip("b1", "route", "del", "10.96.0.0/16")
    assert set(got) == {"b1", "b2", "b3"}


def _scrape_in(topo: Topo, ns_short: str, port: int) -> str:
    import urllib.request
    box: list[str] = []
    bpf.in_netns(topo.path(ns_short))(lambda: box.append(urllib.request.urlopen(
        f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()))
    return box[0]


def test_daemon_serves_node_ports_in_snat_mode_from_its_config(topo, node_a, tmp_path):
    """`meshd run` inside node B's namespace, configured only by its file: tc.mode snat on
    both interfaces, a node port in the services file; the backends cannot route back."""
    import yaml
    instance = TEST_PREFIX + topo.p + "d"
    claim(instance)
    cgroup = CGROUP2 / instance
    cgroup.mkdir()
    metrics_port = 19469  # inside node B's own namespace: nothing else listens there
    svcs = [s.model_dump(mode="json") for s in snat_services() if s.name in ("web", "dns")]
    (tmp_path / "services.yaml").write_text(yaml.safe_dump({"services": svcs}))
    config = tmp_path / "meshd.yaml"
    config.write_text(yaml.safe_dump({
        "instance": instance, "cgroup": str(cgroup), "bpffs": str(BPFFS),
        "state_dir": str(tmp_path / "state"), "services_file": str(tmp_path / "services.yaml"),
        "maglev": {"table_size": 1021}, "etcd": None,
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"}, "healthz": {"listen": None},
        "tc": {"interfaces": [f"{topo.p}-bc", f"{topo.p}-bl"], "mode": "snat",
               "snat_ports": "61000-61999"},
        "node_ports": {"addresses": ["10.250.2.0/24"]}}))
    log = tmp_path / "meshd.log"
    proc = None
    topo.via("b")
    for i in range(1, BACKENDS + 1):
        topo.ip(f"b{i}", "route", "del", "10.250.0.0/16")
    try:
        with open(log, "wb") as f:  # nsenter --net: the node's network, the host's /sys
            proc = subprocess.Popen(["nsenter", f"--net={topo.path('nb')}", "--", sys.executable,
                                     "-m", "meshd", "run", "--config", str(config)],
                                    stdout=f, stderr=f, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                tcp_names(topo, NODE_B_CLIENT_SIDE, 30080, 1, timeout=0.5)
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert set(tcp_names(topo, NODE_B_CLIENT_SIDE, 30080, 30)) == {"b1", "b2", "b3"}
        assert set(tcp_names(topo, WEB, 80, 30)) == {"b1", "b2", "b3"}
        with pytest.raises(OSError):  # node_ports.addresses left the LAN address out
            tcp_open(topo, NODE_B_LAN, 30080, timeout=0.5)
        text = _scrape_in(topo, "nb", metrics_port)
        snat = [line for line in text.splitlines()
                if line.startswith('meshd_tc_events_total{event="snat_new"}')]
        assert snat and float(snat[0].split()[-1]) >= 60, snat
        assert "tc LB (snat mode) on" in log.read_text()
        cp = subprocess.run([sys.executable, "-m", "meshd", "services", "--json", "--config",
                             str(config)], capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
        import json
        shown = json.loads(cp.stdout)
        assert sorted((t["interface"], t["mode"], tuple(t["snat_ports"]))
                      for t in shown["tc"]["interfaces"]) == \
            [(f"{topo.p}-bc", "snat", (61000, 61999)), (f"{topo.p}-bl", "snat", (61000, 61999))]
        assert shown["tc"]["counters"]["snat_new"] >= 60
        web = next(g for g in shown["services"] if g["group"] == "t/web:http/ipv4")
        assert f"{NODE_B_CLIENT_SIDE}:30080/TCP" in web["frontends"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        proc = None
        cp = subprocess.run([sys.executable, "-m", "meshd", "cleanup", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
        assert _filters(topo, "nb", f"{topo.p}-bc") == []
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        tc.detach_all(BPFFS, instance)
        loader.remove(BPFFS, instance)
        cgroup.rmdir()
        release(instance)
        topo.via("a")


def test_snat_follows_a_changed_interface_address(topo, node_b_snat):
    node, attach = node_b_snat
    attach(snat=True)
    lan = f"{topo.p}-bl"
    topo.ip("nb", "addr", "del", f"{NODE_B_LAN}/24", "dev", lan)
    topo.ip("nb", "addr", "add", "10.0.9.3/24", "dev", lan)
    try:
        tc.refresh_addresses(BPFFS, node.instance, [lan], netns=topo.ns("nb"))
        assert set(tcp_names(topo, WEB, 80, 20)) == {"b1", "b2", "b3"}
        m = tc.open_maps(BPFFS, node.instance)
        try:
            rev = [k for k, _v in m.ct.items() if k.dir == tc.CT_SNAT_REV]
        finally:
            m.close()
        assert any(bytes(k.daddr)[-4:] == socket.inet_aton("10.0.9.3") for k in rev)
    finally:
        topo.ip("nb", "addr", "del", "10.0.9.3/24", "dev", lan)
        topo.ip("nb", "addr", "add", f"{NODE_B_LAN}/24", "dev", lan)


def test_long_lived_tcp_flows_outlive_their_backend_turning_terminating_and_removed(topo,
                                                                                      reset_a):
    """Drain with real TCP through tc (issue 9): connections established to b2 keep talking
    to b2 while b2 turns terminating and is then removed from the service; new connections
    avoid it from the first change on; no established connection is reset."""
    from meshd.model import parse_service
    node = reset_a

    def web(b2: str | None):
        eps = [{"address": Topo.backend(i), "ports": {"http": 8080}} for i in (1, 3)]
        if b2 is not None:
            eps.append({"address": Topo.backend(2), "ports": {"http": 8080},
                        "ready": False, "serving": True, "terminating": b2 == "terminating"})
        return [parse_service({"namespace": "t", "name": "web", "vips": [WEB],
                               "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                               "endpoints": eps}, "web")]
    conns = [tcp_open(topo, WEB, 80) for _ in range(30)]
    try:
        first = [ask(s) for s in conns]
        assert "b2" in first, first
        for step in ("terminating", None):  # b2 terminating, then gone from the record
            node.apply(web(step))
            for _ in range(3):
                assert [ask(s) for s in conns] == first, f"a flow moved ({step})"
            fresh = tcp_names(topo, WEB, 80, 30)
            assert set(fresh) <= {"b1", "b3"}, f"a new connection reached b2 ({step})"
        node.rec.collect_drained()  # backends without live flows go; b2 has live flows
        want = bytes(S.pack_addr(ipaddress.ip_address(Topo.backend(2))))
        assert any(bytes(v.addr) == want and S.port_host(v.port) == 8080
                   for _k, v in node.maps.backends.items()), "b2 left meshd_be_v1 mid-flow"
    finally:
        for s in conns:
            s.close()
