"""The reconciler's bookkeeping (pure): what the kernel holds in model terms
(KernelSnapshot), the map writer it drives (Dataplane), what one apply did (Report), and
its compact state: per-group state, dense id allocation with use counts, frontend maps as
written. meshd/reconciler.py decides what to write and in which order."""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from meshd.desired import BackendRef, Frontend


@dataclass
class KernelSnapshot:
    """What the kernel maps hold, in model terms."""
    # frontend -> (gid, count, flags): meshd_svc_v1, and the tc overrides meshd_svc_ext_v1
    frontends: dict[Frontend, tuple[int, int, int]] = field(default_factory=dict)
    backends: dict[int, BackendRef] = field(default_factory=dict)  # id -> backend
    names: dict[int, str] = field(default_factory=dict)  # gid -> group key
    tables: set[int] = field(default_factory=set)  # gids that have a Maglev table
    ext_frontends: dict[Frontend, tuple[int, int, int]] = field(default_factory=dict)
    affinity: dict[int, int] = field(default_factory=dict)  # gid -> timeout (s)
    members: dict[int, dict[int, int]] = field(default_factory=dict)  # gid -> {bid: weight}
    srcranges: set[tuple[Frontend, object]] = field(default_factory=set)  # (fe, network)
    table_sizes: dict[int, int] = field(default_factory=dict)  # gid -> M of its table
    # gid -> {(identity, uid): (action, flags, policy)}: meshd_verdict_v1
    verdicts: dict[int, dict] = field(default_factory=dict)
    idents: dict[int, int] = field(default_factory=dict)  # cgroup id -> identity: meshd_ident_v1
    subtree: dict[int, int] = field(default_factory=dict)  # cgroup id -> identity: meshd_subtree_v1


class IdTable(np.ndarray):
    """A Maglev table of backend ids (uint32, what the Dataplane is given) that also carries
    how it was built: `index` (the slot's index into `members`) and `members` (the group's
    backend ids, distinct). The kernel stores exactly that (16-bit slots and a member list,
    meshd/dataplane/tables.py), so a writer that knows these attributes skips finding the
    distinct ids again (a sort per table: ~0.5 s of a 10,000-group cold sync). Anything
    else sees a plain array; slices and copies drop the attributes."""
    index: np.ndarray | None
    members: np.ndarray | None

    @classmethod
    def of(cls, index: np.ndarray, members: np.ndarray) -> "IdTable":
        out = members[index].view(cls)
        out.index, out.members = index, members
        return out

    def __array_finalize__(self, obj) -> None:
        self.index = self.members = None


class Dataplane(Protocol):
    maglev_m: int  # a fixed table size for every group; 0: per group (maglev.table_size_for)
    maglev_max: int  # the largest size per-group sizing may pick

    def put_backend(self, bid: int, ref: BackendRef) -> None: ...
    def put_backends(self, items: list[tuple[int, BackendRef]]) -> dict[int, str]:
        """Many new backends at once (batch ops), written one after the other; returns
        {bid: error} of those not written. Optional: without it, put_backend one by one."""
    def delete_backend(self, bid: int) -> None: ...
    def put_tables(self, items: list[tuple[int, np.ndarray, int | None]]) -> dict[int, str]:
        """(gid, table, half): write that half (0/1) of the group's table of the same size
        in place; half None: a fresh table (both halves) swapped in. A writer that had to
        write a half as a fresh table instead (readers see the new table at once) names
        those gids in an attribute `swapped_instead` (optional)."""
    def get_table(self, gid: int, half: int = 0) -> np.ndarray | None: ...
    def delete_tables(self, gids: list[int]) -> dict[int, str]: ...
    def put_frontend(self, fe: Frontend, gid: int, count: int, flags: int = 0) -> None: ...
    def delete_frontend(self, fe: Frontend) -> None: ...
    def put_ext_frontend(self, fe: Frontend, gid: int, count: int, flags: int = 0) -> None: ...
    def delete_ext_frontend(self, fe: Frontend) -> None: ...
    def put_name(self, gid: int, key: str) -> None: ...
    def delete_name(self, gid: int) -> None: ...
    def put_affinity(self, gid: int, timeout: int) -> None: ...
    def delete_affinity(self, gid: int) -> None: ...
    def put_member(self, gid: int, bid: int, weight: int) -> None: ...
    def delete_member(self, gid: int, bid: int) -> None: ...
    def put_srcrange(self, fe: Frontend, net) -> None: ...
    def delete_srcrange(self, fe: Frontend, net) -> None: ...
    def tc_conntrack(self) -> bool:
        """True while the tc path's conntrack map exists (removed backends must drain)."""
    def flow_backends(self) -> set[int] | None:
        """Backend ids that live tc conntrack entries name; None: no tc path loaded."""


