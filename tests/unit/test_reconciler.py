"""Reconciler: fewest operations, safe order, errors contained — against an in-memory kernel
that checks after EVERY map operation what a connecting socket could observe."""

from __future__ import annotations

import errno
import ipaddress

import numpy as np
from hypothesis import given, settings, strategies as st

from meshd.desired import (FE_SOURCE_RANGES, G_AFFINITY, BackendRef, Frontend,
                           desired_groups)
from meshd.errors import BpfError
from meshd.model import parse_service
from meshd.reconciler import TABLE_B, KernelSnapshot, Reconciler

M = 251


class FakeKernel:
    """Dict-backed maps. `check()` runs after each op: no frontend with backends may point at
    a missing table, and no table may name a missing backend (a half-written service)."""

    def __init__(self, m: int = M, backend_capacity: int = 10_000, maglev_max: int = 65521):
        self.maglev_m = m  # 0: per-group sizes
        self.maglev_max = maglev_max
        self.backends: dict[int, BackendRef] = {}
        self.tables: dict[int, np.ndarray] = {}  # the table last written per group
        self.halves: dict[int, list[np.ndarray]] = {}  # both halves of each group's table
        self.swaps = 0  # fresh tables swapped in (the map-in-map way)
        self.frontends: dict[Frontend, tuple[int, int, int]] = {}
        self.ext: dict[Frontend, tuple[int, int, int]] = {}  # meshd_svc_ext_v1
        self.names: dict[int, str] = {}
        self.affcfg: dict[int, int] = {}
        self.members: dict[tuple[int, int], int] = {}
        self.srcranges: set = set()
        self.conntrack: set[int] | None = None  # backend ids of live tc flows; None: no tc
        self.capacity = backend_capacity
        self.fail_tables: set[int] = set()
        self.no_room: set[int] = set()  # gids whose half writes go fresh (the kernel: MemberRoom)
        self.swapped_instead: set[int] = set()
        self.ops = 0
        self.backend_batches = 0  # put_backends calls
        self.table_batches: list[int] = []  # tables per put_tables call

    def check(self) -> None:
        """What the datapath could observe between two map operations must be whole."""
        self.ops += 1
        seen = list(self.tables.values())  # what readers see, or will after the flip
        for fmap in (self.frontends, self.ext):
            for fe, (gid, count, flags) in fmap.items():
                if count:
                    assert gid in self.tables, f"{fe} points at group {gid} with no table"
                    seen.append(self.halves[gid][1 if flags & TABLE_B else 0])
                if flags & G_AFFINITY:
                    assert gid in self.affcfg, f"{fe} has affinity, group {gid} no timeout"
                    members = {b for (g, b) in self.members if g == gid}
                    if count:  # every backend the table can pick is a member
                        half = self.halves[gid][1 if flags & TABLE_B else 0]
                        assert set(half.tolist()) <= members, fe
                if flags & FE_SOURCE_RANGES:
                    assert any(f == fe for f, _n in self.srcranges), f"{fe}: no source range"
        for table in seen:
            missing = set(table.tolist()) - set(self.backends)
            assert not missing, f"a table readers may see names missing backends {missing}"
        for (gid, bid) in self.members:
            assert bid in self.backends, f"member {bid} of group {gid} is no backend"
        if self.conntrack is not None:
            gone = self.conntrack - set(self.backends)
            assert not gone, f"backends {gone} deleted under live tc flows"

    def put_backend(self, bid, ref):
        if bid not in self.backends and len(self.backends) >= self.capacity:
            raise BpfError(errno.E2BIG, "bpf_map_update_elem", "meshd_be_v1")
        self.backends[bid] = ref
        self.check()

    def put_backends(self, items):
        """As bpf_map_update_batch: the entries go in one after the other (readers may see
        any prefix: check() after each), a full map fails the ones that do not fit."""
        self.backend_batches += 1
        failed = {}
        for bid, ref in items:
            try:
                self.put_backend(bid, ref)
            except BpfError as e:
                failed[bid] = str(e)
        return failed

    def delete_backend(self, bid):
        del self.backends[bid]
        self.check()

    def put_tables(self, items):
        self.table_batches.append(len(items))
        failed = {}
        self.swapped_instead = {gid for gid, _t, half in items
                                if half is not None and gid in self.no_room}
        items = [(g, t, None if g in self.swapped_instead else h) for g, t, h in items]
        for gid, table, half in items:  # a batch applies its elements one after the other
            if self.maglev_m:
                assert table.shape == (self.maglev_m,)
            if gid in self.fail_tables:
                failed[gid] = "injected failure"
                continue
            if half is None:
                self.halves[gid] = [table.copy(), table.copy()]
                self.swaps += 1
            else:
                assert self.halves[gid][half].shape == table.shape, "in place at another size"
                for fmap in (self.frontends, self.ext):  # no reader may be on that half
                    for fe, (g, count, flags) in fmap.items():
                        assert g != gid or bool(flags & TABLE_B) != bool(half), \
                            f"{fe} reads the half being written"
                self.halves[gid][half] = table.copy()
            self.tables[gid] = table.copy()
            self.check()
        return failed

    def get_table(self, gid, half=0):
        return self.halves[gid][half] if gid in self.halves else None

    def delete_tables(self, gids):
        for gid in gids:
            self.tables.pop(gid, None)
            self.halves.pop(gid, None)
            self.check()
        return {}

    def put_frontend(self, fe, gid, count, flags=0):
        self.frontends[fe] = (gid, count, flags)
        self.check()

    def delete_frontend(self, fe):
        del self.frontends[fe]
        self.check()

    def put_ext_frontend(self, fe, gid, count, flags=0):
        self.ext[fe] = (gid, count, flags)
        self.check()

    def delete_ext_frontend(self, fe):
        del self.ext[fe]
        self.check()

    def put_affinity(self, gid, timeout):
        self.affcfg[gid] = timeout
        self.check()

    def delete_affinity(self, gid):
        del self.affcfg[gid]
        self.check()

    def put_member(self, gid, bid, weight):
        self.members[(gid, bid)] = weight

    def delete_member(self, gid, bid):
        del self.members[(gid, bid)]
        self.check()

    def put_srcrange(self, fe, net):
        self.srcranges.add((fe, net))

    def delete_srcrange(self, fe, net):
        self.srcranges.remove((fe, net))
        self.check()

    def tc_conntrack(self):
        return self.conntrack is not None

    def flow_backends(self):
        return None if self.conntrack is None else set(self.conntrack)

    def put_name(self, gid, key):
        self.names[gid] = key

    def delete_name(self, gid):
        del self.names[gid]

    def snapshot(self) -> KernelSnapshot:
        members: dict[int, dict[int, int]] = {}
        for (gid, bid), w in self.members.items():
            members.setdefault(gid, {})[bid] = w
        return KernelSnapshot(dict(self.frontends), dict(self.backends), dict(self.names),
                              set(self.tables), dict(self.ext), dict(self.affcfg), members,
                              set(self.srcranges),
                              {g: h[0].size for g, h in self.halves.items()})

    def serving(self) -> dict[str, set[str]]:
        """frontend -> backend names a socket could reach (what a user observes)."""
        out = {}
        for fe, (gid, count, flags) in self.frontends.items():
            table = self.halves[gid][1 if flags & TABLE_B else 0] if count else []
            out[str(fe)] = {self.backends[b].name for b in np.asarray(table).tolist()}
        return out


