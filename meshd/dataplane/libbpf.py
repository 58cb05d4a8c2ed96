"""ctypes binding over the system libbpf.so.1 (Debian 12: libbpf 1.1.2).

The only module in meshd that touches ctypes. Every failing call raises
`BpfError(errno, op, object)`; libbpf's own log goes to the "meshd.libbpf" logger.
Int-returning libbpf calls return -errno; pointer-returning calls return NULL and set errno.
"""

from __future__ import annotations

import ctypes as C
import errno as _errno
import logging
import os
from pathlib import Path
from typing import Iterator

from meshd.errors import BpfError, LibbpfMissing

log = logging.getLogger("meshd.libbpf")

# enum bpf_map_type / bpf_attach_type values used by meshd (linux/bpf.h).
MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_PERCPU_HASH = 5
MAP_TYPE_HASH_OF_MAPS = 13
BPF_F_INNER_MAP = 1 << 12  # an inner map whose max_entries may differ from the template's
ATTACH_TYPES = {
    "cgroup_inet_ingress": 0,
    "cgroup_inet_egress": 1,
    "cgroup_sock_ops": 3,
    "cgroup_inet4_connect": 10,
    "cgroup_inet6_connect": 11,
    "cgroup_udp4_sendmsg": 14,
    "cgroup_udp6_sendmsg": 15,
    "cgroup_udp4_recvmsg": 19,
    "cgroup_udp6_recvmsg": 20,
    "cgroup_inet4_getpeername": 29,
    "cgroup_inet6_getpeername": 30,
}
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2

LIBBPF = "libbpf.so.1"
_INSTALL = "install it: apt-get install libbpf1 (Debian/Ubuntu; dnf install libbpf on Fedora)"

try:
    _lib = C.CDLL(LIBBPF, use_errno=True)
except OSError as e:  # raised at import: every CLI verb reports it in one line
    raise LibbpfMissing(f"cannot load {LIBBPF} ({e}): meshd needs libbpf >= 1.1; "
                        f"{_INSTALL}") from None
_libc = C.CDLL(None, use_errno=True)


def _fn(name: str, restype, *argtypes):
    try:
        f = getattr(_lib, name)
    except AttributeError:
        raise LibbpfMissing(f"{LIBBPF} has no {name}(): it is older than the libbpf 1.1 meshd "
                            f"needs; {_INSTALL}") from None
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


vp, cp, i32, u32, u64, sz = C.c_void_p, C.c_char_p, C.c_int, C.c_uint32, C.c_uint64, C.c_size_t
_open_file = _fn("bpf_object__open_file", vp, cp, vp)
_obj_load = _fn("bpf_object__load", i32, vp)
_obj_close = _fn("bpf_object__close", None, vp)
_find_prog = _fn("bpf_object__find_program_by_name", vp, vp, cp)
_find_map = _fn("bpf_object__find_map_by_name", vp, vp, cp)
_prog_fd = _fn("bpf_program__fd", i32, vp)
_map_fd = _fn("bpf_map__fd", i32, vp)
_map_reuse_fd = _fn("bpf_map__reuse_fd", i32, vp, i32)
_map_set_max_entries = _fn("bpf_map__set_max_entries", i32, vp, u32)
_map_inner = _fn("bpf_map__inner_map", vp, vp)
_map_value_size = _fn("bpf_map__value_size", u32, vp)
_map_set_initial = _fn("bpf_map__set_initial_value", i32, vp, vp, sz)
_attach_cgroup = _fn("bpf_program__attach_cgroup", vp, vp, i32)
_attach_iter = _fn("bpf_program__attach_iter", vp, vp, vp)
_iter_create = _fn("bpf_iter_create", i32, i32)
_link_pin = _fn("bpf_link__pin", i32, vp, cp)
_link_destroy = _fn("bpf_link__destroy", i32, vp)
_link_fd = _fn("bpf_link__fd", i32, vp)
_link_update = _fn("bpf_link_update", i32, i32, i32, vp)
_link_detach = _fn("bpf_link_detach", i32, i32)
_obj_get = _fn("bpf_obj_get", i32, cp)
_obj_pin = _fn("bpf_obj_pin", i32, i32, cp)
_get_info = _fn("bpf_obj_get_info_by_fd", i32, i32, vp, C.POINTER(u32))
_prog_query = _fn("bpf_prog_query", i32, i32, i32, u32, C.POINTER(u32), vp, C.POINTER(u32))
_update = _fn("bpf_map_update_elem", i32, i32, vp, vp, u64)
_lookup = _fn("bpf_map_lookup_elem", i32, i32, vp, vp)
_delete = _fn("bpf_map_delete_elem", i32, i32, vp)
_next_key = _fn("bpf_map_get_next_key", i32, i32, vp, vp)
_map_fd_by_id = _fn("bpf_map_get_fd_by_id", i32, u32)
_update_batch = _fn("bpf_map_update_batch", i32, i32, vp, vp, C.POINTER(u32), vp)
_delete_batch = _fn("bpf_map_delete_batch", i32, i32, vp, C.POINTER(u32), vp)
_lookup_batch = _fn("bpf_map_lookup_batch", i32, i32, vp, vp, vp, vp, C.POINTER(u32), vp)
_map_create = _fn("bpf_map_create", i32, i32, cp, u32, u32, u32, vp)
_num_cpus = _fn("libbpf_num_possible_cpus", i32)
_set_print = _fn("libbpf_set_print", vp, vp)
_vsnprintf = _libc.vsnprintf
_vsnprintf.restype = i32
_vsnprintf.argtypes = [C.c_char_p, sz, C.c_char_p, vp]

