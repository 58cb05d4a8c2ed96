"""Load, pin, adopt and remove the socket-LB data plane of one meshd instance.

Lifecycle: open the object -> set load-time config (.rodata, inner map size) -> reuse the
maps already pinned under <bpffs>/meshd/<instance> (a restart or upgrade keeps every entry)
-> load -> pin new maps -> attach each program to the cgroup as a pinned link, or swap the
program inside an existing pinned link (bpf_link_update: atomic, no window without a hook).
Pinned maps and links keep serving while no daemon runs; `remove()` takes it all away.

Metrics (bpf/include/meshd_metrics.h) ride in the same object: `load(..., metrics=True)`
sets MESHD_CFG_F_METRICS in .rodata and attaches the sockops and cgroup-skb programs as
pinned links too; `metrics=False` (or `set_metrics(..., False)`) loads the socket hooks
without any metrics code and detaches those programs. `open_metrics()` reads the counters.
"""

from __future__ import annotations

import ctypes as C
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meshd import maglev, names
from meshd.desired import BackendRef
from meshd.errors import BpfError, DataplaneError
from meshd.dataplane import features
from meshd.dataplane import libbpf as bpf
from meshd.dataplane import structs as S
from meshd.dataplane import tables, tc
from meshd.dataplane.pins import adopt_pins, ensure_bpffs, object_path, pin_new

log = logging.getLogger("meshd.dataplane")

# Map name -> (key type, value type) as seen from user space. The Maglev outer map's value
# is an inner map fd on update and an inner map id on lookup.
MAP_TYPES = {
    names.MAP_SVC: (S.SvcKey, S.SvcVal),
    names.MAP_BACKENDS: (C.c_uint32, S.Backend),
    names.MAP_MAGLEV: (C.c_uint32, C.c_uint32),
    names.MAP_REVNAT: (S.RevnatKey, S.RevnatVal),
    names.MAP_META: (C.c_uint32, S.Meta),
    names.MAP_NAMES: (C.c_uint32, S.SvcName),
    names.MAP_SVC_EXT: (S.SvcKey, S.SvcVal),
    names.MAP_AFFINITY: (S.AffKey, S.AffVal),
    names.MAP_AFFCFG: (C.c_uint32, C.c_uint32),
    names.MAP_MEMBERS: (S.MemberKey, C.c_uint32),
    names.MAP_SRCRANGES: (S.SrcRangeKey, C.c_uint8),
    names.MAP_SOCK: (C.c_int, S.Sock),
    names.MAP_STATS: (S.StatsKey, S.Stats),  # per CPU: opened as a PercpuMap
    names.MAP_IDENT: (C.c_uint64, S.Ident),
    names.MAP_SUBTREE: (C.c_uint64, S.Ident),
    names.MAP_VERDICT: (S.VerdictKey, S.Verdict),
    names.MAP_DENIED: (S.DeniedKey, C.c_uint64),  # per CPU: opened as a PercpuMap
    names.MAP_EVCFG: (C.c_uint32, S.EvCfg),
    names.MAP_EVSTATE: (C.c_uint32, S.EvState),  # per CPU: opened as a PercpuMap
}


def cgroup_id(path: Path) -> int:
    """cgroup v2 id = inode number of its directory."""
    return os.stat(path).st_ino


@dataclass
class Maps:
    """Open handles on the pinned maps of one instance."""
    pin_dir: Path
    maglev_m: int  # maglev.table_size when fixed; 0: auto (each group its own size)
    svc: bpf.Map
    backends: bpf.Map
    maglev: bpf.Map
    revnat: bpf.Map
    meta: bpf.Map
    names: bpf.Map
    # kube-proxy semantics (bpf/include/meshd_maps.h): tc overrides of external frontends,
    # session affinity, groups' members (affinity only), LB source ranges
    svc_ext: bpf.Map | None = None
    affinity: bpf.Map | None = None
    affcfg: bpf.Map | None = None
    members: bpf.Map | None = None
    srcranges: bpf.Map | None = None
    # every pin of the socket LB (maps and cgroup links) -> an fd the daemon holds open, so
    # that a pin removed behind its back loses nothing and can be restored (restore_pins)
    held: dict[str, int] = field(default_factory=dict)
    cgroup_id: int = 0  # the cgroup the links were attached to
    maglev_max: int = maglev.LADDER[-1]  # the largest table size auto picks

    def close(self) -> None:
        for m in (self.svc, self.backends, self.maglev, self.revnat, self.meta, self.names,
                  self.svc_ext, self.affinity, self.affcfg, self.members, self.srcranges):
            if m is not None:
                m.close()
        self.release_held()

    def release_held(self) -> None:
        for fd in self.held.values():
            bpf.close_fd(fd)
        self.held = {}

    def restore_pins(self) -> list[str]:
        """Re-pin every held object whose pin is gone; returns their names."""
        missing = [n for n in self.held if not (self.pin_dir / n).exists()]
        if missing:
            self.pin_dir.mkdir(parents=True, exist_ok=True)
        for name in missing:
            bpf.obj_pin(self.held[name], self.pin_dir / name)
        return missing


