"""Traffic agent of the netns lab: a tiny name-echo server and its clients.

Runs inside lab namespaces, so it uses the standard library only and can be
started either as ``python -m netns_lab.agent`` or as ``python .../agent.py``.

Server::

    serve --name b1 --port 8080 [--udp]

  TCP (and with ``--udp`` UDP) on ``::`` dual stack (IPV6_V6ONLY=0, falls back
  to ``0.0.0.0`` when the kernel has no IPv6).  Every TCP line and every UDP
  datagram is answered with ``NAME`` (TCP: ``NAME\\n``).  Exits 0 on SIGTERM.

Clients (each prints ONE JSON object on stdout; every loop is bounded in count
and time; errors are counted by errno name, never raised)::

    tcp      --addr A --port P --count N [--timeout S] [--hold]
    udp      --addr A --port P --count N [--connected|--unconnected] [--timeout S]
    rr       --addr A --port P --duration S --max N [--timeout S]
    connrate --addr A --port P --duration S --max N [--timeout S]
             (rr and connrate stop early on SIGTERM and still print their result)
    wait     --target ADDR,PORT,NAME ... [--udp] [--deadline S]

Error names are errno names (``ENETUNREACH``, ``ECONNREFUSED``, ``ETIMEDOUT``
for socket timeouts, ...) plus ``EOF`` when the peer closed without replying.
Latency lists are ``[p50, p99]`` in microseconds, ``[null, null]`` without
samples.  ``A`` may be IPv4, IPv6 or IPv4-mapped IPv6 (``::ffff:10.96.0.10``,
which uses an AF_INET6 socket).  Peers print as ``ip:port`` / ``[ip]:port``.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import math
import signal
import socket
import statistics
import struct
import sys
import threading
import time
from collections import Counter
from typing import Any

REQUEST = b"hi\n"


# ---------------------------------------------------------------- helpers


def family_of(addr: str) -> int:
    """AF_INET for an IPv4 literal, AF_INET6 for IPv6 (including ::ffff:a.b.c.d)."""
    ip = ipaddress.ip_address(addr.strip("[]"))
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


def fmt_addr(sa: tuple[Any, ...]) -> str:
    """Format a sockaddr tuple as ``ip:port`` (v4) or ``[ip]:port`` (v6)."""
    host, port = sa[0], sa[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def err_name(exc: BaseException) -> str:
    """Errno name of an OSError (socket timeouts count as ETIMEDOUT)."""
    if isinstance(exc, (socket.timeout, TimeoutError)) and not getattr(exc, "errno", None):
        return "ETIMEDOUT"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, f"E{exc.errno}")
    return type(exc).__name__


def pct(samples: list[float]) -> list[int | None]:
    """[p50, p99] (nearest rank) of microsecond samples."""
    if not samples:
        return [None, None]
    s = sorted(samples)

    def rank(p: float) -> int:
        return int(round(s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))]))

    return [rank(0.50), rank(0.99)]


def recv_line(sock: socket.socket, buf: bytearray) -> bytes:
    """Read one line (without newline); raise EOFError if the peer closed first."""
    while True:
        nl = buf.find(b"\n")
        if nl >= 0:
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            return line
        chunk = sock.recv(4096)
        if not chunk:
            if buf:
                line = bytes(buf)
                buf.clear()
                return line
            raise EOFError
        buf += chunk


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- server


def _listen(kind: int, port: int) -> socket.socket:
    try:
        s = socket.socket(socket.AF_INET6, kind)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        bind: tuple[Any, ...] = ("::", port)
    except OSError:  # kernel without IPv6
        s = socket.socket(socket.AF_INET, kind)
        bind = ("0.0.0.0", port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(bind)
    if kind == socket.SOCK_STREAM:
        s.listen(1024)
    return s


def _tcp_conn(conn: socket.socket, reply: bytes) -> None:
    try:
        with conn:
            buf = bytearray()
            while True:
                try:
                    recv_line(conn, buf)
                except EOFError:
                    return
                conn.sendall(reply + b"\n")
    except OSError:
        return


def _tcp_loop(lsock: socket.socket, reply: bytes, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            conn, _ = lsock.accept()
        except OSError:
            if stop.is_set():
                return
            time.sleep(0.01)
            continue
        threading.Thread(target=_tcp_conn, args=(conn, reply), daemon=True).start()


def _sink_loop(lsock: socket.socket, stop: threading.Event) -> None:
    """Accept and close at once, in this thread: a connect-only client is never held up by
    the server (a thread per connection falls behind and the accept queue overflows)."""
    while not stop.is_set():
        try:
            conn, _ = lsock.accept()
            conn.close()
        except OSError:
            if stop.is_set():
                return
            time.sleep(0.01)


def _udp_loop(usock: socket.socket, reply: bytes, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            _, peer = usock.recvfrom(65535)
            usock.sendto(reply, peer)
        except OSError:
            if stop.is_set():
                return
            time.sleep(0.01)


def serve(name: str, port: int, udp: bool, sink_port: int | None = None) -> int:
    """Serve until SIGTERM/SIGINT; return the exit code. ``sink_port``: also accept and
    close TCP connections there (for connect-only clients)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    reply = name.encode()
    socks = [_listen(socket.SOCK_STREAM, port)]
    threading.Thread(target=_tcp_loop, args=(socks[0], reply, stop), daemon=True).start()
    if udp:
        socks.append(_listen(socket.SOCK_DGRAM, port))
        threading.Thread(target=_udp_loop, args=(socks[-1], reply, stop), daemon=True).start()
    if sink_port:
        socks.append(_listen(socket.SOCK_STREAM, sink_port))
        threading.Thread(target=_sink_loop, args=(socks[-1], stop), daemon=True).start()
    print(f"agent {name} listening on port {port} tcp{'+udp' if udp else ''}", flush=True)
    while not stop.wait(0.5):
        pass
    for s in socks:
        try:
            s.close()
        except OSError:
            pass
    return 0