# ---- libbpf log -> Python logging -------------------------------------------------------
_PRINT_FN = C.CFUNCTYPE(i32, i32, C.c_char_p, vp)
_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


def _on_print(level: int, fmt: bytes, va_list: int) -> int:
    buf = C.create_string_buffer(4096)
    _vsnprintf(buf, len(buf), fmt, va_list)
    text = buf.value.decode(errors="replace").rstrip()
    if text:
        log.log(_LEVELS.get(level, logging.DEBUG), "%s", text)
    return 0


_print_cb = _PRINT_FN(_on_print)  # module-level: ctypes must keep it alive
_set_print(C.cast(_print_cb, vp))


# ---- helpers ------------------------------------------------------------------------------
def _check(ret: int, op: str, obj: str = "") -> int:
    if ret < 0:
        raise BpfError(-ret, op, obj)
    return ret


def _check_ptr(ptr: int | None, op: str, obj: str = "") -> int:
    if not ptr:
        raise BpfError(C.get_errno() or _errno.EINVAL, op, obj)
    return ptr


class _MapCreateOpts(C.Structure):
    _fields_ = [("sz", sz), ("btf_fd", u32), ("btf_key_type_id", u32),
                ("btf_value_type_id", u32), ("btf_vmlinux_value_type_id", u32),
                ("inner_map_fd", u32), ("map_flags", u32), ("map_extra", u64),
                ("numa_node", u32), ("map_ifindex", u32)]


class MapInfo(C.Structure):
    """Head of struct bpf_map_info (enough to check a pinned map's layout)."""
    _fields_ = [("type", u32), ("id", u32), ("key_size", u32), ("value_size", u32),
                ("max_entries", u32), ("map_flags", u32), ("name", C.c_char * 16),
                ("ifindex", u32), ("btf_vmlinux_value_type_id", u32), ("netns_dev", u64),
                ("netns_ino", u64), ("btf_id", u32), ("btf_key_type_id", u32),
                ("btf_value_type_id", u32), ("_pad", u32), ("map_extra", u64)]


class LinkInfo(C.Structure):
    """Head of struct bpf_link_info with the cgroup union member."""
    _fields_ = [("type", u32), ("id", u32), ("prog_id", u32), ("_pad", u32),
                ("cgroup_id", u64), ("attach_type", u32), ("_pad2", u32),
                ("_rest", C.c_uint8 * 64)]


def num_possible_cpus() -> int:
    return _check(_num_cpus(), "libbpf_num_possible_cpus")


_CLONE_NEWNET = 0x40000000
_setns = _libc.setns
_setns.restype = i32
_setns.argtypes = [i32, i32]


