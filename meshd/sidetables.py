"""Per-group entries beside the frontends (kube-proxy semantics), kept exact by the reconciler.

    meshd_affcfg_v1    group id -> affinity timeout (s)        groups with G_AFFINITY
    meshd_member_v1    (group id, backend id) -> weight        the same groups' selection
    meshd_srcrange_v1  (frontend, source network) -> 1         FE_SOURCE_RANGES frontends

The datapath reads them only for frontends whose flags say so, so the reconciler calls
`add()` after a group's table is in and before its frontends are (re)written, and `remove()`
after the frontends: an entry a flag makes the datapath read exists before the flag is set
and goes only once no frontend with the flag points at it. Members that leave a selection go
with the table that no longer holds them; until then an affinity entry may still follow
them, which the old table would pick too. (Pure logic: the maps are behind the Dataplane.)
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

from meshd.desired import FE_SOURCE_RANGES, G_AFFINITY, Frontend, Group
from meshd.errors import DataplaneError

log = logging.getLogger("meshd.reconciler")

MAX_WEIGHT = 0xFFFFFFFF


def wanted_members(g: Group, ids: dict) -> dict[int, int]:
    """backend id -> weight of the group's selection, for groups with affinity."""
    if not g.flags & G_AFFINITY:
        return {}
    return {ids[ref]: min(w, MAX_WEIGHT) for ref, w in g.backends if ref in ids}


def wanted_ranges(g: Group) -> frozenset:
    """(frontend, source network) of every FE_SOURCE_RANGES frontend of the group; only
    networks of the frontend's family (kube-proxy filters the ranges per family too)."""
    return frozenset((fe, net) for fe in (*g.frontends, *g.tc_frontends)
                     if g.frontend_flags(fe) & FE_SOURCE_RANGES
                     for net in g.source_ranges if net.version == fe.vip.version)


class SideTables:
    def __init__(self, dp) -> None:
        self.dp = dp
        self.affcfg: dict[int, int] = {}  # gid -> timeout, as in the kernel
        self.members: dict[int, dict[int, int]] = {}  # gid -> {bid: weight}, as in the kernel
        self.ranges: set[tuple[Frontend, object]] = set()  # as in the kernel
        self._ranges_of: dict[str, frozenset] = {}  # group key -> entries it wants
        self._refs: Counter = Counter()  # entry -> groups wanting it
        self._doubt: set = set()  # kernel entries that may be wanted by no group now

    def adopt(self, snap) -> None:
        self.affcfg = dict(snap.affinity)
        self.members = {gid: dict(m) for gid, m in snap.members.items()}
        self.ranges = set(snap.srcranges)
        self._doubt = set(self.ranges)

    def backends_in_use(self) -> set[int]:
        return {bid for m in self.members.values() for bid in m}

    def add(self, ok: dict[str, Group], gid_of: Callable[[str], int], ids: dict,
            op, errors: dict[str, str]) -> None:
        """Writes what the ok groups' frontends will need; a group that fails is taken out
        of `ok` (its frontends keep what they had) with its error."""
        for key in list(ok):
            g, gid = ok[key], gid_of(key)
            try:
                if g.flags & G_AFFINITY:
                    if self.affcfg.get(gid) != g.affinity:
                        op("put_affinity", self.dp.put_affinity, gid, g.affinity)
                        self.affcfg[gid] = g.affinity
                    have = self.members.setdefault(gid, {})
                    for bid, w in sorted(wanted_members(g, ids).items()):
                        if have.get(bid) != w:
                            op("put_member", self.dp.put_member, gid, bid, w)
                            have[bid] = w
                new, old = wanted_ranges(g), self._ranges_of.get(key, frozenset())
                if new != old:
                    for e in sorted(new - old, key=str):
                        if e not in self.ranges:
                            op("put_srcrange", self.dp.put_srcrange, *e)
                            self.ranges.add(e)
                        self._refs[e] += 1
                    self._release(old - new)
                    self._ranges_of[key] = new
            except DataplaneError as e:
                log.error("service group %s: affinity or source ranges not written: %s", key, e)
                errors[key] = str(e)
                del ok[key]

    def _release(self, entries) -> None:
        for e in entries:
            self._refs[e] -= 1
            if self._refs[e] <= 0:
                del self._refs[e]
                self._doubt.add(e)

    def remove(self, ok: dict[str, Group], gone: list[tuple[str, int]], gid_of, ids: dict,
               op, errors: dict[str, str], live: set[int] | None = None) -> None:
        """After the frontends: members and timeouts the ok groups no longer want, all of
        the `gone` groups' (key, gid) entries, and unwanted source ranges. `live`: every
        group id in use (after a restart: entries of any other id are removed too)."""
        drop: dict[int, tuple[str, dict[int, int], bool]] = {}  # gid -> (where, keep, cfg)
        for key, g in ok.items():
            gid = gid_of(key)
            drop[gid] = (key, wanted_members(g, ids), bool(g.flags & G_AFFINITY))
        for key, gid in gone:
            drop[gid] = (key, {}, False)
            self._release(self._ranges_of.pop(key, frozenset()))
        if live is not None:
            for gid in (self.affcfg.keys() | self.members.keys()) - live - drop.keys():
                drop[gid] = (f"group id {gid}", {}, False)
        for gid, (where, keep, cfg) in sorted(drop.items()):
            try:
                have = self.members.get(gid, {})
                for bid in sorted(b for b in have if b not in keep):
                    op("delete_member", self.dp.delete_member, gid, bid)
                    del have[bid]
                if not have:
                    self.members.pop(gid, None)
                if not cfg and gid in self.affcfg:
                    op("delete_affinity", self.dp.delete_affinity, gid)
                    del self.affcfg[gid]
            except DataplaneError as e:
                errors.setdefault(where, f"affinity entries not removed: {e}")
        for e in sorted(self._doubt, key=str):
            if self._refs.get(e, 0) > 0 or e not in self.ranges:
                self._doubt.discard(e)
                continue
            try:
                op("delete_srcrange", self.dp.delete_srcrange, *e)
                self.ranges.discard(e)
                self._doubt.discard(e)
            except DataplaneError as err:
                errors.setdefault(f"frontend {e[0]}", f"source range {e[1]} not removed: {err}")
