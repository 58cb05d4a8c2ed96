#!/usr/bin/env python3
"""A cold sync's Reconciler.apply against the real kernel maps, stage by stage (no etcd).

  sudo .venv/bin/python bench/reconciler_cold.py [--services 10000] [--endpoints 10] [--profile]

The records of bench/etcd_sync_bench.py are validated into a RegistryState and a
DesiredState as `meshd run` does, then one Reconciler.apply writes them into the maps of a
fresh instance (own cgroup, own pin dir; the shipped Maglev config: table sizes auto, so
1021 slots for 10 equal backends). Printed: the apply's total and its timed stages (build,
table writes), the rest (backends, names, frontends), RSS before and after the apply, what
it kept once the heap is settled (gc, malloc_trim: the daemon does that before READY), and
peak RSS of the process.
--profile: cProfile of the apply, top 25 by cumulative time. Everything made is removed,
also on failure.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import secrets
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BPFFS = Path("/sys/fs/bpf")
CGROUP2 = Path("/sys/fs/cgroup/unified")


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    import control_memory as cm
    from meshd.dataplane import loader
    from meshd.dataplane.kernel import KernelDataplane
    from meshd.desired import DesiredState, NodeInfo
    from meshd.reconciler import Reconciler
    from meshd.sources.etcd_records import RegistryState

    gc.disable()  # as the daemon's first sync
    reg = RegistryState("/meshd/")
    reg.replace(cm.records(args.services, args.endpoints))
    snap = reg.snapshot(1)
    groups, bad = DesiredState().update(snap.services, [ipaddress.ip_network("10.96.0.0/12")],
                                        frozenset(), node=NodeInfo("bench"))
    assert not bad and len(groups) == args.services, bad[:3]
    del reg, snap
    gc.collect()
    inst = "bench" + secrets.token_hex(4)
    cg = CGROUP2 / inst
    cg.mkdir()
    maps = None
    try:
        maps = loader.load(BPFFS, inst, cg)
        rec = Reconciler(KernelDataplane(maps))
        cm.settle()
        rss0 = status_mb("VmRSS")
        prof = None
        if args.profile:
            import cProfile
            prof = cProfile.Profile()
            prof.enable()
        t0 = time.perf_counter()
        rep = rec.apply(groups, None)
        total = time.perf_counter() - t0
        if prof is not None:
            prof.disable()
        assert not rep.errors, list(rep.errors.items())[:3]
        rss1 = status_mb("VmRSS")
        del rep.removed
        cm.settle()  # gc.collect and malloc_trim, as the daemon before READY
        kept = status_mb("VmRSS") - rss0
        stages = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in rep.timings.items())
        rest = total - sum(rep.timings.values())
        print(f"{args.services} services x {args.endpoints} endpoints: apply {total:.2f} s "
              f"({stages}, the rest {rest * 1e3:.0f} ms); {sum(rep.ops.values())} map ops; "
              f"RSS {rss0:.0f} -> {rss1:.0f} MB, settled +{kept:.1f} MB "
              f"(peak {status_mb('VmHWM'):.0f})")
        if prof is not None:
            import pstats
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    finally:
        if maps is not None:
            maps.close()
        loader.remove(BPFFS, inst)
        cg.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
