"""Prometheus exporter: per-service and per-backend metrics the kernel collected, plus the
control plane's own (sync lag, rejected records, map operations and fill).

Owns: the snapshot types (`Counters`, `Snapshot`), the log2-bucket math shared with
`meshd top`, the collector, `ControlPlaneStats` (the daemon sets it), and the HTTP server.

    pinned maps ──▶ KernelSource.snapshot() ──▶ MeshdCollector.collect() ──▶ /metrics
    (meshd_stats_v1, names, backends)   (any object with .snapshot(): tests pass fakes)

The kernel keeps one per-CPU counter set per (group, backend) (bpf/include/meshd_metrics.h);
the collector sums CPUs, adds backends up per service, and turns the log2 microsecond
buckets into cumulative Prometheus buckets in seconds. Nothing is read until a scrape.
Metric names and labels: docs/metrics.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.utils import floatToGoString

from meshd.dataplane.structs import HIST_BUCKETS, STATS_COUNTERS
from meshd.errors import MeshdError

log = logging.getLogger(__name__)

# Bucket i < HIST_BUCKETS - 1 holds values below 2^i microseconds (bucket 0: < 1 us); the
# last bucket holds everything from 2^(HIST_BUCKETS - 2) us up. Prometheus "le" bounds:
BOUNDS_S: tuple[float, ...] = tuple(2.0 ** i * 1e-6 for i in range(HIST_BUCKETS - 1))
FAILURE_KINDS = ("refused", "timeout", "reset", "other")
SERVICE_LABELS = ("namespace", "service", "port", "family")


# ---- snapshot types ----------------------------------------------------------------------
@dataclass(frozen=True)
class Counters:
    """The counters of one (group, backend) pair, or a sum of pairs; histograms are per
    log2-microsecond bucket (not cumulative). Field meanings: struct meshd_stats."""
    opened: int = 0
    closed: int = 0
    fail_refused: int = 0
    fail_timeout: int = 0
    fail_reset: int = 0
    fail_other: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    rx_packets: int = 0
    connect_sum_us: int = 0
    rtt_sum_us: int = 0
    connect_hist: tuple[int, ...] = (0,) * HIST_BUCKETS
    rtt_hist: tuple[int, ...] = (0,) * HIST_BUCKETS

    @classmethod
    def from_words(cls, words: Iterable[int]) -> "Counters":
        """From struct meshd_stats as a flat u64 vector (what the loader returns)."""
        w = [int(x) for x in words]
        n = len(STATS_COUNTERS)
        return cls(*w[:n], tuple(w[n:n + HIST_BUCKETS]),
                   tuple(w[n + HIST_BUCKETS:n + 2 * HIST_BUCKETS]))

    def __add__(self, other: "Counters") -> "Counters":
        vals = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            vals.append(tuple(x + y for x, y in zip(a, b)) if isinstance(a, tuple) else a + b)
        return Counters(*vals)

    def __sub__(self, other: "Counters") -> "Counters":
        """Increase since `other` (counters reset by a prune count from zero again)."""
        vals = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, tuple):
                vals.append(tuple(max(x - y, 0) for x, y in zip(a, b)))
            else:
                vals.append(max(a - b, 0))
        return Counters(*vals)

    @property
    def failures(self) -> dict[str, int]:
        return {k: getattr(self, f"fail_{k}") for k in FAILURE_KINDS}

    @property
    def established(self) -> int:
        """TCP connections whose handshake completed (= connect histogram count)."""
        return sum(self.connect_hist)


def total(counters: Iterable[Counters]) -> Counters:
    out = Counters()
    for c in counters:
        out = out + c
    return out


@dataclass
class Snapshot:
    """What the kernel held at one moment."""
    groups: dict[int, str]  # group id -> "namespace/name:port-name/ipv4"
    backends: dict[int, str]  # backend id -> "10.0.0.1:8080/TCP"
    stats: dict[tuple[int, int], Counters]  # (group id, backend id; 0 = none) -> counters
    stats_capacity: int = 0  # max_entries of the stats map
    taken_at: float = field(default_factory=time.monotonic)
    tc: dict[str, int] | None = None  # tc LB counters (struct meshd_tc_stats); None: no tc maps
    pressure: dict[str, tuple[int, int]] = field(default_factory=dict)  # map -> (entries, max)
    denied: dict[tuple[int, int], int] = field(default_factory=dict)  # (gid, identity) -> n
    events_lost: dict[str, int] | None = None  # ring_full / rate_limit / sampled_out

    def by_group(self) -> dict[int, Counters]:
        """Per group: all its backends (and its refusals) added up; every known group."""
        out = {gid: Counters() for gid in self.groups}
        for (gid, _bid), c in self.stats.items():
            if gid in out:
                out[gid] = out[gid] + c
        return out


class Source(Protocol):
    def snapshot(self) -> Snapshot: ...


class KernelSource:
    """Reads the pinned maps of one instance; opens them per snapshot, so it keeps working
    across daemon restarts and reports a clear error while nothing is pinned."""

    PRESSURE_EVERY = 60.0  # seconds between walks of every map's keys (~1 us an entry)

    def __init__(self, bpffs: Path, instance: str):
        self.bpffs, self.instance = Path(bpffs), instance
        self._pressure: tuple[float, dict] = (-1e9, {})

    def pressure(self) -> dict[str, tuple[int, int]]:
        """Fill of every fillable pinned map (LRUs included), at most once a minute."""
        at, value = self._pressure
        if time.monotonic() - at >= self.PRESSURE_EVERY:
            from meshd.dataplane import loader
            value = loader.map_pressure(self.bpffs / "meshd" / self.instance)
            self._pressure = (time.monotonic(), value)
        return value

    def snapshot(self) -> Snapshot:
        from meshd.dataplane import loader  # the kernel side only when really used
        mm = loader.open_metrics(self.bpffs, self.instance)
        try:
            stats = {k: Counters.from_words(v) for k, v in mm.read_stats().items()}
            snap = Snapshot(mm.group_names(), mm.backend_names(), stats, mm.stats_capacity())
        finally:
            mm.close()
        snap.tc = read_tc_counters(self.bpffs, self.instance)
        snap.denied, snap.events_lost = read_policy_counters(self.bpffs, self.instance)
        try:
            snap.pressure = self.pressure()
        except MeshdError as e:  # a scrape never fails for it either
            log.warning("map fill unreadable: %s", e)
        return snap


def read_policy_counters(bpffs: Path, instance: str):
    """(denials per (group id, identity), event loss counters); empty / None when the pinned
    data plane predates them."""
    from meshd.dataplane import events, policy_maps
    try:
        pm = policy_maps.PolicyMaps(bpffs, instance)
    except MeshdError:
        denied = {}
    else:
        try:
            denied = pm.read_denied()
        finally:
            pm.close()
    try:
        st = events.read_evstate(bpffs, instance)
        lost = {"ring_full": st["lost_full"], "rate_limit": st["lost_rate"],
                "sampled_out": st["sampled_out"]}
    except MeshdError:
        lost = None
    return denied, lost


def read_tc_counters(bpffs: Path, instance: str) -> dict[str, int] | None:
    """The tc LB's counters summed over CPUs; None if the instance never loaded the tc path."""
    from meshd.dataplane import tc
    try:
        return tc.read_counters(bpffs, instance)
    except MeshdError as e:  # a scrape never fails for the tc path's sake
        log.warning("tc counters unreadable: %s", e)
        return None


