"""What the benchmarks share: writing their results, the one-service lab set-up of the
socket-path benches, the connect-rate measurement and the events drain (scripts run as
`python bench/x.py`, so this directory is on sys.path)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from meshd.dataplane import events as kev
from meshd.model import parse_service


def write_results(out: str | Path, result: dict) -> Path:
    """The run's figures as JSON at `out` (its directory made), and a line saying where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwritten {out}")
    return out


def start_servers_apart(lab, **kw) -> None:
    """Starts the lab's TCP servers (port 8080; `kw` as Lab.start_backends) on the last CPU
    and moves this process, and the clients it starts from now on, to the first: less
    scheduling noise. The caller restores its affinity when it is done."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[-1]})
    lab.start_backends(8080, udp=False, **kw)
    os.sched_setaffinity(0, {cpus[0]} if len(cpus) > 1 else set(cpus))


def rotated(modes: tuple, rounds: int):
    """(round, modes in that round's order): the order rotates every round, so drift and
    warm-up hit every mode alike."""
    for r in range(rounds):
        yield r, modes[r % len(modes):] + modes[:r % len(modes)]


def web_service(lab, vip: str):
    """bench/web: port http 80/TCP at `vip`, one endpoint, lab backend 1 on 8080."""
    return parse_service({"namespace": "bench", "name": "web", "vips": [vip],
                          "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                          "endpoints": [{"address": lab.backend_addr(1),
                                         "ports": {"http": 8080}}]}, where="web")


def connrate(lab, vip: str, seconds: float, max_n: int) -> dict:
    """New connections per second (connect + 1 request/reply + close, sequential, from the
    lab cgroup) and connect() p50; RuntimeError on any error."""
    cr = lab.agent("connrate", cgroup=True, addr=vip, port=80, duration=seconds, max=max_n,
                   timeout=2)
    if cr["errors"]:
        raise RuntimeError(f"errors: {cr['errors']}")
    return {"per_sec": cr["per_sec"], "count": cr["count"], "connect_p50": cr["connect_us"][0]}


class Drain:
    """Reads the events ring in a thread, as the daemon's reader does (decoding included)."""

    def __init__(self, bpffs: Path, instance: str, cpus: set[int]):
        self.cpus = cpus
        self.reader = kev.EventReader(bpffs, instance)
        self.n = 0
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        # this thread only: any CPU, as the daemon (the client is pinned to the first CPU)
        os.sched_setaffinity(0, self.cpus)
        while not self.stop.is_set():
            self.n += len(self.reader.poll(100))

    def close(self) -> None:
        self.stop.set()
        self.t.join(2)
        self.reader.close()