def svc(name: str, vip: str, eps: list[tuple[str, int]], port: int = 80, proto: str = "TCP",
        ready: bool = True):
    return parse_service({
        "namespace": "default", "name": name, "vips": [vip],
        "ports": [{"name": "p", "port": port, "protocol": proto}],
        "endpoints": [{"address": a, "ports": {"p": 8080}, "weight": w, "ready": ready}
                      for a, w in eps]}, where=name)


def expected(services) -> dict[str, set[str]]:
    out = {}
    for g in desired_groups(services).values():
        for fe in g.frontends:
            out[str(fe)] = {r.name for r, _w in g.backends}
    return out


def test_add_update_remove_follow_desired_state():
    k = FakeKernel()
    r = Reconciler(k)
    a = svc("a", "10.96.0.1", [("10.0.0.1", 1), ("10.0.0.2", 1)])
    b = svc("b", "10.96.0.2", [("10.0.0.2", 1), ("10.0.0.3", 2)])
    rep = r.apply(desired_groups([a, b]))
    assert not rep.errors
    assert k.serving() == expected([a, b])
    assert len(k.backends) == 3  # 10.0.0.2:8080 shared by both, stored once

    a2 = svc("a", "10.96.0.1", [("10.0.0.1", 1)])
    r.apply(desired_groups([a2, b]))
    assert k.serving() == expected([a2, b])

    r.apply(desired_groups([b]))
    assert k.serving() == expected([b])
    assert set(k.names.values()) == {"default/b:p/ipv4"}
    assert {ref.name for ref in k.backends.values()} == {"10.0.0.2:8080/TCP", "10.0.0.3:8080/TCP"}

    r.apply({})
    assert (k.frontends, k.tables, k.backends, k.names) == ({}, {}, {}, {})


