"""What meshd needs from the running kernel, and who meshd itself is.

When loading a BPF object fails, `explain()` turns the libbpf error into one line naming
what this kernel lacks (and the version that has it), if that is the reason:

    feature                               kernel   used by
    BTF (/sys/kernel/btf/vmlinux)         any with CONFIG_DEBUG_INFO_BTF=y: CO-RE in the
                                          sockops metrics and the UDP socket destroyer
    bpf_set_retval() in cgroup programs   5.18     connect() to a VIP without backends
                                                   fails with ECONNREFUSED
    bpf_sock_destroy() kfunc              6.5      destroying UDP sockets of removed backends
    bpf_get_ns_current_pid_tgid() in      6.10     the daemon's own sockets are never
    cgroup programs                                translated (on older kernels the loader
                                                   turns this off with a warning)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from meshd.errors import BpfError, DataplaneError, KernelFeatureMissing

BTF_PATH = Path("/sys/kernel/btf/vmlinux")

BTF = "BTF"
SET_RETVAL = "bpf_set_retval"
SOCK_DESTROY = "bpf_sock_destroy"
SELF_PID = "bpf_get_ns_current_pid_tgid"

MIN_VERSION = {SET_RETVAL: (5, 18), SOCK_DESTROY: (6, 5), SELF_PID: (6, 10)}
WHY = {
    BTF: "kernel BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF=y)",
    SET_RETVAL: "bpf_set_retval() in cgroup programs (kernel 5.18+)",
    SOCK_DESTROY: "the bpf_sock_destroy() kfunc (kernel 6.5+)",
    SELF_PID: "bpf_get_ns_current_pid_tgid() in cgroup programs (kernel 6.10+)",
}


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of `release` (default: the running kernel's uname -r)."""
    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def btf_available(path: Path = BTF_PATH) -> bool:
    try:
        return path.stat().st_size > 0 and os.access(path, os.R_OK)
    except OSError:
        return False


def missing(needs, release: str | None = None, btf: bool | None = None) -> list[str]:
    """Which of `needs` (feature names above) the kernel lacks."""
    have = kernel_version(release)
    out = []
    for need in needs:
        if need == BTF:
            if not (btf_available() if btf is None else btf):
                out.append(need)
        elif have < MIN_VERSION[need]:
            out.append(need)
    return out


def explain(err: BpfError, what: str, needs, release: str | None = None,
            btf: bool | None = None) -> Exception:
    """The error to raise for a failed load of `what`: KernelFeatureMissing in one line when
    the kernel lacks something of `needs`, else `err` itself."""
    lack = missing(needs, release, btf)
    if not lack:
        return err
    rel = release or os.uname().release
    return KernelFeatureMissing(
        f"cannot load {what}: this kernel ({rel}) lacks {'; '.join(WHY[n] for n in lack)} "
        f"-- run meshd on a kernel that has it ({os.strerror(err.errno)} from {err.op})")


def self_identity(pid: int) -> tuple[int, int, int]:
    """(pid namespace device as the kernel encodes dev_t, its inode, the process id inside
    it) of process `pid` (a pid of the caller's namespace): what BPF compares with
    bpf_get_ns_current_pid_tgid() to recognise that process's sockets."""
    try:
        st = os.stat(f"/proc/{pid}/ns/pid")
    except OSError as e:
        raise DataplaneError(f"meshd self: no process {pid} ({e.strerror})") from None
    dev = (os.major(st.st_dev) << 20) | os.minor(st.st_dev)  # kernel dev_t, not stat's
    tgid = pid
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NStgid:"):
                    tgid = int(line.split()[-1])  # innermost namespace: its own
                    break
    except OSError as e:
        raise DataplaneError(f"meshd self: cannot read /proc/{pid}/status: {e}") from None
    if tgid <= 0:
        raise DataplaneError(f"meshd self: process {pid} has no id in its pid namespace")
    return dev, st.st_ino, tgid
