"""Maglev tables in the kernel (meshd_maglev_v3): a size per group, and changes that flip
between two halves of a group's table with plain array writes (no map-in-map update).

The tc ingress program runs through BPF_PROG_TEST_RUN on the maps of a real instance, so the
pick is the datapath's own (bpf/include/meshd_maglev.h, shared with the socket hooks).
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import threading
import time

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP

from meshd import maglev, names
from meshd.dataplane import libbpf as bpf
from meshd.dataplane import loader, tables, tc
from meshd.dataplane import structs as S
from meshd.dataplane.kernel import KernelDataplane
from meshd.desired import BackendRef, Frontend
from test_tc_packets import CLIENT, TCP_P, Env, syn

VIP = "10.96.0.10"
BACKENDS = 64  # versions of the hammered table cycle through these


class AutoEnv(Env):
    """Env with maglev.table_size auto (each group its own size)."""

    def __init__(self):
        real = loader.load
        loader.load = lambda bpffs, inst, cg, m, **kw: real(bpffs, inst, cg, 0, **kw)
        try:
            super().__init__()
        finally:
            loader.load = real


def _daddr(out: bytes) -> str:
    return str(ipaddress.IPv4Address(out[14 + 16:14 + 20]))


def test_chunk_mirror_matches_the_inner_map_the_object_defines():
    """TableChunk is the value of the inner arrays: the size the compiled object's template
    has (not in BTF: see meshd_maps.h)."""
    with bpf.BpfObject(loader.object_path(names.OBJ_SOCK_LB)) as obj:
        size = obj.inner_value_size(names.MAP_MAGLEV)
    assert size == ctypes.sizeof(S.TableChunk) == 4 * S.TABLE_CHUNK


def test_groups_get_tables_of_their_own_size_and_packets_follow_them():
    """Auto sizes: 1 backend -> 251 slots, 11 -> 2039, weights 30 -> 4093; the tc pick of
    every flow is the slot of the flow hash modulo the group's own size."""
    e = AutoEnv()
    try:
        specs = {"one": 1, "eleven": 11}
        services = []
        for i, (name, n) in enumerate(specs.items()):
            services.append({"namespace": "t", "name": name, "vips": [f"10.96.1.{i + 1}"],
                             "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                             "endpoints": [{"address": f"10.0.{i + 1}.{j + 1}",
                                            "ports": {"http": 8080}} for j in range(n)]})
        services.append({"namespace": "t", "name": "heavy", "vips": ["10.96.1.9"],
                         "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                         "endpoints": [{"address": f"10.0.9.{j + 1}", "ports": {"http": 8080},
                                        "weight": 10} for j in range(3)]})
        e.apply(*services)
        dp = e.rec.dp
        sizes = {key.split(":")[0]: dp.table_size(a.gid) for key, a in e.rec.groups.items()}
        assert sizes == {"t/one": 251, "t/eleven": 2039, "t/heavy": 4093}
        for vip, addrs, m in (("10.96.1.1", ["10.0.1.1"], 251),
                              ("10.96.1.2", [f"10.0.2.{j + 1}" for j in range(11)], 2039),
                              ("10.96.1.9", [f"10.0.9.{j + 1}" for j in range(3)], 4093)):
            refs = sorted((f"{a}:8080/TCP", a) for a in addrs)
            weights = 10 if m == 4093 else 1
            table = maglev.build_table([(n, weights) for n, _a in refs], m)
            for sport in range(20000, 20040):
                verdict, out = e.run("in", syn(sport, dst=vip))
                slot = tc.flow_slot(ipaddress.ip_address(CLIENT), sport, 80, TCP_P, m)
                assert _daddr(out) == refs[table[slot]][1], (vip, sport)
        # growing past 1% imbalance moves a group to the size for its weight (a fresh table)
        services[0]["endpoints"] = [{"address": f"10.0.1.{j + 1}", "ports": {"http": 8080}}
                                    for j in range(5)]  # 251 slots / 5: 1.6% off
        e.apply(*services)
        assert dp.table_size(e.rec.groups["t/one:http/ipv4"].gid) == 509
    finally:
        e.close()