def in_netns(ns_path: str):
    """A runner `run(fn)` that calls fn in a thread that has joined the network namespace
    at `ns_path` (setns affects only the calling thread; Python 3.11 has no os.setns)."""
    import threading

    def run(fn) -> None:
        box: list[BaseException] = []

        def body() -> None:
            try:
                fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _setns(fd, _CLONE_NEWNET) != 0:
                        raise OSError(C.get_errno(), f"setns({ns_path}): "
                                      f"{os.strerror(C.get_errno())}")
                finally:
                    os.close(fd)
                fn()
            except BaseException as e:  # re-raised in the caller
                box.append(e)

        t = threading.Thread(target=body, name="meshd-netns")
        t.start()
        t.join()
        if box:
            raise box[0]
    return run


def release_free_memory() -> None:
    """glibc malloc_trim(0): hand freed heap back to the OS. A cold sync at 10,000 services
    peaks on temporary arrays and parses; without this the process keeps that peak as RSS."""
    try:
        _libc.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


M_ARENA_MAX = -8  # glibc mallopt parameter


def limit_malloc_arenas(n: int = 1) -> None:
    """glibc mallopt(M_ARENA_MAX, n), unless MALLOC_ARENA_MAX is set: at most `n` malloc
    arenas for all threads. glibc gives threads up to 8 per CPU; the daemon's worker
    threads (validation, the table builds, the apply) each kept freed memory in their own
    arena: ~5-10 MB of RSS at 10,000 services and ~25 MB of peak (bench/etcd_sync_bench.py,
    docs/performance.md). Call before any thread starts."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        _libc.mallopt(M_ARENA_MAX, n)
    except AttributeError:  # not glibc
        pass


def close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# ---- objects, programs, links -------------------------------------------------------------
class BpfObject:
    """One opened (then loaded) ELF object: open -> configure -> load -> use -> close."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise BpfError(_errno.ENOENT, "bpf_object__open_file",
                           f"{self.path} (run scripts/setup to build the BPF objects)")
        self._obj = _check_ptr(_open_file(str(self.path).encode(), None),
                               "bpf_object__open_file", str(self.path))

    def _map(self, name: str) -> int:
        return _check_ptr(_find_map(self._obj, name.encode()), "bpf_object__find_map_by_name", name)

    def _prog(self, name: str) -> int:
        return _check_ptr(_find_prog(self._obj, name.encode()),
                          "bpf_object__find_program_by_name", name)

    def set_rodata(self, data: bytes, section: str = ".rodata") -> None:
        buf = C.create_string_buffer(data, len(data))
        _check(_map_set_initial(self._map(section), buf, len(data)),
               "bpf_map__set_initial_value", section)

    def inner_value_size(self, outer: str) -> int:
        """value_size of the inner map template of map-in-map `outer`."""
        return _map_value_size(_check_ptr(_map_inner(self._map(outer)), "bpf_map__inner_map",
                                          outer))

    def set_max_entries(self, name: str, n: int) -> None:
        _check(_map_set_max_entries(self._map(name), n), "bpf_map__set_max_entries", name)

    def reuse_map_fd(self, name: str, fd: int) -> None:
        _check(_map_reuse_fd(self._map(name), fd), "bpf_map__reuse_fd", name)

    def load(self) -> None:
        _check(_obj_load(self._obj), "bpf_object__load", self.path.name)

    def map_fd(self, name: str) -> int:
        return _check(_map_fd(self._map(name)), "bpf_map__fd", name)

    def prog_fd(self, name: str) -> int:
        return _check(_prog_fd(self._prog(name)), "bpf_program__fd", name)

    def attach_cgroup(self, prog: str, cgroup_fd: int, pin_path: Path) -> None:
        """Attaches `prog` to a cgroup as a link and pins the link (it then outlives us)."""
        link = _check_ptr(_attach_cgroup(self._prog(prog), cgroup_fd),
                          "bpf_program__attach_cgroup", prog)
        try:
            _check(_link_pin(link, str(pin_path).encode()), "bpf_link__pin", str(pin_path))
        finally:
            _link_destroy(link)  # closes our fd; the pin keeps the link (or it detaches)

    def run_iter(self, prog: str, in_thread=None) -> None:
        """Attaches an iterator program and reads it to the end (the program does the work).
        `in_thread(fn)` runs the read where it must happen, e.g. inside a network namespace:
        a socket iterator walks the sockets of the namespace it is created in."""
        link = _check_ptr(_attach_iter(self._prog(prog), None), "bpf_program__attach_iter", prog)
        try:
            link_fd = _link_fd(link)

            def read() -> None:
                fd = _check(_iter_create(link_fd), "bpf_iter_create", prog)
                try:
                    while os.read(fd, 65536):
                        pass
                finally:
                    os.close(fd)
            (in_thread or (lambda f: f()))(read)
        finally:
            _link_destroy(link)

    def close(self) -> None:
        if self._obj:
            _obj_close(self._obj)
            self._obj = 0

    def __enter__(self) -> "BpfObject":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def obj_get(path: Path) -> int:
    return _check(_obj_get(str(path).encode()), "bpf_obj_get", str(path))


