"""What the kernel maps of one instance hold, as data (`meshd services`)."""

from __future__ import annotations

import json
from collections import Counter

from meshd.config import Config
from meshd.agent.status import status_path
from meshd.dataplane import loader
from meshd.dataplane import structs as S
from meshd.dataplane.kernel import KernelDataplane


def services_report(cfg: Config, with_desired: bool = True) -> dict:
    maps = loader.open_pinned(cfg.bpffs, cfg.instance)
    try:
        dp = KernelDataplane(maps)
        snap = dp.snapshot()
        groups: dict[int, dict] = {}
        for gid, key in snap.names.items():
            groups[gid] = {"group": key, "id": gid, "frontends": [], "backends": [],
                           "count": 0}
        for fe, (gid, count, flags) in sorted(snap.frontends.items(), key=lambda kv: str(kv[0])):
            g = groups.setdefault(gid, {"group": f"<unnamed {gid}>", "id": gid, "frontends": [],
                                        "backends": [], "count": 0})
            g["frontends"].append(str(fe))
            g["count"] = count
            g["drop"] = bool(flags & S.SVC_F_DROP_EMPTY)
            if flags & 0x40:  # MESHD_SVC_F_POLICY: callers need a policy's allow
                g["authorization"] = True
        for fe, (gid, count, flags) in sorted(snap.ext_frontends.items(),
                                              key=lambda kv: str(kv[0])):
            g = groups.setdefault(gid, {"group": f"<unnamed {gid}>", "id": gid, "frontends": [],
                                        "backends": [], "count": 0})
            g.setdefault("tc_frontends", []).append(str(fe))  # tc path only
            g["count"] = count
            g["drop"] = bool(flags & S.SVC_F_DROP_EMPTY)
        for gid, timeout in snap.affinity.items():
            if gid in groups:
                groups[gid]["affinity_timeout_seconds"] = timeout
        for gid, g in groups.items():
            half = 1 if any(f & S.SVC_F_TABLE_B for g_, c, f in snap.frontends.values()
                            if g_ == gid and c) else 0
            table = dp.get_table(gid, half) if gid in snap.tables else None
            if table is not None:
                g["table_size"] = len(table)
            if table is not None:
                for bid, slots in sorted(Counter(table.tolist()).items()):
                    ref = snap.backends.get(bid)
                    g["backends"].append({
                        "id": bid, "backend": ref.name if ref else f"<missing {bid}>",
                        "slots": slots, "share": round(slots / len(table), 4)})
            drop = g.pop("drop", False)
            g["state"] = ("serving" if g["count"] and g["backends"] else
                          "no-backends (connect: EHOSTUNREACH, tc: dropped)" if drop else "no-backends (connect: ECONNREFUSED)"
                          if g["frontends"] or g.get("tc_frontends") else "idle")
        report = {"instance": cfg.instance, "pin_dir": str(maps.pin_dir),
                  "maglev_table_size": maps.maglev_m or "auto",
                  "cgroups": sorted({c for c in loader.attached_cgroup_ids(maps.pin_dir).values()
                                     if c is not None}),
                  "services": sorted(groups.values(), key=lambda g: g["group"])}
    finally:
        maps.close()
    from meshd.dataplane import tc
    from meshd.metrics import read_tc_counters
    report["tc"] = {"interfaces": tc.recorded_interfaces(cfg.bpffs, cfg.instance),
                    "counters": read_tc_counters(cfg.bpffs, cfg.instance)}
    if with_desired:
        from meshd import drift
        kube: dict = {}
        groups, problems = drift.desired(cfg, kube)
        report["desired_error"] = problems[0] if problems else None
        if groups is not None:
            report["services"] = sorted(drift.compare(report["services"], groups),
                                        key=lambda g: g["group"])
        if kube:  # which Kubernetes object each service came from, and what was skipped
            report["kubernetes"] = kube
            for g in report["services"]:
                svc = g["group"].split(":", 1)[0]
                if svc in kube.get("origins", {}):
                    g["origin"] = (f"kubernetes service {svc} resourceVersion "
                                   f"{kube['origins'][svc]}")
    status = status_path(cfg)
    if status.exists():
        try:
            doc = json.loads(status.read_text())
            report["daemon"] = {k: doc.get(k) for k in (
                "pid", "synced_at", "last_sync_ok", "sync_age_seconds", "sync_failing", "stuck",
                "dataplane_error",
                "sources", "source_error", "etcd", "services", "metrics", "healthz", "maps",
                "written_at")}
            report["rejected"] = doc.get("rejected", [])
            report["policy_problems"] = doc.get("policy_problems") or []
            watch = doc.get("cgroup_watch") or {}
            if watch.get("error"):
                report["policy_problems"].append(watch["error"])
            ev = doc.get("events") or {}
            if ev.get("reader_error"):
                report["policy_problems"].append(
                    f"connection events cannot be read: {ev['reader_error']}")
            selecting = doc.get("policies") or {}
            for g in report["services"]:
                if selecting.get(g["group"]):
                    g["policies"] = selecting[g["group"]]
            report["errors"] = doc.get("errors", {})
        except (OSError, ValueError):
            pass
    return report


