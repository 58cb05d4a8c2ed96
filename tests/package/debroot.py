"""A Debian 12 root for the package test: a chroot that shares this kernel, with /proc, a
fresh sysfs, cgroup2 (bind of /sys/fs/cgroup/unified, on a tmpfs at /sys/fs/cgroup) and
bpffs (bind of /sys/fs/bpf) mounted inside. close() kills the processes running in it (by
PID: those whose root is this directory), unmounts, and removes the files -- only once no
mount is left under it, and never across a file system boundary."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from testlib import BPFFS, CGROUP2

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class DebRoot:
    def __init__(self, path: Path):
        self.path = path
        self.mounted: list[Path] = []

    def _mount(self, target: str, *args: str) -> None:
        where = self.path / target.lstrip("/")
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", *args, str(where)], check=True, capture_output=True)
        self.mounted.append(where)

    def mount(self) -> None:
        self._mount("/proc", "-t", "proc", "proc")
        self._mount("/sys", "-t", "sysfs", "sysfs")
        self._mount("/sys/fs/cgroup", "-t", "tmpfs", "-o", "mode=755", "tmpfs")
        self._mount(str(CGROUP2), "--bind", str(CGROUP2))
        self._mount(str(BPFFS), "--bind", str(BPFFS))

    def file(self, path: str) -> Path:
        return self.path / path.lstrip("/")

    def run(self, *argv: str, check: bool = True, timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """argv inside the root, with a clean environment (as an administrator's shell)."""
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        r = subprocess.run(["chroot", str(self.path), "env", "-i", f"PATH={PATH}",
                            "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive", *extra, *argv],
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"in the Debian root: {' '.join(argv)} exited {r.returncode}"
                                 f"\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}{self.daemon_log()}")
        return r

    def daemon_log(self, n: int = 40) -> str:
        """The last lines the daemon wrote (systemctl_shim.py keeps them in /run/meshd.out)."""
        try:
            lines = self.file("/run/meshd.out").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\nmeshd output (last lines):\n" + "\n".join(lines[-n:])

    def pids(self) -> list[int]:
        """Processes whose root directory is this root (the daemon, its etcd, ...)."""
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if os.readlink(d / "root") == str(self.path):
                        out.append(int(d.name))
                except OSError:
                    pass
        return out

    def kill_all(self) -> list[int]:
        pids = self.pids()
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + wait
            while self.pids() and time.monotonic() < end:
                time.sleep(0.1)
            if not self.pids():
                break
            pids = self.pids()
        return pids

    def _mounts_below(self) -> list[str]:
        prefix = str(self.path) + "/"
        with open("/proc/self/mounts") as f:
            return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]

    def close(self) -> None:
        self.kill_all()
        for where in reversed(self.mounted):
            r = subprocess.run(["umount", str(where)], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True)
        left = self._mounts_below()
        if left:  # never delete through a bind mount of the host's bpffs or cgroup2
            raise AssertionError(f"mounts left under {self.path}, not removing it: {left}")
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.path)], check=True)
