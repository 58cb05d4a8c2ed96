"""Turns desired state into the fewest map operations, in a safe order (pure logic).

Order, so a connecting socket (or a packet on tc) never sees a half-written service:
  1. backends that are new                   (nothing points at them yet: all in one
     Dataplane.put_backends, batch syscalls)
  2. per group: its Maglev table, of the size its backends need (maglev.table_size_for).
     A group whose table keeps its size gets the new one in the half of its inner map that
     no frontend names (plain array writes: no RCU wait); the frontend writes of step 4
     flip the group to it. A new group, a new size, or frontends that disagree on the half
     get a fresh inner map swapped in (in batches: every map-in-map update syscall waits
     an RCU grace period). Tables are built in chunks of TABLE_BUILD_BATCH groups (a thread
     pool when there are several) and each chunk is written as soon as it is built; every
     table of the apply is in before step 4 writes any frontend
  3. what frontend flags make the datapath read (meshd/sidetables.py): affinity timeout and
     members, source ranges
  4. frontends (VIP:port -> group, count, flags) in meshd_svc_v1 and the tc-only overrides
     in meshd_svc_ext_v1 (now everything they point at exists; the ones nothing wants any
     more go first: in a full map they make room)
  5. side entries nothing wants any more; tables and names of groups that are gone, after
     their frontends
  6. backends no table references any more: at once when the tc path is not loaded, else
     they drain (stay in meshd_be_v1, so established tc flows keep them) until no tc
     conntrack entry names them or DRAIN_MAX_SECONDS passed: `collect_drained()`, which
     the daemon calls between syncs. A backend that comes back while draining keeps its id.
Work is proportional to what changed: a group whose Group object is the one applied last
time is skipped without looking inside (DesiredState keeps unchanged groups' objects), so
one endpoint change at 10,000 services costs one group's work.
A kernel error on one group (map full: E2BIG, ENOMEM), whether on its name, table or one of
its frontends, is recorded under the group's key as its status and the
group keeps what it had; every other group still converges; the failed group is retried
on the next apply. Errors never reach the sources.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from meshd import maglev
from meshd.desired import G_POLICY, G_POLICY_OPEN, BackendRef, Frontend, Group
from meshd.errors import DataplaneError
# KernelSnapshot, Dataplane and Report are imported from here by the daemon and tests
from meshd.reconcile_state import (Applied, Dataplane, FeMap, Ids, IdTable,  # noqa: F401
                                   KernelSnapshot, Report)
from meshd.sidetables import SideTables
from meshd.verdicts import Verdicts

log = logging.getLogger("meshd.reconciler")

MAX_COUNT = 0xFFFF
TABLE_B = 0x20  # MESHD_SVC_F_TABLE_B: the frontend's group reads the second half of its table
TABLE_BUILD_BATCH = 512  # groups per vectorised Maglev build (bounds its temporary arrays)
# A backend out of every selection stays in meshd_be_v1 while tc conntrack entries name it,
# at most this long: kube-proxy leaves established flows to conntrack's timeouts (24 h for
# established TCP); a terminating pod gets 30 s by default (terminationGracePeriodSeconds),
# so a flow still open an hour later talks to a pod that is gone. After that its backend
# entry goes and the flow's next packet is balanced afresh.
DRAIN_MAX_SECONDS = 3600.0
_SIZES: dict[int, int] = {}  # one int object per table size (10^4 groups share a few)


class Reconciler:
    def __init__(self, dp: Dataplane, drain_seconds: float = DRAIN_MAX_SECONDS):
        self.dp = dp
        self.groups: dict[str, Applied] = {}
        self._svc = FeMap("put_frontend", dp.put_frontend, dp.delete_frontend)
        self._ext = FeMap("put_ext_frontend", getattr(dp, "put_ext_frontend", None),
                           getattr(dp, "delete_ext_frontend", None))
        self.frontends = self._svc.entries  # meshd_svc_v1 as written
        self.backend_ids: dict[BackendRef, int] = {}
        self.errors: dict[str, str] = {}
        self.side = SideTables(dp)
        self.verdicts = Verdicts(dp)
        self._undo: dict[str, tuple] = {}  # in-place table writes of this apply (see apply)
        self.drain_seconds = drain_seconds
        self._draining: dict[BackendRef, float] = {}  # out of every table -> deadline
        # group ids; backend ids with their use counts (applied groups naming the backend)
        self._gids, self._bids = Ids(), Ids(counts=True)
        self._fes_of = self._svc.of  # gid -> its frontends in the kernel
        self._unknown = 0  # adopted groups whose backends are not known yet
        self._orphan_tables: set[int] = set()
        self._unused: set[BackendRef] = set()  # refcount fell to 0: delete if still so
        self._scan_all = False  # after adopt: every kernel backend is a candidate once
        self._last: dict[str, Group] = {}
        self._retry: set[str] = set()
        self._full = False  # next apply looks at every group (after adopt)

    def adopt(self, snap: KernelSnapshot) -> None:
        """Learns ids and entries from maps a previous daemon left pinned (restart/upgrade)."""
        for bid, ref in snap.backends.items():
            self.backend_ids[ref] = bid
            self._bids.mark(bid)
        halves: dict[int, set[int]] = {}
        for entries in (snap.frontends, snap.ext_frontends):
            for gid, count, flags in entries.values():
                if count:  # (count 0 reads no table)
                    halves.setdefault(gid, set()).add(1 if flags & TABLE_B else 0)
        for gid, key in snap.names.items():
            half = halves.get(gid, {0})
            # frontends that disagree on the half (a crash mid-flip): the next write is fresh
            m = snap.table_sizes.get(gid, 0) if len(half) == 1 else 0
            self.groups[key] = Applied(gid, None, gid in snap.tables, m, min(half))
            self._gids.mark(gid)
            self._unknown += 1
        for fmap, entries in ((self._svc, snap.frontends), (self._ext, snap.ext_frontends)):
            for fe, val in entries.items():
                self._gids.mark(val[0])
                fmap.set(fe, tuple(val))
        self.side.adopt(snap)
        self.verdicts.adopt(snap)
        self._orphan_tables = snap.tables - set(snap.names)
        for gid in self._orphan_tables:
            self._gids.mark(gid)
        self._full = self._scan_all = True

    # ---- the one entry point ------------------------------------------------------------
    def apply(self, desired: dict[str, Group], hint: set[str] | None = None) -> Report:
        """`hint`: the group keys that may differ from the last apply (DesiredState knows);
        without it every group is compared by identity (O(groups))."""
        rep = Report()
        if self._full:
            changed = set(desired) | set(self.groups)
        elif hint is not None:
            changed = {k for k in hint if self._last.get(k) is not desired.get(k)}
        else:
            changed = {k for k, g in desired.items() if self._last.get(k) is not g}
            changed |= self._last.keys() - desired.keys()
        changed |= self._retry
        rep.groups_changed = len(changed)
        self._old_fes = {self.groups[k].gid: set(self._fes_of.get(self.groups[k].gid, ()))
                         for k in changed if k in self.groups}
        failed_refs = self._add_backends(desired, changed, rep)
        self._add_members(desired, changed, rep)
        self._undo: dict[str, tuple] = {}
        ok = self._write_groups(desired, changed, failed_refs, rep)
        op = lambda name, fn, *a: self._op(rep, name, fn, *a)  # noqa: E731
        gid_of = lambda k: self.groups[k].gid  # noqa: E731
        self.side.add(ok, gid_of, self.backend_ids, op, rep.errors)
        self.verdicts.add(ok, gid_of, op, rep.errors, self._kernel_flags)
        self._undo_dropped(ok, rep)
        stricter = {k for k, g in ok.items() if self._stricter(k, g)}
        every = {fe for g in ok.values() for fe in (*g.frontends, *g.tc_frontends)}
        self._write_frontends(desired, changed,
                              {k: g for k, g in ok.items() if k not in stricter}, rep, every)
        self.verdicts.write_idents(op, rep.errors)  # (meshd/verdicts.py: the order)
        if stricter:
            self._write_frontends(desired, changed, {k: ok[k] for k in stricter}, rep, every)
        gone = [(k, self.groups[k].gid) for k in sorted(changed) if k not in desired
                and k in self.groups and not self._has_frontends(self.groups[k].gid)]
        live = {cur.gid for cur in self.groups.values()} if self._full else None
        self.side.remove(ok, gone, gid_of, self.backend_ids, op, rep.errors, live)
        self.verdicts.remove(ok, gone, gid_of, op, rep.errors, live)
        self._remove_groups(desired, changed, ok, rep)
        self._collect_backends(rep)
        if hint is not None and not self._full:
            for k in changed:  # keep _last equal to desired without copying 10^4 entries
                if k in desired:
                    self._last[k] = desired[k]
                else:
                    self._last.pop(k, None)
        else:
            self._last = dict(desired)
        self._retry = {k for k in rep.errors if k in desired or k in self.groups}
        self._full = False
        self.errors = dict(rep.errors)
        return rep

    def _stricter(self, key: str, g: Group) -> bool:
        """Whether a frontend of `g` gets an authorization check it does not have in the
        kernel: the policy flag set, POLICY_OPEN cleared, or a move to this group (whose
        verdicts name the callers' new identities)."""
        if not g.flags & G_POLICY:
            return False
        gid = self.groups[key].gid
        for fe in g.frontends:
            old = self._svc.entries.get(fe)
            was = old[2] if old is not None else 0
            if not was & G_POLICY or (was & G_POLICY_OPEN and not g.flags & G_POLICY_OPEN) \
                    or old[0] != gid:
                return True
        return False

    def _kernel_flags(self, key: str) -> int | None:
        """The flags a group's frontends have in the kernel now (None: not written yet)."""
        cur = self.groups.get(key)
        for fe in self._svc.of.get(cur.gid, ()) if cur is not None else ():
            val = self._svc.entries.get(fe)
            if val is not None:
                return val[2]
        return None

    def _undo_dropped(self, ok: dict[str, Group], rep: Report) -> None:
        """A group whose table went into its idle half but whose side entries or verdicts
        then failed keeps its frontends on the old half: its old backends are still read
        (and the new ones are in the idle half), so both stay referenced until a write of
        the group succeeds, and the removals reported for UDP sockets are taken back."""
        for key, (backends, half, removed) in self._undo.items():
            if key not in ok:
                cur = self.groups[key]
                if backends is not None:  # the old ones are read, the new ones are written
                    new = cur.backends or ()
                    seen = {ref for ref, _w in new}
                    self._set_backends(cur, tuple(new) + tuple(
                        (ref, w) for ref, w in backends if ref not in seen))
                cur.half = half
                rep.removed -= removed
        self._undo = {}

    def group_key(self, gid: int) -> str | None:
        """The key of the group with this id (for naming events; the inverse is rebuilt on
        a miss, at most once a second)."""
        inv = getattr(self, "_key_of_gid", None)
        key = inv.get(gid) if inv is not None else None
        if key is None and time.monotonic() - getattr(self, "_inv_at", 0.0) > 1.0:
            self._key_of_gid = {cur.gid: k for k, cur in list(self.groups.items())}
            self._inv_at = time.monotonic()
            key = self._key_of_gid.get(gid)
        return key

    def _op(self, rep: Report, name: str, fn, *args) -> None:
        fn(*args)
        rep.ops[name] += 1

    def _has_frontends(self, gid: int) -> bool:
        return bool(self._svc.of.get(gid) or self._ext.of.get(gid))

    def _add_members(self, desired, changed, rep: Report) -> None:
        """Affinity members of backends a changed group gains, before its new table goes in
        (so an affinity entry made from the new table can be followed at once). Those it
        loses go after its frontends (SideTables.remove)."""
        from meshd.sidetables import MAX_WEIGHT
        for key in sorted(k for k in changed if k in desired and k in self.groups):
            gid, g = self.groups[key].gid, desired[key]
            if gid not in self.side.affcfg:
                continue  # no affinity in the kernel yet: side.add writes them all
            # (also when the group turns affinity off: its frontends keep the flag until
            # they are rewritten, after the new table is in)
            have = self.side.members.get(gid, {})
            for ref, w in g.backends:
                bid = self.backend_ids.get(ref)
                if bid is None or bid in have:
                    continue
                w = min(w, MAX_WEIGHT)
                try:
                    self._op(rep, "put_member", self.dp.put_member, gid, bid, w)
                    self.side.members.setdefault(gid, {})[bid] = w
                except DataplaneError as e:
                    rep.errors[key] = f"affinity member not written: {e}"

    def _add_backends(self, desired, changed, rep: Report) -> set[BackendRef]:
        failed: set[BackendRef] = set()
        needed = {ref for k in changed if k in desired for ref, _w in desired[k].backends}
        # (a comprehension, not `needed - backend_ids.keys()`: that copies every backend)
        new = sorted((r for r in needed if r not in self.backend_ids), key=lambda r: r.name)
        if not new:
            return failed
        take = self._bids.take
        bids = [take() for _ref in new]  # (the kept id ints first, side by side in memory:
        items = list(zip(bids, new))  # interleaved with the pairs they pinned their pages)
        del bids
        put_many = getattr(self.dp, "put_backends", None)
        if put_many is not None:  # one batch syscall per many entries (a cold sync: 10^5)
            errs = put_many(items) or {}
        else:
            errs = {}
            for bid, ref in items:
                try:
                    self.dp.put_backend(bid, ref)
                except DataplaneError as e:
                    errs[bid] = str(e)
        ids = self.backend_ids
        for bid, ref in items:
            err = errs.get(bid)
            if err is None:
                ids[ref] = bid
                continue
            self._bids.free(bid)
            failed.add(ref)
            log.error("backend %s not written: %s", ref.name, err)
            rep.errors[f"backend {ref.name}"] = err
        if len(items) > len(errs):
            rep.ops["put_backend"] += len(items) - len(errs)
        return failed

    def _set_backends(self, cur: Applied, backends) -> None:
        """Changes what an applied group references, keeping the refcounts right."""
        if cur.backends is None:
            self._unknown -= 1
        else:
            ids = self.backend_ids
            for ref, _w in cur.backends:
                bid = ids.get(ref)
                if bid is None or self._bids.use(bid, -1) <= 0:
                    self._unused.add(ref)
        if backends is None:
            self._unknown += 1
        else:
            ids, use = self.backend_ids, self._bids.use
            for ref, _w in backends:
                use(ids[ref], 1)  # (every backend of an applied group was written)
            if self._draining:
                for ref, _w in backends:
                    self._draining.pop(ref, None)  # back while draining: keeps its id
        cur.backends = backends

    def _write_groups(self, desired, changed, failed_refs, rep: Report) -> dict[str, Group]:
        """Names and tables of the changed groups; returns those whose frontends may be written."""
        ok: dict[str, Group] = {}
        need: list[str] = []  # groups whose table must be (re)built
        for key in sorted(k for k in changed if k in desired):
            g = desired[key]
            broken = failed_refs and [r.name for r, _w in g.backends if r in failed_refs]
            if broken:
                rep.errors[key] = f"backends not written: {', '.join(broken)}"
                continue
            cur = self.groups.get(key)
            if cur is None:
                gid = self._gids.take()
                try:
                    self._op(rep, "put_name", self.dp.put_name, gid, key)
                except DataplaneError as e:
                    # not registered: the retry names it (a group known here but unnamed
                    # in the kernel was never named again)
                    self._gids.free(gid)
                    log.error("service group %s not updated: %s", key, e)
                    rep.errors[key] = str(e)
                    continue
                cur = Applied(gid, (), False)
                self.groups[key] = cur
            if g.backends and (cur.backends != g.backends or not cur.has_table):
                need.append(key)
                continue
            self._note_removed(rep, cur, g)
            self._set_backends(cur, g.backends)
            ok[key] = g
        t0 = time.perf_counter()
        size = {k: self._size(desired[k], self.groups[k]) for k in need}

        def build(keys: list[str]) -> list[np.ndarray | None]:
            m = size[keys[0]]
            try:
                return self._tables([desired[k] for k in keys], m)
            except ValueError:  # one bad group: find it, build the rest one by one
                tables: list[np.ndarray | None] = []
                for k in keys:
                    try:
                        tables.append(self._tables([desired[k]], m)[0])
                    except ValueError as e1:
                        rep.errors[k] = str(e1)
                        tables.append(None)
                return tables
        by_size: dict[int, list[str]] = {}
        for k in need:  # one vectorised build per table size
            by_size.setdefault(size[k], []).append(k)
        chunks = [keys[s:s + TABLE_BUILD_BATCH] for keys in by_size.values()
                  for s in range(0, len(keys), TABLE_BUILD_BATCH)]
        # Each chunk's tables are written as soon as it is built, while the pool builds the
        # next ones (the writes' syscalls let go of the GIL too), so only the chunks in
        # flight are held, not every table of a cold sync. Frontends still come after all.
        put_secs = [0.0]
        if len(chunks) > 1:  # numpy's sorts let go of the GIL: ~1.5x on 2 CPUs (a cold sync)
            with ThreadPoolExecutor(min(len(chunks), os.cpu_count() or 1)) as pool:
                for keys, tables in zip(chunks, pool.map(build, chunks)):
                    self._write_chunk(keys, tables, desired, ok, rep, put_secs)
        else:
            for keys in chunks:
                self._write_chunk(keys, build(keys), desired, ok, rep, put_secs)
        if need:
            rep.timings["build_tables"] = time.perf_counter() - t0 - put_secs[0]
        if put_secs[0]:
            rep.timings["put_tables"] = put_secs[0]
        return ok

    def _write_chunk(self, keys: list[str], tables: list[np.ndarray | None], desired,
                     ok: dict[str, Group], rep: Report, put_secs: list[float]) -> None:
        """Writes one built chunk of tables (in place and flip, or fresh and swapped in)."""
        pending: dict[str, tuple[int, np.ndarray, int | None]] = {}
        for key, table in zip(keys, tables):
            if table is None:
                continue
            cur, g = self.groups[key], desired[key]
            if cur.backends is None and cur.has_table and cur.m == table.size and \
                    np.array_equal(self.dp.get_table(cur.gid, cur.half), table):
                self._set_backends(cur, g.backends)  # adopted, already right: no write
                ok[key] = g
            elif cur.has_table and cur.m == table.size and self._halves_agree(cur):
                pending[key] = (cur.gid, table, 1 - cur.half)  # in place, then flip
            else:
                pending[key] = (cur.gid, table, None)  # fresh inner map, swapped in
        if not pending:
            return
        t0 = time.perf_counter()
        failed = self.dp.put_tables(list(pending.values()))
        put_secs[0] += time.perf_counter() - t0
        instead = getattr(self.dp, "swapped_instead", None)
        if isinstance(instead, set) and instead:  # written fresh, not in place: readers
            # have the new table already (no undo, a swap)
            pending = {k: (gid, t, None if gid in instead else h)
                       for k, (gid, t, h) in pending.items()}
        if len(pending) > len(failed):
            rep.ops["put_table"] += len(pending) - len(failed)
        for key, (gid, table, half) in pending.items():
            if gid in failed:
                log.error("service group %s: table not written: %s", key, failed[gid])
                rep.errors[key] = failed[gid]
                continue
            cur = self.groups[key]
            before = (cur.backends, cur.half)
            removed = self._note_removed(rep, cur, desired[key])
            self._set_backends(cur, desired[key].backends)
            cur.has_table, cur.m = True, _SIZES.setdefault(table.size, int(table.size))
            if half is not None:
                self._undo[key] = (*before, removed)  # readers stay on the old half until
                cur.half = half  # the frontend writes flip to it
            else:
                rep.table_swaps += 1
            ok[key] = desired[key]

    def _note_removed(self, rep: Report, cur: Applied, g: Group | None) -> set:
        if not cur.backends:
            return set()  # nothing before, or adopted (unknown)
        gone = {ref for ref, _w in cur.backends} - {ref for ref, _w in (g.backends if g else ())}
        if not gone:
            return set()
        fes = self._old_fes.get(cur.gid, set()) | (set(g.frontends) if g else set())
        added = {(fe, ref) for fe in fes for ref in gone} - rep.removed
        rep.removed |= added
        return added

    def _size(self, g: Group, cur: Applied) -> int:
        """The table size of a group: fixed, or the ladder rung its weights need (its
        present size kept while that still balances to 1%: maglev.table_size_kept)."""
        return maglev.table_size_kept([w for _r, w in g.backends],
                                      cur.m if cur.has_table else 0, self.dp.maglev_m or None,
                                      getattr(self.dp, "maglev_max", maglev.LADDER[-1]))

    def _halves_agree(self, cur: Applied) -> bool:
        """True if every frontend of the group names the half `cur.half` (else one may
        name the other half, which must not be written in place)."""
        want = TABLE_B if cur.half else 0
        return all(fmap.entries[fe][2] & TABLE_B == want or not fmap.entries[fe][1]
                   for fmap in (self._svc, self._ext) for fe in fmap.of.get(cur.gid, ()))

    def _tables(self, groups: list[Group], m: int) -> list[np.ndarray]:
        """Maglev tables of backend ids, many groups of one size in one vectorised build."""
        idx = maglev.build_tables([[(ref.name, w) for ref, w in g.backends] for g in groups], m)
        return [IdTable.of(i, np.array([self.backend_ids[ref] for ref, _w in g.backends],
                                       dtype=np.uint32))
                for g, i in zip(groups, idx)]

    def _write_frontends(self, desired, changed, ok: dict[str, Group], rep: Report,
                         every: set | None = None) -> None:
        """`every`: the frontends of every group this apply writes (when `ok` is only some
        of them: a frontend moving to a group of the other pass is not stale)."""
        # A failed write (the frontend map is full: E2BIG) is that group's error, so the
        # service shows it and the next apply retries it; every other group still converges.
        want: dict[Frontend, tuple[int, int, int]] = {}
        want_ext: dict[Frontend, tuple[int, int, int]] = {}
        owner: dict[Frontend, str] = {}
        owner_ext: dict[Frontend, str] = {}
        for key, g in ok.items():
            cur = self.groups[key]
            gid, count = cur.gid, min(len(g.backends), MAX_COUNT)
            half = TABLE_B if cur.half and g.backends else 0  # count 0 reads no table
            for m, own, fronts in ((want, owner, g.frontends),
                                   (want_ext, owner_ext, g.tc_frontends)):
                for fe in fronts:
                    m[fe] = (gid, count, g.frontend_flags(fe) | half)
                    own[fe] = key
        for fmap, w, own in ((self._svc, want, owner), (self._ext, want_ext, owner_ext)):
            if fmap.put is None:  # a Dataplane without the tc override map (tests)
                continue
            self._write_map(fmap, w, own, desired, changed, ok, rep)

    def _write_map(self, fmap: FeMap, want, owner, desired, changed, ok, rep: Report,
                   every: set | None = None) -> None:
        # Frontends of changed groups that no group wants any more (a failed group keeps its)
        # go first: nothing wants them, and in a full map they make room for the new ones.
        stale: dict[Frontend, str] = {}
        for key in changed:
            cur = self.groups.get(key)
            if cur is not None and (key in ok or key not in desired):
                # (not `set - want.keys()`: that copies all of `want` per group: quadratic)
                stale.update((fe, key) for fe in fmap.of.get(cur.gid, ())
                             if fe not in want and (every is None or fe not in every))
        if self._full:  # adopted entries of a group that has no name (a crash mid-write)
            named = {cur.gid for cur in self.groups.values()}
            stale.update((fe, f"frontend {fe}") for fe, val in fmap.entries.items()
                         if val[0] not in named and fe not in want
                         and (every is None or fe not in every))
        delete_name = fmap.what.replace("put_", "delete_")
        for fe in sorted(stale, key=str):
            try:
                self._op(rep, delete_name, fmap.delete, fe)
                fmap.forget(fe)
            except DataplaneError as e:
                rep.errors.setdefault(stale[fe], f"frontend {fe} not removed: {e}")
        for fe, val in sorted(want.items(), key=lambda kv: str(kv[0])):
            if fmap.entries.get(fe) == val:
                continue
            try:
                self._op(rep, fmap.what, fmap.put, fe, *val)
                fmap.set(fe, val)
            except DataplaneError as e:
                log.error("service group %s: frontend %s not written: %s", owner[fe], fe, e)
                rep.errors.setdefault(owner[fe], f"frontend {fe} not written: {e}")

    def _remove_groups(self, desired, changed, ok: dict[str, Group], rep: Report) -> None:
        gone_keys = [k for k in sorted(changed) if k not in desired and k in self.groups
                     and not self._has_frontends(self.groups[k].gid)]  # else: retry
        for key in gone_keys:
            self._note_removed(rep, self.groups[key], None)
        empty = [k for k, g in ok.items() if not g.backends and self.groups[k].has_table]
        drop = [self.groups[k].gid for k in gone_keys + empty if self.groups[k].has_table]
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
                cur = self.groups[key]
                cur.has_table, cur.m = False, 0
        for key in gone_keys:
            cur = self.groups[key]
            if cur.gid in failed:
                rep.errors[key] = failed[cur.gid]
                continue
            try:
                self._op(rep, "delete_name", self.dp.delete_name, cur.gid)
                self._set_backends(cur, ())
                del self.groups[key]
                self._gids.free(cur.gid)
            except DataplaneError as e:
                rep.errors[key] = str(e)

    def _collect_backends(self, rep: Report) -> None:
        if self._unknown:
            return  # an adopted group we could not rewrite yet: its table may use any id
        candidates = set(self.backend_ids) if self._scan_all else self._unused
        self._scan_all, self._unused = False, set()
        ids, count = self.backend_ids, self._bids.count
        unused = sorted((r for r in candidates if r in ids and count(ids[r]) <= 0),
                        key=lambda r: r.name)
        if not unused:
            return
        if self.drain_seconds > 0 and self.dp.tc_conntrack():
            deadline = time.monotonic() + self.drain_seconds
            for ref in unused:
                self._draining.setdefault(ref, deadline)
            return
        for ref in unused:
            self._delete_backend(ref, rep.errors)
            if ref in self.backend_ids:
                self._unused.add(ref)  # try again next time
            else:
                rep.ops["delete_backend"] += 1

    def _delete_backend(self, ref: BackendRef, errors: dict[str, str]) -> None:
        bid = self.backend_ids[ref]
        try:
            self.dp.delete_backend(bid)
        except DataplaneError as e:
            errors[f"backend {ref.name}"] = str(e)
            return
        del self.backend_ids[ref]
        self._bids.free(bid)  # (and its use count)
        self._draining.pop(ref, None)

    @property
    def draining(self) -> int:
        """Backends out of every selection still kept for tc flows (collect_drained)."""
        return len(self._draining)

    def collect_drained(self, now: float | None = None) -> int:
        """Deletes the draining backends no live tc conntrack entry names any more (all of
        them when the tc path is gone), and those drained for `drain_seconds`. Call it
        between applies (it walks the tc conntrack map: only while something drains).
        Returns how many backends were deleted."""
        if not self._draining or self._unknown:
            return 0
        now = time.monotonic() if now is None else now
        ids = self.backend_ids
        for ref in [r for r in self._draining if r not in ids or self._bids.count(ids[r]) > 0]:
            del self._draining[ref]  # in a selection again (or already gone)
        if not self._draining:
            return 0
        in_use = self.dp.flow_backends()
        errors: dict[str, str] = {}
        done = 0
        for ref, deadline in sorted(self._draining.items(), key=lambda kv: kv[0].name):
            if in_use is not None and self.backend_ids[ref] in in_use and now < deadline:
                continue
            self._delete_backend(ref, errors)
            done += ref not in self.backend_ids
        for what, err in errors.items():
            log.error("%s not removed after draining: %s", what, err)
        return done
