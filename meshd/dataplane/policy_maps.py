"""The kernel's authorization tables (bpf/include/meshd_policy.h) of one instance.

`apply()` makes meshd_ident_v1 and meshd_verdict_v1 hold exactly what the control plane
compiled, writing only the difference, in an order a connecting socket can never catch
half done in a way that denies what both the old and the new tables allow:
new/changed verdicts first (an identity in use keeps its old, still present verdicts),
then new/changed cgroup -> identity entries (they point at verdicts already there), then
deletes of stale cgroups, then of stale verdicts (nothing points at them any more).
"""

from __future__ import annotations

import ctypes as C
from pathlib import Path

from meshd import names
from meshd.errors import DataplaneError
from meshd.dataplane import libbpf as bpf
from meshd.dataplane import structs as S

U32 = 0xFFFFFFFF
BATCH = 4096

class _U64(C.Structure):
    """A __u64 key as a struct: Map.lookup_batch copies keys with from_buffer_copy."""
    _fields_ = [("value", C.c_uint64)]


Ident = dict[int, int]  # cgroup id -> identity
Verdicts = dict[tuple[int, int, int], tuple[int, int, int]]  # (identity, group, uid) ->
#                                                               (action, flags, policy id)


class PolicyMaps:
    """Open handles on the pinned policy maps of `instance`."""

    def __init__(self, bpffs: Path, instance: str):
        pin_dir = names.pin_dir(bpffs, instance)
        missing = [n for n in names.POLICY_MAPS if not (pin_dir / n).exists()]
        if missing:
            raise DataplaneError(f"instance {instance!r} has no policy maps at {pin_dir} "
                                 f"(missing {', '.join(missing)}); is `meshd run` of this "
                                 "version started?")
        self.ident = bpf.Map(bpf.obj_get(pin_dir / names.MAP_IDENT), names.MAP_IDENT,
                             _U64, S.Ident)
        self.verdict = bpf.Map(bpf.obj_get(pin_dir / names.MAP_VERDICT), names.MAP_VERDICT,
                               S.VerdictKey, S.Verdict)
        self.subtree = bpf.Map(bpf.obj_get(pin_dir / names.MAP_SUBTREE), names.MAP_SUBTREE,
                               _U64, S.Ident)
        self.denied = bpf.PercpuMap(bpf.obj_get(pin_dir / names.MAP_DENIED),
                                    names.MAP_DENIED, S.DeniedKey, C.c_uint64)

    # ---- reads ------------------------------------------------------------------------
    def read(self) -> tuple[Ident, Verdicts]:
        """(cgroup id -> identity, (identity, group, uid) -> (action, flags, policy))."""
        ident = {k.value: v.identity for k, v in self.ident.lookup_batch()}
        verdicts = {(k.identity, k.group, k.uid): (v.action, v.flags, v.policy)
                    for k, v in self.verdict.lookup_batch()}
        return ident, verdicts

    def read_subtree(self) -> Ident:
        """cgroup id -> the identity a new cgroup below it inherits."""
        return {k.value: v.identity for k, v in self.subtree.lookup_batch()}

    def read_denied(self) -> dict[tuple[int, int], int]:
        """(group, identity) -> denials so far, summed over CPUs."""
        out = {}
        for k, v in self.denied.lookup_batch():
            out[(k.group, k.identity)] = sum(c.value for c in self.denied.copies(v))
        return out

    def prune_denied(self, groups: set[int]) -> int:
        """Drops the denial counters of groups not in `groups` (removed services), so a
        reused group id starts from zero. Returns how many were dropped."""
        return sum(self.denied.delete(k) for k in list(self.denied.keys())
                   if k.group not in groups)

    # ---- writes -----------------------------------------------------------------------
    def apply(self, ident: Ident, verdicts: Verdicts) -> dict[str, int]:
        """Makes the kernel hold `ident` and `verdicts` (see the module doc for the order).
        Returns counts {"verdicts_put", "ident_put", "ident_deleted", "verdicts_deleted"}.
        Bad input raises DataplaneError before anything is written."""
        _check(ident, verdicts)
        cur_ident, cur_verdicts = self.read()
        v_put = {k: v for k, v in verdicts.items() if cur_verdicts.get(k) != tuple(v)}
        i_put = {k: v for k, v in ident.items() if cur_ident.get(k) != v}
        i_del = [k for k in cur_ident if k not in ident]
        v_del = [k for k in cur_verdicts if k not in verdicts]
        _put(self.verdict, [S.VerdictKey(identity=i, group=g, uid=u) for i, g, u in v_put],
             [S.Verdict(action=a, flags=f, policy=p) for a, f, p in v_put.values()])
        _put(self.ident, [_U64(k) for k in i_put],
             [S.Ident(identity=v) for v in i_put.values()])
        for k in i_del:
            self.ident.delete(_U64(k))
        for i, g, u in v_del:
            self.verdict.delete(S.VerdictKey(identity=i, group=g, uid=u))
        return {"verdicts_put": len(v_put), "ident_put": len(i_put),
                "ident_deleted": len(i_del), "verdicts_deleted": len(v_del)}

    def close(self) -> None:
        for m in (self.ident, self.verdict, self.denied, self.subtree):
            m.close()

    def __enter__(self) -> "PolicyMaps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check(ident: Ident, verdicts: Verdicts) -> None:
    for cg, identity in ident.items():
        if not 0 < cg < 1 << 64 or not 0 < identity <= U32:
            raise DataplaneError(f"policy ident entry {cg} -> {identity}: cgroup ids and "
                                 "identities are positive (identity 0 means none and is "
                                 "never stored)")
    for key, val in verdicts.items():
        if len(key) != 3 or not all(0 <= x <= U32 for x in key):
            raise DataplaneError(f"policy verdict key {key!r}: must be (identity, group, "
                                 "uid) of 32-bit values (uid S.UID_ANY for any)")
        action, flags, policy = val
        if action not in (S.VERDICT_ALLOW, S.VERDICT_DENY) and not (
                action == 0 and flags & S.VERDICT_F_UID) or not 0 <= flags <= 0xFF \
                or not 0 <= policy <= U32:
            raise DataplaneError(f"policy verdict {key!r} -> {val!r}: action must be "
                                 f"{S.VERDICT_ALLOW} (allow) or {S.VERDICT_DENY} (deny), "
                                 "flags a byte, policy a 32-bit id")


def _put(m: bpf.Map, keys: list, values: list) -> None:
    for i in range(0, len(keys), BATCH):
        ks, vs = keys[i:i + BATCH], values[i:i + BATCH]
        ka = (m.key_type * len(ks))(*ks)
        va = (m.value_type * len(vs))(*vs)
        m.update_batch(ka, va)  # BpfError names the map (and "the map is full": E2BIG)