# ---------------------------------------------------------------- clients


def tcp_client(addr: str, port: int, count: int, timeout: float, hold: bool) -> dict[str, Any]:
    """N sequential connections; with ``hold`` all stay open until the end."""
    fam = family_of(addr)
    by: Counter[str] = Counter()
    errs: Counter[str] = Counter()
    peers: dict[str, None] = {}
    connect_us: list[float] = []
    held: list[socket.socket] = []
    deadline = time.monotonic() + max(timeout * count, 1.0) + 5.0
    for _ in range(count):
        if time.monotonic() > deadline:
            errs["EDEADLINE"] += 1
            break
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            t0 = time.perf_counter()
            s.connect((addr, port))
            connect_us.append((time.perf_counter() - t0) * 1e6)
            peers[fmt_addr(s.getpeername())] = None
            s.sendall(REQUEST)
            by[recv_line(s, bytearray()).decode(errors="replace")] += 1
        except EOFError:
            errs["EOF"] += 1
        except OSError as e:
            errs[err_name(e)] += 1
        if hold:
            held.append(s)
        else:
            s.close()
    for s in held:
        s.close()
    return {"by_backend": dict(by), "errors": dict(errs), "peers": list(peers),
            "connect_us": pct(connect_us), "count": count}


def udp_client(addr: str, port: int, count: int, timeout: float, connected: bool) -> dict[str, Any]:
    """One new socket per exchange (connected or unconnected)."""
    fam = family_of(addr)
    by: Counter[str] = Counter()
    errs: Counter[str] = Counter()
    peers: dict[str, None] = {}
    sources: dict[str, None] = {}
    connect_us: list[float] = []
    rtt_us: list[float] = []
    deadline = time.monotonic() + max(timeout * count, 1.0) + 5.0
    for _ in range(count):
        if time.monotonic() > deadline:
            errs["EDEADLINE"] += 1
            break
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            try:
                t0 = time.perf_counter()
                if connected:
                    s.connect((addr, port))
                    connect_us.append((time.perf_counter() - t0) * 1e6)
                    peers[fmt_addr(s.getpeername())] = None
                    s.send(REQUEST)
                else:
                    s.sendto(REQUEST, (addr, port))
                data, src = s.recvfrom(65535)
                rtt_us.append((time.perf_counter() - t0) * 1e6)
                sources[fmt_addr(src)] = None
                by[data.decode(errors="replace").strip()] += 1
            except OSError as e:
                errs[err_name(e)] += 1
    return {"by_backend": dict(by), "errors": dict(errs), "peers": list(peers),
            "sources": list(sources), "connect_us": pct(connect_us),
            "rtt_us": pct(rtt_us), "count": count}


