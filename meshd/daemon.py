"""`meshd run`: keep the kernel maps equal to the registry, until told to stop.

One asyncio task per concern: each source (the services file, etcd), the sync loop, the
systemd watchdog. Sources only publish their latest snapshot and wake the sync loop, which
merges them, validates across records, and hands desired state to the reconciler in a worker
thread (libbpf calls block). Bursts of changes coalesce into one sync. READY=1 goes to
systemd after the first full sync of every source. SIGHUP re-reads config and the services
file. SIGTERM/SIGINT stop the daemon (and an embedded etcd) and leave the pinned data plane
serving; `meshd cleanup` removes it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from meshd import node, sdnotify
from meshd.config import Config, load_config
from meshd.dataplane import loader, sockdestroy
from meshd.dataplane.kernel import KernelDataplane
from meshd.desired import DesiredState
from meshd.errors import MeshdError, RecordError, RegistryError
from meshd.model import Service
from meshd.reconciler import Reconciler
from meshd.sources.static import load_services_file

log = logging.getLogger("meshd.daemon")

FILE_POLL_SECONDS = 1.0
ADDRESS_POLL_SECONDS = 10.0
ETCD_MONITOR_SECONDS = 1.0
PRUNE_DELAY_SECONDS = 2.0
SYNC_STOP_WAIT_SECONDS = 60.0  # a cold sync at 10,000 services takes ~8 s
GC_THRESHOLDS = gc.get_threshold()  # the interpreter's own (700, 10, 10)
GC_FREEZE_AFTER = 500  # groups changed in one sync: freeze the heap afterwards  # how often the node's own addresses are re-read
READY_GRACE_SECONDS = 20.0  # READY anyway (serving the pinned state) if a source stays down
# Settings fixed for the life of the pinned data plane; a reload that changes them is refused.
RESTART_ONLY = ("instance", "bpffs", "cgroup", "maglev", "etcd")


def status_path(cfg: Config) -> Path:
    return Path(cfg.state_dir) / cfg.instance / "status.json"


def etcd_hosts(urls: list[str]) -> set:
    """Addresses of the etcd endpoints: a VIP must never capture the daemon's own etcd."""
    import ipaddress
    out = set()
    for u in urls:
        try:
            out.add(ipaddress.ip_address(urlsplit(u).hostname or ""))
        except ValueError:
            continue  # a hostname: cannot collide with a VIP literal
    return out


@dataclass
class SourceState:
    services: tuple[Service, ...] = ()
    errors: tuple[RecordError, ...] = ()
    synced: bool = False  # delivered at least one full snapshot
    error: str | None = None  # the source cannot be read now (kernel state kept)


@dataclass
class SyncState:
    synced_at: float = 0.0
    rejected: list[dict] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    services: int = 0
    ops: int = 0


