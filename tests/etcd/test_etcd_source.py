"""meshd.sources.etcd against a real etcd: list, watch, leases, outages (etcd restarted, network
dropped), compaction while disconnected, junk records, and the cost of a snapshot at 10,000
services."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import time
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.config import EtcdConfig
from meshd.registry import Registry
from meshd.sources.etcd import (MAX_VALUE_BYTES, EtcdSource, RegistrySnapshot, RegistryState, close_client,
                                key_text, open_client)


def svc(ns: str, name: str, vip: str = "10.96.0.10", **extra: Any) -> dict[str, Any]:
    return {"namespace": ns, "name": name, "vips": [vip], "ports": [{"name": "http", "port": 80}], **extra}


def ep(addr: str, port: int = 8080, **extra: Any) -> dict[str, Any]:
    return {"address": addr, "ports": {"http": port}, **extra}


def j(data: Any) -> bytes:
    return json.dumps(data).encode()


def addrs(snap: RegistrySnapshot, key: str) -> list[str]:
    s = next((s for s in snap.services if s.key == key), None)
    return [] if s is None else [str(e.address) for e in s.endpoints]


def keys(snap: RegistrySnapshot) -> list[str]:
    return [s.key for s in snap.services]


class Writer:
    """Raw puts/deletes under the test's prefix (bytes in, so anything can be written)."""

    def __init__(self, cfg: EtcdConfig):
        self.cfg, self.p, self.c = cfg, cfg.prefix, None

    async def __aenter__(self) -> Writer:
        self.c = await open_client(self.cfg, self.cfg.endpoints[0])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await close_client(self.c)

    async def put(self, key: str | bytes, value: bytes, lease: int | None = None) -> int:
        k = key if isinstance(key, bytes) else key.encode()
        return (await self.c.put(self.p.encode() + k, value, lease=lease)).header.revision

    async def delete(self, key: str) -> None:
        await self.c.delete((self.p + key).encode())


def test_initial_list_composes_services_with_sorted_endpoints_and_reports_bad_records(cfg, etcdlib) -> None:
    async def body() -> None:
        async with Writer(cfg) as w:
            await w.put("services/shop/web", j(svc("shop", "web")))
            await w.put("services/shop/api", j(svc("shop", "api", "10.96.0.11")))
            for eid, addr in [("b", "10.1.0.2"), ("a", "10.1.0.1"), ("c", "10.1.0.3")]:
                await w.put(f"endpoints/shop/web/{eid}", j(ep(addr)))
            await w.put("endpoints/shop/gone/x", j(ep("10.1.0.9")))  # its service does not exist
            await w.put("endpoints/shop/web/bad", b"{not json")
            await w.put("endpoints/shop/web/wrong-port", j({"address": "10.1.0.7", "ports": {"grpc": 9000}}))
            await w.put("endpoints/shop/web/dup", j(ep("10.1.0.1")))  # same backend as endpoint 'a'
            await w.put("services/shop/db", j(svc("shop", "db", "10.96.0.12", endpoints=[])))
            await w.put("services/shop/mismatch", j(svc("shop", "other", "10.96.0.13")))
            rev = await w.put("locks/not-ours", b"anything")  # outside services/ and endpoints/: ignored
        src = EtcdSource(cfg)
        async with etcdlib.running(src) as snaps:
            snap = await snaps.wait(lambda s: True)
            await asyncio.sleep(0.1)
            assert len(snaps.items) == 1  # one snapshot per list, not one per key
            assert src.connected and src.counters["relists"] == 0
        assert snap.revision == rev
        assert keys(snap) == ["shop/api", "shop/web"]
        assert addrs(snap, "shop/web") == ["10.1.0.1", "10.1.0.2", "10.1.0.3"]
        errors = {e.where: e.reason for e in snap.errors}
        p = cfg.prefix
        assert sorted(errors) == sorted([f"{p}endpoints/shop/web/bad", f"{p}endpoints/shop/web/dup",
                                         f"{p}endpoints/shop/web/wrong-port", f"{p}services/shop/db",
                                         f"{p}services/shop/mismatch"])
        assert "not valid JSON" in errors[f"{p}endpoints/shop/web/bad"]
        assert "unknown port name 'grpc'" in errors[f"{p}endpoints/shop/web/wrong-port"]
        assert "duplicates endpoint a" in errors[f"{p}endpoints/shop/web/dup"]
        assert "'endpoints' is not allowed" in errors[f"{p}services/shop/db"]
        assert "shop/mismatch" in errors[f"{p}services/shop/mismatch"] and "must match" in \
            errors[f"{p}services/shop/mismatch"]
        assert snap.orphan_endpoints == 1
    etcdlib.run(body())


