"""Backend entries written with bpf_map_update_batch: the same bytes as one by one, and a
full map fails only the entries that do not fit (each with its own error)."""

from __future__ import annotations

import ctypes as C
import ipaddress

from meshd.dataplane import loader
from meshd.dataplane.kernel import KernelDataplane
from meshd.desired import BackendRef
from testlib import BPFFS

M = 1021
ip = ipaddress.ip_address


def test_a_batch_writes_what_single_updates_write(kernel_instance):
    inst, cg = kernel_instance
    maps = loader.load(BPFFS, inst, cg, M, max_backends=64)
    try:
        dp = KernelDataplane(maps)
        refs = [BackendRef(ip("10.0.0.1"), 8080, "TCP"), BackendRef(ip("10.0.0.2"), 53, "UDP"),
                BackendRef(ip("fd00::7"), 443, "TCP"), BackendRef(ip("255.255.255.254"), 1, "UDP")]
        assert dp.put_backends([(i + 1, r) for i, r in enumerate(refs)]) == {}
        for i, r in enumerate(refs):
            dp.put_backend(i + 11, r)  # the one-by-one way, for comparison
        assert len(list(maps.backends.keys())) == 8
        for i in range(len(refs)):
            assert bytes(_val(maps, i + 1)) == bytes(_val(maps, i + 11)), refs[i]
        assert {bid: ref for bid, ref in dp.snapshot().backends.items() if bid < 10} == \
            {i + 1: r for i, r in enumerate(refs)}
    finally:
        maps.close()


def _val(maps, bid: int):
    v = maps.backends.lookup(C.c_uint32(bid))
    assert v is not None, bid
    return v


def test_a_full_map_fails_only_the_entries_that_do_not_fit(kernel_instance):
    inst, cg = kernel_instance
    maps = loader.load(BPFFS, inst, cg, M, max_backends=8)
    try:
        dp = KernelDataplane(maps)
        items = [(i, BackendRef(ip(f"10.0.1.{i}"), 80, "TCP")) for i in range(1, 11)]
        failed = dp.put_backends(items)
        assert sorted(failed) == [9, 10], failed
        assert all("Argument list too long" in e for e in failed.values()), failed
        assert sorted(k.value for k in maps.backends.keys()) == list(range(1, 9))
    finally:
        maps.close()
