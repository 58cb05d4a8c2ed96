"""`meshd observe` and the daemon's event hub: filters, the readable line, history and live
events over the real unix socket (events from a stand-in reader; the kernel side is
tests/kernel/ and tests/lab/test_policy.py)."""

from __future__ import annotations

import asyncio
import os
import stat
import time

import pytest

from meshd.agent.events import EventHub, Namer
from meshd.dataplane.events import TYPES, Event
from meshd.observe import format_line, matches, parse_since, stream


def raw(kind: int, **kw) -> Event:
    """A decoded kernel event (meshd.dataplane.events.Event) of type MESHD_EV_<kind>."""
    base = dict(type=TYPES[kind], ts_ns=time.monotonic_ns(), cookie=7, cgroup=4242, duration_ns=0,
                tx_bytes=0, rx_bytes=0, pid=99, uid=1000, identity=3, group=5, backend=11,
                policy=0, err=0, vip="10.96.0.20", backend_addr="10.1.0.7", vip_port=5432,
                backend_port=5432, proto="TCP", sendmsg=False, comm="psql")
    base.update(kw)
    return Event(**base)


def namer() -> Namer:
    n = Namer()
    n.group_key = {5: "default/db:pg/ipv4"}.get
    n.identity_label = {3: "unit:web.service"}.get
    n.identity_selectors = lambda i: ("unit:web.service",) if i == 3 else ()
    n.policy_key = {4: "default/no-batch"}.get
    n.cgroup_path = {4242: "/system.slice/web.service"}.get
    return n


def test_events_are_named_for_people_and_machines():
    n = namer()
    ev = n.event(raw(4, duration_ns=35_200_000, tx_bytes=1200, rx_bytes=18400))
    assert ev["type"] == "closed" and ev["verdict"] == "allowed"
    assert ev["service"] == "default/db:pg" and ev["frontend"] == "10.96.0.20:5432/TCP"
    assert ev["backend"] == "10.1.0.7:5432" and ev["cgroup"] == "/system.slice/web.service"
    assert ev["identity"] == "unit:web.service" and ev["duration_ms"] == 35.2
    assert abs(ev["time"] - time.time()) < 5
    line = format_line(ev)
    assert "CLOSED" in line and "psql[99]" in line and "=> 10.1.0.7:5432" in line
    assert "35.2 ms" in line and "sent 1.2 kB" in line
    d = n.event(raw(2, policy=4, backend=0, backend_addr=None))
    assert d["verdict"] == "denied" and d["policy"] == "default/no-batch"
    assert d["backend"] is None and "DENIED by default/no-batch" in format_line(d)
    f = n.event(raw(3, err=111, duration_ns=300_000))
    assert f["error"] == "ECONNREFUSED" and "ECONNREFUSED after 0.3 ms" in format_line(f)


def test_an_identity_the_hook_did_not_look_up_is_named_from_the_cgroup():
    """The kernel puts an identity in an event only where a policy check looked it up;
    elsewhere (0) the daemon names it from the event's cgroup as the kernel would."""
    from meshd.agent.policies import PolicyState
    from meshd.policy import PolicyTables

    pol = PolicyState()
    pol.cgroups = {"/": 1, "/system.slice": 10, "/system.slice/web.service": 4242,
                   "/user.slice": 20, "/user.slice/u/new": 21, "/other": 30}
    pol.cgroup_version = 1
    pol.tables = PolicyTables(ident={4242: 3}, subtree={20: 7})
    assert pol.identity_of_cgroup(4242) == 3  # its own entry
    assert pol.identity_of_cgroup(21) == 7  # what its nearest ancestor hands down
    assert pol.identity_of_cgroup(30) == pol.identity_of_cgroup(999) == 0  # none / unknown
    pol.tables = PolicyTables(ident={}, subtree={1: 5, 20: 7})
    assert pol.identity_of_cgroup(30) == 5 and pol.identity_of_cgroup(21) == 7  # nearest wins
    n = namer()
    n.identity_of_cgroup = {4242: 3}.get
    ev = n.event(raw(1, identity=0))
    assert ev["identity_id"] == 3 and ev["identity"] == "unit:web.service"
    assert n.event(raw(1, identity=3, cgroup=1))["identity_id"] == 3  # the kernel's wins
    # a denial keeps what the policy check used, even 0 (no identity): never filled in
    assert n.event(raw(2, identity=0, policy=4, backend=0))["identity_id"] == 0


