"""The sync loop: merged source snapshots -> desired state -> reconciler -> kernel maps.

Every failure of a sync is logged with its stage, counted (`meshd_sync_errors_total{stage}`)
and retried with backoff; after an exception the next sync diffs every group (the change
hints of the failed one are gone). Data-plane errors the reconciler reports (a full map,
EPERM) are retried the same way; they are the data's problem, not a stuck daemon, so they
do not stop the watchdog. Counter pruning runs in this loop too, between syncs, so it never
sees the reconciler's state while a worker thread changes it.

Test hook: MESHD_FAULT_SYNC_ERRORS=N makes the first N syncs raise in the apply stage (the
fault suite injects real exceptions into a real daemon with it).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from dataclasses import dataclass, field

from meshd import node
from meshd.agent.supervise import Backoff
from meshd.dataplane import loader, sockdestroy
from meshd.agent.policies import PolicyState
from meshd.desired import DesiredState, NodeInfo

log = logging.getLogger("meshd.daemon")

PRUNE_DELAY_SECONDS = 2.0
DRAIN_CHECK_SECONDS = 5.0  # while backends drain: how often the tc conntrack map is walked
GC_THRESHOLDS = gc.get_threshold()  # the interpreter's own (700, 10, 10)
GC_FREEZE_AFTER = 500  # groups changed in one sync: freeze the heap afterwards
FAULT_ENV = "MESHD_FAULT_SYNC_ERRORS"


def node_info(cfg, zone: str | None = None) -> NodeInfo:
    """This node as selection sees it: node.zone from the config wins over `zone` (the
    Kubernetes Node object's)."""
    return NodeInfo(cfg.node.name, cfg.node.zone if cfg.node.zone is not None else zone)


class InjectedFault(RuntimeError):
    pass


@dataclass
class SyncResult:
    synced_at: float = 0.0
    rejected: list[dict] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    services: int = 0
    ops: int = 0


def settle_heap() -> None:
    """After a bulk load: move the (long-lived) registry model out of the collector's view --
    otherwise every full collection walks 10^5-10^6 objects and stalls a sync by ~50-100 ms --
    give freed memory back, full collections on again."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    from meshd.dataplane.libbpf import release_free_memory
    release_free_memory()


class Syncer:
    def __init__(self, ctx):
        self.ctx = ctx  # meshd.daemon.Daemon: cfg, sources, reconciler, maps, control, ...
        self.desired = DesiredState()
        self.policies = PolicyState()  # the daemon sets its cgroup root
        self.result = SyncResult()
        self.backoff = Backoff(0.5, 30.0)
        self.current: asyncio.Future | None = None  # the sync in flight (stop waits for it)
        self.stage = "idle"
        self._retry_at: float | None = None  # after an exception: the next attempt, no earlier
        self._again_at: float | None = None  # data-plane errors left: try again (wakes pass)
        self._again = Backoff(1.0, 30.0)
        self._logged_dp: set[tuple[str, str]] = set()  # data-plane errors already logged
        self._prune_at: float | None = None
        self._full_next = False  # after an exception: diff every group
        self._doomed: set = set()  # removed UDP backends whose sockets are still to destroy
        self._logged_rejects: set[tuple[str, str]] = set()
        self._faults = int(os.environ.get(FAULT_ENV, "0") or 0)
        self._stats_due = False  # counters of removed ids wait for the next prune

    # ---- the loop -----------------------------------------------------------------------
    async def run(self) -> None:
        wake = self.ctx.sources.wake
        while True:
            await self._wait(wake)
            now = time.monotonic()
            if self._prune_at is not None and now >= self._prune_at:
                await self._prune()
            if self._retry_at is not None:  # after an exception: nothing before the backoff
                if now < self._retry_at:
                    continue
                self._retry_at = None
            elif self._again_at is not None and now >= self._again_at:
                self._again_at = None  # data-plane errors / UDP sockets left: try again
            elif not wake.is_set():
                continue
            wake.clear()
            if self.ctx.sources.unread():
                continue  # never apply a partial view: a service would vanish for a moment
            self.current = asyncio.ensure_future(self._attempt())
            # shielded: a stop waits for the sync in flight (its libbpf calls run in a thread
            # that cancellation cannot stop) before the maps it writes are closed
            await asyncio.shield(self.current)

    async def _wait(self, wake: asyncio.Event) -> None:
        timers = [t for t in (self._retry_at, self._again_at, self._prune_at) if t is not None]
        if self._retry_at is None and wake.is_set():
            return
        timeout = max(0.0, min(timers) - time.monotonic()) if timers else None
        if self._retry_at is not None:  # backing off after an exception: changes wait
            await asyncio.sleep(timeout)
            return
        try:  # data-plane retries and pruning wait on a timer; changes go through at once
            await asyncio.wait_for(wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _attempt(self) -> None:
        progress, control = self.ctx.progress, self.ctx.control
        progress.begin()
        try:
            errors = await self.sync()
        except Exception as e:
            stage = self.stage
            log.error("sync failed in stage %s: %s: %s; retrying in %.1fs", stage,
                      type(e).__name__, e, self._schedule_retry(),
                      exc_info=not isinstance(e, InjectedFault))
            control.count_sync_error(stage)
            self._full_next = True
            if stage in ("addresses", "validate"):
                # DesiredState may be half-updated (it took the new services, then failed):
                # its next update would see "no change" and hand back stale groups
                self.desired = DesiredState()
            progress.failed(f"{stage}: {type(e).__name__}: {e}")
            self.ctx.write_status()
            return
        finally:
            self.stage = "idle"
        self.backoff.reset()  # the sync ran: what is left is data, retried on a timer
        progress.succeeded()
        try:
            await self.ctx.after_sync()
        except Exception as e:  # never the sync's failure: the kernel holds the new state
            control.count_sync_error("healthcheck")
            log.error("after the sync: %s: %s", type(e).__name__, e)
        self.ctx.write_status()
        if errors or self._doomed:
            self._again_at = self._again_at or time.monotonic() + self._again.next()
        else:
            self._again.reset()
        if not self.ctx.sources.unread():
            progress.ready.set()

    def _schedule_retry(self) -> float:
        delay = self.backoff.next()
        self._retry_at = time.monotonic() + delay
        return delay

    # ---- one sync -----------------------------------------------------------------------
    async def sync(self) -> int:
        """One pass over every source's snapshot (the loop runs it only once each has been
        read); returns the number of data-plane errors left (retried later)."""
        ctx = self.ctx
        cfg, sources = ctx.cfg, ctx.sources
        triggers = [t for st in sources.values() for t in st.triggers]
        for st in sources.values():
            st.triggers.clear()
        try:
            return await self._sync(ctx, cfg, sources, triggers)
        except BaseException:
            if triggers:  # measured by the sync that gets them into the kernel
                sources[next(iter(sources))].triggers.extend(triggers)
            sources.forget_updates()  # the next sync compares every service
            raise

    async def _sync(self, ctx, cfg, sources, triggers: list[float]) -> int:
        # what changed since the last sync, when the sources know (etcd); the full list
        # only if it is needed (a pass over every service: ~3 ms at 10,000)
        updates = sources.take_updates()
        snapshot = tuple(st.services for st in sources.values())

        def services() -> list:
            return [s for svcs in snapshot for s in svcs]
        rejected = [e for st in sources.values() for e in st.errors]
        self.stage = "addresses"
        if ctx.local is None:
            ctx.local = await asyncio.to_thread(node.local_addresses)
        forbidden = ctx.local | ctx.etcd_addresses()
        t0 = time.perf_counter()
        dirty = sources.dirty_since
        self.stage = "validate"
        node_ports = node.node_ports(ctx.local, cfg.node_ports)
        # a thread: at 10,000 services a cold validation takes ~1.5 s, which must not stall
        # the loop (watchdog, healthz, the sources' streams); only this loop uses `desired`
        groups, bad = await asyncio.to_thread(
            self.desired.update, services, cfg.service_cidrs, forbidden, node_ports,
            node_info(cfg, getattr(ctx, "node_zone", None)), cfg.external_ip_cidrs, updates)
        t_valid = time.perf_counter()
        rejected += bad
        self._log_rejects(rejected)
        hint = None if self._full_next else self.desired.changed_groups
        self.stage = "policy"
        policies = tuple(p for st in sources.values() for p in getattr(st, "policies", ()))
        if self.policies.needed(policies):  # (the compile can take a while: a thread)
            groups, hint = await asyncio.to_thread(
                self.policies.overlay, groups, hint, self.desired, policies,
                self.policies.snapshot(), getattr(ctx.reconciler, "verdicts", None))
        else:
            self.policies.overlay(groups, hint, self.desired, policies, None,
                                  getattr(ctx.reconciler, "verdicts", None))
        self.stage = "apply"
        report = await asyncio.to_thread(self._apply, groups,
                                         None if hint is None else set(hint))
        self._full_next = False
        self._doomed |= set(report.removed)
        self.stage = "record"
        ms = (time.perf_counter() - t0) * 1e3
        ops = sum(report.ops.values())
        if log.isEnabledFor(logging.DEBUG):
            log.debug("sync stages: validate %.1f ms, %s, total apply %.1f ms",
                      (t_valid - t0) * 1e3,
                      ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in report.timings.items()),
                      (time.perf_counter() - t_valid) * 1e3)
        n_services = self.desired.served
        log.log(logging.INFO if ops or report.errors else logging.DEBUG,
                "sync: %d services, %d rejected, %d groups changed, %d map ops in %.1f ms%s",
                n_services, len(rejected), report.groups_changed, ops, ms,
                f", {len(report.errors)} errors" if report.errors else "")
        errs = set(report.errors.items())
        for what, err in sorted(errs - self._logged_dp):  # each once, not on every retry
            log.error("data plane: %s: %s", what, err)
        new_errors = len(errs - self._logged_dp)
        self._logged_dp = errs
        lag = time.monotonic() - dirty if dirty is not None else 0.0
        if sources.dirty_since == dirty:
            sources.dirty_since = None
        ctx.control.record_sync(report.ops, errors=new_errors, rejected=len(rejected),
                                lag_seconds=lag)
        if triggers:
            now = time.time()
            ctx.control.observe_programming([now - t for t in triggers])
        ctx.record_fill()
        if report.ops.get("delete_name") or report.ops.get("delete_backend"):
            # ids are reused: their counters go, off the sync path
            self._prune_at = self._prune_at or time.monotonic() + PRUNE_DELAY_SECONDS
            self._stats_due = True
        elif ctx.reconciler.draining:  # removed backends wait for their tc flows
            self._prune_at = self._prune_at or time.monotonic() + DRAIN_CHECK_SECONDS
        if report.groups_changed > GC_FREEZE_AFTER and gc.get_threshold() == GC_THRESHOLDS:
            settle_heap()  # (the first sync's is done once ready)
        self.result = SyncResult(time.time(), [{"where": e.where, "reason": e.reason}
                                               for e in rejected],
                                 dict(report.errors), n_services, ops)
        if self._doomed:
            self.stage = "sockdestroy"
            await self._destroy_udp()
        return len(report.errors)

    def _apply(self, groups, hint):
        if self._faults > 0:
            self._faults -= 1
            raise InjectedFault(f"injected by {FAULT_ENV} ({self._faults} more)")
        return self.ctx.reconciler.apply(groups, hint)

    async def _destroy_udp(self) -> None:
        """Connected UDP sockets still aimed at removed backends; a failure is counted and
        the same backends are tried again after the next sync."""
        doomed, self._doomed = self._doomed, set()
        try:
            await asyncio.to_thread(sockdestroy.destroy_udp, self.ctx.maps.pin_dir, doomed,
                                    self.ctx.cfg.cgroup)
        except Exception as e:
            self._doomed |= doomed
            self.ctx.control.count_sync_error("sockdestroy")
            log.warning("could not destroy UDP sockets of %d removed backends (retried after "
                        "the next sync): %s: %s", len(doomed), type(e).__name__, e)

    def _log_rejects(self, rejected) -> None:
        new = {(e.where, e.reason) for e in rejected}
        for e in rejected:
            if (e.where, e.reason) not in self._logged_rejects:
                log.warning("record skipped: %s: %s", e.where, e.reason)
        self._logged_rejects = new

    # ---- counters of removed groups/backends --------------------------------------------
    async def _prune(self) -> None:
        """Between syncs (this loop owns the reconciler's state now): the live ids are read
        here, the map walk runs in a thread."""
        self._prune_at = None
        rec = self.ctx.reconciler
        if rec.draining:
            try:
                if await asyncio.to_thread(rec.collect_drained):
                    self._stats_due = True
            except Exception as e:
                self.ctx.control.count_sync_error("drain")
                log.warning("draining backends not collected: %s: %s", type(e).__name__, e)
            if rec.draining:
                self._prune_at = time.monotonic() + DRAIN_CHECK_SECONDS
        if not self._stats_due:
            return
        self._stats_due = False
        groups = {g.gid for g in rec.groups.values()}
        backends = set(rec.backend_ids.values())
        try:
            await asyncio.to_thread(self._prune_stats, groups, backends)
        except Exception as e:
            self.ctx.control.count_sync_error("prune")
            log.warning("metrics counters of removed services not pruned: %s: %s",
                        type(e).__name__, e)

    def _prune_stats(self, groups: set[int], backends: set[int]) -> None:
        cfg = self.ctx.cfg
        mm = loader.open_metrics(cfg.bpffs, cfg.instance)
        try:
            mm.prune(groups, backends)
        finally:
            mm.close()
        from meshd.dataplane.policy_maps import PolicyMaps
        with PolicyMaps(cfg.bpffs, cfg.instance) as pm:
            pm.prune_denied(groups)  # denial counters of removed groups (ids are reused)