def _hammer(broken: bool, seconds: float) -> tuple[int, int, list[str]]:
    """A writer rewrites one group's table (version v: every slot = backend v % 64) the way
    the reconciler does -- the idle half, then the frontend flip -- while a reader thread
    sends new flows through the tc program. `broken`: the writer writes the half readers
    use (what the flip exists to avoid). Returns (versions, reads, violations)."""
    e = Env()
    try:
        dp = e.rec.dp
        refs = [BackendRef(ipaddress.ip_address(f"10.0.8.{i + 1}"), 8080, "TCP")
                for i in range(BACKENDS)]
        for i, ref in enumerate(refs):
            dp.put_backend(i + 1, ref)
        fe = Frontend(ipaddress.ip_address(VIP), 80, "TCP")
        m = dp.maglev_m
        dp.put_table(1, np.full(m, 1, dtype=np.uint32))  # version 0, both halves
        dp.put_frontend(fe, 1, 1, 0)
        state = {"committed": 0, "flipping": 0}
        stop = threading.Event()
        # a new flow per packet (a tracked one keeps its backend): the template's TCP source
        # port patched (the program does not verify the TCP checksum it updates)
        template = bytearray(bytes(syn(1, dst=VIP)))
        violations: list[str] = []
        reads = 0

        def writer() -> None:
            v, half = 0, 0
            while not stop.is_set():
                v += 1
                target = half if broken else 1 - half
                dp.put_table(1, np.full(m, v % BACKENDS + 1, dtype=np.uint32), target)
                state["flipping"] = v
                dp.put_frontend(fe, 1, 1, S.SVC_F_TABLE_B if target else 0)
                half = target
                state["committed"] = v

        t = threading.Thread(target=writer)
        t.start()
        try:
            end = time.monotonic() + seconds
            i = 0
            while time.monotonic() < end and len(violations) < 5 and i < 60000:
                c0 = state["committed"]
                template[34:36] = (1024 + i % 64000).to_bytes(2, "big")
                verdict, out, _ns = bpf.prog_test_run(e.fd["in"], bytes(template), "in")
                f1 = state["flipping"]
                i += 1
                reads += 1
                got = int(_daddr(out).rsplit(".", 1)[1]) - 1  # the backend index = v % 64
                if not any(v % BACKENDS == got for v in range(c0, f1 + 1)):
                    violations.append(f"read version ~{got} (mod {BACKENDS}) while versions "
                                      f"{c0}..{f1} were live")
        finally:
            stop.set()
            t.join(10)
        return state["committed"], reads, violations
    finally:
        e.close()


def test_readers_never_see_a_table_being_written():
    """Every packet gets a backend of a table that was live during its run: never one of
    the half being filled (which no frontend names until the flip), never a stale one."""
    versions, reads, violations = _hammer(broken=False, seconds=3.0)
    assert versions > 20 and reads > 2000, (versions, reads)
    assert violations == []


def test_the_check_catches_a_writer_on_the_live_half():
    """The same check against a writer that rewrites the half readers use: it sees it."""
    _versions, _reads, violations = _hammer(broken=True, seconds=3.0)
    assert violations, "writing the live half went unnoticed: the check proves nothing"