def obj_pin(fd: int, path: Path) -> None:
    _check(_obj_pin(fd, str(path).encode()), "bpf_obj_pin", str(path))


def link_update(link_fd: int, prog_fd: int, what: str) -> None:
    """Atomically replaces the program behind a link (zero-downtime upgrade)."""
    _check(_link_update(link_fd, prog_fd, None), "bpf_link_update", what)


def link_detach(link_fd: int, what: str) -> None:
    _check(_link_detach(link_fd), "bpf_link_detach", what)


def map_info(fd: int, what: str) -> MapInfo:
    info = MapInfo()
    n = u32(C.sizeof(info))
    _check(_get_info(fd, C.byref(info), C.byref(n)), "bpf_obj_get_info_by_fd", what)
    return info


def link_info(fd: int, what: str) -> LinkInfo:
    info = LinkInfo()
    n = u32(C.sizeof(info))
    _check(_get_info(fd, C.byref(info), C.byref(n)), "bpf_obj_get_info_by_fd", what)
    return info


def prog_query(cgroup_fd: int, attach_type: str) -> list[int]:
    """Program ids attached to a cgroup at one attach point (links and legacy attachments)."""
    ids = (u32 * 64)()
    cnt = u32(64)
    flags = u32(0)
    _check(_prog_query(cgroup_fd, ATTACH_TYPES[attach_type], 0, C.byref(flags), ids,
                       C.byref(cnt)), "bpf_prog_query", attach_type)
    return list(ids[: cnt.value])


# ---- RCU -----------------------------------------------------------------------------------
_SYS_MEMBARRIER = 324  # x86_64
_MEMBARRIER_CMD_GLOBAL = 1


def rcu_grace_period() -> bool:
    """Waits for an RCU grace period (membarrier(MEMBARRIER_CMD_GLOBAL) calls
    synchronize_rcu()): every BPF program running when it was called has returned. False
    if the kernel refuses (nohz_full CPUs): the caller must not rely on it."""
    ret = _libc.syscall(C.c_long(_SYS_MEMBARRIER), C.c_int(_MEMBARRIER_CMD_GLOBAL), C.c_int(0))
    return ret == 0


# ---- maps ---------------------------------------------------------------------------------
def map_fd_by_id(map_id: int, what: str) -> int:
    return _check(_map_fd_by_id(map_id), "bpf_map_get_fd_by_id", what)


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int,
               inner_map_fd: int | None = None, flags: int = 0) -> int:
    opts = None
    if inner_map_fd is not None or flags:
        o = _MapCreateOpts(sz=C.sizeof(_MapCreateOpts), inner_map_fd=inner_map_fd or 0,
                           map_flags=flags)
        opts = C.byref(o)
    return _check(_map_create(map_type, name.encode(), key_size, value_size, max_entries, opts),
                  "bpf_map_create", name)


