"""Typed errors. Every error meshd raises to a user says what failed and what to do.

    MeshdError
     ├── ConfigError      bad config file or key (names the key and the fix)
     ├── RecordError      one bad service record (names its key/position and the reason)
     ├── RegistryError    a registry (etcd, file) could not be read
     ├── DataplaneError   the kernel side could not be set up or changed
     │    ├── BpfError    one libbpf/bpf() call failed: errno, operation, object
     │    ├── LibbpfMissing   libbpf.so.1 (or a function meshd needs) is not on this host
     │    └── KernelFeatureMissing   the running kernel lacks something meshd needs
     └── LabError         the netns lab could not be built or torn down
"""

from __future__ import annotations

import errno as _errno
import os


class MeshdError(Exception):
    """Base of every error meshd raises on purpose."""


class ConfigError(MeshdError):
    pass


class RecordError(MeshdError):
    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


class RegistryError(MeshdError):
    pass


class DataplaneError(MeshdError):
    pass


_HINTS = {
    _errno.EPERM: "run as root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN are needed)",
    _errno.EACCES: "the verifier or an LSM refused it; see the libbpf log above",
    _errno.E2BIG: "the map is full; raise its size or remove entries",
    _errno.ENOSPC: "the map is full; raise its size or remove entries",
    _errno.ENOENT: "the object does not exist (not pinned, not loaded, or already removed)",
    _errno.EEXIST: "it already exists; run `meshd cleanup` for this instance if it is stale",
    _errno.ENOMEM: "the kernel is out of memory for BPF maps; lower maglev.max_table_size (or a fixed maglev.table_size) or map sizes",
}


class BpfError(DataplaneError):
    """A libbpf or bpf() call failed. `.errno` is the positive errno."""

    def __init__(self, err: int, op: str, obj: str = ""):
        self.errno = abs(err)
        self.op = op
        self.obj = obj
        self.done = 0  # batch calls: entries processed before the failure
        what = f"{op}({obj})" if obj else op
        msg = f"{what} failed: {os.strerror(self.errno)} [errno {self.errno}]"
        hint = _HINTS.get(self.errno)
        if hint:
            msg += f" — {hint}"
        super().__init__(msg)


class LibbpfMissing(DataplaneError):
    """libbpf.so.1 cannot be loaded, or lacks a function meshd calls."""


class KernelFeatureMissing(DataplaneError):
    """The running kernel lacks a feature meshd needs (names it and the kernel version)."""


class LabError(MeshdError):
    pass