def _open_map(pin: Path, name: str) -> bpf.Map:
    key_t, val_t = MAP_TYPES[name]
    return bpf.Map(bpf.obj_get(pin), name, key_t, val_t)


def open_pinned(bpffs: Path, instance: str) -> Maps:
    """Opens the maps a running (or stopped) instance pinned, without loading anything."""
    pin_dir = names.pin_dir(bpffs, instance)
    missing = [n for n in names.SOCK_LB_MAPS if not (pin_dir / n).exists()]
    if missing:
        raise DataplaneError(f"instance {instance!r} has no data plane at {pin_dir} "
                             f"(missing {', '.join(missing)}); is `meshd run` started?")
    opened = {n: _open_map(pin_dir / n, n) for n in names.SOCK_LB_MAPS}
    meta = opened[names.MAP_META].lookup(C.c_uint32(0))
    return _maps(pin_dir, meta.maglev_m if meta else 0, opened)  # 0: auto


def _maps(pin_dir: Path, maglev_m: int, opened: dict[str, bpf.Map], **kw) -> Maps:
    return Maps(pin_dir, maglev_m, opened[names.MAP_SVC], opened[names.MAP_BACKENDS],
                opened[names.MAP_MAGLEV], opened[names.MAP_REVNAT], opened[names.MAP_META],
                opened[names.MAP_NAMES], opened[names.MAP_SVC_EXT],
                opened[names.MAP_AFFINITY], opened[names.MAP_AFFCFG],
                opened[names.MAP_MEMBERS], opened[names.MAP_SRCRANGES], **kw)


@dataclass
class MetricsMaps:
    """Open handles for reading the metrics of one instance (the exporter, `meshd top`),
    and for pruning counters of removed groups and backends (the daemon, after a sync)."""
    pin_dir: Path
    stats: bpf.PercpuMap
    backends: bpf.Map
    names: bpf.Map

    def read_stats(self) -> dict[tuple[int, int], np.ndarray]:
        """(group id, backend id) -> struct meshd_stats summed over CPUs, as a flat uint64
        vector of S.STATS_WORDS (field order of S.Stats)."""
        words, stride = S.STATS_WORDS, self.stats.stride // 8
        out = {}
        for key, value in self.stats.lookup_batch():
            per_cpu = np.frombuffer(bytes(value), dtype=np.uint64).reshape(-1, stride)
            out[(key.group, key.backend)] = per_cpu[:, :words].sum(axis=0, dtype=np.uint64)
        return out

    def group_names(self) -> dict[int, str]:
        """group id -> "namespace/name:port-name/ipv4"."""
        return {k.value: v.name.decode(errors="replace") for k, v in self.names.items()}

    def backend_names(self) -> dict[int, str]:
        """backend id -> "10.0.0.1:8080/TCP" / "[fd00::1]:8080/TCP"."""
        out = {}
        for k, v in self.backends.items():
            addr = S.unpack_addr(v.addr)
            if v.family == socket.AF_INET6 and addr.version == 4:
                addr = ipaddress.IPv6Address(bytes(v.addr))  # a real ::ffff: backend
            out[k.value] = BackendRef(addr, S.port_host(v.port),
                                      S.PROTO_NAME.get(v.proto, str(v.proto))).name
        return out

    def stats_capacity(self) -> int:
        return bpf.map_info(self.stats.fd, self.stats.name).max_entries

    def prune(self, groups: set[int] | None = None, backends: set[int] | None = None) -> int:
        """Deletes the counters of groups and backends that no longer exist, so an id the
        reconciler reuses starts from zero. Call after a sync that removed any. `groups` and
        `backends` are the live ids if the caller knows them (the daemon does: no scan of the
        names and backends maps, which hold 10^5 entries at scale). Returns how many
        (group, backend) pairs were dropped."""
        if groups is None:
            groups = {k.value for k in self.names.keys()}
        if backends is None:
            backends = {k.value for k in self.backends.keys()}
        dropped = 0
        for key in list(self.stats.keys()):
            if key.group not in groups or (key.backend and key.backend not in backends):
                dropped += self.stats.delete(key)
        return dropped

    def close(self) -> None:
        for m in (self.stats, self.backends, self.names):
            m.close()