def test_unchanged_state_costs_no_map_operation():
    k = FakeKernel()
    r = Reconciler(k)
    d = desired_groups([svc("a", "10.96.0.1", [("10.0.0.1", 1)])])
    r.apply(d)
    before = k.ops
    rep = r.apply(d)
    assert sum(rep.ops.values()) == 0 and k.ops == before


def test_one_endpoint_change_rewrites_one_table_only():
    k = FakeKernel()
    r = Reconciler(k)
    many = [svc(f"s{i}", f"10.96.1.{i}", [("10.0.0.1", 1)]) for i in range(1, 50)]
    r.apply(desired_groups(many))
    many[7] = svc("s8", "10.96.1.8", [("10.0.0.1", 1), ("10.0.0.9", 1)])
    rep = r.apply(desired_groups(many))
    assert rep.ops == {"put_backend": 1, "put_table": 1, "put_frontend": 1}


def test_a_half_the_writer_swapped_in_fresh_is_no_in_place_change():
    """The kernel writes a half as a fresh table when the group's backends outgrew its
    member room: readers have the new table at once, so the reconciler keeps no undo for
    it (a later failure must not claim the old table is still read) and counts a swap."""
    k = FakeKernel()
    r = Reconciler(k)
    a = svc("a", "10.96.0.1", [("10.0.0.1", 1)])
    r.apply(desired_groups([a]))
    gid = next(iter(k.tables))
    k.no_room.add(gid)
    a2 = svc("a", "10.96.0.1", [("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)])
    swaps = k.swaps
    rep = r.apply(desired_groups([a2]))
    assert not rep.errors and rep.table_swaps == 1 and k.swaps == swaps + 1
    assert not r._undo and k.serving() == expected([a2])


def test_no_usable_backend_keeps_frontend_with_count_zero():
    k = FakeKernel()
    r = Reconciler(k)
    r.apply(desired_groups([svc("a", "10.96.0.1", [("10.0.0.1", 1)])]))
    r.apply(desired_groups([svc("a", "10.96.0.1", [("10.0.0.1", 1)], ready=False)]))
    (fe, (gid, count, _flags)), = k.frontends.items()
    assert count == 0 and gid not in k.tables and not k.backends


def test_map_full_fails_one_service_and_leaves_the_others_serving():
    k = FakeKernel(backend_capacity=3)
    r = Reconciler(k)
    ok = svc("a", "10.96.0.1", [("10.0.0.1", 1), ("10.0.0.2", 1)])
    r.apply(desired_groups([ok]))
    big = svc("b", "10.96.0.2", [("10.0.1.1", 1), ("10.0.1.2", 1)])
    rep = r.apply(desired_groups([ok, big]))
    assert rep.errors["default/b:p/ipv4"].startswith("backends not written: 10.0.1.2:8080/TCP")
    assert "the map is full" in rep.errors["backend 10.0.1.2:8080/TCP"]
    assert k.serving()["10.96.0.1:80/TCP"] == {"10.0.0.1:8080/TCP", "10.0.0.2:8080/TCP"}
    assert "10.96.0.2:80/TCP" not in k.serving()  # never exposed half-written
    # capacity comes back: the next sync converges
    k.capacity = 10
    rep = r.apply(desired_groups([ok, big]))
    assert not rep.errors and k.serving() == expected([ok, big])


def test_failed_table_write_keeps_the_old_table_serving():
    k = FakeKernel()
    r = Reconciler(k)
    r.apply(desired_groups([svc("a", "10.96.0.1", [("10.0.0.1", 1)])]))
    (gid,) = k.tables
    k.fail_tables.add(gid)
    rep = r.apply(desired_groups([svc("a", "10.96.0.1", [("10.0.0.2", 1)])]))
    assert rep.errors == {"default/a:p/ipv4": "injected failure"}
    assert k.serving() == {"10.96.0.1:80/TCP": {"10.0.0.1:8080/TCP"}}
    k.fail_tables.clear()
    assert not r.apply(desired_groups([svc("a", "10.96.0.1", [("10.0.0.2", 1)])])).errors
    assert k.serving() == {"10.96.0.1:80/TCP": {"10.0.0.2:8080/TCP"}}


def test_vip_moving_between_services_is_one_overwrite():
    k = FakeKernel()
    r = Reconciler(k)
    a = svc("a", "10.96.0.1", [("10.0.0.1", 1)])
    r.apply(desired_groups([a]))
    b = svc("b", "10.96.0.1", [("10.0.0.2", 1)])
    r.apply(desired_groups([b]))
    assert k.serving() == {"10.96.0.1:80/TCP": {"10.0.0.2:8080/TCP"}}


def test_restart_adopts_kernel_state_without_rewriting_it():
    k = FakeKernel()
    services = [svc("a", "10.96.0.1", [("10.0.0.1", 1), ("10.0.0.2", 3)]),
                svc("b", "10.96.0.2", [("10.0.0.3", 1)], proto="UDP")]
    Reconciler(k).apply(desired_groups(services))
    before = k.ops
    r2 = Reconciler(k)
    r2.adopt(k.snapshot())
    rep = r2.apply(desired_groups(services))
    assert sum(rep.ops.values()) == 0 and k.ops == before
    assert k.serving() == expected(services)


addrs = st.sampled_from([f"10.0.0.{i}" for i in range(1, 9)])
service_st = st.builds(
    lambda i, eps, proto: svc(f"s{i}", f"10.96.0.{i}", eps, proto=proto),
    st.integers(1, 6),
    st.lists(st.tuples(addrs, st.integers(1, 4)), max_size=5, unique_by=lambda t: t[0]),
    st.sampled_from(["TCP", "UDP"]))
state_st = st.lists(service_st, max_size=6, unique_by=lambda s: s.name)


@settings(max_examples=60, deadline=None)
@given(st.lists(state_st, min_size=1, max_size=6))
def test_any_sequence_of_states_converges_and_never_shows_a_half_written_service(states):
    k = FakeKernel()
    r = Reconciler(k)
    for services in states:
        rep = r.apply(desired_groups(services))  # FakeKernel.check() asserts at every op
        assert not rep.errors
        assert k.serving() == expected(services)
    # a restarted daemon adopting this state and applying it again writes nothing
    r2 = Reconciler(k)
    r2.adopt(k.snapshot())
    assert sum(r2.apply(desired_groups(states[-1])).ops.values()) == 0


def test_backends_ordered_by_stable_name_not_by_input_order():
    a1 = svc("a", "10.96.0.1", [("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)])
    a2 = svc("a", "10.96.0.1", [("10.0.0.3", 1), ("10.0.0.1", 1), ("10.0.0.2", 1)])
    assert desired_groups([a1]) == desired_groups([a2])
    ip = ipaddress.ip_address
    assert [r for r, _ in desired_groups([a1])["default/a:p/ipv4"].backends] == [
        BackendRef(ip("10.0.0.1"), 8080, "TCP"), BackendRef(ip("10.0.0.2"), 8080, "TCP"),
        BackendRef(ip("10.0.0.3"), 8080, "TCP")]


def test_report_names_the_translations_that_stopped_being_valid():
    k = FakeKernel()
    r = Reconciler(k)
    a = svc("a", "10.96.0.1", [("10.0.0.1", 1), ("10.0.0.2", 1)], proto="UDP")
    b = svc("b", "10.96.0.2", [("10.0.0.3", 1)], proto="UDP")
    r.apply(desired_groups([a, b]))
    rep = r.apply(desired_groups([svc("a", "10.96.0.1", [("10.0.0.1", 1)], proto="UDP")]))
    assert {(str(fe), be.name) for fe, be in rep.removed} == {
        ("10.96.0.1:80/UDP", "10.0.0.2:8080/UDP"), ("10.96.0.2:80/UDP", "10.0.0.3:8080/UDP")}
    assert r.apply(desired_groups([svc("a", "10.96.0.1", [("10.0.0.1", 1)], proto="UDP")])
                   ).removed == set()


def test_incremental_desired_state_matches_a_full_pass():
    """DesiredState (identity-based, incremental) == check_services + desired_groups."""
    import ipaddress as ipa
    from meshd.desired import DesiredState
    from meshd.model import check_services
    cidrs = [ipa.ip_network("10.96.0.0/12")]
    ds = DesiredState()
    a = svc("a", "10.96.0.1", [("10.0.0.1", 1)])
    b = svc("b", "10.96.0.1", [("10.0.0.2", 1)])  # collides with a: a wins (key order)
    c = svc("c", "10.96.0.3", [("10.0.0.3", 1)])
    bad = svc("d", "192.168.0.1", [("10.0.0.4", 1)])  # outside service_cidrs
    for services in ([a, b, c, bad], [b, c], [a, b, c], [c], [a, a, c], []):
        groups, errors = ds.update(services, cidrs, set())
        good, bad_full = check_services(services, cidrs, set())
        assert groups == desired_groups(good)
        assert sorted(e.where for e in errors) == sorted(e.where for e in bad_full)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(service_st, max_size=6), min_size=1, max_size=6))
def test_incremental_path_equals_full_path(states):
    """Reconciler + DesiredState over a sequence of states ends where a fresh full apply
    would, and keeps every object of unchanged services (so it does no work for them)."""
    import ipaddress as ipa
    from meshd.desired import DesiredState
    cidrs = [ipa.ip_network("10.96.0.0/12")]
    k, ds = FakeKernel(), DesiredState()
    r = Reconciler(k)
    for i, services in enumerate(states):
        # every other step, the cidrs change: DesiredState starts over (hint unknown)
        c = cidrs if i % 2 == 0 else cidrs + [ipa.ip_network("10.0.0.0/8")]
        groups, _errors = ds.update(services, c, set())
        hint = ds.changed_groups
        assert not r.apply(groups, None if hint is None else set(hint)).errors
        k2 = FakeKernel()
        Reconciler(k2).apply(dict(groups))
        assert k.serving() == k2.serving()
        assert {b.name for b in k.backends.values()} == {b.name for b in k2.backends.values()}
        again = r.apply(ds.update(services, c, set())[0], set(ds.changed_groups))
        assert sum(again.ops.values()) == 0 and again.groups_changed == 0


class NullKernel:
    """Takes every write, keeps nothing: what is measured is the reconciler's own state."""
    maglev_m, maglev_max = M, 65521

    def __getattr__(self, name):
        if name in ("put_tables", "delete_tables", "put_backends"):
            return lambda items: {}
        if name == "tc_conntrack":
            return lambda: False
        return lambda *a, **k: None


def test_state_per_backend_stays_small():
    """What the reconciler keeps per backend (ids, use counts) and per group, with tracemalloc:
    at 10,000 x 10 it was ~240 B a backend (a set and a Counter beside the id dict), now
    ~115; the id dict and its id ints are most of it."""
    import gc
    import tracemalloc
    services = [svc(f"s{i}", f"10.96.{i // 250}.{i % 250 + 1}",
                    [(f"10.{1 + i // 250}.{i % 250}.{j}", 1) for j in range(10)])
                for i in range(600)]
    groups = desired_groups(services)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        r = Reconciler(NullKernel())
        assert not r.apply(groups).errors
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(r.backend_ids) == 6000
    per_backend = used / 6000
    assert per_backend < 150, f"{per_backend:.0f} B of reconciler state per backend"


def test_ids_are_the_smallest_free_and_come_back():
    from meshd.reconcile_state import Ids as _Ids
    ids = _Ids(counts=True)
    assert [ids.take() for _ in range(4)] == [1, 2, 3, 4]
    ids.free(2)
    ids.use(3, 1)
    assert ids.take() == 2 and ids.take() == 5
    assert ids.count(3) == 1 and ids.use(3, -1) == 0 and ids.use(3, -1) == 0
    ids.mark(9)  # adopted from the kernel
    ids.mark(_Ids.FAR + 5)  # far beyond the byte map: kept aside
    assert 9 in ids and _Ids.FAR + 5 in ids and 6 not in ids
    assert [ids.take() for _ in range(4)] == [6, 7, 8, 10]
    assert ids.use(_Ids.FAR + 5, 1) == 1 and ids.count(_Ids.FAR + 5) == 1
    ids.free(_Ids.FAR + 5)
    assert _Ids.FAR + 5 not in ids and ids.count(_Ids.FAR + 5) == 0
    ids.free(3)
    assert ids.count(3) == 0 and ids.take() == 3


def test_new_backends_go_in_one_batch_before_any_table_names_them():
    """A cold apply writes every new backend with one put_backends (batch syscalls in the
    kernel), checked after each entry; a Dataplane without put_backends gets them one by
    one, and both end in the same kernel state."""
    services = [svc(f"s{i}", f"10.96.1.{i}", [(f"10.0.{i}.{j}", 1) for j in range(1, 6)])
                for i in range(1, 30)]
    k = FakeKernel()
    rep = Reconciler(k).apply(desired_groups(services))
    assert not rep.errors and k.backend_batches == 1 and rep.ops["put_backend"] == 29 * 5
    assert k.serving() == expected(services)

    class SingleKernel(FakeKernel):
        put_backends = property(lambda self: None)  # not offered: one by one

    k1 = SingleKernel()
    rep1 = Reconciler(k1).apply(desired_groups(services))
    assert not rep1.errors and k1.backend_batches == 0 and rep1.ops == rep.ops
    assert (k1.backends, k1.serving()) == (k.backends, k.serving())
    # one more endpoint: one batch of one
    services[3] = svc("s4", "10.96.1.4", [(f"10.0.4.{j}", 1) for j in range(1, 7)])
    r = Reconciler(k)
    r.adopt(k.snapshot())
    r.apply(desired_groups(services))
    assert k.backend_batches == 2 and k.serving() == expected(services)


def test_a_batch_that_does_not_fit_fails_only_the_services_it_could_not_write():
    k = FakeKernel(backend_capacity=7)
    services = [svc("a", "10.96.0.1", [(f"10.0.1.{j}", 1) for j in range(1, 5)]),
                svc("b", "10.96.0.2", [(f"10.0.2.{j}", 1) for j in range(1, 5)])]
    rep = Reconciler(k).apply(desired_groups(services))  # 8 backends, room for 7
    assert set(rep.errors) == {"default/b:p/ipv4", "backend 10.0.2.4:8080/TCP"}, rep.errors
    assert k.serving() == expected(services[:1]) and len(k.backends) == 7


def test_tables_are_written_chunk_by_chunk_and_frontends_after_all_of_them(monkeypatch):
    """A cold apply of more groups than one build chunk writes each chunk's tables as it is
    built (only the chunks in flight are held), and no frontend before every table is in."""
    import meshd.reconciler
    monkeypatch.setattr(meshd.reconciler, "TABLE_BUILD_BATCH", 8)
    services = [svc(f"s{i}", f"10.96.0.{i}", [(f"10.1.0.{i}", 1), ("10.1.1.1", 2)])
                for i in range(1, 21)]
    k = FakeKernel()
    first_frontend_at = []
    put_frontend = k.put_frontend

    def spy(fe, gid, count, flags=0):
        if not first_frontend_at:
            first_frontend_at.append(len(k.tables))
        put_frontend(fe, gid, count, flags)
    k.put_frontend = spy
    rep = Reconciler(k).apply(desired_groups(services))
    assert not rep.errors and k.serving() == expected(services)
    assert k.table_batches == [8, 8, 4]
    assert first_frontend_at == [20]


def test_chunked_builds_skip_groups_whose_backends_failed_and_name_bad_ones(monkeypatch):
    """A cold apply of several build chunks: a group whose backends did not fit, or whose
    table cannot be built (more backends than slots), fails alone; the rest serve."""
    import meshd.reconciler
    monkeypatch.setattr(meshd.reconciler, "TABLE_BUILD_BATCH", 4)
    services = [svc(f"s{i:02}", f"10.96.0.{i}", [(f"10.1.0.{i}", 1)]) for i in range(1, 12)]
    services.append(svc("s12", "10.96.0.12", [("10.9.0.1", 1)]))  # its backend is written last
    services.append(svc("s13", "10.96.0.13", [(f"10.0.{j // 250}.{j % 250}", 1)
                                              for j in range(M + 1)]))
    k = FakeKernel(backend_capacity=11 + M + 1)  # room for all but s12's one backend
    rep = Reconciler(k).apply(desired_groups(services))
    assert set(rep.errors) == {"default/s12:p/ipv4", "backend 10.9.0.1:8080/TCP",
                               "default/s13:p/ipv4"}, set(rep.errors)
    assert "smaller than the number of backends" in rep.errors["default/s13:p/ipv4"]
    assert k.serving() == expected(services[:11])