def test_filters():
    ev = namer().event(raw(2, policy=4))
    assert matches(ev, {})
    assert matches(ev, {"verdict": "denied"}) and not matches(ev, {"verdict": "allowed"})
    for s in ("default/db", "default/db:pg", "db"):
        assert matches(ev, {"service": s}), s
    assert not matches(ev, {"service": "default/web"})
    for who in ("web.service", "/system.slice/web.service", "/system.slice/", "3",
                "unit:web.service"):
        assert matches(ev, {"identity": who}), who
    assert not matches(ev, {"identity": "batch.service"})
    assert matches(ev, {"type": "denied"}) and not matches(ev, {"type": "connect"})


def test_since_parses_durations():
    assert parse_since("30") == 30 and parse_since("5m") == 300 and parse_since("2h") == 7200
    assert parse_since(None) is None
    with pytest.raises(ValueError, match="30s, 5m or 2h"):
        parse_since("five minutes")


class FakeReader:
    def __init__(self, batches):
        self.batches = list(batches)

    def poll(self, timeout_ms):
        if self.batches:
            return self.batches.pop(0)
        time.sleep(timeout_ms / 1000)
        return []

    def close(self):
        pass


def test_hub_serves_history_and_live_events_on_a_root_only_socket(tmp_path):
    path = tmp_path / "inst" / "observe.sock"

    async def main():
        gate = asyncio.Event()
        reader = FakeReader([[raw(1), raw(2, policy=4)]])
        hub = EventHub(lambda: reader, namer(), history=100)
        hub.start_reader(asyncio.get_running_loop())
        await hub.serve(path)
        for _ in range(100):
            if hub.received == 2:
                break
            await asyncio.sleep(0.02)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        # history only, filtered, then the stream ends
        got = await asyncio.to_thread(lambda: list(stream(
            path, {"follow": False, "since": 60, "filter": {"verdict": "denied"}}, 5)))
        assert [e["type"] for e in got] == ["denied"]

        # follow: a live event arrives after the client subscribed
        def follow():
            out = []
            for ev in stream(path, {"follow": True, "since": None, "filter": {}}, 5):
                out.append(ev)
                gate_set()
                if ev["type"] == "closed":
                    return out
            return out
        loop = asyncio.get_running_loop()
        gate_set = lambda: loop.call_soon_threadsafe(gate.set)  # noqa: E731
        task = asyncio.ensure_future(asyncio.to_thread(follow))
        for _ in range(100):
            if hub.clients:
                break
            await asyncio.sleep(0.02)
        reader.batches.append([raw(4, duration_ns=1_000_000)])
        live = await asyncio.wait_for(task, 10)
        assert [e["type"] for e in live] == ["closed"]
        await hub.stop()
        assert not path.exists()

    asyncio.run(main())
    with pytest.raises(ConnectionError, match="no observe socket"):
        list(stream(path, {}))


def test_a_slow_client_loses_events_counted_and_the_daemon_never_waits():
    from meshd.agent import events as evmod
    hub = EventHub(lambda: FakeReader([]), namer(), history=0)

    async def main():
        client = evmod._Client({})
        client.queue = asyncio.Queue(2)  # a client that stopped reading, 2 queued
        hub.clients.add(client)
        hub._deliver([raw(1), raw(1), raw(1), raw(1)])
        return client.queue.qsize(), client.lost, hub.received

    assert asyncio.run(main()) == (2, 2, 4)


def test_a_reader_that_fails_is_shown_and_started_again(monkeypatch):
    from meshd.agent import supervise
    monkeypatch.setattr(supervise.Backoff, "next", lambda self: 0.05)
    opened = []

    def open_reader():
        opened.append(1)
        if len(opened) == 1:
            raise OSError(9, "ring gone")
        return FakeReader([[raw(1)]])

    async def main():
        hub = EventHub(open_reader, namer(), history=10)
        hub.start_reader(asyncio.get_running_loop())
        for _ in range(200):
            if hub.received:
                break
            await asyncio.sleep(0.02)
        st = hub.status()
        await hub.stop()
        return hub, st

    hub, st = asyncio.run(main())
    assert hub.received == 1 and len(opened) >= 2 and hub.reader_failures == 1
    assert st["reader_up"] and st["reader_error"] is None
