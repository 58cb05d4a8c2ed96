"""meshd.records: what is kept after validation is slim, yet reads, compares and dumps as the
pydantic models did (the record contract's JSON shape); the etcd registry's memory per
endpoint; etcd keys classified by the fast path as by the long one."""

from __future__ import annotations

import gc
import json
import sys
import tracemalloc

import pytest

from meshd.errors import RecordError
from meshd.model import EndpointIn, ServiceIn, parse_endpoint, parse_service
from meshd.records import Endpoint, Service
from meshd.sources.etcd_records import KeyInfo, RegistryState, classify_key

FULL = {
    "namespace": "shop", "name": "web", "vips": ["10.96.0.10", "fd00:96::a"],
    "ports": [{"name": "http", "port": 80, "node_port": 30080},
              {"name": "dns", "port": 53, "protocol": "UDP"}],
    "session_affinity": "ClientIP", "affinity_timeout_seconds": 60, "lb": {},
    "internal_traffic_policy": "Local", "external_traffic_policy": "Local",
    "external_ips": ["198.51.100.7"], "load_balancer_ips": ["203.0.113.9"],
    "load_balancer_source_ranges": ["192.0.2.0/24"], "health_check_node_port": 31000,
    "topology_mode": "Auto",
    "endpoints": [
        {"address": "10.1.0.1", "ports": {"http": 8080, "dns": 5353}, "weight": 3, "zone": "a",
         "node": "n1", "ready": False, "serving": True, "terminating": True,
         "hints_for_zones": ["a", "b"]},
        {"address": "fd00::1", "ports": {"http": 8080}},
    ],
}


@pytest.mark.parametrize("mode", ["python", "json"])
def test_records_dump_exactly_as_the_pydantic_models(mode: str) -> None:
    kept = parse_service(FULL, "x")
    model = ServiceIn.model_validate(FULL)
    assert kept.model_dump(mode=mode) == model.model_dump(mode=mode)
    assert json.loads(kept.model_dump_json()) == json.loads(model.model_dump_json())
    assert kept.model_dump(mode=mode, exclude={"endpoints"}) == \
        model.model_dump(mode=mode, exclude={"endpoints"})
    ep = FULL["endpoints"][0]
    assert parse_endpoint(ep, "e").model_dump(mode=mode) == EndpointIn.model_validate(ep).model_dump(mode=mode)
    assert parse_service(kept.model_dump(mode=mode), "again") == kept


def test_records_read_compare_and_copy_like_the_models() -> None:
    svc = parse_service(FULL, "x")
    ep = svc.endpoints[0]
    assert (ep.weight, ep.zone, ep.node, ep.ready, ep.serving, ep.terminating, ep.hints_for_zones) == \
        (3, "a", "n1", False, True, True, ("a", "b"))
    assert ep.is_serving and not ep.usable and svc.endpoints[1].usable
    assert svc.key == "shop/web" and svc.ports[0].node_port == 30080
    moved = svc.model_copy(update={"endpoints": svc.endpoints[1:]})
    assert moved.endpoints == svc.endpoints[1:] and moved.name == svc.name and moved != svc
    assert Endpoint(address="fd00::1", ports={"http": 8080}) == svc.endpoints[1]
    with pytest.raises(RecordError, match="weight"):
        parse_endpoint({"address": "10.1.0.1", "ports": {"http": 1}, "weight": -1}, "e")


def test_an_endpoint_record_is_slim_and_shares_what_repeats() -> None:
    a = parse_endpoint({"address": "10.1.0.1", "ports": {"http": 8080}, "node": "n1"}, "a")
    b = parse_endpoint({"address": "10.1.0.2", "ports": {"http": 8080}, "node": "n" + "1"}, "b")
    assert not hasattr(a, "__dict__")
    assert sys.getsizeof(a) <= 64  # a pydantic model with its instance dict: ~360 B
    assert a.ports is b.ports and a._rest is b._rest  # one mapping, one conditions tuple
    s1 = parse_service({**FULL, "name": "a", "endpoints": []}, "a")
    s2 = parse_service({**FULL, "name": "b", "endpoints": []}, "b")
    assert s1.ports is s2.ports and s1.namespace is s2.namespace
    assert not hasattr(s1, "__dict__") and isinstance(s1, Service)


def _records(n: int, prefix: str = "/meshd/"):
    for i in range(n):
        yield (f"{prefix}services/bench/s{i}".encode(), json.dumps({
            "namespace": "bench", "name": f"s{i}", "vips": [f"10.96.{i // 256}.{i % 256}"],
            "ports": [{"name": "http", "port": 80}]}).encode())
        for j in range(10):
            k = i * 16 + j
            yield (f"{prefix}endpoints/bench/s{i}/pod-{i}-{j}".encode(),
                   json.dumps({"address": f"10.200.{k // 256 % 256}.{k % 256}",
                               "ports": {"http": 8080}}).encode())