@dataclass(slots=True)
class Applied:
    gid: int
    backends: tuple[tuple[BackendRef, int], ...] | None  # None: adopted, not known yet
    has_table: bool
    m: int = 0  # size of its table in the kernel; 0: none, or unknown (next write: fresh)
    half: int = 0  # the half of its table its frontends name (TABLE_B set: 1)


@dataclass
class Report:
    ops: Counter = field(default_factory=Counter)  # operation name -> count
    errors: dict[str, str] = field(default_factory=dict)  # group key -> reason
    # (frontend, backend) translations that stopped being valid: sockets still connected
    # through them (UDP) may be destroyed by the caller
    removed: set[tuple[Frontend, BackendRef]] = field(default_factory=set)
    groups_changed: int = 0
    table_swaps: int = 0  # tables written as fresh inner maps (map-in-map: an RCU wait)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds (debug log)


class Ids:
    """Smallest free id >= 1, so ids stay dense and small: one byte per id (1: in use), and
    with `counts` a use count per id (4 bytes) -- a set and a Counter of 10^5 ids were ~9 MB.
    Ids beyond the byte map (adopted from a foreign pin) are kept in a set."""

    FAR = 1 << 20  # ids at or above this are not in the byte map (max_backends: 262,144)

    def __init__(self, counts: bool = False) -> None:
        self._used = bytearray(b"\x01")  # id 0 is never handed out
        self._far: set[int] = set()
        self.refs = array("I", [0]) if counts else None  # id -> users (counts=True)
        self._far_refs: dict[int, int] = {}
        self._next = 1

    def _grow(self, i: int) -> None:
        """Room for id `i` (doubling: ids beyond the last one in use are free)."""
        n = max(i + 1, 2 * len(self._used)) - len(self._used)
        if i >= len(self._used):
            self._used.extend(bytes(n))
            if self.refs is not None:
                self.refs.extend(array("I", bytes(4 * n)))

    def take(self) -> int:
        i = self._next
        while True:
            i = self._used.find(0, i)
            if i < 0:
                i = len(self._used)
                self._grow(i)
            if i not in self._far:
                break
            i += 1
        self._used[i] = 1
        self._next = i + 1
        return i

    def mark(self, i: int) -> None:
        """`i` is in use (learnt from the kernel)."""
        if i >= self.FAR:
            self._far.add(i)
            return
        self._grow(i)
        self._used[i] = 1

    def free(self, i: int) -> None:
        if 0 < i < len(self._used):
            self._used[i] = 0
            if self.refs is not None:
                self.refs[i] = 0
            self._next = min(self._next, i)
        else:
            self._far.discard(i)
            self._far_refs.pop(i, None)

    def count(self, i: int) -> int:
        """Users of id `i` (counts=True)."""
        if 0 < i < len(self.refs):
            return self.refs[i]
        return self._far_refs.get(i, 0)

    def use(self, i: int, d: int) -> int:
        """Adds `d` (+1/-1) to the users of id `i`; returns the new count (never below 0)."""
        if 0 < i < len(self.refs):
            n = self.refs[i] = max(self.refs[i] + d, 0)
        else:
            n = self._far_refs[i] = max(self._far_refs.get(i, 0) + d, 0)
        return n

    def __contains__(self, i: int) -> bool:
        return (0 < i < len(self._used) and bool(self._used[i])) or i in self._far


class FeMap:
    """One frontend map as written: frontend -> (gid, count, flags), and gid -> frontends
    (a tuple: most groups have one or two frontends; a set each was ~2 MB at 10^4)."""

    def __init__(self, what: str, put, delete):
        self.what, self.put, self.delete = what, put, delete
        self.entries: dict[Frontend, tuple[int, int, int]] = {}
        self.of: dict[int, tuple[Frontend, ...]] = {}

    def set(self, fe: Frontend, val: tuple[int, int, int]) -> None:
        self.forget(fe)
        self.entries[fe] = val
        self.of[val[0]] = (*self.of.get(val[0], ()), fe)

    def forget(self, fe: Frontend) -> None:
        old = self.entries.pop(fe, None)
        if old is not None:
            fes = self.of.get(old[0])
            if fes is not None:
                rest = tuple(f for f in fes if f != fe)
                if rest:
                    self.of[old[0]] = rest
                else:
                    del self.of[old[0]]