def open_metrics(bpffs: Path, instance: str) -> MetricsMaps:
    """Opens the metrics maps an instance pinned (read by the exporter and `meshd top`)."""
    pin_dir = names.pin_dir(bpffs, instance)
    need = (names.MAP_STATS, names.MAP_BACKENDS, names.MAP_NAMES)
    missing = [n for n in need if not (pin_dir / n).exists()]
    if missing:
        raise DataplaneError(f"instance {instance!r} has no metrics maps at {pin_dir} "
                             f"(missing {', '.join(missing)}); is `meshd run` started?")
    stats = bpf.PercpuMap(bpf.obj_get(pin_dir / names.MAP_STATS), names.MAP_STATS,
                          S.StatsKey, S.Stats)
    try:
        return MetricsMaps(pin_dir, stats, _open_map(pin_dir / names.MAP_BACKENDS,
                                                     names.MAP_BACKENDS),
                           _open_map(pin_dir / names.MAP_NAMES, names.MAP_NAMES))
    except BaseException:
        stats.close()
        raise


def _pinned_layout(pin_dir: Path) -> tuple[int, int]:
    """(layout, maglev_m) of the maps pinned in `pin_dir`; (0, 0): none, or never stamped."""
    meta_pin = pin_dir / names.MAP_META
    if not meta_pin.exists():
        return 0, 0
    meta_map = _open_map(meta_pin, names.MAP_META)
    try:
        meta = meta_map.lookup(C.c_uint32(0))
    finally:
        meta_map.close()
    return (0, 0) if meta is None else (meta.layout, meta.maglev_m)


def _check_adoptable(pin_dir: Path) -> int:
    """The layout of the pinned maps (0: nothing to protect) if this meshd can adopt them:
    its own, or layout 1 or 2 (their tables migrated by _migrate_tables before the programs
    switch)."""
    layout, _m = _pinned_layout(pin_dir)
    if layout not in (0, 1, 2, S.LAYOUT_VERSION):
        raise DataplaneError(f"maps pinned at {pin_dir} have layout v{layout}, this meshd "
                             f"uses v{S.LAYOUT_VERSION}: run `meshd cleanup` for this instance")
    return layout


class _U32(C.Structure):
    """A __u32 key as a struct: Map.lookup_batch copies keys with from_buffer_copy."""
    _fields_ = [("value", C.c_uint32)]


def _v1_table(fd: int, what: str, m: int) -> tuple | None:
    """Layout 1: one value of the instance's M slots; both halves get it."""
    value = bpf.Map(fd, what, C.c_uint32, C.c_uint32 * m).lookup(C.c_uint32(0))
    return None if value is None else (np.frombuffer(bytes(value), dtype=np.uint32).copy(),)


def _v2_table(fd: int, what: str, _m: int) -> tuple | None:
    """Layout 2: header (M, chunks per half), then two halves of 32-bit ids; each half as
    it is (a group caught mid-change keeps both)."""
    rows = dict((k.value, v) for k, v in bpf.Map(fd, what, _U32, S.TableChunk).lookup_batch())
    hdr = rows.get(0)
    if hdr is None or not hdr.slot[0]:
        return None
    m, n = int(hdr.slot[0]), int(hdr.slot[1])
    if any(i not in rows for i in range(1, 1 + 2 * n)):
        return None
    ids = np.frombuffer(b"".join(bytes(rows[i]) for i in range(1, 1 + 2 * n)), dtype=np.uint32)
    return ids[:m].copy(), ids[n * S.TABLE_CHUNK:][:m].copy()