def test_a_list_of_many_pages_is_one_snapshot_of_one_revision_while_writes_go_on(
        cfg, etcdlib, monkeypatch) -> None:
    """The list is parsed page by page (the next page requested before this one is parsed);
    the first snapshot must still be exactly etcd's content at one revision, with writes
    landing between the pages, and later writes arrive through the watch."""
    import meshd.sources.etcd as etcd_mod
    from aetcd import rpc
    from aetcd.utils import prefix_range_end
    monkeypatch.setattr(etcd_mod, "LIST_PAGE", 3)  # 42 keys: 14 pages
    monkeypatch.setattr(etcd_mod, "LIST_YIELD", 1)  # yield after every record: writes interleave

    async def body() -> None:
        async with Writer(cfg) as w:
            for i in range(6):
                await w.put(f"services/shop/s{i}", j(svc("shop", f"s{i}", f"10.96.0.{20 + i}")))
                for e in range(6):
                    await w.put(f"endpoints/shop/s{i}/e{e}", j(ep(f"10.1.{i}.{e + 1}")))
            stop = asyncio.Event()

            async def churn() -> None:  # weights keep changing while the source lists
                n = 0
                while not stop.is_set():
                    n += 1
                    await w.put(f"endpoints/shop/s{n % 6}/e0", j(ep(f"10.1.{n % 6}.1", weight=n)))
                    await asyncio.sleep(0.002)
            writer = asyncio.create_task(churn())
            src = EtcdSource(cfg)
            try:
                async with etcdlib.running(src) as snaps:
                    first = await snaps.wait(lambda s: True)
                    stop.set()
                    await writer
                    pre = cfg.prefix.encode()
                    resp = await w.c.kvstub.Range(rpc.RangeRequest(
                        key=pre, range_end=prefix_range_end(pre), revision=first.revision),
                        metadata=w.c.metadata)
                    at_rev = {kv.key.decode()[len(cfg.prefix):]: json.loads(kv.value) for kv in resp.kvs}
                    assert keys(first) == [f"shop/s{i}" for i in range(6)]
                    for s in first.services:
                        got = {f"endpoints/{s.key}/e{k}": e.weight for k, e in enumerate(s.endpoints)}
                        assert got == {k: v.get("weight", 1) for k, v in at_rev.items()
                                       if k.startswith(f"endpoints/{s.key}/")}, s.key
                    # and what was written after that revision comes through the watch
                    now = await w.put("endpoints/shop/s1/e5", j(ep("10.1.1.6", weight=999)))
                    last = await snaps.wait(lambda s: s.revision >= now)
                    assert last.services[1].endpoints[5].weight == 999
            finally:
                stop.set()
                await writer
    etcdlib.run(body())


def test_a_relist_cut_after_some_pages_shows_nothing_partial_and_converges(
        cfg, etcd_server, etcdlib, monkeypatch) -> None:
    """Pages are applied to the state as they arrive; a re-list whose connection dies half way
    leaves a state that mixes two revisions: no snapshot may show it, and the next list
    converges (keys it no longer lists are deleted then)."""
    import meshd.sources.etcd as etcd_mod
    monkeypatch.setattr(etcd_mod, "LIST_PAGE", 3)
    monkeypatch.setattr(etcd_mod, "LIST_YIELD", 1)

    def weights(snap: RegistrySnapshot) -> dict[str, list[int]]:
        return {s.key: [e.weight for e in s.endpoints] for s in snap.services}

    async def body() -> None:
        proxy, src = await _behind_proxy(cfg, etcdlib)
        try:
            async with Writer(cfg) as w:
                for i in range(6):
                    await w.put(f"services/shop/s{i}", j(svc("shop", f"s{i}", f"10.96.0.{20 + i}")))
                    for e in range(6):
                        await w.put(f"endpoints/shop/s{i}/e{e}", j(ep(f"10.1.{i}.{e + 1}")))
                async with etcdlib.running(src) as snaps:
                    await snaps.wait(lambda s: len(s.services) == 6)
                    await etcdlib.until(lambda: src.connected)
                    before = weights(snaps.items[-1])
                    proxy.pause()
                    await etcdlib.until(lambda: not src.connected, what="disconnected")
                    for i in range(6):  # while away: every weight changes, s5 goes
                        for e in range(6):
                            if i == 5:
                                await w.delete(f"endpoints/shop/s{i}/e{e}")
                            else:
                                await w.put(f"endpoints/shop/s{i}/e{e}", j(ep(f"10.1.{i}.{e + 1}", weight=5)))
                    await w.delete("services/shop/s5")
                    await asyncio.to_thread(etcd_server.compact)
                    seen = len(snaps.items)
                    proxy.resume()
                    # cut the re-list once part of it is in the state (LIST_YIELD=1: it yields
                    # after every record)
                    end = time.monotonic() + 10
                    while not (src._partial and src.state._endpoints.get("shop/s0", {}).get("e2")
                               and src.state._endpoints["shop/s0"]["e2"].weight == 5):
                        assert time.monotonic() < end, "the re-list did not start"
                        await asyncio.sleep(0)
                    proxy.pause()
                    await asyncio.sleep(0.5)
                    assert src._partial and len(snaps.items) == seen, "a partial state was emitted"
                    proxy.resume()
                    want = {f"shop/s{i}": [5] * 6 for i in range(5)}
                    await snaps.wait(lambda s: weights(s) == want, timeout=10)
                    assert all(weights(s) in (before, want) for s in snaps.items), \
                        [weights(s) for s in snaps.items]
        finally:
            await proxy.close()
    etcdlib.run(body())


