#!/usr/bin/env python3
"""What a VIP connect() costs on top of a direct one, and where it goes. A connect-only
client (new socket, connect(), close; nothing sent) against an accept-and-close server in a
lab namespace, at 1 and 10,000 services, on meshd's shipped settings and with parts of them
off. Bounded: each measurement runs at most --seconds and at most --max connections.

  sudo .venv/bin/python bench/connect_breakdown.py [--services 1,1000,10000] [--rounds 7]

Each measurement is one client in meshd's cgroup whose cycles alternate between the VIP and
the backend's own address (direct), so drift (CPU frequency, neighbours) hits both alike:
the ratio is VIP p50 / direct p50 of the same run, and the figure is its median over rounds.
The direct connects run the same hooks and find no service (what meshd costs non-service
traffic is the "outside" line: a client outside the cgroup, no BPF at all, alternating the
same way with an in-cgroup run is not possible, so it is its own interleaved measurement).

Modes (one backend; the VIP's service is the last of N installed), rounds interleaved in a
rotating order:
  bare        metrics off, events off: the translation alone
  metrics     metrics on (socket tag, sockops: connect latency, outcome, bytes; UDP
              datagram counters), events off
  shipped     metrics on and events on as shipped (every type, sample 1, 5,000/s/CPU), a
              reader draining the ring as the daemon does
Target: shipped VIP connect p50 <= 1.03x direct.

Then, per mode, one more pass with kernel.bpf_stats_enabled=1 (not timed: the stats add two
clock reads per program run): nanoseconds each meshd program spends per connection and how
often it runs. Writes bench/results/connect_breakdown.json.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import subprocess
import sys
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
from benchlib import Drain, rotated, start_servers_apart, write_results  # noqa: E402

BPFFS = Path("/sys/fs/bpf")
MODES = ("bare", "metrics", "shipped")
SINK = 8081  # the backend accepts and closes here
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


def vip(i: int) -> str:
    return str(ipaddress.ip_address("10.96.0.0") + 10 + i)


def services(lab: Lab, n: int) -> list:
    return [parse_service({
        "namespace": "bench", "name": f"s{i}", "vips": [vip(i)],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        "endpoints": [{"address": lab.backend_addr(1), "ports": {"http": SINK}}]},
        where=f"s{i}") for i in range(n)]


def paired(lab: Lab, n: int, seconds: float, max_n: int) -> dict:
    """One in-cgroup client alternating VIP and direct connects."""
    r = lab.agent("connect", cgroup=True, addr=vip(n - 1), port=80,
                  also=[f"{lab.backend_addr(1)},{SINK}"], duration=seconds, max=max_n,
                  timeout=2)
    if r["errors"]:
        raise RuntimeError(f"errors: {r['errors']}")
    v, d = r["targets"]
    return {"per_sec": r["per_sec"], "vip_p50": v["p50_us"], "direct_p50": d["p50_us"],
            "vip_p99": v["connect_us"][1], "direct_p99": d["connect_us"][1],
            "ratio": round(v["p50_us"] / d["p50_us"], 4)}


def outside(lab: Lab, seconds: float, max_n: int) -> dict:
    r = lab.agent("connect", addr=lab.backend_addr(1), port=SINK, duration=seconds,
                  max=max_n, timeout=2)
    if r["errors"]:
        raise RuntimeError(f"errors: {r['errors']}")
    return {"per_sec": r["per_sec"], "p50": r["p50_us"]}


def bpftool(*args: str) -> object:
    return json.loads(subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True,
                                     text=True).stdout)


def program_costs(lab: Lab, n: int, seconds: float, max_n: int) -> dict:
    """ns per VIP connection and runs per VIP connection of each program attached to the
    lab cgroup, over one VIP-only pass with kernel.bpf_stats_enabled=1."""
    ids = {p["id"]: f"{p['name']} ({p['attach_type']})"
           for p in bpftool("cgroup", "show", str(lab.cgroup))}

    def snap() -> dict[int, tuple[int, int]]:
        out = {}
        for pid in ids:
            info = bpftool("prog", "show", "id", str(pid))
            out[pid] = (int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0)))
        return out

    old = STATS_SYSCTL.read_text().strip()
    STATS_SYSCTL.write_text("1")
    try:
        before = snap()
        r = lab.agent("connect", cgroup=True, addr=vip(n - 1), port=80, duration=seconds,
                      max=max_n, timeout=2)
        after = snap()
    finally:
        STATS_SYSCTL.write_text(old)
    conns = max(r["count"], 1)
    out = {}
    for pid, name in ids.items():
        dt, dc = after[pid][0] - before[pid][0], after[pid][1] - before[pid][1]
        if dc:
            out[name] = {"ns_per_conn": round(dt / conns), "runs_per_conn": round(dc / conns, 2),
                         "ns_per_run": round(dt / dc)}
    return out


def bench_size(n: int, args, cpus: list[int]) -> dict:
    modes = tuple(m for m in MODES if m in args.modes.split(","))
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    runs["outside"] = []
    costs: dict[str, dict] = {}
    with Lab(backends=1, ipv6=False) as lab:
        start_servers_apart(lab, sink_port=SINK)  # servers on one CPU, clients on another
        instance = "bench-" + lab.prefix
        maps = loader.load(BPFFS, instance, lab.cgroup, 0, metrics=True)  # shipped: auto M
        drain = Drain(BPFFS, instance, set(cpus))
        metrics_on = True
        try:
            rep = Reconciler(KernelDataplane(maps)).apply(desired_groups(services(lab, n)))
            assert not rep.errors, rep.errors

            def set_mode(mode: str) -> None:
                nonlocal metrics_on
                if (mode != "bare") != metrics_on:
                    loader.set_metrics(BPFFS, instance, lab.cgroup, mode != "bare")
                    metrics_on = mode != "bare"
                kev.write_evcfg(BPFFS, instance, kev.ALL if mode == "shipped" else 0, 1, 5000)

            set_mode("shipped")
            paired(lab, n, 0.5, 2000)  # warm-up, not recorded
            for r, order in rotated(modes, args.rounds):
                for mode in order:
                    set_mode(mode)
                    m = paired(lab, n, args.seconds, args.max)
                    runs[mode].append(m)
                    print(f"{n} services, round {r + 1} {mode:<8} {m['per_sec']:>7.0f} conn/s"
                          f"  p50 VIP {m['vip_p50']:>5.1f} us, direct {m['direct_p50']:>5.1f}"
                          f" us: {m['ratio']:.3f}", flush=True)
                runs["outside"].append(outside(lab, args.seconds / 2, args.max))
            for mode in () if args.no_stats else modes:
                set_mode(mode)
                costs[mode] = program_costs(lab, n, args.seconds, args.max)
        finally:
            drain.close()
            maps.close()
            loader.remove(BPFFS, instance)
            os.sched_setaffinity(0, set(cpus))

    med = {m: {k: statistics.median(x[k] for x in runs[m])
               for k in ("ratio", "vip_p50", "direct_p50", "vip_p99", "direct_p99", "per_sec")}
           for m in modes}
    return {"median": med, "outside_p50": statistics.median(x["p50"] for x in runs["outside"]),
            "programs": costs, "runs": runs, "events_read": drain.n}


def print_size(n: int, r: dict) -> None:
    print(f"\n{n} services: medians over rounds; ratio = VIP p50 / direct p50 of the same run "
          f"(direct from outside meshd's cgroup: p50 {r['outside_p50']:.1f} us)")
    print(f"  {'mode':<8} {'VIP p50':>8} {'direct p50':>11} {'VIP/direct':>11} "
          f"{'VIP p99':>8} {'direct p99':>11}")
    for m, v in r["median"].items():
        print(f"  {m:<8} {v['vip_p50']:>6.1f}us {v['direct_p50']:>9.1f}us {v['ratio']:>11.3f} "
              f"{v['vip_p99']:>6.0f}us {v['direct_p99']:>9.0f}us")
    if r["programs"]:
        print("  BPF time per VIP connection (kernel.bpf_stats_enabled pass):")
    for mode, progs in r["programs"].items():
        total = sum(p["ns_per_conn"] for p in progs.values())
        parts = ", ".join(f"{name.split(' ')[0]} {p['ns_per_conn']} ns/{p['runs_per_conn']}"
                          for name, p in sorted(progs.items(), key=lambda kv: -kv[1]["ns_per_conn"]))
        print(f"    {mode:<8} {total:>5} ns: {parts}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", default="1,1000,10000")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement (bounded)")
    ap.add_argument("--max", type=int, default=40000, help="connections per measurement, max")
    ap.add_argument("--modes", default=",".join(MODES), help="a subset of " + ", ".join(MODES))
    ap.add_argument("--no-stats", action="store_true", help="skip the bpf_stats pass")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "connect_breakdown.json"))
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    result = {"machine": subprocess.run(["uname", "-r"], capture_output=True,
                                        text=True).stdout.strip(),
              "cpus": len(cpus), "rounds": args.rounds, "seconds": args.seconds,
              "load_avg_start": os.getloadavg(), "sizes": {}}
    for n in (int(x) for x in args.services.split(",")):
        result["sizes"][n] = bench_size(n, args, cpus)
        print_size(n, result["sizes"][n])
    result["load_avg_end"] = os.getloadavg()
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