class Map:
    """A map fd with ctypes key/value types. Owns the fd unless told otherwise."""

    def __init__(self, fd: int, name: str, key_type, value_type):
        self.fd, self.name = fd, name
        self.key_type, self.value_type = key_type, value_type

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        """`key`/`value` are ctypes objects (any buffer of the map's sizes)."""
        _check(_update(self.fd, C.byref(key), C.byref(value), flags), "bpf_map_update_elem",
               self.name)

    def lookup(self, key):
        value = self.value_type()
        ret = _lookup(self.fd, C.byref(key), C.byref(value))
        if ret == -_errno.ENOENT:
            return None
        _check(ret, "bpf_map_lookup_elem", self.name)
        return value

    def delete(self, key) -> bool:
        """Deletes `key`; False if it was not there."""
        ret = _delete(self.fd, C.byref(key))
        if ret == -_errno.ENOENT:
            return False
        _check(ret, "bpf_map_delete_elem", self.name)
        return True

    def update_batch(self, keys, values) -> int:
        """One syscall for many entries (`keys`/`values`: ctypes arrays of equal length).
        Returns how many were written; on failure raises BpfError with `.done` set."""
        n = u32(len(keys))
        ret = _update_batch(self.fd, keys, values, C.byref(n), None)
        if ret < 0:
            err = BpfError(-ret, "bpf_map_update_batch", self.name)
            err.done = n.value
            raise err
        return n.value

    def delete_batch(self, keys) -> int:
        """Deletes many keys in one syscall; all must exist (else ENOENT, `.done` set)."""
        n = u32(len(keys))
        ret = _delete_batch(self.fd, keys, C.byref(n), None)
        if ret < 0:
            err = BpfError(-ret, "bpf_map_delete_batch", self.name)
            err.done = n.value
            raise err
        return n.value

    def keys(self) -> Iterator:
        prev, key = None, self.key_type()
        while True:
            ret = _next_key(self.fd, C.byref(prev) if prev is not None else None, C.byref(key))
            if ret == -_errno.ENOENT:
                return
            _check(ret, "bpf_map_get_next_key", self.name)
            yield key
            prev, key = key, self.key_type()

    def items(self) -> Iterator[tuple]:
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:  # deleted while we walked
                yield key, value

    def lookup_batch(self, chunk: int = 1024) -> list[tuple]:
        """Every (key, value) of a hash map, `chunk` entries per syscall (a consistent view
        per bucket, not of the whole map). Falls back to keys()+lookup() where the kernel
        has no batch ops for the map type (EINVAL)."""
        return [(self.key_type.from_buffer_copy(keys[i]),
                 self.value_type.from_buffer_copy(values[i]))
                for keys, values, n in self._batches(chunk, fallback=True) for i in range(n)]

    def raw_batches(self, chunk: int = 4096) -> Iterator[tuple[bytes, bytes, int]]:
        """The whole map as (keys, values, n) byte blocks (n entries each, packed as the
        ctypes arrays lay them out), for numpy to read without a Python object per entry."""
        for keys, values, n in self._batches(chunk, fallback=False):
            ks, vs = C.sizeof(self.key_type), C.sizeof(self.value_type)
            yield bytes(keys)[:n * ks], bytes(values)[:n * vs], n

    def _batches(self, chunk: int, fallback: bool) -> Iterator[tuple]:
        keys, values = (self.key_type * chunk)(), (self.value_type * chunk)()
        token_in, token_out = C.c_uint64(0), C.c_uint64(0)  # hash maps: a u32 bucket index
        first = True
        while True:
            n = u32(chunk)
            ret = _lookup_batch(self.fd, None if first else C.byref(token_in),
                                C.byref(token_out), keys, values, C.byref(n), None)
            if ret < 0 and ret not in (-_errno.ENOENT,):
                if ret == -_errno.EINVAL and first and fallback:
                    items = list(self.items())
                    yield ([k for k, _v in items], [v for _k, v in items], len(items))
                    return
                if ret == -_errno.ENOSPC and n.value == 0:  # one bucket holds more than chunk
                    chunk *= 4
                    keys, values = (self.key_type * chunk)(), (self.value_type * chunk)()
                    continue
                _check(ret, "bpf_map_lookup_batch", self.name)
            if n.value:
                yield keys, values, n.value
            if ret == -_errno.ENOENT:
                return
            token_in.value, first = token_out.value, False

    def close(self) -> None:
        close_fd(self.fd)