def test_puts_modifications_and_deletes_are_followed(cfg, etcdlib) -> None:
    async def body() -> None:
        async with Writer(cfg) as w:
            src = EtcdSource(cfg)
            async with etcdlib.running(src) as snaps:
                await snaps.wait(lambda s: s.services == ())
                await w.put("services/shop/web", j(svc("shop", "web")))
                await snaps.wait(lambda s: keys(s) == ["shop/web"])
                await w.put("endpoints/shop/web/a", j(ep("10.1.0.1")))
                await w.put("endpoints/shop/web/b", j(ep("10.1.0.2")))
                await snaps.wait(lambda s: addrs(s, "shop/web") == ["10.1.0.1", "10.1.0.2"])
                await w.put("services/shop/web", j(svc("shop", "web", "10.96.0.99")))  # modify the service
                snap = await snaps.wait(lambda s: str(s.services[0].vips[0]) == "10.96.0.99")
                assert addrs(snap, "shop/web") == ["10.1.0.1", "10.1.0.2"]  # endpoints kept
                await w.put("endpoints/shop/web/a", j(ep("10.1.0.1", weight=0)))  # modify an endpoint
                await snaps.wait(lambda s: s.services[0].endpoints[0].weight == 0)
                await w.put("endpoints/shop/web/b", b"broken")  # a good record turns bad: dropped, reported
                snap = await snaps.wait(lambda s: addrs(s, "shop/web") == ["10.1.0.1"])
                assert [e.where for e in snap.errors] == [f"{cfg.prefix}endpoints/shop/web/b"]
                await w.delete("endpoints/shop/web/b")  # deleting the bad record clears its error
                await snaps.wait(lambda s: s.errors == ())
                await w.delete("services/shop/web")
                snap = await snaps.wait(lambda s: s.services == ())
                assert snap.orphan_endpoints == 1
                await w.delete("endpoints/shop/web/a")
                snap = await snaps.wait(lambda s: s.orphan_endpoints == 0)
                assert snap.revision == src.revision
                assert src.counters["events"] >= 9
    etcdlib.run(body())


def test_lease_attached_endpoint_disappears_after_the_lease_expires(cfg, etcdlib) -> None:
    async def body() -> None:
        src = EtcdSource(cfg)
        async with Registry(cfg) as reg, etcdlib.running(src) as snaps:
            await reg.put_service(svc("shop", "web"))
            await reg.add_endpoint("shop", "web", "static", ep("10.1.0.1"))
            lease = await reg.add_endpoint("shop", "web", "leased", ep("10.1.0.2"), ttl=2)
            assert lease
            await snaps.wait(lambda s: addrs(s, "shop/web") == ["10.1.0.2", "10.1.0.1"])  # ids: leased < static
            t0 = time.monotonic()
            await snaps.wait(lambda s: addrs(s, "shop/web") == ["10.1.0.1"], timeout=6)
            assert 1.0 < time.monotonic() - t0 < 6
    etcdlib.run(body())


def test_etcd_restart_resumes_the_watch_and_sees_writes_made_right_after(cfg, etcd_server, etcdlib) -> None:
    async def body() -> None:
        async with Writer(cfg) as w:
            await w.put("services/shop/web", j(svc("shop", "web")))
            await w.put("endpoints/shop/web/a", j(ep("10.1.0.1")))
            await w.put("endpoints/shop/web/b", j(ep("10.1.0.2")))
        src = EtcdSource(cfg)
        async with etcdlib.running(src) as snaps:
            await snaps.wait(lambda s: addrs(s, "shop/web") == ["10.1.0.1", "10.1.0.2"])
            await etcdlib.until(lambda: src.connected, what="connected")
            await etcd_server.etcd.stop()
            await etcdlib.until(lambda: not src.connected, what="disconnected")
            await etcd_server.etcd.start(timeout=20)
            async with Writer(cfg) as w:  # right after the restart, racing the source's reconnect
                await w.delete("endpoints/shop/web/b")
                await w.put("endpoints/shop/web/c", j(ep("10.1.0.3")))
                await w.put("services/shop/api", j(svc("shop", "api", "10.96.0.11")))
            snap = await snaps.wait(lambda s: addrs(s, "shop/web") == ["10.1.0.1", "10.1.0.3"]
                                    and keys(s) == ["shop/api", "shop/web"], timeout=10)
            await etcdlib.until(lambda: src.connected, what="reconnected")
            assert src.counters["relists"] == 0  # resumed from its revision, no re-list
            assert src.counters["watch_restarts"] >= 1
            assert src.last_error is None
            assert snap.errors == ()
    try:
        etcdlib.run(body(), timeout=40)
    finally:
        if not etcd_server.running:
            etcd_server.start()


async def _behind_proxy(cfg: EtcdConfig, etcdlib):  # type: ignore[no-untyped-def]
    proxy = await etcdlib.TcpProxy(cfg.endpoints[0]).start()
    return proxy, EtcdSource(cfg, endpoints=[proxy.url])