def test_a_change_of_the_same_size_costs_no_grace_period():
    """A change of a group that has been quiet for a moment (a grace period ran in the
    background after its last flip) writes a half and flips in well under the RCU wait
    every map-in-map swap pays (several ms here): median over 30 changes of each."""
    e = Env()
    try:
        dp = e.rec.dp
        m = dp.maglev_m
        dp.put_backend(1, BackendRef(ipaddress.ip_address("10.0.8.1"), 8080, "TCP"))
        fe = Frontend(ipaddress.ip_address(VIP), 80, "TCP")
        dp.put_table(1, np.full(m, 1, dtype=np.uint32))
        dp.put_frontend(fe, 1, 1, 0)
        flip, swap = [], []
        for k in range(30):
            time.sleep(0.05)
            t0 = time.perf_counter()
            dp.put_table(1, np.full(m, 1, dtype=np.uint32), 1 - k % 2)
            dp.put_frontend(fe, 1, 1, 0 if k % 2 else S.SVC_F_TABLE_B)
            flip.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            dp.put_table(1, np.full(m, 1, dtype=np.uint32))
            swap.append(time.perf_counter() - t0)
        flip_ms, swap_ms = np.median(flip) * 1e3, np.median(swap) * 1e3
        print(f"median change: flip {flip_ms:.3f} ms, map-in-map swap {swap_ms:.3f} ms")
        assert flip_ms < 1.0 and flip_ms * 4 < swap_ms, (flip_ms, swap_ms)
    finally:
        e.close()


def _pin_older_outer(pin_dir, name: str, tmpl: int, outer_fd: int, inner: int) -> None:
    """Pins `outer_fd` as an older meshd's outer Maglev map `name` holding `inner` as group
    7's table; closes the three fds."""
    try:
        outer = bpf.Map(outer_fd, name, ctypes.c_uint32, ctypes.c_uint32)
        outer.update(ctypes.c_uint32(7), ctypes.c_uint32(inner))
        bpf.obj_pin(outer_fd, pin_dir / name)
    finally:
        for fd in (tmpl, outer_fd, inner):
            os.close(fd)


def test_layout_1_tables_are_migrated_before_the_programs_switch():
    """Maps pinned by a meshd of layout 1 (meshd_maglev_v1: one value of M slots per inner
    map, M in meshd_meta_v1) are adopted: every table is copied into meshd_maglev_v3 at its
    old size before the new programs replace the old ones, and the old pin goes."""
    e = Env()
    try:
        pin_dir = e.maps.pin_dir
        m = 1021
        table = (np.arange(m, dtype=np.uint32) % 3) + 1
        # what a layout-1 meshd leaves pinned
        (pin_dir / names.MAP_MAGLEV).unlink()
        tmpl = bpf.map_create(bpf.MAP_TYPE_ARRAY, "meshd_v1_tmpl", 4, 4 * m, 1)
        outer_fd = bpf.map_create(bpf.MAP_TYPE_HASH_OF_MAPS, names.MAP_MAGLEV_V1, 4, 4, 16,
                                  inner_map_fd=tmpl)
        inner = bpf.map_create(bpf.MAP_TYPE_ARRAY, "meshd_mglv_tbl", 4, 4 * m, 1)
        bpf.Map(inner, "inner", ctypes.c_uint32, ctypes.c_uint32 * m).update(
            ctypes.c_uint32(0), (ctypes.c_uint32 * m).from_buffer_copy(table.tobytes()))
        _pin_older_outer(pin_dir, names.MAP_MAGLEV_V1, tmpl, outer_fd, inner)
        e.maps.meta.update(ctypes.c_uint32(0), S.Meta(maglev_m=m, layout=1))
        maps = loader.load(pin_dir.parent.parent, e.instance, e.cgroup, 0, metrics=False)
        try:
            dp = KernelDataplane(maps)
            assert dp.table_size(7) == m
            assert (dp.get_table(7, 0) == table).all() and (dp.get_table(7, 1) == table).all()
            assert not (pin_dir / names.MAP_MAGLEV_V1).exists()
            assert maps.meta.lookup(ctypes.c_uint32(0)).layout == S.LAYOUT_VERSION
        finally:
            maps.close()
    finally:
        e.close()


