"""meshd.cgroups against the real cgroup2 tree: scan() gives every cgroup with the id the BPF
hooks see (the directory's inode, as loader.cgroup_id), and CgroupWatcher reports sub-cgroups
made (also a whole subtree made at once) and removed, within a bounded wait.
Everything happens below a cgroup of the test's own, removed after it."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from meshd.cgroups import CgroupWatcher, scan
from meshd.dataplane import loader
from testlib import CGROUP2

WAIT = 5.0


@pytest.fixture
def own_cgroup(kernel_instance):
    """conftest's own cgroup (and sweep-safe name); the cgroups a test makes below it go
    first, deepest first."""
    _name, cg = kernel_instance
    try:
        yield cg
    finally:
        for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            d.rmdir()


def test_scan_lists_every_cgroup_with_the_kernels_id(own_cgroup: Path) -> None:
    (own_cgroup / "a" / "b").mkdir(parents=True)
    (own_cgroup / "c").mkdir()
    rel = "/" + own_cgroup.name
    got = scan(CGROUP2)
    assert got["/"] == loader.cgroup_id(CGROUP2)
    for sub in ("", "/a", "/a/b", "/c"):
        assert got[rel + sub] == loader.cgroup_id(own_cgroup / sub.lstrip("/")), sub
    assert not any(p.startswith(rel + "/") for p in got if p not in {rel + s for s in ("/a", "/a/b", "/c")})
    mine = scan(own_cgroup)  # any directory can be the root: paths are relative to it
    assert set(mine) == {"/", "/a", "/a/b", "/c"} and mine["/a/b"] == got[rel + "/a/b"]


def test_the_watcher_reports_cgroups_made_and_removed(own_cgroup: Path) -> None:
    rel = "/" + own_cgroup.name
    changes: list[tuple[dict[str, int], dict[str, int]]] = []

    async def body() -> None:
        loop = asyncio.get_running_loop()
        (own_cgroup / "before").mkdir()
        w = CgroupWatcher(CGROUP2, lambda added, removed: changes.append((added, removed)))
        now = w.start(loop)
        try:
            assert now[rel + "/before"] == loader.cgroup_id(own_cgroup / "before")

            async def seen(pred, what: str) -> None:
                deadline = time.monotonic() + WAIT
                while not pred():
                    assert time.monotonic() < deadline, f"{what} not reported within {WAIT}s: {changes}"
                    await asyncio.sleep(0.01)

            def added() -> dict[str, int]:
                return {p: i for a, _ in changes for p, i in a.items() if p.startswith(rel)}

            def removed() -> dict[str, int]:
                return {p: i for _, r in changes for p, i in r.items() if p.startswith(rel)}

            (own_cgroup / "unit-a.service").mkdir()
            await seen(lambda: rel + "/unit-a.service" in added(), "a new cgroup")
            assert added()[rel + "/unit-a.service"] == loader.cgroup_id(own_cgroup / "unit-a.service")
            # a subtree made at once (mkdir -p, as systemd does): every level is reported, also
            # the ones made before the watcher could watch their parent
            os.makedirs(own_cgroup / "x.slice" / "y.service" / "z")
            deep = [rel + "/x.slice", rel + "/x.slice/y.service", rel + "/x.slice/y.service/z"]
            await seen(lambda: all(p in added() for p in deep), "a new subtree")
            assert w.cgroups[deep[2]] == loader.cgroup_id(own_cgroup / "x.slice" / "y.service" / "z")
            # and watched: a cgroup made below the deepest new one is seen too
            (own_cgroup / "x.slice" / "y.service" / "z" / "w").mkdir()
            await seen(lambda: deep[2] + "/w" in added(), "a cgroup below the new subtree")
            # removed
            (own_cgroup / "unit-a.service").rmdir()
            await seen(lambda: rel + "/unit-a.service" in removed(), "a removed cgroup")
            assert rel + "/unit-a.service" not in w.cgroups
            # removed and made again at once: reported as removed and added, with the new id
            old = w.cgroups[rel + "/before"]
            (own_cgroup / "before").rmdir()
            (own_cgroup / "before").mkdir()
            new = loader.cgroup_id(own_cgroup / "before")
            await seen(lambda: w.cgroups.get(rel + "/before") == new, "a cgroup made again")
            assert removed()[rel + "/before"] == old
            # what the watcher holds is what a scan finds
            assert {p: i for p, i in w.cgroups.items() if p.startswith(rel)} == \
                {p: i for p, i in scan(CGROUP2).items() if p.startswith(rel)}
            assert w.unwatched == 0
        finally:
            w.close()
        assert w._fd is None

    asyncio.run(asyncio.wait_for(body(), 30))
