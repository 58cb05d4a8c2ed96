"""Is the daemon making progress? READY for systemd, the watchdog, and liveness figures.

READY=1 means "installed": sent after the first successful sync of every source. A source
that cannot be reached (etcd down, a broken services file) does not hold READY back for
ever: after sync.ready_grace_seconds the daemon is ready with the pinned kernel state, and says
so. A source that is reachable and still reading (a large file, a long etcd list) does hold
it back; systemd's TimeoutStartSec is the user's limit (systemd/meshd.service).

The watchdog pings only while syncs make progress: the sync loop is not failing for longer
than sync.stuck_after_seconds, and no single sync runs longer than SYNC_HANG_SECONDS. Otherwise
systemd (WatchdogSec) restarts the daemon; the pinned data plane keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from meshd import sdnotify

log = logging.getLogger("meshd.daemon")

READY_GRACE_SECONDS = 20.0  # defaults of config sync.ready_grace_seconds,
STUCK_AFTER_SECONDS = 60.0  # and sync.stuck_after_seconds
SYNC_HANG_SECONDS = 600.0  # one sync running this long is hung (a cold sync takes seconds)


class Progress:
    """What the sync loop reports; read by the watchdog, the exporter and the status file."""

    def __init__(self, stuck_after: float = STUCK_AFTER_SECONDS,
                 ready_grace: float = READY_GRACE_SECONDS) -> None:
        self.stuck_after, self.ready_grace = stuck_after, ready_grace
        self.started = time.time()
        self.last_ok: float | None = None  # unix time the last successful sync ended
        self.failing_since: float | None = None  # monotonic, first failure of the current run
        self.last_failure: str | None = None
        self.inflight_since: float | None = None  # monotonic
        self.ready = asyncio.Event()  # first successful sync with every source read

    def begin(self) -> None:
        self.inflight_since = time.monotonic()

    def succeeded(self) -> None:
        self.inflight_since = None
        self.failing_since = None
        self.last_failure = None
        self.last_ok = time.time()

    def failed(self, why: str) -> None:
        self.inflight_since = None
        self.last_failure = why
        if self.failing_since is None:
            self.failing_since = time.monotonic()

    def age(self) -> float:
        """Seconds since the last successful sync (since the start before the first one)."""
        return time.time() - (self.last_ok if self.last_ok is not None else self.started)

    def stuck(self, now: float | None = None) -> str | None:
        """Why the daemon is not making progress, or None."""
        now = time.monotonic() if now is None else now
        if self.failing_since is not None and now - self.failing_since > self.stuck_after:
            return (f"syncs have failed for {now - self.failing_since:.0f}s "
                    f"(last: {self.last_failure})")
        if self.inflight_since is not None and now - self.inflight_since > SYNC_HANG_SECONDS:
            return f"a sync has been running for {now - self.inflight_since:.0f}s"
        return None


async def watchdog(progress: Progress, interval: float) -> None:
    """WATCHDOG=1 every `interval` while progress is made; silent (so systemd restarts us)
    while stuck."""
    silent = False
    while True:
        why = progress.stuck()
        if why is None:
            if silent:
                log.info("syncs progress again: watchdog pings resumed")
                silent = False
            sdnotify.notify("WATCHDOG=1")
        elif not silent:
            log.error("%s: watchdog pings stopped, so systemd restarts the daemon "
                      "(the pinned data plane keeps serving)", why)
            silent = True
        await asyncio.sleep(interval)


async def announce_ready(progress: Progress, sources, count: Callable[[], int],
                         settle: Callable[[], None] = lambda: None) -> None:
    """READY=1 once the first full sync is in; after the grace time also when every source
    still unread is unreachable (then the pinned kernel state is what is served). `settle`
    runs just before: READY goes out with the memory the daemon keeps."""
    deadline = time.monotonic() + progress.ready_grace
    while not progress.ready.is_set():
        try:
            await asyncio.wait_for(progress.ready.wait(), 1.0)
        except asyncio.TimeoutError:
            pass
        if progress.ready.is_set() or time.monotonic() < deadline:
            continue
        unread = sources.unread()
        if unread and all(sources[n].error for n in unread):
            log.warning("sources not read after %.0fs (%s): ready anyway, serving the pinned "
                        "kernel state", progress.ready_grace,
                        "; ".join(f"{n}: {sources[n].error}" for n in unread))
            break
    settle()
    n = count()
    sdnotify.notify(f"READY=1\nSTATUS=serving {n} services")
    log.info("ready: %d services", n)