def _migrate_tables(pin_dir: Path, layout: int, outer: bpf.Map) -> int:
    """Layout 1 or 2 -> 3: copies every table of the pinned outer map of that layout
    (meshd_maglev_v1: one value of M slots per inner map, M in meshd_meta_v1;
    meshd_maglev_v2: 32-bit slots in two halves) into `outer` (meshd_maglev_v3, same M), so
    the new programs find every table the old ones used, in the half the frontends name,
    when they are swapped in: no gap, no flip. Swapped in a batch at a time (not every
    table held at once). The reconciler later resizes tables to their group's size.
    Returns how many were copied."""
    name, read = ((names.MAP_MAGLEV_V1, _v1_table) if layout == 1
                  else (names.MAP_MAGLEV_V2, _v2_table))
    pin = pin_dir / name
    _layout, m = _pinned_layout(pin_dir)
    if not pin.exists() or (layout == 1 and not m):
        return 0
    old = bpf.Map(bpf.obj_get(pin), name, C.c_uint32, C.c_uint32)
    items: list[tuple] = []
    failed: dict[int, str] = {}
    copied = 0
    try:
        for key, inner_id in old.items():
            what = f"{name}[{key.value}]"
            fd = bpf.map_fd_by_id(inner_id.value, what)
            try:
                halves = read(fd, what, m)
            finally:
                bpf.close_fd(fd)
            if halves is not None:
                items.append((key.value, *halves))
            if len(items) >= tables.TABLE_BATCH:
                failed.update(tables.swap_in(outer, items))
                copied, items = copied + len(items), []
        failed.update(tables.swap_in(outer, items))
        copied += len(items)
    finally:
        old.close()
    if failed:
        raise DataplaneError(f"migrating {len(failed)} Maglev tables of layout {layout} failed "
                             f"({next(iter(failed.values()))}); run `meshd cleanup` for this "
                             "instance and start again")
    return copied


def _self_cfg(self_pid: int | None) -> tuple[int, int, int]:
    """(pidns dev, pidns ino, tgid) for .rodata: whose sockets the hooks never translate."""
    if self_pid == 0:
        return 0, 0, 0
    pid = os.getpid() if self_pid is None else self_pid
    if features.missing((features.SELF_PID,)):
        log.warning("kernel %s: %s is missing, so the daemon's own connections to VIPs are "
                    "translated like any other (a VIP equal to an etcd address would cut the "
                    "daemon off)", os.uname().release, features.WHY[features.SELF_PID])
        return 0, 0, 0
    return features.self_identity(pid)


def _check_sizes(pin_dir: Path, want: dict[str, int]) -> None:
    """Pinned maps must have the sizes asked for: libbpf would adopt them silently with their
    old size (a full map later, far from the cause)."""
    for name, n in want.items():
        pin = pin_dir / name
        if not pin.exists():
            continue
        fd = bpf.obj_get(pin)
        try:
            have = bpf.map_info(fd, name).max_entries
        finally:
            bpf.close_fd(fd)
        if have != n:
            raise DataplaneError(
                f"map {name} pinned at {pin_dir} holds {have} entries, {n} were asked for: "
                f"set the size back to {have}, or run `meshd cleanup` (drops the pinned "
                "state) and start again")


def events_ring_size(n: int) -> int:
    """`n` if it can be the size of the events ring buffer (a power of two and a multiple
    of the page size), else DataplaneError naming the fix."""
    page = os.sysconf("SC_PAGE_SIZE")
    if not isinstance(n, int) or n < page or n & (n - 1) or n > 1 << 30:
        raise DataplaneError(f"events ring size {n!r}: must be a power of two, a multiple of "
                             f"the page size ({page}) and at most 1 GiB, e.g. "
                             f"{S.EVENTS_RING_DEFAULT} (1 MiB, the default)")
    return n


def _replace_ring(pin_dir: Path, n: int | None) -> None:
    """A pinned events ring of another size than asked for is not adopted: its pin is
    removed and load() creates and pins one of the new size. It holds only events in
    flight (the old programs write to it until they are swapped out), unlike the other
    maps, whose entries are state; so a size change needs no `meshd cleanup`."""
    pin = pin_dir / names.MAP_EVENTS
    if n is None or not pin.exists():
        return
    fd = bpf.obj_get(pin)
    try:
        have = bpf.map_info(fd, names.MAP_EVENTS).max_entries
    finally:
        bpf.close_fd(fd)
    if have != n:
        log.info("events ring buffer: %d bytes pinned, %d asked for: replacing it", have, n)
        pin.unlink()


