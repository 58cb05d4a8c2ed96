"""Authorization entries beside the frontends, kept exact by the reconciler (pure logic).

    meshd_verdict_v1  (identity, group id, uid) -> (action, flags, policy id)
                      groups with G_POLICY: Group.verdicts
    meshd_ident_v1    cgroup id -> identity      every cgroup some policy's `from` selects

    meshd_subtree_v1  cgroup id -> identity      what a cgroup made since the last scan
                                                 inherits from its nearest known ancestor

The socket hooks read them only for frontends with G_POLICY (MESHD_SVC_F_POLICY), so the
order is the one of meshd/sidetables.py, make before break:
  1. `add()`, before the frontends: the verdicts a group now wants (uid entries before
     the any-uid entry whose MESHD_VERDICT_F_UID sends readers to them);
  2. the frontends that do not get stricter (the flag cleared, or unchanged);
  3. `write_idents()`: cgroups to their (new) identities; the new identity's verdicts are
     in (1) and the old one's are still there. A cgroup whose new identity had a verdict
     that could not be written keeps its old identity (never a switch to a half-written
     identity: on an open service that would be a deny lost);
  4. the frontends that get stricter (the policy flag set, or POLICY_OPEN cleared): their
     callers have their new identities by now, so an allowed caller is never refused;
  5. `remove()`: verdicts no group wants any more (after the flag that read them is gone).
Each entry is one atomic map update, and every entry a reader can reach is of the old state
or of the new one.
"""

from __future__ import annotations

import logging
from typing import Callable

from meshd.desired import G_POLICY, G_POLICY_OPEN
from meshd.errors import DataplaneError

log = logging.getLogger("meshd.reconciler")

UID_ANY = 0xFFFFFFFF
DENY_BRIDGE = (2, 0, 0)  # MESHD_VERDICT_DENY, no flags, no policy: see Verdicts._bridge


def wanted(g) -> dict[tuple[int, int], tuple[int, int, int]]:
    """(identity, uid) -> (action, flags, policy id) of one group (empty without G_POLICY)."""
    return dict(g.verdicts) if g.verdicts else {}


def _order(item) -> tuple:
    (identity, uid), _v = item
    return (uid == UID_ANY, identity, uid)  # uid entries first


