"""Registry faults against a real `meshd run` and a real etcd the test starts: etcd killed in
the middle of the daemon's first list, etcd unreachable for 5 s under load, and 2,000
hypothesis-generated junk records next to valid ones. Each test keeps a client connecting
through the kernel data plane in a lab namespace and counts its failures (must be 0), and
waits (bounded) for the daemon to converge on changes made after the fault.
Harness: tests/meshdlib.py. Figures: docs/faults.md."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from meshdlib import (PREFIX, ConnectLoop, TcpProxy, backends, be, group, groups, reach,
                      scrape, svc, tail, wait_for)

VIP_A, VIP_B, VIP_C = "10.96.0.10", "10.96.0.11", "10.96.0.12"


def service_value(ns: str, name: str, vip: str) -> str:
    return json.dumps({"namespace": ns, "name": name, "vips": [vip],
                       "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]})


def endpoint_value(lab, i: int) -> str:
    return json.dumps({"address": lab.backend_addr(i), "ports": {"http": 8080}})


def records(lab, ns: str, name: str, vip: str, *backends_: int) -> list[tuple[str, str]]:
    """etcd (key, value) pairs of one service and its endpoints b<i>."""
    return [(f"{PREFIX}services/{ns}/{name}", service_value(ns, name, vip))] + [
        (f"{PREFIX}endpoints/{ns}/{name}/b{i}", endpoint_value(lab, i)) for i in backends_]


# ---- 1. etcd killed during the initial list -------------------------------------------------

BULK = 1200  # services (+1 endpoint each): 2,400 keys, one list page (~300 KB; pages are 10,000 keys)
KILL_AFTER = 20_000  # bytes of the list that reach the daemon before etcd is killed


def bulk_vip(i: int) -> str:
    return f"10.96.{4 + i // 250}.{i % 250 + 1}"


def bulk_group(i: int) -> str:
    return f"bulk/s{i:04d}:http/ipv4"


def test_etcd_killed_during_the_initial_list(lab, etcd, make_meshd, workdir):
    """kill -9 of etcd while the daemon's first list is in flight (the proxy between them
    kills etcd by PID once 20 KB of the list's page went through; the rest was to come): the
    daemon applies nothing partial -- every service the kernel held from an earlier run keeps
    serving, also when its other source (a services file) changes meanwhile and wakes the
    sync -- and once etcd is back it lists again, converges to the full set (with the
    changes made while no daemon ran) and only then tells systemd READY."""
    items = []
    for i in range(BULK):
        items += records(lab, "bulk", f"s{i:04d}", bulk_vip(i), i % 3 + 1)
    etcd.put_many(items)
    killed = threading.Event()
    armed = threading.Event()
    at_kill: dict = {}

    def on_reply(n: int) -> None:
        if armed.is_set() and not killed.is_set() and n >= KILL_AFTER:
            killed.set()
            at_kill["bytes"] = n
            etcd.kill()

    proxy = TcpProxy(etcd.client_port, on_reply=on_reply)
    client = None
    try:
        m = make_meshd({"endpoints": [proxy.url], "dial_timeout": 2}, services_file=True)
        m.write(svc(lab, "static", "10.96.9.9", [1]))
        m.start()  # an earlier run: the kernel holds all 1,200 services (and the file's)
        m.wait(lambda r: m.synced(r) and len(groups(r)) == BULK + 1, "the first run's sync",
               timeout=60)
        assert m.stop() == 0
        # while no daemon runs: one service goes, one comes
        etcd.txn([("delete", f"{PREFIX}services/bulk/s0000", None),
                  ("delete", f"{PREFIX}endpoints/bulk/s0000/b1", None),
                  *[("put", k, v) for k, v in records(lab, "bulk", "late", "10.96.9.1", 2)]])
        last = BULK - 1  # its records are on the list's last page
        client = ConnectLoop(lab, bulk_vip(last), duration=120)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(workdir / "notify"))
        notify.settimeout(0.2)
        try:
            proxy.replied = 0
            offset = m.log.stat().st_size
            armed.set()
            m.start(env={"NOTIFY_SOCKET": str(workdir / "notify")})
            wait_for(killed.is_set, "the daemon's list to start (and etcd to be killed)", 60,
                     detail=lambda: tail(m.log))
            assert "etcd: listed" not in m.log.read_bytes()[offset:].decode(), \
                "the list ended before the kill"
            # etcd stays dead for a while (the daemon marks it as not connected after 1 s),
            # the services file changes (a wake-up for the sync): nothing may be removed
            time.sleep(1.5)
            m.write(svc(lab, "static", "10.96.9.9", [1, 2]))
            t_end = time.monotonic() + 3
            while time.monotonic() < t_end:
                rep = m.report()
                assert rep is not None and len(groups(rep)) == BULK + 1, \
                    f"services vanished while etcd was down: {len(groups(rep or {}))} left"
            assert m.proc.poll() is None, tail(m.log)
            etcd.start()
            want = {bulk_group(i) for i in range(1, BULK)} | {"bulk/late:http/ipv4",
                                                              "default/static:http/ipv4"}
            m.wait(lambda r: m.synced(r) and groups(r) == want
                   and len(backends(r, "default/static:http/ipv4")) == 2,
                   "convergence after etcd is back", timeout=60)
            msgs = []
            end = time.monotonic() + 20
            while not any("READY=1" in x for x in msgs) and time.monotonic() < end:
                try:
                    msgs.append(notify.recv(4096).decode())
                except TimeoutError:
                    pass
        finally:
            notify.close()
        ready = [x for x in msgs if "READY=1" in x]
        assert ready and f"STATUS=serving {BULK + 1} services" in ready[0], msgs
        res = client.stop()
        assert res["errors"] == {} and res["count"] > 100, res
        assert set(res["by_backend"]) == {f"b{last % 3 + 1}"}
        assert reach(lab, "10.96.9.1", count=10)["by_backend"] == {"b2": 10}
        assert reach(lab, bulk_vip(0), count=3)["errors"] == {"ENETUNREACH": 3}
        log = m.log.read_text()
        assert log.count("etcd: listed ") == 2, tail(m.log)  # first run, then the retry
        print(f"\netcd killed after {at_kill['bytes']} bytes of the list reached the daemon; "
              f"{BULK} services kept; client: {res['count']} connects, 0 failed")
        assert m.stop() == 0
    finally:
        if client is not None:
            client.close()
        proxy.close()


# ---- 2. etcd unreachable for 5 s under load -------------------------------------------------

@pytest.mark.parametrize("how", ["sigstop", "kill"])
def test_etcd_unreachable_for_5s_under_load(lab, etcd, make_meshd, how):
    """etcd frozen (SIGSTOP: connections hang) or killed (-9: connections refused) for 5 s
    while a client opens connections to one service and holds one to another: 0 failed
    connects, the held connection keeps answering, and changes made once etcd is back reach
    the kernel."""
    etcd.put_many(records(lab, "default", "web-a", VIP_A, 1)
                  + records(lab, "default", "web-b", VIP_B, 2))
    m = make_meshd({"endpoints": [etcd.url], "dial_timeout": 2})
    m.start()
    m.wait(lambda r: m.synced(r) and backends(r, group("web-a")) == {be(lab, 1)}
           and backends(r, group("web-b")) == {be(lab, 2)}, "first sync")
    load = ConnectLoop(lab, VIP_A, duration=90)
    held = ConnectLoop(lab, VIP_B, duration=90, hold=True)
    try:
        time.sleep(1)
        if how == "sigstop":
            etcd.freeze()
            time.sleep(5)
            assert m.proc.poll() is None, tail(m.log)
            etcd.thaw()
        else:
            etcd.kill()
            time.sleep(5)
            assert m.proc.poll() is None, tail(m.log)
            etcd.start()
        assert load.running() and held.running(), "a client died during the outage"
        etcd.txn([("put", f"{PREFIX}endpoints/default/web-a/b3", endpoint_value(lab, 3)),
                  *[("put", k, v) for k, v in records(lab, "default", "web-c", VIP_C, 2)]])
        m.wait(lambda r: backends(r, group("web-a")) == {be(lab, 1), be(lab, 3)}
               and backends(r, group("web-c")) == {be(lab, 2)},
               "the changes made after etcd came back", timeout=30)
        time.sleep(0.5)
        res, hres = load.stop(), held.stop()
    finally:
        load.close()
        held.close()
    assert res["errors"] == {} and res["count"] > 200, res
    assert hres["errors"] == {} and hres["backend"] == "b2" and hres["count"] > 200, hres
    assert reach(lab, VIP_C, count=10)["by_backend"] == {"b2": 10}
    assert set(reach(lab, VIP_A, count=60)["by_backend"]) == {"b1", "b3"}
    if how == "kill":
        assert "etcd: lost the watch" in m.log.read_text()
    print(f"\netcd {how} 5 s: {res['count']} connects, 0 failed; held connection "
          f"{hres['count']} round trips, 0 failed")
    assert m.stop() == 0


# ---- 6. 2,000 random junk records next to valid ones ----------------------------------------

JUNK = 2000
VALID = [("web-a", VIP_A, 1), ("web-b", VIP_B, 2), ("web-c", VIP_C, 3)]


def hypothesis_junk(n: int) -> list[tuple[bytes, bytes]]:
    """n distinct (key, value) pairs under the prefix, drawn by hypothesis: random and
    near-valid keys in both subtrees and outside them, values of random JSON, near-valid
    records with one field broken, and random bytes. Never under the valid services' keys,
    and never a VIP the valid services use (a valid-looking junk service could own it)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
    text = st.text(max_size=12)
    seg = st.one_of(label, text, st.just(""), st.sampled_from(["..", "a/b", "UPPER", "x" * 70]))
    key = st.one_of(
        st.builds(lambda a, b: f"services/{a}/{b}", seg, seg),
        st.builds(lambda a, b, c: f"endpoints/{a}/{b}/{c}", seg, seg, seg),
        st.builds(lambda a: f"services/{a}", seg),
        text.map(lambda t: f"other/{t}"),
        text).map(lambda k: PREFIX.encode() + k.encode("utf-8", "surrogatepass"))
    raw_key = st.binary(min_size=1, max_size=20).map(lambda b: PREFIX.encode() + b"services/" + b)
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                     st.floats(allow_nan=False), text)
    anyjson = st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=3),
                                                     st.dictionaries(text, c, max_size=3)),
                           max_leaves=5)
    vip = st.sampled_from(["10.97.0.1", "10.96.0.10 ", "::1", "300.1.1.1", "", "10.96.200.7"])
    near_service = st.fixed_dictionaries({
        "namespace": seg, "name": seg, "vips": st.one_of(st.lists(vip, max_size=2), vip),
        "ports": st.one_of(st.lists(st.fixed_dictionaries({
            "name": seg, "port": st.one_of(st.integers(-1, 70000), text),
            "protocol": st.sampled_from(["TCP", "UDP", "tcp", "SCTP"])}), max_size=2), text)},
        optional={"endpoints": anyjson, "bogus": anyjson, "weight": anyjson})
    near_endpoint = st.fixed_dictionaries({
        "address": st.one_of(st.sampled_from(["10.201.1.2", "not-an-ip", "::", "224.0.0.1"]),
                             text),
        "ports": st.one_of(st.dictionaries(seg, st.one_of(st.integers(-5, 70000), text),
                                           max_size=2), text)},
        optional={"weight": anyjson, "ready": anyjson, "zone": anyjson})
    value = st.one_of(anyjson.map(lambda v: json.dumps(v).encode()),
                      near_service.map(lambda v: json.dumps(v).encode()),
                      near_endpoint.map(lambda v: json.dumps(v).encode()),
                      st.binary(max_size=40),
                      text.map(lambda t: t.encode("utf-8", "surrogatepass")))
    valid_keys = tuple(f"{PREFIX}{sub}/default/{name}".encode()
                       for sub in ("services", "endpoints") for name, _, _ in VALID)
    drawn: list[tuple[bytes, bytes]] = []

    @settings(max_examples=n // 50 + 10, phases=[Phase.generate], deadline=None,
              database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.one_of(key, raw_key), value), min_size=50, max_size=50,
                    unique_by=lambda kv: kv[0]))
    def collect(batch):
        drawn.extend((k, v) for k, v in batch if not k.startswith(valid_keys))

    collect()
    assert len(drawn) >= n, f"hypothesis drew only {len(drawn)} records"
    out: dict[bytes, bytes] = {}
    for i, (k, v) in enumerate(drawn[:n]):
        # hypothesis repeats small keys; a repeat gets "~<i>" appended, which no valid key
        # has (names and endpoint ids allow no "~"), so it stays junk
        out[k + b"~%d" % i if k in out else k] = v
    return list(out.items())


