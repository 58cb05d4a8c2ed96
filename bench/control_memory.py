#!/usr/bin/env python3
"""Control-plane memory and CPU by stage, without etcd or the kernel.

  .venv/bin/python bench/control_memory.py [--services 10000] [--endpoints 10] [--trace]

Builds what `meshd run` holds after its first sync from an etcd list of N services x E
endpoints (the same records as bench/etcd_sync_bench.py), one stage at a time, and prints
what each stage costs: RSS delta (/proc/self/status VmRSS, after a gc.collect and
malloc_trim), and with --trace the tracemalloc delta of live Python objects (slower).
Stages:
  records     the listed key/value bytes (as the etcd source holds them while listing)
  registry    RegistryState: records validated, indexed, composed into a snapshot
  (drop)      the listed bytes released
  desired     DesiredState: checks and frontend groups
  reconciler  Reconciler state after applying every group to a dataplane that keeps
              nothing (Maglev tables are built and dropped)
The kernel side (libbpf, maps) is not in these figures; the daemon's interpreter, libraries
and threads are (the `imports` line).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def settle() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def vip(i: int) -> str:
    return f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"


def backend(i: int, j: int) -> str:
    n = i * 16 + j
    return f"10.{200 + n // 65536}.{n // 256 % 256}.{n % 256}"


def records(n: int, e: int, prefix: str = "/meshd/") -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        out.append((f"{prefix}services/bench/s{i}".encode(), json.dumps({
            "namespace": "bench", "name": f"s{i}", "vips": [vip(i + 10)],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}).encode()))
        for j in range(e):
            out.append((f"{prefix}endpoints/bench/s{i}/ep{j}".encode(),
                        json.dumps({"address": backend(i, j), "ports": {"http": 8080}}).encode()))
    return out


class NullDataplane:
    """Accepts every write and keeps nothing (the reconciler's own state is what is measured)."""
    maglev_m = 1021

    def __getattr__(self, name):
        if name in ("put_tables", "delete_tables"):
            return lambda items: {}
        if name == "get_table":
            return lambda gid: None
        if name == "tc_conntrack":
            return lambda: False
        if name == "flow_backends":
            return lambda: None
        return lambda *a, **k: None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--table-size", type=int, default=1021)
    ap.add_argument("--trace", action="store_true", help="also tracemalloc (slower)")
    args = ap.parse_args()
    import ipaddress

    from meshd.desired import DesiredState, NodeInfo
    from meshd.reconciler import Reconciler
    from meshd.sources.etcd_records import RegistryState
    NullDataplane.maglev_m = args.table_size
    gc.disable()  # as the daemon's first sync: no full collections while building
    if args.trace:
        tracemalloc.start()
    rows = []
    settle()
    last_rss, last_py, t_last = rss_mb(), 0, time.perf_counter()

    def stage(name: str) -> None:
        nonlocal last_rss, last_py, t_last
        secs = time.perf_counter() - t_last
        settle()
        rss = rss_mb()
        py = tracemalloc.get_traced_memory()[0] if args.trace else 0
        rows.append((name, rss, rss - last_rss, (py - last_py) / 2**20, secs))
        last_rss, last_py = rss, py
        t_last = time.perf_counter()

    rows.append(("imports", last_rss, last_rss, 0.0, 0.0))
    items = records(args.services, args.endpoints)
    stage("records")
    reg = RegistryState("/meshd/")
    reg.replace(items)
    snap = reg.snapshot(1)
    stage("registry")
    del items
    stage("(drop records)")
    ds = DesiredState()
    groups, bad = ds.update(snap.services, [ipaddress.ip_network("10.96.0.0/12")], frozenset(),
                            node=NodeInfo("bench"))
    assert not bad and len(groups) == args.services, (len(groups), bad[:3])
    stage("desired")
    rec = Reconciler(NullDataplane())
    rep = rec.apply(groups, None)
    assert not rep.errors, list(rep.errors.items())[:3]
    stage("reconciler")
    n_ep = args.services * args.endpoints
    print(f"{args.services} services x {args.endpoints} endpoints ({n_ep} endpoint records)")
    print(f"{'stage':<16}{'RSS MB':>9}{'+RSS MB':>9}" + (f"{'+py MB':>9}" if args.trace else "")
          + f"{'seconds':>9}{'B/endpoint':>12}")
    for name, rss, d, py, secs in rows:
        print(f"{name:<16}{rss:>9.1f}{d:>9.1f}" + (f"{py:>9.1f}" if args.trace else "")
              + f"{secs:>9.2f}{(py if args.trace else d) * 2**20 / n_ep:>12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
