#!/usr/bin/env python3
"""Authorization and connection-event overhead: meshd's VIP path with 0, 1 and 1,000
policies and with events on/off, in one lab, in one run, rounds interleaved (the order of
the modes rotates every round) so drift hits every mode alike. Bounded: each measurement
runs at most --seconds and at most --max connections.

  sudo .venv/bin/python bench/policy_bench.py [--rounds 6] [--seconds 2]

Modes (one service, one backend; the client in the lab cgroup, which the policies allow):
  base          no policy selects the service, events off (`events.types: []`)
  events        no policy, events on as shipped (every type, sample 1, rate 5000/s/CPU),
                a reader draining the ring buffer the way the daemon does
  policy-1      one allow policy selects the service: the hook looks up the caller's
                identity and one verdict (events off)
  policy-1000   1,000 policies: 1,000 identities (1,000 cgroup entries) with verdicts on the
                service, the client's among them (events off)
  policy-1000+events   both, as a node with many policies runs on the shipped defaults
Figures: new connections per second (connect + 1 request/reply + close, sequential, one
client) and connect() p50. Ratios are mode/base, the median over rounds of the two measured
in the same round (target >= 0.97 conn/s). Writes bench/results/policy.json.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from meshd.desired import G_POLICY, desired_groups  # noqa: E402
from meshd.reconciler import Reconciler  # noqa: E402
from meshd.verdicts import UID_ANY  # noqa: E402
from netns_lab import Lab  # noqa: E402
from benchlib import (Drain, connrate, rotated, start_servers_apart, web_service,  # noqa: E402
                      write_results)

BPFFS = Path("/sys/fs/bpf")
VIP = "10.96.0.10"
MODES = ("base", "events", "policy-1", "policy-1000", "policy-1000+events")
ALLOW = 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement (bounded)")
    ap.add_argument("--max", type=int, default=20000, help="connections per measurement, max")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "policy.json"))
    args = ap.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    drained = 0
    with Lab(backends=1, ipv6=False) as lab:
        start_servers_apart(lab)  # servers on one CPU, clients on another
        instance = "bench-" + lab.prefix
        maps = loader.load(BPFFS, instance, lab.cgroup, 0, metrics=True)
        drain = Drain(BPFFS, instance, set(cpus))
        try:
            rec = Reconciler(KernelDataplane(maps))
            svc = web_service(lab, VIP)
            plain = desired_groups([svc])
            me = loader.cgroup_id(lab.cgroup)

            def policies(n: int) -> tuple[dict, dict]:
                """n identities with an allow verdict each; the client's cgroup is one."""
                idents = {me: 1} | {(1 << 40) + i: i + 1 for i in range(1, n)}
                verdicts = frozenset(((i, UID_ANY), (ALLOW, 0, i)) for i in range(1, n + 1))
                groups = {k: dataclasses.replace(g, flags=g.flags | G_POLICY, verdicts=verdicts)
                          for k, g in plain.items()}
                return groups, idents

            def set_mode(mode: str) -> None:
                n = 1000 if "1000" in mode else 1 if "policy-1" in mode else 0
                groups, idents = policies(n) if n else (plain, {})
                rec.verdicts.want_idents = idents
                rep = rec.apply(groups)
                assert not rep.errors, rep.errors
                mask = kev.ALL if "events" in mode else 0
                kev.write_evcfg(BPFFS, instance, mask, 1, 5000)

            set_mode("base")
            connrate(lab, VIP, 0.5, 2000)  # warm-up, not recorded
            for r, order in rotated(MODES, args.rounds):
                for mode in order:
                    set_mode(mode)
                    m = connrate(lab, VIP, args.seconds, args.max)
                    runs[mode].append(m)
                    print(f"round {r + 1} {mode:<19} {m['per_sec']:>8.0f} conn/s  connect p50 "
                          f"{m['connect_p50']:>4} us", flush=True)
            st = kev.read_evstate(BPFFS, instance)
        finally:
            drain.close()
            drained = drain.n
            maps.close()
            loader.remove(BPFFS, instance)
            os.sched_setaffinity(0, set(cpus))

    med = {m: {k: statistics.median(x[k] for x in rs) for k in ("per_sec", "connect_p50")}
           for m, rs in runs.items()}

    def paired(mode: str, k: str) -> float:
        return round(statistics.median(a[k] / b[k] for a, b in zip(runs[mode], runs["base"])), 3)

    ratios = {m: {"conn_rate": paired(m, "per_sec"), "connect_p50": paired(m, "connect_p50")}
              for m in MODES if m != "base"}
    result = {"machine": subprocess.run(["uname", "-r"], capture_output=True,
                                        text=True).stdout.strip(),
              "cpus": len(cpus), "rounds": args.rounds, "seconds": args.seconds,
              "median": med, "ratios": ratios, "runs": runs, "events_read": drained,
              "events_lost": st}
    print(f"\nmedian of {args.rounds} interleaved rounds; ratio = mode / base in the same round")
    print(f"  {'mode':<19} {'conn/s':>8} {'connect p50':>12} {'conn/s ratio':>13} "
          f"{'p50 ratio':>10}")
    for m in MODES:
        r = ratios.get(m, {"conn_rate": 1.0, "connect_p50": 1.0})
        print(f"  {m:<19} {med[m]['per_sec']:>8.0f} {med[m]['connect_p50']:>10.0f}us "
              f"{r['conn_rate']:>13.3f} {r['connect_p50']:>10.3f}")
    print(f"  events read by the drain: {drained}; lost: ring full {st['lost_full']}, "
          f"rate limit {st['lost_rate']}")
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
