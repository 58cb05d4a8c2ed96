"""Supervision of the daemon's long-lived tasks, and the backoff they share.

A task that raises is logged with its traceback, counted (`meshd_task_failures_total{task}`)
and started again after a backoff that doubles up to a ceiling; one that runs well for a
while starts from the floor again. Only cancellation (the daemon stopping) ends it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("meshd.daemon")


class Backoff:
    """Delays of 'retry after a failure': floor, 2x floor, ... up to ceiling; reset() after a
    success."""

    def __init__(self, floor: float = 0.5, ceiling: float = 30.0):
        self.floor, self.ceiling = floor, ceiling
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        return min(self.ceiling, self.floor * 2 ** (self.failures - 1))

    def reset(self) -> None:
        self.failures = 0


HEALTHY_RUN_SECONDS = 60.0  # a task that ran this long before failing starts from the floor


async def supervise(name: str, factory: Callable[[], Awaitable[None]],
                    on_failure: Callable[[str], None] | None = None,
                    backoff: Backoff | None = None) -> None:
    """Run `factory()` until cancelled; restart it with backoff whenever it raises or
    returns (a loop that returns has ended: that is a failure too)."""
    backoff = backoff or Backoff()
    while True:
        started = time.monotonic()
        try:
            await factory()
            log.error("task %s ended on its own; restarting it", name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("task %s failed; restarting it", name)
        if on_failure is not None:
            on_failure(name)
        if time.monotonic() - started > HEALTHY_RUN_SECONDS:
            backoff.reset()
        await asyncio.sleep(backoff.next())
