"""Authorization and connection events in the real kernel (issue 13, kernel side).

The socket LB is loaded on a test cgroup with two sub-cgroups, A and B ("two units"). A
service VIP (loopback 127.77.0.1) is translated to loopback servers this test runs; the
policy tables are written through PolicyMaps, the event settings through write_evcfg, and
events read back through EventReader. Clients are child processes that join A, B or the
test cgroup itself, optionally as the unprivileged uid `nobody`. Only loopback traffic.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from meshd import names
from meshd.dataplane import events as ev
from meshd.dataplane import libbpf as bpf
from meshd.dataplane import loader
from meshd.dataplane import structs as S
from meshd.dataplane.kernel import KernelDataplane
from meshd.dataplane.policy_maps import PolicyMaps
from meshd.desired import BackendRef, Frontend
from meshd.errors import DataplaneError

from testlib import BPFFS

M = 1021
VIP = "127.77.0.1"  # loopback: an untranslated connect stays on this host
PORT, UPORT, OPEN_PORT, EMPTY_PORT, DEAD_PORT = 80, 53, 81, 82, 83
G_TCP, G_UDP, G_OPEN, G_EMPTY, G_DEAD = 11, 12, 13, 14, 15
ID_A, ID_B = 1, 2
NOBODY = 65534
ALLOW, DENY, F_UID, ANY = S.VERDICT_ALLOW, S.VERDICT_DENY, S.VERDICT_F_UID, S.UID_ANY

CLIENT = r"""
import errno, json, os, socket, sys
cg, uid, cpu, mode, vip, port, n = sys.argv[1:8]
open(cg + "/cgroup.procs", "w").write(str(os.getpid()))
if int(cpu) >= 0:
    os.sched_setaffinity(0, {int(cpu)})
open("/proc/self/comm", "w").write(sys.argv[8])
if int(uid) >= 0:
    os.setgid(int(uid)); os.setuid(int(uid))
port, out = int(port), {"ok": 0, "errors": {}, "got": [], "pid": os.getpid()}
for _ in range(int(n)):
    try:
        if mode == "tcp" or mode == "tcp6":
            fam, addr = (socket.AF_INET6, "::ffff:" + vip) if mode == "tcp6" else (socket.AF_INET, vip)
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(3)
            s.connect((addr, port))
            s.sendall(b"hello\n")
            got = b""
            while True:
                chunk = s.recv(100)
                if not chunk:
                    break
                got += chunk
            out["got"].append(got.decode())
        elif mode == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.sendto(b"ping", (vip, port))
        s.close()
        out["ok"] += 1
    except OSError as e:
        name = errno.errorcode.get(e.errno, str(e.errno))
        out["errors"][name] = out["errors"].get(name, 0) + 1
        s.close()
print(json.dumps(out))
"""


class Echo:
    """Loopback TCP server: reads one request, answers b"world!!\\n", closes; counts the
    connections it ever accepted (a SYN that reached it completes the handshake)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            with c:
                c.settimeout(2)
                try:
                    c.recv(100)
                    c.sendall(b"world!!\n")
                except OSError:
                    pass

    def close(self):
        self._stop.set()
        self._t.join(5)
        self.sock.close()