def test_layout_2_tables_are_migrated_half_by_half():
    """Maps pinned by a meshd of layout 2 (meshd_maglev_v2: 32-bit slots, header M and
    chunks per half) are adopted: each table is copied into meshd_maglev_v3 with each half
    as it was (a group mid-change keeps both), before the new programs replace the old
    ones; the old pin goes."""
    e = Env()
    try:
        pin_dir = e.maps.pin_dir
        m, n = 1021, -(-1021 // 16)
        first = (np.arange(m, dtype=np.uint32) % 3) + 1
        second = (np.arange(m, dtype=np.uint32) % 5) + 10
        rows = np.zeros((1 + 2 * n, 16), dtype=np.uint32)
        rows[0, :2] = (m, n)
        rows[1:1 + n].reshape(-1)[:m] = first
        rows[1 + n:].reshape(-1)[:m] = second
        (pin_dir / names.MAP_MAGLEV).unlink()  # what a layout-2 meshd leaves pinned
        tmpl = bpf.map_create(bpf.MAP_TYPE_ARRAY, "meshd_v2_tmpl", 4, 64, 1 + 2 * n,
                              flags=bpf.BPF_F_INNER_MAP)
        outer_fd = bpf.map_create(bpf.MAP_TYPE_HASH_OF_MAPS, names.MAP_MAGLEV_V2, 4, 4, 16,
                                  inner_map_fd=tmpl)
        inner = bpf.map_create(bpf.MAP_TYPE_ARRAY, "meshd_mglv_tbl", 4, 64, 1 + 2 * n,
                               flags=bpf.BPF_F_INNER_MAP)
        tables.write_chunks(inner, "inner", 0, rows)
        _pin_older_outer(pin_dir, names.MAP_MAGLEV_V2, tmpl, outer_fd, inner)
        e.maps.meta.update(ctypes.c_uint32(0), S.Meta(maglev_m=0, layout=2))
        maps = loader.load(pin_dir.parent.parent, e.instance, e.cgroup, 0, metrics=False)
        try:
            dp = KernelDataplane(maps)
            assert dp.table_size(7) == m
            assert (dp.get_table(7, 0) == first).all() and (dp.get_table(7, 1) == second).all()
            assert not (pin_dir / names.MAP_MAGLEV_V2).exists()
            assert maps.meta.lookup(ctypes.c_uint32(0)).layout == S.LAYOUT_VERSION == 3
        finally:
            maps.close()
    finally:
        e.close()


def test_sixteen_bit_slots_and_member_room():
    """A table is held as 16-bit indexes into its half's members (half the memory of
    32-bit ids); a change whose backends outgrow the member room the inner map was made
    with is written as a fresh inner map instead of in place, and reads back the same."""
    e = AutoEnv()
    try:
        dp = KernelDataplane(e.maps)
        m = 1021
        ten = (np.arange(m, dtype=np.uint32) % 10) + 100
        dp.put_table(9, ten)
        fd = dp._open_inner(9)
        try:
            info = bpf.map_info(fd, "inner")
        finally:
            bpf.close_fd(fd)
        n, k = -(-m // 32), 2  # 10 members: room for 20, one element is 16
        assert info.max_entries == 1 + 2 * n + 2 * k
        assert (dp.get_table(9, 0) == ten).all() and (dp.get_table(9, 1) == ten).all()
        twenty = (np.arange(m, dtype=np.uint32) % 20) + 200
        assert dp.put_tables([(9, twenty, 1)]) == {}  # fits: in place
        assert (dp.get_table(9, 1) == twenty).all() and (dp.get_table(9, 0) == ten).all()
        forty = (np.arange(m, dtype=np.uint32) % 40) + 300
        assert dp.put_tables([(9, forty, 0)]) == {}  # no room: a fresh map, both halves
        assert dp.swapped_instead == {9}  # said, so the reconciler keeps no undo for it
        assert (dp.get_table(9, 0) == forty).all() and (dp.get_table(9, 1) == forty).all()
        with pytest.raises(ValueError, match="65535"):
            tables.encode(np.ones(70000, dtype=np.uint32), 1)
    finally:
        e.close()