class Verdicts:
    def __init__(self, dp) -> None:
        self.dp = dp
        self.kernel: dict[int, dict[tuple[int, int], tuple[int, int, int]]] = {}  # gid -> ...
        self.idents: dict[int, int] = {}  # cgroup id -> identity, as in the kernel
        self.subtree: dict[int, int] = {}  # cgroup id -> inherited identity, as in the kernel
        self.want_idents: dict[int, int] = {}  # set by the daemon before apply()
        self.want_subtree: dict[int, int] = {}  # likewise
        self._failed: set[int] = set()  # identities with a verdict not written (this apply)
        # (gid, identity, uid) entries left in place because a cgroup still names their
        # identity (its switch away failed): removed once nothing names it
        self._deferred: set[tuple[int, int, int]] = set()

    def adopt(self, snap) -> None:
        self.kernel = {gid: dict(v) for gid, v in getattr(snap, "verdicts", {}).items()}
        self.idents = dict(getattr(snap, "idents", {}))
        self.subtree = dict(getattr(snap, "subtree", {}))

    def add(self, ok: dict, gid_of: Callable[[str], int], op, errors: dict[str, str],
            was_flags: Callable[[str], int | None] | None = None) -> None:
        """Step 1. `was_flags(key)`: the flags the group's frontends have in the kernel now
        (None: none written yet), for the bridge entries of a group whose POLICY_OPEN flips."""
        self._failed = set()
        if not hasattr(self.dp, "put_verdict"):
            return
        for key in list(ok):
            g = ok[key]
            want = wanted(g)
            gid = gid_of(key)
            have = self.kernel.setdefault(gid, {})
            bridge = self._bridge(g, want, have, was_flags(key) if was_flags else None)
            if not want and not bridge:
                continue
            try:
                for (identity, uid), val in sorted({**bridge, **want}.items(), key=_order):
                    if have.get((identity, uid)) != val:
                        op("put_verdict", self.dp.put_verdict, identity, gid, uid, *val)
                        have[(identity, uid)] = val
            except DataplaneError as e:
                # every identity of this group not yet complete: none of their cgroups moves
                self._failed |= {i for (i, u), v in want.items() if have.get((i, u)) != v}
                log.error("service group %s: authorization entries not written: %s", key, e)
                errors[key] = f"authorization entries not written: {e}"
                del ok[key]

    def _moving(self) -> tuple[set[int], set[int]]:
        """(identities cgroups leave, identities they arrive at) in this apply's switch; 0
        stands for "no identity"."""
        old, new = set(), set()
        for table, want in ((self.idents, self.want_idents), (self.subtree, self.want_subtree)):
            for cg in table.keys() | want.keys():
                a, b = table.get(cg, 0), want.get(cg, 0)
                if a != b:
                    old.add(a)
                    new.add(b)
        return old, new

    def _bridge(self, g, want: dict, have: dict, was: int | None) -> dict:
        """Explicit DENY entries for the switch of a group whose POLICY_OPEN flips: a missing
        entry means "allowed" under the open flag and "denied" under the closed one, and the
        flag and the callers' identities change at different steps. Closed -> open (the flag
        goes first): the identities callers leave, where they have no entry (denied). Open ->
        closed (the flag goes last): the identities callers arrive at, where the new state
        has no entry (denied). Removed by remove() with the other entries nobody wants."""
        if was is None or not g.flags & G_POLICY or not was & G_POLICY:
            return {}
        opening = bool(g.flags & G_POLICY_OPEN)
        if opening == bool(was & G_POLICY_OPEN):
            return {}
        leaving, arriving = self._moving()
        if opening:
            return {(i, UID_ANY): DENY_BRIDGE for i in leaving
                    if (i, UID_ANY) not in want and (i, UID_ANY) not in have}
        return {(i, UID_ANY): DENY_BRIDGE for i in arriving if (i, UID_ANY) not in want}

    def write_idents(self, op, errors: dict[str, str]) -> None:
        if not hasattr(self.dp, "put_ident"):
            return
        for table, want, put, delete, what in (
                (self.idents, self.want_idents, self.dp.put_ident, self.dp.delete_ident,
                 "ident"),
                (self.subtree, self.want_subtree, getattr(self.dp, "put_subtree", None),
                 getattr(self.dp, "delete_subtree", None), "subtree")):
            if put is None or want == table:
                continue
            failed = 0
            for cgid, identity in sorted(want.items()):
                if table.get(cgid) == identity:
                    continue
                if identity in self._failed:  # its verdicts are not all in: keep the old
                    errors.setdefault("policy identities", f"cgroup {cgid} keeps identity "
                                      f"{table.get(cgid, 0)}: the verdicts of {identity} "
                                      "could not all be written")
                    continue
                try:
                    op(f"put_{what}", put, cgid, identity)
                    table[cgid] = identity
                except DataplaneError as e:
                    failed += 1
                    if failed == 1:
                        errors["policy identities"] = (
                            f"cgroup {cgid} not given its identity ({what}): {e}; at most "
                            "65,536 cgroups carry an identity (docs/policy.md#limits)")
            for cgid in sorted(c for c in table if c not in want):
                try:
                    op(f"delete_{what}", delete, cgid)
                    del table[cgid]
                except DataplaneError as e:
                    errors.setdefault("policy identities",
                                      f"cgroup {cgid}: identity not removed ({what}): {e}")

    def remove(self, ok: dict, gone: list[tuple[str, int]], gid_of, op,
               errors: dict[str, str], live: set[int] | None = None) -> None:
        """Step 5: entries no group wants, except those of an identity a cgroup still names
        though the new state has it no more (its switch failed): they stay until it is free."""
        if not hasattr(self.dp, "delete_verdict"):
            return
        named = set(self.idents.values()) | set(self.subtree.values())
        held = named - set(self.want_idents.values()) - set(self.want_subtree.values())
        drop: dict[int, tuple[str, dict]] = {}
        for key, g in ok.items():
            drop[gid_of(key)] = (key, wanted(g))
        for key, gid in gone:
            drop[gid] = (key, {})
        if live is not None:
            for gid in self.kernel.keys() - live - drop.keys():
                drop[gid] = (f"group id {gid}", {})
        for gid, identity, uid in sorted(self._deferred):
            if identity not in held:  # freed since: goes now (unless wanted again)
                self._deferred.discard((gid, identity, uid))
                drop.setdefault(gid, (f"group id {gid}", None))
        for gid, (where, keep) in sorted(drop.items()):
            have = self.kernel.get(gid)
            if not have:
                continue
            if keep is None:  # a group visited only for deferred entries: keep the rest
                keep = {e: v for e, v in have.items() if e[0] in named or e[0] in
                        set(self.want_idents.values()) | set(self.want_subtree.values())}
            try:
                # the any-uid entries first: they no longer send readers to uid entries
                for (identity, uid) in sorted((e for e in have if e not in keep),
                                              key=lambda e: (e[1] != UID_ANY, e)):
                    if identity in held:
                        self._deferred.add((gid, identity, uid))
                        continue
                    op("delete_verdict", self.dp.delete_verdict, identity, gid, uid)
                    del have[(identity, uid)]
            except DataplaneError as e:
                errors.setdefault(where, f"authorization entries not removed: {e}")
            if not have:
                self.kernel.pop(gid, None)
