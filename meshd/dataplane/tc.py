"""Per-packet load balancing on tc (clsact): load, attach, detach, read (bpf/tc_lb.bpf.c).

The tc programs share the socket LB's service, backend and Maglev maps: `load()` reuses
every map the instance pinned (the socket LB must be loaded first, `loader.load()`), and
pins the tc path's own maps (conntrack, fragments, counters, the interface record) beside
them, adopting them across restarts so tracked flows survive an upgrade.

    attach_interfaces(bpffs, instance, ["eth1"], netns=None, snat_ports=None)
                                      ingress + egress filters; snat_ports=(lo, hi): SNAT mode
    detach_interfaces(bpffs, instance, ["eth1"] | None, netns=None)
    detach_all(bpffs, instance)       every recorded filter, in every namespace still there

Filters are cls_bpf on a clsact qdisc (no tcx in libbpf 1.1), one handle per instance, at
`priority` (default 1) on both hooks. They are not links: they outlive the daemon and keep
serving while it restarts; re-attaching swaps the program in place (BPF_TC_F_REPLACE, no
gap). Where they are is recorded in the pinned map meshd_tcif_v1, so cleanup and a changed
`tc.interfaces` find them without the old config. The clsact qdisc is never removed: other
tools' filters may live on it (an empty clsact costs nothing measurable).

tc calls act on the calling thread's network namespace; with `netns` (a name under
/run/netns or a path) the work runs in a thread that joined it (libbpf.in_netns).
"""

from __future__ import annotations

import ctypes as C
import fcntl
import ipaddress
import json
import os
import socket
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from meshd import names
from meshd.errors import BpfError, DataplaneError
from meshd.dataplane import libbpf as bpf
from meshd.dataplane import structs as S
from meshd.dataplane.pins import adopt_pins, ensure_bpffs, object_path, pin_new

# tc filter priority (both hooks): first, so filters at later priorities see translated
# packets -- the programs return TC_ACT_UNSPEC after a rewrite (the chain goes on), never
# TC_ACT_OK (which would end it); TC_ACT_SHOT only for a drop; TC_ACT_REDIRECT for a REJECT
# reply (TCP RST, ICMP port unreachable) sent back out the interface the request came in on.
PRIORITY = 1
TC_ACT_UNSPEC, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = -1, 0, 2, 7
CT_FWD, CT_REV, CT_SNAT_OUT, CT_SNAT_REV = 0, 1, 2, 3  # meshd_ct_key.dir


# ---- mirrors of bpf/include/meshd_tc.h (checked against BTF by tests/kernel/test_tc_packets.py)
class CtKey(C.Structure):
    _fields_ = [("saddr", S.Addr16), ("daddr", S.Addr16), ("sport", C.c_uint16),
                ("dport", C.c_uint16), ("proto", C.c_uint8), ("dir", C.c_uint8),
                ("pad", C.c_uint16)]


class CtVal(C.Structure):
    _fields_ = [("nat_addr", S.Addr16), ("nat_port", C.c_uint16), ("fin_fwd", C.c_uint8),
                ("fin_rev", C.c_uint8), ("rst", C.c_uint8), ("pad", C.c_uint8 * 3),
                ("backend", C.c_uint32), ("group", C.c_uint32), ("refreshed_ns", C.c_uint64)]


class FragKey(C.Structure):
    _fields_ = [("saddr", S.Addr16), ("daddr", S.Addr16), ("id", C.c_uint32),
                ("proto", C.c_uint8), ("dir", C.c_uint8), ("pad", C.c_uint16)]


class FragVal(C.Structure):
    _fields_ = [("addr", S.Addr16)]


STATS_COUNTERS = ("dnat", "revnat", "ct_new", "ct_repick", "ct_closed", "no_backend",
                  "frag_xlate", "icmp_xlate", "ct_shadowed", "errors", "snat", "unsnat",
                  "snat_new", "snat_fail", "reject", "drop_no_local", "src_range", "aff_follow")


class TcStats(C.Structure):
    _fields_ = [(n, C.c_uint64) for n in STATS_COUNTERS]


class TcCfg(C.Structure):
    _fields_ = [("unused", C.c_uint32), ("snat_port_min", C.c_uint16),
                ("snat_port_max", C.c_uint16)]


