"""`meshd observe`: the connection events of a running daemon, one line each (or JSON).

The daemon serves its event stream on a unix socket
(`<state_dir>/<instance>/events/observe.sock`, root only: directory 0700, socket 0600;
meshd/agent/events.py). A client sends one JSON line, the request:

    {"follow": true, "since": 300.0, "filter": {"service": "default/db", "verdict": "denied",
     "identity": "web.service", "type": "closed"}}

and reads JSON lines back: the kept events newer than `since` seconds that match, then (with
`follow`) every new one as it happens. A line {"lost": N} says N events were not sent to
this client because it read too slowly (the daemon never blocks on a client).

Everything but the socket I/O is pure: `matches` (the filters, applied by the daemon) and
`format_line` (the readable form) are unit-tested.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

TYPES = ("connect", "denied", "failed", "closed")
VERDICTS = ("allowed", "denied")


def socket_path(cfg) -> Path:
    """In a directory of its own (0700), so the rest of the instance's state dir (the status
    file) keeps its own permissions."""
    return Path(cfg.state_dir) / cfg.instance / "events" / "observe.sock"


def parse_since(text: str | None) -> float | None:
    """"90", "90s", "5m", "2h" -> seconds; None -> None."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise ValueError(f"--since {text!r}: expected a duration such as 30s, 5m or 2h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _service_matches(want: str, ev: dict) -> bool:
    svc = ev.get("service") or ""
    # "ns/name" matches every port of it; "ns/name:port" one port; "name" any namespace
    base = svc.split(":", 1)[0]
    return want in (svc, base) or ("/" not in want and base.split("/", 1)[-1] == want)


def _identity_matches(want: str, ev: dict) -> bool:
    cg = ev.get("cgroup") or ""
    return (want == str(ev.get("identity_id")) or want == ev.get("identity")
            or want in (ev.get("selectors") or ()) or cg == want
            or cg.rstrip("/").rsplit("/", 1)[-1] == want
            or (want.endswith("/") and cg.startswith(want)))


def matches(ev: dict, flt: dict) -> bool:
    """Whether one event (the daemon's JSON form) passes the request's filters."""
    if flt.get("type") and ev.get("type") != flt["type"]:
        return False
    if flt.get("verdict") and ev.get("verdict") != flt["verdict"]:
        return False
    if flt.get("service") and not _service_matches(flt["service"], ev):
        return False
    if flt.get("identity") and not _identity_matches(flt["identity"], ev):
        return False
    return True


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def format_line(ev: dict) -> str:
    """One readable line, like `hubble observe`."""
    t = time.strftime("%b %d %H:%M:%S", time.localtime(ev["time"]))
    t += f".{int(ev['time'] * 1000) % 1000:03d}"
    who = f"{ev.get('comm') or '?'}[{ev.get('pid')}] uid {ev.get('uid')}"
    who += f" {ev.get('cgroup') or '(cgroup ' + str(ev.get('cgroup_id')) + ')'}"
    to = f"{ev.get('service') or '?'} {ev.get('frontend') or ''}".rstrip()
    line = f"{t} {ev['type'].upper():7} {who} -> {to}"
    if ev.get("backend"):
        line += f" => {ev['backend']}"
    if ev["type"] == "denied":
        line += f"  DENIED by {ev['policy']}" if ev.get("policy") else \
            "  DENIED (no policy allows it)"
    elif ev["type"] == "failed":
        line += f"  {ev.get('error') or 'failed'}"
        if ev.get("duration_ms") is not None:
            line += f" after {ev['duration_ms']:.1f} ms"
    elif ev["type"] == "closed":
        line += f"  {ev.get('duration_ms', 0):.1f} ms, sent {_bytes(ev.get('tx_bytes', 0))}," \
                f" received {_bytes(ev.get('rx_bytes', 0))}"
        if ev.get("error"):
            line += f" ({ev['error']})"
    if ev.get("sendmsg"):
        line += "  [sendmsg]"
    return line


def stream(path: Path, request: dict, timeout: float | None = None) -> Iterator[dict]:
    """Connects to the daemon's observe socket and yields its JSON lines."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except FileNotFoundError:
        raise ConnectionError(f"no observe socket at {path}: is `meshd run` running with this "
                              "config (same state_dir and instance)?") from None
    except PermissionError:
        raise ConnectionError(f"{path}: permission denied; the event stream is root only "
                               "(run as root)") from None
    except OSError as e:
        raise ConnectionError(f"cannot connect to {path}: {e.strerror or e}; is the daemon "
                              "running?") from None
    s.settimeout(timeout)
    with s:
        s.sendall(json.dumps(request).encode() + b"\n")
        f = s.makefile("rb")
        for raw in f:
            yield json.loads(raw)


def cmd_observe(args, cfg) -> int:
    try:
        since = parse_since(args.since)
    except ValueError as e:
        print(f"meshd observe: {e}", file=sys.stderr)
        return 2
    flt = {k: v for k, v in (("service", args.service), ("verdict", args.verdict),
                             ("identity", args.identity), ("type", args.type)) if v}
    follow = not args.no_follow
    req = {"follow": follow, "since": since if since is not None else (None if follow else 1e9),
           "filter": flt}
    shown = 0
    try:
        for ev in stream(socket_path(cfg), req):
            if "lost" in ev:
                print(f"meshd observe: {ev['lost']} events not shown (this client read too "
                      "slowly)", file=sys.stderr)
                continue
            if "error" in ev and "type" not in ev:
                print(f"meshd observe: {ev['error']}", file=sys.stderr)
                return 1
            print(json.dumps(ev, sort_keys=True) if args.json else format_line(ev), flush=True)
            shown += 1
            if args.count and shown >= args.count:
                break
    except ConnectionError as e:
        print(f"meshd observe: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        pass
    return 0


def add_parser(sub, config_of) -> None:
    o = sub.add_parser("observe", help="follow connection events (connects, denials, failures, "
                       "closes) of the running daemon")
    o.add_argument("--config", "-c")
    o.set_defaults(fn=lambda args: cmd_observe(args, config_of(args)))
    o.add_argument("--json", action="store_true", help="one JSON object per line")
    o.add_argument("--service", help="NS/NAME, NS/NAME:PORT or NAME")
    o.add_argument("--verdict", choices=VERDICTS)
    o.add_argument("--type", choices=TYPES)
    o.add_argument("--identity", help="cgroup path, unit name, identity label or id")
    o.add_argument("--since", help="also show kept events this old: 30s, 5m, 2h")
    o.add_argument("--no-follow", action="store_true",
                   help="print the kept events (all, or --since) and exit")
    o.add_argument("-n", "--count", type=int, default=0, help="exit after N events")
