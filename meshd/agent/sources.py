"""The registry sources of a running daemon: the services file and etcd.

Each source publishes its latest full snapshot into `Sources` and wakes the sync loop; the
sync loop never applies a partial view (a source not yet read would make its services
vanish for a moment). A source that cannot be read now keeps its last snapshot (the kernel
keeps serving it) and shows the reason in `error` (status file, `meshd_source_up`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from meshd.errors import RecordError, RegistryError
from meshd.model import Service
from meshd.records import Policy
from meshd.sources.static import load_services_file

log = logging.getLogger("meshd.daemon")

FILE_POLL_SECONDS = 1.0
ETCD_MONITOR_SECONDS = 1.0


@dataclass
class SourceState:
    services: tuple[Service, ...] = ()
    errors: tuple[RecordError, ...] = ()
    policies: tuple[Policy, ...] = ()  # authorization policies (file, etcd; Kubernetes: none)
    synced: bool = False  # delivered at least one full snapshot
    error: str | None = None  # the source cannot be read now (its last snapshot is kept)
    triggers: list = field(default_factory=list)  # change times not yet in the kernel
    # service key -> service for the only services that changed since the last sync took
    # them (Sources.take_updates); None: unknown (a full pass compares every service)
    updates: dict | None = None

    @property
    def up(self) -> bool:
        return self.synced and self.error is None


class Sources(dict):
    """name -> SourceState, plus the event that wakes the sync loop."""

    def __init__(self) -> None:
        super().__init__()
        self.wake = asyncio.Event()
        self.dirty_since: float | None = None  # first change not yet in the kernel
        self.on_change = lambda: None  # status file refresh (set by the daemon)

    def publish(self, name: str, services, errors, triggers=(), policies=(),
                updates: dict | None = None) -> None:
        """A source's new snapshot. `updates`: service key -> service of the only services
        that may differ from its previous snapshot (None: unknown)."""
        if self.dirty_since is None:
            self.dirty_since = time.monotonic()
        st = self[name]
        st.triggers.extend(triggers)
        st.services, st.errors, st.synced, st.error = tuple(services), tuple(errors), True, None
        st.policies = tuple(policies)
        if updates is None or st.updates is None:
            st.updates = None
        else:
            st.updates.update(updates)
        self.wake.set()

    def take_updates(self) -> dict | None:
        """What changed since the last call, as service key -> service, if that is known
        and one source alone has services (several may define one key: only a full pass
        decides between them); None: compare everything. Either way the next call starts
        from now."""
        states = list(self.values())
        out: dict | None = None
        if all(st.updates is not None for st in states) and \
                sum(1 for st in states if st.services) <= 1:
            out = {}
            for st in states:
                out.update(st.updates)
        for st in states:
            st.updates = {}
        return out

    def forget_updates(self) -> None:
        """A sync failed after taking the updates: the next one compares everything."""
        for st in self.values():
            st.updates = None

    def set_error(self, name: str, error: str | None) -> None:
        if self[name].error != error:
            self[name].error = error
            self.on_change()

    def unread(self) -> list[str]:
        return [n for n, s in self.items() if not s.synced]



class FileFeed:
    """Polls the services file (inode, size, mtime) and re-reads it on change or poke()."""

    def __init__(self, sources: Sources, path_of):
        self.sources = sources
        self.path_of = path_of  # () -> Path: the reloaded config's path
        self._sig: tuple | None = None
        self._poke = asyncio.Event()
        sources["file"] = SourceState()

    def poke(self) -> None:
        self._sig = None
        self._poke.set()

    def _stat(self, path: Path) -> tuple:
        try:
            st = os.stat(path)
        except OSError:
            return ("missing",)
        return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)

    async def run(self) -> None:
        while True:
            path = Path(self.path_of())
            sig = self._stat(path)
            if sig != self._sig:
                self._sig = sig
                try:
                    snap = await asyncio.to_thread(load_services_file, path)
                    self.sources.publish("file", snap.services, snap.errors, policies=snap.policies)
                except BaseException as e:
                    if not isinstance(e, RegistryError):
                        self._sig = None  # read again when the supervisor restarts us
                        raise
                    # Keep what the kernel holds: a broken file must not take services down.
                    log.error("services file not applied, kernel state kept: %s", e)
                    self.sources.set_error("file", str(e))
            try:
                await asyncio.wait_for(self._poke.wait(), FILE_POLL_SECONDS)
            except asyncio.TimeoutError:
                pass
            self._poke.clear()


def _monitor(sources: Sources, name: str, src):
    """Shows a lost source in `error` (status, meshd_source_up); connecting or listing (no
    error yet) is progress, not an outage: READY waits for it."""
    async def run() -> None:
        while True:
            await asyncio.sleep(ETCD_MONITOR_SECONDS)
            err = None if src.connected or src.last_error is None else \
                f"not connected ({src.last_error})"
            if err != sources[name].error:
                if err:
                    log.warning("%s: %s; serving the last synced state", name, err)
                else:
                    log.info("%s: connected", name)
                sources.set_error(name, err)
    return run()


class KubernetesFeed:
    """Follows Services, EndpointSlices and this node's Node (meshd.sources.kubernetes).
    The node's zone comes from its Node object unless node.zone is set (`on_zone`)."""

    def __init__(self, sources: Sources, cfg, on_zone):
        self.sources, self.cfg, self.on_zone = sources, cfg, on_zone
        sources["kubernetes"] = SourceState()

    async def run(self) -> None:
        from meshd.sources.kubernetes import KubernetesSource
        src = KubernetesSource(self.cfg.kubernetes, node_name=self.cfg.node.name,
                               on_node=self.on_zone)

        async def emit(snap) -> None:
            self.sources.publish("kubernetes", snap.services, snap.errors, snap.triggers)

        mon = asyncio.create_task(_monitor(self.sources, "kubernetes", src), name="k8s-monitor")
        try:
            await src.run(emit)
        finally:
            mon.cancel()


class EtcdFeed:
    """Follows etcd (meshd.sources.etcd.EtcdSource) and shows a lost connection in `error`."""

    def __init__(self, sources: Sources, etcd_cfg, urls: list[str]):
        self.sources = sources
        self.cfg, self.urls = etcd_cfg, urls
        sources["etcd"] = SourceState()

    async def run(self) -> None:
        from meshd.sources.etcd import EtcdSource
        src = EtcdSource(self.cfg, endpoints=self.urls)

        async def emit(snap) -> None:
            self.sources.publish("etcd", snap.services, snap.errors, policies=snap.policies,
                                 updates=snap.updates)

        mon = asyncio.create_task(_monitor(self.sources, "etcd", src), name="etcd-monitor")
        try:
            await src.run(emit)
        finally:
            mon.cancel()