class TcAddr(C.Structure):
    _fields_ = [("v4", S.Addr16), ("v6", S.Addr16)]


class IfKey(C.Structure):
    _fields_ = [("netns_ino", C.c_uint64), ("ifindex", C.c_uint32), ("pad", C.c_uint32)]


class IfVal(C.Structure):
    _fields_ = [("name", C.c_char * 16), ("handle", C.c_uint32), ("priority", C.c_uint32),
                ("snat_port_min", C.c_uint16), ("snat_port_max", C.c_uint16)]


MIRRORS = {"meshd_ct_key": CtKey, "meshd_ct_val": CtVal, "meshd_frag_key": FragKey,
           "meshd_frag_val": FragVal, "meshd_tc_stats": TcStats, "meshd_tc_if_key": IfKey,
           "meshd_tc_if_val": IfVal, "meshd_tc_cfg": TcCfg, "meshd_tc_addr": TcAddr}


# ---- the flow hash: must equal meshd_flow_hash() in bpf/include/meshd_tc_select.h ----------
_M64 = (1 << 64) - 1
_SEED = 0x9E3779B97F4A7C15


def _fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _M64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _M64
    return k ^ (k >> 33)


def flow_hash(saddr: S.IPAddress, sport: int, dport: int, proto: int) -> int:
    """32-bit hash of (client address, client port, service port, protocol); ports in host
    order. The destination address is not part of it (see docs/tc.md)."""
    w = struct.unpack(">4I", bytes(S.pack_addr(saddr)))
    h = _fmix64(((w[0] << 32) | w[1]) ^ _SEED)
    h = _fmix64(h ^ ((w[2] << 32) | w[3]))
    h = _fmix64(h ^ ((sport << 24) | (dport << 8) | proto))
    return h & 0xFFFFFFFF


def flow_slot(saddr: S.IPAddress, sport: int, dport: int, proto: int, m: int) -> int:
    """The Maglev slot the tc path uses for a new flow."""
    return flow_hash(saddr, sport, dport, proto) % m


# ---- loading -------------------------------------------------------------------------------
def filter_handle(instance: str) -> int:
    """The tc filter handle of an instance's filters (stable, non-zero)."""
    return (zlib.crc32(f"meshd/{instance}".encode()) & 0x7FFFFFFF) or 1


def _check_socket_lb(pin_dir: Path, instance: str) -> None:
    missing = [n for n in names.SOCK_LB_MAPS if not (pin_dir / n).exists()]
    if missing:
        raise DataplaneError(
            f"instance {instance!r} has no socket LB maps at {pin_dir} (missing "
            f"{', '.join(missing)}): the tc path shares them; load the socket LB first "
            "(`meshd run` does, in that order)")
    meta = bpf.Map(bpf.obj_get(pin_dir / names.MAP_META), names.MAP_META, C.c_uint32, S.Meta)
    try:
        value = meta.lookup(C.c_uint32(0))
    finally:
        meta.close()
    if value is None or value.layout != S.LAYOUT_VERSION:
        raise DataplaneError(f"instance {instance!r} at {pin_dir} was never fully loaded "
                             f"by this meshd (maps layout {value.layout if value else 0}, "
                             f"need {S.LAYOUT_VERSION}): load the socket LB first")


class _IfValV1(C.Structure):  # meshd_tc_if_val before SNAT mode (no snat ports)
    _fields_ = [("name", C.c_char * 16), ("handle", C.c_uint32), ("priority", C.c_uint32)]


def _migrate_pins(pin_dir: Path) -> list[tuple[IfKey, IfVal]]:
    """Pins of an older meshd whose value layout grew since: the counters map is dropped
    (recreated empty: counters restart at zero), the interface record is read, dropped, and
    returned, to be written into the new map after load. libbpf would refuse to reuse them."""
    records: list[tuple[IfKey, IfVal]] = []
    stats, ifs = pin_dir / names.MAP_TC_STATS, pin_dir / names.MAP_TC_IFS
    if stats.exists():
        fd = bpf.obj_get(stats)
        try:
            old = bpf.map_info(fd, names.MAP_TC_STATS).value_size != C.sizeof(TcStats)
        finally:
            os.close(fd)
        if old:
            stats.unlink()
    if ifs.exists():
        m = bpf.Map(bpf.obj_get(ifs), names.MAP_TC_IFS, IfKey, _IfValV1)
        try:
            if bpf.map_info(m.fd, names.MAP_TC_IFS).value_size == C.sizeof(_IfValV1):
                records = [(IfKey(k.netns_ino, k.ifindex), IfVal(name=v.name, handle=v.handle,
                                                                   priority=v.priority))
                           for k, v in m.items()]
                ifs.unlink()
        finally:
            m.close()
    return records


