"""SIGHUP: which config keys change live and which need a restart (pure; the daemon applies).

Live: service_cidrs, node_ports (a sync follows), tc (re-attached), log_level, metrics.listen
(the exporter re-listens), services_file (another path; adding or removing the file source
needs a restart). Restart only: what the pinned data plane or a running source is built on.
"""

from __future__ import annotations

from dataclasses import dataclass

RESTART_ONLY = ("instance", "bpffs", "cgroup", "state_dir", "maglev", "maps", "etcd",
                "kubernetes")
LIVE = ("service_cidrs", "node_ports", "tc", "log_level", "metrics", "services_file", "sync",
        "node", "external_ip_cidrs", "healthz", "events")


@dataclass
class ReloadPlan:
    config: object  # the config to run with: the new one, restart-only keys kept as they were
    applied: list[str]  # live keys that changed
    refused: list[str]  # keys that changed but need a restart (kept at their running value)

    def message(self) -> str:
        parts = [f"applied {', '.join(self.applied)}" if self.applied else "no live setting changed"]
        if self.refused:
            parts.append(f"NOT applied (need a restart of meshd): {', '.join(self.refused)}"
                         + ("; map sizes also need `meshd cleanup` first"
                            if "maps" in self.refused else ""))
        return "reload: " + "; ".join(parts)


def plan_reload(old, new) -> ReloadPlan:
    fields = type(old).model_fields
    refused = [k for k in RESTART_ONLY if k in fields and getattr(new, k) != getattr(old, k)]
    if (new.services_file is None) != (old.services_file is None):
        refused.append("services_file (added or removed)")
    keep = {k: getattr(old, k) for k in RESTART_ONLY if k in fields}
    if (new.services_file is None) != (old.services_file is None):
        keep["services_file"] = old.services_file
    if "events" in fields and new.events.ring_bytes != old.events.ring_bytes:
        # the ring buffer is pinned with its size: the rest of `events` is live
        refused.append("events.ring_bytes")
        keep["events"] = new.events.model_copy(update={"ring_bytes": old.events.ring_bytes})
    cfg = new.model_copy(update=keep)
    applied = [k for k in LIVE if k in fields and getattr(cfg, k) != getattr(old, k)]
    return ReloadPlan(cfg, applied, refused)
