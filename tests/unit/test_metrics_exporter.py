"""meshd.metrics and meshd.top on fake kernel data: bucket math, the collector's exposition,
control-plane figures, the HTTP server, and the `meshd top` frame. No root needed."""

from __future__ import annotations

import math
import socket
import urllib.request
from dataclasses import fields

import pytest
from hypothesis import given, strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshd import top
from meshd.dataplane.structs import HIST_BUCKETS, STATS_COUNTERS, STATS_WORDS
from meshd.errors import DataplaneError
from meshd.metrics import (BOUNDS_S, ControlPlaneStats, Counters, MeshdCollector, Snapshot,
                           bucket_of, cumulative_buckets, quantile, split_group,
                           start_metrics_server)


def hist(*values_us: int) -> tuple[int, ...]:
    h = [0] * HIST_BUCKETS
    for v in values_us:
        h[bucket_of(v)] += 1
    return tuple(h)


def conns(*lat_us: int, **kw) -> Counters:
    """Counters of established connections with these connect latencies."""
    return Counters(opened=len(lat_us), connect_hist=hist(*lat_us),
                    connect_sum_us=sum(lat_us), **kw)


class Fake:
    def __init__(self, snap: Snapshot | Exception):
        self.snap = snap

    def snapshot(self) -> Snapshot:
        if isinstance(self.snap, Exception):
            raise self.snap
        return self.snap


GROUPS = {1: "shop/web:http/ipv4", 2: "shop/web:http/ipv6", 3: "shop/db:pg/ipv4"}
BACKENDS = {10: "10.0.0.1:8080/TCP", 11: "10.0.0.2:8080/TCP", 12: "[fd00::1]:8080/TCP"}


def snapshot(**over) -> Snapshot:
    stats = {(1, 10): conns(100, 200, 300, closed=3, tx_bytes=30, rx_bytes=60),
             (1, 11): conns(5000, fail_timeout=2),
             (1, 0): Counters(fail_refused=4),
             (2, 12): conns(50),
             (99, 10): conns(1)}  # a group with no name (removed): not exported
    stats.update(over)
    return Snapshot(dict(GROUPS), dict(BACKENDS), stats, stats_capacity=1000)


def scrape(collector) -> dict:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    out: dict = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(scraped, name, **labels) -> float:
    hits = [v for lv, v in scraped[name] if all(lv.get(k) == x for k, x in labels.items())]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


# ---- bucket math ---------------------------------------------------------------------------
def test_bounds_are_powers_of_two_microseconds():
    assert len(BOUNDS_S) == HIST_BUCKETS - 1
    assert BOUNDS_S[0] == 1e-6 and BOUNDS_S[10] == 1024e-6
    assert math.isclose(BOUNDS_S[-1], 2 ** 22 * 1e-6)


@given(st.integers(min_value=0, max_value=2 ** 40))
def test_a_value_lies_below_its_buckets_bound_and_not_below_the_previous(us):
    b = bucket_of(us)
    s = us * 1e-6
    if b < HIST_BUCKETS - 1:
        assert s < BOUNDS_S[b]
    if b > 0:
        assert s >= BOUNDS_S[b - 1]


def test_bucket_of_matches_the_kernel_definition():
    assert [bucket_of(v) for v in (0, 1, 2, 3, 4, 1023, 1024, 2 ** 22 - 1, 2 ** 22, 10 ** 9)] == \
        [0, 1, 2, 2, 3, 10, 11, 22, 23, 23]


@given(st.lists(st.integers(min_value=0, max_value=10 ** 8), min_size=1, max_size=200))
def test_cumulative_buckets_end_at_the_count_and_never_decrease(values):
    cum = cumulative_buckets(hist(*values))
    assert cum[-1] == ("+Inf", float(len(values)))
    counts = [c for _le, c in cum]
    assert counts == sorted(counts)
    # a value is counted in every bucket whose bound is above it
    for le, c in cum[:-1]:
        assert c == sum(1 for v in values if v * 1e-6 < float(le))


@given(st.lists(st.integers(min_value=1, max_value=2 ** 21), min_size=1, max_size=200),
       st.sampled_from([0.5, 0.9, 0.99]))
