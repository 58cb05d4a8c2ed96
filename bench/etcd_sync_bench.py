#!/usr/bin/env python3
"""etcd -> kernel benchmark: propagation latency, cold start to READY, daemon RSS.

  sudo .venv/bin/python bench/etcd_sync_bench.py [--services 1,1000,10000] [--endpoints 10]

For each size: a fresh etcd (Debian's /usr/bin/etcd on free loopback ports, tmp data dir) is
loaded with N services x E endpoints; a real `meshd run` daemon (own cgroup, own pin dir,
the SHIPPED Maglev config -- table sizes auto -- unless --table-size is given) is started
with NOTIFY_SOCKET, and the time to READY=1 is the cold start. Then --changes single-endpoint
writes (alternately add and remove one endpoint of a random service) are timed from just
before the etcd put to the moment the service's frontend entry in the kernel changes (its
count, and the table half it names, flip once the new table is in: a poll of one lookup).
Also printed: locked kernel memory of the instance's maps (bytes_memlock summed over the
maps whose names start with meshd_, as `bpftool map show -j` reports them) and per service,
and the Maglev balance (max / mean slots per backend) and disruption on one removal of the
first service's table as the kernel holds it, at the size the daemon chose.
Targets (issue 11, at 10,000 x 10): READY <= 5 s, p99 <= 10 ms, RSS <= 150 MB, kernel
memory <= 100 MB, imbalance <= 1 %.
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

import ipaddress  # noqa: E402

import aetcd  # noqa: E402
import yaml  # noqa: E402

import numpy as np  # noqa: E402

from meshd import maglev  # noqa: E402
from meshd.dataplane import loader  # noqa: E402
from meshd.dataplane import structs as S  # noqa: E402
from meshd.dataplane.kernel import KernelDataplane  # noqa: E402
from meshd.desired import Frontend  # noqa: E402

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


def kernel_memory(pin_dir: Path) -> dict:
    """bytes_memlock of the instance's maps (bpftool), the Maglev tables (inner maps) apart."""
    ids = set()
    for pin in pin_dir.iterdir():
        if pin.name.startswith("meshd_"):
            out = subprocess.run(["bpftool", "map", "show", "pinned", str(pin), "-j"],
                                 capture_output=True, text=True)
            if out.returncode == 0:
                ids.add(json.loads(out.stdout)["id"])
    maps = json.loads(subprocess.run(["bpftool", "map", "show", "-j"], capture_output=True,
                                     text=True, check=True).stdout)
    pinned = sum(m.get("bytes_memlock", 0) for m in maps if m["id"] in ids)
    # inner maps are not pinned: count them through the outer map
    outer = pin_dir / loader.names.MAP_MAGLEV
    inner_ids = set()
    dump = subprocess.run(["bpftool", "map", "dump", "pinned", str(outer), "-j"],
                          capture_output=True, text=True)
    if dump.returncode == 0:
        for e in json.loads(dump.stdout):
            v = e.get("inner_map_id", e.get("value"))
            inner_ids.add(v if isinstance(v, int) else int.from_bytes(
                bytes(int(b, 16) for b in v), "little"))
    tables = sum(m.get("bytes_memlock", 0) for m in maps if m["id"] in inner_ids)
    return {"maps_bytes": pinned, "tables_bytes": tables, "total_bytes": pinned + tables}


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


