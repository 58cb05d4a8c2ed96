"""The data plane's footing: its bpffs pins and its cgroup, checked every GUARD_SECONDS.

- Pins removed behind the daemon's back (`rm -r <bpffs>/meshd/<instance>`): the daemon holds
  every pinned map and cgroup link open by fd, so nothing detaches and nothing is lost; the
  pins are restored from those fds (logged as an error, counted in
  `meshd_pins_restored_total`).
- The cgroup removed: the hooks then serve no process. Logged as an error, shown in the
  status file and `meshd services` (`dataplane_error`), `meshd_dataplane_attached` 0. When
  the path is a cgroup again (a new one), the programs are attached to it.
"""

from __future__ import annotations

import asyncio
import logging

from meshd.dataplane import loader

log = logging.getLogger("meshd.daemon")

GUARD_SECONDS = 2.0


async def guard(ctx) -> None:
    while True:
        await asyncio.sleep(GUARD_SECONDS)
        await check_once(ctx)


async def check_once(ctx) -> None:
    maps, cg = ctx.maps, ctx.cfg.cgroup
    restored = await asyncio.to_thread(maps.restore_pins)
    if restored:
        ctx.control.count_pins_restored(len(restored))
        log.error("%d pins under %s were removed behind the daemon's back (%s); restored "
                  "from the objects meshd holds open: nothing was detached", len(restored),
                  maps.pin_dir, ", ".join(sorted(restored)))
    try:
        now = loader.cgroup_id(cg) if (cg / "cgroup.procs").exists() else None
    except OSError:
        now = None
    if now is None:
        if ctx.dataplane_error is None:
            ctx.dataplane_error = (f"cgroup {cg} was removed: the socket LB serves no process "
                                   "until it is back (make it again, or fix `cgroup:` and "
                                   "restart meshd); meshd attaches to it when it returns")
            ctx.control.set_attached(False)
            log.error("%s", ctx.dataplane_error)
            ctx.write_status()
    elif now != maps.cgroup_id:
        await asyncio.to_thread(ctx.reattach)
        ctx.dataplane_error = None
        ctx.control.set_attached(True)
        log.info("cgroup %s is a cgroup again (id %d): socket LB attached to it", cg, now)
        ctx.write_status()