class PercpuMap(Map):
    """A per-CPU map: each value is `per_cpu_type` once per possible CPU, each copy padded
    to 8 bytes (the kernel's layout for per-CPU values in user space)."""

    def __init__(self, fd: int, name: str, key_type, per_cpu_type):
        self.ncpus = num_possible_cpus()
        self.stride = (C.sizeof(per_cpu_type) + 7) // 8 * 8
        self.per_cpu_type = per_cpu_type
        super().__init__(fd, name, key_type, C.c_uint8 * (self.stride * self.ncpus))

    def copies(self, value) -> list:
        """The per-CPU copies of one value read from this map."""
        raw = bytes(value)
        return [self.per_cpu_type.from_buffer_copy(raw, i * self.stride)
                for i in range(self.ncpus)]


# ---- tc (cls_bpf on a clsact qdisc) -------------------------------------------------------
# No tcx in libbpf 1.1: filters are not links, they outlive the process and need an explicit
# detach. Every call acts on the network namespace of the CALLING THREAD (see in_netns()).
TC_INGRESS, TC_EGRESS = 1, 2  # enum bpf_tc_attach_point
TC_F_REPLACE = 1  # BPF_TC_F_REPLACE: replace the filter with the same handle and priority


class TcHook(C.Structure):
    """struct bpf_tc_hook (24 bytes)."""
    _fields_ = [("sz", sz), ("ifindex", i32), ("attach_point", i32), ("parent", u32),
                ("_pad", u32)]


class TcOpts(C.Structure):
    """struct bpf_tc_opts (32 bytes)."""
    _fields_ = [("sz", sz), ("prog_fd", i32), ("flags", u32), ("prog_id", u32),
                ("handle", u32), ("priority", u32), ("_pad", u32)]


def _on_print_captured(level: int, fmt: bytes, va_list: int) -> int:
    buf = C.create_string_buffer(4096)
    _vsnprintf(buf, len(buf), fmt, va_list)
    text = buf.value.decode(errors="replace").rstrip()
    if text:
        _captured.append(text)
    return 0


_captured: list[str] = []
_capture_cb = _PRINT_FN(_on_print_captured)  # module-level: ctypes must keep it alive


def _captured_call(fn, *args) -> tuple[int, str]:
    """Calls fn with libbpf's log captured instead of logged: for calls whose failure is
    an expected answer (the kernel's extack for EEXIST/ENOENT would read as a warning).
    Returns (fn's return value, what libbpf printed). Brief: other threads' libbpf log
    lines during the call are captured too (and dropped on success)."""
    _captured.clear()
    _set_print(C.cast(_capture_cb, vp))
    try:
        ret = fn(*args)
    finally:
        _set_print(C.cast(_print_cb, vp))
    return ret, "; ".join(_captured)


def _check_tc(ret: int, msg: str, op: str, what: str) -> int:
    if ret < 0 and msg:
        log.debug("%s(%s): %s", op, what, msg)
        what = f"{what}: {msg}"
    return _check(ret, op, what)


_tc_hook_create = _fn("bpf_tc_hook_create", i32, C.POINTER(TcHook))
_tc_hook_destroy = _fn("bpf_tc_hook_destroy", i32, C.POINTER(TcHook))
_tc_attach = _fn("bpf_tc_attach", i32, C.POINTER(TcHook), C.POINTER(TcOpts))
_tc_detach = _fn("bpf_tc_detach", i32, C.POINTER(TcHook), C.POINTER(TcOpts))
_tc_query = _fn("bpf_tc_query", i32, C.POINTER(TcHook), C.POINTER(TcOpts))


def _tc_hook(ifindex: int, attach_point: int) -> TcHook:
    return TcHook(sz=C.sizeof(TcHook), ifindex=ifindex, attach_point=attach_point)


def tc_hook_create(ifindex: int, what: str) -> bool:
    """Adds a clsact qdisc (ingress + egress hooks) to `ifindex`. True if this call created
    it, False if one was there already (only a creator may destroy it: it takes every
    filter with it, other tools' too)."""
    ret, msg = _captured_call(_tc_hook_create,
                              C.byref(_tc_hook(ifindex, TC_INGRESS | TC_EGRESS)))
    if ret == -_errno.EEXIST:
        return False
    _check_tc(ret, msg, "bpf_tc_hook_create", what)
    return True


