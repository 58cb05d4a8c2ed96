"""meshd.policy_model (policy records) and meshd.policy (the compile to the kernel's tables):
one-line errors naming the field and the fix; what the kernel's two lookups decide equals the
policy semantics (open until selected, deny wins, uid items complete) for every caller."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.errors import RecordError
from meshd.policy import (UID_ANY, VERDICT_ALLOW, VERDICT_DENY, VERDICT_F_UID, PolicyTables, compile_policies,
                          matches)
from meshd.policy_model import parse_policy
from meshd.records import Policy

GOOD = {"namespace": "default", "name": "web-to-db",
        "from": [{"cgroup": "/system.slice/web.service"}, {"unit": "web.service", "uid": 1000}],
        "to": [{"service": "db", "ports": [5432, "http"]}]}


def pol(name: str, frm: list, to: list | None = None, action: str = "allow", ns: str = "default") -> Policy:
    return parse_policy({"namespace": ns, "name": name, "action": action, "from": frm,
                         "to": to if to is not None else [{"service": "db"}]}, name)


# services: db (groups 1, 2: port 5432 / "http"), web (3), cache (4); other namespaces: none
PORTS = {("default", "db"): {5432: 1, "http": 2}, ("default", "web"): {80: 3}, ("default", "cache"): {6379: 4}}


def groups_of(ns: str, name: str, ports) -> set[int]:
    svc = PORTS.get((ns, name), {})
    return set(svc.values()) if ports is None else {svc[p] for p in ports if p in svc}


CGROUPS = {"/": 1, "/system.slice": 2, "/system.slice/web.service": 3, "/system.slice/web.service/sub": 4,
           "/system.slice/db.service": 5, "/lab": 6, "/lab/clients": 7, "/lab/clients/a": 8,
           "/lab/clients/b": 9, "/user.slice/web.service": 10}


def kernel_allows(t: PolicyTables, cg: int, group: int, uid: int) -> bool:
    """What sock_lb's check does with these tables (the contract's lookup order)."""
    if group not in t.selected:
        return True
    ident = t.ident.get(cg, 0)
    v = t.verdicts.get((ident, group, UID_ANY))
    if v and v[1] & VERDICT_F_UID:
        v = t.verdicts.get((ident, group, uid)) or v
    if v and v[0]:  # a verdict decides; without one, the frontend's default
        return v[0] == VERDICT_ALLOW
    return group in t.open


def reference_allows(policies, path: str, group: int, uid: int) -> bool:
    """The semantics, straight from the records."""
    selecting = [p for p in policies if any(group in groups_of(t.namespace, t.name, t.ports) for t in p.to)]
    if not selecting:
        return True
    hits = {p.action for p in selecting for s in p.from_ if matches(s, path) and s.uid in (None, uid)}
    if "deny" in hits:
        return False
    # allow policies close the service to what they do not allow; deny policies alone
    # close it only to the callers they name (Istio's ALLOW / DENY)
    return "allow" in hits or all(p.action == "deny" for p in selecting)


# ---- records ---------------------------------------------------------------------------------

def test_a_good_record_is_kept_slim_and_dumps_back_to_itself() -> None:
    p = parse_policy(GOOD, "x")
    assert p.key == "default/web-to-db" and p.action == "allow"
    assert p.from_[0].cgroup == "/system.slice/web.service" and p.from_[1].uid == 1000
    assert p.to[0].service == "default/db" and p.to[0].ports == (5432, "http")  # namespace filled in
    dumped = p.model_dump(mode="json")
    assert set(dumped) == {"namespace", "name", "action", "from", "to"}
    assert parse_policy(dumped, "again") == p and hash(parse_policy(dumped, "again")) == hash(p)
    assert Policy(**GOOD) == p
    assert pol("x", [], [{"service": "shop/db"}]).to[0].service == "shop/db"


@pytest.mark.parametrize("change, reason", [
    ({"frm": []}, "frm: unknown key (did you mean 'from'?); valid keys: namespace, name, action, from, to"),
    ({"action": "permit"}, "action: must be 'allow' or 'deny' (got 'permit')"),
    ({"from": [{"cgroup": "system.slice/web.service"}]}, "from[0].cgroup: must be a path below the cgroup2 "
     "mount starting with '/'"),
    ({"from": [{"cgroup": "/a//b"}]}, "from[0].cgroup: must not contain '//', '.' or '..'"),
    ({"from": [{"cgroup": "/a/../b"}]}, "from[0].cgroup: must not contain"),
    ({"from": [{"cgroup": "/a", "unit": "b.service"}]}, "from[0]: needs exactly one of `cgroup` (a path) or "
     "`unit` (a systemd unit name) (got both)"),
    ({"from": [{"uid": 5}]}, "from[0]: needs exactly one of `cgroup`"),
    ({"from": [{"unit": "web.service", "uids": 5}]}, "from[0].uids: unknown key (did you mean 'uid'?)"),
    ({"from": [{"unit": "a/b"}]}, "from[0].unit: must be a systemd unit name such as web.service"),
    ({"from": [{"unit": "a", "uid": -1}]}, "from[0].uid: must be 0-4294967294 (got -1)"),
    ({"from": [{"unit": "a", "uid": 2**32 - 1}]}, "from[0].uid: must be 0-4294967294 (got 4294967295)"),
    ({"from": [{"unit": "a", "uid": "1000"}]}, "from[0].uid: must be an integer"),
    ({"from": None}, "from: must be a list"),
    ({"to": []}, "to: must list at least one target, such as `- service: db`"),
    ({"to": [{"ports": [80]}]}, "to[0].service: required"),
    ({"to": [{"service": "a/b/c"}]}, "to[0].service: must be a service name, or namespace/name"),
    ({"to": [{"service": "db", "ports": [0]}]}, "to[0].ports[0]: port numbers must be 1-65535 (got 0)"),
    ({"to": [{"service": "db", "ports": [65536]}]}, "to[0].ports[0]: port numbers must be 1-65535"),
    ({"to": [{"service": "db", "ports": ["HTTP"]}]}, "to[0].ports[0]: must be a port number 1-65535 or a "
     "port name"),
    ({"to": [{"service": "db", "ports": []}]}, "to[0].ports: must list at least one port; leave `ports` out"),
    ({"to": [{"service": "db", "ports": [80, 80]}]}, "to[0].ports: lists port 80 twice"),
    ({"name": "Web"}, "name: must be 1-63 lowercase letters"),
])
def test_a_bad_record_says_which_field_and_the_fix(change: dict, reason: str) -> None:
    with pytest.raises(RecordError) as err:
        parse_policy({**GOOD, **change}, "policies[3]")
    assert str(err.value).startswith(f"policies[3]: {reason}"), str(err.value)
    assert "\n" not in str(err.value)


def test_a_record_that_is_not_a_mapping() -> None:
    with pytest.raises(RecordError, match="a policy record must be a mapping"):
        parse_policy(["x"], "p")


# ---- selectors -------------------------------------------------------------------------------

def test_selectors_exact_below_and_unit() -> None:
    exact, below, unit = pol("a", [{"cgroup": "/lab/clients"}, {"cgroup": "/lab/clients/"},
                                   {"unit": "web.service"}]).from_
    assert matches(exact, "/lab/clients") and not matches(exact, "/lab/clients/a")
    assert matches(below, "/lab/clients/a") and matches(below, "/lab/clients/a/deep")
    assert not matches(below, "/lab/clients") and not matches(below, "/lab/clientsX/a")
    # a unit: the cgroup whose last component is its name, anywhere in the tree, and below
    assert matches(unit, "/system.slice/web.service") and matches(unit, "/user.slice/web.service")
    assert matches(unit, "/system.slice/web.service/sub") and not matches(unit, "/system.slice/web.service2")
    everything = pol("b", [{"cgroup": "/"}]).from_[0]
    assert matches(everything, "/") and matches(everything, "/a/b")


# ---- compile ---------------------------------------------------------------------------------

def test_web_may_reach_db_and_nothing_else_may() -> None:
    pols = [pol("web-to-db", [{"unit": "web.service"}])]
    t = compile_policies(pols, groups_of, CGROUPS)
    assert t.selected == {1, 2} and t.by_group == {1: ["default/web-to-db"], 2: ["default/web-to-db"]}
    assert t.policy_ids == {"default/web-to-db": 1}
    web = t.ident[3]
    assert web and t.ident[4] == web and t.ident[10] == web  # one set of selectors: one identity
    assert set(t.ident) == {3, 4, 10}  # cgroups no selector matches have no entry (identity 0)
    assert t.verdicts == {(web, 1, UID_ANY): (VERDICT_ALLOW, 0, 1), (web, 2, UID_ANY): (VERDICT_ALLOW, 0, 1)}
    assert kernel_allows(t, 3, 1, 0) and not kernel_allows(t, 5, 1, 0) and not kernel_allows(t, 1, 2, 0)
    assert kernel_allows(t, 5, 3, 0)  # web (group 3) is selected by no policy: open


def test_deny_wins_and_names_the_deny_policy() -> None:
    pols = [pol("clients", [{"cgroup": "/lab/clients/"}]), pol("not-b", [{"cgroup": "/lab/clients/b"}], action="deny")]
    t = compile_policies(pols, groups_of, CGROUPS)
    a, b = t.ident[8], t.ident[9]
    assert a != b
    deny_id = t.policy_ids["default/not-b"]
    assert t.verdicts[(b, 1, UID_ANY)] == (VERDICT_DENY, 0, deny_id)
    assert kernel_allows(t, 8, 1, 0) and not kernel_allows(t, 9, 1, 0)


def test_uid_items_make_complete_uid_entries_and_flag_the_any_entry() -> None:
    pols = [pol("only-1000", [{"cgroup": "/lab/clients/a", "uid": 1000}])]
    t = compile_policies(pols, groups_of, CGROUPS)
    a = t.ident[8]
    assert t.verdicts[(a, 1, UID_ANY)] == (0, VERDICT_F_UID, 0)  # must exist: the kernel looks here first
    assert t.verdicts[(a, 1, 1000)] == (VERDICT_ALLOW, 0, 1)
    assert kernel_allows(t, 8, 1, 1000) and not kernel_allows(t, 8, 1, 1001)
    # any-uid allow and one uid denied: the uid entry is merged (deny wins), others fall back
    pols = [pol("all", [{"cgroup": "/lab/clients/a"}]), pol("no-root", [{"cgroup": "/lab/clients/a", "uid": 0}],
                                                            action="deny")]
    t = compile_policies(pols, groups_of, CGROUPS)
    a = t.ident[8]
    assert t.verdicts[(a, 1, UID_ANY)] == (VERDICT_ALLOW, VERDICT_F_UID, t.policy_ids["default/all"])
    assert t.verdicts[(a, 1, 0)] == (VERDICT_DENY, 0, t.policy_ids["default/no-root"])
    assert kernel_allows(t, 8, 1, 1000) and not kernel_allows(t, 8, 1, 0)
    # a uid allow under an any-uid allow adds nothing: no flag, no second lookup
    t = compile_policies([pol("all", [{"cgroup": "/lab/clients/a"}, {"cgroup": "/lab/clients/a", "uid": 7}])],
                         groups_of, CGROUPS)
    assert t.verdicts == {(t.ident[8], g, UID_ANY): (VERDICT_ALLOW, 0, 1) for g in (1, 2)}


def test_ports_select_only_their_groups_and_a_missing_service_selects_nothing() -> None:
    t = compile_policies([pol("pg", [{"unit": "web.service"}], [{"service": "db", "ports": [5432]}]),
                          pol("ghost", [{"unit": "web.service"}], [{"service": "nope"}, {"service": "x/db"}])],
                         groups_of, CGROUPS)
    assert t.selected == {1} and t.by_group == {1: ["default/pg"]}
    assert kernel_allows(t, 5, 2, 0)  # the http port of db stays open
    assert set(t.policy_ids) == {"default/ghost", "default/pg"}


def test_ids_are_stable_across_compiles() -> None:
    first = compile_policies([pol("b", [{"unit": "web.service"}]), pol("c", [{"cgroup": "/lab/clients/a"}])],
                             groups_of, CGROUPS)
    cgroups = {**CGROUPS, "/lab/clients/a/new": 11, "/system.slice/web.service/new": 12}
    pols = [pol("a", [{"cgroup": "/lab/"}]), pol("b", [{"unit": "web.service"}]), pol("c", [{"cgroup": "/lab/clients/a"}])]
    again = compile_policies(pols, groups_of, cgroups, previous=first)
    assert again.policy_ids["default/b"] == first.policy_ids["default/b"]
    assert again.policy_ids["default/c"] == first.policy_ids["default/c"]
    assert again.policy_ids["default/a"] not in first.policy_ids.values()
    web = first.ident[3]
    assert again.ident[3] == web and again.ident[12] == web  # same selectors: same identity, new cgroup too
    assert again.ident[8] != first.ident[8]  # /lab/clients/a now also matches /lab/: a new set
    assert again.ident[8] not in first.identities  # and a new id (not one an old event named)
    assert compile_policies(pols, groups_of, cgroups) == compile_policies(list(reversed(pols)), groups_of, cgroups)


def test_an_empty_from_selects_the_service_and_admits_nobody() -> None:
    t = compile_policies([pol("lock", [])], groups_of, CGROUPS)
    assert t.selected == {1, 2} and t.ident == {} and t.verdicts == {} and t.open == set()
    assert not kernel_allows(t, 3, 1, 0)


def test_deny_policies_alone_close_the_service_only_to_whom_they_name() -> None:
    t = compile_policies([pol("no-b", [{"cgroup": "/lab/clients/b"}], action="deny")],
                         groups_of, CGROUPS)
    assert t.selected == {1, 2} and t.open == {1, 2}
    assert not kernel_allows(t, 9, 1, 0)  # /lab/clients/b
    assert kernel_allows(t, 8, 1, 0) and kernel_allows(t, 1, 1, 0)  # everyone else
    both = compile_policies([pol("no-b", [{"cgroup": "/lab/clients/b"}], action="deny"),
                             pol("a", [{"cgroup": "/lab/clients/a"}])], groups_of, CGROUPS)
    assert both.open == set() and kernel_allows(both, 8, 1, 0)
    assert not kernel_allows(both, 9, 1, 0) and not kernel_allows(both, 1, 1, 0)


# ---- properties ------------------------------------------------------------------------------

PATHS = sorted(CGROUPS)
SELECTORS = [{"cgroup": p} for p in PATHS] + [{"cgroup": p + "/"} for p in PATHS if p != "/"] + \
    [{"cgroup": "/"}, {"unit": "web.service"}, {"unit": "clients"}, {"unit": "b"}, {"unit": "none.service"}]
TARGETS = [{"service": "db"}, {"service": "db", "ports": [5432]}, {"service": "db", "ports": ["http", 9]},
           {"service": "web"}, {"service": "cache"}, {"service": "other/db"}]
selector = st.builds(lambda s, uid: {**s, **({"uid": uid} if uid is not None else {})},
                     st.sampled_from(SELECTORS), st.sampled_from([None, None, 0, 1000]))
policy = st.builds(lambda frm, to, deny: (frm, to, "deny" if deny else "allow"),
                   st.lists(selector, max_size=4), st.lists(st.sampled_from(TARGETS), min_size=1, max_size=2),
                   st.booleans())
policy_sets = st.lists(policy, max_size=6).map(
    lambda specs: [pol(f"p{i}", frm, to, action) for i, (frm, to, action) in enumerate(specs)])


@settings(max_examples=300, deadline=None)
@given(policy_sets)
def test_the_kernel_lookups_decide_as_the_policies_say(pols: list[Policy]) -> None:
    t = compile_policies(pols, groups_of, CGROUPS)
    for path, cg in CGROUPS.items():
        for group in (1, 2, 3, 4, 5):
            for uid in (0, 1000, 1001):
                assert kernel_allows(t, cg, group, uid) == reference_allows(pols, path, group, uid), \
                    (path, group, uid)
    # a group no policy selects is never flagged and has no verdict
    selecting = {g for p in pols for tg in p.to for g in groups_of(tg.namespace, tg.name, tg.ports)}
    assert t.selected == selecting and {k[1] for k in t.verdicts} <= selecting
    # an F_UID entry exists for every uid entry; identity 0 is never stored
    assert all((i, g, UID_ANY) in t.verdicts for (i, g, u) in t.verdicts)
    assert 0 not in t.ident.values()
    # a denial names a deny policy that matches, or none (0: no policy allows it)
    deny_ids = {t.policy_ids[p.key] for p in pols if p.action == "deny"}
    assert all(pid in deny_ids for (a, _, pid) in t.verdicts.values() if a == VERDICT_DENY)


@settings(max_examples=100, deadline=None)
@given(policy_sets, policy_sets)
def test_a_recompile_over_previous_tables_decides_the_same_and_keeps_ids(before: list[Policy],
                                                                        after: list[Policy]) -> None:
    prev = compile_policies(before, groups_of, CGROUPS)
    fresh = compile_policies(after, groups_of, CGROUPS)
    again = compile_policies(after, groups_of, CGROUPS, previous=prev)
    for cg in CGROUPS.values():
        for group in (1, 2, 3, 4):
            for uid in (0, 1000):
                assert kernel_allows(again, cg, group, uid) == kernel_allows(fresh, cg, group, uid)
    for key, pid in again.policy_ids.items():
        if key in prev.policy_ids:
            assert prev.policy_ids[key] == pid
    before_sets = {s: i for i, s in prev.identities.items()}
    for i, s in again.identities.items():
        assert before_sets.get(s, i) == i
    assert len(set(again.identities)) == len(again.identities)


# ---- review fixes: delegated subtrees, inheritance, ids across restarts ----------------------

def test_a_unit_selector_matches_only_where_systemd_puts_units() -> None:
    from meshd.policy import matches as m
    assert m(("unit", "web.service"), "/system.slice/web.service")
    assert m(("unit", "web.service"), "/system.slice/web.service/worker")
    assert m(("unit", "web.service"), "/apps.slice/team.slice/web.service")
    assert m(("unit", "web.service"), "/web.service")
    # not below a directory that is no slice: cgroupfs-driver containers name what they like
    assert not m(("unit", "web.service"), "/docker/abc/web.service")
    assert not m(("unit", "web.service"), "/kubepods/burstable/pod1/web.service")
    # below the hooks' root when that is not the cgroup2 root (a lab, a container)
    assert m(("unit", "web.service"), "/lab/x/web.service", base="/lab/x")
    assert not m(("unit", "web.service"), "/lab/x/web.service")
    # user@1000.service is delegated to user 1000; docker.service to the container runtime
    assert not m(("unit", "web.service"),
                 "/user.slice/user-1000.slice/user@1000.service/app.slice/web.service")
    assert not m(("unit", "web.service"), "/system.slice/docker.service/web.service")
    cgroups = {"/system.slice/web.service": 3,
               "/user.slice/user-1000.slice/user@1000.service/app.slice/web.service": 11}
    t = compile_policies([pol("web", [{"unit": "web.service"}])], groups_of, cgroups)
    assert set(t.ident) == {3}


def ancestors_allow(t: PolicyTables, chain: list[int], group: int, uid: int) -> bool:
    """The kernel's check for a cgroup unknown to the daemon (the last of `chain`, from the
    root down): the nearest known ancestor's subtree identity."""
    ident = 0
    for cg in reversed(chain[:-1]):
        if cg in t.subtree:
            ident = t.subtree[cg]
            break
    fake = dataclasses.replace(t, ident={chain[-1]: ident} if ident else {})
    return kernel_allows(fake, chain[-1], group, uid)