class BenchDaemon:
    """A real `meshd run` for a bench: its own instance, cgroup and pin dir; READY timed
    through NOTIFY_SOCKET. close() stops it by PID and removes all it made."""

    def __init__(self, tmp: Path, cfg: dict, name: str):
        self.tmp, self.name = tmp, name
        self.instance = "mbench-" + secrets.token_hex(3)
        self.cg = CGROUP2 / self.instance
        self.cg.mkdir()
        self.cfg = tmp / "meshd.yaml"
        self.cfg.write_text(yaml.safe_dump({
            "instance": self.instance, "cgroup": str(self.cg), "bpffs": str(BPFFS),
            "state_dir": str(tmp / "state"), "metrics": {"listen": f"127.0.0.1:{free_port()}"},
            "healthz": {"listen": "127.0.0.1:0"}, **cfg}))
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp / "notify"))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180, profile: str = "") -> float:
        """Seconds from the exec to READY=1. `profile`: py-spy samples the daemon until READY
        into PROFILE.txt (collapsed stacks; pip install py-spy)."""
        env = dict(os.environ, NOTIFY_SOCKET=str(self.tmp / "notify"))
        log = open(self.tmp / "meshd.log", "wb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "meshd", "--log-level",
                                      os.environ.get("MESHD_BENCH_LOG", "info"), "run",
                                      "--config", str(self.cfg)], env=env, stdout=log,
                                     stderr=log)
        spy = None
        if profile:
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(self.proc.pid), "--threads",
                                    "--idle", "--nonblocking", "--rate", "100", "--format", "raw",
                                    "-o", f"{profile}.txt"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        self.notify.settimeout(timeout)
        while "READY=1" not in self.notify.recv(4096).decode():
            pass
        cold = time.perf_counter() - t0
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        return cold

    def group_ids(self, maps) -> dict[str, int]:
        return {v.name.decode(): k.value for k, v in maps.names.items()}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()
        if (self.tmp / "meshd.log").exists():
            shutil.copy(self.tmp / "meshd.log", f"/tmp/meshd-{self.name}.log")  # a look after
        loader.remove(BPFFS, self.instance)
        self.cg.rmdir()


def maglev_figures(maps, svc_vip: str) -> dict:
    """Balance and disruption of one service's table as the kernel holds it, at the M the
    daemon chose: max / mean slots per backend, and the share of the other backends' slots
    that move when one backend (the first by name) is removed (the same build, in Python)."""
    dp = KernelDataplane(maps)
    snap = dp.snapshot()
    gid, _count, flags = snap.frontends[Frontend(ipaddress.ip_address(svc_vip), 80, "TCP")]
    table = dp.get_table(gid, 1 if flags & S.SVC_F_TABLE_B else 0)
    ids, counts = np.unique(table, return_counts=True)
    names = sorted(snap.backends[int(i)].name for i in ids)
    old = np.array([snap.backends[int(i)].name for i in table])
    gone = names[0]
    rest = [nm for nm in names if nm != gone]
    new = np.array(rest)[maglev.build_table([(nm, 1) for nm in rest], table.size)]
    kept = old != gone
    return {"m": int(table.size), "backends": len(names),
            "balance_max_over_mean": round(float(counts.max() / counts.mean()), 4),
            "disruption_on_removal": round(float((old[kept] != new[kept]).mean()), 4)}


def table_change_ms(maps, gid: int, fe, write, limit: float = 2.0) -> float:
    """Milliseconds from just before `write()` to the group's table changing in the kernel:
    a new inner map (a new or resized table) or the frontend entry `fe` changing (a flip to
    the other half, or a new backend count) -- a poll of two map lookups."""
    def state():
        inner = maps.maglev.lookup(C.c_uint32(gid))
        return (inner.value if inner else 0, bytes(maps.svc.lookup(fe)))
    before = state()
    t1 = time.perf_counter()
    write()
    while state() == before:
        if time.perf_counter() - t1 > limit:
            raise RuntimeError(f"a change of group {gid} not in the kernel after {limit} s")
    return (time.perf_counter() - t1) * 1e3


def summary(lat: list[float]) -> dict:
    lat = sorted(lat)
    return {"p50": round(statistics.median(lat), 2),
            "p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2),
            "max": round(lat[-1], 2), "n": len(lat)}


