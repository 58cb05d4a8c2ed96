"""Authorization policies in the sync: which groups they select, the verdicts of each, and
which cgroups carry which identity (meshd/policy.py compiles; this applies it to the groups
the reconciler writes, and follows cgroups as they come and go).

Cost when no policy exists: one check per sync, nothing else. The compile runs in a worker
thread (a broad selector over many policies can take a noticeable fraction of a second) on a
copy of the cgroup table; the first compile after a restart keeps the identity ids the
kernel holds (policy.previous_from_kernel).
Groups a policy selects get G_POLICY and their verdicts as a *new* Group object only when
their own group or their verdicts changed, so the reconciler's identity-based diff stays
proportional to what changed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

from meshd.desired import G_POLICY, G_POLICY_OPEN

log = logging.getLogger("meshd.daemon")


class PolicyState:
    def __init__(self, cgroup_root: Path | None = None, cgroup_mount: Path | None = None) -> None:
        self.root = cgroup_root  # what the hooks cover (config `cgroup`)
        self.mount = cgroup_mount  # cgroup2 mount: selector paths are relative to it
        self.cgroups: dict[str, int] = {}  # path (relative to the mount) -> cgroup id
        self.cgroup_version = 0
        self.tables = None  # the last PolicyTables
        self.policies: tuple = ()
        self._key = None  # inputs of the last compile
        self._overlay: dict[str, tuple] = {}  # group key -> (group in, verdicts, group out)
        self.watcher = None
        self.watch_error: str | None = None  # the cgroup watch cannot run (status, log)
        self._watch_retry_at = 0.0
        self.problems: list[str] = []  # policies that select nothing, duplicates (status)
        self._logged_problems: set[str] = set()
        self.wake = None  # asyncio.Event of the sync loop (set by the daemon)

    # ---- cgroups ----------------------------------------------------------------------
    def _prefix(self) -> str:
        """The hooks' root relative to the cgroup2 mount ("" for the mount itself)."""
        key = (self.root, self.mount)
        if getattr(self, "_prefix_of", (None,))[0] != key:
            rel = "/" + str(self.root.relative_to(self.mount)).strip(".").strip("/")
            self._prefix_of = (key, rel.rstrip("/"))
        return self._prefix_of[1]

    def _rel(self, path: str) -> str:
        pre = self._prefix()
        if path in ("/", ""):
            return pre or "/"
        return f"{pre}{path}" if pre else path

    def start_watch(self) -> bool:
        """Scans the cgroups under the hooks' root and follows them (inotify). A failure
        (no inotify instance left, the root gone) is logged, shown in the status file and
        tried again at most every 30 s; until then the last known cgroups are used."""
        if self.watcher is not None:
            return True
        import time as _time
        if _time.monotonic() < self._watch_retry_at:
            return False
        from meshd.cgroups import CgroupWatcher
        if self.root is None:
            from meshd.node import cgroup2_mount
            self.mount = Path(cgroup2_mount())
            self.root = self.mount
        watcher = CgroupWatcher(self.root, self._on_cgroups)
        try:
            found = watcher.start(asyncio.get_running_loop())
        except OSError as e:
            watcher.close()
            self._watch_retry_at = _time.monotonic() + 30.0
            err = (f"cannot follow the cgroups under {self.root}: {e.strerror or e}; policies "
                   "use the cgroups known so far (a cgroup made since gets only what its "
                   "ancestors hand down); retrying every 30 s")
            if err != self.watch_error:
                log.error("policies: %s", err)
            self.watch_error = err
            return False
        self.watcher, self.watch_error = watcher, None
        self.cgroups = {self._rel(p): i for p, i in found.items()}
        self.cgroup_version += 1
        log.info("policies: following %d cgroups under %s", len(self.cgroups), self.root)
        return True

    def watch_status(self) -> dict | None:
        w = self.watcher
        if w is None and self.watch_error is None:
            return None
        return {"cgroups": len(self.cgroups), "error": self.watch_error,
                "unwatched": getattr(w, "unwatched", 0) if w is not None else None,
                "overflows": getattr(w, "overflows", 0) if w is not None else None}

    async def rescan(self) -> None:
        """Every minute (a daemon task): a full scan against the watch's view, in case an
        event was missed (an unwatchable directory: the inotify watch limit), and a retry
        of a watch that could not start."""
        while True:
            await asyncio.sleep(60.0)
            if self.watcher is None:
                if self.policies or self.watch_error:
                    self.start_watch()
                continue
            from meshd.cgroups import scan
            found = await asyncio.to_thread(scan, self.root)
            now = {self._rel(p): i for p, i in found.items()}
            if now != self.cgroups:
                added = {p: i for p, i in now.items() if self.cgroups.get(p) != i}
                removed = {p: i for p, i in self.cgroups.items() if now.get(p) != i}
                log.warning("policies: the cgroup watch missed %d new and %d removed cgroups "
                            "(inotify watch limit? fs.inotify.max_user_watches); applied now",
                            len(added), len(removed))
                self.cgroups = now
                self.cgroup_version += 1
                if self.wake is not None and self.policies:
                    self.wake.set()

    def _on_cgroups(self, added: dict[str, int], removed: dict[str, int]) -> None:
        for p in removed:
            self.cgroups.pop(self._rel(p), None)
        for p, i in added.items():
            self.cgroups[self._rel(p)] = i
        self.cgroup_version += 1
        if self.wake is not None and self.policies:  # (no policy: only names for events)
            self.wake.set()

    def cgroup_path(self, cgid: int) -> str | None:
        if not cgid:
            return None
        if getattr(self, "_paths_version", None) != self.cgroup_version:
            self._paths = {i: p for p, i in self.cgroups.items()}
            self._paths_version = self.cgroup_version
        return self._paths.get(cgid)

    def identity_of_cgroup(self, cgid: int) -> int:
        """The identity the kernel gives a caller in cgroup `cgid` now: its own entry, else
        what its nearest ancestor's subtree entry hands down (meshd_identity() in
        bpf/include/meshd_policy.h); 0: none, or a cgroup not scanned yet."""
        t = self.tables
        if t is None or not cgid:
            return 0
        if cgid in t.ident:
            return t.ident[cgid]
        path = self.cgroup_path(cgid)
        while path and path != "/":
            path = path.rsplit("/", 1)[0] or "/"
            anc = self.cgroups.get(path)
            if anc is not None and anc in t.subtree:
                return t.subtree[anc]
        return 0

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None

    # ---- the sync ---------------------------------------------------------------------
    def needed(self, policies: tuple) -> bool:
        return bool(policies or self._overlay)

    def snapshot(self) -> tuple[dict[str, int], int]:
        """The cgroup table as the compile may read it from a worker thread (a copy, taken
        on the loop, which the watch updates)."""
        if self.watcher is None:
            self.start_watch()
        if getattr(self, "_snap", (None,))[0] != self.cgroup_version:  # a copy per change
            self._snap = (self.cgroup_version, dict(self.cgroups))
        return self._snap[1], self.cgroup_version

    def overlay(self, groups: dict, hint: set | None, desired, policies: tuple,
                cgroups: tuple[dict[str, int], int] | None = None, kernel=None
                ) -> tuple[dict, set | None]:
        """(groups with G_POLICY and verdicts on the selected ones, the hint widened by the
        groups whose overlay changed). Sets want_idents/want_subtree on `kernel` (the
        reconciler's Verdicts), whose adopted ids seed the first compile."""
        if not policies and not self._overlay:
            self.tables = None
            self.policies = ()
            self.problems = []
            if kernel is not None:
                kernel.want_idents, kernel.want_subtree = {}, {}
            return groups, hint
        from meshd.policy import compile_policies, previous_from_kernel
        paths, version = cgroups if cgroups is not None else (dict(self.cgroups),
                                                              self.cgroup_version)
        key = (policies, version)
        services_changed = hint is None or bool(desired.changed_groups)
        if self.tables is None or key != self._key or services_changed:
            groups_of = self._groups_of(desired)
            base = self._prefix() if self.root is not None and self.mount is not None else "/"
            base = base or "/"
            unique, problems = self._unique(policies)
            previous = self.tables
            if previous is None and kernel is not None and (kernel.idents or kernel.subtree):
                previous = previous_from_kernel(
                    unique, groups_of, paths, kernel.idents, kernel.subtree,
                    {v[2] for per in kernel.kernel.values() for v in per.values()},
                    {i for per in kernel.kernel.values() for (i, _u) in per}, base)
            self.tables = compile_policies(unique, groups_of, paths, previous=previous,
                                           unit_base=base)
            self._key = key
            self.policies = policies
            problems += self._selecting_nothing(unique, groups_of)
            self._report(problems)
        if kernel is not None:
            kernel.want_idents = dict(self.tables.ident)
            kernel.want_subtree = dict(self.tables.subtree)
        per_group: dict[str, dict] = {}
        for (identity, gkey, uid), val in self.tables.verdicts.items():
            per_group.setdefault(gkey, {})[(identity, uid)] = val
        out = groups
        changed: set[str] = set()
        new_overlay: dict[str, tuple] = {}
        for gkey in self.tables.selected | self._overlay.keys():
            g = groups.get(gkey)
            if g is None:
                continue
            if gkey not in self.tables.selected:
                changed.add(gkey)  # deselected: the plain group goes back in
                continue
            verdicts = frozenset(per_group.get(gkey, {}).items())
            flags = G_POLICY | (G_POLICY_OPEN if gkey in self.tables.open else 0)
            prev = self._overlay.get(gkey)
            if prev is not None and prev[0] is g and prev[1] == (verdicts, flags):
                made = prev[2]
            else:
                made = dataclasses.replace(g, flags=g.flags | flags, verdicts=verdicts)
                changed.add(gkey)
            new_overlay[gkey] = (g, (verdicts, flags), made)
            if out is groups:
                out = dict(groups)
            out[gkey] = made
        self._overlay = new_overlay
        if hint is not None:
            hint = set(hint) | changed
        return out, hint

    @staticmethod
    def _unique(policies: tuple) -> tuple[list, list[str]]:
        """One policy per key (the first source's); the others are problems."""
        seen: dict[str, object] = {}
        problems = []
        for p in policies:
            if p.key in seen:
                if seen[p.key] != p:
                    problems.append(f"policy {p.key} is defined twice (services file and etcd?) "
                                    "with different contents; the first one read is used")
                continue
            seen[p.key] = p
        return list(seen.values()), problems

    @staticmethod
    def _selecting_nothing(policies, groups_of) -> list[str]:
        out = []
        for p in policies:
            for t in p.to:
                if not groups_of(t.namespace, t.name, t.ports):
                    what = f"ports {', '.join(map(str, t.ports))} of " if t.ports else ""
                    out.append(f"policy {p.key}: {what}service {t.service} selects nothing "
                               "(no such service or port yet: that service stays as it is)")
        return out

    def _report(self, problems: list[str]) -> None:
        for msg in problems:
            if msg not in self._logged_problems:
                log.warning("%s", msg)
        self._logged_problems = set(problems)
        self.problems = problems

    @staticmethod
    def _groups_of(desired):
        """(namespace, name, ports) -> the group keys of those ports of the service (every
        family and variant: base, /cluster, /external); ports None: all of them."""
        def groups_of(namespace: str, name: str, ports=None) -> set[str]:
            skey = f"{namespace}/{name}"
            keys = desired._groups_of.get(skey, ())
            if not ports:
                return set(keys)
            svc = desired.service(skey)
            names = set()
            for p in ports:
                if isinstance(p, int) and svc is not None:
                    names |= {sp.name for sp in svc.ports if sp.port == p}
                else:
                    names.add(str(p))
            return {k for k in keys if k.split(":", 1)[1].split("/", 1)[0] in names}
        return groups_of

    # ---- names for events and status --------------------------------------------------
    def identity_selectors(self, identity: int) -> list[str]:
        """The policy selectors an identity stands for: ["cgroup:/lab/a", "unit:web.service"]."""
        t = self.tables
        if t is None or not identity:
            return []
        return [f"{kind}:{value}" for kind, value in t.identities.get(identity, ())]

    def identity_label(self, identity: int) -> str | None:
        sel = self.identity_selectors(identity)
        return ",".join(sel) if sel else None

    def policy_key(self, pid: int) -> str | None:
        t = self.tables
        if t is None or not pid:
            return None
        if getattr(self, "_pkeys_of", (None,))[0] is not t:
            self._pkeys_of = (t, {i: k for k, i in t.policy_ids.items()})
        return self._pkeys_of[1].get(pid)

    def identity_labels(self) -> dict[str, str]:
        t = self.tables
        if t is None:
            return {}
        return {str(i): self.identity_label(i) for i in t.identities}

    def by_group(self) -> dict[str, list[str]]:
        return dict(self.tables.by_group) if self.tables is not None else {}