def map_sizes(max_frontends: int | None, max_backends: int | None) -> dict[str, int]:
    """max_entries per map for the given limits: the frontend limit also bounds the Maglev
    tables and group names (every group has at least one frontend)."""
    out: dict[str, int] = {}
    for what, n in (("max_frontends", max_frontends), ("max_backends", max_backends)):
        if n is not None and not 1 <= n <= 1 << 24:
            raise DataplaneError(f"{what}={n}: must be between 1 and {1 << 24}")
    if max_frontends is not None:
        out.update({names.MAP_SVC: max_frontends, names.MAP_MAGLEV: max_frontends,
                    names.MAP_NAMES: max_frontends})
    if max_backends is not None:
        out[names.MAP_BACKENDS] = max_backends
    return out


def load(bpffs: Path, instance: str, cgroup: Path, maglev_m: int = 0, metrics: bool = True,
         stats_max_entries: int | None = None, *, self_pid: int | None = None,
         max_frontends: int | None = None, max_backends: int | None = None,
         maglev_max: int = maglev.LADDER[-1], events_ring_bytes: int | None = None) -> Maps:
    """Loads (or adopts) the socket LB of `instance` and attaches it to `cgroup`; with
    `metrics`, also the metrics programs (else they are detached if they were attached).
    `stats_max_entries` caps the (group, backend) pairs with counters when the stats map is
    created (default MESHD_MAX_STATS = 65536); a pinned map keeps its size.
    `self_pid`: a process whose sockets are never translated (default: the calling process,
    i.e. the daemon; 0: none). `max_frontends` / `max_backends`: max_entries of meshd_svc_v1
    (and of the Maglev and names maps) / of meshd_be_v1 (default 65,536 / 262,144); pinned
    maps of another size are refused (DataplaneError naming `meshd cleanup`); None adopts
    whatever size is pinned. `maglev_m`: a fixed Maglev table size for every group; 0 (auto):
    each group gets the size its backends need, at most `maglev_max`. Either may change
    between loads (tables are rebuilt at their new size). Maps of layout 1 are migrated
    before the new programs replace the old ones. `events_ring_bytes`: size of the events
    ring buffer (meshd_events_v1), a power of two multiple of the page size; None keeps
    the pinned ring (or creates one of 1 MiB); another size than the pinned one replaces
    the ring (events in flight are lost, nothing else). Maps this meshd has and the pin
    dir lacks (an upgrade: the policy and event maps) are created and pinned; the
    others are adopted with their entries."""
    cgroup = Path(cgroup)
    if not (cgroup / "cgroup.procs").exists():
        raise DataplaneError(f"cgroup {cgroup} is not a cgroup v2 directory (on this machine "
                             "cgroup2 is usually at /sys/fs/cgroup/unified); fix `cgroup:`")
    sizes = map_sizes(max_frontends, max_backends)
    if events_ring_bytes is not None:
        events_ring_size(events_ring_bytes)
    self_dev, self_ino, self_tgid = _self_cfg(self_pid)
    ensure_bpffs(bpffs)
    pin_dir = names.pin_dir(bpffs, instance)
    pin_dir.mkdir(parents=True, exist_ok=True)
    layout = _check_adoptable(pin_dir)
    _check_sizes(pin_dir, sizes)
    _replace_ring(pin_dir, events_ring_bytes)
    needs = (features.BTF, features.SET_RETVAL) + ((features.SELF_PID,) if self_tgid else ())

    with bpf.BpfObject(object_path(names.OBJ_SOCK_LB)) as obj:
        obj.set_rodata(bytes(S.Cfg(flags=S.CFG_F_METRICS if metrics else 0,
                                   self_pidns_dev=self_dev, self_pidns_ino=self_ino,
                                   self_tgid=self_tgid)))
        if stats_max_entries:
            obj.set_max_entries(names.MAP_STATS, stats_max_entries)
        for name, n in sizes.items():
            obj.set_max_entries(name, n)
        if events_ring_bytes is not None:
            obj.set_max_entries(names.MAP_EVENTS, events_ring_bytes)
        adopted = adopt_pins(obj, pin_dir, names.PINNED_MAPS)
        try:
            obj.load()
        except BpfError as e:
            raise features.explain(e, f"the socket LB ({names.OBJ_SOCK_LB})", needs) from e
        if layout in (1, 2) and names.MAP_MAGLEV not in adopted:
            # before the new outer map is pinned: a migration that fails or is cut short
            # leaves no half-filled map a restart would adopt (it migrates again)
            outer = bpf.Map(obj.map_fd(names.MAP_MAGLEV), names.MAP_MAGLEV, C.c_uint32,
                            C.c_uint32)  # borrowed fd: the object owns it (never closed here)
            log.info("migrated %d Maglev tables of layout %d to %s",
                     _migrate_tables(pin_dir, layout, outer), layout, names.MAP_MAGLEV)
        pin_new(obj, pin_dir, names.PINNED_MAPS, adopted)
        log.info("socket LB loaded (maglev m=%s); adopted %d pinned maps; metrics %s "
                 "(adopted %d pinned metrics maps)", maglev_m or f"auto up to {maglev_max}",
                 len([n for n in adopted if n in names.SOCK_LB_MAPS]),
                 "on" if metrics else "off",
                 len([n for n in adopted if n in names.METRICS_MAPS]))
        created = [n for n in names.PINNED_MAPS if n not in adopted]
        if adopted and created:  # an upgrade: maps this version added, the rest kept
            log.info("created and pinned maps the pin dir did not have: %s",
                     ", ".join(created))
        _attach_all(obj, pin_dir, cgroup, names.SOCK_LB_PROGRAMS)
        if metrics:
            _attach_all(obj, pin_dir, cgroup, names.METRICS_PROGRAMS)
        else:
            _detach_pinned(pin_dir, names.METRICS_PROGRAMS)
        maps = {n: _open_map(pin_dir / n, n) for n in names.SOCK_LB_MAPS}

    maps[names.MAP_META].update(C.c_uint32(0), S.Meta(maglev_m=maglev_m,
                                                      layout=S.LAYOUT_VERSION))
    for retired in names.RETIRED_MAPS:  # the old programs that used them are replaced
        if (pin_dir / retired).exists():
            (pin_dir / retired).unlink()
            log.info("removed the pin of %s (no longer used)", retired)
    for older in (names.MAP_MAGLEV_V1, names.MAP_MAGLEV_V2):
        if (pin_dir / older).exists():
            # the old programs are replaced (the socket hooks above; tc filters hold their
            # own reference until tc.load swaps them): nothing of ours reads it by its pin
            (pin_dir / older).unlink()
    out = _maps(pin_dir, maglev_m, maps, cgroup_id=cgroup_id(cgroup), maglev_max=maglev_max)
    progs = {**names.SOCK_LB_PROGRAMS, **(names.METRICS_PROGRAMS if metrics else {})}
    for name in (*names.PINNED_MAPS, *(names.link_pin_name(p) for p in progs)):
        try:
            out.held[name] = bpf.obj_get(pin_dir / name)
        except DataplaneError:
            pass  # not pinned by this version (an older layout): nothing to hold
    return out