class Daemon:
    def __init__(self, config_path: Path | None, cfg: Config):
        self.config_path = config_path
        self.cfg = cfg
        self.state = SyncState()
        self.sources: dict[str, SourceState] = {}
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._file_sig: tuple | None = None
        self._file_poke = asyncio.Event()
        self.reconciler: Reconciler | None = None
        self.maps: loader.Maps | None = None
        self.etcd_urls: list[str] = []
        self.desired = DesiredState()
        self._local: set | None = None  # the node's addresses (refreshed by a task)
        self._logged_rejects: set[tuple[str, str]] = set()
        self._warned_affinity: set[str] = set()
        self._dirty_since: float | None = None  # first change not yet in the kernel
        self._max_entries: dict[str, int] = {}
        self._prune_due = asyncio.Event()
        self._current_sync: asyncio.Future | None = None
        from meshd.metrics import ControlPlaneStats
        self.control = ControlPlaneStats()

    # ---- life ---------------------------------------------------------------------------
    async def run(self) -> int:
        cfg = self.cfg
        # No full collections while the first full state is built (list, validation, first
        # sync): with 10^6 new long-lived objects each full pass walks them all again (~2.4 s
        # of a 10,000-service cold start). Young collections go on. Back once ready.
        gc.set_threshold(GC_THRESHOLDS[0], GC_THRESHOLDS[1], 10**9)
        self.maps = await asyncio.to_thread(loader.load, cfg.bpffs, cfg.instance, cfg.cgroup,
                                            cfg.maglev.table_size)
        try:
            await asyncio.to_thread(self._apply_tc)
        except BaseException:
            self.maps.close()
            raise
        server = metrics_server = None
        tasks: list[asyncio.Task] = []
        try:
            metrics_server = self._start_metrics()
            dp = KernelDataplane(self.maps)
            self.reconciler = Reconciler(dp)
            self.reconciler.adopt(await asyncio.to_thread(dp.snapshot))
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, self._on_hup)
            if cfg.services_file is not None:
                self.sources["file"] = SourceState()
                tasks.append(asyncio.create_task(self._watch_file(), name="file"))
            if cfg.etcd is not None:
                server = await self._start_embedded_etcd()
                self.sources["etcd"] = SourceState()
                tasks.append(asyncio.create_task(self._run_etcd(), name="etcd"))
            if not self.sources:
                log.warning("no source configured (services_file, etcd): serving nothing")
            tasks.append(asyncio.create_task(self._sync_loop(), name="sync"))
            tasks.append(asyncio.create_task(self._watch_addresses(), name="addresses"))
            tasks.append(asyncio.create_task(self._prune_loop(), name="prune"))
            tasks.append(asyncio.create_task(self._ready_when_synced(), name="ready"))
            wd = sdnotify.watchdog_interval()
            if wd:
                tasks.append(asyncio.create_task(self._watchdog(wd), name="watchdog"))
            self._wake.set()
            await self._stop.wait()
            sdnotify.notify("STOPPING=1")
            log.info("stopping; the pinned data plane at %s keeps serving (`meshd cleanup` "
                     "removes it)", self.maps.pin_dir)
            return 0
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._current_sync is not None and not self._current_sync.done():
                log.info("stopping: letting the sync in flight finish")
                await asyncio.wait([self._current_sync], timeout=SYNC_STOP_WAIT_SECONDS)
            if server is not None:
                await server.stop()
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            self.maps.close()

    def _start_metrics(self):
        from meshd.metrics import KernelSource, MeshdCollector, start_metrics_server
        cfg = self.cfg
        try:
            server = start_metrics_server(cfg.metrics.listen, MeshdCollector(
                KernelSource(cfg.bpffs, cfg.instance), self.control))
        except OSError as e:
            log.error("metrics: cannot listen on %s: %s (set metrics.listen to a free "
                      "address); running without the exporter", cfg.metrics.listen, e)
            return None
        log.info("metrics on http://%s/metrics", cfg.metrics.listen)
        return server

    async def _ready_when_synced(self) -> None:
        try:
            try:
                await asyncio.wait_for(self._ready.wait(), READY_GRACE_SECONDS)
            except asyncio.TimeoutError:
                down = [n for n, s in self.sources.items() if not s.synced]
                if down:  # a source is unreachable: serve what the kernel holds, say so
                    log.warning("sources not synced after %.0fs (%s): ready anyway, serving "
                                "the pinned kernel state", READY_GRACE_SECONDS, ", ".join(down))
                else:  # every source answered; the first sync is still writing: wait for it
                    await self._ready.wait()
            self._settle_heap()  # ~10 ms: ready with the memory it will keep
            sdnotify.notify(f"READY=1\nSTATUS=serving {self.state.services} services")
            log.info("ready: %d services", self.state.services)
        finally:
            if gc.get_threshold() != GC_THRESHOLDS:  # cancelled before ready
                self._settle_heap()

    @staticmethod
    def _settle_heap() -> None:
        """After a bulk load: move the (long-lived) registry model out of the collector's
        view -- otherwise every full collection walks 10^5-10^6 objects and stalls a sync by
        ~50-100 ms (a gc.collect() first would stall the loop ~0.5 s; young collections have
        kept the garbage small) -- give freed memory back, full collections on again."""
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        from meshd.dataplane.libbpf import release_free_memory
        release_free_memory()

    def _apply_tc(self) -> None:
        """tc LB on cfg.tc.interfaces (detached from interfaces that left the list); none
        configured: detach whatever an earlier run attached here."""
        from meshd.dataplane import tc
        tcc = self.cfg.tc
        if tcc.interfaces:
            snat = tcc.snat_ports if tcc.mode == "snat" else None
            eph = node.ephemeral_ports()
            if snat and eph and snat[0] <= eph[1] and eph[0] <= snat[1]:
                log.warning("tc.snat_ports %d-%d overlaps this node's ephemeral ports %d-%d "
                            "(net.ipv4.ip_local_port_range): a node connection to a backend "
                            "could share a SNAT flow's tuple; move one of them", *snat, *eph)
            done = tc.attach_interfaces(self.cfg.bpffs, self.cfg.instance, tcc.interfaces,
                                        snat_ports=snat)
            log.info("tc LB (%s mode) on %s", tcc.mode, ", ".join(done))
        else:
            gone = tc.detach_interfaces(self.cfg.bpffs, self.cfg.instance)
            if gone:
                log.info("tc LB detached from %s (tc.interfaces is empty)", ", ".join(gone))

    def _apply_tc_logged(self) -> None:
        try:
            self._apply_tc()
        except MeshdError as e:
            log.error("reload: tc.interfaces not applied: %s", e)

    def _on_hup(self) -> None:
        log.info("SIGHUP: reloading config and services")
        try:
            new = load_config(self.config_path)
        except MeshdError as e:
            log.error("reload refused, keeping the running config: %s", e)
        else:
            changed = [k for k in RESTART_ONLY if getattr(new, k) != getattr(self.cfg, k)]
            if changed:
                log.error("reload: %s cannot change while running (restart meshd, or run "
                          "`meshd cleanup` first for maglev.table_size); other settings applied",
                          ", ".join(changed))
                new = new.model_copy(update={k: getattr(self.cfg, k) for k in RESTART_ONLY})
            if (new.services_file is None) != (self.cfg.services_file is None):
                log.error("reload: adding or removing services_file needs a restart")
                new = new.model_copy(update={"services_file": self.cfg.services_file})
            old_tc = self.cfg.tc
            self.cfg = new
            if new.tc != old_tc:
                asyncio.get_running_loop().run_in_executor(None, self._apply_tc_logged)
        self._file_sig = None  # re-read the file now
        self._file_poke.set()

    async def _watch_addresses(self) -> None:
        """A VIP may never be a node address; addresses change rarely, and reading them
        (`ip -j addr`) costs milliseconds, so not on every sync."""
        while True:
            await asyncio.sleep(ADDRESS_POLL_SECONDS)
            try:
                addrs = await asyncio.to_thread(node.local_addresses)
            except Exception as e:  # never let this task die
                log.warning("cannot read the node's addresses: %s", e)
                continue
            if addrs != self._local:
                self._local = addrs
                self._wake.set()  # node-port frontends follow
                tcc = self.cfg.tc
                if tcc.interfaces and tcc.mode == "snat":
                    from meshd.dataplane import tc
                    try:
                        await asyncio.to_thread(tc.refresh_addresses, self.cfg.bpffs,
                                                self.cfg.instance, tcc.interfaces)
                        log.info("tc SNAT source addresses re-read (node addresses changed)")
                    except MeshdError as e:
                        log.warning("tc SNAT source addresses not re-read: %s", e)

    async def _watchdog(self, interval: float) -> None:
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    # ---- sources ------------------------------------------------------------------------
    def _publish(self, name: str, services, errors) -> None:
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()
        st = self.sources[name]
        st.services, st.errors, st.synced, st.error = tuple(services), tuple(errors), True, None
        self._wake.set()

    def _stat_services_file(self) -> tuple | None:
        try:
            st = os.stat(self.cfg.services_file)
        except OSError:
            return ("missing",)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    async def _watch_file(self) -> None:
        while True:
            sig = self._stat_services_file()
            if sig != self._file_sig:
                self._file_sig = sig
                try:
                    snap = await asyncio.to_thread(load_services_file,
                                                   Path(self.cfg.services_file))
                    self._publish("file", snap.services, snap.errors)
                except RegistryError as e:
                    # Keep what the kernel holds: a broken file must not take services down.
                    log.error("services file not applied, kernel state kept: %s", e)
                    self.sources["file"].error = str(e)
                    self._write_status()
            try:
                await asyncio.wait_for(self._file_poke.wait(), FILE_POLL_SECONDS)
            except asyncio.TimeoutError:
                pass
            self._file_poke.clear()

    async def _start_embedded_etcd(self):
        etcd_cfg = self.cfg.etcd
        if etcd_cfg.endpoints:
            self.etcd_urls = list(etcd_cfg.endpoints)
            return None
        from meshd.sources.etcd_server import EmbeddedEtcd
        data = Path(self.cfg.state_dir) / self.cfg.instance / "etcd"
        server = EmbeddedEtcd(data, client_url=etcd_cfg.embedded_client_url,
                              peer_url=etcd_cfg.embedded_peer_url)
        await server.start()
        log.info("embedded etcd at %s (pid %s, data %s)", server.url, server.pid, data)
        self.etcd_urls = [server.url]
        return server

    async def _run_etcd(self) -> None:
        from meshd.sources.etcd import EtcdSource
        src = EtcdSource(self.cfg.etcd, endpoints=self.etcd_urls)

        async def emit(snap) -> None:
            self._publish("etcd", snap.services, snap.errors)

        async def monitor() -> None:
            """Shows a lost etcd in the status (and `meshd services`): the kernel keeps its
            state meanwhile, but an operator must see that it is not being updated."""
            while True:
                await asyncio.sleep(ETCD_MONITOR_SECONDS)
                st = self.sources["etcd"]
                err = None if src.connected else f"not connected ({src.last_error or 'connecting'})"
                if err != st.error:
                    if err:
                        log.warning("etcd: %s; serving the last synced state", err)
                    else:
                        log.info("etcd: connected again")
                    st.error = err
                    self._write_status()

        mon = asyncio.create_task(monitor(), name="etcd-monitor")
        try:
            await src.run(emit)
        finally:
            mon.cancel()

    # ---- one full sync ------------------------------------------------------------------
    async def _sync_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.sources and not all(s.synced or s.error for s in self.sources.values()):
                continue  # never apply a partial view: a service would vanish for a moment
            # shielded: a stop waits for the sync in flight (its libbpf calls run in a thread
            # that cancellation cannot stop) before the maps it writes are closed
            self._current_sync = asyncio.ensure_future(self.sync())
            await asyncio.shield(self._current_sync)
            if all(s.synced for s in self.sources.values()):
                self._ready.set()

    async def sync(self) -> None:
        assert self.reconciler is not None and self.maps is not None
        cfg = self.cfg
        if any(s.error and not s.synced for s in self.sources.values()):
            return  # a source was never read: applying the rest would drop its services
        services = [s for st in self.sources.values() for s in st.services]
        rejected = [e for st in self.sources.values() for e in st.errors]
        if self._local is None:
            self._local = await asyncio.to_thread(node.local_addresses)
        forbidden = self._local | etcd_hosts(self.etcd_urls)
        t0 = time.perf_counter()
        waited = time.monotonic() - self._dirty_since if self._dirty_since is not None else 0.0
        node_ports = node.node_ports(self._local, cfg.node_ports)
        groups, bad = self.desired.update(services, cfg.service_cidrs, forbidden, node_ports)
        t_valid = time.perf_counter()
        rejected += bad
        new_rejects = {(e.where, e.reason) for e in rejected}
        for e in rejected:
            if (e.where, e.reason) not in self._logged_rejects:
                log.warning("record skipped: %s: %s", e.where, e.reason)
        self._logged_rejects = new_rejects
        for key in self.desired.changed_services:
            s = self.desired.service(key)
            if s is not None and s.session_affinity == "ClientIP" and \
                    s.key not in self._warned_affinity:
                log.warning("%s: session_affinity ClientIP is not enforced yet; each socket "
                            "is balanced on its own", s.key)
                self._warned_affinity.add(s.key)
        hint = self.desired.changed_groups
        report = await asyncio.to_thread(self.reconciler.apply, groups,
                                         None if hint is None else set(hint))
        ms = (time.perf_counter() - t0) * 1e3
        ops = sum(report.ops.values())
        if log.isEnabledFor(logging.DEBUG):
            log.debug("sync stages: change->sync start %.1f ms, validate %.1f ms, %s, total "
                      "apply %.1f ms", waited * 1e3, (t_valid - t0) * 1e3,
                      ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in report.timings.items()),
                      (time.perf_counter() - t_valid) * 1e3)
        n_services = len(services) - len(bad)
        log.log(logging.INFO if ops or report.errors else logging.DEBUG,
                "sync: %d services, %d rejected, %d groups changed, %d map ops in %.1f ms%s",
                n_services, len(rejected), report.groups_changed, ops, ms,
                f", {len(report.errors)} errors" if report.errors else "")
        for what, err in report.errors.items():
            log.error("data plane: %s: %s", what, err)
        lag = time.monotonic() - self._dirty_since if self._dirty_since is not None else 0.0
        self._dirty_since = None
        self.control.record_sync(report.ops, errors=len(report.errors), rejected=len(rejected),
                                 lag_seconds=lag)
        self._record_fill()
        if report.ops.get("delete_name") or report.ops.get("delete_backend"):
            self._prune_due.set()  # ids are reused: their counters go, off the sync path
        if report.groups_changed > GC_FREEZE_AFTER and gc.get_threshold() == GC_THRESHOLDS:
            self._settle_heap()  # (the first sync's is done once ready)
        if report.removed:
            try:
                await asyncio.to_thread(sockdestroy.destroy_udp, self.maps.pin_dir,
                                        report.removed, cfg.cgroup)
            except MeshdError as e:
                log.warning("could not destroy UDP sockets of removed backends: %s", e)
        self.state = SyncState(time.time(), [{"where": e.where, "reason": e.reason}
                                             for e in rejected],
                               dict(report.errors), n_services, ops)
        self._write_status()

    def _record_fill(self) -> None:
        rec, maps = self.reconciler, self.maps
        if not self._max_entries:
            from meshd.dataplane import libbpf
            self._max_entries = {m.name: libbpf.map_info(m.fd, m.name).max_entries
                                 for m in (maps.svc, maps.backends, maps.maglev)}
        used = {maps.svc.name: len(rec.frontends), maps.backends.name: len(rec.backend_ids),
                maps.maglev.name: sum(1 for g in rec.groups.values() if g.has_table)}
        for name, n in used.items():
            self.control.set_map_fill(name, n, self._max_entries[name])

    async def _prune_loop(self) -> None:
        """Drops the counters of removed groups/backends, at most every PRUNE_DELAY seconds,
        so bursts of removals cost one pass and never delay a sync."""
        while True:
            await self._prune_due.wait()
            await asyncio.sleep(PRUNE_DELAY_SECONDS)
            self._prune_due.clear()
            rec = self.reconciler
            groups = {g.gid for g in rec.groups.values()}
            backends = set(rec.backend_ids.values())
            try:
                await asyncio.to_thread(self._prune_stats, groups, backends)
            except MeshdError as e:
                log.warning("metrics counters of removed services not pruned: %s", e)

    def _prune_stats(self, groups: set[int], backends: set[int]) -> None:
        mm = loader.open_metrics(self.cfg.bpffs, self.cfg.instance)
        try:
            mm.prune(groups, backends)
        finally:
            mm.close()

    def _write_status(self) -> None:
        path = status_path(self.cfg)
        doc = {"pid": os.getpid(), "synced_at": self.state.synced_at,
               "sources": {n: {"synced": s.synced, "error": s.error, "services": len(s.services)}
                           for n, s in self.sources.items()},
               "source_error": "; ".join(f"{n}: {s.error}" for n, s in self.sources.items()
                                         if s.error) or None,
               "etcd": self.etcd_urls, "services": self.state.services,
               "rejected": self.state.rejected, "errors": self.state.errors}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc, indent=1))
            tmp.replace(path)
        except OSError as e:
            log.warning("cannot write status file %s: %s", path, e)


def run(config_path: Path | None, log_level_set: bool = False) -> int:
    cfg = load_config(config_path)
    if not log_level_set:  # --log-level on the command line wins over the file
        logging.getLogger().setLevel(getattr(logging, cfg.log_level.upper(), logging.INFO))
    return asyncio.run(Daemon(config_path, cfg).run())
