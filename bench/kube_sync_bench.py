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
import asyncio
import ctypes as C
import json
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from etcd_sync_bench import backend, bench_size, free_port, rss_mb, vip  # noqa: E402
from kubeapi.harness import KubeApiServer  # noqa: E402
from kubeapi.objects import endpoint, endpoint_slice, service  # noqa: E402
from meshd.dataplane import loader  # noqa: E402

BPFFS = Path("/sys/fs/bpf")
CGROUP2 = Path("/sys/fs/cgroup/unified")
PORTS = [{"name": "http", "port": 80, "targetPort": 8080}]
SLICE_PORTS = [{"name": "http", "port": 8080}]


def objects(n: int, e: int):
    svcs = [service("bench", f"s{i}", [vip(i + 10)], PORTS) for i in range(n)]
    slices = [endpoint_slice("bench", f"s{i}-1", f"s{i}",
                             [endpoint(backend(i, j), node="node-b") for j in range(e)],
                             SLICE_PORTS) for i in range(n)]
    return svcs, slices


def bench_kube(n: int, e: int, changes: int, m: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="meshd-kbench-"))
    instance = "mbench-" + secrets.token_hex(3)
    cg = CGROUP2 / instance
    cg.mkdir()
    daemon = None
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify"))
    try:
        with KubeApiServer(tmp / "api", bookmark_interval=1.0) as api:
            svcs, slices = objects(n, e)
            t0 = time.perf_counter()
            api.bulk("services", svcs)
            api.bulk("endpointslices", slices)
            load_s = time.perf_counter() - t0
            cfg = tmp / "meshd.yaml"
            cfg.write_text(yaml.safe_dump({
                "instance": instance, "cgroup": str(cg), "bpffs": str(BPFFS),
                "state_dir": str(tmp / "state"), "maglev": {"table_size": m},
                "kubernetes": {"kubeconfig": str(api.kubeconfig(tmp / "kubeconfig"))},
                "node": {"name": "node-a"},
                "metrics": {"listen": f"127.0.0.1:{free_port()}"},
                "healthz": {"listen": "127.0.0.1:0"}}))
            env = dict(os.environ, NOTIFY_SOCKET=str(tmp / "notify"))
            log = open(tmp / "meshd.log", "wb")
            t0 = time.perf_counter()
            daemon = subprocess.Popen([sys.executable, "-m", "meshd", "run", "--config",
                                       str(cfg)], env=env, stdout=log, stderr=log)
            notify.settimeout(180)
            while "READY=1" not in notify.recv(4096).decode():
                pass
            cold_s = time.perf_counter() - t0
            rss, hwm = rss_mb(daemon.pid)
            maps = loader.open_pinned(BPFFS, instance)
            try:
                gid = {v.name.decode(): k.value for k, v in maps.names.items()}
                fe_of = {v.id: k for k, v in maps.svc.items()}  # a frontend of each group

                def state(g: int) -> tuple:
                    # a change flips the frontend to the table's other half (or swaps the
                    # table in, when its size changes): either shows the new table is in
                    inner = maps.maglev.lookup(C.c_uint32(g))
                    return (inner.value if inner else 0, bytes(maps.svc.lookup(fe_of[g])))
                lat = []
                rnd = random.Random(7)
                for k in range(changes):
                    i = rnd.randrange(n)
                    g = gid[f"bench/s{i}:http/ipv4"]
                    sl = slices[i]
                    extra = endpoint(f"10.250.{k // 256}.{k % 256}", node="node-b")
                    for eps in (sl["endpoints"] + [extra], sl["endpoints"]):
                        before = state(g)
                        body = dict(sl, endpoints=eps)
                        t1 = time.perf_counter()
                        api.apply("endpointslices", body)
                        while state(g) == before:
                            if time.perf_counter() - t1 > 5:
                                raise RuntimeError(f"change {k} not in the kernel after 5 s")
                        lat.append((time.perf_counter() - t1) * 1e3)
                        time.sleep(0.05)
            finally:
                maps.close()
            rss2, hwm2 = rss_mb(daemon.pid)
        lat.sort()
        return {"services": n, "endpoints_per_service": e, "api_load_s": round(load_s, 2),
                "cold_start_to_ready_s": round(cold_s, 2),
                "propagation_ms": {"p50": round(statistics.median(lat), 2),
                                   "p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2),
                                   "max": round(lat[-1], 2), "n": len(lat)},
                "rss_mb_after_ready": round(rss, 1), "rss_mb_after_changes": round(rss2, 1),
                "rss_mb_peak": round(max(hwm, hwm2), 1)}
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        notify.close()
        if (tmp / "meshd.log").exists():
            shutil.copy(tmp / "meshd.log", f"/tmp/meshd-kbench-{n}.log")
        loader.remove(BPFFS, instance)
        cg.rmdir()
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
    ap.add_argument("--table-size", type=int, default=1021)
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
