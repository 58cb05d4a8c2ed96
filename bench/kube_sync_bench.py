#!/usr/bin/env python3
"""Kubernetes API -> kernel, next to etcd -> kernel in the same run: cold start, propagation, RSS.

  sudo .venv/bin/python bench/kube_sync_bench.py [--services 1000,10000] [--endpoints 10]

For each size: the test API server (tests/kubeapi: a real etcd under a thin HTTP layer that
behaves as kube-apiserver does) is loaded with N Services and N EndpointSlices of E ready
endpoints each (kubectl-shaped objects); a real `meshd run` in Kubernetes mode only (own
cgroup and pin dir, maglev m as the etcd bench) is started with NOTIFY_SOCKET: the time to
READY=1 is the cold start. Then --changes single-slice updates (one endpoint added, then
removed) are timed from just before the API write to the moment the service's Maglev table
in the kernel is replaced. Then the same size through the etcd source (bench/etcd_sync_bench
bench_size), so the two are compared on the same machine at the same moment.
Targets (issue 10): the etcd source's (READY < 10 s, p99 < 20 ms, RSS < 200 MB) at 10,000 x 10.
Bounded: every wait has a deadline. Everything made is removed, also on failure.
"""

from __future__ import annotations

import argparse
import ipaddress
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from etcd_sync_bench import (BenchDaemon, backend, bench_size, rss_mb, summary,  # noqa: E402
                             table_change_ms, vip)
from kubeapi.harness import KubeApiServer  # noqa: E402
from kubeapi.objects import endpoint, endpoint_slice, service  # noqa: E402
from meshd.dataplane import loader  # noqa: E402
from meshd.dataplane import structs as S  # noqa: E402

BPFFS = Path("/sys/fs/bpf")
PORTS = [{"name": "http", "port": 80, "targetPort": 8080}]
SLICE_PORTS = [{"name": "http", "port": 8080}]


def objects(n: int, e: int):
    svcs = [service("bench", f"s{i}", [vip(i + 10)], PORTS) for i in range(n)]
    slices = [endpoint_slice("bench", f"s{i}-1", f"s{i}",
                             [endpoint(backend(i, j), node="node-b") for j in range(e)],
                             SLICE_PORTS) for i in range(n)]
    return svcs, slices


def bench_kube(n: int, e: int, changes: int, m: int | None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="meshd-kbench-"))
    daemon = None
    try:
        with KubeApiServer(tmp / "api", bookmark_interval=1.0) as api:
            svcs, slices = objects(n, e)
            t0 = time.perf_counter()
            api.bulk("services", svcs)
            api.bulk("endpointslices", slices)
            load_s = time.perf_counter() - t0
            daemon = BenchDaemon(tmp, {
                **({"maglev": {"table_size": m}} if m else {}), "node": {"name": "node-a"},
                "kubernetes": {"kubeconfig": str(api.kubeconfig(tmp / "kubeconfig"))}},
                f"kbench-{n}")
            cold_s = daemon.start()
            rss, hwm = rss_mb(daemon.proc.pid)
            maps = loader.open_pinned(BPFFS, daemon.instance)
            try:
                gid = daemon.group_ids(maps)
                lat = []
                rnd = random.Random(7)
                for k in range(changes):
                    i = rnd.randrange(n)
                    sl = slices[i]
                    extra = endpoint(f"10.250.{k // 256}.{k % 256}", node="node-b")
                    for eps in (sl["endpoints"] + [extra], sl["endpoints"]):
                        lat.append(table_change_ms(
                            maps, gid[f"bench/s{i}:http/ipv4"],
                            S.svc_key(ipaddress.ip_address(vip(i + 10)), 80, "TCP"),
                            lambda: api.apply("endpointslices", dict(sl, endpoints=eps)), 5.0))
                        time.sleep(0.05)
            finally:
                maps.close()
            rss2, hwm2 = rss_mb(daemon.proc.pid)
        return {"services": n, "endpoints_per_service": e, "api_load_s": round(load_s, 2),
                "cold_start_to_ready_s": round(cold_s, 2), "propagation_ms": summary(lat),
                "rss_mb_after_ready": round(rss, 1), "rss_mb_after_changes": round(rss2, 1),
                "rss_mb_peak": round(max(hwm, hwm2), 1)}
    finally:
        if daemon is not None:
            daemon.close()
        shutil.rmtree(tmp, ignore_errors=True)


def line(src: str, r: dict) -> str:
    p = r["propagation_ms"]
    return (f"{src:>10}: {r['services']:>6} services x {r['endpoints_per_service']}: READY "
            f"{r['cold_start_to_ready_s']} s; write -> kernel p50 {p['p50']} ms, p99 {p['p99']} "
            f"ms (max {p['max']}, n={p['n']}); RSS {r['rss_mb_after_ready']} MB (peak "
            f"{r['rss_mb_peak']} MB)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", default="1000,10000")
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--table-size", type=int, default=None,
                    help="a fixed maglev.table_size (default: the shipped config, auto)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kube_sync.json"))
    args = ap.parse_args()
    results = []
    for n in (int(x) for x in args.services.split(",")):
        k = bench_kube(n, args.endpoints, args.changes, args.table_size)
        print(line("kubernetes", k), flush=True)
        et = asyncio.run(bench_size(n, args.endpoints, 2 * args.changes, args.table_size))
        print(line("etcd", et), flush=True)
        ratio = {x: round(k[x] / et[x], 2) for x in ("cold_start_to_ready_s",
                                                     "rss_mb_after_ready")}
        ratio["p99"] = round(k["propagation_ms"]["p99"] / et["propagation_ms"]["p99"], 2)
        print(f"{'':>10}  kubernetes / etcd: READY {ratio['cold_start_to_ready_s']}x, "
              f"p99 {ratio['p99']}x, RSS {ratio['rss_mb_after_ready']}x", flush=True)
        results.append({"kubernetes": k, "etcd": et, "ratio": ratio})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"table_size": args.table_size, "results": results}, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