def test_2000_random_junk_records_next_to_valid_ones(lab, etcd, make_meshd):
    junk = hypothesis_junk(JUNK)
    valid = [r for name, vip, i in VALID for r in records(lab, "default", name, vip, i)]
    etcd.put_many(junk[:JUNK // 2] + valid)  # half read by the first list, half by the watch
    m = make_meshd({"endpoints": [etcd.url], "dial_timeout": 2})
    m.start()
    m.wait(lambda r: m.synced(r) and all(backends(r, group(n)) == {be(lab, i)}
                                         for n, _, i in VALID), "first sync", timeout=30)
    load = ConnectLoop(lab, VIP_A, duration=90)
    try:
        t0 = time.monotonic()
        etcd.put_many(junk[JUNK // 2:])
        rev = etcd.revision()
        # every junk key the daemon could reject must be rejected: a value that is not a
        # JSON object under services/ can never be a service
        def never_valid(k: bytes, v: bytes) -> bool:
            try:
                return not isinstance(json.loads(v), dict)
            except ValueError:
                return True
        must = {k.decode("utf-8", "backslashreplace") for k, v in junk
                if k.startswith(f"{PREFIX}services/".encode()) and never_valid(k, v)}
        assert len(must) > 200, "hypothesis drew too few plainly broken records"
        rep = m.wait(lambda r: must <= {x["where"] for x in r.get("rejected", [])},
                     "every plainly broken record reported", timeout=60)
        took = time.monotonic() - t0
        res = load.stop()
    finally:
        load.close()
    assert m.proc.poll() is None
    assert res["errors"] == {} and res["count"] > 100, res
    junk_keys = {k.decode("utf-8", "backslashreplace") for k, _ in junk}
    rejected = {x["where"] for x in rep["rejected"]}
    assert rejected <= junk_keys, f"valid records rejected: {rejected - junk_keys}"
    for name, vip, i in VALID:
        assert backends(rep, group(name)) == {be(lab, i)}
        assert reach(lab, vip, count=10)["by_backend"] == {f"b{i}": 10}
    fams = scrape(m.metrics_url)
    (n_rejected,) = [s.value for s in fams["meshd_registry_rejected_records"]]
    assert n_rejected == len(rep["rejected"]), (n_rejected, len(rep["rejected"]))
    print(f"\njunk: {JUNK} records (revision {rev}), {len(rep['rejected'])} rejected, "
          f"{len(groups(rep)) - len(VALID)} junk services accepted as valid, settled in "
          f"{took:.1f} s; client: {res['count']} connects, 0 failed")
    assert took < 60
    assert m.stop() == 0
