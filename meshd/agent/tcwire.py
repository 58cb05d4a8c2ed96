"""The tc LB on the configured interfaces, and the watch on the node's own addresses (a VIP may
never be one; node-port frontends and SNAT source addresses follow them)."""

from __future__ import annotations

import asyncio
import logging

from meshd import node
from meshd.errors import MeshdError

log = logging.getLogger("meshd.daemon")

ADDRESS_POLL_SECONDS = 10.0


def apply_tc(cfg) -> None:
    """tc LB on cfg.tc.interfaces (detached from interfaces that left the list); none
    configured: detach whatever an earlier run attached here. Raises MeshdError."""
    from meshd.dataplane import tc
    tcc = cfg.tc
    if tcc.interfaces:
        snat = tcc.snat_ports if tcc.mode == "snat" else None
        eph = node.ephemeral_ports()
        if snat and eph and snat[0] <= eph[1] and eph[0] <= snat[1]:
            log.warning("tc.snat_ports %d-%d overlaps this node's ephemeral ports %d-%d "
                        "(net.ipv4.ip_local_port_range): a node connection to a backend "
                        "could share a SNAT flow's tuple; move one of them", *snat, *eph)
        done = tc.attach_interfaces(cfg.bpffs, cfg.instance, tcc.interfaces, snat_ports=snat)
        log.info("tc LB (%s mode) on %s", tcc.mode, ", ".join(done))
    else:
        gone = tc.detach_interfaces(cfg.bpffs, cfg.instance)
        if gone:
            log.info("tc LB detached from %s (tc.interfaces is empty)", ", ".join(gone))


async def watch_addresses(ctx) -> None:
    """Re-reads the node's addresses every ADDRESS_POLL_SECONDS (`ip -j addr` costs
    milliseconds, so not on every sync); a change wakes the sync loop."""
    stale = False  # the SNAT addresses could not be re-read after the last change
    while True:
        await asyncio.sleep(ADDRESS_POLL_SECONDS)
        try:
            addrs = await asyncio.to_thread(node.local_addresses)
        except Exception as e:
            ctx.control.count_sync_error("addresses")
            log.warning("cannot read the node's addresses: %s: %s", type(e).__name__, e)
            continue
        if addrs == ctx.local and not stale:
            continue
        if addrs != ctx.local:
            ctx.local = addrs
            ctx.sources.wake.set()
        tcc = ctx.cfg.tc
        stale = False
        if tcc.interfaces and tcc.mode == "snat":
            from meshd.dataplane import tc
            try:
                await asyncio.to_thread(tc.refresh_addresses, ctx.cfg.bpffs, ctx.cfg.instance,
                                        tcc.interfaces)
                log.info("tc SNAT source addresses re-read (node addresses changed)")
            except MeshdError as e:
                stale = True  # tried again at the next poll, changed or not
                log.warning("tc SNAT source addresses not re-read (tried again in %.0fs): %s",
                            ADDRESS_POLL_SECONDS, e)