def check_snat_ports(snat_ports: tuple[int, int] | None) -> tuple[int, int]:
    """(lo, hi) as the programs take them; (0, 0): SNAT mode off."""
    if snat_ports is None:
        return 0, 0
    lo, hi = snat_ports
    if not 1 <= lo <= hi <= 65535:
        raise DataplaneError(f"SNAT port range {lo}-{hi} is not within 1-65535 with low <= high")
    return lo, hi


def load(bpffs: Path, instance: str, ct_max_entries: int | None = None,
         snat_ports: tuple[int, int] | None = None) -> bpf.BpfObject:
    """Opens and loads the tc object of `instance`, sharing its pinned maps; pins the tc
    maps that were not pinned yet. The caller closes the returned object (filters and pins
    keep what they need). `ct_max_entries` sizes a conntrack map created by this call (four
    entries per SNAT flow, two per routed one; default 262,144); a pinned one keeps its size.
    `snat_ports` (lo, hi), inclusive: SNAT mode with source ports from that range."""
    ensure_bpffs(bpffs)
    pin_dir = names.pin_dir(bpffs, instance)
    _check_socket_lb(pin_dir, instance)
    lo, hi = check_snat_ports(snat_ports)
    obj = bpf.BpfObject(object_path(names.OBJ_TC_LB))
    try:
        obj.set_rodata(bytes(TcCfg(snat_port_min=lo, snat_port_max=hi)))
        if ct_max_entries:
            obj.set_max_entries(names.MAP_TC_CT, ct_max_entries)
        # Every map of meshd_maps.h, used or not: an unused one would be created (revnat
        # alone is 31 MB) if it were not adopted.
        migrated = _migrate_pins(pin_dir)
        adopted = adopt_pins(obj, pin_dir, names.SOCK_LB_MAPS + names.TC_MAPS)
        obj.load()
        pin_new(obj, pin_dir, names.TC_MAPS, adopted)
        if migrated:
            record = _if_map(pin_dir)
            try:
                for key, val in migrated:
                    record.update(key, val)
            finally:
                record.close()
        return obj
    except BaseException:
        obj.close()
        raise


# ---- attaching -------------------------------------------------------------------------------
def _ns_path(netns: str | Path | None) -> str | None:
    if netns is None:
        return None
    p = str(netns)
    return p if "/" in p else f"/run/netns/{p}"


def _run_in(netns: str | Path | None):
    path = _ns_path(netns)
    if path is None:
        return lambda fn: fn()
    if not os.path.exists(path):
        raise DataplaneError(f"network namespace {path} does not exist")
    return bpf.in_netns(path)


def _thread_netns_ino() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _ifindexes(interfaces, where: str) -> dict[str, int]:
    out, missing = {}, []
    for name in interfaces:
        try:
            out[name] = socket.if_nametoindex(name)
        except OSError:
            missing.append(name)
    if missing:
        raise DataplaneError(
            f"tc.interfaces: no interface {', '.join(repr(n) for n in missing)} in {where}; "
            "`ip -br link` lists the names there: fix tc.interfaces (or create the "
            "interface first)")
    return out


# Link types (ARPHRD_*) whose frames start with a 14-byte Ethernet header, as the programs
# parse them (bpf/include/meshd_tc_parse.h: ETH_HLEN); loopback has one too (all-zero addresses).
_ETHERNET_LIKE = {1: "ether", 772: "loopback"}
_LINK_TYPES = {65534: "none", 768: "ipip", 769: "tunnel6", 776: "sit", 778: "gre",
               823: "ip6gre", 512: "ppp"}
_SIOCGIFHWADDR = 0x8927