def split_group(key: str) -> tuple[str, str, str, str]:
    """"ns/name:port/ipv4" -> (namespace, service, port, family); odd keys stay readable."""
    try:
        ns, rest = key.split("/", 1)
        name, rest = rest.split(":", 1)
        port, family = rest.rsplit("/", 1)
        return ns, name, port, family
    except ValueError:
        return "", key, "", ""


# ---- log2 bucket math ----------------------------------------------------------------------
def bucket_of(us: int) -> int:
    """The bucket the kernel puts a value of `us` microseconds in (meshd_hist_bucket):
    0 for < 1 us, else min(floor(log2(us)) + 1, HIST_BUCKETS - 1)."""
    return 0 if us <= 0 else min(int(us).bit_length(), HIST_BUCKETS - 1)


def cumulative_buckets(hist: Iterable[int]) -> list[tuple[str, float]]:
    """Per-bucket counts -> Prometheus cumulative buckets [(le, count)], +Inf last."""
    hist = list(hist)
    out, acc = [], 0
    for bound, n in zip(BOUNDS_S, hist):
        acc += n
        out.append((floatToGoString(bound), float(acc)))
    out.append(("+Inf", float(sum(hist))))
    return out


def quantile(hist: Iterable[int], q: float) -> float | None:
    """Estimated q-quantile in seconds, interpolating linearly inside the bucket (as
    Prometheus' histogram_quantile does). None without samples; in the open last bucket,
    its lower bound (the value is at least that)."""
    hist = list(hist)
    n = sum(hist)
    if n == 0:
        return None
    rank = q * n
    acc = 0
    for i, c in enumerate(hist):
        if c and acc + c >= rank:
            if i == len(hist) - 1:
                return BOUNDS_S[-1]
            lo = BOUNDS_S[i - 1] if i > 0 else 0.0
            return lo + (BOUNDS_S[i] - lo) * (rank - acc) / c
        acc += c
    return BOUNDS_S[-1]