def test_lost_connection_resumes_from_the_last_revision_without_relisting(cfg, etcdlib) -> None:
    async def body() -> None:
        proxy, src = await _behind_proxy(cfg, etcdlib)
        try:
            async with Writer(cfg) as w:
                await w.put("services/shop/web", j(svc("shop", "web")))
                await w.put("endpoints/shop/web/a", j(ep("10.1.0.1")))
                async with etcdlib.running(src) as snaps:
                    await snaps.wait(lambda s: addrs(s, "shop/web") == ["10.1.0.1"])
                    await etcdlib.until(lambda: src.connected)
                    proxy.pause()
                    await etcdlib.until(lambda: not src.connected, what="disconnected")
                    await w.put("endpoints/shop/web/b", j(ep("10.1.0.2")))
                    await w.delete("endpoints/shop/web/a")
                    await asyncio.sleep(0.3)  # it retries (and fails) meanwhile
                    assert addrs(snaps.last, "shop/web") == ["10.1.0.1"]
                    proxy.resume()
                    await snaps.wait(lambda s: addrs(s, "shop/web") == ["10.1.0.2"], timeout=10)
                    assert src.counters["relists"] == 0 and src.counters["watch_restarts"] >= 1
        finally:
            await proxy.close()
    etcdlib.run(body())


def test_compaction_during_an_outage_relists_and_converges(cfg, etcd_server, etcdlib) -> None:
    async def body() -> None:
        proxy, src = await _behind_proxy(cfg, etcdlib)
        try:
            async with Writer(cfg) as w:
                for name in ("web", "api", "db"):
                    await w.put(f"services/shop/{name}", j(svc("shop", name, f"10.96.0.{len(name) + 10}"
                                                              if name != "db" else "10.96.0.20")))
                await w.put("endpoints/shop/web/a", j(ep("10.1.0.1")))
                await w.put("endpoints/shop/web/b", j(ep("10.1.0.2")))
                async with etcdlib.running(src) as snaps:
                    await snaps.wait(lambda s: len(s.services) == 3 and len(addrs(s, "shop/web")) == 2)
                    await etcdlib.until(lambda: src.connected)
                    proxy.pause()
                    await etcdlib.until(lambda: not src.connected, what="disconnected")
                    await w.delete("services/shop/api")  # deletes during the outage ...
                    await w.delete("endpoints/shop/web/a")
                    await w.put("endpoints/shop/web/b", j(ep("10.1.0.2", weight=7)))  # ... a change ...
                    await w.put("services/shop/new", j(svc("shop", "new", "10.96.0.30")))  # ... an add
                    await w.put("endpoints/shop/new/x", j(ep("10.1.0.30")))
                    await w.delete("endpoints/shop/new/x")  # (created and deleted while away)
                    rev = await asyncio.to_thread(etcd_server.compact)
                    proxy.resume()
                    snap = await snaps.wait(lambda s: s.revision >= rev, timeout=10)
                    assert keys(snap) == ["shop/db", "shop/new", "shop/web"]
                    assert addrs(snap, "shop/web") == ["10.1.0.2"]
                    assert snap.services[2].endpoints[0].weight == 7
                    assert addrs(snap, "shop/new") == []
                    assert src.counters["relists"] == 1
                    await etcdlib.until(lambda: src.connected)
                    await w.put("endpoints/shop/new/y", j(ep("10.1.0.31")))  # and it watches again
                    await snaps.wait(lambda s: addrs(s, "shop/new") == ["10.1.0.31"])
        finally:
            await proxy.close()
    etcdlib.run(body())


def test_a_new_run_resumes_and_relists_only_when_its_revision_was_compacted(cfg, etcd_server, etcdlib) -> None:
    async def body() -> None:
        src = EtcdSource(cfg)
        async with Writer(cfg) as w:
            await w.put("services/shop/web", j(svc("shop", "web")))
            async with etcdlib.running(src) as snaps:
                await snaps.wait(lambda s: keys(s) == ["shop/web"])
            await w.put("endpoints/shop/web/a", j(ep("10.1.0.1")))
            async with etcdlib.running(src) as snaps:  # same object: resumes, emits at once
                await snaps.wait(lambda s: addrs(s, "shop/web") == ["10.1.0.1"])
            assert src.counters["relists"] == 0
            await w.delete("services/shop/web")
            await w.put("services/shop/api", j(svc("shop", "api", "10.96.0.11")))
            await asyncio.to_thread(etcd_server.compact)
            async with etcdlib.running(src) as snaps:
                snap = await snaps.wait(lambda s: keys(s) == ["shop/api"])
                assert snap.orphan_endpoints == 1
            assert src.counters["relists"] == 1
    etcdlib.run(body())