def link_type(name: str) -> int:
    """ARPHRD_* type of interface `name` in the calling thread's network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # made in this namespace
        ifr = fcntl.ioctl(s.fileno(), _SIOCGIFHWADDR, struct.pack("16s16x", name.encode()))
    return struct.unpack_from("H", ifr, 16)[0]


def _check_ethernet(idx: dict[str, int], where: str) -> None:
    """The programs parse Ethernet frames: on an L3 device (WireGuard, tun, ipip, gre) they
    would read the IP header 14 bytes too far and translate garbage. Refused, by name."""
    bad = {n: link_type(n) for n in idx}
    bad = {n: t for n, t in bad.items() if t not in _ETHERNET_LIKE}
    if bad:
        what = ", ".join(f"{n!r} (link type {_LINK_TYPES.get(t, t)})" for n, t in bad.items())
        raise DataplaneError(
            f"tc.interfaces: {what} in {where} carries bare IP packets, not Ethernet frames "
            "(WireGuard, tun, ipip/gre tunnels), and meshd's tc programs parse Ethernet "
            "frames only: remove it from tc.interfaces (the tc path does not support L3 "
            "devices; list the Ethernet interface the traffic arrives on, if it has one)")


def _if_map(pin_dir: Path) -> bpf.Map:
    return bpf.Map(bpf.obj_get(pin_dir / names.MAP_TC_IFS), names.MAP_TC_IFS, IfKey, IfVal)


def _addr_map(pin_dir: Path) -> bpf.Map:
    return bpf.Map(bpf.obj_get(pin_dir / names.MAP_TC_ADDRS), names.MAP_TC_ADDRS, C.c_uint32,
                   TcAddr)


def interface_addresses(name: str) -> TcAddr:
    """The first global address of each family on interface `name` of the calling thread's
    network namespace: the source SNAT gives requests leaving by it (zero: none)."""
    out = subprocess.run(["ip", "-j", "addr", "show", "dev", name], capture_output=True,
                         text=True, timeout=10)
    if out.returncode:
        raise DataplaneError(f"tc: cannot read the addresses of {name!r}: {out.stderr.strip()}")
    v4 = v6 = None
    for link in json.loads(out.stdout or "[]"):
        for a in link.get("addr_info", []):
            if a.get("scope") != "global" or a.get("tentative") or a.get("deprecated"):
                continue
            try:
                ip = ipaddress.ip_address(a["local"])
            except (KeyError, ValueError):
                continue
            if ip.version == 4 and v4 is None:
                v4 = ip
            elif ip.version == 6 and v6 is None:
                v6 = ip
    val = TcAddr()
    if v4 is not None:
        val.v4 = S.pack_addr(v4)
    if v6 is not None:
        val.v6 = S.pack_addr(v6)
    return val


def _detach_one(ifindex: int, handle: int, priority: int, what: str) -> bool:
    a = bpf.tc_detach(ifindex, bpf.TC_INGRESS, handle, priority, f"{what} ingress")
    b = bpf.tc_detach(ifindex, bpf.TC_EGRESS, handle, priority, f"{what} egress")
    return a or b


def attach_interfaces(bpffs: Path, instance: str, interfaces, netns: str | Path | None = None,
                      *, ct_max_entries: int | None = None, priority: int = PRIORITY,
                      snat_ports: tuple[int, int] | None = None) -> dict[str, int]:
    """Loads the tc programs of `instance` and attaches them (ingress and egress) to each
    interface, in `netns` (default: this process's namespace). Recorded interfaces of that
    namespace that are not in `interfaces` any more are detached. Every name is checked
    before anything is attached. `snat_ports` (lo, hi): SNAT mode; each interface's first
    global IPv4 and IPv6 address is recorded as the source for requests leaving by it.
    Returns {interface: ifindex}."""
    interfaces = list(dict.fromkeys(interfaces))
    where = f"network namespace {_ns_path(netns)}" if netns else "this network namespace"
    run = _run_in(netns)
    pin_dir = names.pin_dir(bpffs, instance)
    handle = filter_handle(instance)
    with load(bpffs, instance, ct_max_entries, snat_ports) as obj:
        prog_in, prog_out = obj.prog_fd(names.TC_PROG_INGRESS), obj.prog_fd(names.TC_PROG_EGRESS)
        record = _if_map(pin_dir)
        addrs = _addr_map(pin_dir)
        done: dict[str, int] = {}

        def work() -> None:
            idx = _ifindexes(interfaces, where)
            _check_ethernet(idx, where)
            ino = _thread_netns_ino()
            for name, ifindex in idx.items():  # before any program runs in SNAT mode
                addrs.update(C.c_uint32(ifindex), interface_addresses(name))
            for name, ifindex in idx.items():
                what = f"{name} ({where})"
                old = record.lookup(IfKey(netns_ino=ino, ifindex=ifindex))
                if old is not None and (old.handle, old.priority) != (handle, priority):
                    _detach_one(ifindex, old.handle, old.priority, what)  # priority changed
                bpf.tc_hook_create(ifindex, what)
                bpf.tc_attach(ifindex, bpf.TC_INGRESS, prog_in, handle, priority, what)
                bpf.tc_attach(ifindex, bpf.TC_EGRESS, prog_out, handle, priority, what)
                lo, hi = check_snat_ports(snat_ports)
                record.update(IfKey(netns_ino=ino, ifindex=ifindex),
                              IfVal(name=name.encode()[:15], handle=handle, priority=priority,
                                    snat_port_min=lo, snat_port_max=hi))
                done[name] = ifindex
            for key, val in list(record.items()):
                if key.netns_ino == ino and key.ifindex not in idx.values():
                    _detach_one(key.ifindex, val.handle, val.priority, val.name.decode())
                    record.delete(key)
                    addrs.delete(C.c_uint32(key.ifindex))
        try:
            run(work)
        finally:
            record.close()
            addrs.close()
    return done


def refresh_addresses(bpffs: Path, instance: str, interfaces,
                      netns: str | Path | None = None) -> None:
    """Re-reads the SNAT source address of each interface (after the node's addresses
    changed: DHCP, an address added after start). Interfaces that are gone are skipped."""
    pin_dir = names.pin_dir(bpffs, instance)
    if not (pin_dir / names.MAP_TC_ADDRS).exists():
        return
    addrs = _addr_map(pin_dir)

    def work() -> None:
        for name in interfaces:
            try:
                ifindex = socket.if_nametoindex(name)
            except OSError:
                continue
            addrs.update(C.c_uint32(ifindex), interface_addresses(name))
    try:
        _run_in(netns)(work)
    finally:
        addrs.close()


def detach_interfaces(bpffs: Path, instance: str, interfaces=None,
                      netns: str | Path | None = None) -> list[str]:
    """Detaches the instance's filters from `interfaces` (None: every recorded interface of
    that namespace) in `netns`. Interfaces without a filter (or gone) are skipped. Returns
    the interfaces a filter was removed from."""
    pin_dir = names.pin_dir(bpffs, instance)
    record = _if_map(pin_dir) if (pin_dir / names.MAP_TC_IFS).exists() else None
    addrs = _addr_map(pin_dir) if (pin_dir / names.MAP_TC_ADDRS).exists() else None
    handle = filter_handle(instance)
    removed: list[str] = []

    def work() -> None:
        ino = _thread_netns_ino()
        targets: dict[int, tuple[str, int, int]] = {}
        if record is not None:
            for key, val in record.items():
                if key.netns_ino == ino:
                    targets[key.ifindex] = (val.name.decode(), val.handle, val.priority)
        if interfaces is not None:
            wanted = {}
            for name in interfaces:
                try:
                    ifindex = socket.if_nametoindex(name)
                except OSError:
                    continue
                wanted[ifindex] = targets.get(ifindex, (name, handle, PRIORITY))
            targets = wanted
        for ifindex, (name, h, prio) in targets.items():
            if _detach_one(ifindex, h, prio, name):
                removed.append(name)
            if record is not None:
                record.delete(IfKey(netns_ino=ino, ifindex=ifindex))
            if addrs is not None:
                addrs.delete(C.c_uint32(ifindex))
    try:
        _run_in(netns)(work)
    finally:
        for m in (record, addrs):
            if m is not None:
                m.close()
    return removed


def detach_all(bpffs: Path, instance: str) -> list[str]:
    """Detaches every filter the instance recorded, in this namespace and in every named
    one (/run/netns) still there; records of namespaces that are gone are dropped. For
    `meshd cleanup`, before loader.remove()."""
    pin_dir = names.pin_dir(bpffs, instance)
    if not (pin_dir / names.MAP_TC_IFS).exists():
        return []
    record = _if_map(pin_dir)
    try:
        inos = {k.netns_ino for k in record.keys()}
    finally:
        record.close()
    paths = {os.stat("/proc/self/ns/net").st_ino: None}
    run_netns = Path("/run/netns")
    if run_netns.is_dir():
        for p in run_netns.iterdir():
            try:
                paths.setdefault(os.stat(p).st_ino, str(p))
            except OSError:
                continue
    removed = []
    for ino in inos:
        if ino in paths:
            removed += detach_interfaces(bpffs, instance, None, paths[ino])
    record = _if_map(pin_dir)
    try:
        for key in list(record.keys()):
            if key.netns_ino not in paths:
                record.delete(key)
    finally:
        record.close()
    return removed


def recorded_interfaces(bpffs: Path, instance: str) -> list[dict]:
    """Where the instance has tc filters (for `meshd services`): name, ifindex, network
    namespace inode, mode and SNAT range. Empty if the tc path was never loaded."""
    pin_dir = names.pin_dir(bpffs, instance)
    if not (pin_dir / names.MAP_TC_IFS).exists():
        return []
    record = _if_map(pin_dir)
    try:
        rows = [{"interface": v.name.decode(), "ifindex": k.ifindex, "netns_ino": k.netns_ino,
                 "mode": "snat" if v.snat_port_min else "routed",
                 "snat_ports": [v.snat_port_min, v.snat_port_max] if v.snat_port_min else None}
                for k, v in record.items()]
    finally:
        record.close()
    return sorted(rows, key=lambda r: (r["netns_ino"], r["interface"]))


# ---- reading -------------------------------------------------------------------------------
@dataclass
class TcMaps:
    """Open handles on an instance's tc maps (tests, tools)."""
    ct: bpf.Map
    frag: bpf.Map
    stats: bpf.PercpuMap
    addrs: bpf.Map  # ifindex -> TcAddr, the SNAT source addresses

    def counters(self) -> dict[str, int]:
        """struct meshd_tc_stats summed over CPUs."""
        return _sum_counters(self.stats)

    def close(self) -> None:
        for m in (self.ct, self.frag, self.stats, self.addrs):
            m.close()