# Set by SIGTERM in the timed clients (rr, connrate): stop at the next loop turn and still
# print the result, so a test can end a load it started "until the fault is over".
STOP = threading.Event()


def rr_client(addr: str, port: int, duration: float, limit: int, timeout: float) -> dict[str, Any]:
    """Request/response on one persistent TCP connection."""
    errs: Counter[str] = Counter()
    rtts: list[float] = []
    backend = None
    end = time.monotonic() + duration
    try:
        with socket.socket(family_of(addr), socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect((addr, port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = bytearray()
            while len(rtts) < limit and time.monotonic() < end and not STOP.is_set():
                t0 = time.perf_counter()
                s.sendall(REQUEST)
                backend = recv_line(s, buf).decode(errors="replace")
                rtts.append((time.perf_counter() - t0) * 1e6)
    except EOFError:
        errs["EOF"] += 1
    except OSError as e:
        errs[err_name(e)] += 1
    return {"rtt_us": pct(rtts), "count": len(rtts), "backend": backend, "errors": dict(errs)}


def connrate_client(addr: str, port: int, duration: float, limit: int, timeout: float) -> dict[str, Any]:
    """As many sequential connect/request/close cycles as fit in ``duration``."""
    fam = family_of(addr)
    errs: Counter[str] = Counter()
    by: Counter[str] = Counter()
    connect_us: list[float] = []
    n = 0
    start = time.monotonic()
    end = start + duration
    while n + sum(errs.values()) < limit and time.monotonic() < end and not STOP.is_set():
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                t0 = time.perf_counter()
                s.connect((addr, port))
                connect_us.append((time.perf_counter() - t0) * 1e6)
                s.sendall(REQUEST)
                by[recv_line(s, bytearray()).decode(errors="replace")] += 1
                n += 1
                # Close with RST: thousands of sequential connections to one address would
                # otherwise fill the port range with TIME_WAIT and measure port search.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except EOFError:
                errs["EOF"] += 1
            except OSError as e:
                errs[err_name(e)] += 1
    elapsed = max(time.monotonic() - start, 1e-9)
    return {"count": n, "per_sec": round(n / elapsed, 1), "connect_us": pct(connect_us),
            "errors": dict(errs), "by_backend": dict(by)}


def connect_client(targets: list[tuple[str, int]], duration: float, limit: int,
                   timeout: float) -> dict[str, Any]:
    """Connect-only: as many sequential new socket / connect() / close cycles as fit in
    ``duration`` (nothing sent: the server accepts and sees the close). With several
    targets, each cycle goes to the next one in turn, so drift (CPU frequency, neighbours)
    hits them alike and their p50s compare within one run. What a VIP costs on top of a
    direct connect shows here undiluted by a request/reply."""
    errs: Counter[str] = Counter()
    samples: list[list[float]] = [[] for _ in targets]
    fams = [family_of(a) for a, _ in targets]
    linger = struct.pack("ii", 1, 0)
    n = 0
    start = time.monotonic()
    end = start + duration
    while n + sum(errs.values()) < limit and time.monotonic() < end and not STOP.is_set():
        i = n % len(targets)
        with socket.socket(fams[i], socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                t0 = time.perf_counter()
                s.connect(targets[i])
                samples[i].append((time.perf_counter() - t0) * 1e6)
                n += 1
                # close with RST, as connrate: no TIME_WAIT piling up in the port range
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            except OSError as e:
                errs[err_name(e)] += 1
    elapsed = max(time.monotonic() - start, 1e-9)
    per = [{"addr": f"{a}:{p}", "count": len(x), "connect_us": pct(x),
            "p50_us": round(statistics.median(x), 2) if x else None}
           for (a, p), x in zip(targets, samples)]
    return {"count": n, "per_sec": round(n / elapsed, 1), "connect_us": per[0]["connect_us"],
            "p50_us": per[0]["p50_us"], "targets": per, "errors": dict(errs)}


def wait_ready(targets: list[str], udp: bool, deadline_s: float) -> dict[str, Any]:
    """Poll each ``addr,port,name`` target until it answers its name (bounded)."""
    pending = {t: t.rsplit(",", 2) for t in targets}
    last_err: dict[str, str] = {}
    end = time.monotonic() + deadline_s
    while pending and time.monotonic() < end:
        for t, (addr, port, name) in list(pending.items()):
            res = tcp_client(addr, int(port), 1, 0.3, False)
            ok = res["by_backend"].get(name) == 1
            if ok and udp:
                res = udp_client(addr, int(port), 1, 0.3, True)
                ok = res["by_backend"].get(name) == 1
            if ok:
                del pending[t]
            else:
                last_err[t] = json.dumps(res["errors"] or res["by_backend"])
        if pending:
            time.sleep(0.05)
    return {"ready": not pending, "pending": {t: last_err.get(t, "") for t in pending}}


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netns_lab.agent", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def target(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--addr", required=True)
        sp.add_argument("--port", type=int, required=True)
        sp.add_argument("--timeout", type=float, default=1.0, help="per-operation timeout (s)")

    s = sub.add_parser("serve", help="name-echo server (TCP, optional UDP)")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--udp", action="store_true")
    s.add_argument("--sink-port", type=int, help="also accept-and-close TCP on this port")

    t = sub.add_parser("tcp", help="N sequential TCP connections")
    target(t)
    t.add_argument("--count", type=int, default=1)
    t.add_argument("--hold", action="store_true", help="keep every connection open until the end")

    u = sub.add_parser("udp", help="N UDP exchanges, a new socket each")
    target(u)
    u.add_argument("--count", type=int, default=1)
    mode = u.add_mutually_exclusive_group()
    mode.add_argument("--connected", dest="connected", action="store_true", default=True)
    mode.add_argument("--unconnected", dest="connected", action="store_false")

    for name, hlp in (("rr", "request/response latency on one connection"),
                      ("connrate", "sequential new connections per second"),
                      ("connect", "sequential connect()-only cycles (connect, close)")):
        r = sub.add_parser(name, help=hlp)
        target(r)
        r.add_argument("--duration", type=float, default=1.0)
        r.add_argument("--max", type=int, default=100000)
        if name == "connect":
            r.add_argument("--also", action="append", metavar="ADDR,PORT",
                           help="another target; cycles go to each target in turn")

    w = sub.add_parser("wait", help="wait until servers answer their names")
    w.add_argument("--target", action="append", required=True, help="ADDR,PORT,NAME")
    w.add_argument("--udp", action="store_true")
    w.add_argument("--deadline", type=float, default=5.0)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cmd == "serve":
        return serve(a.name, a.port, a.udp, a.sink_port)
    if a.cmd in ("rr", "connrate", "connect"):
        signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    if a.cmd == "tcp":
        emit(tcp_client(a.addr, a.port, a.count, a.timeout, a.hold))
    elif a.cmd == "udp":
        emit(udp_client(a.addr, a.port, a.count, a.timeout, a.connected))
    elif a.cmd == "rr":
        emit(rr_client(a.addr, a.port, a.duration, a.max, a.timeout))
    elif a.cmd == "connrate":
        emit(connrate_client(a.addr, a.port, a.duration, a.max, a.timeout))
    elif a.cmd == "connect":
        targets = [(a.addr, a.port)] + [(x.rsplit(",", 1)[0], int(x.rsplit(",", 1)[1]))
                                         for x in a.also or ()]
        emit(connect_client(targets, a.duration, a.max, a.timeout))
    elif a.cmd == "wait":
        res = wait_ready(a.target, a.udp, a.deadline)
        emit(res)
        return 0 if res["ready"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
