#!/usr/bin/env python3
"""etcd -> kernel benchmark: propagation latency, cold start to READY, daemon RSS.

  sudo .venv/bin/python bench/etcd_sync_bench.py [--services 1,1000,10000] [--endpoints 10]

For each size: a fresh etcd (Debian's /usr/bin/etcd on free loopback ports, tmp data dir) is
loaded with N services x E endpoints; a real `meshd run` daemon (own cgroup, own pin dir,
maglev m=1021) is started with NOTIFY_SOCKET, and the time to READY=1 is the cold start.
Then --changes single-endpoint writes (alternately add and remove one endpoint of a random
service) are timed from just before the etcd put to the moment the service's Maglev table in
the kernel is replaced (the outer map's inner-map id changes: a poll of one map lookup).
Targets (issue 3): p99 propagation < 20 ms at 10,000 services; cold sync < 10 s; RSS < 200 MB.
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
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import aetcd  # noqa: E402
import yaml  # noqa: E402

from meshd.dataplane import loader  # noqa: E402

BPFFS = Path("/sys/fs/bpf")
CGROUP2 = Path("/sys/fs/cgroup/unified")
PREFIX = "/meshd/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vip(i: int) -> str:
    return f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"


def backend(i: int, j: int) -> str:
    n = i * 16 + j
    return f"10.{200 + n // 65536}.{n // 256 % 256}.{n % 256}"


def records(n: int, e: int):
    for i in range(n):
        yield (f"{PREFIX}services/bench/s{i}", {
            "namespace": "bench", "name": f"s{i}", "vips": [vip(i + 10)],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]})
        for j in range(e):
            yield (f"{PREFIX}endpoints/bench/s{i}/ep{j}",
                   {"address": backend(i, j), "ports": {"http": 8080}})


async def load(client, n: int, e: int) -> float:
    t0 = time.perf_counter()
    batch, pending = [], []
    for key, value in records(n, e):
        batch.append(client.transactions.put(key.encode(), json.dumps(value).encode()))
        if len(batch) == 128:  # etcd's default --max-txn-ops
            pending.append(client.transaction(compare=[], success=batch, failure=[]))
            batch = []
            if len(pending) == 16:
                await asyncio.gather(*pending)
                pending = []
    if batch:
        pending.append(client.transaction(compare=[], success=batch, failure=[]))
    await asyncio.gather(*pending)
    return time.perf_counter() - t0


def rss_mb(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        fields[k] = v.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class Etcd:
    def __init__(self, tmp: Path):
        self.port, peer = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / "etcd.log", "wb")
        self.proc = subprocess.Popen(
            ["etcd", "--name", "bench", "--data-dir", str(tmp / "etcd"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"bench=http://127.0.0.1:{peer}",
             "--quota-backend-bytes", str(4 << 30)], stdout=self.log, stderr=self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def wait_etcd(client, deadline: float = 15) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            await client.status()
            return
        except Exception:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.1)


async def bench_size(n: int, e: int, changes: int, m: int, profile: str = "") -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="meshd-bench-"))
    instance = "mbench-" + secrets.token_hex(3)
    cg = CGROUP2 / instance
    cg.mkdir()
    etcd = Etcd(tmp)
    daemon = None
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify"))
    try:
        async with aetcd.Client("127.0.0.1", etcd.port) as client:
            await wait_etcd(client)
            load_s = await load(client, n, e)
            cfg = tmp / "meshd.yaml"
            cfg.write_text(yaml.safe_dump({
                "instance": instance, "cgroup": str(cg), "bpffs": str(BPFFS),
                "state_dir": str(tmp / "state"), "maglev": {"table_size": m},
                "etcd": {"endpoints": [etcd.url]},
                "metrics": {"listen": f"127.0.0.1:{free_port()}"},
                "healthz": {"listen": "127.0.0.1:0"}}))
            env = dict(os.environ, NOTIFY_SOCKET=str(tmp / "notify"))
            log = open(tmp / "meshd.log", "wb")
            t0 = time.perf_counter()
            daemon = subprocess.Popen([sys.executable, "-m", "meshd", "--log-level",
                                       os.environ.get("MESHD_BENCH_LOG", "info"), "run",
                                       "--config", str(cfg)],
                                      env=env, stdout=log, stderr=log)
            spy = None
            if profile:  # py-spy (pip install py-spy) samples the daemon until READY
                spy = subprocess.Popen(["py-spy", "record", "--pid", str(daemon.pid), "--threads",
                                        "--idle", "--nonblocking", "--rate", "100", "--format", "raw", "-o",
                                        f"{profile}-{n}.txt"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            notify.settimeout(120)
            while True:
                msg = notify.recv(4096).decode()
                if "READY=1" in msg:
                    break
            cold_s = time.perf_counter() - t0
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            rss, hwm = rss_mb(daemon.pid)

            maps = loader.open_pinned(BPFFS, instance)
            try:
                gid = {v.name.decode(): k.value for k, v in maps.names.items()}
                lat = []
                rnd = random.Random(7)
                for k in range(changes):
                    i = rnd.randrange(n)
                    g = gid[f"bench/s{i}:http/ipv4"]
                    before = maps.maglev.lookup(C.c_uint32(g)).value
                    key = f"{PREFIX}endpoints/bench/s{i}/extra".encode()
                    t1 = time.perf_counter()
                    await client.put(key, json.dumps({"address": f"10.250.{k // 256}.{k % 256}",
                                                      "ports": {"http": 8080}}).encode())
                    while maps.maglev.lookup(C.c_uint32(g)).value == before:
                        if time.perf_counter() - t1 > 2:
                            raise RuntimeError(f"change {k} not in the kernel after 2 s")
                    lat.append((time.perf_counter() - t1) * 1e3)
                    await client.delete(key)
                    await asyncio.sleep(0.1)  # one change at a time: let the delete's sync finish
            finally:
                maps.close()
            rss2, hwm2 = rss_mb(daemon.pid)
        lat.sort()
        return {"services": n, "endpoints_per_service": e, "etcd_load_s": round(load_s, 2),
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
        etcd.stop()
        if (tmp / "meshd.log").exists():
            shutil.copy(tmp / "meshd.log", f"/tmp/meshd-bench-{n}.log")  # for a look after
        loader.remove(BPFFS, instance)
        cg.rmdir()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", default="1,1000,10000")
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--table-size", type=int, default=1021)
    ap.add_argument("--profile", default="", help="py-spy the daemon until READY into "
                    "PROFILE-<services>.txt (collapsed stacks)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "etcd_sync.json"))
    args = ap.parse_args()
    results = []
    for n in (int(x) for x in args.services.split(",")):
        r = asyncio.run(bench_size(n, args.endpoints, args.changes, args.table_size, args.profile))
        results.append(r)
        p = r["propagation_ms"]
        print(f"{n:>6} services x {args.endpoints} endpoints: cold start to READY "
              f"{r['cold_start_to_ready_s']} s; etcd write -> kernel p50 {p['p50']} ms, "
              f"p99 {p['p99']} ms (max {p['max']}, n={p['n']}); RSS {r['rss_mb_after_ready']} MB "
              f"(peak {r['rss_mb_peak']} MB); etcd load {r['etcd_load_s']} s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"table_size": args.table_size, "results": results}, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