def test_failover_to_the_next_endpoint_and_consumer_errors_do_not_stop_the_source(cfg, etcdlib) -> None:
    dead = f"http://127.0.0.1:{etcdlib.free_ports(1)[0]}"
    seen: list[RegistrySnapshot] = []

    async def flaky(snap: RegistrySnapshot) -> None:
        seen.append(snap)
        if len(seen) == 1:
            raise RuntimeError("consumer bug")

    async def body() -> None:
        src = EtcdSource(cfg, endpoints=[dead, cfg.endpoints[0]])
        task = asyncio.create_task(src.run(flaky))
        try:
            await etcdlib.until(lambda: len(seen) == 1, timeout=5, what="first snapshot")
            assert src.counters["watch_restarts"] == 1  # the dead endpoint, once
            async with Writer(cfg) as w:
                await w.put("services/shop/web", j(svc("shop", "web")))
            await etcdlib.until(lambda: len(seen) == 2, what="second snapshot")
            assert [s.key for s in seen[1].services] == ["shop/web"]
            # the daemon forks `ip`/`tc` while gRPC threads run: must work (GRPC_ENABLE_FORK_SUPPORT)
            for _ in range(5):
                assert subprocess.run(["true"], timeout=5).returncode == 0
            out = await asyncio.to_thread(subprocess.run, ["/usr/bin/etcdctl", "version"], capture_output=True,
                                          timeout=10)
            assert out.returncode == 0
            assert not task.done()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    etcdlib.run(body())


def test_pathological_values_become_record_errors(cfg, etcdlib) -> None:
    bad = {
        "endpoints/shop/web/huge": b" " * MAX_VALUE_BYTES + b"{}",
        "endpoints/shop/web/deep": b"[" * 100_000 + b"]" * 100_000,
        "endpoints/shop/web/utf": b'{"address": "\xff"}',
        "endpoints/shop/web/dupkey": b'{"address": "10.1.0.1", "address": "10.1.0.2", "ports": {"http": 1}}',
        "endpoints/shop/web/nan": b'{"address": "10.1.0.1", "ports": {"http": NaN}}',
        "endpoints/shop/web/bigint": b'{"address": "10.1.0.1", "ports": {"http": ' + b"9" * 5000 + b"}}",
        "endpoints/shop/web/list": b"[1, 2]",
        "endpoints/shop/web/empty": b"",
        "endpoints/shop/web/float": j(ep("10.1.0.1", weight=1.0)),
        "endpoints/shop/web/bool": j(ep("10.1.0.1", ready="yes")),
        "endpoints/shop/web/a b": j(ep("10.1.0.1")),
        "endpoints/shop/Web/a": j(ep("10.1.0.1")),
        "endpoints/shop/web": j(ep("10.1.0.1")),
        "endpoints/shop/web/a/b": j(ep("10.1.0.1")),
        "endpoints//web/a": j(ep("10.1.0.1")),
        "services/shop": j(svc("shop", "x")),
        "services/shop/web/extra": j(svc("shop", "web")),
        "services/shop/web2": j({**svc("shop", "web2"), "vips": "10.96.0.1"}),
    }
    p = cfg.prefix

    async def body() -> None:
        async with Writer(cfg) as w:
            await w.put("services/shop/web", j(svc("shop", "web")))
            await w.put("endpoints/shop/web/good", j(ep("10.1.0.50")))
            for k, v in bad.items():
                await w.put(k, v)
            await w.put(b"endpoints/shop/web/\xff\xfe", j(ep("10.1.0.1")))
            await w.put(b"services/\xc3", j(svc("shop", "x")))
            await w.put("other/ignored", b"\xff")
        src = EtcdSource(cfg)
        async with etcdlib.running(src) as snaps:
            snap = await snaps.wait(lambda s: True)
        assert addrs(snap, "shop/web") == ["10.1.0.50"]
        where = {e.where for e in snap.errors}
        expected = {p + k for k in bad} | {key_text(p.encode() + b"endpoints/shop/web/\xff\xfe"),
                                           key_text(p.encode() + b"services/\xc3")}
        assert where == expected
        reasons = {e.where: e.reason for e in snap.errors}
        assert "at most" in reasons[p + "endpoints/shop/web/huge"]
        assert "nested too deeply" in reasons[p + "endpoints/shop/web/deep"]
        assert "appears twice" in reasons[p + "endpoints/shop/web/dupkey"]
        assert "UTF-8" in reasons[key_text(p.encode() + b"endpoints/shop/web/\xff\xfe")]
        assert "malformed key" in reasons[p + "endpoints/shop/web/a/b"]
    etcdlib.run(body())


# ---- junk next to good records (property test) -----------------------------------------------

_seg = st.one_of(st.sampled_from(["", "a", "Web", "x y", "ok", "-x", "a.b", "é", "0"]),
                 st.text(alphabet="abcXYZ09-._ /%\\\n", max_size=10))
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=6)


def _bad_service(ns: str, name: str) -> st.SearchStrategy[bytes]:
    base = svc(ns, name, "10.96.1.1")
    return st.one_of(
        st.sampled_from(["namespace", "name", "vips", "ports"]).map(lambda k: j({x: v for x, v in base.items() if x != k})),
        st.tuples(st.sampled_from(["vips", "ports", "session_affinity", "lb"]), _json).filter(
            lambda kv: kv[1] not in ({}, None) or kv[0] in ("vips", "ports")).map(lambda kv: j({**base, kv[0]: kv[1]})),
        _json.map(lambda v: j({**base, "bogus": v})),
        st.just(j({**base, "endpoints": []})),
        st.just(j({**base, "name": name + "x"})),
        st.binary(max_size=40), _json.filter(lambda v: not isinstance(v, dict)).map(j),
    )