async def bench_size(n: int, e: int, changes: int, m: int | None, profile: str = "") -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="meshd-bench-"))
    etcd = Etcd(tmp)
    daemon = None
    try:
        async with aetcd.Client("127.0.0.1", etcd.port) as client:
            await wait_etcd(client)
            load_s = await load(client, n, e)
            daemon = BenchDaemon(tmp, {**({"maglev": {"table_size": m}} if m else {}),
                                       "etcd": {"endpoints": [etcd.url]}}, f"bench-{n}")
            cold_s = daemon.start(profile=f"{profile}-{n}" if profile else "")
            rss, hwm = rss_mb(daemon.proc.pid)
            maps = loader.open_pinned(BPFFS, daemon.instance)
            kmem = kernel_memory(maps.pin_dir)
            mg = maglev_figures(maps, vip(10))
            try:
                lat, put_ms = [], []
                rnd = random.Random(7)
                for k in range(changes):
                    i = rnd.randrange(n)
                    fe = S.svc_key(ipaddress.ip_address(vip(i + 10)), 80, "TCP")
                    before = bytes(maps.svc.lookup(fe))  # a change flips or swaps the table:
                    key = f"{PREFIX}endpoints/bench/s{i}/extra".encode()  # the entry changes
                    t1 = time.perf_counter()
                    await client.put(key, json.dumps({"address": f"10.250.{k // 256}.{k % 256}",
                                                      "ports": {"http": 8080}}).encode())
                    t_ack = time.perf_counter()  # etcd committed it (its WAL fsync included)
                    while bytes(maps.svc.lookup(fe)) == before:
                        if time.perf_counter() - t1 > 2:
                            raise RuntimeError(f"change {k} not in the kernel after 2 s")
                    t2 = time.perf_counter()
                    lat.append((t2 - t1) * 1e3)
                    put_ms.append((t_ack - t1) * 1e3)
                    await client.delete(key)
                    await asyncio.sleep(0.1)  # one change at a time: let the delete's sync finish
            finally:
                maps.close()
            rss2, hwm2 = rss_mb(daemon.proc.pid)
        return {"services": n, "endpoints_per_service": e, "etcd_load_s": round(load_s, 2),
                "cold_start_to_ready_s": round(cold_s, 2), "propagation_ms": summary(lat),
                # of which etcd's own put (Raft commit, WAL fsync): not meshd's time
                "etcd_put_ms": summary(put_ms),
                # etcd acknowledged -> in the kernel: meshd's part (watch delivery included)
                "after_ack_ms": summary([a - b for a, b in zip(lat, put_ms)]),
                "samples_ms": [[round(a, 2), round(b, 2)] for a, b in zip(lat, put_ms)],
                "rss_mb_after_ready": round(rss, 1), "rss_mb_after_changes": round(rss2, 1),
                "rss_mb_peak": round(max(hwm, hwm2), 1),
                "kernel_memory_mb": round(kmem["total_bytes"] / 1e6, 1),
                "kernel_memory_tables_mb": round(kmem["tables_bytes"] / 1e6, 1),
                "kernel_bytes_per_service": round(kmem["total_bytes"] / n),
                "table_bytes_per_service": round(kmem["tables_bytes"] / n), "maglev": mg}
    finally:
        if daemon is not None:
            daemon.close()
        etcd.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", default="1,1000,10000")
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--table-size", type=int, default=None,
                    help="a fixed maglev.table_size (default: the shipped config, auto)")
    ap.add_argument("--profile", default="", help="py-spy the daemon until READY into "
                    "PROFILE-<services>.txt (collapsed stacks)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "etcd_sync.json"))
    args = ap.parse_args()
    results = []
    for n in (int(x) for x in args.services.split(",")):
        r = asyncio.run(bench_size(n, args.endpoints, args.changes, args.table_size,
                                   args.profile))
        results.append(r)
        p = r["propagation_ms"]
        print(f"{n:>6} services x {args.endpoints} endpoints: cold start to READY "
              f"{r['cold_start_to_ready_s']} s; etcd write -> kernel p50 {p['p50']} ms, "
              f"p99 {p['p99']} ms (max {p['max']}, n={p['n']}; etcd's own put p50 "
              f"{r['etcd_put_ms']['p50']}, p99 {r['etcd_put_ms']['p99']} ms; from etcd's ack "
              f"p50 {r['after_ack_ms']['p50']}, p99 {r['after_ack_ms']['p99']} ms); "
              f"RSS {r['rss_mb_after_ready']} MB "
              f"(peak {r['rss_mb_peak']} MB); etcd load {r['etcd_load_s']} s; kernel memory "
              f"{r['kernel_memory_mb']} MB (tables {r['kernel_memory_tables_mb']} MB), "
              f"{r['kernel_bytes_per_service']} B/service "
              f"(tables {r['table_bytes_per_service']} B); Maglev at M={r['maglev']['m']} "
              f"({r['maglev']['backends']} backends): max/mean slot share "
              f"{r['maglev']['balance_max_over_mean']}, one removal moves "
              f"{r['maglev']['disruption_on_removal'] * 100:.2f}% of the other slots",
              flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"table_size": args.table_size or "auto (shipped default)",
                               "results": results}, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