def tc_hook_destroy(ifindex: int, what: str) -> None:
    """Removes the clsact qdisc of `ifindex` and every filter on it."""
    _check(_tc_hook_destroy(C.byref(_tc_hook(ifindex, TC_INGRESS | TC_EGRESS))),
           "bpf_tc_hook_destroy", what)


def tc_attach(ifindex: int, attach_point: int, prog_fd: int, handle: int, priority: int,
              what: str, replace: bool = True) -> int:
    """Attaches a direct-action cls_bpf filter; with `replace`, atomically swaps the program
    of an existing filter with the same handle and priority. Returns the program id."""
    opts = TcOpts(sz=C.sizeof(TcOpts), prog_fd=prog_fd, handle=handle, priority=priority,
                  flags=TC_F_REPLACE if replace else 0)
    ret, msg = _captured_call(_tc_attach, C.byref(_tc_hook(ifindex, attach_point)),
                              C.byref(opts))
    _check_tc(ret, msg, "bpf_tc_attach", what)
    return opts.prog_id


def tc_detach(ifindex: int, attach_point: int, handle: int, priority: int, what: str) -> bool:
    """Removes the filter (handle, priority). False if there was none (or no clsact, or no
    such interface any more)."""
    opts = TcOpts(sz=C.sizeof(TcOpts), handle=handle, priority=priority)
    ret, msg = _captured_call(_tc_detach, C.byref(_tc_hook(ifindex, attach_point)),
                              C.byref(opts))
    if ret in (-_errno.ENOENT, -_errno.EINVAL, -_errno.ENODEV):
        return False
    _check_tc(ret, msg, "bpf_tc_detach", what)
    return True


def tc_query(ifindex: int, attach_point: int, handle: int, priority: int, what: str) -> int | None:
    """Program id of the filter (handle, priority), or None if there is none."""
    opts = TcOpts(sz=C.sizeof(TcOpts), handle=handle, priority=priority)
    ret, msg = _captured_call(_tc_query, C.byref(_tc_hook(ifindex, attach_point)),
                              C.byref(opts))
    if ret in (-_errno.ENOENT, -_errno.EINVAL, -_errno.ENODEV):
        return None
    _check_tc(ret, msg, "bpf_tc_query", what)
    return opts.prog_id


# ---- BPF_PROG_TEST_RUN ----------------------------------------------------------------------
class ProgTestRunOpts(C.Structure):
    """struct bpf_test_run_opts (80 bytes)."""
    _fields_ = [("sz", sz), ("data_in", vp), ("data_out", vp), ("data_size_in", u32),
                ("data_size_out", u32), ("ctx_in", vp), ("ctx_out", vp), ("ctx_size_in", u32),
                ("ctx_size_out", u32), ("retval", u32), ("repeat", i32), ("duration", u32),
                ("flags", u32), ("cpu", u32), ("batch_size", u32)]


_prog_test_run = _fn("bpf_prog_test_run_opts", i32, i32, C.POINTER(ProgTestRunOpts))


def prog_test_run(prog_fd: int, data: bytes, what: str, repeat: int = 1,
                  headroom: int = 256) -> tuple[int, bytes, int]:
    """Runs a program on a packet (BPF_PROG_TEST_RUN). Returns (the program's return value
    as a signed int, the packet after the program, mean ns per run). Map writes are real."""
    buf_in = C.create_string_buffer(data, len(data))
    buf_out = C.create_string_buffer(len(data) + headroom)
    opts = ProgTestRunOpts(sz=C.sizeof(ProgTestRunOpts), data_in=C.cast(buf_in, vp),
                       data_out=C.cast(buf_out, vp), data_size_in=len(data),
                       data_size_out=len(buf_out), repeat=repeat)
    _check(_prog_test_run(prog_fd, C.byref(opts)), "bpf_prog_test_run_opts", what)
    retval = opts.retval - (1 << 32) if opts.retval >= 1 << 31 else opts.retval
    return retval, buf_out.raw[: opts.data_size_out], opts.duration