def format_report(r: dict) -> str:
    lines = [f"instance {r['instance']}  pins {r['pin_dir']}  maglev m={r['maglev_table_size']}"]
    for t in (r.get("tc") or {}).get("interfaces", []):
        mode = (f"snat, ports {t['snat_ports'][0]}-{t['snat_ports'][1]}" if t["snat_ports"]
                else "routed")
        lines.append(f"tc LB on {t['interface']} (ifindex {t['ifindex']}, netns inode "
                     f"{t['netns_ino']}): {mode}")
    if not r["services"]:
        lines.append("  (no services in the kernel maps)")
    for g in r["services"]:
        lines.append(f"{g['group']}  [{g['state']}]"
                     + ("  DRIFT" if g.get("drift") else "")
                     + (f"  ({g['origin']})" if g.get("origin") else ""))
        for fe in g["frontends"]:
            lines.append(f"  frontend {fe}")
        if g.get("policies") or g.get("authorization"):
            lines.append("  policies " + ", ".join(g.get("policies") or [
                "(enforced in the kernel; names in the daemon's status file)"]))
        for b in g["backends"]:
            lines.append(f"  backend  {b['backend']:<32} slots {b['slots']:>6}  "
                         f"share {b['share'] * 100:5.1f}%")
        for d in g.get("drift") or ():
            lines.append(f"  drift: {d}")
    for key, why in sorted(((r.get("kubernetes") or {}).get("skipped") or {}).items()):
        lines.append(f"skipped: kubernetes service {key}: {why}")
    for rej in r.get("rejected", []):
        lines.append(f"rejected: {rej['where']}: {rej['reason']}")
    for what, err in r.get("errors", {}).items():
        lines.append(f"error: {what}: {err}")
    for msg in r.get("policy_problems", []):
        lines.append(f"policy: {msg}")
    if r.get("desired_error"):
        lines.append(r["desired_error"] + " (kernel state shown alone)")
    d = r.get("daemon") or {}
    if d.get("source_error"):
        lines.append(f"source error: {d['source_error']}")
    if d:
        lines.extend(_daemon_lines(d))
    return "\n".join(lines)


def _daemon_lines(d: dict) -> list[str]:
    """Liveness as the status file last told it: sources, sync age, map fill."""
    import time
    out = []
    ok = d.get("last_sync_ok")
    if d.get("written_at") and d.get("sync_age_seconds") is not None:
        age = d["sync_age_seconds"] + max(0.0, time.time() - d["written_at"])
        when = f"last successful sync {age:.0f}s ago" if ok else "no successful sync yet"
    else:
        when = "sync age unknown (older daemon)"
    srcs = ", ".join(f"{n} {'up' if s.get('up', not s.get('error')) else 'DOWN'}"
                     for n, s in (d.get("sources") or {}).items())
    out.append(f"daemon pid {d.get('pid')}: {when}; sources: {srcs or 'none'}"
               + (f"; metrics http://{d['metrics']}/metrics" if d.get("metrics") else ""))
    if d.get("sync_failing"):
        out.append(f"SYNC FAILING: {d['sync_failing']}")
    if d.get("dataplane_error"):
        out.append(f"DATA PLANE: {d['dataplane_error']}")
    if d.get("stuck"):
        out.append(f"STUCK (watchdog not pinged): {d['stuck']}")
    fills = [f"{name} {m['entries']}/{m['max_entries']} ({m['entries'] / m['max_entries']:.0%})"
             for name, m in sorted((d.get("maps") or {}).items()) if m.get("max_entries")]
    if fills:
        out.append("maps: " + ", ".join(fills))
    return out