def _bad_endpoint() -> st.SearchStrategy[bytes]:
    base = ep("10.1.9.9")
    return st.one_of(
        st.sampled_from(["address", "ports"]).map(lambda k: j({x: v for x, v in base.items() if x != k})),
        st.tuples(st.sampled_from(["address", "ports", "weight", "ready", "terminating"]), _json).filter(
            lambda kv: not (kv[0] == "ready" and isinstance(kv[1], bool))
            and not (kv[0] == "terminating" and isinstance(kv[1], bool))
            and not (kv[0] == "weight" and type(kv[1]) is int and 0 <= kv[1] <= 65535)).map(
            lambda kv: j({**base, kv[0]: kv[1]})),
        _json.map(lambda v: j({**base, "zzz": v})),
        st.just(j(ep("10.1.9.9", port=9))).map(lambda b: b.replace(b'"http"', b'"nope"')),  # unknown port name
        st.binary(max_size=40), _json.filter(lambda v: not isinstance(v, dict)).map(j),
    )


_junk_record = st.one_of(
    # well-formed keys, bad values (for good services too: their good endpoints must survive)
    st.tuples(st.sampled_from(["good/s0", "good/s1", "junk/s9"]), st.integers(0, 99)).flatmap(
        lambda t: st.tuples(st.just(f"endpoints/{t[0]}/junk-{t[1]}".encode()), _bad_endpoint())),
    st.sampled_from(["a", "b", "c"]).flatmap(
        lambda n: st.tuples(st.just(f"services/junk/{n}".encode()), _bad_service("junk", n))),
    # malformed keys, values that would be fine
    st.tuples(st.lists(_seg, max_size=5).map(lambda parts: "services/" + "/".join(parts)),
              st.just(j(svc("junk", "k")))).filter(lambda kv: not kv[0].startswith("services/good/")).map(
        lambda kv: (kv[0].encode(), kv[1])),
    st.tuples(st.lists(_seg, max_size=6).map(lambda parts: "endpoints/" + "/".join(parts)),
              st.just(j(ep("10.1.8.8")))).filter(lambda kv: not kv[0].startswith("endpoints/good/")).map(
        lambda kv: (kv[0].encode(), kv[1])),
    st.tuples(st.binary(min_size=1, max_size=12).map(lambda b: b"endpoints/junk/" + b), st.binary(max_size=30)),
)


def _valid_by_oracle(key: bytes, value: bytes) -> bool:
    """The few generated records that are accidentally fine (e.g. endpoints/junk/k/ok with a good
    endpoint): a plain re-statement of the schema, independent of the source's code."""
    try:
        text = key.decode()
        parts = text.split("/")
        data = json.loads(value)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    import re
    label = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
    if parts[0] == "endpoints" and len(parts) == 4 and all(label.fullmatch(x) and len(x) <= 63 for x in parts[1:3]) \
            and re.fullmatch(r"[A-Za-z0-9._-]{1,253}", parts[3]):
        if data == ep("10.1.8.8"):
            return True
        # an endpoint naming a port its service lacks is only wrong when the service exists
        return data == {"address": "10.1.9.9", "ports": {"nope": 9}} and parts[1:3] not in (["good", "s0"],
                                                                                          ["good", "s1"])
    if parts[0] == "services" and len(parts) == 3:
        return data == svc("junk", "k") and parts[1:] == ["junk", "k"]
    return False


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(before=st.lists(_junk_record, max_size=12), after=st.lists(_junk_record, max_size=8))
def test_junk_records_are_reported_with_their_keys_and_good_services_keep_serving(etcd_server, etcdlib,
                                                                                before, after) -> None:
    cfg = EtcdConfig(endpoints=[etcd_server.url], prefix=f"/h-{uuid.uuid4().hex[:8]}/", dial_timeout=3)
    p = cfg.prefix.encode()
    good = {b"services/good/s0": j(svc("good", "s0", "10.96.2.1")),
            b"services/good/s1": j(svc("good", "s1", "10.96.2.2")),
            b"endpoints/good/s0/e1": j(ep("10.1.2.1")), b"endpoints/good/s0/e2": j(ep("10.1.2.2")),
            b"endpoints/good/s1/e1": j(ep("10.1.2.3"))}

    def check(snap: RegistrySnapshot, junk: dict[bytes, bytes]) -> None:
        assert keys(snap) == ["good/s0", "good/s1"]
        assert addrs(snap, "good/s0") == ["10.1.2.1", "10.1.2.2"]
        assert addrs(snap, "good/s1") == ["10.1.2.3"]
        expected = {key_text(p + k) for k, v in junk.items() if not _valid_by_oracle(k, v)}
        assert {e.where for e in snap.errors} == expected
        assert all(e.reason for e in snap.errors)

    async def body() -> None:
        async with Writer(cfg) as w:
            junk: dict[bytes, bytes] = {}
            c = w.c
            junk.update(before)  # (a txn may not name a key twice: last one wins, as in etcd)
            ops = [c.transactions.put(p + k, v) for k, v in {**good, **dict(before)}.items()]
            await c.transaction(compare=[], success=ops, failure=[])
            src = EtcdSource(cfg)
            async with etcdlib.running(src) as snaps:
                check(await snaps.wait(lambda s: True), junk)
                if after:  # the same through the watch
                    junk.update(after)
                    await c.transaction(compare=[], success=[c.transactions.put(p + k, v)
                                                             for k, v in dict(after).items()], failure=[])
                    # a put of an unchanged value emits nothing: follow with a change to wait for
                    good[b"endpoints/good/s1/e1"] = j(ep("10.1.2.3", weight=2))
                    await c.put(p + b"endpoints/good/s1/e1", good[b"endpoints/good/s1/e1"])
                    snap = await snaps.wait(lambda s: s.services[1].endpoints[0].weight == 2)
                    check(snap, junk)
            await c.delete_prefix(p)
    etcdlib.run(body())


