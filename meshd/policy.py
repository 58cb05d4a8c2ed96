"""Authorization policies -> the two kernel tables (pure: no I/O, no data plane imports).

The kernel decides at connect()/sendmsg() with at most two lookups (bpf/include/meshd_policy.h):

    cgroup id --ident--> identity          identity: one small int per distinct set of
    (identity, group, uid|ANY) --verdict--> (action, flags, policy id)

A frontend group selected by no policy is open (the group is not flagged MESHD_SVC_F_POLICY,
the kernel does not look). A group some *allow* policy selects admits a caller only when its
verdict says ALLOW; no verdict means "no policy allows it". A group only *deny* policies
select stays open to every caller they do not name (`open`: MESHD_SVC_F_POLICY_OPEN, as
Istio's DENY policies). Deny wins over allow.

An *identity* stands for the set of workload selectors (`from` items without their uid) that
match a cgroup: cgroups matched by the same selectors share one identity, and cgroups matched
by none have no entry (identity 0). Uid items make (identity, group, uid) entries: each one is
complete (the any-uid rules are merged in; deny wins), and the (identity, group, ANY) entry
then carries MESHD_VERDICT_F_UID (with action 0, "not allowed", when only uid rules allow), so
the kernel knows to look for the caller's uid. Uid entries equal to the ANY entry are left out
(the kernel falls back to ANY).

compile_policies(..., previous=) keeps identity and policy ids of the previous compile for the
sets and policies that still exist, so a recompile (a policy or a cgroup added) changes only
what changed in the kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from meshd.records import Policy, Selector

UID_ANY = 0xFFFFFFFF
VERDICT_ALLOW = 1
VERDICT_DENY = 2
VERDICT_F_UID = 1
ID_MAX = 0xFFFFFFFF  # identities and policy ids are __u32 in the kernel; 0 means none

Workload = tuple[str, str]  # ("cgroup", "/a/b") | ("cgroup", "/a/") | ("unit", "web.service")
GroupsOf = Callable[[str, str, "tuple[int | str, ...] | None"], "set[int]"]


@dataclass
class PolicyTables:
    ident: dict[int, int] = field(default_factory=dict)  # cgroup id -> identity (never 0)
    # cgroup id -> the identity every cgroup below it has at least (meshd_subtree_v1: what
    # the kernel hands a cgroup made since the last scan, from its nearest known ancestor)
    subtree: dict[int, int] = field(default_factory=dict)
    # (identity, group, uid or UID_ANY) -> (action, flags, policy id); action 0: not allowed
    verdicts: dict[tuple[int, int, int], tuple[int, int, int]] = field(default_factory=dict)
    selected: set[int] = field(default_factory=set)  # groups some policy selects (MESHD_SVC_F_POLICY)
    policy_ids: dict[str, int] = field(default_factory=dict)  # "ns/name" -> id (stable, >= 1)
    by_group: dict[int, list[str]] = field(default_factory=dict)  # group -> policy keys, sorted
    open: set[int] = field(default_factory=set)  # selected by deny policies only (POLICY_OPEN)
    # identity -> the workload selectors it stands for (sorted; for `meshd observe`, ids stable)
    identities: dict[int, tuple[Workload, ...]] = field(default_factory=dict)
    # identities of sets with no cgroup now (no verdicts): their ids are kept for them
    retired: dict[int, tuple[Workload, ...]] = field(default_factory=dict)
    next_identity: int = 1
    next_policy_id: int = 1


# A `unit:` selector matches a cgroup of that name only where systemd puts units: below
# slices (every component between the hooks' root and it ends in ".slice"). Anywhere else
# the name proves nothing: a unit's subtree can be *delegated* (user@UID.service to its
# user, Delegate=yes services and cgroupfs-driver container runtimes to whoever runs in
# them), and whoever it is delegated to may name a cgroup there "web.service".
RETIRED_KEEP = 4096  # identities of selector sets with no cgroup now, kept for a comeback


def _depth(base: str) -> int:
    return len([c for c in base.split("/") if c])


def matches(selector: Selector | Workload, path: str, base: str = "/") -> bool:
    """Whether a `from` item (its workload part; the uid is the verdict's business) selects the
    cgroup at `path` (relative to the cgroup2 mount, '/' for the root). `base`: the cgroup the
    hooks are attached to (units are looked for below it)."""
    kind, value = selector.workload if isinstance(selector, Selector) else selector
    if kind == "unit":
        return ("unit", value) in _Index([(kind, value)], base).match(path)
    if value == "/":
        return True
    if value.endswith("/"):
        return path.startswith(value) and len(path) > len(value)
    return path == value


class _Index:
    """The workload selectors by what they match, for O(depth) matching of a path."""

    def __init__(self, workloads: Iterable[Workload], base: str = "/"):
        self.nbase = _depth(base)  # components of the hooks' root: units are below it
        self.exact: dict[str, list[Workload]] = {}
        self.below: dict[str, list[Workload]] = {}  # "/a/" -> selectors of the cgroups below /a
        self.unit: dict[str, list[Workload]] = {}
        self.everything: list[Workload] = []
        for w in workloads:
            kind, value = w
            if kind == "unit":
                self.unit.setdefault(value, []).append(w)
            elif value == "/":
                self.everything.append(w)
            elif value.endswith("/"):
                self.below.setdefault(value, []).append(w)
            else:
                self.exact.setdefault(value, []).append(w)

    def match(self, path: str, below: bool = False) -> frozenset[Workload]:
        """The selectors matching the cgroup at `path`; with `below`: those matching *every*
        cgroup below it, whatever its name (what a cgroup made since the last scan inherits
        from this one: `/`, prefixes at or above it, units on its path)."""
        got: list[Workload] = list(self.everything)
        if not below:
            hit = self.exact.get(path)
            if hit:
                got += hit
        if self.below or self.unit:
            parts = path.split("/")  # "/a/b" -> ["", "a", "b"]
            last = len(parts) if below else len(parts) - 1
            prefix = "/"
            under_slices = True  # every component from the hooks' root to here is a slice
            for i in range(1, len(parts)):
                comp = parts[i]
                if not comp:
                    break  # the root, "/"
                if i > self.nbase:
                    if self.unit and under_slices:
                        hit = self.unit.get(comp)
                        if hit:
                            got += hit
                    under_slices = under_slices and comp.endswith(".slice")
                if self.below and i < last:
                    prefix += comp + "/"
                    hit = self.below.get(prefix)
                    if hit:
                        got += hit
        return frozenset(got)


def _assign(wanted: Iterable, old: Mapping, start: int) -> tuple[dict, int]:
    """Ids for `wanted` keys (in the order given): the old id when the key had one, else the next
    id from `start` (monotonic, so an event about a gone id is not pinned on a new one; past
    ID_MAX the lowest free id)."""
    out: dict = {}
    fresh = []
    for k in wanted:
        if k in old:
            out[k] = old[k]
        else:
            fresh.append(k)
    used = set(out.values())
    nxt = start
    for k in fresh:
        while nxt in used or nxt == 0:
            nxt += 1
        if nxt > ID_MAX:
            nxt = 1
            while nxt in used:
                nxt += 1
        out[k] = nxt
        used.add(nxt)
        nxt += 1
    return out, max(nxt, start)


def compile_policies(policies: Iterable[Policy], groups_of: GroupsOf, cgroups: Mapping[str, int],
                     previous: PolicyTables | None = None, unit_base: str = "/") -> PolicyTables:
    """The kernel tables for `policies` over the cgroups `cgroups` (path -> cgroup id).

    `groups_of(namespace, name, ports)` gives the frontend group ids of a service's ports
    (`ports`: numbers and port names as the policy lists them, None for every port; every
    group a connect() can hit). A policy whose service or ports do not exist selects nothing.
    Deterministic for equal inputs; ids of `previous` kept where their set/policy remains."""
    pols = sorted({p.key: p for p in policies}.values(), key=lambda p: p.key)
    prev = previous or PolicyTables()
    policy_ids, next_pid = _assign([p.key for p in pols], prev.policy_ids, prev.next_policy_id)

    # rules per workload selector: (uid or None, group, action, policy id)
    rules: dict[Workload, list[tuple[int | None, int, int, int]]] = {}
    by_group: dict[int, list[str]] = {}
    allowed_somewhere: set[int] = set()  # groups some allow policy selects
    for p in pols:
        groups: set[int] = set()
        for t in p.to:
            groups |= groups_of(t.namespace, t.name, t.ports)
        if not groups:
            continue
        for g in groups:
            by_group.setdefault(g, []).append(p.key)
        action = VERDICT_DENY if p.action == "deny" else VERDICT_ALLOW
        if action == VERDICT_ALLOW:
            allowed_somewhere |= groups
        pid = policy_ids[p.key]
        for sel in p.from_:
            lst = rules.setdefault(sel.workload, [])
            lst.extend((sel.uid, g, action, pid) for g in groups)

    # identities: one per distinct non-empty set of matching selectors (only selectors that
    # reach some group matter: the others cannot change a verdict)
    index = _Index(rules, unit_base)
    set_of: dict[int, frozenset[Workload]] = {}  # cgroup id -> its set
    below_of: dict[int, frozenset[Workload]] = {}  # cgroup id -> what its subtree inherits
    for path, cg in cgroups.items():
        s = index.match(path)
        if s:
            set_of[cg] = s
        b = index.match(path, below=True)
        if b:
            below_of[cg] = b
    old_sets = {frozenset(ws): i for i, ws in (*prev.retired.items(), *prev.identities.items())}
    distinct = sorted(set(set_of.values()) | set(below_of.values()), key=lambda s: sorted(s))
    ident_of, next_ident = _assign(distinct, old_sets, prev.next_identity)
    # sets with no cgroup now keep their ids (a unit restarted gets its identity back, so
    # denial counters and events stay under one id), the most recent RETIRED_KEEP of them
    retired = [(ws, i) for ws, i in old_sets.items() if ws not in ident_of]
    retired = sorted(retired, key=lambda wi: wi[1])[-RETIRED_KEEP:]

    verdicts: dict[tuple[int, int, int], tuple[int, int, int]] = {}
    for s, ident in ident_of.items():
        _verdicts(ident, [r for w in s for r in rules[w]], verdicts)

    return PolicyTables(
        ident={cg: ident_of[s] for cg, s in set_of.items()},
        subtree={cg: ident_of[s] for cg, s in below_of.items()},
        verdicts=verdicts,
        selected=set(by_group),
        policy_ids=policy_ids,
        by_group={g: sorted(set(keys)) for g, keys in by_group.items()},
        open=set(by_group) - allowed_somewhere,
        identities={i: tuple(sorted(s)) for s, i in ident_of.items()},
        retired={i: tuple(sorted(ws)) for ws, i in retired},
        next_identity=next_ident,
        next_policy_id=next_pid,
    )


def _pick(current: tuple[int, int] | None, action: int, pid: int) -> tuple[int, int]:
    """Deny wins over allow; among equals the lowest policy id (deterministic)."""
    if current is None or action > current[0] or (action == current[0] and pid < current[1]):
        return (action, pid)
    return current


def _verdicts(ident: int, rules: list[tuple[int | None, int, int, int]],
              out: dict[tuple[int, int, int], tuple[int, int, int]]) -> None:
    anyuid: dict[int, tuple[int, int]] = {}  # group -> (action, policy) of the any-uid rules
    peruid: dict[tuple[int, int], tuple[int, int]] = {}  # (group, uid) -> of that uid's own rules
    for uid, g, action, pid in rules:
        if uid is None:
            anyuid[g] = _pick(anyuid.get(g), action, pid)
        else:
            peruid[(g, uid)] = _pick(peruid.get((g, uid)), action, pid)
    uid_groups: set[int] = set()
    for (g, uid), (action, pid) in peruid.items():
        base = anyuid.get(g)
        # deny wins; an allow that the any-uid rules already give keeps their entry
        merged = base if base is not None and base[0] >= action else (action, pid)
        if merged != base:  # equal to the ANY entry: the kernel's fallback gives it already
            out[(ident, g, uid)] = (merged[0], 0, merged[1])
            uid_groups.add(g)
    for g, (action, pid) in anyuid.items():
        out[(ident, g, UID_ANY)] = (action, VERDICT_F_UID if g in uid_groups else 0, pid)
    for g in uid_groups - anyuid.keys():
        out[(ident, g, UID_ANY)] = (0, VERDICT_F_UID, 0)  # only some uids are allowed


def previous_from_kernel(policies: Iterable[Policy], groups_of: GroupsOf,
                         cgroups: Mapping[str, int], idents: Mapping[int, int],
                         subtree: Mapping[int, int], policy_ids_in_use: Iterable[int],
                         identities_in_use: Iterable[int] = (), unit_base: str = "/"
                         ) -> PolicyTables:
    """The `previous` of a daemon's first compile: the identity ids the kernel holds (a
    restarted daemon adopts them), so the first sync does not hand a cgroup's id to another
    selector set while the kernel still maps the first cgroup to it (its callers would get
    the other set's verdicts until the identities are rewritten). A kernel id is kept for a
    set only when every cgroup entry holding it now maps to that one set; otherwise the sets
    get fresh ids, which start above every id the kernel uses anywhere (entries, verdicts),
    and so do fresh policy ids (events and denial counters name the ids the kernel wrote)."""
    fresh = compile_policies(policies, groups_of, cgroups, unit_base=unit_base)
    sets = fresh.identities
    holders: dict[int, set[frozenset] | None] = {}  # kernel id -> the new sets holding it
    for table_new, table_old in ((fresh.ident, idents), (fresh.subtree, subtree)):
        for cg, k in table_old.items():
            t = table_new.get(cg)
            got = holders.setdefault(k, set())
            if got is not None:
                if t is None:
                    holders[k] = None  # a cgroup left every set: not the same meaning
                else:
                    got.add(frozenset(sets[t]))
    kept: dict[frozenset, int] = {}
    for k, got in sorted(holders.items()):
        if got and len(got) == 1:
            ws = next(iter(got))
            if ws not in kept:
                kept[ws] = k
    top = max([*idents.values(), *subtree.values(), *identities_in_use, 0])
    return PolicyTables(identities={i: tuple(sorted(ws)) for ws, i in kept.items()},
                        next_identity=top + 1,
                        next_policy_id=max([*policy_ids_in_use, 0]) + 1)
