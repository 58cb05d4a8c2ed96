#!/usr/bin/python3
"""A stand-in for `systemctl` inside the package test's Debian root, where no systemd runs
(a chroot shares the host's PID 1, which the test must never touch). The test diverts the
root's /usr/bin/systemctl (dpkg-divert) and puts this in its place, so the package's
maintainer scripts (deb-systemd-invoke, deb-systemd-helper) call it exactly as they call
systemctl on a VM. Calls on unit files (--root=, preset, is-enabled, enable, disable) go to
the real systemctl, which does them offline; for meshd.service this does what systemd would
do, in the parts the test checks:

  start         runs the unit's own ExecStart= (with the unit's and drop-ins' Environment=,
                StateDirectory=), and returns once the daemon sent READY=1 on NOTIFY_SOCKET
                (Type=notify), at most TimeoutStartSec
  stop          SIGTERM to the main PID (KillSignal=), SIGKILL after TimeoutStopSec
  restart, try-restart, is-active, enable --now, daemon-reload (nothing to reload)

Every call is appended to /run/systemctl-shim.log; the main PID is in /run/meshd.pid.
"""

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REAL = "/usr/bin/systemctl.distrib"  # dpkg-divert --rename
UNIT = "meshd.service"
UNIT_FILE = Path("/lib/systemd/system") / UNIT
DROPINS = Path("/etc/systemd/system") / f"{UNIT}.d"
PIDFILE = Path("/run/meshd.pid")
LOG = Path("/run/systemctl-shim.log")
OUT = Path("/run/meshd.out")


def settings() -> list[tuple[str, str]]:
    files = [UNIT_FILE] + sorted(DROPINS.glob("*.conf")) if DROPINS.is_dir() else [UNIT_FILE]
    out = []
    for f in files:
        for line in f.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
                k, v = line.split("=", 1)
                out.append((k.strip(), v.strip()))
    return out


def value(key: str, default: str = "") -> str:
    vals = [v for k, v in settings() if k == key]
    return vals[-1] if vals else default


def main_pid() -> int | None:
    try:
        pid = int(PIDFILE.read_text())
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError):
        return None
    return None if state == "Z" else pid


def start() -> int:
    if main_pid():
        return 0
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C.UTF-8"}
    for k, v in settings():
        if k == "Environment":
            env.update(dict(kv.split("=", 1) for kv in shlex.split(v)))
    for d in value("StateDirectory").split():
        Path("/var/lib", d).mkdir(parents=True, exist_ok=True)
    sock_path = "/run/meshd-notify.sock"
    Path(sock_path).unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(sock_path)
    env["NOTIFY_SOCKET"] = sock_path
    with open(OUT, "ab") as out:
        proc = subprocess.Popen(shlex.split(value("ExecStart")), env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
    PIDFILE.write_text(str(proc.pid))
    end = time.monotonic() + float(value("TimeoutStartSec", "90"))
    notify.settimeout(0.5)
    while time.monotonic() < end:
        if proc.poll() is not None:
            print(f"{UNIT}: main process exited {proc.returncode} before READY=1", file=sys.stderr)
            return 1
        try:
            if b"READY=1" in notify.recv(4096).split(b"\n"):
                return 0
        except TimeoutError:
            pass
    print(f"{UNIT}: no READY=1 within TimeoutStartSec", file=sys.stderr)
    return 1


def stop() -> int:
    pid = main_pid()
    if pid is None:
        return 0
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + float(value("TimeoutStopSec", "90"))
    while main_pid() == pid and time.monotonic() < end:
        time.sleep(0.05)
    if main_pid() == pid:
        os.kill(pid, signal.SIGKILL)
    PIDFILE.unlink(missing_ok=True)
    return 0


def main(argv: list[str]) -> int:
    with open(LOG, "a") as f:
        f.write(" ".join(argv) + "\n")
    words = [a for a in argv if not a.startswith("-")]
    cmd, units = (words[0], words[1:]) if words else ("", [])
    if any(a.startswith("--root") for a in argv) or cmd in ("preset", "is-enabled", "disable",
                                                           "mask", "unmask"):
        os.execv(REAL, [REAL, *(["--root=/"] if "--root" not in " ".join(argv) else []), *argv])
    if cmd == "enable":
        r = subprocess.run([REAL, "--root=/", *[a for a in argv if a != "--now"]])
        return start() if r.returncode == 0 and "--now" in argv else r.returncode
    units = [u if u.endswith(".service") else u + ".service" for u in units]
    if cmd == "daemon-reload":
        return 0
    if any(u != UNIT for u in units) or not units:
        print(f"systemctl (test stand-in): only {UNIT} is known: {argv}", file=sys.stderr)
        return 5
    if cmd == "is-active":
        active = main_pid() is not None
        if "--quiet" not in argv:
            print("active" if active else "inactive")
        return 0 if active else 3
    if cmd == "start":
        return start()
    if cmd == "stop":
        return stop()
    if cmd == "restart":
        stop()
        return start()
    if cmd == "try-restart":
        if main_pid() is None:
            return 0
        stop()
        return start()
    print(f"systemctl (test stand-in): {cmd} is not supported", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
