"""`meshd run`: keep the kernel maps equal to the registry, until told to stop.

This module composes the daemon's parts (meshd/agent/): it takes the instance lock, loads
(or adopts) the pinned data plane, attaches tc, starts the exporter and the sources, and
runs every long-lived loop under a supervisor, so none can die silently. SIGHUP re-reads the
config and the services file; SIGTERM/SIGINT stop the daemon (and an embedded etcd) and
leave the pinned data plane serving; `meshd cleanup` removes it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from pathlib import Path

from meshd import sdnotify
from meshd.agent import guard, health, tcwire
from meshd.agent.events import EventHub, Namer
from meshd.agent.exporter import Exporter
from meshd.agent.healthz import HealthServers
from meshd.agent.lock import InstanceLock
from meshd.agent.reload import plan_reload
from meshd.agent.sources import EtcdFeed, FileFeed, KubernetesFeed, Sources
from meshd.agent.status import status_path, write_status
from meshd.agent.supervise import supervise
from meshd.agent.sync import GC_THRESHOLDS, Syncer, settle_heap
from meshd.config import Config, load_config
from meshd.dataplane import loader
from meshd.dataplane.kernel import KernelDataplane
from meshd.errors import MeshdError
from meshd.reconciler import Reconciler

log = logging.getLogger("meshd.daemon")

ETCD_RESOLVE_SECONDS = 60.0
SYNC_STOP_WAIT_SECONDS = 60.0  # a cold sync at 10,000 services takes ~8 s (unit: TimeoutStopSec)

__all__ = ["Daemon", "run", "status_path"]


class Daemon:
    """The shared context of the daemon's parts (they read cfg, sources, maps, control...)."""

    def __init__(self, config_path: Path | None, cfg: Config, log_level_pinned: bool = False):
        from meshd.metrics import ControlPlaneStats
        self.log_level_pinned = log_level_pinned  # --log-level given: the config's is not used
        self.config_path = config_path
        self.cfg = cfg
        self.control = ControlPlaneStats()
        self.progress = health.Progress(cfg.sync.stuck_after_seconds,
                                        cfg.sync.ready_grace_seconds)
        self.control.progress = self.progress
        self.sources = Sources()
        self.sources.on_change = self.write_status
        self.control.sources_up = lambda: {n: st.up for n, st in list(self.sources.items())}
        self.syncer = Syncer(self)
        self.reconciler: Reconciler | None = None
        self.maps: loader.Maps | None = None
        self.etcd_urls: list[str] = []
        self.local: set | None = None  # the node's addresses (refreshed by a task)
        self.exporter: Exporter | None = None
        self.health_http: HealthServers | None = None
        self._file: FileFeed | None = None
        self._stop = asyncio.Event()
        self._hup = asyncio.Event()
        self._max_entries: dict[str, int] = {}
        self._etcd_addrs: set = set()
        self.dataplane_error: str | None = None  # the data plane cannot serve (guard.py)
        self.node_zone: str | None = None  # the Node object's (node.zone in config wins)
        from meshd.node import cgroup2_mount
        self.policies = self.syncer.policies
        self.policies.root, self.policies.mount = Path(cfg.cgroup), Path(cgroup2_mount())
        self.policies.wake = self.sources.wake
        self.namer = Namer()
        self.events: EventHub | None = None

    # ---- life ---------------------------------------------------------------------------
    async def run(self) -> int:
        cfg = self.cfg
        lock = InstanceLock(cfg.state_dir, cfg.instance)
        lock.acquire()  # before anything touches the pinned maps
        try:
            return await self._run()
        finally:
            lock.release()

    async def _run(self) -> int:
        cfg = self.cfg
        # No full collections while the first full state is built (list, validation, first
        # sync): with 10^6 new long-lived objects each full pass walks them all again (~2.4 s
        # of a 10,000-service cold start). Young collections go on. Back once ready.
        gc.set_threshold(GC_THRESHOLDS[0], GC_THRESHOLDS[1], 10**9)
        self.maps = await asyncio.to_thread(self._load)
        self.control.set_attached(True)
        try:
            await asyncio.to_thread(tcwire.apply_tc, cfg)
        except BaseException:
            self.maps.close()
            raise
        server = None
        tasks: list[asyncio.Task] = []
        try:
            self._start_exporter()
            self.health_http = HealthServers(self)
            await self.health_http.start(cfg.healthz.listen)
            dp = KernelDataplane(self.maps)
            self.reconciler = Reconciler(dp)
            self.reconciler.adopt(await asyncio.to_thread(dp.snapshot))
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, self._on_hup)

            def task(name, factory):
                tasks.append(asyncio.create_task(
                    supervise(name, factory, self._task_failed), name=name))

            if cfg.services_file is not None:
                self._file = FileFeed(self.sources, lambda: self.cfg.services_file)
                task("file", self._file.run)
            if cfg.etcd is not None:
                server = await self._start_embedded_etcd()
                from meshd.sources.etcd_addresses import resolve_etcd_addresses
                self._etcd_addrs = await resolve_etcd_addresses(self.etcd_urls)  # before a sync
                feed = EtcdFeed(self.sources, cfg.etcd, self.etcd_urls)
                task("etcd", feed.run)
                task("etcd-resolve", self._resolve_etcd)
            if cfg.kubernetes is not None:
                from meshd.sources.kubernetes import check_api_server_reachable
                await asyncio.to_thread(check_api_server_reachable, cfg.kubernetes,
                                        cfg.service_cidrs)
                feed_k8s = KubernetesFeed(self.sources, cfg, self._on_node_zone)
                task("kubernetes", feed_k8s.run)
            if not self.sources:
                log.warning("no source configured (services_file, etcd, kubernetes): serving "
                            "nothing")
            task("sync", self.syncer.run)
            task("addresses", lambda: tcwire.watch_addresses(self))
            task("guard", lambda: guard.guard(self))
            task("reload", self._reloads)
            task("cgroups", self.policies.rescan)
            await self._start_events()
            tasks.append(asyncio.create_task(self._ready(), name="ready"))
            wd = sdnotify.watchdog_interval()
            if wd:
                task("watchdog", lambda: health.watchdog(self.progress, wd))
            self.write_status()
            self.sources.wake.set()
            await self._stop.wait()
            sdnotify.notify("STOPPING=1")
            log.info("stopping; the pinned data plane at %s keeps serving (`meshd cleanup` "
                     "removes it)", self.maps.pin_dir)
            return 0
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            cur = self.syncer.current
            if cur is not None and not cur.done():
                log.info("stopping: letting the sync in flight finish")
                await asyncio.wait([cur], timeout=SYNC_STOP_WAIT_SECONDS)
            if server is not None:
                await server.stop()
            self.policies.stop()
            if self.events is not None:
                await self.events.stop()
            if self.exporter is not None:
                self.exporter.stop()
            if self.health_http is not None:
                await self.health_http.close()
            self.maps.close()

    async def _ready(self) -> None:
        try:
            # settle_heap (~10-50 ms) before READY=1: ready with the memory it will keep
            await health.announce_ready(self.progress, self.sources,
                                        lambda: self.syncer.result.services, settle_heap)
        finally:
            if gc.get_threshold() != GC_THRESHOLDS:  # cancelled before ready
                settle_heap()

    def _task_failed(self, name: str) -> None:
        self.control.count_task_failure(name)
        if name == "sync":  # the loop itself died: not progress (the watchdog must know)
            self.progress.failed("the sync task failed (see the traceback above)")

    def _load(self) -> loader.Maps:
        cfg = self.cfg
        return loader.load(cfg.bpffs, cfg.instance, cfg.cgroup, cfg.maglev.fixed_size,
                           max_frontends=cfg.maps.max_frontends,
                           max_backends=cfg.maps.max_backends,
                           maglev_max=cfg.maglev.max_table_size,
                           events_ring_bytes=cfg.events.ring_bytes)

    def reattach(self) -> None:
        """Load and attach again (the cgroup came back): the same pinned maps are adopted,
        so the reconciler's handles stay valid; only the held pins are swapped."""
        new = self._load()
        old_held, self.maps.held = self.maps.held, new.held
        self.maps.cgroup_id, new.held = new.cgroup_id, {}
        new.close()
        for fd in old_held.values():
            from meshd.dataplane.libbpf import close_fd
            close_fd(fd)

    def _start_exporter(self) -> None:
        from meshd.metrics import KernelSource, MeshdCollector
        self.exporter = Exporter(MeshdCollector(KernelSource(self.cfg.bpffs, self.cfg.instance),
                                                self.control))
        self.exporter.start(self.cfg.metrics.listen)

    # ---- connection events ---------------------------------------------------------------
    async def _start_events(self) -> None:
        """The kernel's settings (always written: `types: []` turns a running stream off),
        then the reader and `meshd observe`'s socket."""
        from meshd.dataplane import events as kev
        from meshd.observe import socket_path
        cfg = self.cfg
        await asyncio.to_thread(self._write_evcfg)
        self._name_events()
        self.events = EventHub(lambda: kev.EventReader(cfg.bpffs, cfg.instance), self.namer,
                               cfg.events.history)
        self.events.on_event = self.control.count_event
        self.control.identity_label = self.namer.identity_label
        if cfg.events.types:
            self.policies.start_watch()  # cgroup paths of the callers
        self.events.start_reader(asyncio.get_running_loop())
        await self.events.serve(socket_path(cfg))

    def _write_evcfg(self) -> None:
        from meshd.dataplane import events as kev
        ev = self.cfg.events
        mask = kev.event_mask(ev.types)
        kev.write_evcfg(self.cfg.bpffs, self.cfg.instance, mask, ev.sample, ev.rate_per_cpu)

    def _name_events(self) -> None:
        """What the event's numbers mean: read at the time each event is named."""
        n, pol = self.namer, self.policies
        n.group_key = lambda gid: (self.reconciler.group_key(gid)
                                   if self.reconciler is not None else None)
        n.identity_label = pol.identity_label
        n.identity_selectors = pol.identity_selectors
        n.policy_key = pol.policy_key
        n.cgroup_path = pol.cgroup_path
        n.identity_of_cgroup = pol.identity_of_cgroup

    # ---- reload -------------------------------------------------------------------------
    def _on_hup(self) -> None:
        """SIGHUP: only wakes the reload task, so reloads run one at a time, in order (a
        storm of signals coalesces) and each one's failures are logged and counted."""
        self._hup.set()

    async def _reloads(self) -> None:
        while True:
            await self._hup.wait()
            self._hup.clear()
            await self._reload()

    async def _reload(self) -> None:
        log.info("SIGHUP: reloading config and services")
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
        except MeshdError as e:
            log.error("reload refused, keeping the running config: %s", e)
        else:
            plan = plan_reload(self.cfg, new)
            self.cfg = plan.config
            if "log_level" in plan.applied:
                if self.log_level_pinned:  # --log-level on the command line wins, as at start
                    log.info("reload: log_level %s not applied: --log-level was given",
                             self.cfg.log_level)
                else:
                    logging.getLogger().setLevel(getattr(logging, self.cfg.log_level.upper()))
            if "sync" in plan.applied:
                self.progress.stuck_after = self.cfg.sync.stuck_after_seconds
                self.progress.ready_grace = self.cfg.sync.ready_grace_seconds
            if {"service_cidrs", "node_ports", "node", "external_ip_cidrs"} & set(plan.applied):
                self.sources.wake.set()
            if "metrics" in plan.applied and self.exporter is not None:
                await asyncio.to_thread(self.exporter.relisten, self.cfg.metrics.listen)
            if "healthz" in plan.applied and self.health_http is not None:
                await self.health_http.relisten(self.cfg.healthz.listen)
            if "events" in plan.applied:
                try:
                    await asyncio.to_thread(self._write_evcfg)
                    if self.events is not None:
                        self.events.set_history(self.cfg.events.history)
                    if self.cfg.events.types:
                        self.policies.start_watch()  # the callers' cgroup paths
                except MeshdError as e:
                    self.control.count_sync_error("reload")
                    log.error("reload: events not applied: %s", e)
            if "tc" in plan.applied:
                try:
                    await asyncio.to_thread(tcwire.apply_tc, self.cfg)
                except MeshdError as e:
                    self.control.count_sync_error("reload")
                    log.error("reload: tc not applied: %s", e)
            # logged once it is in force (the exporter and health server re-listened)
            (log.error if plan.refused else log.info)("%s", plan.message())
        if self._file is not None:
            self._file.poke()  # re-read the file now
        self.write_status()

    async def after_sync(self) -> None:
        """What follows a successful sync: the health check node ports of the services."""
        if self.health_http is not None:
            await self.health_http.sync_checks(
                self.syncer.desired.health_checks(self.cfg.node.name))

    def _on_node_zone(self, zone: str | None) -> None:
        """The Node object's topology.kubernetes.io/zone: topology-hinted endpoints are
        chosen by it (unless node.zone is set in the config), so a change re-syncs."""
        if zone != self.node_zone:
            log.info("node zone from the Node object: %s%s", zone, " (node.zone in the config "
                     "wins)" if self.cfg.node.zone is not None else "")
            self.node_zone = zone
            self.sources.wake.set()

    # ---- etcd ---------------------------------------------------------------------------
    async def _start_embedded_etcd(self):
        etcd_cfg = self.cfg.etcd
        if etcd_cfg.endpoints:
            self.etcd_urls = list(etcd_cfg.endpoints)
            return None
        from meshd.sources.etcd_server import EmbeddedEtcd, data_dir_of
        data = data_dir_of(self.cfg.state_dir, self.cfg.instance)
        server = EmbeddedEtcd(data)
        await server.start()
        log.info("embedded etcd at %s (pid %s, data %s)", server.url, server.pid, data)
        self.etcd_urls = [server.url]
        return server

    def etcd_addresses(self) -> set:
        """Addresses of etcd (literals and resolved host names): never a VIP."""
        return self._etcd_addrs

    async def _resolve_etcd(self) -> None:
        """etcd host names resolved again every ETCD_RESOLVE_SECONDS (not per sync; the
        first time before the first sync); a new address wakes a sync so that a VIP on it is
        refused at once. Addresses are never dropped while the daemon runs: a DNS failure
        must not lift the protection (a stale one only keeps a VIP off an old etcd IP)."""
        from meshd.sources.etcd_addresses import resolve_etcd_addresses
        while True:
            await asyncio.sleep(ETCD_RESOLVE_SECONDS)
            addrs = self._etcd_addrs | await resolve_etcd_addresses(self.etcd_urls)
            if addrs != self._etcd_addrs:
                self._etcd_addrs = addrs
                self.sources.wake.set()

    # ---- what others read ---------------------------------------------------------------
    def record_fill(self) -> None:
        rec, maps = self.reconciler, self.maps
        if not self._max_entries:
            from meshd.dataplane import libbpf
            self._max_entries = {m.name: libbpf.map_info(m.fd, m.name).max_entries
                                 for m in (maps.svc, maps.backends, maps.maglev)}
        used = {maps.svc.name: len(rec.frontends), maps.backends.name: len(rec.backend_ids),
                maps.maglev.name: sum(1 for g in rec.groups.values() if g.has_table)}
        for name, n in used.items():
            self.control.set_map_fill(name, n, self._max_entries[name])

    def write_status(self) -> None:
        res, prog = self.syncer.result, self.progress
        for name, st in self.sources.items():
            self.control.set_source_up(name, st.up)
        doc = {"pid": os.getpid(), "synced_at": res.synced_at,
               "last_sync_ok": prog.last_ok, "sync_age_seconds": round(prog.age(), 3),
               "sync_failing": prog.last_failure, "stuck": prog.stuck(),
               "dataplane_error": self.dataplane_error,
               "sources": {n: {"synced": s.synced, "up": s.up, "error": s.error,
                               "services": len(s.services)} for n, s in self.sources.items()},
               "source_error": "; ".join(f"{n}: {s.error}" for n, s in self.sources.items()
                                         if s.error) or None,
               "etcd": self.etcd_urls, "services": res.services,
               "metrics": self.exporter.address if self.exporter is not None else None,
               "healthz": self.health_http.address if self.health_http is not None else None,
               "maps": {k: {"entries": n, "max_entries": mx}
                        for k, (n, mx) in self.control.view()["map_fill"].items()},
               "policies": self.policies.by_group(),
               "policy_problems": self.policies.problems,
               "cgroup_watch": self.policies.watch_status(),
               "identities": self.policies.identity_labels(),
               "events": self.events.status() if self.events is not None else None,
               "rejected": res.rejected, "errors": res.errors, "written_at": time.time()}
        write_status(status_path(self.cfg), doc)


def run(config_path: Path | None, log_level_set: bool = False) -> int:
    from meshd.dataplane.libbpf import limit_malloc_arenas
    limit_malloc_arenas()  # before any thread
    cfg = load_config(config_path)
    if not log_level_set:  # --log-level on the command line wins over the file
        logging.getLogger().setLevel(getattr(logging, cfg.log_level.upper(), logging.INFO))
    return asyncio.run(Daemon(config_path, cfg, log_level_set).run())
