"""One daemon per instance: an exclusive flock on `<state_dir>/<instance>.lock`, held for the
process's life (the kernel drops it when the process dies, even by kill -9). Two daemons on one
instance would allocate colliding ids in the same pinned maps and misroute traffic."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from meshd.errors import MeshdError


class InstanceLocked(MeshdError):
    pass


def lock_path(state_dir: Path, instance: str) -> Path:
    return Path(state_dir) / f"{instance}.lock"


class InstanceLock:
    def __init__(self, state_dir: Path, instance: str):
        self.path = lock_path(state_dir, instance)
        self.instance = instance
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise InstanceLocked naming the holder's pid."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            # 0600 whatever the file was made with: a user who can open it can flock it and
            # keep meshd from starting
            os.fchmod(fd, 0o600)
        except OSError as e:
            raise InstanceLocked(f"cannot open the instance lock {self.path}: {e.strerror}; "
                                 "check state_dir and run meshd as root") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f"pid {holder}" if holder else "another process"
                raise InstanceLocked(
                    f"instance {self.instance!r} is already run by {who} (lock {self.path}); "
                    "two daemons on one instance would misroute traffic. Stop that one, or give "
                    "this one another `instance` (and cgroup)") from None
            raise InstanceLocked(f"cannot lock {self.path}: {e.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the pid stays in the file; the lock is what counts
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None