def test_quantile_estimate_is_within_the_true_values_bucket(values, q):
    est = quantile(hist(*values), q)
    true = sorted(values)[max(math.ceil(q * len(values)) - 1, 0)]
    b = bucket_of(true)
    lo = BOUNDS_S[b - 1] if b else 0.0
    assert lo <= est <= BOUNDS_S[b]


def test_quantile_edges():
    assert quantile([0] * HIST_BUCKETS, 0.5) is None
    assert quantile(hist(10 ** 9), 0.99) == BOUNDS_S[-1]  # open bucket: "at least"
    assert quantile(hist(*[3] * 100), 0.5) == pytest.approx(3e-6)  # middle of [2, 4) us


# ---- snapshot types ------------------------------------------------------------------------
def test_counters_mirror_the_kernel_struct_order():
    assert [f.name for f in fields(Counters)] == list(STATS_COUNTERS) + ["connect_hist",
                                                                         "rtt_hist"]
    words = list(range(STATS_WORDS))
    c = Counters.from_words(words)
    assert c.opened == 0 and c.rtt_sum_us == len(STATS_COUNTERS) - 1
    assert c.connect_hist[0] == len(STATS_COUNTERS) and c.rtt_hist[-1] == STATS_WORDS - 1


def test_counter_arithmetic():
    a, b = conns(10, 20, closed=1), conns(30, fail_reset=1)
    s = a + b
    assert s.opened == 3 and s.established == 3 and s.fail_reset == 1 and s.closed == 1
    assert (s - a) == b
    assert (a - s).opened == 0  # a reset (pruned) counter never gives a negative rate


def test_split_group():
    assert split_group("shop/web:http/ipv6") == ("shop", "web", "http", "ipv6")
    assert split_group("weird") == ("", "weird", "", "")


# ---- collector -----------------------------------------------------------------------------
def test_service_series_add_up_backends_and_refusals():
    s = scrape(MeshdCollector(Fake(snapshot())))
    web4 = {"namespace": "shop", "service": "web", "port": "http", "family": "ipv4"}
    assert value(s, "meshd_service_connections_opened_total", **web4) == 4
    assert value(s, "meshd_service_connection_failures_total", kind="refused", **web4) == 4
    assert value(s, "meshd_service_connection_failures_total", kind="timeout", **web4) == 2
    assert value(s, "meshd_service_connect_latency_seconds_count", **web4) == 4
    assert value(s, "meshd_service_connect_latency_seconds_sum", **web4) == pytest.approx(5600e-6)
    # 100 and 200 us are below 256 us; 300 us is not (it is in [256, 512))
    assert value(s, "meshd_service_connect_latency_seconds_bucket", le="0.000256", **web4) == 2
    assert value(s, "meshd_service_connect_latency_seconds_bucket", le="0.000512", **web4) == 3
    assert value(s, "meshd_service_sent_bytes_total", **web4) == 30
    # a known group without traffic is exported with zeros, so rate() sees its first event
    assert value(s, "meshd_service_connections_opened_total", service="db") == 0
    # the unnamed group 99 is not exported at all
    assert all(lv.get("service") in ("web", "db")
               for lv, _v in s["meshd_service_connections_opened_total"])


def test_backend_series_carry_the_backend_and_skip_refusals():
    s = scrape(MeshdCollector(Fake(snapshot())))
    rows = s["meshd_backend_connections_opened_total"]
    assert {lv["backend"] for lv, _ in rows} == set(BACKENDS.values())
    assert value(s, "meshd_backend_connect_latency_seconds_count",
                 backend="10.0.0.2:8080/TCP") == 1
    assert value(s, "meshd_backend_connect_latency_seconds_bucket", le="0.004096",
                 backend="10.0.0.2:8080/TCP") == 0  # 5 ms is above 4.096 ms
    assert value(s, "meshd_metrics_pairs", bound="max") == 1000
    assert "meshd_backend_connections_opened_total" not in scrape(
        MeshdCollector(Fake(snapshot()), per_backend=False))


def test_unreadable_data_plane_is_a_gauge_not_an_error():
    control = ControlPlaneStats()
    s = scrape(MeshdCollector(Fake(DataplaneError("instance has no metrics maps")), control))
    assert value(s, "meshd_dataplane_up") == 0
    assert "meshd_sync_lag_seconds" in s  # the control plane is still reported
    assert "meshd_service_connections_opened_total" not in s