def test_a_cgroup_made_since_the_last_scan_inherits_what_covers_its_subtree() -> None:
    # deny-only: users may not reach db; a user makes a fresh cgroup and connects at once
    cgroups = {"/": 1, "/user.slice": 2, "/user.slice/user-1000.slice": 12}
    t = compile_policies([pol("no-users", [{"cgroup": "/user.slice/"}], action="deny")],
                         groups_of, cgroups)
    assert 2 in t.subtree and 12 in t.subtree and 1 not in t.subtree
    assert not ancestors_allow(t, [1, 2, 12, 999], 1, 1000)  # denied before the daemon saw it
    assert ancestors_allow(t, [1, 555], 1, 1000)  # elsewhere: open
    # allow by unit: a worker cgroup made below web.service is web.service too
    cgroups = {"/": 1, "/system.slice": 2, "/system.slice/web.service": 3}
    t = compile_policies([pol("web", [{"unit": "web.service"}])], groups_of, cgroups)
    assert ancestors_allow(t, [1, 2, 3, 777], 1, 0)
    assert not ancestors_allow(t, [1, 2, 778], 1, 0)  # a new unit elsewhere: no


def test_a_restarted_unit_gets_its_identity_back() -> None:
    p = [pol("web", [{"unit": "web.service"}])]
    first = compile_policies(p, groups_of, {"/system.slice/web.service": 3})
    gone = compile_policies(p, groups_of, {}, previous=first)
    back = compile_policies(p, groups_of, {"/system.slice/web.service": 30}, previous=gone)
    assert first.ident[3] == back.ident[30] and first.ident[3] in gone.retired


