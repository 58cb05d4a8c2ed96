"""`meshd run`: keep the kernel maps equal to the registry, until told to stop.

One asyncio task per concern: the services-file watch, the systemd watchdog, signals.
Blocking libbpf calls run in a worker thread. READY=1 goes to systemd after the first full
sync. SIGHUP re-reads the config and the services file. SIGTERM/SIGINT stop the daemon and
leave the pinned data plane serving; `meshd cleanup` removes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from meshd import node, sdnotify
from meshd.config import Config, load_config
from meshd.dataplane import loader
from meshd.dataplane.kernel import KernelDataplane
from meshd.desired import desired_groups
from meshd.errors import MeshdError, RegistryError
from meshd.model import check_services
from meshd.reconciler import Reconciler, Report
from meshd.sources.static import load_services_file

log = logging.getLogger("meshd.daemon")

FILE_POLL_SECONDS = 1.0
# Settings fixed for the life of the pinned data plane; a reload that changes them is refused.
RESTART_ONLY = ("instance", "bpffs", "cgroup", "maglev")


def status_path(cfg: Config) -> Path:
    return Path(cfg.state_dir) / cfg.instance / "status.json"


@dataclass
class SyncState:
    synced_at: float = 0.0
    rejected: list[dict] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    source_error: str | None = None
    services: int = 0
    last_report: Report | None = None


class Daemon:
    def __init__(self, config_path: Path | None, cfg: Config):
        self.config_path = config_path
        self.cfg = cfg
        self.state = SyncState()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._file_sig: tuple | None = None
        self.reconciler: Reconciler | None = None
        self._warned_etcd = False
        self._warned_affinity: set[str] = set()

    # ---- life ---------------------------------------------------------------------------
    async def run(self) -> int:
        cfg = self.cfg
        maps = await asyncio.to_thread(loader.load, cfg.bpffs, cfg.instance, cfg.cgroup,
                                       cfg.maglev.table_size)
        try:
            dp = KernelDataplane(maps)
            self.reconciler = Reconciler(dp)
            self.reconciler.adopt(await asyncio.to_thread(dp.snapshot))
            await self.sync("startup")
            sdnotify.notify(f"READY=1\nSTATUS=serving {self.state.services} services")
            log.info("ready: %d services from %s", self.state.services, self._source_name())
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, self._on_hup)
            tasks = [asyncio.create_task(self._watch_file(), name="watch-file"),
                     asyncio.create_task(self._sync_loop(), name="sync")]
            wd = sdnotify.watchdog_interval()
            if wd:
                tasks.append(asyncio.create_task(self._watchdog(wd), name="watchdog"))
            await self._stop.wait()
            sdnotify.notify("STOPPING=1")
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            log.info("stopped; the pinned data plane at %s keeps serving (`meshd cleanup` "
                     "removes it)", maps.pin_dir)
            return 0
        finally:
            maps.close()

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
            self.cfg = new
        self._file_sig = None
        self._wake.set()

    async def _sync_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.sync("change")

    async def _watch_file(self) -> None:
        while True:
            await asyncio.sleep(FILE_POLL_SECONDS)
            sig = self._stat_services_file()
            if sig != self._file_sig:
                log.info("services file changed")
                self._wake.set()

    async def _watchdog(self, interval: float) -> None:
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    # ---- one full sync ------------------------------------------------------------------
    def _source_name(self) -> str:
        return str(self.cfg.services_file) if self.cfg.services_file else "no source"

    def _stat_services_file(self) -> tuple | None:
        if not self.cfg.services_file:
            return None
        try:
            st = os.stat(self.cfg.services_file)
        except OSError:
            return ("missing",)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    async def sync(self, why: str) -> None:
        assert self.reconciler is not None
        cfg = self.cfg
        self._file_sig = self._stat_services_file()
        rejected: list[dict] = []
        if cfg.services_file is None:
            log.warning("no services_file configured: nothing to serve")
            services = []
        else:
            try:
                snap = await asyncio.to_thread(load_services_file, Path(cfg.services_file))
            except RegistryError as e:
                # Keep what the kernel holds: a broken file must not take every service down.
                log.error("services file not applied, kernel state kept: %s", e)
                self.state.source_error = str(e)
                self._write_status()
                return
            services = list(snap.services)
            rejected += [{"where": e.where, "reason": e.reason} for e in snap.errors]
        if cfg.etcd is not None and not self._warned_etcd:
            log.warning("etcd: this version of meshd does not read etcd yet; serving "
                        "services_file only")
            self._warned_etcd = True
        for s in services:
            if s.session_affinity == "ClientIP" and s.key not in self._warned_affinity:
                log.warning("%s: session_affinity ClientIP is not enforced yet; each socket "
                            "is balanced on its own", s.key)
                self._warned_affinity.add(s.key)
        forbidden = await asyncio.to_thread(node.local_addresses)
        good, bad = check_services(services, cfg.service_cidrs, forbidden)
        rejected += [{"where": e.where, "reason": e.reason} for e in bad]
        for r in rejected:
            log.warning("record skipped: %s: %s", r["where"], r["reason"])
        t0 = time.perf_counter()
        report = await asyncio.to_thread(self.reconciler.apply, desired_groups(good))
        ms = (time.perf_counter() - t0) * 1e3
        log.info("sync (%s): %d services, %d rejected, %d map ops in %.1f ms%s", why, len(good),
                 len(rejected), sum(report.ops.values()), ms,
                 f", {len(report.errors)} errors" if report.errors else "")
        for what, err in report.errors.items():
            log.error("data plane: %s: %s", what, err)
        self.state = SyncState(time.time(), rejected, dict(report.errors), None, len(good), report)
        self._write_status()

    def _write_status(self) -> None:
        path = status_path(self.cfg)
        doc = {"pid": os.getpid(), "synced_at": self.state.synced_at,
               "source": self._source_name(), "source_error": self.state.source_error,
               "services": self.state.services, "rejected": self.state.rejected,
               "errors": self.state.errors}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc, indent=1))
            tmp.replace(path)
        except OSError as e:
            log.warning("cannot write status file %s: %s", path, e)


def run(config_path: Path | None) -> int:
    cfg = load_config(config_path)
    return asyncio.run(Daemon(config_path, cfg).run())
