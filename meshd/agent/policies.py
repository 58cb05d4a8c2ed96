"""Authorization policies in the sync: which groups they select, the verdicts of each, and
which cgroups carry which identity (meshd/policy.py compiles; this applies it to the groups
the reconciler writes, and follows cgroups as they come and go).

Cost when no policy exists: one check per sync, nothing else (no cgroup watch either).
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
        self.wake = None  # asyncio.Event of the sync loop (set by the daemon)

    # ---- cgroups ----------------------------------------------------------------------
    def _prefix(self) -> str:
        rel = "/" + str(self.root.relative_to(self.mount)).strip(".").strip("/")
        return rel.rstrip("/")

    def _rel(self, path: str) -> str:
        pre = self._prefix()
        if path in ("/", ""):
            return pre or "/"
        return f"{pre}{path}" if pre else path

    def start_watch(self) -> None:
        """Scans the cgroups under the hooks' root and follows them (inotify)."""
        if self.watcher is not None:
            return
        from meshd.cgroups import CgroupWatcher, scan
        if self.root is None:
            from meshd.node import cgroup2_mount
            self.mount = Path(cgroup2_mount())
            self.root = self.mount
        self.cgroups = {self._rel(p): i for p, i in scan(self.root).items()}
        self.cgroup_version += 1
        self.watcher = CgroupWatcher(self.root, self._on_cgroups)
        found = self.watcher.start(asyncio.get_running_loop())
        self.cgroups = {self._rel(p): i for p, i in found.items()}
        log.info("policies: following %d cgroups under %s", len(self.cgroups), self.root)

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

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None

    # ---- the sync ---------------------------------------------------------------------
    def overlay(self, groups: dict, hint: set | None, desired, policies: tuple,
                recorder=None) -> tuple[dict, set | None, dict[int, int]]:
        """(groups with G_POLICY and verdicts on the selected ones, the hint widened by the
        groups whose overlay changed, cgroup id -> identity)."""
        if not policies and not self._overlay:
            self.tables = None
            self.policies = ()
            return groups, hint, {}
        from meshd.policy import compile_policies
        if policies and self.watcher is None:
            self.start_watch()
        key = (policies, self.cgroup_version)
        services_changed = hint is None or bool(desired.changed_groups)
        if self.tables is None or key != self._key or services_changed:
            self.tables = compile_policies(policies, self._groups_of(desired), self.cgroups,
                                           previous=self.tables)
            self._key = key
            self.policies = policies
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
        return out, hint, dict(self.tables.ident)

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