def test_the_registry_holds_about_300_bytes_per_endpoint() -> None:
    """Everything RegistryState keeps for 1,000 services x 10 endpoints, per endpoint (the
    service's share included). With pydantic models, a key and value hash per record it was
    ~1,000 B; docs/performance.md breaks the rest down."""
    items = list(_records(1000))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        state = RegistryState("/meshd/")
        state.replace(items)
        snap = state.snapshot(1)
        del items
        gc.collect()
        per_endpoint = (tracemalloc.get_traced_memory()[0] - before) / 10_000
    finally:
        tracemalloc.stop()
    assert len(snap.services) == 1000 and not snap.errors and len(state) == 11_000
    print(f"\nregistry: {per_endpoint:.0f} B per endpoint")
    assert per_endpoint < 450


def test_policies_are_kept_by_key_and_snapshotted_sorted() -> None:
    state = RegistryState("/p/")
    rec = {"namespace": "a", "name": "z", "from": [{"unit": "web.service"}], "to": [{"service": "db"}]}
    assert state.put(b"/p/policies/a/z", json.dumps(rec).encode())
    assert state.put(b"/p/policies/a/b", json.dumps({**rec, "name": "b", "action": "deny"}).encode())
    assert not state.put(b"/p/policies/a/z", json.dumps(rec).encode())  # equal: no change
    assert state.put(b"/p/policies/a/y", json.dumps(rec).encode())  # the key says y, the record z
    snap = state.snapshot(1)
    assert [p.key for p in snap.policies] == ["a/b", "a/z"] and snap.services == ()
    assert [(e.where, e.reason) for e in snap.errors] == [
        ("/p/policies/a/y", "the key names policy a/y but the record says a/z; they must match")]
    assert len(state) == 3 and state.delete(b"/p/policies/a/b") and not state.delete(b"/p/policies/a/b")
    assert [p.key for p in state.snapshot(2).policies] == ["a/z"]
    state.replace([])
    assert len(state) == 0 and state.snapshot(3).policies == () and state.snapshot(3).errors == ()


def test_a_put_of_an_equal_record_changes_nothing() -> None:
    state = RegistryState("/p/")
    assert state.put(b"/p/services/a/b", json.dumps({"namespace": "a", "name": "b", "vips": [],
                                                     "ports": [{"name": "http", "port": 80}]}).encode())
    assert state.put(b"/p/endpoints/a/b/x", b'{"address": "10.1.0.1", "ports": {"http": 80}}')
    first = state.snapshot(1).services[0]
    # the same record written again, spelled differently: no change, the same object
    assert not state.put(b"/p/endpoints/a/b/x", b'{"ports":{"http":80},"address":"10.1.0.1","weight":1}')
    assert state.snapshot(2).services[0] is first
    assert state.put(b"/p/endpoints/a/b/x", b'{"address": "10.1.0.1", "ports": {"http": 81}}')
    assert state.snapshot(3).services[0].endpoints[0].ports == {"http": 81}
    assert state.delete(b"/p/endpoints/a/b/x") and not state.delete(b"/p/endpoints/a/b/x")
    assert state.snapshot(4).services[0].endpoints == ()
    state.replace([])
    assert len(state) == 0 and state.snapshot(5).services == ()


@pytest.mark.parametrize("key, want", [
    (b"/p/services/shop/web", KeyInfo("service", "shop", "web", None)),
    (b"/p/endpoints/shop/web/Pod_1.a-b", KeyInfo("endpoint", "shop", "web", "Pod_1.a-b")),
    (b"/p/endpoints/a/" + b"b" * 63 + b"/x", KeyInfo("endpoint", "a", "b" * 63, "x")),
    (b"/p/policies/shop/web-to-db", KeyInfo("policy", "shop", "web-to-db", None)),
    (b"/p/policies/shop/web/x", "malformed key: a policy lives at /p/policies/<namespace>/<name>"),
    (b"/p/policies/Shop/web", "namespace 'Shop'"),
    (b"/p/other/shop/web", None),
    (b"/q/services/shop/web", None),
    (b"/p/services/Shop/web", "namespace 'Shop'"),
    (b"/p/services/shop/" + b"w" * 64, "name 'wwwwwww"),
    (b"/p/services/shop/web-", "name 'web-'"),
    (b"/p/services/shop/web/x", "malformed key"),
    (b"/p/endpoints/shop/web", "malformed key"),
    (b"/p/endpoints/shop/web/a b", "endpoint id 'a b'"),
    (b"/p/endpoints/shop/web/" + b"x" * 254, "endpoint id"),
    (b"/p/services/sh\xffop/web", "not UTF-8"),
])
def test_keys_are_classified_by_the_fast_path_as_by_the_long_one(key: bytes, want) -> None:
    if isinstance(want, str):
        with pytest.raises(RecordError, match=want.replace("'", ".")):
            classify_key("/p/", key)
    else:
        assert classify_key("/p/", key) == want