# ---- ring buffer (BPF_MAP_TYPE_RINGBUF) ------------------------------------------------------
_RB_SAMPLE_FN = C.CFUNCTYPE(i32, vp, vp, sz)
_rb_new = _fn("ring_buffer__new", vp, i32, _RB_SAMPLE_FN, vp, vp)
_rb_poll = _fn("ring_buffer__poll", i32, vp, i32)
_rb_consume = _fn("ring_buffer__consume", i32, vp)
_rb_free = _fn("ring_buffer__free", None, vp)
_rb_epoll_fd = _fn("ring_buffer__epoll_fd", i32, vp)


class RingBuffer:
    """A consumer of one ring buffer map: poll()/consume() return the records as bytes.
    The ctypes callback only copies each record into a list (no Python work between
    records); the map fd is borrowed (libbpf maps the ring itself; close the fd whenever)."""

    def __init__(self, map_fd: int, what: str):
        self.what = what
        self._got: list[bytes] = []

        def on_sample(_ctx, data, size) -> int:
            self._got.append(C.string_at(data, size))
            return 0
        self._cb = _RB_SAMPLE_FN(on_sample)  # kept alive as long as the ring buffer
        self._rb = _check_ptr(_rb_new(map_fd, self._cb, None, None), "ring_buffer__new", what)

    def _take(self, ret: int, op: str) -> list[bytes]:
        got, self._got = self._got, []
        if ret < 0 and ret != -_errno.EINTR:
            _check(ret, op, self.what)
        return got

    def poll(self, timeout_ms: int) -> list[bytes]:
        """Waits up to `timeout_ms` (-1: forever) for records; returns what is there."""
        if not self._rb:
            raise BpfError(_errno.EBADF, "ring_buffer__poll", f"{self.what} (closed)")
        return self._take(_rb_poll(self._rb, timeout_ms), "ring_buffer__poll")

    def consume(self) -> list[bytes]:
        """Every record there now, without waiting."""
        if not self._rb:
            raise BpfError(_errno.EBADF, "ring_buffer__consume", f"{self.what} (closed)")
        return self._take(_rb_consume(self._rb), "ring_buffer__consume")

    def epoll_fd(self) -> int:
        """An fd that becomes readable when records arrive (for an event loop)."""
        return _rb_epoll_fd(self._rb)

    def close(self) -> None:
        if self._rb:
            _rb_free(self._rb)
            self._rb = 0


# ---- inotify (libc; for meshd/cgroups.py: Python has no binding) ---------------------------
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_in_init1 = _libc.inotify_init1
_in_init1.restype, _in_init1.argtypes = i32, [i32]
_in_add = _libc.inotify_add_watch
_in_add.restype, _in_add.argtypes = i32, [i32, cp, u32]
_in_rm = _libc.inotify_rm_watch
_in_rm.restype, _in_rm.argtypes = i32, [i32, i32]


def _oserror(op: str, what: str = "") -> OSError:
    err = C.get_errno()
    return OSError(err, f"{op}({what}): {os.strerror(err)}" if what else
                   f"{op}: {os.strerror(err)}")


def inotify_init(nonblock: bool = True) -> int:
    """A new inotify fd (close-on-exec; non-blocking unless told otherwise)."""
    fd = _in_init1(IN_CLOEXEC | (IN_NONBLOCK if nonblock else 0))
    if fd < 0:
        raise _oserror("inotify_init1")
    return fd


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    """Watches `path` for the events in `mask` (IN_* of <sys/inotify.h>); returns the watch
    descriptor. OSError (errno set) if the path is gone or the watch limit is reached."""
    wd = _in_add(fd, os.fsencode(path), mask)
    if wd < 0:
        raise _oserror("inotify_add_watch", str(path))
    return wd


def inotify_rm_watch(fd: int, wd: int) -> None:
    if _in_rm(fd, wd) < 0:
        raise _oserror("inotify_rm_watch", str(wd))


def count_keys(fd: int, key_size: int, what: str) -> int:
    """Entries of a hash-like map, by walking its keys (no values read)."""
    kt = C.c_ubyte * key_size
    return sum(1 for _ in Map(fd, what, kt, kt).keys())