def _attach_all(obj: bpf.BpfObject, pin_dir: Path, cgroup: Path,
                programs: dict[str, str]) -> None:
    want_cg = cgroup_id(cgroup)
    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for prog in programs:
            pin = pin_dir / names.link_pin_name(prog)
            if pin.exists():
                link_fd = bpf.obj_get(pin)
                try:
                    info = bpf.link_info(link_fd, str(pin))
                    if info.cgroup_id == want_cg:
                        bpf.link_update(link_fd, obj.prog_fd(prog), prog)
                        continue
                    log.warning("%s was attached to another cgroup; moving it to %s", prog, cgroup)
                    bpf.link_detach(link_fd, prog)
                finally:
                    bpf.close_fd(link_fd)
                pin.unlink()
            obj.attach_cgroup(prog, cg_fd, pin)
    finally:
        os.close(cg_fd)


def _detach_pinned(pin_dir: Path, programs: dict[str, str]) -> None:
    for prog in programs:
        pin = pin_dir / names.link_pin_name(prog)
        if pin.exists():
            fd = bpf.obj_get(pin)
            try:
                bpf.link_detach(fd, prog)
            finally:
                bpf.close_fd(fd)
            pin.unlink()


def set_metrics(bpffs: Path, instance: str, cgroup: Path, enabled: bool, *,
                self_pid: int | None = None) -> None:
    """Turns the metrics of a loaded instance on or off, keeping the pinned maps and their
    counters: reloads the object with or without MESHD_CFG_F_METRICS and swaps every socket
    hook in place (bpf_link_update, no gap), then attaches or detaches the metrics programs.
    For the overhead benchmark and for operators who want the bare data path. `self_pid`
    as in load(): the daemon's pid when another process calls this."""
    pin_dir = names.pin_dir(bpffs, instance)
    meta_pin = pin_dir / names.MAP_META
    if not meta_pin.exists():
        raise DataplaneError(f"instance {instance!r} has no data plane at {pin_dir}")
    meta_map = _open_map(meta_pin, names.MAP_META)
    try:
        meta = meta_map.lookup(C.c_uint32(0))
    finally:
        meta_map.close()
    if meta is None or meta.layout == 0:
        raise DataplaneError(f"instance {instance!r} at {pin_dir} was never fully loaded")
    load(bpffs, instance, cgroup, meta.maglev_m, metrics=enabled, self_pid=self_pid).close()