def test_a_restarted_daemon_keeps_the_kernels_identity_ids() -> None:
    from meshd.policy import previous_from_kernel
    p = [pol("to-db", [{"cgroup": "/lab/clients/a"}]),
         pol("to-web", [{"cgroup": "/lab/clients/b"}], to=[{"service": "web"}])]
    fresh = compile_policies(p, groups_of, CGROUPS)
    a, b = fresh.ident[8], fresh.ident[9]
    kernel = {8: b, 9: a}  # the previous daemon numbered them the other way round
    prev = previous_from_kernel(p, groups_of, CGROUPS, kernel, {}, [5, 7])
    again = compile_policies(p, groups_of, CGROUPS, previous=prev)
    assert again.ident[8] == b and again.ident[9] == a
    assert min(again.policy_ids.values()) > 7  # fresh policy ids above the kernel's


def test_a_kernel_id_whose_cgroups_now_split_is_given_to_none_of_them() -> None:
    """Review: /lab/clients/ shared id 5; while the daemon was down a deny for
    /lab/clients/a was added. Id 5 must keep meaning "the allow" until the switch."""
    from meshd.policy import previous_from_kernel
    old = [pol("to-db", [{"cgroup": "/lab/clients/"}])]
    new = old + [pol("no-a", [{"cgroup": "/lab/clients/a"}], action="deny")]
    kernel = {cg: 5 for cg in compile_policies(old, groups_of, CGROUPS).ident}
    prev = previous_from_kernel(new, groups_of, CGROUPS, kernel, {}, [1], [5, 6])
    t = compile_policies(new, groups_of, CGROUPS, previous=prev)
    assert 5 not in t.ident.values() and min(t.ident.values()) > 6


def _chain(path: str) -> list[int]:
    """Cgroup ids from the root down to `path` (every prefix is in CGROUPS)."""
    parts = [p for p in path.split("/") if p]
    return [CGROUPS["/"]] + [CGROUPS["/" + "/".join(parts[:i])] for i in range(1, len(parts) + 1)]


@settings(max_examples=200, deadline=None)
@given(policy_sets)
def test_a_new_cgroup_gets_from_its_ancestors_what_the_policies_give_it(pols) -> None:
    t = compile_policies(pols, groups_of, CGROUPS)
    for path in CGROUPS:
        if any(p not in CGROUPS for p in ["/" + "/".join([x for x in path.split("/") if x][:i])
                                          for i in range(1, len(path.split("/")))]):
            continue
        child = path.rstrip("/") + "/zz-new"  # a name no selector names
        for group in (1, 2, 3):
            for uid in (0, 1000):
                assert ancestors_allow(t, _chain(path) + [10**6], group, uid) == \
                    reference_allows(pols, child, group, uid), (child, group, uid)
