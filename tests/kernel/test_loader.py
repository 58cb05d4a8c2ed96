"""Loading, pinning, adopting and removing the socket LB in the real kernel."""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os

import numpy as np
import pytest

from meshd import names
from meshd.dataplane import libbpf as bpf
from meshd.dataplane import loader
from meshd.dataplane.kernel import KernelDataplane
from meshd.desired import BackendRef, Frontend
from meshd.errors import BpfError, DataplaneError

BPFFS = loader.Path("/sys/fs/bpf")
M = 1021
ip = ipaddress.ip_address


def attached(cg) -> dict[str, list[int]]:
    fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {a: bpf.prog_query(fd, a) for a in set(names.SOCK_LB_PROGRAMS.values())}
    finally:
        os.close(fd)


def test_load_pins_every_map_and_attaches_every_hook_to_the_cgroup(kernel_instance):
    inst, cg = kernel_instance
    maps = loader.load(BPFFS, inst, cg, M)
    maps.close()
    pins = {p.name for p in names.pin_dir(BPFFS, inst).iterdir()}
    assert set(names.SOCK_LB_MAPS) <= pins
    assert {names.link_pin_name(p) for p in names.SOCK_LB_PROGRAMS} <= pins
    assert all(len(ids) == 1 for ids in attached(cg).values()), attached(cg)
    assert set(loader.attached_cgroup_ids(names.pin_dir(BPFFS, inst)).values()) == {
        loader.cgroup_id(cg)}


def test_restart_keeps_entries_and_swaps_programs_in_place(kernel_instance):
    inst, cg = kernel_instance
    maps = loader.load(BPFFS, inst, cg, M)
    dp = KernelDataplane(maps)
    dp.put_backend(1, BackendRef(ip("10.201.1.2"), 8080, "TCP"))
    dp.put_table(3, np.full(M, 1, dtype=np.uint32))
    dp.put_frontend(Frontend(ip("10.96.0.10"), 80, "TCP"), 3, 1)
    dp.put_name(3, "default/web:http/ipv4")
    before = attached(cg)
    maps.close()

    maps2 = loader.load(BPFFS, inst, cg, M)  # what a restarted or upgraded daemon does
    snap = KernelDataplane(maps2).snapshot()
    maps2.close()
    assert snap.frontends == {Frontend(ip("10.96.0.10"), 80, "TCP"): (3, 1, 0)}  # gid, count, flags
    assert snap.names == {3: "default/web:http/ipv4"} and snap.tables == {3}
    after = attached(cg)
    assert all(len(ids) == 1 for ids in after.values())  # replaced, not added twice
    assert after != before  # new program ids inside the same links


def test_pins_an_older_meshd_made_and_nothing_reads_are_removed_on_load(kernel_instance):
    """meshd_skmeta_v1 (the metrics tag before it moved into meshd_sock_v1): an upgrade
    drops the pin; the storage an older meshd read is still pinned for its sockets."""
    inst, cg = kernel_instance
    pin_dir = names.pin_dir(BPFFS, inst)
    loader.load(BPFFS, inst, cg, M).close()
    fd = bpf.map_create(bpf.MAP_TYPE_ARRAY, "meshd_skmeta_v1", 4, 8, 1)
    try:
        bpf.obj_pin(fd, pin_dir / "meshd_skmeta_v1")
    finally:
        bpf.close_fd(fd)
    loader.load(BPFFS, inst, cg, M).close()
    pins = {p.name for p in pin_dir.iterdir()}
    assert "meshd_skmeta_v1" not in pins
    assert {names.MAP_SOCK, names.MAP_SKNAT} <= pins


def test_table_size_change_needs_no_cleanup(kernel_instance):
    """Every table carries its own size: a restart with another maglev.table_size adopts
    the maps (before layout 2 it was refused until `meshd cleanup`) and keeps the tables."""
    inst, cg = kernel_instance
    maps = loader.load(BPFFS, inst, cg, M)
    KernelDataplane(maps).put_table(5, np.full(M, 9, dtype=np.uint32))
    maps.close()
    maps = loader.load(BPFFS, inst, cg, 4093)
    try:
        dp = KernelDataplane(maps)
        assert dp.table_size(5) == M and (dp.get_table(5) == 9).all()
        dp.put_table(5, np.full(4093, 7, dtype=np.uint32))  # a new size: a fresh table
        assert dp.table_size(5) == 4093 and (dp.get_table(5, 1) == 7).all()
    finally:
        maps.close()


def test_not_a_cgroup_is_refused_clearly(kernel_instance, tmp_path):
    inst, _cg = kernel_instance
    with pytest.raises(DataplaneError, match="is not a cgroup v2 directory"):
        loader.load(BPFFS, inst, tmp_path, M)
    assert not names.pin_dir(BPFFS, inst).exists()


def test_remove_detaches_and_unpins_everything(kernel_instance):
    inst, cg = kernel_instance
    loader.load(BPFFS, inst, cg, M).close()
    removed = loader.remove(BPFFS, inst)
    assert str(names.pin_dir(BPFFS, inst)) in removed
    assert not names.pin_dir(BPFFS, inst).exists()
    assert all(ids == [] for ids in attached(cg).values())
    assert loader.remove(BPFFS, inst) == []  # idempotent


def test_table_swap_replaces_the_whole_table(kernel_instance):
    inst, cg = kernel_instance
    maps = loader.load(BPFFS, inst, cg, M)
    try:
        dp = KernelDataplane(maps)
        dp.put_table(5, np.arange(M, dtype=np.uint32))
        dp.put_table(5, np.full(M, 9, dtype=np.uint32))
        assert (dp.get_table(5) == 9).all()
        dp.delete_table(5)
        assert dp.get_table(5) is None
        with pytest.raises(DataplaneError, match="table has 7 slots, the maps hold 1021"):
            dp.put_table(5, np.zeros(7, dtype=np.uint32))
    finally:
        maps.close()


def test_batched_table_writes_and_deletes(kernel_instance):
    """More tables than one batch; a bad table fails alone; deleting a missing one is fine."""
    inst, cg = kernel_instance
    maps = loader.load(BPFFS, inst, cg, M)
    try:
        dp = KernelDataplane(maps)
        items = [(gid, np.full(M, gid, dtype=np.uint32)) for gid in range(1, 301)]
        items[10] = (11, np.zeros(5, dtype=np.uint32))
        failed = dp.put_tables(items)
        assert list(failed) == [11] and "table has 5 slots" in failed[11]
        assert dp.snapshot().tables == set(range(1, 301)) - {11}
        assert (dp.get_table(300) == 300).all()
        assert dp.delete_tables(list(range(1, 301))) == {}
        assert dp.snapshot().tables == set()
    finally:
        maps.close()


def test_full_map_error_names_the_map_and_the_fix():
    fd = bpf.map_create(bpf.MAP_TYPE_HASH, "meshd_tiny", 4, 4, 1)
    m = bpf.Map(fd, "meshd_tiny", ctypes.c_uint32, ctypes.c_uint32)
    try:
        m.update(ctypes.c_uint32(1), ctypes.c_uint32(1))
        with pytest.raises(BpfError) as ei:
            m.update(ctypes.c_uint32(2), ctypes.c_uint32(2))
        assert ei.value.errno == errno.E2BIG
        assert "bpf_map_update_elem(meshd_tiny)" in str(ei.value)
        assert "the map is full" in str(ei.value)
    finally:
        m.close()


def test_missing_object_error_says_how_to_build(tmp_path):
    with pytest.raises(BpfError, match="run scripts/setup"):
        bpf.BpfObject(tmp_path / "nope.bpf.o")
