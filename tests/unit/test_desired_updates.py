"""DesiredState.update with `updates` (what the etcd source knows changed) gives what a full
pass over every service gives, and the bookkeeping that decides when `updates` may be used
(meshd/agent/sources.py, the etcd snapshot) falls back to a full pass when it cannot know."""

from __future__ import annotations

import asyncio
from ipaddress import ip_address, ip_network

from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.agent.sources import Sources, SourceState
from meshd.desired import DesiredState, NodeInfo, NodePorts
from meshd.model import parse_service
from meshd.sources.etcd_records import RegistryState

NODE = NodeInfo("node-1", "zone-a")
NP = NodePorts((ip_address("192.0.2.10"),), (30000, 32767))
CIDRS = [ip_network("10.96.0.0/12")]


def service(i: int, vip: int, backends: int):
    return parse_service({
        "namespace": "t", "name": f"s{i}", "vips": [f"10.96.0.{vip}"],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        "endpoints": [{"address": f"10.1.{i}.{b + 1}", "ports": {"http": 8080}}
                      for b in range(backends)]}, where=f"s{i}")


def outcome(d: DesiredState, result) -> tuple:
    groups, errors = result
    return ({k: (g.frontends, g.backends) for k, g in groups.items()},
            sorted((e.where, e.reason) for e in errors), d.served)


# a change: (service index, its VIP's last octet -- VIPs collide on purpose --, backends;
# 0 backends and vip 0 mean the service is gone)
changes = st.lists(st.tuples(st.integers(0, 7), st.integers(0, 4), st.integers(1, 3)),
                   min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(first=changes, steps=st.lists(changes, min_size=1, max_size=6))
def test_updates_give_what_a_full_pass_gives(first, steps):
    now: dict[str, object] = {}

    def apply(batch) -> dict:
        upd = {}
        for i, vip, n in batch:
            key = f"t/s{i}"
            s = None if vip == 0 else service(i, vip, n)
            if s is None:
                now.pop(key, None)
            else:
                now[key] = s
            upd[key] = s
        return upd

    apply(first)
    fast, full = DesiredState(), DesiredState()
    args = (CIDRS, set(), NP, NODE)
    fast.update(list(now.values()), *args)
    full.update(list(now.values()), *args)
    for batch in steps:
        upd = apply(batch)
        a = fast.update(lambda: (_ for _ in ()).throw(AssertionError("no full pass")), *args,
                        (), upd) if not fast._conflicts else None
        b = full.update(list(now.values()), *args)
        assert a is not None and outcome(fast, a) == outcome(full, b)
        assert fast.changed_groups == full.changed_groups


def test_a_reset_or_no_updates_takes_the_full_list():
    s1, s2 = service(1, 1, 1), service(2, 2, 1)
    d = DesiredState()
    d.update([s1], CIDRS, set(), NP, NODE)
    groups, _ = d.update(lambda: [s1, s2], [ip_network("10.96.0.0/16")], set(), NP, NODE,
                         (), {"t/s2": s2})  # new CIDRs: a reset, the list decides
    assert set(groups) == {"t/s1:http/ipv4", "t/s2:http/ipv4"}


def test_sources_hand_over_updates_only_when_they_are_known():
    async def run():
        src = Sources()
        src["etcd"], src["file"] = SourceState(), SourceState()
        a, b = service(1, 1, 1), service(2, 2, 1)
        src.publish("etcd", [a], [], updates={"t/s1": a})
        assert src.take_updates() is None  # the first snapshot of a source: unknown
        src.publish("etcd", [a, b], [], updates={"t/s2": b})
        src.publish("etcd", [a, b], [], updates={"t/s1": a})
        assert src.take_updates() == {"t/s2": b, "t/s1": a}  # accumulated
        assert src.take_updates() == {}
        src.publish("etcd", [a], [], updates=None)  # a service went: unknown
        assert src.take_updates() is None
        src.publish("file", [b], [])  # a second source with services: a full pass decides
        src.publish("etcd", [a], [], updates={"t/s1": a})
        assert src.take_updates() is None
        src.publish("file", [], [])
        assert src.take_updates() is None  # the file's change is unknown
        src.publish("etcd", [a], [], updates={"t/s1": a})
        assert src.take_updates() == {"t/s1": a}
        src.forget_updates()  # a failed sync
        assert src.take_updates() is None
    asyncio.run(run())


def test_etcd_snapshots_name_what_changed_and_not_what_came_or_went():
    st_ = RegistryState("/meshd/")
    svc = b'{"namespace": "t", "name": "web", "vips": ["10.96.0.10"], ' \
          b'"ports": [{"name": "http", "port": 80}]}'
    ep = b'{"address": "10.1.0.1", "ports": {"http": 8080}}'
    st_.put(b"/meshd/services/t/web", svc)
    first = st_.snapshot(1)
    assert first.updates is None and len(first.services) == 1  # a service came
    st_.put(b"/meshd/endpoints/t/web/e1", ep)
    second = st_.snapshot(2)
    assert second.updates == {"t/web": second.services[0]}
    assert len(second.services[0].endpoints) == 1
    assert st_.snapshot(3).updates == {}
    st_.delete(b"/meshd/services/t/web")
    assert st_.snapshot(4).updates is None  # a service went
