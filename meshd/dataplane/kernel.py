"""The reconciler's Dataplane, on the real pinned maps (see meshd.reconciler.Dataplane)."""

from __future__ import annotations

import ctypes as C
import ipaddress
import socket
import struct
import threading
import time
from array import array

import numpy as np

from meshd import names
from meshd.desired import BackendRef, Frontend
from meshd.errors import BpfError, DataplaneError
from meshd.reconciler import KernelSnapshot
from meshd.dataplane import libbpf as bpf
from meshd.dataplane import structs as S
from meshd.dataplane import native, tables
from meshd.dataplane.loader import Maps


BACKEND_BATCH = 8192  # backend entries per bpf_map_update_batch call
# struct meshd_backend (structs.Backend): address (IPv4 as ::ffff:a.b.c.d), port in network
# order, protocol, family, flags
_BACKEND = struct.Struct("=16sHBBI")
_V4_PREFIX = b"\0" * 10 + b"\xff\xff"
assert _BACKEND.size == C.sizeof(S.Backend)

# A UDP flow quiet this long no longer holds a draining backend (netfilter's UDP timeout).
UDP_IDLE_SECONDS = 30
CLOCK_MONOTONIC_COARSE = 6  # linux/time.h (Python 3.11's time module does not name it)


def coarse_now_ns() -> int:
    """The clock of bpf_ktime_get_coarse_ns(), which the tc conntrack entries carry."""
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


class _Grace:
    """When the last RCU grace period known to have completed started, kept fresh by a
    thread after frontend writes: a half a group's frontends left may be rewritten in place
    only once no BPF program that read the old frontend value can still be running, i.e.
    after a grace period that started after the flip. A change of a group that flipped
    less than a grace period ago waits for one (rcu_grace_period); any other costs nothing."""

    def __init__(self) -> None:
        self.done = 0.0  # time.monotonic() at the start of the last completed grace period
        self.works = True
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def wait(self, since: float | None = None) -> None:
        """Returns once a grace period that started after `since` (default: now) ended."""
        start = time.monotonic()
        since = start if since is None else since
        with self._lock:
            if self.done > since:
                return  # (the background one, which held the lock meanwhile)
            self.works = bpf.rcu_grace_period()
            if self.works:
                self.done = max(self.done, start)

    def soon(self) -> None:
        """Something flipped: have a grace period run in the background."""
        self._wake.set()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="meshd-rcu-grace",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while self._wake.wait(1.0):  # idle for a second: exit (restarted by soon())
            self._wake.clear()
            self.wait()


