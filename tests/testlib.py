"""Shared by the test layers (importable because pytest puts tests/ on sys.path)."""

import socket
from pathlib import Path

CGROUP2 = Path("/sys/fs/cgroup/unified")
BPFFS = Path("/sys/fs/bpf")
TEST_PREFIX = "mtest-"  # instance names, pin dirs and cgroups of kernel and lab tests
OWNERS = Path("/run/meshd-tests")


def free_ports(n: int) -> list[int]:
    """n distinct free loopback TCP ports (bound together, so they differ; released at return)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]  # <instance> -> "pid starttime" of the session using it


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def claim(instance: str) -> None:
    """Marks `instance` as in use by this process, so another session's sweep spares it."""
    import os
    OWNERS.mkdir(parents=True, exist_ok=True)
    (OWNERS / instance).write_text(f"{os.getpid()} {_start_time(os.getpid())}")


def release(instance: str) -> None:
    (OWNERS / instance).unlink(missing_ok=True)


def owner_alive(instance: str) -> bool:
    try:
        pid, start = (OWNERS / instance).read_text().split()
    except (OSError, ValueError):
        return False
    return _start_time(int(pid)) == start


def sweep_kernel_leftovers() -> list[str]:
    """Pins and cgroups of kernel/lab tests of a crashed run (by name prefix), sparing the
    instances of sessions that are still running."""
    from meshd.dataplane import loader
    removed = []
    pins = BPFFS / "meshd"
    if pins.is_dir():
        for d in pins.glob(TEST_PREFIX + "*"):
            if not owner_alive(d.name):
                removed += loader.remove(BPFFS, d.name)
                release(d.name)
    for cg in CGROUP2.glob(TEST_PREFIX + "*"):
        if not owner_alive(cg.name):
            try:
                cg.rmdir()
                removed.append(str(cg))
            except OSError:
                pass
    return removed


class SocketLB:
    """The data plane of one lab, driven by the same reconciler the daemon uses."""

    def __init__(self, lab, m: int = 1021):
        from meshd.dataplane import loader
        from meshd.dataplane.kernel import KernelDataplane
        from meshd.reconciler import Reconciler
        self.instance = TEST_PREFIX + lab.prefix
        claim(self.instance)
        self.maps = loader.load(BPFFS, self.instance, lab.cgroup, m)
        self.rec = Reconciler(KernelDataplane(self.maps))
        self.lab = lab

    def apply(self, *services: dict):
        from meshd.desired import desired_groups
        from meshd.model import parse_service
        parsed = [parse_service(s, where=s["name"]) for s in services]
        report = self.rec.apply(desired_groups(parsed))
        assert not report.errors, report.errors
        return report

    def close(self) -> None:
        from meshd.dataplane import loader
        self.maps.close()
        loader.remove(BPFFS, self.instance)
        release(self.instance)
