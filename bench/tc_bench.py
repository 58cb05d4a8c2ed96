#!/usr/bin/env python3
"""tc (per-packet) LB benchmark: meshd's tc path vs plain routing vs kube-proxy-shaped
iptables DNAT, through one routing node, in one run, as ratios. Bounded: every measurement
runs --seconds; rounds are interleaved so drift hits every path alike.

  sudo .venv/bin/python bench/tc_bench.py [--services 1,10000] [--seconds 1] [--rounds 10]

Topology (fresh per size; namespaces "mtb<hex>-*", removed at the end, also on failure):

    cli 10.250.1.2 ═══ 10.250.1.1 node A 10.0.9.1 ═══ 10.0.9.11 ┐
                                                               be (iperf3 -s, name-echo)
    cli 10.250.2.2 ═══ 10.250.2.1 node B 10.0.8.1 ═══ 10.0.8.11 ┘

Two identical routed nodes (ip_forward only inside them): A carries the plain and meshd
paths, B the iptables paths. Separate nodes because a nat table, once used in a namespace,
keeps conntrack hooked there for good; this way every path is measured in every round,
interleaved, so the drift of a shared machine hits all of them alike. The client routes
10.96.0.0/12 and 10.0.9.0/24 via A, 10.100.0.0/16 and 10.0.8.0/24 via B; the backend
routes each client subnet back via its node.

Paths, all ending at the same backend process:
  plain       client -> backend (via A), no meshd filter on A: plain routing
  tc          client -> VIP (via A); meshd's tc programs on A's client-facing interface
              DNAT it (N services installed, the measured VIP is the last one)
  tc+other    client -> backend (via A) with the tc programs attached: what meshd costs
              traffic that is not for a service
  iptables    client -> VIP (via B); kube-proxy-shaped iptables-legacy nat rules in B's
              PREROUTING (KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP -> DNAT) for N services; the
              measured VIP is the LAST rule of KUBE-SERVICES (kube-proxy's linear worst case)
  plain+ipt   client -> backend (via B) while those rules are installed (conntrack and the
              chain walk for every new flow, service or not)
  tc-snat     client -> VIP (via A), meshd in SNAT mode on A: filters on the client-facing
              AND the backend-facing interface, source ports from --snat-ports; the
              backend's route back to the client is removed for these two paths (re-added
              for the others), so only SNAT can bring the replies back
  nodeport    client -> A's client-facing address 10.250.1.1 at node port 30080 (30201 for
              iperf3), SNAT mode as tc-snat (the measured service has node ports)
The tc mode is switched per path (detached / routed on A's client-facing interface / SNAT
on both), so the meshd paths share node A, its links and its conntrack map with plain.
The client uses the kernel's default ephemeral ports (--client-ports narrows them): every
connection is a new client tuple, so SNAT picks a port for each; a closed flow's port is
taken over a second after its close (snat_new counts the picks).
The tc counters (summed deltas over each path's measured runs, and the totals) are in the
results.
Metrics: TCP throughput (one iperf3 stream for 2 x --seconds, slow start omitted, Gbit/s)
and new flows per second for --seconds (sequential
connect + one request/reply + close with RST, the netns_lab agent's connrate). Ratios are
medians of per-round ratios (paths of a round run back to back), robust to the load of a
shared machine; the medians of the absolute values are printed too.
Writes bench/results/tc.json and prints a table.

--semantics: instead, the cost of kube-proxy semantics on the tc path (routed mode, node A),
same run, interleaved rounds, paired ratios (written to bench/results/tc_semantics.json):
  tc / tc-aff    the VIP with session affinity off / on (ClientIP; each new flow looks
                 up its client's entry, the group's timeout and membership)
  tc / tc-local  the VIP as an external frontend with external_traffic_policy Cluster /
                 Local (Local: found in the meshd_svc_ext_v1 override, its own group with
                 the local backend, keep source; Cluster: the override map misses)
The semantics maps are written directly (the reconciler does not write them yet).
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshd import names  # noqa: E402
from meshd.config import TcConfig  # noqa: E402
from meshd.dataplane import loader, tc  # noqa: E402
from meshd.dataplane.kernel import KernelDataplane  # noqa: E402
from meshd.desired import NodePorts, desired_groups  # noqa: E402
from meshd.model import parse_service  # noqa: E402
from meshd.reconciler import Reconciler  # noqa: E402
from benchlib import write_results  # noqa: E402

BPFFS = Path("/sys/fs/bpf")
CGROUP2 = Path("/sys/fs/cgroup/unified")
AGENT = ROOT / "netns_lab" / "agent.py"
M = 1021  # per-packet cost does not depend on M; 10,000 tables x 4 KiB
BACKEND, BACKEND_B = "10.0.9.11", "10.0.8.11"  # the backend, as reached via node A / B
PERF_PORT, ECHO_PORT = 5201, 8080
NODE_A = "10.250.1.1"  # node A's client-facing address: the NodePort frontend
NODE_PORT, NODE_PORT_PERF = 30080, 30201
CLIENT_NET_A = "10.250.1.0/24"


def vip(i: int) -> str:
    return str(ipaddress.ip_address("10.96.0.0") + 10 + i)


def ipt_vip(i: int) -> str:
    return str(ipaddress.ip_address("10.100.0.0") + 10 + i)


def sh(*argv: str, input: str | None = None, timeout: float = 60) -> str:
    cp = subprocess.run(list(argv), capture_output=True, text=True, input=input, timeout=timeout)
    if cp.returncode:
        raise RuntimeError(f"{' '.join(argv[:6])}...: exit {cp.returncode}: {cp.stderr.strip()}")
    return cp.stdout


class Topo:
    def __init__(self) -> None:
        self.p = "mtb" + secrets.token_hex(3)[:5]
        self.made: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.cpus = sorted(os.sched_getaffinity(0))

    def ns(self, s: str) -> str:
        return f"{self.p}-{s}"

    def enter(self, s: str, *argv: str, cpu: int | None = None) -> list[str]:
        pin = ["taskset", "-c", str(cpu)] if cpu is not None and len(self.cpus) > 1 else []
        return pin + ["nsenter", f"--net=/run/netns/{self.ns(s)}", "--", *argv]

    def up(self, client_ports: tuple[int, int] | None = None) -> "Topo":
        for s in ("cli", "na", "nb", "be"):
            sh("ip", "netns", "add", self.ns(s))
            self.made.append(self.ns(s))
            sh("ip", "-n", self.ns(s), "link", "set", "lo", "up")
        # (ns, if, addr) pairs; distinct ifindexes on the ends (equal ones delay carrier)
        links = ((("cli", "ca", "10.250.1.2"), ("na", "ac", "10.250.1.1")),
                 (("cli", "cb", "10.250.2.2"), ("nb", "bc", "10.250.2.1")),
                 (("na", "ae", "10.0.9.1"), ("be", "ea", BACKEND)),
                 (("nb", "be", "10.0.8.1"), ("be", "eb", BACKEND_B)))
        for k, ((a, ai, aa), (b, bi, ba)) in enumerate(links):
            sh("ip", "link", "add", f"{self.p}-{ai}", "index", str(11 + 2 * k), "netns",
               self.ns(a), "type", "veth", "peer", "name", f"{self.p}-{bi}", "index",
               str(12 + 2 * k), "netns", self.ns(b))
            for ns, dev, addr in ((a, ai, aa), (b, bi, ba)):
                sh("ip", "-n", self.ns(ns), "addr", "add", f"{addr}/24", "dev", f"{self.p}-{dev}")
                sh("ip", "-n", self.ns(ns), "link", "set", f"{self.p}-{dev}", "up")
        for net, gw in (("10.96.0.0/12", "10.250.1.1"), ("10.0.9.0/24", "10.250.1.1"),
                        ("10.100.0.0/16", "10.250.2.1"), ("10.0.8.0/24", "10.250.2.1")):
            sh("ip", "-n", self.ns("cli"), "route", "add", net, "via", gw)
        sh("ip", "-n", self.ns("be"), "route", "add", "10.250.1.0/24", "via", "10.0.9.1")
        sh("ip", "-n", self.ns("be"), "route", "add", "10.250.2.0/24", "via", "10.0.8.1")
        for node in ("na", "nb"):
            sh(*self.enter(node, "sysctl", "-qw", "net.ipv4.ip_forward=1"))
        if client_ports:
            sh(*self.enter("cli", "sysctl", "-qw",
                           f"net.ipv4.ip_local_port_range={client_ports[0]} {client_ports[1]}"))
        # Servers and clients all on one CPU: the whole path (client, both forwarding hops
        # in softirq, server) is bound by that CPU, so a per-packet cost shows up in the
        # throughput, and the other CPU absorbs other load. With client and server on
        # different CPUs, single-stream throughput here was bimodal (5 or 19 Gbit/s).
        server_cpu = self.cpus[0]
        for argv in ([sys.executable, "-I", "-S", str(AGENT), "serve", "--name", "b1",
                      "--port", str(ECHO_PORT)],
                     ["iperf3", "-s", "-p", str(PERF_PORT)]):
            self.procs.append(subprocess.Popen(self.enter("be", *argv, cpu=server_cpu),
                                               stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while True:  # plain routing works end to end through both nodes
            try:
                if all(connrate(self, a, ECHO_PORT, 0.2)["per_sec"] > 0
                       for a in (BACKEND, BACKEND_B)):
                    break
            except (RuntimeError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("lab not ready: the backend does not answer")
            time.sleep(0.2)
        return self

    def down(self) -> None:
        for p in self.procs:  # by PID: only what we started
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=3)
        for ns in self.made:  # takes the veths and tc filters with it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def connrate(topo: Topo, addr: str, port: int, seconds: float) -> dict:
    out = sh(*topo.enter("cli", sys.executable, "-I", "-S", str(AGENT), "connrate", "--addr",
                         addr, "--port", str(port), "--duration", str(seconds), "--max",
                         "200000", "--timeout", "2", cpu=topo.cpus[0]),
             timeout=seconds + 30)
    return json.loads(out)


def iperf(topo: Topo, addr: str, seconds: float, port: int = PERF_PORT) -> float:
    out = sh(*topo.enter("cli", "iperf3", "-c", addr, "-p", str(port), "-t",
                         str(seconds), "-O", "0.2", "-J", cpu=topo.cpus[0]),
             timeout=seconds + 30)
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def measure(topo: Topo, addr: str, port: int, seconds: float,
            perf_port: int = PERF_PORT) -> dict:
    """One connrate run (retried once if a connection failed: a 2 s timeout would distort
    the rate; a second failure is an error) and one iperf3 run."""
    for attempt in (1, 2):
        cr = connrate(topo, addr, port, seconds)
        if not cr["errors"]:
            break
        print(f"  ({addr}:{port}: {cr['errors']}, attempt {attempt})", file=sys.stderr)
    else:
        raise RuntimeError(f"connection errors via {addr}:{port}: {cr['errors']}")
    return {"gbps": round(iperf(topo, addr, 2 * seconds, perf_port), 2),
            "flows_per_sec": cr["per_sec"], "connect_p50_us": cr["connect_us"][0]}


def services(n: int) -> list:
    """n services; the last one (the measured VIP) also has the iperf3 port, and node ports
    (NODE_PORT for http, NODE_PORT_PERF for perf)."""
    out = []
    for i in range(n):
        ports = [{"name": "http", "port": 80, "protocol": "TCP"}]
        numbers = {"http": ECHO_PORT}
        if i == n - 1:
            ports[0]["node_port"] = NODE_PORT
            ports.append({"name": "perf", "port": PERF_PORT, "protocol": "TCP",
                          "node_port": NODE_PORT_PERF})
            numbers["perf"] = PERF_PORT
        out.append(parse_service({
            "namespace": "bench", "name": f"s{i}", "vips": [vip(i)], "ports": ports,
            "endpoints": [{"address": BACKEND, "ports": numbers}]}, where=f"s{i}"))
    return out


def iptables_rules(n: int) -> str:
    """The nat-table shape kube-proxy (iptables mode) writes for n ClusterIP services, for
    forwarded traffic (PREROUTING). The last service also has the iperf3 port."""
    lines = ["*nat", ":KUBE-SERVICES - [0:0]", ":KUBE-MARK-MASQ - [0:0]",
             "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
             "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"]
    svc_ports = [(i, 80, ECHO_PORT) for i in range(n)] + [(n - 1, PERF_PORT, PERF_PORT)]
    for k, _ in enumerate(svc_ports):
        lines += [f":KUBE-SVC-{k:012X} - [0:0]", f":KUBE-SEP-{k:012X} - [0:0]"]
    for k, (i, port, target) in enumerate(svc_ports):
        svc, sep = f"KUBE-SVC-{k:012X}", f"KUBE-SEP-{k:012X}"
        lines += [
            f"-A KUBE-SERVICES -d {ipt_vip(i)}/32 -p tcp -m comment --comment "
            f"\"bench/s{i}:{port} cluster IP\" -m tcp --dport {port} -j {svc}",
            f"-A {svc} -m comment --comment \"bench/s{i}:{port}\" -j {sep}",
            f"-A {sep} -s {BACKEND_B}/32 -j KUBE-MARK-MASQ",
            f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {BACKEND_B}:{target}"]
    lines.append("COMMIT\n")
    return "\n".join(lines)


def run_rounds(topo: Topo, paths: dict, args, counters=None, counted=()) -> dict:
    """paths: name -> (address, echo port, setup before each measurement or None[, iperf3
    port]). One unmeasured warm-up pass, then --rounds interleaved rounds; medians.
    counters: a callable returning the tc counters; for the paths in `counted` the deltas
    over their measured runs are summed into ["counters"]."""
    runs: dict[str, list] = {p: [] for p in paths}
    deltas: dict[str, dict] = {p: {} for p in counted}
    for rnd in range(args.rounds + 1):
        for p, (addr, port, setup, *perf) in paths.items():
            if setup:
                setup()
            if rnd == 0:
                connrate(topo, addr, port, 0.5)
                continue
            before = counters() if p in deltas else None
            runs[p].append(measure(topo, addr, port, args.seconds, *perf))
            if before is not None:
                for k, v in counters().items():
                    deltas[p][k] = deltas[p].get(k, 0) + v - before[k]
    return {p: {**{k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]},
                **({"counters": deltas[p]} if p in deltas else {}),
                "runs": rs} for p, rs in runs.items()}


def bench_size(n: int, args) -> dict:
    topo = Topo()
    instance = "bench-" + topo.p  # not "mtest-": test sessions sweep unclaimed ones
    cg = CGROUP2 / instance
    maps = tcm = None
    try:
        topo.up(args.client_ports)
        cg.mkdir()
        maps = loader.load(BPFFS, instance, cg, M, metrics=False)
        t0 = time.perf_counter()
        node_ports = NodePorts(addresses=(ipaddress.ip_address(NODE_A),))
        rep = Reconciler(KernelDataplane(maps)).apply(desired_groups(services(n), node_ports))
        sync_s = time.perf_counter() - t0
        assert not rep.errors, rep.errors
        t0 = time.perf_counter()
        sh(*topo.enter("nb", "iptables-legacy-restore"), input=iptables_rules(n), timeout=300)
        ipt_s = time.perf_counter() - t0
        dev, lan, node = f"{topo.p}-ac", f"{topo.p}-ae", topo.ns("na")
        state = {"mode": None, "route": True}  # tc mode on A; the backend's route to the client

        def route(present: bool) -> None:
            if state["route"] != present:
                sh("ip", "-n", topo.ns("be"), "route", "replace" if present else "del",
                   CLIENT_NET_A, *(("via", "10.0.9.1") if present else ()))
                state["route"] = present

        def mode(m: str | None) -> None:
            """None: no filter; "routed": client-facing interface only; "snat": both."""
            if state["mode"] != m:
                if m is None:
                    tc.detach_interfaces(BPFFS, instance, [dev, lan], netns=node)
                elif m == "routed":  # detaches the backend-facing one if it was attached
                    tc.attach_interfaces(BPFFS, instance, [dev], netns=node)
                else:
                    tc.attach_interfaces(BPFFS, instance, [dev, lan], netns=node,
                                         snat_ports=args.snat_ports)
                state["mode"] = m
            route(m != "snat")

        def counters() -> dict:
            nonlocal tcm
            if tcm is None:
                tcm = tc.open_maps(BPFFS, instance)
            return tcm.counters()
        med = run_rounds(topo, {"plain": (BACKEND, ECHO_PORT, lambda: mode(None)),
                                "tc": (vip(n - 1), 80, lambda: mode("routed")),
                                "tc+other": (BACKEND, ECHO_PORT, lambda: mode("routed")),
                                "tc-snat": (vip(n - 1), 80, lambda: mode("snat")),
                                "nodeport": (NODE_A, NODE_PORT, lambda: mode("snat"),
                                             NODE_PORT_PERF),
                                "iptables": (ipt_vip(n - 1), 80, None),
                                "plain+ipt": (BACKEND_B, ECHO_PORT, None)}, args,
                         counters, counted=("tc", "tc+other", "tc-snat", "nodeport"))
        tc_counters = counters()
    except BaseException:
        if tcm is not None:
            try:
                print(f"  tc counters at the failure: {tcm.counters()}", file=sys.stderr)
            except Exception:  # noqa: BLE001 -- reporting only
                pass
        raise
    finally:
        try:
            if tcm is not None:
                tcm.close()
            if maps is not None:
                maps.close()
            loader.remove(BPFFS, instance)
            if cg.exists():
                cg.rmdir()
        finally:
            topo.down()
    # Ratios are medians of per-round ratios: the paths of one round ran back to back, so
    # the load of a shared machine mostly cancels out (medians of independent runs swing
    # by +-30% here; paired ratios by a few %).
    def paired(p: str, q: str, k: str) -> float:
        return round(statistics.median(a[k] / b[k] for a, b in
                                       zip(med[p]["runs"], med[q]["runs"])), 3)
    ratios = {p: {"gbps_x": paired(p, "plain", "gbps"),
                  "flows_x": paired(p, "plain", "flows_per_sec"),
                  "connect_x": paired(p, "plain", "connect_p50_us")} for p in med}
    return {"meshd_sync_s": round(sync_s, 2), "iptables_load_s": round(ipt_s, 2),
            "paths": med, "ratios": ratios, "tc_counters_total": tc_counters,
            "tc_vs_iptables": {"gbps_x": paired("tc", "iptables", "gbps"),
                               "flows_x": paired("tc", "iptables", "flows_per_sec")}}


def bench_semantics(n: int, args) -> dict:
    """tc new-flow rate and throughput with affinity on vs off and eTP Local vs Cluster."""
    import ctypes

    import numpy as np

    from meshd.dataplane import structs as S
    topo = Topo()
    instance = "bench-" + topo.p
    cg = CGROUP2 / instance
    maps = None
    try:
        topo.up(args.client_ports)
        cg.mkdir()
        maps = loader.load(BPFFS, instance, cg, M, metrics=False)
        node_ports = NodePorts(addresses=(ipaddress.ip_address(NODE_A),))
        rep = Reconciler(KernelDataplane(maps)).apply(desired_groups(services(n), node_ports))
        assert not rep.errors, rep.errors
        tc.attach_interfaces(BPFFS, instance, [f"{topo.p}-ac"], netns=topo.ns("na"))
        vkey = S.svc_key(ipaddress.ip_address(vip(n - 1)), 80, "TCP")
        gid = maps.svc.lookup(vkey).id
        bid = next(k.value for k, _v in maps.backends.items())
        maps.affcfg.update(ctypes.c_uint32(gid), ctypes.c_uint32(10800))  # direct writes
        maps.members.update(S.MemberKey(group=gid, backend=bid), ctypes.c_uint32(1))
        local_gid = 60001
        KernelDataplane(maps).put_table(local_gid, np.full(M, bid, dtype=np.uint32))

        def affinity(on: bool) -> None:
            local(False)
            v = maps.svc.lookup(vkey)
            v.flags = S.SVC_F_AFFINITY if on else 0
            maps.svc.update(vkey, v)

        def local(on: bool) -> None:
            if on:
                affinity_off()
                maps.svc_ext.update(vkey, S.SvcVal(id=local_gid, count=1, flags=(
                    S.SVC_F_EXTERNAL | S.SVC_F_KEEP_SOURCE)))
            else:
                maps.svc_ext.delete(vkey)

        def affinity_off() -> None:
            v = maps.svc.lookup(vkey)
            v.flags = 0
            maps.svc.update(vkey, v)
        med = run_rounds(topo, {"tc": (vip(n - 1), 80, lambda: affinity(False)),
                                "tc-aff": (vip(n - 1), 80, lambda: affinity(True)),
                                "tc-local": (vip(n - 1), 80, lambda: local(True))}, args)
    finally:
        counters = {}
        if maps is not None:
            try:
                tcm = tc.open_maps(BPFFS, instance)
                try:
                    counters = tcm.counters()
                finally:
                    tcm.close()
                print(f"  tc counters: {counters}", file=sys.stderr)
            except Exception:  # noqa: BLE001 -- reporting only
                pass
        try:
            if maps is not None:
                maps.close()
            tc.detach_all(BPFFS, instance)
            loader.remove(BPFFS, instance)
            if cg.exists():
                cg.rmdir()
        finally:
            topo.down()

    def paired(p: str, q: str, k: str) -> float:
        return round(statistics.median(a[k] / b[k] for a, b in
                                       zip(med[p]["runs"], med[q]["runs"])), 3)
    return {"paths": med, "tc_counters_total": counters,
            "affinity_on_vs_off": {"flows_x": paired("tc-aff", "tc", "flows_per_sec"),
                                   "gbps_x": paired("tc-aff", "tc", "gbps")},
            "local_vs_cluster": {"flows_x": paired("tc-local", "tc", "flows_per_sec"),
                                 "gbps_x": paired("tc-local", "tc", "gbps")}}


def print_semantics(n: int, r: dict) -> None:
    print(f"\n{n} services, tc routed mode (medians; x: median of per-round paired ratios)")
    for p, m in r["paths"].items():
        print(f"  {p:<11} {m['gbps']:>8.2f} Gbit/s {m['flows_per_sec']:>9.0f} flows/s "
              f"{m['connect_p50_us']:>6.0f}us connect p50")
    a, lc = r["affinity_on_vs_off"], r["local_vs_cluster"]
    print(f"  affinity on / off:   new flows {a['flows_x']:.3f}x, throughput {a['gbps_x']:.3f}x")
    print(f"  eTP Local / Cluster: new flows {lc['flows_x']:.3f}x, throughput {lc['gbps_x']:.3f}x")
    c = r["tc_counters_total"]
    print(f"  tc counters: aff_follow {c['aff_follow']}, errors {c['errors']}, "
          f"no_backend {c['no_backend']}, dnat {c['dnat']}")


def print_size(n: int, r: dict) -> None:
    print(f"\n{n} services (meshd sync {r['meshd_sync_s']} s, iptables-restore "
          f"{r['iptables_load_s']} s)")
    print(f"  {'path':<10} {'Gbit/s':>8} {'x plain':>8} {'flows/s':>9} {'x plain':>8} "
          f"{'connect p50':>12} {'x plain':>8}   (medians; x: median of per-round ratios)")
    for p, m in r["paths"].items():
        x = r["ratios"][p]
        print(f"  {p:<10} {m['gbps']:>8.2f} {x['gbps_x']:>8.3f} {m['flows_per_sec']:>9.0f} "
              f"{x['flows_x']:>8.3f} {m['connect_p50_us']:>10.0f}us {x['connect_x']:>8.3f}")
    t = r["tc_vs_iptables"]
    print(f"  tc / iptables: throughput {t['gbps_x']:.3f}x, new flows {t['flows_x']:.3f}x")
    for p, m in r["paths"].items():
        if "counters" in m:
            nz = {k: v for k, v in m["counters"].items() if v}
            print(f"  tc counters, {p} (sum over its runs): {nz}")
    c = r["tc_counters_total"]
    print(f"  tc counters at the end: snat_fail {c['snat_fail']}, errors {c['errors']}, "
          f"no_backend {c['no_backend']}; all: {c}")


def object_sha256() -> str:
    """The tc object every attach loads afresh: a rebuild during a run mixes versions."""
    return hashlib.sha256(loader.object_path(names.OBJ_TC_LB).read_bytes()).hexdigest()[:16]


def port_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        r = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port range LO-HI: {text!r}") from None
    if not 1 <= r[0] <= r[1] <= 65535:
        raise argparse.ArgumentTypeError(f"not a port range within 1-65535: {text!r}")
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", default="1,10000")
    ap.add_argument("--seconds", type=float, default=1.0, help="per measurement (bounded)")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds per path")
    ap.add_argument("--snat-ports", type=port_range, default=TcConfig().snat_ports,
                    help="SNAT source ports LO-HI (default: meshd's tc.snat_ports)")
    ap.add_argument("--client-ports", type=port_range, default=None,
                    help="the client's ephemeral ports LO-HI (default: the kernel's)")
    ap.add_argument("--semantics", action="store_true",
                    help="affinity on/off and eTP Local/Cluster instead (see above)")
    ap.add_argument("--out", default=None,
                    help="default bench/results/tc.json (--semantics: tc_semantics.json)")
    args = ap.parse_args()
    if args.out is None:
        args.out = str(ROOT / "bench" / "results" /
                       ("tc_semantics.json" if args.semantics else "tc.json"))
    if os.geteuid() != 0:
        print("needs root (namespaces, BPF)", file=sys.stderr)
        return 2
    results = {"machine": sh("uname", "-r").strip(), "cpus": len(os.sched_getaffinity(0)),
               "seconds": args.seconds, "rounds": args.rounds, "maglev_m": M,
               "snat_ports": list(args.snat_ports), "client_ports": list(args.client_ports) if args.client_ports else None,
               "git_head": sh("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD").strip(),
               "tc_object_sha256": object_sha256(), "sizes": {}}
    for n in [int(x) for x in args.services.split(",")]:
        if args.semantics:
            results["sizes"][n] = bench_semantics(n, args)
            print_semantics(n, results["sizes"][n])
        else:
            results["sizes"][n] = bench_size(n, args)
            print_size(n, results["sizes"][n])
    if object_sha256() != results["tc_object_sha256"]:
        results["tc_object_sha256_at_end"] = object_sha256()
        print(f"WARNING: {names.OBJ_TC_LB} was rebuilt during the run: the results mix "
              "program versions", file=sys.stderr)
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
