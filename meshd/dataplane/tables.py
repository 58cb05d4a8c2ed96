"""Maglev tables as the kernel holds them (meshd_maglev_v3, layout 3; struct
meshd_table_chunk in bpf/include/meshd_structs.h): inner arrays of 64-byte elements,

    [0]                 header: M, n = slot elements per half, k = member elements per half
    [1 .. n]            first half: M 16-bit slots, 32 per element, each an index into ...
    [n+1 .. 2n]         second half's slots
    [2n+1 .. 2n+k]      first half's members: backend ids, 16 per element
    [2n+k+1 .. 2n+2k]   second half's members

Callers hand tables over as arrays of backend ids, as the reconciler builds them; the
encoding into slot indexes and members is here. A half's members are its group's backend
ids (as the reconciler's IdTable carries them, in name order; for a plain array of ids, its
distinct ids, sorted); room for twice as many members as the table first had (at least 16)
is made when the inner map is created, so a change that more than doubles a group's
backends without changing its size needs a fresh inner map (MemberRoom). Used by the
reconciler's Dataplane (kernel.py) and by the loader's migration of older layouts; imports
neither."""

from __future__ import annotations

import ctypes as C

import numpy as np

from meshd import names
from meshd.errors import BpfError
from meshd.dataplane import libbpf as bpf
from meshd.dataplane import structs as S

# Tables swapped per batch syscall (each holds an inner-map fd open until the swap).
TABLE_BATCH = 256


class MemberRoom(ValueError):
    """A half's members do not fit the room its inner map was made with."""


def _check(table: np.ndarray, fixed: int = 0) -> int:
    if table.ndim != 1 or not table.size:
        raise ValueError(f"table has shape {table.shape}, need a non-empty vector")
    m = int(table.size)
    if fixed and m != fixed:
        raise ValueError(f"table has {m} slots, the maps hold {fixed}")
    if m > 0xFFFF:
        raise ValueError(f"table has {m} slots: at most 65535 (16-bit slot indexes)")
    return m