class Env:
    def __init__(self, inst, cg, ring=None):
        self.inst, self.cg = inst, cg
        self.maps = loader.load(BPFFS, inst, cg, M, events_ring_bytes=ring)
        self.dp = KernelDataplane(self.maps)
        self.cg_a, self.cg_b = cg / "unit-a", cg / "unit-b"
        self.cg_a.mkdir()
        self.cg_b.mkdir()
        self.echo = Echo()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(0.3)
        dead = socket.socket()  # a port with nothing listening: RST to every SYN
        dead.bind(("127.0.0.1", 0))
        self.dead_port = dead.getsockname()[1]
        dead.close()
        self.pm = PolicyMaps(BPFFS, inst)
        self.reader = ev.EventReader(BPFFS, inst)
        lo = ipaddress.ip_address("127.0.0.1")
        self.dp.put_backend(1, BackendRef(lo, self.echo.port, "TCP"))
        self.dp.put_backend(2, BackendRef(lo, self.udp.getsockname()[1], "UDP"))
        self.dp.put_backend(3, BackendRef(lo, self.dead_port, "TCP"))
        for gid, bid, port, proto, flags in ((G_TCP, 1, PORT, "TCP", S.SVC_F_POLICY),
                                             (G_UDP, 2, UPORT, "UDP", S.SVC_F_POLICY),
                                             (G_OPEN, 1, OPEN_PORT, "TCP", 0),
                                             (G_DEAD, 3, DEAD_PORT, "TCP", 0)):
            self.dp.put_table(gid, np.full(M, bid, dtype=np.uint32))
            self.dp.put_frontend(Frontend(ipaddress.ip_address(VIP), port, proto), gid, 1,
                                 flags)
        self.dp.put_frontend(Frontend(ipaddress.ip_address(VIP), EMPTY_PORT, "TCP"),
                             G_EMPTY, 0)
        self.ident = {loader.cgroup_id(self.cg_a): ID_A, loader.cgroup_id(self.cg_b): ID_B}

    def client(self, where, mode="tcp", port=PORT, n=1, uid=-1, cpu=-1, comm="mtest-cli"):
        cg = {"a": self.cg_a, "b": self.cg_b, "root": self.cg}[where]
        cp = subprocess.run([sys.executable, "-c", CLIENT, str(cg), str(uid), str(cpu), mode,
                             VIP, str(port), str(n), comm],
                            capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
        return json.loads(cp.stdout)

    def udp_received(self) -> int:
        n = 0
        while True:
            try:
                self.udp.recv(100)
                n += 1
            except OSError:
                return n

    def events(self, until, timeout=5.0) -> list:
        """Events read until `until(events)` holds (bounded by `timeout`)."""
        got, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            got += self.reader.poll(100)
            if until(got):
                return got
        return got

    def close(self):
        self.reader.close()
        self.pm.close()
        self.maps.close()
        self.echo.close()
        self.udp.close()
        for c in (self.cg_a, self.cg_b):
            c.rmdir()


@pytest.fixture
def env(kernel_instance):
    e = Env(*kernel_instance)
    try:
        yield e
    finally:
        e.close()


def allow_a(uid_entries=None):
    """A may reach the TCP and UDP services; B has verdicts saying deny (policy 5)."""
    verdicts = {(ID_A, G_TCP, ANY): (ALLOW, 0, 1), (ID_A, G_UDP, ANY): (ALLOW, 0, 1),
                (ID_B, G_TCP, ANY): (DENY, 0, 5)}
    verdicts.update(uid_entries or {})
    return verdicts


def test_allowed_unit_connects_and_the_other_gets_eperm_with_nothing_at_the_backend(env):
    env.pm.apply(env.ident, allow_a())
    a_tcp, a_tcp6 = env.client("a"), env.client("a", "tcp6")
    assert a_tcp["ok"] == 1 and a_tcp["got"] == ["world!!\n"]
    assert a_tcp6["ok"] == 1 and a_tcp6["got"] == ["world!!\n"]  # connect6 path
    assert env.client("a", "udp", UPORT)["ok"] == 1
    assert env.udp_received() == 1
    seen = env.echo.accepted
    assert seen == 2

    # B: denied by its verdict (TCP, both families) and by having none (UDP)
    assert env.client("b", n=3)["errors"] == {"EPERM": 3}
    assert env.client("b", "tcp6")["errors"] == {"EPERM": 1}
    assert env.client("b", "udp", UPORT, n=2)["errors"] == {"EPERM": 2}
    # a process with no identity (the test cgroup itself) is denied too
    assert env.client("root")["errors"] == {"EPERM": 1}
    time.sleep(0.3)
    assert env.echo.accepted == seen  # no SYN ever reached the backend
    assert env.udp_received() == 0  # nor a datagram
    assert env.pm.read_denied() == {(G_TCP, ID_B): 4, (G_UDP, ID_B): 2, (G_TCP, 0): 1}
    assert env.pm.read() == (env.ident, allow_a())


def test_a_service_without_the_flag_is_untouched(env):
    env.pm.apply(env.ident, allow_a())
    r = env.client("b", port=OPEN_PORT)  # same backend, frontend not selected by a policy
    assert r["ok"] == 1 and r["got"] == ["world!!\n"]
    assert env.pm.read_denied() == {}


def test_uid_entries_override_the_identity_verdict_only_with_the_flag(env):
    # A: allowed, but nobody has a deny entry of its own (policy 9): deny overrides allow
    # B: denied (policy 5), but nobody has an allow entry
    base = {(ID_A, G_TCP, ANY): (ALLOW, F_UID, 1), (ID_A, G_TCP, NOBODY): (DENY, 0, 9),
            (ID_B, G_TCP, ANY): (DENY, F_UID, 5), (ID_B, G_TCP, NOBODY): (ALLOW, 0, 2)}
    env.pm.apply(env.ident, base)
    env.pm.apply(env.ident, base)  # nothing to write the second time
    assert env.client("a")["ok"] == 1
    assert env.client("a", uid=NOBODY)["errors"] == {"EPERM": 1}
    assert env.client("b")["errors"] == {"EPERM": 1}
    assert env.client("b", uid=NOBODY)["ok"] == 1
    # without F_UID the uid entries are not looked at
    no_flag = dict(base)
    no_flag[(ID_A, G_TCP, ANY)] = (ALLOW, 0, 1)
    counts = env.pm.apply(env.ident, no_flag)
    assert counts == {"verdicts_put": 1, "ident_put": 0, "ident_deleted": 0,
                      "verdicts_deleted": 0}
    assert env.client("a", uid=NOBODY)["ok"] == 1


def test_apply_writes_the_difference_and_removes_stale_entries(env):
    env.pm.apply(env.ident, allow_a())
    only_b = {loader.cgroup_id(env.cg_b): ID_B}
    counts = env.pm.apply(only_b, {(ID_B, G_TCP, ANY): (ALLOW, 0, 3)})
    assert counts == {"verdicts_put": 1, "ident_put": 0, "ident_deleted": 1,
                      "verdicts_deleted": 2}
    assert env.pm.read() == (only_b, {(ID_B, G_TCP, ANY): (ALLOW, 0, 3)})
    assert env.client("b")["ok"] == 1
    assert env.client("a")["errors"] == {"EPERM": 1}  # A has no identity any more
    with pytest.raises(DataplaneError, match="identity 0 means none"):
        env.pm.apply({loader.cgroup_id(env.cg_a): 0}, {})


def test_events_connect_denied_failed_closed_carry_the_caller(env):
    env.pm.apply(env.ident, allow_a())
    ev.write_evcfg(BPFFS, env.inst, ev.ALL, 0, 0)
    assert ev.read_evcfg(BPFFS, env.inst) == {"mask": ev.ALL, "sample": 0, "rate": 0}
    a = env.client("a", comm="mtest-unit-a")
    b = env.client("b", uid=NOBODY, comm="mtest-unit-b")
    u = env.client("a", "udp", UPORT, comm="mtest-unit-a")
    refused = env.client("a", port=EMPTY_PORT, comm="mtest-unit-a")  # no backend: at the hook
    dead = env.client("a", port=DEAD_PORT, comm="mtest-unit-a")  # RST from the backend
    assert refused["errors"] == dead["errors"] == {"ECONNREFUSED": 1}
    got = env.events(lambda es: len(es) >= 7)
    by = {}
    for e in got:
        by.setdefault((e.type, e.pid), []).append(e)
    assert len(got) == 7, got  # a: connect+closed, b, u, refused: 1 each, dead: 2
    lo, cg_a, cg_b = "127.0.0.1", loader.cgroup_id(env.cg_a), loader.cgroup_id(env.cg_b)

    conn, closed = by[("connect", a["pid"])], by[("closed", a["pid"])]
    assert len(conn) == len(closed) == 1
    c = conn[0]
    assert (c.vip, c.vip_port, c.backend_addr, c.backend_port, c.proto) == (
        VIP, PORT, lo, env.echo.port, "TCP")
    assert (c.cgroup, c.identity, c.uid, c.comm, c.group, c.backend, c.err, c.sendmsg) == (
        cg_a, ID_A, 0, "mtest-unit-a", G_TCP, 1, 0, False)
    k = closed[0]
    assert k.cookie == c.cookie and k.ts_ns > c.ts_ns and k.duration_ns > 0
    assert (k.tx_bytes, k.rx_bytes) == (6, 8)  # "hello\n" out, "world!!\n" back
    assert (k.vip, k.vip_port, k.backend_addr, k.backend_port) == (
        VIP, PORT, lo, env.echo.port)
    assert (k.cgroup, k.identity, k.uid, k.pid, k.comm, k.group, k.backend, k.err) == (
        cg_a, ID_A, 0, a["pid"], "mtest-unit-a", G_TCP, 1, 0)

    d = by[("denied", b["pid"])][0]
    assert (d.cgroup, d.identity, d.uid, d.comm, d.group, d.backend, d.policy, d.err) == (
        cg_b, ID_B, NOBODY, "mtest-unit-b", G_TCP, 0, 5, errno.EPERM)
    assert d.backend_addr is None and (d.vip, d.vip_port) == (VIP, PORT)

    s = by[("connect", u["pid"])][0]
    assert s.sendmsg and s.proto == "UDP" and s.backend == 2 and s.identity == ID_A

    f_hook = by[("failed", refused["pid"])][0]
    assert (f_hook.err_name, f_hook.backend, f_hook.group, f_hook.vip_port) == (
        "ECONNREFUSED", 0, G_EMPTY, EMPTY_PORT)
    # not looked up at the hook (the service has no policy): the daemon names it from the
    # cgroup (meshd/agent/events.py Namer)
    assert f_hook.identity == 0 and f_hook.cgroup == cg_a
    kinds = sorted(e.type for e in by[("failed", dead["pid"])] + by[("connect", dead["pid"])])
    assert kinds == ["connect", "failed"]
    f_net = by[("failed", dead["pid"])][0]
    assert (f_net.err_name, f_net.backend, f_net.backend_port, f_net.group) == (
        "ECONNREFUSED", 3, env.dead_port, G_DEAD)
    assert f_net.comm == "mtest-unit-a" and f_net.cgroup == cg_a
    assert ev.read_evstate(BPFFS, env.inst) == {"lost_full": 0, "lost_rate": 0,
                                                 "sampled_out": 0}


def test_events_off_by_default_and_by_mask(env):
    env.pm.apply(env.ident, allow_a())
    env.client("a")
    env.client("b")
    assert env.reader.poll(200) == []  # evcfg all zero: off
    ev.write_evcfg(BPFFS, env.inst, ev.event_mask(["denied"]), 0, 0)
    env.client("a")
    env.client("b")
    got = env.events(lambda es: len(es) >= 1, timeout=1.0)
    assert [e.type for e in got] == ["denied"]
    with pytest.raises(DataplaneError, match="events sample=-1"):
        ev.write_evcfg(BPFFS, env.inst, 0, -1, 0)
    with pytest.raises(ValueError, match="event type 'nope'"):
        ev.event_mask(["nope"])


def test_sampling_counts_what_it_skips(env):
    ev.write_evcfg(BPFFS, env.inst, ev.event_mask(["connect"]), 4, 0)
    r = env.client("b", port=OPEN_PORT, n=40)
    assert r["ok"] == 40
    got = env.events(lambda es: False, timeout=0.5)
    state = ev.read_evstate(BPFFS, env.inst)
    assert 0 < len(got) < 40
    assert len(got) + state["sampled_out"] == 40
    assert state["lost_rate"] == state["lost_full"] == 0


def test_rate_limit_counts_what_it_drops(env):
    ev.write_evcfg(BPFFS, env.inst, ev.event_mask(["failed"]), 0, 5)
    r = env.client("a", port=EMPTY_PORT, n=30, cpu=0)  # one CPU, well within a second
    assert r["errors"] == {"ECONNREFUSED": 30}
    got = env.events(lambda es: False, timeout=0.5)
    state = ev.read_evstate(BPFFS, env.inst)
    assert 5 <= len(got) <= 10  # 5 per second on that CPU (10 if a window turned over)
    assert len(got) + state["lost_rate"] == 30
    assert state["lost_full"] == 0


def test_a_small_ring_under_a_connect_flood_counts_lost_full(kernel_instance):
    inst, cg = kernel_instance
    with pytest.raises(DataplaneError, match="power of two"):
        loader.load(BPFFS, inst, cg, M, events_ring_bytes=5000)
    loader.load(BPFFS, inst, cg, M).close()  # 1 MiB ring, then a restart asks for 4 KiB
    e = Env(inst, cg, ring=os.sysconf("SC_PAGE_SIZE"))
    try:
        fd = bpf.obj_get(names.pin_dir(BPFFS, inst) / names.MAP_EVENTS)
        try:
            assert bpf.map_info(fd, "ring").max_entries == os.sysconf("SC_PAGE_SIZE")
        finally:
            bpf.close_fd(fd)
        ev.write_evcfg(BPFFS, inst, ev.ALL, 0, 0)
        r = e.client("a", port=EMPTY_PORT, n=200)  # refused at the hook: no packets at all
        assert r["errors"] == {"ECONNREFUSED": 200}
        got = e.reader.consume()
        state = ev.read_evstate(BPFFS, inst)
        assert 0 < len(got) < 200 and state["lost_full"] > 0
        assert len(got) + state["lost_full"] == 200
    finally:
        e.close()


def test_an_old_pin_dir_without_the_new_maps_is_adopted_and_keeps_serving(kernel_instance):
    inst, cg = kernel_instance
    e = Env(inst, cg)
    try:
        assert e.client("b", port=OPEN_PORT)["ok"] == 1
        e.reader.close()
        e.pm.close()
        pin_dir = names.pin_dir(BPFFS, inst)
        for n in names.POLICY_MAPS + names.EVENT_MAPS:  # what an older meshd pinned
            (pin_dir / n).unlink()
        e.maps.close()
        e.maps = loader.load(BPFFS, inst, cg, M)  # the upgraded daemon starts
        assert all((pin_dir / n).exists() for n in names.POLICY_MAPS + names.EVENT_MAPS)
        e.dp = KernelDataplane(e.maps)
        assert e.dp.snapshot().tables >= {G_TCP, G_OPEN}  # entries kept
        assert e.client("b", port=OPEN_PORT)["ok"] == 1
        e.pm, e.reader = PolicyMaps(BPFFS, inst), ev.EventReader(BPFFS, inst)
        assert e.pm.read() == ({}, {})
    finally:
        e.close()
    removed = loader.remove(BPFFS, inst)  # `meshd cleanup`
    assert all(str(pin_dir / n) in removed for n in names.POLICY_MAPS + names.EVENT_MAPS)


def test_metrics_off_still_enforces_policy(kernel_instance):
    inst, cg = kernel_instance
    e = Env(inst, cg)
    try:
        e.pm.apply(e.ident, allow_a())
        loader.load(BPFFS, inst, cg, M, metrics=False).close()
        assert e.client("a")["ok"] == 1
        assert e.client("b")["errors"] == {"EPERM": 1}
    finally:
        e.close()


def test_inotify_wrappers_report_creations_and_errors(tmp_path):
    fd = bpf.inotify_init()
    try:
        wd = bpf.inotify_add_watch(fd, str(tmp_path), 0x100 | 0x40000000)  # IN_CREATE|ONLYDIR
        (tmp_path / "x").mkdir()
        data = os.read(fd, 4096)
        wd_got, mask, _cookie, length = ctypes.c_int32.from_buffer_copy(data[:4]).value, \
            *np.frombuffer(data[4:16], dtype=np.uint32)
        assert wd_got == wd and mask & 0x100 and data[16:16 + length].rstrip(b"\0") == b"x"
        bpf.inotify_rm_watch(fd, wd)
        assert np.frombuffer(os.read(fd, 4096)[4:8], dtype=np.uint32)[0] & 0x8000  # IGNORED
        with pytest.raises(OSError) as ei:
            bpf.inotify_add_watch(fd, str(tmp_path / "missing"), 0x100)
        assert ei.value.errno == errno.ENOENT
        with pytest.raises(BlockingIOError):
            os.read(fd, 4096)  # non-blocking by default
    finally:
        os.close(fd)
