#!/usr/bin/env python3
"""Socket-path cost of kube-proxy semantics: new-connection rate through meshd's connect()
with session affinity on vs off, and internal_traffic_policy Local vs Cluster, in one lab,
in one run, as ratios. Bounded: each measurement runs at most --seconds and at most --max
connections; rounds are interleaved so drift hits every path alike.

  sudo .venv/bin/python bench/semantics_bench.py [--seconds 2] [--rounds 5]

Services, all with the one backend b1 (so every path ends at the same server; b1 is on
this node, so Local selects it too), each on its own VIP, installed together:
  cluster    internal_traffic_policy Cluster, no affinity (the baseline)
  affinity   session_affinity ClientIP (3 hash lookups + an LRU store per connect)
  local      internal_traffic_policy Local (a different selection, same per-connect work)
Metric: new connections per second (connect + 1 request/reply + close, sequential), from
the lab's client namespace inside the meshd cgroup. Writes bench/results/semantics.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshd.dataplane import loader  # noqa: E402
from meshd.dataplane.kernel import KernelDataplane  # noqa: E402
from meshd.desired import NodeInfo, desired_groups  # noqa: E402
from meshd.model import parse_service  # noqa: E402
from meshd.reconciler import Reconciler  # noqa: E402
from netns_lab import Lab  # noqa: E402
from benchlib import start_servers_apart, write_results  # noqa: E402

BPFFS = Path("/sys/fs/bpf")
M = 1021
NODE = NodeInfo("node-1")
PATHS = {  # name -> (VIP, service fields)
    "cluster": ("10.96.0.10", {}),
    "affinity": ("10.96.0.11", {"session_affinity": "ClientIP"}),
    "local": ("10.96.0.12", {"internal_traffic_policy": "Local"}),
}


def services(lab: Lab) -> list:
    return [parse_service({
        "namespace": "bench", "name": name, "vips": [vip],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        "endpoints": [{"address": lab.backend_addr(1), "ports": {"http": 8080},
                       "node": "node-1"}], **fields}, where=name)
        for name, (vip, fields) in PATHS.items()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement (bounded)")
    ap.add_argument("--max", type=int, default=20000, help="connections per measurement, max")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per path")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "semantics.json"))
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    runs: dict[str, list[float]] = {p: [] for p in PATHS}
    p50s: dict[str, list[float]] = {p: [] for p in PATHS}  # connect() p50, us
    with Lab(backends=1, ipv6=False) as lab:
        start_servers_apart(lab)  # servers on one CPU, clients on another
        instance = "bench-" + lab.prefix
        maps = loader.load(BPFFS, instance, lab.cgroup, M)
        try:
            rep = Reconciler(KernelDataplane(maps)).apply(
                desired_groups(services(lab), node=NODE))
            assert not rep.errors, rep.errors
            for _ in range(args.rounds):
                for p, (vip, _f) in PATHS.items():
                    r = lab.agent("connrate", cgroup=True, addr=vip, port=80,
                                  duration=args.seconds, max=args.max, timeout=2)
                    if r["errors"] or r["by_backend"].keys() != {"b1"}:
                        raise RuntimeError(f"{p}: {r['errors']} {r['by_backend']}")
                    runs[p].append(r["per_sec"])
                    p50s[p].append(r["connect_us"][0])
            affinity_entries = len(list(maps.affinity.keys()))
        finally:
            maps.close()
            loader.remove(BPFFS, instance)
            os.sched_setaffinity(0, set(cpus))
    med = {p: statistics.median(v) for p, v in runs.items()}
    p50 = {p: statistics.median(v) for p, v in p50s.items()}
    result = {"machine": subprocess.run(["uname", "-r"], capture_output=True,
                                        text=True).stdout.strip(),
              "seconds": args.seconds, "rounds": args.rounds, "conn_per_sec": med,
              "runs": runs, "connect_p50_us": p50, "affinity_entries": affinity_entries,
              "affinity_vs_off_x": round(med["affinity"] / med["cluster"], 3),
              "local_vs_cluster_x": round(med["local"] / med["cluster"], 3)}
    print(f"{'path':<10} {'conn/s (median)':>16} {'x cluster':>10} {'connect p50':>12}")
    for p, v in med.items():
        print(f"{p:<10} {v:>16.0f} {v / med['cluster']:>10.3f} {p50[p]:>10.0f}us")
    print(f"affinity on vs off: {result['affinity_vs_off_x']}x; "
          f"internal_traffic_policy Local vs Cluster: {result['local_vs_cluster_x']}x "
          f"(target >= 0.97x); affinity entries: {affinity_entries}")
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
