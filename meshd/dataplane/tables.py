"""Maglev tables as the kernel holds them (meshd_maglev_v2): inner arrays of 64-byte chunks,
element 0 the header (M, chunks per half), then two halves (bpf/include/meshd_structs.h,
struct meshd_table_chunk). Used by the reconciler's Dataplane (kernel.py) and by the
loader's migration of layout-1 tables; imports neither."""

from __future__ import annotations

import ctypes as C

import numpy as np

from meshd import names
from meshd.errors import BpfError
from meshd.dataplane import libbpf as bpf
from meshd.dataplane import structs as S

# Tables swapped per batch syscall (each holds an inner-map fd open until the swap).
TABLE_BATCH = 256


def chunks(table: np.ndarray, fixed: int = 0) -> tuple[int, int, np.ndarray]:
    """(M, chunks per half, the table as a (chunks, 16) uint32 array, zero-padded)."""
    if table.ndim != 1 or not table.size:
        raise ValueError(f"table has shape {table.shape}, need a non-empty vector")
    m = int(table.size)
    if fixed and m != fixed:
        raise ValueError(f"table has {m} slots, the maps hold {fixed}")
    n = -(-m // S.TABLE_CHUNK)
    out = np.zeros((n, S.TABLE_CHUNK), dtype=np.uint32)
    out.reshape(-1)[:m] = table
    return m, n, out


def write_chunks(fd: int, what: str, first: int, rows: np.ndarray) -> None:
    """Plain array updates of elements first .. first + len(rows) - 1, one syscall."""
    k = len(rows)
    keys = (C.c_uint32 * k)(*range(first, first + k))
    values = (S.TableChunk * k).from_buffer_copy(np.ascontiguousarray(rows))
    bpf.Map(fd, what, C.c_uint32, S.TableChunk).update_batch(keys, values)


def new_inner(table: np.ndarray, fixed: int = 0) -> int:
    """A fresh inner map holding `table` in both halves; returns its fd (caller closes)."""
    m, n, rows = chunks(table, fixed)
    fd = bpf.map_create(bpf.MAP_TYPE_ARRAY, names.MAGLEV_INNER_NAME, 4,
                        C.sizeof(S.TableChunk), 1 + 2 * n, flags=bpf.BPF_F_INNER_MAP)
    try:
        header = np.zeros((1, S.TABLE_CHUNK), dtype=np.uint32)
        header[0, :2] = (m, n)
        write_chunks(fd, names.MAGLEV_INNER_NAME, 0, np.vstack((header, rows, rows)))
    except BaseException:
        bpf.close_fd(fd)
        raise
    return fd


def swap_in(outer: bpf.Map, items: list[tuple[int, np.ndarray]], fixed: int = 0) -> dict[int, str]:
    """Writes each table into a fresh inner map and swaps them into `outer`: each swap is
    atomic, and a batch pays the kernel's RCU wait for map-in-map updates once. Returns
    {gid: error} for the tables that were not written."""
    failed: dict[int, str] = {}
    for start in range(0, len(items), TABLE_BATCH):
        gids, fds = [], []
        try:
            for gid, table in items[start:start + TABLE_BATCH]:
                try:
                    fds.append(new_inner(table, fixed))
                    gids.append(gid)
                except (BpfError, ValueError) as e:
                    failed[gid] = str(e)
            if not gids:
                continue
            n = len(gids)
            try:
                outer.update_batch((C.c_uint32 * n)(*gids), (C.c_uint32 * n)(*fds))
            except BpfError as e:  # find out which ones: the rest one by one
                for gid, fd in list(zip(gids, fds))[e.done:]:
                    try:
                        outer.update(C.c_uint32(gid), C.c_uint32(fd))
                    except BpfError as e1:
                        failed[gid] = str(e1)
        finally:
            for fd in fds:
                bpf.close_fd(fd)  # the outer map holds its own reference
    return failed