def slot_elements(m: int) -> int:
    """n: elements per half holding M 16-bit slots."""
    return -(-m // S.TABLE_SLOTS)


def member_elements(members: int) -> int:
    """k for a new inner map whose table has `members` distinct backends: room for twice
    as many, at least one element (16)."""
    return max(1, -(-2 * members // S.TABLE_CHUNK))


def factors(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(members, index): the table's distinct backend ids and each slot's index into them.
    A table that carries them (the reconciler's IdTable: how Maglev built it) is not
    searched again."""
    members, index = getattr(table, "members", None), getattr(table, "index", None)
    if members is not None and index is not None:
        return members, index
    return np.unique(table, return_inverse=True)


def encode(table: np.ndarray, k: int, fixed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One half as inner-array elements: (n slot rows, k member rows), each (rows, 16)
    uint32. MemberRoom if its distinct ids do not fit k member elements."""
    m = _check(table, fixed)
    members, index = factors(table)
    if members.size > k * S.TABLE_CHUNK:
        raise MemberRoom(f"table has {members.size} distinct backends, its inner map has "
                         f"room for {k * S.TABLE_CHUNK}")
    n = slot_elements(m)
    slots = np.zeros(n * S.TABLE_SLOTS, dtype=np.uint16)
    slots[:m] = index
    member_rows = np.zeros((k, S.TABLE_CHUNK), dtype=np.uint32)
    member_rows.reshape(-1)[:members.size] = members
    return slots.view(np.uint32).reshape(n, S.TABLE_CHUNK), member_rows


def decode(m: int, slot_rows: np.ndarray, member_rows: np.ndarray) -> np.ndarray:
    """The backend ids of one half from its elements (the inverse of encode)."""
    index = np.ascontiguousarray(slot_rows, dtype=np.uint32).view(np.uint16).reshape(-1)[:m]
    return np.ascontiguousarray(member_rows, dtype=np.uint32).reshape(-1)[index]


def header(m: int, n: int, k: int) -> np.ndarray:
    out = np.zeros((1, S.TABLE_CHUNK), dtype=np.uint32)
    out[0, :3] = (m, n, k)
    return out


def write_chunks(fd: int, what: str, first: int, rows: np.ndarray) -> None:
    """Plain array updates of elements first .. first + len(rows) - 1, one syscall."""
    k = len(rows)
    keys = (C.c_uint32 * k)(*range(first, first + k))
    values = (S.TableChunk * k).from_buffer_copy(np.ascontiguousarray(rows))
    bpf.Map(fd, what, C.c_uint32, S.TableChunk).update_batch(keys, values)


def write_half(fd: int, what: str, hdr, table: np.ndarray, half: int, fixed: int = 0) -> None:
    """Writes `table` into `half` (0 or 1) of the inner map `fd` whose header is `hdr`
    (slots and members; readers must not be reading that half)."""
    m, n, k = int(hdr.slot[0]), int(hdr.slot[1]), int(hdr.slot[2])
    if int(table.size) != m:
        raise ValueError(f"{what}'s table has {m} slots, not {table.size}")
    slot_rows, member_rows = encode(table, k, fixed)
    write_chunks(fd, what, 1 + 2 * n + half * k, member_rows)
    write_chunks(fd, what, 1 + half * n, slot_rows)


def new_inner(table: np.ndarray, fixed: int = 0, second: np.ndarray | None = None) -> int:
    """A fresh inner map holding `table` in both halves (or `second` in the second half, of
    the same size: the migration of a table mid-change); returns its fd (caller closes)."""
    m = _check(table, fixed)
    distinct = int(factors(table)[0].size)
    if second is not None:
        distinct = max(distinct, int(factors(second)[0].size))
    n, k = slot_elements(m), member_elements(distinct)
    slots_a, members_a = encode(table, k, fixed)
    slots_b, members_b = (slots_a, members_a) if second is None else encode(second, k, fixed)
    fd = bpf.map_create(bpf.MAP_TYPE_ARRAY, names.MAGLEV_INNER_NAME, 4,
                        C.sizeof(S.TableChunk), 1 + 2 * n + 2 * k, flags=bpf.BPF_F_INNER_MAP)
    try:
        write_chunks(fd, names.MAGLEV_INNER_NAME, 0,
                     np.vstack((header(m, n, k), slots_a, slots_b, members_a, members_b)))
    except BaseException:
        bpf.close_fd(fd)
        raise
    return fd


def read_half(fd: int, what: str, half: int) -> np.ndarray | None:
    """The backend ids in `half` of the inner map `fd`; None: no table (no header)."""
    m = bpf.Map(fd, what, C.c_uint32, S.TableChunk)
    hdr = m.lookup(C.c_uint32(0))
    if hdr is None or not hdr.slot[0]:
        return None
    size, n, k = int(hdr.slot[0]), int(hdr.slot[1]), int(hdr.slot[2])
    rows = [m.lookup(C.c_uint32(i)) for i in
            [*range(1 + half * n, 1 + (half + 1) * n),
             *range(1 + 2 * n + half * k, 1 + 2 * n + (half + 1) * k)]]
    if any(r is None for r in rows):
        return None
    flat = np.frombuffer(b"".join(bytes(r) for r in rows), dtype=np.uint32).reshape(-1, 16)
    return decode(size, flat[:n], flat[n:])


def swap_in(outer: bpf.Map, items: list[tuple], fixed: int = 0) -> dict[int, str]:
    """Writes each table into a fresh inner map and swaps them into `outer`: each swap is
    atomic, and a batch pays the kernel's RCU wait for map-in-map updates once. Items are
    (gid, table) (both halves alike) or (gid, first half, second half). Returns
    {gid: error} for the tables that were not written."""
    failed: dict[int, str] = {}
    for start in range(0, len(items), TABLE_BATCH):
        gids, fds = [], []
        try:
            for gid, table, *second in items[start:start + TABLE_BATCH]:
                try:
                    fds.append(new_inner(table, fixed, *second))
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
