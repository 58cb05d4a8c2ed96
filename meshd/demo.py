"""`meshd demo`: a live demonstration on embedded defaults, in a throw-away lab.

Builds a netns lab (a client namespace, three backend namespaces, no route out), starts the
real `meshd run` daemon on the lab's cgroup with a services file, and shows:
  1. connections to a VIP spread over three backends by weight 1:2:3 (Maglev);
  2. an edit of the services file (backend b2 drained) followed within seconds;
  3. the daemon stopped with SIGTERM while the pinned data plane keeps serving;
then removes everything it made (daemon by PID, pins, cgroup, namespaces) — also on error.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from netns_lab import Lab, sweep

VIP, PORT, CONNECTIONS = "10.96.0.10", 80, 600
BPFFS = Path("/sys/fs/bpf")


def _services(lab: Lab, weights: dict[int, int]) -> dict:
    eps = [{"address": lab.backend_addr(i), "ports": {"http": 8080}, "weight": w,
            "ready": w > 0} for i, w in weights.items()]
    return {"services": [{"namespace": "demo", "name": "web", "vips": [VIP],
                          "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
                          "endpoints": eps}]}


def _meshd(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshd", *args]


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


def _wait_for(pred, what: str, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.2)
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
        try:
            lab.start_backends(8080, udp=False)
            cfg_path, svc_path = Path(tmp) / "meshd.yaml", Path(tmp) / "services.yaml"
            svc_path.write_text(yaml.safe_dump(_services(lab, {1: 1, 2: 2, 3: 3})))
            cfg_path.write_text(yaml.safe_dump({
                "instance": instance, "cgroup": str(lab.cgroup), "bpffs": str(BPFFS),
                "state_dir": str(Path(tmp) / "state"), "services_file": str(svc_path),
                "maglev": {"table_size": 16381}}))
            print(f"lab {lab.prefix}: client {lab.client_ns}, backends "
                  + ", ".join(f"b{i}={lab.backend_addr(i)}" for i in (1, 2, 3)))
            log = open(Path(tmp) / "meshd.log", "wb")
            daemon = subprocess.Popen(_meshd("run", "--config", str(cfg_path)),
                                      stdout=log, stderr=subprocess.STDOUT)
            print(f"started `meshd run` (pid {daemon.pid}), instance {instance}, "
                  f"cgroup {lab.cgroup}")

            def kernel_has(n_backends: int) -> bool:
                r = subprocess.run(_meshd("services", "--json", "--config", str(cfg_path)),
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    return False
                svcs = json.loads(r.stdout)["services"]
                return bool(svcs) and len(svcs[0]["backends"]) == n_backends

            _wait_for(lambda: kernel_has(3), "the daemon's first sync")
            print(subprocess.run(_meshd("services", "--config", str(cfg_path)),
                                 capture_output=True, text=True).stdout.rstrip())
            _show(lab, "weights b1:b2:b3 = 1:2:3")

            svc_path.write_text(yaml.safe_dump(_services(lab, {1: 1, 2: 0, 3: 3})))
            t0 = time.monotonic()
            _wait_for(lambda: kernel_has(2), "the services file edit to reach the kernel")
            print(f"\n(edited the services file: b2 drained; in the kernel after "
                  f"{time.monotonic() - t0:.1f}s)")
            _show(lab, "b2 drained, weights b1:b3 = 1:3")

            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=10)
            print(f"\n(daemon stopped with SIGTERM, exit {daemon.returncode}; "
                  "the pinned data plane keeps serving)")
            _show(lab, "no daemon running")
        finally:
            if daemon is not None and daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            r = subprocess.run(_meshd("cleanup", "--config", str(Path(tmp) / "meshd.yaml")),
                               capture_output=True, text=True)
            print(f"\ncleanup: {r.stdout.strip() or r.stderr.strip()}; lab torn down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