def test_control_plane_figures():
    control = ControlPlaneStats()
    control.record_sync({"put_backend": 3, "put_table": 1, "delete_name": 0}, errors=1,
                        rejected=2, lag_seconds=0.4, finished_at=1700000000.0)
    control.record_sync({"put_backend": 2}, errors=0, rejected=0, lag_seconds=0.1)
    control.set_map_fill("meshd_svc_v1", 16384, 65536)
    s = scrape(MeshdCollector(None, control))
    assert value(s, "meshd_map_ops_total", op="put_backend") == 5
    assert value(s, "meshd_map_ops_total", op="put_table") == 1
    assert not [lv for lv, _ in s["meshd_map_ops_total"] if lv["op"] == "delete_name"]
    assert value(s, "meshd_sync_errors_total", stage="dataplane") == 1
    assert value(s, "meshd_registry_rejected_records") == 0
    assert value(s, "meshd_sync_lag_seconds") == pytest.approx(0.1)
    assert value(s, "meshd_sync_last_timestamp_seconds") > 1700000000
    assert value(s, "meshd_map_fill_ratio", map="meshd_svc_v1") == 0.25
    assert value(s, "meshd_map_entries", map="meshd_svc_v1") == 16384


def test_every_name_follows_the_convention():
    reg = CollectorRegistry(auto_describe=False)
    reg.register(MeshdCollector(Fake(snapshot()), ControlPlaneStats()))
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        assert fam.name.startswith("meshd_") and len(fam.name.split("_")) >= 3
        if fam.type == "counter":
            assert all(s.name == fam.name + "_total" for s in fam.samples), fam.name
        if fam.type == "histogram" or "bytes" in fam.name:
            assert fam.name.endswith(("_seconds", "_bytes")), fam.name


def test_server_listens_on_ipv6_loopback():
    with socket.socket(socket.AF_INET6) as sk:
        sk.bind(("::1", 0))
        port = sk.getsockname()[1]
    server = start_metrics_server(f"[::1]:{port}", MeshdCollector(Fake(snapshot())))
    try:
        text = urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"meshd_service_connect_latency_seconds", "process_cpu_seconds"} <= names


# ---- meshd top -----------------------------------------------------------------------------
def test_top_frame_rates_percentiles_and_order():
    prev = snapshot()
    prev.taken_at = 100.0
    busy = conns(*[200] * 50) + prev.stats[(1, 10)]
    cur = snapshot()
    cur.stats[(1, 10)] = busy
    cur.stats[(3, 10)] = Counters(fail_timeout=5)  # db starts failing
    cur.taken_at = 102.0
    frame = top.render(prev, cur)
    lines = frame.splitlines()
    assert lines[1].startswith("SERVICE")
    rows = [ln.split() for ln in lines[2:]]
    assert rows[0][0] == "shop/db:pg/ipv4" and rows[0][4] == "2.5"  # failing now: first
    web = next(r for r in rows if r[0] == "shop/web:http/ipv4")
    assert web[1] == "25"  # 50 new connections in 2 s
    assert web[2] == "54"  # opened since load
    assert web[6] == "192us/255us"  # this window: all 50 at 200 us, in [128, 256) us
    idle = next(r for r in rows if r[0] == "shop/web:http/ipv6")
    assert idle[6].endswith("*")  # nothing new: since-load figure, marked


def test_top_shows_policy_denials_per_caller_and_puts_them_first():
    prev, cur = snapshot(), snapshot()
    prev.taken_at, cur.taken_at = 100.0, 102.0
    prev.denied = {(3, 4): 10}
    cur.denied = {(3, 4): 30, (3, 0): 2}
    frame = top.render(prev, cur, labels={"4": "unit:batch.service"})
    lines = frame.splitlines()
    assert lines[2].startswith("shop/db:pg/ipv4")  # denying now: first
    assert "DENIED unit:batch.service" in lines[3] and "10/s" in lines[3] and "30 total" in lines[3]
    assert any("DENIED unselected callers" in ln and "2 total" in ln for ln in lines)


