"""The daemon's pure parts: reload plan, backoff, progress/watchdog rules, the instance lock,
cgroup2 discovery, and the config habits of issue 12 (metrics.listen null / port 0)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshd.agent import health
from meshd.agent.lock import InstanceLock, InstanceLocked
from meshd.agent.reload import plan_reload
from meshd.agent.supervise import Backoff, supervise
from meshd.config import load_config
from meshd.node import cgroup2_mount


def cfg_of(tmp_path: Path, text: str):
    p = tmp_path / "meshd.yaml"
    p.write_text(text)
    return load_config(p, env={})


def test_reload_applies_live_keys_and_names_the_restart_ones(tmp_path):
    old = cfg_of(tmp_path, "etcd: {endpoints: ['http://127.0.0.1:2379']}\nlog_level: info\n")
    new = cfg_of(tmp_path, "etcd: {endpoints: ['http://127.0.0.1:2999']}\nlog_level: debug\n"
                           "service_cidrs: [10.100.0.0/16]\nmetrics: {listen: null}\n"
                           "node_ports: {range: 31000-31999}\n")
    plan = plan_reload(old, new)
    assert plan.applied == ["service_cidrs", "node_ports", "log_level", "metrics"]
    assert plan.refused == ["etcd"]
    assert plan.config.etcd == old.etcd and plan.config.log_level == "debug"
    assert str(plan.config.service_cidrs[0]) == "10.100.0.0/16"
    assert "NOT applied (need a restart of meshd): etcd" in plan.message()


def test_reload_with_nothing_changed_says_so(tmp_path):
    a = cfg_of(tmp_path, "etcd: null\n")
    plan = plan_reload(a, cfg_of(tmp_path, "etcd: null\n"))
    assert (plan.applied, plan.refused) == ([], [])
    assert plan.message() == "reload: no live setting changed"


def test_reload_refuses_adding_the_file_source(tmp_path):
    a = cfg_of(tmp_path, "etcd: null\n")
    b = cfg_of(tmp_path, "etcd: null\nservices_file: s.yaml\n")
    plan = plan_reload(a, b)
    assert plan.refused == ["services_file (added or removed)"] and plan.config.services_file is None


def test_backoff_doubles_to_its_ceiling_and_resets():
    b = Backoff(0.5, 4.0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next() == 0.5


def test_progress_is_stuck_only_after_failing_or_hanging_long():
    p = health.Progress()
    assert p.stuck() is None
    p.failed("apply: RuntimeError: x")
    t0 = p.failing_since
    assert p.stuck(t0 + health.STUCK_AFTER_SECONDS - 1) is None
    assert "syncs have failed for" in p.stuck(t0 + health.STUCK_AFTER_SECONDS + 1)
    p.begin()  # a retry starts: still failing until it succeeds
    assert p.stuck(t0 + health.STUCK_AFTER_SECONDS + 1)
    p.succeeded()
    assert p.stuck() is None and p.age() < 1
    p.begin()
    assert "running for" in p.stuck(p.inflight_since + health.SYNC_HANG_SECONDS + 1)


def test_supervise_restarts_a_failing_task_and_counts_it():
    runs, failures = [], []

    async def flaky():
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom")
        await asyncio.sleep(3600)

    async def main():
        t = asyncio.create_task(supervise("flaky", flaky, failures.append, Backoff(0.01, 0.02)))
        for _ in range(200):
            if len(runs) == 3:
                break
            await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    asyncio.run(main())
    assert len(runs) == 3 and failures == ["flaky", "flaky"]


def test_second_lock_names_the_holder(tmp_path):
    code = ("import sys, time; from meshd.agent.lock import InstanceLock; "
            f"l = InstanceLock({str(tmp_path)!r}, 'x'); l.acquire(); print('held', flush=True); "
            "time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InstanceLocked, match=f"already run by pid {holder.pid}"):
            InstanceLock(tmp_path, "x").acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = InstanceLock(tmp_path, "x")  # the kernel dropped it with the process
    lock.acquire()
    assert (tmp_path / "x.lock").read_text().strip() == str(os.getpid())
    lock.release()


MOUNTINFO_HYBRID = """\
24 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
30 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
35 24 0:30 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
37 35 0:32 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,name=systemd
"""
MOUNTINFO_V2 = """\
30 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
"""


def test_cgroup2_is_found_on_hybrid_and_pure_v2_hosts():
    assert cgroup2_mount(MOUNTINFO_HYBRID) == Path("/sys/fs/cgroup/unified")
    assert cgroup2_mount(MOUNTINFO_V2) == Path("/sys/fs/cgroup")
    assert cgroup2_mount("") == Path("/sys/fs/cgroup")
    assert cgroup2_mount("40 1 0:5 / /mnt/cg\\040two rw - cgroup2 none rw\n") == Path("/mnt/cg two")


def test_default_cgroup_is_this_hosts_cgroup2_mount(tmp_path):
    assert cfg_of(tmp_path, "{}\n").cgroup == cgroup2_mount()


def test_metrics_listen_null_turns_the_exporter_off_and_port_0_is_allowed(tmp_path):
    assert cfg_of(tmp_path, "metrics: {listen: null}\n").metrics.listen is None
    assert cfg_of(tmp_path, "metrics: {listen: '127.0.0.1:0'}\n").metrics.listen == "127.0.0.1:0"
    assert load_config(None, env={"MESHD_METRICS__LISTEN": ""}).metrics.listen is None


def test_exporter_on_port_0_reports_the_port_it_got():
    from meshd.agent.exporter import Exporter
    from meshd.metrics import ControlPlaneStats, MeshdCollector
    import urllib.request
    ex = Exporter(MeshdCollector(None, ControlPlaneStats()))
    ex.start("127.0.0.1:0")
    try:
        host, port = ex.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        body = urllib.request.urlopen(f"http://{ex.address}/metrics", timeout=5).read()
        assert b"meshd_sync_errors_total" in body
    finally:
        ex.stop()


def test_counter_pruning_never_runs_while_a_sync_writes_the_reconcilers_state(monkeypatch):
    """Issue 12 item 2: the prune task used to iterate the reconciler's dicts on the loop
    while the worker thread changed them (RuntimeError: dictionary changed size). Pruning is
    now a step of the sync loop: it can only run between syncs."""
    import threading
    import time as _time
    from types import SimpleNamespace

    from meshd.agent import sync as syncmod
    from meshd.agent.health import Progress
    from meshd.agent.sources import Sources, SourceState
    from meshd.metrics import ControlPlaneStats

    events: list[str] = []
    busy = threading.Event()

    class SlowReconciler:
        def __init__(self):
            self.groups, self.backend_ids, self.draining = {}, {}, 0

        def apply(self, groups, hint):
            busy.set()
            for i in range(200):  # the worker thread churns the dicts for ~0.2 s
                self.backend_ids[i] = i
                self.backend_ids.pop(i - 1, None)
                _time.sleep(0.001)
            busy.clear()
            events.append("apply")
            return SimpleNamespace(ops={"delete_backend": 1}, errors={}, groups_changed=1,
                                   removed=(), timings={})

    def prune_stats(self, groups, backends):
        events.append("prune-during-apply" if busy.is_set() else "prune")

    async def _noop():
        return None

    monkeypatch.setattr(syncmod.Syncer, "_prune_stats", prune_stats)
    monkeypatch.setattr(syncmod, "PRUNE_DELAY_SECONDS", 0.0)

    async def main():
        sources = Sources()
        sources["file"] = SourceState(synced=True)
        ctx = SimpleNamespace(cfg=SimpleNamespace(service_cidrs=[], external_ip_cidrs=[],
            node=SimpleNamespace(name="n1", zone=None), node_ports=SimpleNamespace(
            addresses=[], range=(30000, 32767))), sources=sources, local=set(),
            etcd_addresses=set, control=ControlPlaneStats(), progress=Progress(),
            reconciler=SlowReconciler(), write_status=lambda: None, record_fill=lambda: None,
            after_sync=_noop,
            maps=None)
        s = syncmod.Syncer(ctx)
        loop = asyncio.create_task(s.run())
        for _ in range(5):  # five syncs, each leaving a prune due
            sources.wake.set()
            await asyncio.sleep(0.05)
        for _ in range(100):
            if events.count("apply") >= 2 and "prune" in events:
                break
            await asyncio.sleep(0.05)
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop

    asyncio.run(main())
    assert "prune" in events and "apply" in events
    assert "prune-during-apply" not in events, events


def _fake_ctx(reconciler, services=()):
    from types import SimpleNamespace

    from meshd.agent.health import Progress
    from meshd.agent.sources import Sources, SourceState
    from meshd.metrics import ControlPlaneStats

    async def _noop():
        return None
    sources = Sources()
    sources["file"] = SourceState(services=tuple(services), synced=True)
    return SimpleNamespace(
        cfg=SimpleNamespace(service_cidrs=[__import__("ipaddress").ip_network("10.96.0.0/12")],
                            external_ip_cidrs=[], node=SimpleNamespace(name="n1", zone=None),
                            node_ports=SimpleNamespace(addresses=[], range=(30000, 32767))),
        sources=sources, local=set(), etcd_addresses=set, control=ControlPlaneStats(),
        progress=Progress(), reconciler=reconciler, write_status=lambda: None,
        record_fill=lambda: None, after_sync=_noop, maps=None)


class _RecordingReconciler:
    def __init__(self, errors=None):
        self.applied: list[tuple[dict, object]] = []
        self.errors = errors or {}
        self.groups, self.backend_ids = {}, {}
        self.draining = 0

    def apply(self, groups, hint):
        from types import SimpleNamespace
        self.applied.append((dict(groups), hint))
        return SimpleNamespace(ops={"put_frontend": 1}, errors=dict(self.errors),
                               groups_changed=len(groups), removed=(), timings={})


def _svc(i):
    from meshd.model import parse_service
    return parse_service({"namespace": "t", "name": f"s{i}", "vips": [f"10.96.0.{i + 1}"],
                          "ports": [{"name": "http", "port": 80}],
                          "endpoints": [{"address": f"10.1.0.{i + 1}",
                                         "ports": {"http": 8080}}]}, "x")


def test_a_sync_failing_in_validation_is_retried_with_the_full_state(monkeypatch):
    """Review finding: DesiredState took the new services, then raised; the retry saw "no
    change" and applied stale (at a cold start: empty) groups, removing adopted services."""
    from meshd.agent import sync as syncmod
    from meshd.desired import DesiredState
    real = DesiredState.update
    calls = {"n": 0}

    def flaky(self, *a, **kw):
        out = real(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected after the state was taken")
        return out
    monkeypatch.setattr(DesiredState, "update", flaky)
    monkeypatch.setattr(syncmod.Syncer, "_schedule_retry", lambda self: 0.0)
    rec = _RecordingReconciler()
    ctx = _fake_ctx(rec, [_svc(i) for i in range(3)])

    async def main():
        s = syncmod.Syncer(ctx)
        await s._attempt()  # fails in validate
        assert s.stage == "idle" and ctx.progress.last_failure.startswith("validate")
        await s._attempt()  # the retry
    asyncio.run(main())
    assert len(rec.applied) == 1
    groups, hint = rec.applied[0]
    assert len(groups) == 3 and hint is None  # every group, diffed in full


def test_data_plane_errors_are_retried_on_a_timer_without_holding_changes_back():
    from meshd.agent import sync as syncmod
    rec = _RecordingReconciler(errors={"t/s0:http/ipv4": "the map is full"})
    ctx = _fake_ctx(rec, [_svc(0)])

    async def main():
        s = syncmod.Syncer(ctx)
        loop = asyncio.create_task(s.run())
        ctx.sources.wake.set()
        for _ in range(100):
            if rec.applied:
                break
            await asyncio.sleep(0.01)
        assert s._retry_at is None and s._again_at is not None  # no hard backoff
        ctx.sources.publish("file", [_svc(0), _svc(1)], ())
        for _ in range(100):  # applied at once, not after the 1 s retry timer
            if len(rec.applied) == 2:
                break
            await asyncio.sleep(0.01)
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
        return s
    s = asyncio.run(main())
    assert len(rec.applied) == 2 and len(rec.applied[1][0]) == 2
    # the same error is logged and counted once, not on every retry
    assert ctx.control.view()["sync_errors"] == {"dataplane": 1}


def test_the_lock_file_is_root_only_whatever_mode_it_had(tmp_path):
    p = tmp_path / "x.lock"
    p.write_text("")
    p.chmod(0o666)
    lock = InstanceLock(tmp_path, "x")
    lock.acquire()
    try:
        assert (p.stat().st_mode & 0o777) == 0o600
    finally:
        lock.release()


def test_the_file_feed_publishes_the_policies_of_the_services_file(tmp_path):
    import asyncio
    from meshd.agent.sources import FileFeed, Sources
    path = tmp_path / "services.yaml"
    path.write_text("services: []\npolicies:\n  - {namespace: shop, name: p, from: [{unit: web.service}],"
                    " to: [{service: db}]}\n")

    async def body():
        sources = Sources()
        feed = FileFeed(sources, lambda: path)
        task = asyncio.create_task(feed.run())
        try:
            await asyncio.wait_for(sources.wake.wait(), 5)
        finally:
            task.cancel()
        return sources["file"]

    st = asyncio.run(body())
    assert st.synced and [p.key for p in st.policies] == ["shop/p"] and st.services == ()
