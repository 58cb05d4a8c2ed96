#!/usr/bin/env python3
"""Socket-LB benchmark: meshd's VIP path vs. the direct path vs. kube-proxy-shaped iptables
DNAT, in one lab, in one run, as ratios. Bounded: each measurement runs at most
--seconds and at most --max connections; rounds are interleaved so drift hits every path.

  sudo .venv/bin/python bench/socklb_bench.py [--services 1,1000,10000] [--seconds 2]

Paths, all from a client in the lab's client namespace to backend b1 (one backend, so every
path ends at the same server):
  direct      connect to b1's address, client outside the meshd cgroup (no BPF runs)
  direct+cg   the same from inside the cgroup: what meshd costs non-service traffic
  meshd VIP   connect to a VIP that meshd translates in connect() (inside the cgroup)
  iptables    connect to a VIP that kube-proxy-shaped iptables-legacy nat rules DNAT
              (KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP), with N services installed; the
              measured VIP is the LAST rule of KUBE-SERVICES (kube-proxy's linear worst case)
  direct+ipt  direct, while those iptables rules are installed (every new connection in the
              namespace walks the nat chain, service or not)
A fresh lab per size; meshd paths are measured before any iptables rule exists there.
meshd runs on the shipped settings: Maglev tables sized per group, metrics on, events on
(drained as the daemon does). The connect-only breakdown is bench/connect_breakdown.py.
Metrics: new connections per second (connect + 1 request/reply + close, sequential),
connect() p50/p99 in microseconds, and request/response p50/p99 on one open connection.
Writes bench/results/socklb.json and prints a table.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshd.dataplane import events as kev  # noqa: E402
from meshd.dataplane import loader  # noqa: E402
from meshd.dataplane.kernel import KernelDataplane  # noqa: E402
from meshd.desired import desired_groups  # noqa: E402
from meshd.model import parse_service  # noqa: E402
from meshd.reconciler import Reconciler  # noqa: E402
from netns_lab import Lab  # noqa: E402
from benchlib import Drain, start_servers_apart, write_results  # noqa: E402

BPFFS = Path("/sys/fs/bpf")
M = 0  # the shipped default: each group's table sized for its backends (auto)


def vip(i: int) -> str:
    return str(ipaddress.ip_address("10.96.0.0") + 10 + i)


def ipt_vip(i: int) -> str:
    return str(ipaddress.ip_address("10.100.0.0") + 10 + i)


def services(lab: Lab, n: int) -> list:
    out = []
    for i in range(n):
        out.append(parse_service({
            "namespace": "bench", "name": f"s{i}", "vips": [vip(i)],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            "endpoints": [{"address": lab.backend_addr(1), "ports": {"http": 8080}}]},
            where=f"s{i}"))
    return out


def iptables_rules(lab: Lab, n: int) -> str:
    """The nat-table shape kube-proxy (iptables mode) writes for n ClusterIP services."""
    lines = ["*nat", ":KUBE-SERVICES - [0:0]", ":KUBE-MARK-MASQ - [0:0]",
             "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
             "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"]
    for i in range(n):
        svc, sep = f"KUBE-SVC-{i:012X}", f"KUBE-SEP-{i:012X}"
        lines += [f":{svc} - [0:0]", f":{sep} - [0:0]"]
    for i in range(n):
        svc, sep = f"KUBE-SVC-{i:012X}", f"KUBE-SEP-{i:012X}"
        lines += [
            f"-A KUBE-SERVICES -d {ipt_vip(i)}/32 -p tcp -m comment --comment "
            f"\"bench/s{i}:http cluster IP\" -m tcp --dport 80 -j {svc}",
            f"-A {svc} -m comment --comment \"bench/s{i}:http\" -j {sep}",
            f"-A {sep} -s {lab.backend_addr(1)}/32 -j KUBE-MARK-MASQ",
            f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {lab.backend_addr(1)}:8080"]
    lines.append("COMMIT\n")
    return "\n".join(lines)


def measure(lab: Lab, addr: str, port: int, cgroup: bool, seconds: float, max_n: int) -> dict:
    cr = lab.agent("connrate", cgroup=cgroup, addr=addr, port=port, duration=seconds,
                   max=max_n, timeout=2)
    rr = lab.agent("rr", cgroup=cgroup, addr=addr, port=port, duration=seconds / 2,
                   max=max_n, timeout=2)
    if cr["errors"] or rr["errors"]:
        raise RuntimeError(f"errors on {addr}:{port}: {cr['errors']} {rr['errors']}")
    return {"per_sec": cr["per_sec"], "connect_p50": cr["connect_us"][0],
            "connect_p99": cr["connect_us"][1], "rr_p50": rr["rtt_us"][0],
            "rr_p99": rr["rtt_us"][1]}


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", default="1,1000,10000")
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement (bounded)")
    ap.add_argument("--max", type=int, default=20000, help="connections per measurement, max")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per path")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "socklb.json"))
    args = ap.parse_args()
    sizes = [int(x) for x in args.services.split(",")]

    results = {"machine": subprocess.run(["uname", "-r"], capture_output=True,
                                         text=True).stdout.strip(),
               "seconds": args.seconds, "rounds": args.rounds, "maglev_m": M, "sizes": {}}
    for n in sizes:
        results["sizes"][n] = bench_size(n, args)
        print_size(n, results["sizes"][n])
    write_results(args.out, results)
    return 0


def bench_size(n: int, args) -> dict:
    """One fresh lab per size, so no nat table or conntrack state of a previous size lingers.
    Phase 1, no iptables rules: direct, direct+cg, meshd. Phase 2, n kube-proxy-shaped
    services in iptables: the iptables VIP, and direct again (every new connection in the
    namespace walks the nat chain, service or not)."""
    cpus = sorted(os.sched_getaffinity(0))
    with Lab(backends=1, ipv6=False) as lab:
        start_servers_apart(lab)  # servers on one CPU, clients on another
        # iptables DNATs after the route lookup, so its VIP range needs a route (kube-proxy
        # nodes have a default route). It points at b1, inside the lab: nothing leaves.
        lab.exec("cli", ["ip", "route", "add", "10.100.0.0/16", "via", lab.backend_addr(1)])
        instance = "bench-" + lab.prefix
        maps = loader.load(BPFFS, instance, lab.cgroup, M)  # metrics on, as shipped
        # events on as shipped (every type, sample 1, 5,000/s/CPU), drained as the daemon does
        kev.write_evcfg(BPFFS, instance, kev.ALL, 1, 5000)
        drain = Drain(BPFFS, instance, set(cpus))
        try:
            rec = Reconciler(KernelDataplane(maps))
            t0 = time.perf_counter()
            rep = rec.apply(desired_groups(services(lab, n)))
            load_s = time.perf_counter() - t0
            assert not rep.errors, rep.errors
            phase1 = {"direct": (lab.backend_addr(1), 8080, False),
                      "direct+cg": (lab.backend_addr(1), 8080, True),
                      "meshd": (vip(n - 1), 80, True)}
            med = run_rounds(lab, phase1, args)
            t0 = time.perf_counter()
            lab.exec("cli", ["iptables-legacy-restore"], timeout=300,
                     input=iptables_rules(lab, n))
            ipt_s = time.perf_counter() - t0
            phase2 = {"iptables": (ipt_vip(n - 1), 80, False),
                      "direct+ipt": (lab.backend_addr(1), 8080, False)}
            med.update(run_rounds(lab, phase2, args))
        finally:
            drain.close()
            maps.close()
            loader.remove(BPFFS, instance)
            os.sched_setaffinity(0, set(cpus))
    base = med["direct"]
    ratios = {p: {"conn_rate_x": round(m["per_sec"] / base["per_sec"], 3),
                  "connect_p50_x": round(m["connect_p50"] / base["connect_p50"], 3)}
              for p, m in med.items()}
    return {"meshd_load_s": round(load_s, 2), "iptables_load_s": round(ipt_s, 2),
            "paths": med, "ratios": ratios}


def run_rounds(lab: Lab, paths: dict, args) -> dict:
    runs: dict[str, list] = {p: [] for p in paths}
    for _ in range(args.rounds):  # interleaved, so drift hits every path alike
        for p, (addr, port, cg) in paths.items():
            runs[p].append(measure(lab, addr, port, cg, args.seconds, args.max))
    return {p: median_of(r) for p, r in runs.items()}


def print_size(n: int, r: dict) -> None:
    print(f"\n{n} services installed (meshd sync {r['meshd_load_s']} s, "
          f"iptables-restore {r['iptables_load_s']} s)")
    print(f"  {'path':<10} {'conn/s':>8} {'x direct':>8} {'connect p50':>12} {'p99':>7} "
          f"{'x direct':>8} {'req/resp p50':>13} {'p99':>7}")
    for p, m in r["paths"].items():
        x = r["ratios"][p]
        print(f"  {p:<10} {m['per_sec']:>8.0f} {x['conn_rate_x']:>8.3f} "
              f"{m['connect_p50']:>10.0f}us {m['connect_p99']:>5.0f}us {x['connect_p50_x']:>8.3f} "
              f"{m['rr_p50']:>11.0f}us {m['rr_p99']:>5.0f}us")


if __name__ == "__main__":
    sys.exit(main())
