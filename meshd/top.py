"""`meshd top`: a live terminal view of services, read straight from the pinned kernel maps
(no daemon needed) — what an operator opens first during an incident.

Per service port (and under it, per backend): new connections per second and in total,
open connections, failures per second and in total by kind, connect latency and RTT
p50/p99 (estimated from the kernel's log2 histograms), bytes per second each way.
Rates are over the last frame; latency percentiles over the last WINDOW_S seconds, or,
when nothing connected in that window, since the data plane was loaded (marked `*`).
Owns rendering only; the data comes from meshd.metrics (Snapshot, bucket math).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import deque

from meshd.config import Config
from meshd.errors import MeshdError
from meshd.metrics import Counters, KernelSource, Snapshot, quantile, total

WINDOW_S = 10.0
CLEAR = "\x1b[H\x1b[2J"


def fmt_rate(x: float) -> str:
    if x == 0:
        return "0"
    if x < 10:
        return f"{x:.1f}"
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def fmt_bytes(x: float) -> str:
    for unit, div in (("G", 2 ** 30), ("M", 2 ** 20), ("k", 2 ** 10)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f}s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f}ms"
    return f"{s * 1e6:.0f}us"


def _pcts(hist, fallback) -> str:
    """'p50/p99' of the window's samples, or of all samples marked '*' if none."""
    if sum(hist):
        return f"{fmt_seconds(quantile(hist, 0.5))}/{fmt_seconds(quantile(hist, 0.99))}"
    if sum(fallback):
        return f"{fmt_seconds(quantile(fallback, 0.5))}/{fmt_seconds(quantile(fallback, 0.99))}*"
    return "-"


HEADER = (f"{'SERVICE / backend':<44} {'CONN/s':>7} {'CONNS':>7} {'OPEN':>5} {'FAIL/s':>6} "
          f"{'FAILS ref/tmo/rst':>17} {'CONNECT p50/p99':>18} {'RTT p50/p99':>17} "
          f"{'TX/s':>7} {'RX/s':>7}")


def _row(name: str, now: Counters, rate: Counters, win: Counters, secs: float) -> str:
    f = now.failures
    fails = f"{f['refused']}/{f['timeout']}/{f['reset']}"
    if f["other"]:
        fails += f"+{f['other']}"
    fail_rate = sum(rate.failures.values()) / secs
    open_now = max(now.established - now.closed, 0)
    return (f"{name[:44]:<44} {fmt_rate(rate.opened / secs):>7} {now.opened:>7} {open_now:>5} "
            f"{fmt_rate(fail_rate):>6} {fails:>17} "
            f"{_pcts(win.connect_hist, now.connect_hist):>18} "
            f"{_pcts(win.rtt_hist, now.rtt_hist):>17} "
            f"{fmt_bytes(rate.tx_bytes / secs):>7} {fmt_bytes(rate.rx_bytes / secs):>7}")


def _denied_lines(gid: int, prev: Snapshot, cur: Snapshot, secs: float,
                  labels: dict) -> tuple[int, list[str]]:
    """Policy denials of one service port, per caller identity: (denials per second now,
    lines)."""
    mine = sorted(((ident, n) for (g, ident), n in cur.denied.items() if g == gid and n),
                  key=lambda kv: -kv[1])
    lines, rate_all = [], 0.0
    for ident, n in mine:
        rate = (n - prev.denied.get((gid, ident), 0)) / secs
        rate_all += rate
        who = labels.get(str(ident)) or (f"identity {ident}" if ident else "unselected callers")
        lines.append(f"  DENIED {who[:60]:<60} {fmt_rate(rate):>7}/s {n:>9} total")
    return rate_all, lines


def render(prev: Snapshot, cur: Snapshot, window: Snapshot | None = None,
           max_lines: int | None = None, title: str = "", labels: dict | None = None) -> str:
    """One frame: rates between `prev` and `cur`, percentiles between `window` (default
    `prev`) and `cur`. Order: failing now, busy now, failed since load, busy since load."""
    window = window or prev
    secs = max(cur.taken_at - prev.taken_at, 1e-6)
    empty = Counters()
    by_gid: dict[int, dict[int, Counters]] = {}
    for (gid, bid), c in cur.stats.items():
        by_gid.setdefault(gid, {})[bid] = c
    old_tot, win_tot = prev.by_group(), window.by_group()
    rows = []
    for gid, key in cur.groups.items():
        pairs = by_gid.get(gid, {})
        now = total(pairs.values())
        rate = now - old_tot.get(gid, empty)
        lines = [_row(key, now, rate, now - win_tot.get(gid, empty), secs)]
        for bid, c in sorted(pairs.items(), key=lambda kv: cur.backends.get(kv[0], "")):
            if bid == 0:
                continue  # refusals: no backend, counted in the service line
            name = "  " + cur.backends.get(bid, f"<removed {bid}>")
            lines.append(_row(name, c, c - prev.stats.get((gid, bid), empty),
                              c - window.stats.get((gid, bid), empty), secs))
        denied_rate, denied = _denied_lines(gid, prev, cur, secs, labels or {})
        lines += denied
        order = (-sum(rate.failures.values()) - denied_rate, -rate.opened,
                 -sum(now.failures.values()), -now.opened, key)
        rows.append((order, lines))
    rows.sort(key=lambda r: r[0])
    head = [f"meshd top  {title}  {time.strftime('%H:%M:%S')}  {len(cur.groups)} service "
            f"ports, {len(cur.stats)}/{cur.stats_capacity} counter pairs  "
            f"(rates over {secs:.1f}s; latency over the last {cur.taken_at - window.taken_at:.1f}s"
            f", * = since load)", HEADER]
    body = [line for _o, lines in rows for line in lines] or ["  (no services in the kernel maps)"]
    if max_lines is not None and len(head) + len(body) > max_lines:
        cut = max(max_lines - len(head) - 1, 0)
        body = body[:cut] + [f"  ... {len(body) - cut} more lines (widen the terminal)"]
    return "\n".join(head + body)


def _identity_labels(cfg: Config) -> dict:
    """identity id (str) -> its selectors, as the daemon's status file last told them."""
    import json
    from meshd.agent.status import status_path
    try:
        return json.loads(status_path(cfg).read_text()).get("identities") or {}
    except (OSError, ValueError):
        return {}


def main(cfg: Config, interval: float = 1.0, once: bool = False) -> int:
    """Refreshes every `interval` seconds until Ctrl-C; with `once`, prints one frame
    (rates over `interval`) and returns. Exit 1 with a one-line reason if the instance has
    no pinned data plane."""
    source = KernelSource(cfg.bpffs, cfg.instance)
    title = f"instance {cfg.instance}"
    try:
        first = source.snapshot()
        history: deque[Snapshot] = deque([first])
        while True:
            time.sleep(interval)
            cur = source.snapshot()
            while len(history) > 1 and cur.taken_at - history[1].taken_at >= WINDOW_S:
                history.popleft()
            labels = _identity_labels(cfg)
            if once:
                print(render(history[-1], cur, history[0], title=title, labels=labels))
                return 0
            rows = shutil.get_terminal_size((160, 40)).lines
            sys.stdout.write(CLEAR + render(history[-1], cur, history[0], rows - 1, title,
                                            labels) + "\n")
            sys.stdout.flush()
            history.append(cur)
    except MeshdError as e:
        print(f"meshd top: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