def read_counters(bpffs: Path, instance: str) -> dict[str, int] | None:
    """The counters (summed over CPUs) from the pinned stats map alone; None if the instance
    never loaded the tc path."""
    pin = names.pin_dir(bpffs, instance) / names.MAP_TC_STATS
    if not pin.exists():
        return None
    stats = bpf.PercpuMap(bpf.obj_get(pin), names.MAP_TC_STATS, C.c_uint32, TcStats)
    try:
        return _sum_counters(stats)
    finally:
        stats.close()


def _sum_counters(stats: bpf.PercpuMap) -> dict[str, int]:
    value = stats.lookup(C.c_uint32(0))
    if value is None:
        return dict.fromkeys(STATS_COUNTERS, 0)
    copies = stats.copies(value)
    return {n: sum(getattr(c, n) for c in copies) for n in STATS_COUNTERS}


def open_maps(bpffs: Path, instance: str) -> TcMaps:
    pin_dir = names.pin_dir(bpffs, instance)
    if not (pin_dir / names.MAP_TC_CT).exists():
        raise DataplaneError(f"instance {instance!r} has no tc maps at {pin_dir}; "
                             "are tc.interfaces configured?")
    opened: list[bpf.Map] = []
    try:
        opened.append(bpf.Map(bpf.obj_get(pin_dir / names.MAP_TC_CT), names.MAP_TC_CT,
                              CtKey, CtVal))
        opened.append(bpf.Map(bpf.obj_get(pin_dir / names.MAP_TC_FRAG), names.MAP_TC_FRAG,
                              FragKey, FragVal))
        opened.append(bpf.PercpuMap(bpf.obj_get(pin_dir / names.MAP_TC_STATS),
                                    names.MAP_TC_STATS, C.c_uint32, TcStats))
        opened.append(_addr_map(pin_dir))
    except BpfError:
        for m in opened:
            m.close()
        raise
    return TcMaps(*opened)
