"""Authorization entries in the reconciler (meshd/verdicts.py): written before the flag that
makes the hooks read them, removed after, and never a moment in which a caller allowed
before and after a change is denied (checked after every map operation)."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings, strategies as st

import errno

from meshd.desired import G_POLICY, G_POLICY_OPEN, desired_groups
from meshd.errors import BpfError
from meshd.reconciler import Reconciler
from meshd.verdicts import UID_ANY

from test_reconciler import FakeKernel, svc

ALLOW, DENY, F_UID = 1, 2, 1


class PolicyKernel(FakeKernel):
    def __init__(self):
        super().__init__()
        self.fail_identity: int | None = None  # put_verdict of it fails (a full map)
        self.verdicts: dict[tuple[int, int, int], tuple[int, int, int]] = {}
        self.idents: dict[int, int] = {}
        self.watch: list[tuple[int, int, int]] = []  # (cgroup, uid, frontend port) must pass
        self.log: list[str] = []

    def allowed(self, cgid: int, uid: int, gid: int, flags: int = G_POLICY) -> bool:
        """What the connect4 hook decides (bpf/include/meshd_policy.h)."""
        if not flags & G_POLICY:
            return True
        identity = self.idents.get(cgid, 0)
        v = self.verdicts.get((identity, gid, UID_ANY))
        if v and v[1] & F_UID:
            v = self.verdicts.get((identity, gid, uid), v)
        if v and v[0]:
            return v[0] == ALLOW
        return bool(flags & G_POLICY_OPEN)

    def check(self):
        super().check()
        for cgid, uid, port in self.watch:
            for fe, (gid, _count, flags) in self.frontends.items():
                if fe.port == port:
                    assert self.allowed(cgid, uid, gid, flags), \
                        f"cgroup {cgid} uid {uid} denied on {fe} after op {self.ops}"

    def put_verdict(self, identity, gid, uid, action, flags, policy):
        if identity == self.fail_identity:
            raise BpfError(errno.E2BIG, "bpf_map_update_elem", "meshd_verdict_v1")
        self.log.append(f"put_verdict {identity} {gid} {uid}")
        self.verdicts[(identity, gid, uid)] = (action, flags, policy)
        self.check()

    def delete_verdict(self, identity, gid, uid):
        self.log.append(f"delete_verdict {identity} {gid} {uid}")
        del self.verdicts[(identity, gid, uid)]
        self.check()

    def put_ident(self, cgid, identity):
        self.idents[cgid] = identity
        self.check()

    def delete_ident(self, cgid):
        del self.idents[cgid]
        self.check()

    def put_frontend(self, fe, gid, count, flags=0):
        self.log.append(f"put_frontend {fe.port} {flags & G_POLICY}")
        super().put_frontend(fe, gid, count, flags)


def with_policy(groups: dict, verdicts: dict, open_: bool = False) -> dict:
    """Every group of the services gets G_POLICY and these ((identity, uid) -> value)."""
    return {k: dataclasses.replace(g, flags=g.flags | G_POLICY | (G_POLICY_OPEN if open_ else 0),
                                   verdicts=frozenset(verdicts.items()))
            for k, g in groups.items()}


def test_verdicts_go_in_before_the_flag_and_out_after_it():
    k = PolicyKernel()
    r = Reconciler(k)
    plain = desired_groups([svc("db", "10.96.0.9", [("10.0.0.1", 1)], port=5432)])
    r.apply(plain)
    r.verdicts.want_idents = {100: 1}
    rep = r.apply(with_policy(plain, {(1, UID_ANY): (ALLOW, 0, 7)}))
    assert not rep.errors
    gid = next(iter(k.frontends.values()))[0]
    assert k.verdicts == {(1, gid, UID_ANY): (ALLOW, 0, 7)} and k.idents == {100: 1}
    first_flag = next(i for i, e in enumerate(k.log) if e == f"put_frontend 5432 {G_POLICY}")
    assert k.log.index(f"put_verdict 1 {gid} {UID_ANY}") < first_flag
    assert k.allowed(100, 0, gid) and not k.allowed(200, 0, gid)
    # the policy goes: the flag is cleared before its verdicts are removed
    k.log.clear()
    r.verdicts.want_idents = {}
    r.apply(plain)
    assert k.verdicts == {} and k.idents == {}
    assert k.log.index("put_frontend 5432 0") < k.log.index(f"delete_verdict 1 {gid} {UID_ANY}")


def test_a_caller_allowed_before_and_after_is_never_denied_in_between():
    k = PolicyKernel()
    r = Reconciler(k)
    plain = desired_groups([svc("db", "10.96.0.9", [("10.0.0.1", 1)], port=5432)])
    r.verdicts.want_idents = {100: 1, 101: 2}
    r.apply(with_policy(plain, {(1, UID_ANY): (ALLOW, 0, 7)}))
    k.watch = [(100, 0, 5432)]  # cgroup 100 stays allowed through every change below
    # 100 moves to a new identity 3 (a second policy now selects it too)
    r.verdicts.want_idents = {100: 3, 101: 2}
    r.apply(with_policy(plain, {(3, UID_ANY): (ALLOW, 0, 7), (2, UID_ANY): (ALLOW, 0, 8)}))
    # uid rules appear: uid 0 allowed, any other uid of the identity denied
    r.apply(with_policy(plain, {(3, UID_ANY): (0, F_UID, 0), (3, 0): (ALLOW, 0, 9)}))
    gid = next(iter(k.frontends.values()))[0]
    assert k.allowed(100, 0, gid) and not k.allowed(100, 1000, gid)
    assert not k.allowed(101, 0, gid)  # identity 2's verdict went with its policy
    # and back to a plain any-uid allow: uid entries go after the any entry lost F_UID
    r.apply(with_policy(plain, {(3, UID_ANY): (ALLOW, 0, 7)}))
    assert k.verdicts == {(3, gid, UID_ANY): (ALLOW, 0, 7)}


def test_restart_adopts_verdicts_and_removes_those_nothing_wants():
    k = PolicyKernel()
    r = Reconciler(k)
    plain = desired_groups([svc("db", "10.96.0.9", [("10.0.0.1", 1)], port=5432)])
    r.verdicts.want_idents = {100: 1}
    r.apply(with_policy(plain, {(1, UID_ANY): (ALLOW, 0, 7), (5, UID_ANY): (DENY, 0, 3)}))
    snap = k.snapshot()
    gid = next(iter(k.frontends.values()))[0]
    snap.verdicts = {gid: {(i, u): v for (i, g, u), v in k.verdicts.items() if g == gid}}
    snap.idents = dict(k.idents)
    r2 = Reconciler(k)
    r2.adopt(snap)
    r2.verdicts.want_idents = {100: 1}
    k.log.clear()
    r2.apply(with_policy(plain, {(1, UID_ANY): (ALLOW, 0, 7)}))
    assert k.verdicts == {(1, gid, UID_ANY): (ALLOW, 0, 7)}
    assert not any(e.startswith("put_verdict") for e in k.log)  # nothing rewritten


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from([(1, UID_ANY), (2, UID_ANY), (1, 0), (2, 1000)]),
                                st.sampled_from([(ALLOW, 0, 1), (DENY, 0, 2), (0, F_UID, 0),
                                                 (ALLOW, F_UID, 1)]), max_size=4),
                min_size=1, max_size=5))
def test_any_sequence_of_policies_ends_with_exactly_what_is_wanted(states):
    k = PolicyKernel()
    r = Reconciler(k)
    plain = desired_groups([svc("db", "10.96.0.9", [("10.0.0.1", 1)], port=5432)])
    for want in states:
        r.verdicts.want_idents = {100: 1, 101: 2}
        r.apply(with_policy(plain, want) if want else plain)
        gid = next(iter(k.frontends.values()))[0]
        assert k.verdicts == {(i, gid, u): v for (i, u), v in want.items()}


def test_the_first_allow_policy_never_refuses_the_caller_it_allows():
    """Review finding: the flag went in before the allowed cgroup had its identity."""
    k = PolicyKernel()
    r = Reconciler(k)
    plain = desired_groups([svc("db", "10.96.0.9", [("10.0.0.1", 1)], port=5432)])
    r.apply(plain)  # open: everyone may connect
    k.watch = [(100, 0, 5432)]  # cgroup 100 is allowed before and after every change
    r.verdicts.want_idents = {100: 1}
    r.apply(with_policy(plain, {(1, UID_ANY): (ALLOW, 0, 7)}))
    # an open (deny-only) service that gets an allow policy: closed, 100 still allowed
    r.verdicts.want_idents = {100: 2, 200: 3}
    r.apply(with_policy(plain, {(3, UID_ANY): (DENY, 0, 9)}, open_=True))
    r.verdicts.want_idents = {100: 4, 200: 3}
    r.apply(with_policy(plain, {(3, UID_ANY): (DENY, 0, 9), (4, UID_ANY): (ALLOW, 0, 7)}))
    # and every policy gone: open again, 100's identity removed after the flag
    r.verdicts.want_idents = {}
    r.apply(plain)
    assert k.verdicts == {} and k.idents == {}


def test_a_cgroup_never_switches_to_an_identity_whose_verdicts_failed():
    """Review finding: on an open service a switch to a half-written identity loses a deny."""
    k = PolicyKernel()
    r = Reconciler(k)
    plain = desired_groups([svc("db", "10.96.0.9", [("10.0.0.1", 1)], port=5432)])
    r.verdicts.want_idents = {100: 1}
    r.apply(with_policy(plain, {(1, UID_ANY): (DENY, 0, 9)}, open_=True))
    gid = next(iter(k.frontends.values()))[0]
    assert not k.allowed(100, 0, gid, G_POLICY | G_POLICY_OPEN)
    k.fail_identity = 2  # identity 2's verdicts cannot be written (verdict map full)
    r.verdicts.want_idents = {100: 2}
    rep = r.apply(with_policy(plain, {(2, UID_ANY): (DENY, 0, 9)}, open_=True))
    assert rep.errors and k.idents == {100: 1}  # kept the identity whose deny is in
    assert not k.allowed(100, 0, gid, G_POLICY | G_POLICY_OPEN)
    k.fail_identity = None
    rep = r.apply(with_policy(plain, {(2, UID_ANY): (DENY, 0, 9)}, open_=True))
    assert k.idents == {100: 2} and not k.allowed(100, 0, gid, G_POLICY | G_POLICY_OPEN)


# ---- second review: switches that fail, POLICY_OPEN flips, tables of dropped groups --------

class WatchingKernel(PolicyKernel):
    """Also: callers denied before and after a change must never be let through."""

    def __init__(self):
        super().__init__()
        self.deny_watch: list[tuple[int, int, int]] = []
        self.fail_pair: tuple[int, int] | None = None  # (identity, gid) whose put fails

    def check(self):
        super().check()
        for cgid, uid, port in self.deny_watch:
            for fe, (gid, _c, flags) in self.frontends.items():
                if fe.port == port:
                    assert not self.allowed(cgid, uid, gid, flags), \
                        f"cgroup {cgid} let through on {fe} after op {self.ops}"

    def put_verdict(self, identity, gid, uid, action, flags, policy):
        if (identity, gid) == self.fail_pair:
            raise BpfError(errno.E2BIG, "bpf_map_update_elem", "meshd_verdict_v1")
        super().put_verdict(identity, gid, uid, action, flags, policy)


def two_services():
    return desired_groups([svc("a", "10.96.0.9", [("10.0.0.1", 1)], port=5432),
                           svc("b", "10.96.0.10", [("10.0.0.2", 1)], port=6379)])


def test_an_identity_kept_because_its_switch_failed_keeps_its_verdicts_everywhere():
    k = WatchingKernel()
    r = Reconciler(k)
    plain = two_services()
    r.verdicts.want_idents = {100: 1}
    r.apply(with_policy(plain, {(1, UID_ANY): (DENY, 0, 9)}, open_=True))
    k.deny_watch = [(100, 0, 5432), (100, 0, 6379)]
    gids = {fe.port: v[0] for fe, v in k.frontends.items()}
    k.fail_pair = (2, gids[5432])  # identity 2 cannot be written in a's group only
    r.verdicts.want_idents = {100: 2}
    rep = r.apply(with_policy(plain, {(2, UID_ANY): (DENY, 0, 9)}, open_=True))
    assert rep.errors and k.idents == {100: 1}
    assert (1, gids[6379], UID_ANY) in k.verdicts  # b keeps denying the kept identity
    k.fail_pair = None
    r.apply(with_policy(plain, {(2, UID_ANY): (DENY, 0, 9)}, open_=True))
    assert k.idents == {100: 2} and not any(i == 1 for i, _g, _u in k.verdicts)


def test_no_cgroup_moves_to_an_identity_left_unwritten_behind_a_failure():
    k = WatchingKernel()
    r = Reconciler(k)
    plain = desired_groups([svc("a", "10.96.0.9", [("10.0.0.1", 1)], port=5432)])
    r.verdicts.want_idents = {100: 1, 101: 1}
    r.apply(with_policy(plain, {(1, UID_ANY): (DENY, 0, 9)}, open_=True))
    k.deny_watch = [(100, 0, 5432), (101, 0, 5432)]
    k.fail_identity = 2  # the loop stops at 2: 3 is never written either
    r.verdicts.want_idents = {100: 2, 101: 3}
    r.apply(with_policy(plain, {(2, UID_ANY): (DENY, 0, 9), (3, UID_ANY): (DENY, 0, 9)},
                        open_=True))
    assert k.idents == {100: 1, 101: 1}


def test_a_closed_service_turning_open_never_lets_a_denied_caller_through():
    k = WatchingKernel()
    r = Reconciler(k)
    plain = desired_groups([svc("db", "10.96.0.9", [("10.0.0.1", 1)], port=5432)])
    r.verdicts.want_idents = {200: 1}  # "allow from Y"
    r.apply(with_policy(plain, {(1, UID_ANY): (ALLOW, 0, 7)}))
    k.deny_watch = [(100, 0, 5432)]
    r.verdicts.want_idents = {100: 2}  # edited into "deny from X" (100 is X)
    r.apply(with_policy(plain, {(2, UID_ANY): (DENY, 0, 8)}, open_=True))
    assert k.verdicts == {(2, next(iter(k.frontends.values()))[0], UID_ANY): (DENY, 0, 8)}


def test_an_open_service_turning_closed_never_lets_a_denied_caller_through():
    k = WatchingKernel()
    r = Reconciler(k)
    plain = desired_groups([svc("db", "10.96.0.9", [("10.0.0.1", 1)], port=5432)])
    r.verdicts.want_idents = {100: 1}  # "deny from X"
    r.apply(with_policy(plain, {(1, UID_ANY): (DENY, 0, 7)}, open_=True))
    k.deny_watch = [(100, 0, 5432)]
    r.verdicts.want_idents = {200: 2}  # edited into "allow from Y"
    r.apply(with_policy(plain, {(2, UID_ANY): (ALLOW, 0, 8)}))
    assert k.idents == {200: 2}


def test_a_table_written_for_a_group_whose_verdicts_then_fail_keeps_its_old_backends():
    k = WatchingKernel()
    r = Reconciler(k)
    g1 = desired_groups([svc("db", "10.96.0.9", [("10.0.0.1", 1)], port=5432)])
    g2 = desired_groups([svc("db", "10.96.0.9", [("10.0.0.2", 1)], port=5432)])
    r.verdicts.want_idents = {100: 1}
    r.apply(with_policy(g1, {(1, UID_ANY): (ALLOW, 0, 7)}))
    k.fail_identity = 2
    r.verdicts.want_idents = {100: 2}
    rep = r.apply(with_policy(g2, {(2, UID_ANY): (ALLOW, 0, 7)}))  # check() after every op
    assert rep.errors and k.serving() == {"10.96.0.9:5432/TCP": {"10.0.0.1:8080/TCP"}}
    k.fail_identity = None
    r.apply(with_policy(g2, {(2, UID_ANY): (ALLOW, 0, 7)}))
    assert k.serving() == {"10.96.0.9:5432/TCP": {"10.0.0.2:8080/TCP"}}
