"""Authorization entries beside the frontends, kept exact by the reconciler (pure logic).

    meshd_verdict_v1  (identity, group id, uid) -> (action, flags, policy id)
                      groups with G_POLICY: Group.verdicts
    meshd_ident_v1    cgroup id -> identity      every cgroup some policy's `from` selects

The socket hooks read them only for frontends with G_POLICY (MESHD_SVC_F_POLICY), so the
order is the one of meshd/sidetables.py, make before break:
  1. `add()`, before the frontends: the verdicts a group now wants (uid entries before
     the any-uid entry whose MESHD_VERDICT_F_UID sends readers to them);
  2. the frontends (the flag set or cleared);
  3. `write_idents()`: cgroups to their (new) identities; the new identity's verdicts are
     in (1) and the old one's are still there;
  4. `remove()`: verdicts no group wants any more (after the flag that read them is gone).
A change is therefore never a moment of "everything denied" nor of "everything allowed":
each entry is one atomic map update, and every entry a reader can reach is of the old
state or of the new one.
"""

from __future__ import annotations

import logging
from typing import Callable

from meshd.errors import DataplaneError

log = logging.getLogger("meshd.reconciler")

UID_ANY = 0xFFFFFFFF


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
        self.want_idents: dict[int, int] = {}  # set by the daemon before apply()

    def adopt(self, snap) -> None:
        self.kernel = {gid: dict(v) for gid, v in getattr(snap, "verdicts", {}).items()}
        self.idents = dict(getattr(snap, "idents", {}))

    def add(self, ok: dict, gid_of: Callable[[str], int], op, errors: dict[str, str]) -> None:
        if not hasattr(self.dp, "put_verdict"):
            return
        for key in list(ok):
            want = wanted(ok[key])
            if not want:
                continue
            gid = gid_of(key)
            have = self.kernel.setdefault(gid, {})
            try:
                for (identity, uid), val in sorted(want.items(), key=_order):
                    if have.get((identity, uid)) != val:
                        op("put_verdict", self.dp.put_verdict, identity, gid, uid, *val)
                        have[(identity, uid)] = val
            except DataplaneError as e:
                log.error("service group %s: authorization entries not written: %s", key, e)
                errors[key] = f"authorization entries not written: {e}"
                del ok[key]

    def write_idents(self, op, errors: dict[str, str]) -> None:
        if not hasattr(self.dp, "put_ident") or self.want_idents == self.idents:
            return
        want = self.want_idents
        failed = 0
        for cgid, identity in sorted(want.items()):
            if self.idents.get(cgid) != identity:
                try:
                    op("put_ident", self.dp.put_ident, cgid, identity)
                    self.idents[cgid] = identity
                except DataplaneError as e:
                    failed += 1
                    if failed == 1:
                        errors["policy identities"] = (
                            f"cgroup {cgid} not given its identity: {e} (raise "
                            "maps.max_identities?)")
        for cgid in sorted(c for c in self.idents if c not in want):
            try:
                op("delete_ident", self.dp.delete_ident, cgid)
                del self.idents[cgid]
            except DataplaneError as e:
                errors.setdefault("policy identities", f"cgroup {cgid}: identity not removed: {e}")

    def remove(self, ok: dict, gone: list[tuple[str, int]], gid_of, op,
               errors: dict[str, str], live: set[int] | None = None) -> None:
        if not hasattr(self.dp, "delete_verdict"):
            return
        drop: dict[int, tuple[str, dict]] = {}
        for key, g in ok.items():
            drop[gid_of(key)] = (key, wanted(g))
        for key, gid in gone:
            drop[gid] = (key, {})
        if live is not None:
            for gid in self.kernel.keys() - live - drop.keys():
                drop[gid] = (f"group id {gid}", {})
        for gid, (where, keep) in sorted(drop.items()):
            have = self.kernel.get(gid)
            if not have:
                continue
            try:
                # the any-uid entries first: they no longer send readers to uid entries
                for (identity, uid) in sorted((e for e in have if e not in keep),
                                              key=lambda e: (e[1] != UID_ANY, e)):
                    op("delete_verdict", self.dp.delete_verdict, identity, gid, uid)
                    del have[(identity, uid)]
            except DataplaneError as e:
                errors.setdefault(where, f"authorization entries not removed: {e}")
            if not have:
                self.kernel.pop(gid, None)
