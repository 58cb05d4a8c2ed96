"""The cgroups of this host, by path, and a watch on them (for authorization policies).

A cgroup is named by its path relative to the cgroup2 mount ('/' is the root, then
'/system.slice/web.service', ...) and identified, as the kernel's bpf_get_current_cgroup_id()
does, by the inode number of its directory (meshd.dataplane.loader.cgroup_id).

  scan(root) -> {path: id}           every cgroup at and below `root`, now
  CgroupWatcher(root, on_change)     keeps {path: id} current with inotify and calls
                                     on_change(added, removed) after each batch of events

A unit that starts after a policy is enforced because its cgroup is seen here as soon as
systemd makes it (mkdir -> IN_CREATE), before its first process can run in it; the caller
recompiles the policy tables (meshd.policy) and writes the new cgroup's identity.

The watcher puts one inotify watch on every cgroup directory (IN_CREATE and IN_DELETE of
subdirectories, IN_DELETE_SELF; moves too, though cgroup2 refuses rename(2) with EPERM). A new directory is watched first and scanned second, so
a subtree made before its watch existed is still seen; a lost event queue (IN_Q_OVERFLOW)
rescans everything. A directory that cannot be watched (fs.inotify.max_user_watches reached)
is still listed, but what appears below it later is not seen: `unwatched` counts them.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("meshd.cgroups")

IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x4000, 0x8000
IN_ONLYDIR, IN_ISDIR = 0x01000000, 0x40000000
WATCH_MASK = IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVED_FROM | IN_MOVED_TO | IN_ONLYDIR
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
_READ_SIZE = 64 * 1024
_READS_PER_POLL = 64  # bounded: a storm of events yields to the loop, the fd stays readable

OnChange = Callable[[dict[str, int], dict[str, int]], None]


def _join(parent: str, name: str) -> str:
    return "/" + name if parent == "/" else f"{parent}/{name}"


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def scan(root: Path) -> dict[str, int]:
    """Every cgroup at and below the cgroup2 mount `root`: {path relative to it: cgroup id}
    ('/' is `root` itself). A directory removed during the walk is left out."""
    top = os.fspath(root)
    out = {"/": os.stat(top).st_ino}
    stack = [(top, "/")]
    while stack:
        fs, rel = stack.pop()
        try:
            it = os.scandir(fs)
        except OSError:
            continue  # removed meanwhile
        with it:
            for e in it:
                try:
                    if not e.is_dir(follow_symlinks=False):
                        continue
                except OSError:
                    continue
                path = _join(rel, e.name)
                out[path] = e.inode()  # readdir's d_ino: the same inode number as stat's
                stack.append((e.path, path))
    return out


class CgroupWatcher:
    """Keeps `cgroups` ({path: id}, as scan gives it) current and reports each change.

        w = CgroupWatcher(Path("/sys/fs/cgroup"), on_change)
        now = w.start(loop)        # watches every cgroup; reads events on `loop` from now on
        ...                        # on_change(added, removed): {path: id} each; apply removed
        w.close()                  #   first (a path removed and made again is in both)

    Without a loop, call poll() when fileno() is readable (it never blocks)."""

    def __init__(self, root: Path, on_change: OnChange | None = None):
        self.root = os.fspath(root)
        self.on_change = on_change
        self.cgroups: dict[str, int] = {}
        self.unwatched = 0  # directories that could not be watched (max_user_watches)
        self.overflows = 0  # event queue overflows (each followed by a full rescan)
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wd: dict[int, str] = {}  # watch descriptor -> path
        self._path_wd: dict[str, int] = {}
        self._children: dict[str, set[str]] = {}
        self._before: dict[str, int | None] = {}  # paths changed in this batch -> id before it

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> dict[str, int]:
        """Open the inotify fd, watch every cgroup directory and return the cgroups (a copy).
        With `loop`, events are read there (loop.add_reader) and reported to on_change."""
        from meshd.dataplane.libbpf import inotify_init
        if self._fd is not None:
            raise RuntimeError("CgroupWatcher already started")
        self._fd = inotify_init(nonblock=True)
        try:
            self._add_tree("/")
        except BaseException:
            self.close()
            raise
        if "/" not in self.cgroups:
            self.close()
            raise FileNotFoundError(errno.ENOENT, f"cgroup2 directory {self.root} does not exist")
        self._before.clear()
        if loop is not None:
            self._loop = loop
            loop.add_reader(self._fd, self.poll)
        return dict(self.cgroups)

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("CgroupWatcher is not started")
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(fd)
            self._loop = None
        os.close(fd)
        self._wd.clear()
        self._path_wd.clear()

    # ---- events ---------------------------------------------------------------------------
    def poll(self) -> tuple[dict[str, int], dict[str, int]]:
        """Read the pending events (never blocks), update `cgroups`, call on_change if something
        changed; returns (added, removed)."""
        if self._fd is None:
            return {}, {}
        for _ in range(_READS_PER_POLL):
            try:
                buf = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            if not buf:
                break
            self._handle(buf)
        added, removed = self._batch()
        if (added or removed) and self.on_change is not None:
            try:
                self.on_change(added, removed)
            except Exception:  # the watch must go on: the next change reports again
                log.exception("cgroups: the change callback failed")
        return added, removed

    def _handle(self, buf: bytes) -> None:
        off, n = 0, len(buf)
        while off + _EVENT.size <= n:
            wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
            name = buf[off + _EVENT.size: off + _EVENT.size + length].split(b"\0", 1)[0]
            off += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                self.overflows += 1
                log.warning("cgroups: inotify queue overflowed; rescanning %s", self.root)
                self._rescan()
                continue
            if mask & IN_IGNORED:  # the watch is gone (its directory was removed, or we removed it)
                path = self._wd.pop(wd, None)
                if path is not None and self._path_wd.get(path) == wd:
                    del self._path_wd[path]
                continue
            parent = self._wd.get(wd)
            if parent is None:
                continue  # a watch already dropped (its directory removed or moved)
            if mask & IN_DELETE_SELF:
                self._remove_tree(parent, unwatch=False)
            elif mask & IN_ISDIR and name:
                path = _join(parent, os.fsdecode(name))
                if mask & (IN_CREATE | IN_MOVED_TO):
                    self._add_tree(path)
                elif mask & (IN_DELETE | IN_MOVED_FROM):
                    self._remove_tree(path, unwatch=bool(mask & IN_MOVED_FROM))

    def _batch(self) -> tuple[dict[str, int], dict[str, int]]:
        added: dict[str, int] = {}
        removed: dict[str, int] = {}
        for path, old in self._before.items():
            new = self.cgroups.get(path)
            if new != old:
                if old is not None:
                    removed[path] = old
                if new is not None:
                    added[path] = new
        self._before.clear()
        return added, removed

    # ---- the tree -------------------------------------------------------------------------
    def _fs(self, path: str) -> str:
        return self.root if path == "/" else self.root + path

    def _set(self, path: str, cg: int | None) -> None:
        if path not in self._before:
            self._before[path] = self.cgroups.get(path)
        if cg is None:
            self.cgroups.pop(path, None)
            if path != "/":
                kids = self._children.get(_parent(path))
                if kids is not None:
                    kids.discard(path)
        else:
            self.cgroups[path] = cg
            if path != "/":
                self._children.setdefault(_parent(path), set()).add(path)

    def _watch(self, path: str) -> int | None:
        """Watch one directory; None if it is gone (ENOENT) or cannot be watched."""
        from meshd.dataplane.libbpf import inotify_add_watch
        assert self._fd is not None
        try:
            wd = inotify_add_watch(self._fd, self._fs(path), WATCH_MASK)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            if self.unwatched == 0:
                log.warning("cgroups: cannot watch %s (%s): cgroups made below it later are not "
                            "seen; raise fs.inotify.max_user_watches", self._fs(path), e.strerror)
            self.unwatched += 1
            return -1
        old = self._path_wd.get(path)
        if old is not None and old != wd:
            self._wd.pop(old, None)
        self._wd[wd] = path
        self._path_wd[path] = wd
        return wd

    def _add_tree(self, top: str) -> None:
        """Watch `top` and every directory below it, then list them (watch first: nothing made
        meanwhile is missed; what both the list and an event report is recorded once)."""
        stack = [top]
        while stack:
            path = stack.pop()
            wd = self._watch(path)
            if wd is None:
                continue
            fs = self._fs(path)
            try:
                cg = os.stat(fs).st_ino
                it = os.scandir(fs)
            except OSError:
                continue  # removed meanwhile: its IN_DELETE follows
            self._set(path, cg)
            with it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(_join(path, e.name))
                    except OSError:
                        continue

    def _remove_tree(self, top: str, unwatch: bool) -> None:
        """Forget `top` and everything below it (a removed directory's watch goes by itself;
        a moved one's is removed, and its new place watched again on IN_MOVED_TO)."""
        from meshd.dataplane.libbpf import inotify_rm_watch
        stack = [top]
        while stack:
            path = stack.pop()
            stack.extend(self._children.pop(path, ()))
            wd = self._path_wd.pop(path, None)
            if wd is not None:
                self._wd.pop(wd, None)
                if unwatch and self._fd is not None:
                    try:
                        inotify_rm_watch(self._fd, wd)
                    except OSError:
                        pass  # already gone
            self._set(path, None)

    def _rescan(self) -> None:
        now = scan(Path(self.root)) if os.path.isdir(self.root) else {}
        for path in [p for p in self.cgroups if p not in now or now[p] != self.cgroups[p]]:
            if path in self.cgroups:
                self._remove_tree(path, unwatch=True)
        for path in sorted(now):
            if path not in self.cgroups:
                self._add_tree(path)
