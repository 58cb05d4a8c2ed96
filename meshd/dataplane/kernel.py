"""The reconciler's Dataplane, on the real pinned maps (see meshd.reconciler.Dataplane)."""

from __future__ import annotations

import ctypes as C
import ipaddress
import socket
import time

import numpy as np

from meshd import names
from meshd.desired import BackendRef, Frontend
from meshd.errors import BpfError, DataplaneError
from meshd.reconciler import KernelSnapshot
from meshd.dataplane import libbpf as bpf
from meshd.dataplane import structs as S
from meshd.dataplane.loader import Maps


# Tables swapped per batch syscall (each holds an inner-map fd open until the swap).
TABLE_BATCH = 256
# A UDP flow quiet this long no longer holds a draining backend (netfilter's UDP timeout).
UDP_IDLE_SECONDS = 30
CLOCK_MONOTONIC_COARSE = 6  # linux/time.h (Python 3.11's time module does not name it)


def coarse_now_ns() -> int:
    """The clock of bpf_ktime_get_coarse_ns(), which the tc conntrack entries carry."""
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


class KernelDataplane:
    def __init__(self, maps: Maps):
        self.maps = maps
        self.maglev_m = maps.maglev_m

    # ---- writes -----------------------------------------------------------------------------
    def put_backend(self, bid: int, ref: BackendRef) -> None:
        self.maps.backends.update(C.c_uint32(bid), S.backend(ref.address, ref.port, ref.protocol))

    def delete_backend(self, bid: int) -> None:
        self.maps.backends.delete(C.c_uint32(bid))

    def _inner(self, table: np.ndarray) -> int:
        """A fresh inner map holding `table`; returns its fd (the caller closes it)."""
        m = self.maglev_m
        if table.shape != (m,):
            raise ValueError(f"table has {table.shape[0]} slots, the maps hold {m}")
        value = (C.c_uint32 * m).from_buffer_copy(np.ascontiguousarray(table, dtype=np.uint32))
        fd = bpf.map_create(bpf.MAP_TYPE_ARRAY, names.MAGLEV_INNER_NAME, 4, 4 * m, 1)
        try:
            bpf.Map(fd, names.MAGLEV_INNER_NAME, C.c_uint32, C.c_uint32 * m).update(
                C.c_uint32(0), value)
        except BaseException:
            bpf.close_fd(fd)
            raise
        return fd

    def put_tables(self, items: list[tuple[int, np.ndarray]]) -> dict[int, str]:
        """Writes each table into a fresh inner map, then swaps them in: each swap is atomic,
        and a batch pays the kernel's RCU wait for map-in-map updates once, not per table.
        Returns {gid: error} for the tables that were not written."""
        failed: dict[int, str] = {}
        for start in range(0, len(items), TABLE_BATCH):
            gids, fds = [], []
            try:
                for gid, table in items[start:start + TABLE_BATCH]:
                    try:
                        fds.append(self._inner(table))
                        gids.append(gid)
                    except (BpfError, ValueError) as e:
                        failed[gid] = str(e)
                if not gids:
                    continue
                n = len(gids)
                try:
                    self.maps.maglev.update_batch((C.c_uint32 * n)(*gids), (C.c_uint32 * n)(*fds))
                except BpfError as e:  # find out which ones: the rest one by one
                    for gid, fd in list(zip(gids, fds))[e.done:]:
                        try:
                            self.maps.maglev.update(C.c_uint32(gid), C.c_uint32(fd))
                        except BpfError as e1:
                            failed[gid] = str(e1)
            finally:
                for fd in fds:
                    bpf.close_fd(fd)  # the outer map holds its own reference
        return failed

    def put_table(self, gid: int, table: np.ndarray) -> None:
        failed = self.put_tables([(gid, table)])
        if failed:
            raise DataplaneError(failed[gid])

    def get_table(self, gid: int) -> np.ndarray | None:
        inner_id = self.maps.maglev.lookup(C.c_uint32(gid))
        if inner_id is None:
            return None
        fd = bpf.map_fd_by_id(inner_id.value, f"{names.MAP_MAGLEV}[{gid}]")
        try:
            m = self.maglev_m
            value = bpf.Map(fd, names.MAGLEV_INNER_NAME, C.c_uint32, C.c_uint32 * m).lookup(
                C.c_uint32(0))
        finally:
            bpf.close_fd(fd)
        return None if value is None else np.frombuffer(bytes(value), dtype=np.uint32).copy()

    def delete_tables(self, gids: list[int]) -> dict[int, str]:
        """Removes tables in batches (one RCU wait per batch). Missing ones count as removed."""
        failed: dict[int, str] = {}
        for start in range(0, len(gids), TABLE_BATCH):
            chunk = gids[start:start + TABLE_BATCH]
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

    def put_frontend(self, fe: Frontend, gid: int, count: int, flags: int = 0) -> None:
        self.maps.svc.update(S.svc_key(fe.vip, fe.port, fe.protocol),
                             S.SvcVal(id=gid, count=count, flags=flags))

    def delete_frontend(self, fe: Frontend) -> None:
        self.maps.svc.delete(S.svc_key(fe.vip, fe.port, fe.protocol))

    def put_ext_frontend(self, fe: Frontend, gid: int, count: int, flags: int = 0) -> None:
        self.maps.svc_ext.update(S.svc_key(fe.vip, fe.port, fe.protocol),
                                 S.SvcVal(id=gid, count=count, flags=flags))

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
        return snap
