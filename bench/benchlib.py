"""What the benchmarks share: writing their results, the one-service lab set-up of the
socket-path benches, and the connect-rate measurement (scripts run as `python bench/x.py`,
so this directory is on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

from meshd.model import parse_service


def write_results(out: str | Path, result: dict) -> Path:
    """The run's figures as JSON at `out` (its directory made), and a line saying where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwritten {out}")
    return out


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