def metrics_attached(pin_dir: Path) -> bool:
    """True if every metrics program has a pinned link."""
    return all((pin_dir / names.link_pin_name(p)).exists() for p in names.METRICS_PROGRAMS)


def attached_cgroup_ids(pin_dir: Path) -> dict[str, int | None]:
    """program -> cgroup id its pinned link is attached to (None: no pinned link)."""
    out: dict[str, int | None] = {}
    for prog in names.SOCK_LB_PROGRAMS:
        pin = pin_dir / names.link_pin_name(prog)
        if not pin.exists():
            out[prog] = None
            continue
        fd = bpf.obj_get(pin)
        try:
            out[prog] = bpf.link_info(fd, str(pin)).cgroup_id
        finally:
            bpf.close_fd(fd)
    return out


def remove(bpffs: Path, instance: str) -> list[str]:
    """Detaches every link and removes every pin of `instance`. Returns what it removed."""
    removed: list[str] = [f"tc filter on {n}" for n in tc.detach_all(bpffs, instance)]
    pin_dir = names.pin_dir(bpffs, instance)
    if not pin_dir.exists():
        return removed
    for pin in sorted(pin_dir.iterdir()):
        if pin.name.startswith("link_"):
            fd = bpf.obj_get(pin)
            try:
                bpf.link_detach(fd, pin.name)
            finally:
                bpf.close_fd(fd)
        pin.unlink()
        removed.append(str(pin))
    pin_dir.rmdir()
    removed.append(str(pin_dir))
    try:
        pin_dir.parent.rmdir()  # <bpffs>/meshd, if no other instance is left
    except OSError:
        pass
    return removed


# BPF_MAP_TYPE_ HASH, PERCPU_HASH, LRU_HASH, LRU_PERCPU_HASH, LPM_TRIE, HASH_OF_MAPS: maps
# that fill up (arrays are always "full"; socket storage lives and dies with sockets)
_FILLABLE = {1, 5, 9, 10, 11, 13}


def map_pressure(pin_dir: Path) -> dict[str, tuple[int, int]]:
    """(entries, max_entries) of every fillable map pinned under `pin_dir` (tc's included).
    Walks keys: ~1 us per entry, so callers cache it (the exporter: once a minute)."""
    out: dict[str, tuple[int, int]] = {}
    for path in sorted(Path(pin_dir).rglob("*")):
        if path.name.startswith("link_") or not path.is_file():
            continue
        try:
            fd = bpf.obj_get(path)
        except DataplaneError:
            continue  # removed meanwhile
        try:
            info = bpf.map_info(fd, path.name)
            if info.type in _FILLABLE:
                out[path.name] = (bpf.count_keys(fd, info.key_size, path.name),
                                  info.max_entries)
        except DataplaneError:
            continue
        finally:
            bpf.close_fd(fd)
    return out
