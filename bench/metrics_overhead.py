#!/usr/bin/env python3
"""Metrics overhead: meshd's VIP path with the kernel metrics on vs off, in one lab, in one
run, rounds interleaved (on/off, then off/on, ...) so drift hits both alike. Bounded: each
measurement runs at most --seconds and at most --max connections.

  sudo .venv/bin/python bench/metrics_overhead.py [--rounds 6] [--seconds 2]

"on": loader.load(metrics=True): the connect hook tags each socket (socket storage) and the
sockops + cgroup-skb programs run; "off": loader.set_metrics(False) reloads the socket hooks
with the metrics code compiled out by the verifier (.rodata flag) and detaches the metrics
programs — the data path as it was before metrics existed. Switching is not measured.
Figures: new connections per second (connect + 1 request/reply + close, sequential, one
client), connect() p50, and request/response p50 on one open connection (where sockops'
per-ACK RTT callback runs). Writes bench/results/metrics_overhead.json and prints ratios
on/off, each the median over rounds of on/off measured back to back (1.0 = no cost; conn/s
ratio target >= 0.97).
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
from meshd.desired import desired_groups  # noqa: E402
from meshd.metrics import KernelSource  # noqa: E402
from meshd.reconciler import Reconciler  # noqa: E402
from netns_lab import Lab  # noqa: E402
from benchlib import connrate, start_servers_apart, web_service, write_results  # noqa: E402

BPFFS = Path("/sys/fs/bpf")
M = 1021
VIP = "10.96.0.10"


def measure(lab: Lab, seconds: float, max_n: int) -> dict:
    """The connect rate, and request/response p50 on one open connection."""
    out = connrate(lab, VIP, seconds, max_n)
    rr = lab.agent("rr", cgroup=True, addr=VIP, port=80, duration=seconds / 2, max=max_n,
                   timeout=2)
    if rr["errors"]:
        raise RuntimeError(f"errors: {rr['errors']}")
    return {**out, "rr_p50": rr["rtt_us"][0]}


def counted(source: KernelSource) -> int:
    """Connections the kernel counted as established, over every pair."""
    return sum(c.established for c in source.snapshot().stats.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds (each: on + off)")
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement (bounded)")
    ap.add_argument("--max", type=int, default=20000, help="connections per measurement, max")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "metrics_overhead.json"))
    args = ap.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    with Lab(backends=1, ipv6=False) as lab:
        start_servers_apart(lab)  # servers on one CPU, clients on another
        instance = "bench-" + lab.prefix
        maps = loader.load(BPFFS, instance, lab.cgroup, M, metrics=True)
        try:
            rec = Reconciler(KernelDataplane(maps))
            svc = web_service(lab, VIP)
            assert not rec.apply(desired_groups([svc])).errors
            source = KernelSource(BPFFS, instance)
            measure(lab, 0.5, 2000)  # warm-up (page cache, CPU frequency), not recorded
            made_on = 0
            for r in range(args.rounds):
                for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                    loader.set_metrics(BPFFS, instance, lab.cgroup, mode == "on")
                    before = counted(source)
                    m = measure(lab, args.seconds, args.max)
                    m["counted"] = counted(source) - before
                    if mode == "on":
                        made_on += m["count"]
                    runs[mode].append(m)
                    print(f"round {r + 1} {mode:<3} {m['per_sec']:>8.0f} conn/s  connect p50 "
                          f"{m['connect_p50']:>4} us  rr p50 {m['rr_p50']:>4} us  "
                          f"counted {m['counted']}", flush=True)
        finally:
            maps.close()
            loader.remove(BPFFS, instance)
            os.sched_setaffinity(0, set(cpus))

    med = {mode: {k: statistics.median(x[k] for x in rs) for k in ("per_sec", "connect_p50",
                                                                   "rr_p50")}
           for mode, rs in runs.items()}
    # Per round, on and off ran back to back: the median of those paired ratios cancels the
    # drift between rounds (this VM's rate moves by +-20% over a minute).
    def paired(k: str) -> float:
        return round(statistics.median(a[k] / b[k] for a, b in zip(runs["on"], runs["off"])), 3)

    ratios = {"conn_rate_on_off": paired("per_sec"), "connect_p50_on_off": paired("connect_p50"),
              "rr_p50_on_off": paired("rr_p50"),
              "conn_rate_on_off_of_medians": round(med["on"]["per_sec"] / med["off"]["per_sec"],
                                                   3)}
    # every "on" connection (plus the rr connection of each round) must have been counted
    on_counted = sum(m["counted"] for m in runs["on"])
    off_counted = sum(m["counted"] for m in runs["off"])
    result = {"machine": subprocess.run(["uname", "-r"], capture_output=True,
                                        text=True).stdout.strip(),
              "cpus": len(cpus), "rounds": args.rounds, "seconds": args.seconds,
              "median": med, "ratios": ratios, "runs": runs,
              "counted_on": on_counted, "made_on": made_on + len(runs["on"]),
              "counted_off": off_counted}
    print(f"\nmedian of {args.rounds} interleaved rounds")
    print(f"  {'metrics':<8} {'conn/s':>8} {'connect p50':>12} {'req/resp p50':>13}")
    for mode in ("off", "on"):
        m = med[mode]
        print(f"  {mode:<8} {m['per_sec']:>8.0f} {m['connect_p50']:>10.0f}us "
              f"{m['rr_p50']:>11.0f}us")
    print(f"  on/off   {ratios['conn_rate_on_off']:>8.3f} {ratios['connect_p50_on_off']:>12.3f} "
          f"{ratios['rr_p50_on_off']:>13.3f}   (median of per-round ratios)")
    print(f"  the kernel counted {on_counted} of {made_on + len(runs['on'])} connections made "
          f"with metrics on, {off_counted} with metrics off")
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