# ---- cost of a snapshot ------------------------------------------------------------------------

def test_snapshot_cost_at_10000_services_with_10_endpoints_each() -> None:
    prefix = "/meshd/"
    state = RegistryState(prefix)
    t0 = time.perf_counter()
    items = []
    for i in range(10_000):
        ns, name = f"ns{i % 50}", f"svc{i}"
        items.append((f"{prefix}services/{ns}/{name}".encode(),
                      j(svc(ns, name, f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"))))
        for e in range(10):
            items.append((f"{prefix}endpoints/{ns}/{name}/ep-{e}".encode(),
                          j(ep(f"10.200.{i // 256 % 256}.{e}", 8000 + i % 256))))
    state.replace(items)
    first = state.snapshot(1)
    build = time.perf_counter() - t0
    assert len(first.services) == 10_000 and first.errors == () and len(first.services[0].endpoints) == 10

    costs = []
    touched = set()
    for n in range(50):
        i = n * 197 % 10_000
        touched.add(f"ns{i % 50}/svc{i}")
        t = time.perf_counter()
        state.put(f"{prefix}endpoints/ns{i % 50}/svc{i}/ep-3".encode(),
                  j(ep(f"10.200.{i // 256 % 256}.3", 8000 + i % 256, weight=n + 2)))
        snap = state.snapshot(2 + n)
        costs.append(time.perf_counter() - t)
        assert next(s for s in snap.services if s.key == f"ns{i % 50}/svc{i}").endpoints[3].weight == n + 2
    costs.sort()
    p50, p99 = statistics.median(costs), costs[-1]
    print(f"\n10,000 services x 10 endpoints: initial build {build:.2f}s; one endpoint change -> snapshot "
          f"p50 {p50 * 1e3:.3f} ms, max {p99 * 1e3:.3f} ms")
    assert p50 < 0.005 and p99 < 0.050
    # the unchanged services are the same objects (a consumer can diff by identity)
    assert all(a is b for a, b in zip(first.services, snap.services) if a.key not in touched)


def test_write_to_emit_latency_is_small(cfg, etcdlib) -> None:
    async def body() -> None:
        src = EtcdSource(cfg)
        lat = []
        async with Writer(cfg) as w, etcdlib.running(src) as snaps:
            await w.put("services/shop/web", j(svc("shop", "web")))
            await snaps.wait(lambda s: len(s.services) == 1)
            for n in range(30):
                t = time.perf_counter()
                await w.put("endpoints/shop/web/a", j(ep("10.1.0.1", weight=n + 1)))
                await snaps.wait(lambda s: s.services[0].endpoints and s.services[0].endpoints[0].weight == n + 1)
                lat.append(time.perf_counter() - t)
                await asyncio.sleep(0.025)  # spaced writes: no coalescing delay
        lat.sort()
        print(f"\netcd put -> emit: p50 {statistics.median(lat) * 1e3:.1f} ms, max {lat[-1] * 1e3:.1f} ms")
        assert statistics.median(lat) < 0.050
    etcdlib.run(body())


def test_state_recomposes_a_service_when_any_of_its_records_changes() -> None:
    p = "/m/"
    st = RegistryState(p)
    st.put(b"/m/services/a/web", j(svc("a", "web")))
    st.put(b"/m/endpoints/a/web/1", j(ep("10.1.0.1")))
    st.put(b"/m/endpoints/a/web/2", j({"address": "10.1.0.2", "ports": {"grpc": 9000}}))
    snap = st.snapshot(1)
    assert addrs(snap, "a/web") == ["10.1.0.1"] and [e.where for e in snap.errors] == ["/m/endpoints/a/web/2"]
    # the service gains the port: the endpoint that named it is no longer an error
    st.put(b"/m/services/a/web", j({**svc("a", "web"), "ports": [{"name": "http", "port": 80},
                                                                {"name": "grpc", "port": 90}]}))
    snap = st.snapshot(2)
    assert addrs(snap, "a/web") == ["10.1.0.1", "10.1.0.2"] and snap.errors == ()
    # the service record breaks: its endpoints become orphans, the service's own error is listed
    st.put(b"/m/services/a/web", b"{}")
    snap = st.snapshot(3)
    assert snap.services == () and snap.orphan_endpoints == 2
    assert [e.where for e in snap.errors] == ["/m/services/a/web"]
    st.put(b"/m/services/a/web", j(svc("a", "web")))
    snap = st.snapshot(4)
    assert addrs(snap, "a/web") == ["10.1.0.1"] and snap.orphan_endpoints == 0
    assert [e.where for e in snap.errors] == ["/m/endpoints/a/web/2"]
    # unchanged puts are no-ops; deletes of unknown keys too; a snapshot with no change is the same
    assert not st.put(b"/m/services/a/web", j(svc("a", "web")))
    assert not st.delete(b"/m/endpoints/a/web/none")
    assert not st.put(b"/m/other", b"x") and len(st) == 3
    again = st.snapshot(5)
    assert again.services is snap.services and again.errors is snap.errors
    # a full list converges: missing keys deleted, unchanged ones kept as they are
    st.replace([(b"/m/services/a/web", j(svc("a", "web"))), (b"/m/endpoints/a/web/3", j(ep("10.1.0.3")))])
    snap = st.snapshot(6)
    assert addrs(snap, "a/web") == ["10.1.0.3"] and snap.errors == () and len(st) == 2


def test_an_endpoint_record_on_loopback_or_metadata_is_rejected_unless_its_service_opts_in(cfg, etcdlib) -> None:
    """Issue 12 item 5: whoever can write one endpoint key must not be able to send an existing
    service's clients to this machine (127.0.0.1:22) or its metadata service."""
    async def body() -> None:
        src = EtcdSource(cfg)
        async with Writer(cfg) as w, etcdlib.running(src) as snaps:
            await w.put(f"services/a/web", j(svc("a", "web")))
            await w.put(f"endpoints/a/web/good", j(ep("10.1.0.1")))
            await w.put(f"endpoints/a/web/ssh", j(ep("127.0.0.1", 22)))
            await w.put(f"endpoints/a/web/meta", j(ep("169.254.169.254", 80)))
            await w.put(f"endpoints/a/web/v6", j(ep("::1", 22)))
            snap = await snaps.wait(lambda s: len(s.errors) == 3, what="three rejected endpoints")
            assert addrs(snap, "a/web") == ["10.1.0.1"]
            why = {e.where.rsplit("/", 1)[1]: e.reason for e in snap.errors}
            assert "127.0.0.1 is a loopback address" in why["ssh"] and "allow_local_endpoints" in why["ssh"]
            assert "169.254.169.254 is a cloud metadata address" in why["meta"]
            assert "::1 is a loopback address" in why["v6"]
            # the service opts in (a lab, a node-local agent): the same records are accepted
            await w.put(f"services/a/web", j(svc("a", "web", allow_local_endpoints=True)))
            snap = await snaps.wait(lambda s: not s.errors and len(addrs(s, "a/web")) == 4,
                                    what="the local endpoints accepted")
            assert addrs(snap, "a/web") == ["10.1.0.1", "169.254.169.254", "127.0.0.1", "::1"]
    etcdlib.run(body())


def pol(ns: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"namespace": ns, "name": name, "from": [{"unit": "web.service"}], "to": [{"service": "db"}], **extra}


def test_policies_are_listed_and_watched_with_the_services(cfg, etcdlib) -> None:
    async def body() -> None:
        async with Writer(cfg) as w:
            await w.put("services/shop/db", j(svc("shop", "db")))
            await w.put("policies/shop/web-to-db", j(pol("shop", "web-to-db")))
            await w.put("policies/shop/broken", j(pol("shop", "broken", action="permit")))
            src = EtcdSource(cfg)
            async with etcdlib.running(src) as snaps:
                first = await snaps.wait(lambda s: s.policies, what="the listed policy")
                assert [p.key for p in first.policies] == ["shop/web-to-db"] and keys(first) == ["shop/db"]
                assert first.policies[0].to[0].service == "shop/db"
                assert [(e.where, e.reason) for e in first.errors] == [
                    (f"{cfg.prefix}policies/shop/broken", "action: must be 'allow' or 'deny' (got 'permit')")]
                # watched: a new policy, a change, a delete, each in a snapshot of its own
                await w.put("policies/shop/deny-batch", j(pol("shop", "deny-batch", action="deny")))
                snap = await snaps.wait(lambda s: len(s.policies) == 2, what="the added policy")
                assert [p.key for p in snap.policies] == ["shop/deny-batch", "shop/web-to-db"]
                await w.put("policies/shop/broken", j(pol("shop", "broken")))
                snap = await snaps.wait(lambda s: len(s.policies) == 3 and not s.errors, what="the fixed policy")
                await w.delete("policies/shop/web-to-db")
                snap = await snaps.wait(lambda s: len(s.policies) == 2, what="the deleted policy")
                assert [p.key for p in snap.policies] == ["shop/broken", "shop/deny-batch"]
                assert keys(snap) == ["shop/db"]  # the services are untouched
    etcdlib.run(body())
