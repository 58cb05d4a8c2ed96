"""Turns desired state into the fewest map operations, in a safe order (pure logic).

Order, so a connecting socket never sees a half-written service:
  1. backends that are new                   (nothing points at them yet)
  2. per group: its Maglev table, built aside and swapped in as one inner map (all changed
     tables in one batch: every map-in-map update syscall waits an RCU grace period)
  3. frontends (VIP:port -> group, count)    (now everything they point at exists)
  4. tables and names of groups that are gone, after their frontends
  5. backends no table references any more
A kernel error on one group (map full, ENOMEM) is recorded as that group's status and the
group keeps what it had; every other group still converges. Errors never reach the sources.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from meshd import maglev
from meshd.desired import BackendRef, Frontend, Group
from meshd.errors import DataplaneError

log = logging.getLogger("meshd.reconciler")

MAX_COUNT = 0xFFFF


@dataclass
class KernelSnapshot:
    """What the kernel maps hold, in model terms."""
    frontends: dict[Frontend, tuple[int, int]] = field(default_factory=dict)  # -> (gid, count)
    backends: dict[int, BackendRef] = field(default_factory=dict)  # id -> backend
    names: dict[int, str] = field(default_factory=dict)  # gid -> group key
    tables: set[int] = field(default_factory=set)  # gids that have a Maglev table


class Dataplane(Protocol):
    maglev_m: int

    def put_backend(self, bid: int, ref: BackendRef) -> None: ...
    def delete_backend(self, bid: int) -> None: ...
    def put_tables(self, items: list[tuple[int, np.ndarray]]) -> dict[int, str]: ...
    def get_table(self, gid: int) -> np.ndarray | None: ...
    def delete_tables(self, gids: list[int]) -> dict[int, str]: ...
    def put_frontend(self, fe: Frontend, gid: int, count: int) -> None: ...
    def delete_frontend(self, fe: Frontend) -> None: ...
    def put_name(self, gid: int, key: str) -> None: ...
    def delete_name(self, gid: int) -> None: ...


@dataclass
class _Applied:
    gid: int
    backends: tuple[tuple[BackendRef, int], ...] | None  # None: adopted, not known yet
    has_table: bool


@dataclass
class Report:
    ops: Counter = field(default_factory=Counter)  # operation name -> count
    errors: dict[str, str] = field(default_factory=dict)  # group key -> reason
    # (frontend, backend) translations that stopped being valid: sockets still connected
    # through them (UDP) may be destroyed by the caller
    removed: set[tuple[Frontend, BackendRef]] = field(default_factory=set)


class _Ids:
    """Smallest free id >= 1, so ids stay dense and small."""

    def __init__(self) -> None:
        self.used: set[int] = set()
        self._next = 1

    def take(self) -> int:
        while self._next in self.used:
            self._next += 1
        self.used.add(self._next)
        return self._next

    def free(self, i: int) -> None:
        self.used.discard(i)
        self._next = min(self._next, i)

    def claim(self, i: int) -> None:
        self.used.add(i)


class Reconciler:
    def __init__(self, dp: Dataplane):
        self.dp = dp
        self.groups: dict[str, _Applied] = {}
        self.frontends: dict[Frontend, tuple[int, int]] = {}
        self.backend_ids: dict[BackendRef, int] = {}
        self._gids, self._bids = _Ids(), _Ids()
        self._orphan_tables: set[int] = set()
        self.errors: dict[str, str] = {}

    def adopt(self, snap: KernelSnapshot) -> None:
        """Learns ids and entries from maps a previous daemon left pinned (restart/upgrade)."""
        for bid, ref in snap.backends.items():
            self.backend_ids[ref] = bid
            self._bids.claim(bid)
        for gid, key in snap.names.items():
            self.groups[key] = _Applied(gid, None, gid in snap.tables)
            self._gids.claim(gid)
        for gid, _count in snap.frontends.values():
            self._gids.claim(gid)
        self._orphan_tables = snap.tables - set(snap.names)
        self._gids.used |= self._orphan_tables
        self.frontends = dict(snap.frontends)

    # ---- the one entry point ------------------------------------------------------------
    def apply(self, desired: dict[str, Group]) -> Report:
        rep = Report()
        self._old_fes: dict[int, set[Frontend]] = {}
        for fe, (gid, _c) in self.frontends.items():
            self._old_fes.setdefault(gid, set()).add(fe)
        failed_refs = self._add_backends(desired, rep)
        ok = self._write_groups(desired, failed_refs, rep)
        self._write_frontends(desired, ok, rep)
        self._remove_groups(desired, ok, rep)
        self._collect_backends(desired, ok, rep)
        self.errors = dict(rep.errors)
        return rep

    def _op(self, rep: Report, name: str, fn, *args) -> None:
        fn(*args)
        rep.ops[name] += 1

    def _add_backends(self, desired: dict[str, Group], rep: Report) -> set[BackendRef]:
        failed: set[BackendRef] = set()
        needed = {ref for g in desired.values() for ref, _w in g.backends}
        for ref in sorted(needed - self.backend_ids.keys(), key=lambda r: r.name):
            bid = self._bids.take()
            try:
                self._op(rep, "put_backend", self.dp.put_backend, bid, ref)
                self.backend_ids[ref] = bid
            except DataplaneError as e:
                self._bids.free(bid)
                failed.add(ref)
                log.error("backend %s not written: %s", ref.name, e)
                rep.errors[f"backend {ref.name}"] = str(e)
        return failed

    def _write_groups(self, desired: dict[str, Group], failed_refs: set[BackendRef],
                      rep: Report) -> dict[str, Group]:
        """Names and tables of every group; returns the groups whose frontends may be written."""
        ok: dict[str, Group] = {}
        pending: dict[str, tuple[int, np.ndarray]] = {}
        for key in sorted(desired):
            g = desired[key]
            broken = [r.name for r, _w in g.backends if r in failed_refs]
            if broken:
                rep.errors[key] = f"backends not written: {', '.join(broken)}"
                continue
            try:
                cur = self.groups.get(key)
                if cur is None:
                    cur = _Applied(self._gids.take(), (), False)
                    self.groups[key] = cur
                    self._op(rep, "put_name", self.dp.put_name, cur.gid, key)
                if g.backends and (cur.backends != g.backends or not cur.has_table):
                    table = self._table(g)
                    adopted_same = cur.backends is None and cur.has_table and \
                        np.array_equal(self.dp.get_table(cur.gid), table)
                    if not adopted_same:
                        pending[key] = (cur.gid, table)
                        continue
                self._note_removed(rep, cur, g)
                cur.backends = g.backends
                ok[key] = g
            except (DataplaneError, ValueError) as e:
                log.error("service group %s not updated: %s", key, e)
                rep.errors[key] = str(e)
        if pending:
            failed = self.dp.put_tables(list(pending.values()))
            if len(pending) > len(failed):
                rep.ops["put_table"] += len(pending) - len(failed)
            for key, (gid, _t) in pending.items():
                if gid in failed:
                    log.error("service group %s: table not written: %s", key, failed[gid])
                    rep.errors[key] = failed[gid]
                    continue
                cur = self.groups[key]
                self._note_removed(rep, cur, desired[key])
                cur.has_table, cur.backends = True, desired[key].backends
                ok[key] = desired[key]
        return ok

    def _note_removed(self, rep: Report, cur: _Applied, g: Group | None) -> None:
        if not cur.backends:
            return  # nothing before, or adopted (unknown)
        gone = {ref for ref, _w in cur.backends} - {ref for ref, _w in (g.backends if g else ())}
        if not gone:
            return
        fes = self._old_fes.get(cur.gid, set()) | (set(g.frontends) if g else set())
        rep.removed |= {(fe, ref) for fe in fes for ref in gone}

    def _table(self, g: Group) -> np.ndarray:
        idx = maglev.build_table([(ref.name, w) for ref, w in g.backends], self.dp.maglev_m)
        ids = np.array([self.backend_ids[ref] for ref, _w in g.backends], dtype=np.uint32)
        return ids[idx]

    def _write_frontends(self, desired: dict[str, Group], ok: dict[str, Group],
                         rep: Report) -> None:
        want: dict[Frontend, tuple[int, int]] = {}
        keep_failed = {self.groups[k].gid for k in desired if k not in ok and k in self.groups}
        for key, g in ok.items():
            gid = self.groups[key].gid
            for fe in g.frontends:
                want[fe] = (gid, min(len(g.backends), MAX_COUNT))
        for fe, val in sorted(want.items(), key=lambda kv: str(kv[0])):
            if self.frontends.get(fe) == val:
                continue
            try:
                self._op(rep, "put_frontend", self.dp.put_frontend, fe, *val)
                self.frontends[fe] = val
            except DataplaneError as e:
                rep.errors[f"frontend {fe}"] = str(e)
        for fe, (gid, _c) in sorted(self.frontends.items(), key=lambda kv: str(kv[0])):
            if fe in want or gid in keep_failed:
                continue
            try:
                self._op(rep, "delete_frontend", self.dp.delete_frontend, fe)
                del self.frontends[fe]
            except DataplaneError as e:
                rep.errors[f"frontend {fe}"] = str(e)

    def _remove_groups(self, desired: dict[str, Group], ok: dict[str, Group], rep: Report) -> None:
        in_use = {gid for gid, _c in self.frontends.values()}
        gone = [k for k in sorted(set(self.groups) - set(desired))
                if self.groups[k].gid not in in_use]  # else a frontend delete failed: retry
        for key in gone:
            self._note_removed(rep, self.groups[key], None)
        empty = [k for k, g in ok.items() if not g.backends and self.groups[k].has_table]
        drop = [self.groups[k].gid for k in gone + empty if self.groups[k].has_table]
        drop += sorted(self._orphan_tables)
        failed = self.dp.delete_tables(drop) if drop else {}
        if len(drop) > len(failed):
            rep.ops["delete_table"] += len(drop) - len(failed)
        for gid in sorted(self._orphan_tables):
            if gid in failed:
                rep.errors[f"group id {gid}"] = failed[gid]
            else:
                self._orphan_tables.discard(gid)
                self._gids.free(gid)
        for key in empty:
            if self.groups[key].gid in failed:
                rep.errors[key] = failed[self.groups[key].gid]
            else:
                self.groups[key].has_table = False
        for key in gone:
            cur = self.groups[key]
            if cur.gid in failed:
                rep.errors[key] = failed[cur.gid]
                continue
            try:
                self._op(rep, "delete_name", self.dp.delete_name, cur.gid)
                del self.groups[key]
                self._gids.free(cur.gid)
            except DataplaneError as e:
                rep.errors[key] = str(e)

    def _collect_backends(self, desired: dict[str, Group], ok: dict[str, Group],
                          rep: Report) -> None:
        keep: set[BackendRef] = set()
        for key, cur in self.groups.items():
            if cur.backends is None:
                return  # an adopted group we could not rewrite: its table may use any id
            keep.update(ref for ref, _w in cur.backends)
        for ref in sorted(set(self.backend_ids) - keep, key=lambda r: r.name):
            bid = self.backend_ids[ref]
            try:
                self._op(rep, "delete_backend", self.dp.delete_backend, bid)
                del self.backend_ids[ref]
                self._bids.free(bid)
            except DataplaneError as e:
                rep.errors[f"backend {ref.name}"] = str(e)
