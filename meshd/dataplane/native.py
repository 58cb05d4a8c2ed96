"""The compiled Maglev fill (bpf/native/maglev_fill.c, built by bpf/build.sh into
meshd/bpf_obj/maglev_fill.so): plays a table's looks one by one in C, ~6x faster than the
numpy batches of meshd/maglev.py, with the same result slot for slot
(tests/kernel/test_native_fill.py). install() hands it to meshd.maglev; without the
library meshd builds its tables with numpy (and says so once)."""

from __future__ import annotations

import ctypes as C
import logging

import numpy as np

from meshd import maglev
from meshd.dataplane.pins import BPF_OBJ_DIR

log = logging.getLogger("meshd.dataplane")

LIBRARY = BPF_OBJ_DIR / "maglev_fill.so"


class _Look(C.Structure):  # struct look: the heap's element (scratch)
    _fields_ = [("t", C.c_double), ("i", C.c_uint32)]


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(C.c_void_p)


def load():
    """The fill as maglev.use_fill() takes it, or None (no library: numpy it is)."""
    try:
        lib = C.CDLL(str(LIBRARY))
    except OSError as e:
        log.warning("the compiled Maglev fill %s cannot be loaded (%s): tables are built "
                    "with numpy, ~6x slower (a cold sync of 10,000 services takes seconds "
                    "longer); in a checkout run scripts/setup (bpf/build.sh builds it), "
                    "otherwise reinstall meshd", LIBRARY, e)
        return None
    fn = lib.meshd_maglev_fill
    fn.restype = C.c_int
    fn.argtypes = [C.c_uint32, C.c_uint32] + [C.c_void_p] * 11

    def fill(m: int, sizes: np.ndarray, offset: np.ndarray, skip: np.ndarray,
             weight: np.ndarray, quota: np.ndarray, clock: np.ndarray) -> np.ndarray:
        sizes = np.ascontiguousarray(sizes, dtype=np.uint32)
        offset = np.ascontiguousarray(offset, dtype=np.int64)
        skip = np.ascontiguousarray(skip, dtype=np.int64)
        weight = np.ascontiguousarray(weight, dtype=np.float64)
        quota = np.ascontiguousarray(quota, dtype=np.int64)
        clock = np.ascontiguousarray(clock, dtype=np.float64)
        n = int(sizes.sum())
        tables = np.zeros(len(sizes) * m, dtype=np.uint32)
        held = np.zeros(n, dtype=np.int64)
        ptr = np.zeros(n, dtype=np.int64)
        heap = (_Look * max(int(sizes.max(initial=0)), 1))()
        claimed = np.zeros(m, dtype=np.uint8)
        rc = fn(m, len(sizes), _ptr(sizes), _ptr(offset), _ptr(skip), _ptr(weight),
                _ptr(quota), _ptr(clock), _ptr(tables), _ptr(held), _ptr(ptr),
                C.cast(heap, C.c_void_p), _ptr(claimed))
        if rc:
            raise ValueError("maglev: the compiled fill could not fill a table (quotas do "
                             "not add up to the table size)")
        return tables

    return fill


_installed = False


def install() -> bool:
    """Makes meshd.maglev build its tables with the compiled fill (once per process);
    False if the library is missing."""
    global _installed
    if not _installed:
        _installed = True
        fill = load()
        if fill is not None:
            maglev.use_fill(fill)
    return maglev.compiled_fill() is not None
