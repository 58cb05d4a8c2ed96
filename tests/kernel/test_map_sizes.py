"""Map sizes are load parameters; a full frontend map is a per-service error, never a stop."""

from __future__ import annotations

import pytest

from meshd import names
from meshd.dataplane import libbpf as bpf
from meshd.dataplane import loader
from meshd.dataplane.kernel import KernelDataplane
from meshd.desired import desired_groups
from meshd.errors import DataplaneError
from meshd.model import parse_service
from meshd.reconciler import Reconciler
from testlib import BPFFS

M = 1021


def svc(name: str, vips: list[str]):
    return parse_service({"namespace": "t", "name": name, "vips": vips,
                          "ports": [{"name": "p", "port": 80, "protocol": "TCP"}],
                          "endpoints": [{"address": "10.1.0.1", "ports": {"p": 8080}}]},
                         where=name)


def max_entries(pin_dir, name: str) -> int:
    fd = bpf.obj_get(pin_dir / name)
    try:
        return bpf.map_info(fd, name).max_entries
    finally:
        bpf.close_fd(fd)


def test_max_frontends_and_backends_size_the_maps(kernel_instance):
    inst, cg = kernel_instance
    maps = loader.load(BPFFS, inst, cg, M, max_frontends=4, max_backends=8)
    maps.close()
    pin_dir = names.pin_dir(BPFFS, inst)
    assert {n: max_entries(pin_dir, n) for n in (names.MAP_SVC, names.MAP_MAGLEV,
                                                  names.MAP_NAMES, names.MAP_BACKENDS)} == {
        names.MAP_SVC: 4, names.MAP_MAGLEV: 4, names.MAP_NAMES: 4, names.MAP_BACKENDS: 8}
    loader.load(BPFFS, inst, cg, M, max_frontends=4, max_backends=8).close()  # same: adopted
    loader.load(BPFFS, inst, cg, M).close()  # not given: whatever is pinned
    with pytest.raises(DataplaneError, match=r"meshd_svc_v1 pinned at .* holds 4 entries, 16 "
                                             r"were asked for: .*`meshd cleanup`"):
        loader.load(BPFFS, inst, cg, M, max_frontends=16)


def test_a_full_frontend_map_fails_only_the_services_that_do_not_fit(kernel_instance):
    inst, cg = kernel_instance
    maps = loader.load(BPFFS, inst, cg, M, max_frontends=4)
    try:
        rec = Reconciler(KernelDataplane(maps))
        a = svc("a", ["10.96.0.1", "10.96.0.2"])
        b = svc("b", ["10.96.0.3", "10.96.0.4"])
        c = svc("c", ["10.96.0.5", "10.96.0.6"])  # frontends 5 and 6: no room
        rep = rec.apply(desired_groups([a, b, c]))
        assert set(rep.errors) == {"t/c:p/ipv4"}, rep.errors
        assert "Argument list too long" in rep.errors["t/c:p/ipv4"]
        served = {str(k.addr[15]) for k, _v in maps.svc.items()}
        assert served == {"1", "2", "3", "4"}  # a and b serve
        # the failed service is retried on the next apply: room was made, it converges
        rep = rec.apply(desired_groups([a, c]))
        assert rep.errors == {}, rep.errors
        assert {str(k.addr[15]) for k, _v in maps.svc.items()} == {"1", "2", "5", "6"}
    finally:
        maps.close()
