"""Destroy connected UDP sockets still aimed at a backend meshd removed (kernel >= 6.5).

See bpf/sock_destroy.bpf.c. The iterator runs once per network namespace that has a process
in the cgroup (a socket iterator only walks the namespace it is created in), so clients in
their own namespaces (containers, pods, the lab) are covered too.
"""

from __future__ import annotations

import ctypes as C
import logging
import os
from pathlib import Path
from typing import Iterable

from meshd import names
from meshd.desired import BackendRef, Frontend
from meshd.errors import BpfError
from meshd.dataplane import features
from meshd.dataplane import libbpf as bpf
from meshd.dataplane import structs as S
from meshd.dataplane.pins import adopt_pins, object_path

log = logging.getLogger("meshd.dataplane")

OBJ = "sock_destroy.bpf.o"
MAP_DOOMED = "meshd_doomed"
MAP_DESTROYED = "meshd_destroyed"
PROG = "meshd_destroy_udp"
DOOMED_MAX = 65536  # MESHD_DOOMED_MAX: max_entries of meshd_doomed, pairs per pass


class DoomedKey(C.Structure):
    """Mirror of struct meshd_doomed_key (bpf/sock_destroy.bpf.c)."""
    _fields_ = [("be_addr", S.Addr16), ("vip_addr", S.Addr16), ("be_port", C.c_uint16),
                ("vip_port", C.c_uint16)]


def cgroup_netns(cgroup: Path) -> list[str]:
    """One /proc/<pid>/ns/net path per network namespace with a process in `cgroup` (or
    below it)."""
    seen: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(cgroup):
        if "cgroup.procs" not in files:
            continue
        try:
            pids = Path(dirpath, "cgroup.procs").read_text().split()
        except OSError:
            continue
        for pid in pids:
            path = f"/proc/{pid}/ns/net"
            try:
                seen.setdefault(os.readlink(path), path)
            except OSError:
                continue  # exited meanwhile
    return list(seen.values())


def destroy_udp(pin_dir: Path, pairs: Iterable[tuple[Frontend, BackendRef]],
                cgroup: Path, batch: int = DOOMED_MAX) -> int:
    """Destroys connected UDP sockets translated from a pair's VIP to its backend.
    Returns how many were destroyed. Any number of pairs: they go to the kernel in passes of
    at most `batch` (the doomed map's size), each pass one walk of every namespace."""
    pairs = [(fe, be) for fe, be in pairs if fe.protocol == "UDP"]
    if not pairs:
        return 0
    batch = max(1, min(batch, DOOMED_MAX))
    with bpf.BpfObject(object_path(OBJ)) as obj:
        reused = (names.MAP_REVNAT, names.MAP_SOCK, names.MAP_SKNAT)
        if names.MAP_REVNAT not in adopt_pins(obj, pin_dir, reused):
            return 0  # nothing pinned: nothing was ever translated
        try:
            obj.load()
        except BpfError as e:
            raise features.explain(e, f"the UDP socket destroyer ({OBJ})",
                                   (features.BTF, features.SOCK_DESTROY)) from e
        doomed = bpf.Map(obj.map_fd(MAP_DOOMED), MAP_DOOMED, DoomedKey, C.c_uint8)
        namespaces = cgroup_netns(cgroup)
        passes = 0
        for start in range(0, len(pairs), batch):
            chunk = pairs[start:start + batch]
            keys = (DoomedKey * len(chunk))(*(
                DoomedKey(be_addr=S.pack_addr(be.address), vip_addr=S.pack_addr(fe.vip),
                          be_port=S.port_be(be.port), vip_port=S.port_be(fe.port))
                for fe, be in chunk))
            doomed.update_batch(keys, (C.c_uint8 * len(chunk))(*([1] * len(chunk))))
            for ns in namespaces:
                obj.run_iter(PROG, in_thread=bpf.in_netns(ns))
            passes += 1
            if start + batch < len(pairs):
                doomed.delete_batch(keys)  # empty again for the next pass
        count = bpf.Map(obj.map_fd(MAP_DESTROYED), MAP_DESTROYED, C.c_uint32,
                        C.c_uint64).lookup(C.c_uint32(0))
    n = count.value if count is not None else 0
    if n:
        log.info("destroyed %d connected UDP sockets aimed at removed backends (%d namespaces, "
                 "%d pairs in %d passes)", n, len(namespaces), len(pairs), passes)
    return n