# ---- control plane -------------------------------------------------------------------------
# kube-proxy's network_programming_duration_seconds, coarser: 5 ms to 5 min
PROGRAMMING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                       60.0, 120.0, 300.0)


class ControlPlaneStats:
    """Figures the daemon sets; the collector exports them at each scrape. Thread-safe:
    the daemon writes from its loop or worker threads, scrapes read from the HTTP thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_sync_timestamp = 0.0  # unix time the last sync finished
        self.sync_lag_seconds = 0.0  # registry change seen -> kernel maps written
        self.records_rejected = 0  # records currently rejected (invalid, out of range)
        # failures by stage: "dataplane" = errors the reconciler reported (one per group or
        # map entry); addresses/validate/apply/sockdestroy/status/prune = a sync stage raised
        self.sync_errors: Counter[str] = Counter()
        self.task_failures: Counter[str] = Counter()  # supervised task -> restarts
        self.source_up: dict[str, bool] = {}
        self.attached: bool | None = None  # socket LB attached to an existing cgroup
        self.pins_restored = 0
        self.progress = None  # meshd.agent.health.Progress (age, stuck), set by the daemon
        # change stamped by the source (Kubernetes trigger time) -> in the kernel, seconds
        self.programming = [0] * (len(PROGRAMMING_BUCKETS) + 1)
        self.programming_sum = 0.0
        self.map_ops: Counter[str] = Counter()  # map operation (reconciler op name) -> total
        self.map_fill: dict[str, tuple[int, int]] = {}  # map -> (entries, max_entries)
        self.events: Counter[str] = Counter()  # connection events read, by type
        self.identity_label = lambda identity: None  # identity id -> label (policies)
        self.sources_up = None  # () -> {source: up}, read at scrape time (set by the daemon)

    def record_sync(self, ops: Mapping[str, int], errors: int, rejected: int,
                    lag_seconds: float, finished_at: float | None = None) -> None:
        """One completed sync: its map operations, errors, currently rejected records, and
        how long after the change it was seen the kernel held it."""
        with self._lock:
            self.map_ops.update({k: v for k, v in ops.items() if v})
            if errors:
                self.sync_errors["dataplane"] += errors
            self.records_rejected = rejected
            self.sync_lag_seconds = lag_seconds
            self.last_sync_timestamp = time.time() if finished_at is None else finished_at

    def set_map_fill(self, name: str, entries: int, max_entries: int) -> None:
        with self._lock:
            self.map_fill[name] = (entries, max_entries)

    def observe_programming(self, seconds: Iterable[float]) -> None:
        import bisect
        with self._lock:
            for v in seconds:
                v = max(v, 0.0)
                self.programming[bisect.bisect_left(PROGRAMMING_BUCKETS, v)] += 1
                self.programming_sum += v

    def count_event(self, ev: dict) -> None:
        with self._lock:
            self.events[ev["type"]] += 1

    def count_sync_error(self, stage: str) -> None:
        with self._lock:
            self.sync_errors[stage] += 1

    def count_task_failure(self, task: str) -> None:
        with self._lock:
            self.task_failures[task] += 1

    def set_attached(self, attached: bool) -> None:
        with self._lock:
            self.attached = attached

    def count_pins_restored(self, n: int) -> None:
        with self._lock:
            self.pins_restored += n

    def set_source_up(self, source: str, up: bool) -> None:
        with self._lock:
            self.source_up[source] = up

    def view(self) -> dict:
        if self.sources_up is not None:  # current at every scrape, not at the last status write
            try:
                for name, up in self.sources_up().items():
                    self.set_source_up(name, up)
            except RuntimeError:  # a source added while iterating: the last values stand
                pass
        with self._lock:
            return {"last_sync_timestamp": self.last_sync_timestamp,
                    "sync_lag_seconds": self.sync_lag_seconds,
                    "records_rejected": self.records_rejected,
                    "sync_errors": dict(self.sync_errors),
                    "task_failures": dict(self.task_failures),
                    "source_up": dict(self.source_up),
                    "attached": self.attached, "pins_restored": self.pins_restored,
                    "programming": list(self.programming),
                    "programming_sum": self.programming_sum,
                    "sync_age_seconds": None if self.progress is None else self.progress.age(),
                    "stuck": None if self.progress is None else self.progress.stuck(),
                    "map_ops": dict(self.map_ops), "map_fill": dict(self.map_fill),
                    "events": dict(self.events)}


# ---- the collector -------------------------------------------------------------------------
# (suffix, help, Counters field) of the plain counters, per service and per backend
_COUNTERS = (
    ("connections_opened", "Connections started: TCP SYNs sent, UDP sockets connected.",
     "opened"),
    ("connections_closed", "TCP connections that ended after their handshake completed.",
     "closed"),
    ("sent_bytes", "Payload bytes sent: TCP bytes acknowledged, UDP datagram payload.",
     "tx_bytes"),
    ("received_bytes", "Payload bytes received (TCP and UDP).", "rx_bytes"),
    ("sent_datagrams", "UDP datagrams sent.", "tx_packets"),
    ("received_datagrams", "UDP datagrams received.", "rx_packets"),
)
_FAILURES_HELP = ("Connections that failed, by kind: refused (RST to the SYN, or no usable "
                  "backend), timeout (SYN unanswered, or an established connection timed "
                  "out), reset (reset by the peer), other.")
_CONNECT_HELP = "TCP connect latency: connect() to handshake complete, per connection."
_RTT_HELP = ("Smoothed TCP round-trip time, sampled per connection at close and at most "
             "once a second while it is open.")


_TC_HELP = ("tc (per-packet) LB events on this node, by kind: dnat / revnat / snat / unsnat "
            "= packets translated (to a backend, back to the VIP, source to node:port, reply "
            "back to the client); ct_new / ct_repick / ct_closed / ct_shadowed = flows tracked, "
            "re-balanced, closed, forgotten; snat_new = SNAT ports chosen; frag_xlate / "
            "icmp_xlate = fragments and ICMP errors translated; aff_follow = new flows sent "
            "to their client's backend by session affinity; reject = packets to a frontend "
            "with no backend answered with a TCP RST or ICMP port unreachable; drop_no_local "
            "(external_traffic_policy Local, no local endpoint), src_range (source outside "
            "load_balancer_source_ranges), no_backend, snat_fail, errors = packets dropped "
            "(docs/tc.md).")


class MeshdCollector:
    """Reads `source` (anything with .snapshot() -> Snapshot) at each scrape. With
    `per_backend`, every series is also exported per backend (more series: one set per
    (service port, backend) pair that saw traffic)."""

    def __init__(self, source: Source | None, control: ControlPlaneStats | None = None,
                 per_backend: bool = True):
        self.source = source
        self.control = control
        self.per_backend = per_backend

    def describe(self):
        return []  # no reads at registration time

    def collect(self):
        yield from self._control_plane()
        fill = dict(self.control.view()["map_fill"]) if self.control is not None else {}
        if self.source is None:
            yield from self._map_fill(fill)
            return
        t0 = time.perf_counter()
        up = GaugeMetricFamily("meshd_dataplane_up",
                               "1 if the kernel metrics maps could be read at this scrape.")
        try:
            snap = self.source.snapshot()
        except MeshdError:
            up.add_metric([], 0.0)
            yield up
            yield from self._map_fill(fill)
            return
        up.add_metric([], 1.0)
        yield up
        # the daemon's own counts are exact and current; the walk covers every other map
        yield from self._map_fill({**snap.pressure, **fill})
        yield from self._traffic("service", SERVICE_LABELS, self._service_rows(snap))
        if self.per_backend:
            yield from self._traffic("backend", SERVICE_LABELS + ("backend",),
                                     self._backend_rows(snap))
        entries = GaugeMetricFamily("meshd_metrics_pairs",
                                    "(service port, backend) pairs with kernel counters, and "
                                    "the most the stats map holds.", labels=["bound"])
        entries.add_metric(["used"], float(len(snap.stats)))
        entries.add_metric(["max"], float(snap.stats_capacity))
        yield entries
        if snap.tc is not None:
            tc_fam = CounterMetricFamily("meshd_tc_events", _TC_HELP, labels=["event"])
            for event, value in snap.tc.items():
                tc_fam.add_metric([event], float(value))
            yield tc_fam
        yield from self._policy(snap)
        took = GaugeMetricFamily("meshd_metrics_read_seconds",
                                 "Time this scrape took to read the kernel maps.")
        took.add_metric([], time.perf_counter() - t0)
        yield took

    def _policy(self, snap: Snapshot):
        label = self.control.identity_label if self.control is not None else (lambda i: None)
        c = CounterMetricFamily("meshd_policy_denied", "connect()/sendmsg() calls refused by "
                                "an authorization policy (EPERM), per service port and caller "
                                "identity (its policy selectors; \"none\": selected by none).",
                                labels=SERVICE_LABELS + ("identity",))
        for (gid, ident), n in sorted(snap.denied.items()):
            if gid not in snap.groups:
                continue
            name = (label(ident) or f"identity-{ident}") if ident else "none"
            c.add_metric(list(split_group(snap.groups[gid])) + [name], float(n))
        yield c
        if snap.events_lost is not None:
            lost = CounterMetricFamily("meshd_events_lost", "Connection events the kernel "
                                       "could not hand over: ring_full = the ring buffer was "
                                       "full (the daemon read too slowly), rate_limit = over "
                                       "events.rate_per_cpu.", labels=["reason"])
            for reason in ("ring_full", "rate_limit"):
                lost.add_metric([reason], float(snap.events_lost[reason]))
            yield lost
            s = CounterMetricFamily("meshd_events_sampled_out", "connect and closed events "
                                    "skipped by events.sample (by design, not loss).")
            s.add_metric([], float(snap.events_lost["sampled_out"]))
            yield s
        if self.control is not None:
            c = CounterMetricFamily("meshd_events_read", "Connection events the daemon read from "
                                    "the kernel, by type.", labels=["type"])
            for t, n in sorted(self.control.view()["events"].items()):
                c.add_metric([t], float(n))
            yield c

    @staticmethod
    def _service_rows(snap: Snapshot):
        for gid, c in sorted(snap.by_group().items()):
            yield list(split_group(snap.groups[gid])), c

    @staticmethod
    def _backend_rows(snap: Snapshot):
        for (gid, bid), c in sorted(snap.stats.items()):
            if bid == 0 or gid not in snap.groups:
                continue  # refusals have no backend: they are in the service series
            name = snap.backends.get(bid, f"<removed {bid}>")
            yield list(split_group(snap.groups[gid])) + [name], c

    @staticmethod
    def _traffic(sub: str, labels: tuple[str, ...], rows):
        p = f"meshd_{sub}_"
        fams = {f: CounterMetricFamily(p + name, doc, labels=labels)
                for name, doc, f in _COUNTERS}
        fails = CounterMetricFamily(p + "connection_failures", _FAILURES_HELP,
                                    labels=labels + ("kind",))
        conn = HistogramMetricFamily(p + "connect_latency_seconds", _CONNECT_HELP, labels=labels)
        rtt = HistogramMetricFamily(p + "rtt_seconds", _RTT_HELP, labels=labels)
        for lv, c in rows:
            for f, fam in fams.items():
                fam.add_metric(lv, float(getattr(c, f)))
            for kind, n in c.failures.items():
                fails.add_metric(lv + [kind], float(n))
            conn.add_metric(lv, cumulative_buckets(c.connect_hist), c.connect_sum_us * 1e-6)
            rtt.add_metric(lv, cumulative_buckets(c.rtt_hist), c.rtt_sum_us * 1e-6)
        yield from fams.values()
        yield from (fails, conn, rtt)

    @staticmethod
    def _map_fill(fill: dict[str, tuple[int, int]]):
        e = GaugeMetricFamily("meshd_map_entries", "Entries in a kernel map (hash-like maps; "
                              "LRU maps and the tc maps counted at most once a minute).",
                              labels=["map"])
        r = GaugeMetricFamily("meshd_map_fill_ratio",
                              "Entries of a kernel map divided by its max_entries.",
                              labels=["map"])
        for name, (n, mx) in sorted(fill.items()):
            e.add_metric([name], float(n))
            r.add_metric([name], n / mx if mx else 0.0)
        yield e
        yield r

    def _control_plane(self):
        if self.control is None:
            return
        v = self.control.view()
        g = GaugeMetricFamily("meshd_sync_last_timestamp_seconds",
                              "Unix time the last sync of registry state to the kernel ended.")
        g.add_metric([], v["last_sync_timestamp"])
        yield g
        g = GaugeMetricFamily("meshd_sync_lag_seconds",
                              "Last sync: from the registry change seen to the kernel updated.")
        g.add_metric([], v["sync_lag_seconds"])
        yield g
        c = CounterMetricFamily("meshd_sync_errors", "Sync failures by stage: dataplane = "
                                "errors the reconciler reported (one per group or map entry; "
                                "retried); addresses, validate, apply, sockdestroy, status, "
                                "prune = that stage raised (retried with backoff).",
                                labels=["stage"])
        for stage in ("dataplane", "apply"):  # always present, so rate() works from 0
            c.add_metric([stage], float(v["sync_errors"].get(stage, 0)))
        for stage, n in sorted(v["sync_errors"].items()):
            if stage not in ("dataplane", "apply"):
                c.add_metric([stage], float(n))
        yield c
        c = CounterMetricFamily("meshd_task_failures", "Restarts of a daemon task (file, "
                                "etcd, sync, addresses, watchdog) after it raised.",
                                labels=["task"])
        for task, n in sorted(v["task_failures"].items()):
            c.add_metric([task], float(n))
        yield c
        g = GaugeMetricFamily("meshd_source_up", "1 while a registry source is read and "
                              "followed; 0 while it cannot be (its last state is served).",
                              labels=["source"])
        for name, up in sorted(v["source_up"].items()):
            g.add_metric([name], 1.0 if up else 0.0)
        yield g
        if v["attached"] is not None:
            g = GaugeMetricFamily("meshd_dataplane_attached", "1 while the socket LB is "
                                  "attached to its cgroup; 0 while the cgroup is gone.")
            g.add_metric([], 1.0 if v["attached"] else 0.0)
            yield g
        h = HistogramMetricFamily("meshd_network_programming_duration_seconds",
                                  "From a change stamped by its source (Kubernetes: the "
                                  "EndpointSlice's last-change-trigger-time) to the kernel "
                                  "maps holding it (kube-proxy's "
                                  "network_programming_duration_seconds).")
        acc, buckets = 0, []
        for bound, n in zip((*map(floatToGoString, PROGRAMMING_BUCKETS), "+Inf"),
                            v["programming"]):
            acc += n
            buckets.append((bound, float(acc)))
        h.add_metric([], buckets, v["programming_sum"])
        yield h
        c = CounterMetricFamily("meshd_pins_restored", "bpffs pins removed behind the "
                                "daemon's back and restored from the objects it holds.")
        c.add_metric([], float(v["pins_restored"]))
        yield c
        if v["sync_age_seconds"] is not None:
            g = GaugeMetricFamily("meshd_sync_age_seconds", "Seconds since the last successful "
                                  "sync (since the start, before the first one).")
            g.add_metric([], v["sync_age_seconds"])
            yield g
            g = GaugeMetricFamily("meshd_sync_stuck", "1 while syncs fail or hang past their "
                                  "limits (the systemd watchdog is then not pinged).")
            g.add_metric([], 1.0 if v["stuck"] else 0.0)
            yield g
        g = GaugeMetricFamily("meshd_registry_rejected_records",
                              "Service records currently skipped as invalid.")
        g.add_metric([], float(v["records_rejected"]))
        yield g
        c = CounterMetricFamily("meshd_map_ops", "Kernel map operations by kind.",
                                labels=["op"])
        for op, n in sorted(v["map_ops"].items()):
            c.add_metric([op], float(n))
        yield c


def start_metrics_server(listen: str, collector, registry: CollectorRegistry | None = None):
    """Serves /metrics on `listen` ("127.0.0.1:9469", "[::1]:9469", "0.0.0.0:9469") in a
    daemon thread. Returns the server: `.shutdown()` then `.server_close()` stops it."""
    from meshd.config import split_host_port
    host, port = split_host_port(listen, allow_zero=True)
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=registry)  # process_* of the daemon itself
    registry.register(collector)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