def test_denials_are_exported_per_service_and_identity():
    snap = snapshot()
    snap.denied = {(3, 4): 7, (3, 0): 1, (99, 4): 5}  # group 99 has no name: not exported
    control = ControlPlaneStats()
    control.identity_label = {4: "unit:batch.service"}.get
    fams = {f.name: f for f in MeshdCollector(Fake(snap), control).collect()}
    got = {(s.labels["service"], s.labels["identity"]): s.value
           for s in fams["meshd_policy_denied"].samples}
    assert got == {("db", "unit:batch.service"): 7.0, ("db", "none"): 1.0}


def test_top_frame_fits_the_terminal():
    snap = snapshot()
    frame = top.render(snap, snap, max_lines=5)
    assert len(frame.splitlines()) == 5 and "more lines" in frame.splitlines()[-1]


@pytest.mark.parametrize("x,out", [(0, "0"), (2.5, "2.5"), (1234, "1.2k"), (3.5e6, "3.5M")])
def test_top_rate_format(x, out):
    assert top.fmt_rate(x) == out


def test_dashboard_queries_only_metrics_the_exporter_serves():
    import json
    import re
    from pathlib import Path
    dash = json.loads((Path(__file__).resolve().parents[2] / "config" /
                       "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = set(re.findall(r"meshd_[a-z_]+", " ".join(exprs)))
    control = ControlPlaneStats()
    control.record_sync({"put_backend": 1}, errors=0, rejected=0, lag_seconds=0.1)
    control.set_map_fill("meshd_svc_v1", 1, 2)
    control.count_task_failure("etcd")
    control.set_source_up("etcd", False)
    from meshd.agent.health import Progress
    control.progress = Progress()
    served = set(scrape(MeshdCollector(Fake(snapshot()), control)))
    assert used and used <= served, used - served


def test_tc_counters_are_exported_by_event_when_the_tc_path_is_loaded():
    snap = snapshot()
    snap.tc = {"dnat": 7, "snat": 5, "snat_fail": 1}
    reg = CollectorRegistry()
    reg.register(MeshdCollector(Fake(snap)))
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    got = {s.labels["event"]: s.value for s in fams["meshd_tc_events"].samples
           if s.name == "meshd_tc_events_total"}
    assert got == {"dnat": 7.0, "snat": 5.0, "snat_fail": 1.0}
    reg2 = CollectorRegistry()
    reg2.register(MeshdCollector(Fake(snapshot())))  # no tc maps: no tc series at all
    assert "meshd_tc_events" not in generate_latest(reg2).decode()


def test_liveness_figures_source_up_sync_age_stuck_and_errors_by_stage():
    from meshd.agent.health import Progress
    control = ControlPlaneStats()
    prog = Progress(stuck_after=5)
    control.progress = prog
    control.set_source_up("etcd", False)
    control.set_source_up("file", True)
    control.count_sync_error("apply")
    control.count_sync_error("apply")
    control.count_sync_error("sockdestroy")
    control.count_task_failure("addresses")
    s = scrape(MeshdCollector(None, control))
    assert value(s, "meshd_source_up", source="etcd") == 0
    assert value(s, "meshd_source_up", source="file") == 1
    assert value(s, "meshd_sync_errors_total", stage="apply") == 2
    assert value(s, "meshd_sync_errors_total", stage="sockdestroy") == 1
    assert value(s, "meshd_sync_errors_total", stage="dataplane") == 0
    assert value(s, "meshd_task_failures_total", task="addresses") == 1
    assert value(s, "meshd_sync_stuck") == 0
    prog.failed("apply: RuntimeError: x")
    prog.failing_since -= 10  # failing for 10 s > stuck_after
    s = scrape(MeshdCollector(None, control))
    assert value(s, "meshd_sync_stuck") == 1
    assert value(s, "meshd_sync_age_seconds") >= 0


def test_network_programming_histogram():
    control = ControlPlaneStats()
    control.observe_programming([0.003, 0.2, 7.0])
    reg = CollectorRegistry()
    reg.register(MeshdCollector(None, control))
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    h = fams["meshd_network_programming_duration_seconds"]
    got = {s.labels.get("le"): s.value for s in h.samples if s.name.endswith("_bucket")}
    assert got["0.005"] == 1 and got["0.25"] == 2 and got["10.0"] == 3 and got["+Inf"] == 3
    assert next(s.value for s in h.samples if s.name.endswith("_count")) == 3
