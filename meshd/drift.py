"""Desired state read fresh from the sources, for comparison with the kernel (`meshd services`).

Uses the daemon's own path (sources -> DesiredState), so "desired" means exactly what a
running daemon would write; a difference from the kernel maps is drift: a daemon that is
down, behind, or failing to write (see its errors).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from meshd.config import Config
from meshd.desired import DesiredState, Group
from meshd.errors import MeshdError



async def _first_snapshot(src, what: str, timeout: float):
    """The first full snapshot a source emits (it lists, then would watch: cancelled)."""
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    async def emit(snap) -> None:
        if not got.done():
            got.set_result(snap)

    task = asyncio.create_task(src.run(emit))
    try:
        return await asyncio.wait_for(got, timeout)
    except asyncio.TimeoutError:
        raise MeshdError(f"{what} did not answer in {timeout:g}s"
                         f" ({src.last_error or 'no reply'})") from None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _etcd_once(cfg: Config, urls: list[str]):
    from meshd.sources.etcd import EtcdSource
    return await _first_snapshot(EtcdSource(cfg.etcd, endpoints=urls),
                                 f"etcd at {', '.join(urls)}", cfg.etcd.dial_timeout)


KUBE_TIMEOUT = 10.0


def kubernetes_once(cfg: Config):
    """(snapshot, source) of one list of the Kubernetes API: the source's index tells each
    service's object (resourceVersion) and why others were skipped."""
    from meshd.sources.kubernetes import KubernetesSource
    src = KubernetesSource(cfg.kubernetes, node_name=cfg.node.name)
    snap = asyncio.run(_first_snapshot(src, "the Kubernetes API", KUBE_TIMEOUT))
    return snap, src


def desired(cfg: Config, kube: dict | None = None
            ) -> tuple[dict[str, Group] | None, list[str]]:
    """(groups, problems). groups is None when a source could not be read. `kube`, if given,
    is filled with what the Kubernetes source says of each service (origin, skipped)."""
    from meshd import node
    from meshd.sources.etcd_addresses import resolve_etcd_addresses
    from meshd.sources.static import load_services_file
    services, problems = [], []
    try:
        if cfg.services_file is not None:
            services += load_services_file(Path(cfg.services_file)).services
        urls: list[str] = []
        if cfg.etcd is not None:
            from meshd.cli_registry import registry_urls
            urls = registry_urls(cfg)
            services += asyncio.run(_etcd_once(cfg, urls)).services
        if cfg.kubernetes is not None:
            snap, src = kubernetes_once(cfg)
            services += snap.services
            if kube is not None:
                kube["skipped"] = src.index.skipped()
                kube["origins"] = {s.key: (src.index.origin(s.key) or ("", ""))[0]
                                   for s in snap.services}
                kube["rejected"] = [{"where": e.where, "reason": e.reason}
                                    for e in snap.errors]
    except MeshdError as e:
        return None, [f"desired state unknown: {e}"]
    local = node.local_addresses()
    from meshd.agent.sync import node_info
    groups, _rejected = DesiredState().update(services, cfg.service_cidrs,
                                              local | asyncio.run(resolve_etcd_addresses(urls)),
                                              node.node_ports(local, cfg.node_ports),
                                              node_info(cfg), cfg.external_ip_cidrs)
    return groups, problems


def compare(kernel_groups: list[dict], groups: dict[str, Group]) -> list[dict]:
    """Adds "desired" and "drift" to each kernel group; appends desired-only groups."""
    by_name = {g["group"]: g for g in kernel_groups}
    for key, g in groups.items():
        want_fe = sorted(str(fe) for fe in g.frontends)
        want_be = sorted(ref.name for ref, _w in g.backends)
        k = by_name.get(key)
        if k is None:
            kernel_groups.append({"group": key, "frontends": [], "backends": [],
                                  "state": "missing", "desired": {"frontends": want_fe,
                                                                  "backends": want_be},
                                  "drift": ["not in the kernel"]})
            continue
        k["desired"] = {"frontends": want_fe, "backends": want_be}
        drift = []
        have_be = sorted(b["backend"] for b in k["backends"])
        if sorted(k["frontends"]) != want_fe:
            drift.append(f"frontends: kernel {sorted(k['frontends'])}, desired {want_fe}")
        if have_be != want_be:
            extra, missing = set(have_be) - set(want_be), set(want_be) - set(have_be)
            drift.append("backends:" + "".join(f" +{b}" for b in sorted(extra))
                         + "".join(f" -{b}" for b in sorted(missing))
                         + " (+ in the kernel only, - desired only)")
        k["drift"] = drift
    for k in kernel_groups:
        if k["group"] not in groups and "desired" not in k:
            k["desired"] = None
            k["drift"] = ["not desired: no source has it (stale kernel entry)"]
    return kernel_groups