class KernelDataplane:
    def __init__(self, maps: Maps):
        self.maps = maps
        self._grace = _Grace()
        self._flipped: dict[int, float] = {}  # gid -> last frontend write (a flip, maybe)
        self.maglev_m = maps.maglev_m  # maglev.table_size when fixed; 0: auto (per group)
        self.maglev_max = maps.maglev_max  # the largest size auto may pick
        native.install()  # the reconciler's tables for these maps: the compiled fill
        self.swapped_instead: set[int] = set()  # of the last put_tables: halves written fresh

    # ---- writes -----------------------------------------------------------------------------
    def put_backend(self, bid: int, ref: BackendRef) -> None:
        self.maps.backends.update(C.c_uint32(bid), S.backend(ref.address, ref.port, ref.protocol))

    def put_backends(self, items: list[tuple[int, BackendRef]]) -> dict[int, str]:
        """Writes many backend entries with bpf_map_update_batch (one syscall per
        BACKEND_BATCH; the kernel writes them one after the other). An entry the batch stops
        at, and those after it, are written one by one, so each failure is its own (a full
        map: E2BIG for the ones that do not fit). Returns {bid: error} of those not written."""
        failed: dict[int, str] = {}
        tcp, udp, htons = socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.htons
        v4, v6 = socket.AF_INET, socket.AF_INET6
        pack = _BACKEND.pack
        for start in range(0, len(items), BACKEND_BATCH):
            chunk = items[start:start + BACKEND_BATCH]
            rows = []
            for _bid, ref in chunk:
                a = ref.address
                proto = tcp if ref.protocol == "TCP" else udp if ref.protocol == "UDP" else \
                    S.IPPROTO[ref.protocol]
                if a.version == 4:
                    rows.append(pack(_V4_PREFIX + a.packed, htons(ref.port), proto, v4, 0))
                else:
                    rows.append(pack(a.packed, htons(ref.port), proto, v6, 0))
            n = len(chunk)
            keys = (C.c_uint32 * n).from_buffer(array("I", [bid for bid, _r in chunk]))
            values = (S.Backend * n).from_buffer_copy(b"".join(rows))
            try:
                self.maps.backends.update_batch(keys, values)
                continue
            except BpfError as e:
                done = e.done
            for i in range(done, n):  # the rest one by one: each failure its own
                try:
                    self.maps.backends.update(C.c_uint32(chunk[i][0]), values[i])
                except BpfError as e1:
                    failed[chunk[i][0]] = str(e1)
        return failed

    def delete_backend(self, bid: int) -> None:
        self.maps.backends.delete(C.c_uint32(bid))

    # ---- Maglev tables (meshd_maglev_v3: header, two halves, members; tables.py) ----------
    def _open_inner(self, gid: int) -> int | None:
        inner_id = self.maps.maglev.lookup(C.c_uint32(gid))
        if inner_id is None:
            return None
        return bpf.map_fd_by_id(inner_id.value, f"{names.MAP_MAGLEV}[{gid}]")

    def _write_half(self, gid: int, table: np.ndarray, half: int) -> None:
        """Writes `table` into one half of the group's inner map in place (no map-in-map
        update, so no RCU wait). The caller makes sure no frontend names that half.
        tables.MemberRoom if its backends do not fit the member room of that map."""
        flipped = self._flipped.get(gid, -1.0)
        if flipped >= self._grace.done:
            self._grace.wait(flipped)  # flipped less than a grace period ago: readers may
            # still read the half it left
            if not self._grace.works:
                raise ValueError("no RCU grace period (membarrier) on this kernel")
        fd = self._open_inner(gid)
        if fd is None:
            raise ValueError(f"group {gid} has no table to write a half of")
        try:
            what = f"{names.MAP_MAGLEV}[{gid}]"
            header = bpf.Map(fd, what, C.c_uint32, S.TableChunk).lookup(C.c_uint32(0))
            if header is None or header.slot[0] != table.size:
                have = header.slot[0] if header is not None else 0
                raise ValueError(f"group {gid}'s table has {have} slots, not {table.size}")
            tables.write_half(fd, what, header, table, half, self.maglev_m)
        finally:
            bpf.close_fd(fd)

    def put_tables(self, items: list[tuple[int, np.ndarray, int | None]]) -> dict[int, str]:
        """Writes tables: (gid, table, half) writes `half` (0 or 1) of the group's table of
        the same size in place, with plain array updates (the frontends then flip to it);
        (gid, table, None) writes a fresh inner map (both halves) and swaps it in: each swap
        is atomic, and a batch of swaps pays the kernel's RCU wait for map-in-map updates
        once. A half whose backends outgrew its map's member room is written fresh instead
        (both halves hold the new table: whichever half the frontends name reads it, and
        its backends are in the kernel before any table names them). Returns {gid: error}
        for the tables that were not written."""
        failed: dict[int, str] = {}
        fresh: list[tuple[int, np.ndarray]] = []
        self.swapped_instead = set()
        for item in items:
            gid, table, half = (*item, None)[:3]  # (gid, table) alone: fresh
            if half is None:
                fresh.append((gid, table))
                continue
            try:
                self._write_half(gid, table, half)
            except tables.MemberRoom:
                fresh.append((gid, table))
                self.swapped_instead.add(gid)
            except (BpfError, ValueError) as e:
                failed[gid] = str(e)
        failed.update(tables.swap_in(self.maps.maglev, fresh, self.maglev_m))
        return failed

    def put_table(self, gid: int, table: np.ndarray, half: int | None = None) -> None:
        failed = self.put_tables([(gid, table, half)])
        if failed:
            raise DataplaneError(failed[gid])

    def table_size(self, gid: int) -> int:
        """M of the group's table in the kernel; 0: none."""
        fd = self._open_inner(gid)
        if fd is None:
            return 0
        try:
            header = bpf.Map(fd, names.MAGLEV_INNER_NAME, C.c_uint32, S.TableChunk).lookup(
                C.c_uint32(0))
        finally:
            bpf.close_fd(fd)
        return 0 if header is None else int(header.slot[0])

    def get_table(self, gid: int, half: int = 0) -> np.ndarray | None:
        """One half of the group's table as backend ids (the frontends'
        MESHD_SVC_F_TABLE_B says which one readers use); None: no table."""
        fd = self._open_inner(gid)
        if fd is None:
            return None
        try:
            return tables.read_half(fd, names.MAGLEV_INNER_NAME, half)
        finally:
            bpf.close_fd(fd)

    def delete_tables(self, gids: list[int]) -> dict[int, str]:
        """Removes tables in batches (one RCU wait per batch). Missing ones count as removed."""
        failed: dict[int, str] = {}
        for start in range(0, len(gids), tables.TABLE_BATCH):
            chunk = gids[start:start + tables.TABLE_BATCH]
            try:
                self.maps.maglev.delete_batch((C.c_uint32 * len(chunk))(*chunk))
            except BpfError as e:
                for gid in chunk[e.done:]:
                    try:
                        self.maps.maglev.delete(C.c_uint32(gid))
                    except BpfError as e1:
                        failed[gid] = str(e1)
        return failed

    def delete_table(self, gid: int) -> None:
        self.maps.maglev.delete(C.c_uint32(gid))

    def _flip(self, gid: int) -> None:
        self._flipped[gid] = time.monotonic()
        self._grace.soon()

    def _put_fe(self, fmap, fe: Frontend, gid: int, count: int, flags: int) -> None:
        fmap.update(S.svc_key(fe.vip, fe.port, fe.protocol),
                    S.SvcVal(id=gid, count=count, flags=flags))
        self._flip(gid)

    def put_frontend(self, fe: Frontend, gid: int, count: int, flags: int = 0) -> None:
        self._put_fe(self.maps.svc, fe, gid, count, flags)

    def delete_frontend(self, fe: Frontend) -> None:
        self.maps.svc.delete(S.svc_key(fe.vip, fe.port, fe.protocol))

    def put_ext_frontend(self, fe: Frontend, gid: int, count: int, flags: int = 0) -> None:
        self._put_fe(self.maps.svc_ext, fe, gid, count, flags)

    def delete_ext_frontend(self, fe: Frontend) -> None:
        self.maps.svc_ext.delete(S.svc_key(fe.vip, fe.port, fe.protocol))

    def put_affinity(self, gid: int, timeout: int) -> None:
        self.maps.affcfg.update(C.c_uint32(gid), C.c_uint32(timeout))

    def delete_affinity(self, gid: int) -> None:
        self.maps.affcfg.delete(C.c_uint32(gid))

    def put_member(self, gid: int, bid: int, weight: int) -> None:
        self.maps.members.update(S.MemberKey(group=gid, backend=bid), C.c_uint32(weight))

    def delete_member(self, gid: int, bid: int) -> None:
        self.maps.members.delete(S.MemberKey(group=gid, backend=bid))

    def put_srcrange(self, fe: Frontend, net) -> None:
        self.maps.srcranges.update(S.srcrange_key(fe.vip, fe.port, fe.protocol, net),
                                   C.c_uint8(1))

    def delete_srcrange(self, fe: Frontend, net) -> None:
        self.maps.srcranges.delete(S.srcrange_key(fe.vip, fe.port, fe.protocol, net))

    # ---- draining: what the tc path's conntrack still names ---------------------------------
    def _ct_pin(self):
        return self.maps.pin_dir / names.MAP_TC_CT

    def tc_conntrack(self) -> bool:
        return self._ct_pin().exists()

    def flow_backends(self) -> set[int] | None:
        """Backend ids named by tc conntrack entries of live flows: request (FWD) entries of
        TCP flows not closed (no RST, not FIN both ways) and of UDP flows with a packet in
        the last UDP_IDLE_SECONDS (kube-proxy drops UDP conntrack of removed endpoints;
        a quiet UDP flow is balanced afresh). None: the tc path is not loaded."""
        from meshd.dataplane import tc
        try:
            fd = bpf.obj_get(self._ct_pin())
        except BpfError:
            return None
        ct = bpf.Map(fd, names.MAP_TC_CT, tc.CtKey, tc.CtVal)
        kdt, vdt = np.dtype(tc.CtKey), np.dtype(tc.CtVal)
        now = coarse_now_ns()
        out: set[int] = set()
        try:
            for kb, vb, _n in ct.raw_batches():
                k, v = np.frombuffer(kb, dtype=kdt), np.frombuffer(vb, dtype=vdt)
                fwd = k["dir"] == tc.CT_FWD
                tcp = fwd & (k["proto"] == socket.IPPROTO_TCP) & (v["rst"] == 0) & \
                    ((v["fin_fwd"] == 0) | (v["fin_rev"] == 0))
                udp = fwd & (k["proto"] == socket.IPPROTO_UDP) & \
                    (v["refreshed_ns"].astype(np.int64) > now - UDP_IDLE_SECONDS * 10**9)
                out.update(np.unique(v["backend"][tcp | udp]).tolist())
        finally:
            ct.close()
        return out

    # ---- authorization (meshd/verdicts.py) ----------------------------------------------------
    @property
    def _pol(self):
        if getattr(self, "_policy_maps", None) is None:
            from meshd.dataplane.policy_maps import PolicyMaps
            pin = self.maps.pin_dir
            self._policy_maps = PolicyMaps(pin.parent.parent, pin.name)
        return self._policy_maps

    def put_verdict(self, identity: int, gid: int, uid: int, action: int, flags: int,
                    policy: int) -> None:
        self._pol.verdict.update(S.VerdictKey(identity=identity, group=gid, uid=uid),
                                 S.Verdict(action=action, flags=flags, policy=policy))

    def delete_verdict(self, identity: int, gid: int, uid: int) -> None:
        self._pol.verdict.delete(S.VerdictKey(identity=identity, group=gid, uid=uid))

    def put_ident(self, cgid: int, identity: int) -> None:
        from meshd.dataplane.policy_maps import _U64
        self._pol.ident.update(_U64(cgid), S.Ident(identity=identity))

    def delete_ident(self, cgid: int) -> None:
        from meshd.dataplane.policy_maps import _U64
        self._pol.ident.delete(_U64(cgid))

    def put_subtree(self, cgid: int, identity: int) -> None:
        from meshd.dataplane.policy_maps import _U64
        self._pol.subtree.update(_U64(cgid), S.Ident(identity=identity))

    def delete_subtree(self, cgid: int) -> None:
        from meshd.dataplane.policy_maps import _U64
        self._pol.subtree.delete(_U64(cgid))

    def put_name(self, gid: int, key: str) -> None:
        self.maps.names.update(C.c_uint32(gid), S.SvcName(name=key.encode()[:159]))

    def delete_name(self, gid: int) -> None:
        self.maps.names.delete(C.c_uint32(gid))

    # ---- reads ------------------------------------------------------------------------------
    def snapshot(self) -> KernelSnapshot:
        snap = KernelSnapshot()
        for k, v in self.maps.svc.items():
            proto = S.PROTO_NAME.get(k.proto)
            if proto is None:
                continue
            fe = Frontend(S.unpack_addr(k.addr), S.port_host(k.port), proto)
            snap.frontends[fe] = (v.id, v.count, v.flags)
        for k, v in self.maps.svc_ext.items():
            proto = S.PROTO_NAME.get(k.proto)
            if proto is not None:
                fe = Frontend(S.unpack_addr(k.addr), S.port_host(k.port), proto)
                snap.ext_frontends[fe] = (v.id, v.count, v.flags)
        snap.affinity = {k.value: v.value for k, v in self.maps.affcfg.items()}
        for k, v in self.maps.members.items():
            snap.members.setdefault(k.group, {})[k.backend] = v.value
        for k in self.maps.srcranges.keys():
            parsed = S.parse_srcrange_key(k)
            if parsed is not None:
                vip, port, proto, net = parsed
                snap.srcranges.add((Frontend(vip, port, proto), net))
        for k, v in self.maps.backends.items():
            addr = S.unpack_addr(v.addr)
            if v.family == socket.AF_INET6 and addr.version == 4:
                addr = ipaddress.IPv6Address(bytes(v.addr))  # a real ::ffff: backend
            snap.backends[k.value] = BackendRef(addr, S.port_host(v.port),
                                                S.PROTO_NAME.get(v.proto, str(v.proto)))
        for k, v in self.maps.names.items():
            snap.names[k.value] = v.name.decode(errors="replace")
        snap.tables = {k.value for k in self.maps.maglev.keys()}
        snap.table_sizes = {gid: self.table_size(gid) for gid in snap.tables}
        snap.idents, verdicts = self._pol.read()
        snap.subtree = self._pol.read_subtree()
        for (identity, gid, uid), val in verdicts.items():
            snap.verdicts.setdefault(gid, {})[(identity, uid)] = val
        return snap
