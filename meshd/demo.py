"""`meshd demo`: a live demonstration on embedded defaults, in a throw-away lab.

Builds a netns lab (a client namespace, three backend namespaces, no route out), starts the
real `meshd run` daemon on the lab's cgroup with its embedded etcd, registers a service and
three weighted endpoints with the `meshd service` / `meshd endpoint` commands, and shows:
  1. connections to the VIP spread over the backends by weight 1:2:3 (Maglev);
  2. what the kernel measured per service and backend (`meshd top --once`);
  3. an endpoint removed in etcd, followed in the kernel within milliseconds;
  4. the daemon stopped with SIGTERM while the pinned data plane keeps serving;
then removes everything it made (daemon by PID, its etcd, pins, cgroup, namespaces) — also
on error.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from netns_lab import Lab, sweep

VIP, PORT, CONNECTIONS = "10.96.0.10", 80, 600
BPFFS = Path("/sys/fs/bpf")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _meshd(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshd", *args]


def _cli(cfg: Path, *args: str) -> str:
    print(f"$ meshd {' '.join(args)}")
    r = subprocess.run(_meshd(*args, "--config", str(cfg)), capture_output=True, text=True,
                       timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"meshd {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout.strip()


def _show(lab: Lab, title: str) -> dict:
    res = lab.agent("tcp", cgroup=True, addr=VIP, port=PORT, count=CONNECTIONS, timeout=2)
    print(f"\n== {title}")
    print(f"   {CONNECTIONS} connections from {lab.client_ns} to {VIP}:{PORT}")
    total = sum(res["by_backend"].values()) or 1
    for name in sorted(res["by_backend"]):
        n = res["by_backend"][name]
        print(f"   {name}  {n:4d}  {n / total * 100:5.1f}%  {'#' * round(n / total * 50)}")
    if res["errors"]:
        print(f"   errors: {res['errors']}")
    p50, p99 = res.get("connect_us") or (None, None)
    print(f"   connect() p50 {p50} us, p99 {p99} us; getpeername() saw {res['peers']}")
    return res


def _wait_for(pred, what: str, timeout: float = 20.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.005)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def main() -> int:
    if os.geteuid() != 0:
        print("meshd demo: run as root (it builds network namespaces and loads BPF)",
              file=sys.stderr)
        return 1
    sweep()
    instance = "demo-" + secrets.token_hex(3)
    daemon = None
    with tempfile.TemporaryDirectory(prefix="meshd-demo-") as tmp, Lab(backends=3) as lab:
        cfg_path = Path(tmp) / "meshd.yaml"
        try:
            lab.start_backends(8080, udp=False)
            cfg_path.write_text(yaml.safe_dump({
                "instance": instance, "cgroup": str(lab.cgroup), "bpffs": str(BPFFS),
                "state_dir": str(Path(tmp) / "state"),
                "metrics": {"listen": f"127.0.0.1:{_free_port()}"},
                "healthz": {"listen": "127.0.0.1:0"}}))
            print(f"lab {lab.prefix}: client {lab.client_ns}, backends "
                  + ", ".join(f"b{i}={lab.backend_addr(i)}" for i in (1, 2, 3)))
            log = open(Path(tmp) / "meshd.log", "wb")
            daemon = subprocess.Popen(_meshd("run", "--config", str(cfg_path)),
                                      stdout=log, stderr=subprocess.STDOUT)
            print(f"started `meshd run` (pid {daemon.pid}) with its embedded etcd; "
                  f"instance {instance}, cgroup {lab.cgroup}\n")
            status = Path(tmp) / "state" / instance / "status.json"

            def ready() -> bool:
                if daemon.poll() is not None:
                    raise RuntimeError("meshd exited: " + (Path(tmp) / "meshd.log").read_text())
                try:
                    return all(s["synced"] for s in json.loads(status.read_text())
                               ["sources"].values())
                except (OSError, ValueError, KeyError):
                    return False
            _wait_for(ready, "the daemon's first sync")

            def kernel_backends() -> int:
                r = subprocess.run(_meshd("services", "--json", "--config", str(cfg_path)),
                                   capture_output=True, text=True)
                svcs = json.loads(r.stdout)["services"] if r.returncode == 0 else []
                return len(svcs[0]["backends"]) if svcs else -1

            _cli(cfg_path, "service", "put", "demo/web", "--vip", VIP, "--port",
                 f"http={PORT}/TCP")
            for i, w in ((1, 1), (2, 2), (3, 3)):
                _cli(cfg_path, "endpoint", "add", "demo/web", f"b{i}", "--address",
                     lab.backend_addr(i), "--port", "http=8080", "--weight", str(w))
            _wait_for(lambda: kernel_backends() == 3, "the endpoints to reach the kernel")
            print(_cli(cfg_path, "services"))
            _show(lab, "weights b1:b2:b3 = 1:2:3")
            print("\n== what the kernel measured (meshd top --once)")
            print(_cli(cfg_path, "top", "--once"))

            print()
            from ipaddress import ip_address
            from meshd.dataplane import loader, structs
            maps = loader.open_pinned(BPFFS, instance)
            try:
                key = structs.svc_key(ip_address(VIP), PORT, "TCP")
                t0 = time.monotonic()
                _cli(cfg_path, "endpoint", "remove", "demo/web", "b2")
                cli_ms = (time.monotonic() - t0) * 1e3
                took = _wait_for(lambda: maps.svc.lookup(key).count == 2,
                                 "the removal to reach the kernel")
            finally:
                maps.close()
            print(f"(b2 removed in etcd; the command took {cli_ms:.0f} ms including Python "
                  + ("start-up, and the kernel map already had the change when it returned)"
                     if took < 0.001 else f"start-up; the kernel map had it {took * 1e3:.1f} "
                     "ms after it returned)"))
            _show(lab, "b2 removed, weights b1:b3 = 1:3")

            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=15)
            print(f"\n(daemon and its etcd stopped with SIGTERM, exit {daemon.returncode}; "
                  "the pinned data plane keeps serving)")
            _show(lab, "no daemon running")
        finally:
            if daemon is not None and daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
            r = subprocess.run(_meshd("cleanup", "--config", str(cfg_path)),
                               capture_output=True, text=True)
            print(f"\ncleanup: {r.stdout.strip() or r.stderr.strip()}; lab torn down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
