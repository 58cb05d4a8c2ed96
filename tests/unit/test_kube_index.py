"""The Kubernetes source's index: one event changes one service; deletions converge on re-list."""

from __future__ import annotations

from kubeapi.objects import endpoint, endpoint_slice, service
from meshd.sources.kubernetes_index import KubeIndex

HTTP = [{"name": "http", "port": 80, "targetPort": 8080}]


def _svc(i: int, rv: str = "1") -> dict:
    s = service("ns", f"s{i}", [f"10.96.0.{i + 1}"], HTTP)
    s["metadata"]["resourceVersion"] = rv
    return s


def _slice(i: int, *ips: str) -> dict:
    return endpoint_slice("ns", f"s{i}-x", f"s{i}", [endpoint(ip) for ip in ips], [{"name": "http", "port": 8080}])


def test_one_slice_event_recomposes_one_service():
    idx = KubeIndex()
    idx.replace_services([_svc(i) for i in range(50)])
    idx.replace_slices([_slice(i, f"10.1.0.{i + 1}") for i in range(50)])
    first = idx.snapshot(1)
    assert len(first.services) == 50
    assert idx.put_slice(_slice(7, "10.1.0.8", "10.1.0.99"))
    assert not idx.put_slice(_slice(7, "10.1.0.8", "10.1.0.99"))  # same content: no change
    assert not idx.put_service(_svc(3))  # same resourceVersion: not parsed again
    second = idx.snapshot(2)
    changed = [a for a, b in zip(first.services, second.services) if a is not b]
    assert [s.name for s in changed] == ["s7"]
    assert [str(e.address) for e in second.services[[s.name for s in second.services].index("s7")].endpoints] == \
        ["10.1.0.8", "10.1.0.99"]


def test_relist_converges_and_a_service_without_its_object_is_gone():
    idx = KubeIndex()
    idx.replace_services([_svc(1), _svc(2)])
    idx.replace_slices([_slice(1, "10.1.0.1"), _slice(2, "10.1.0.2")])
    assert [s.name for s in idx.snapshot(1).services] == ["s1", "s2"]
    idx.replace_services([_svc(1)])  # s2 deleted while we were not watching
    snap = idx.snapshot(2)
    assert [s.name for s in snap.services] == ["s1"] and snap.orphan_endpoints == 1
    idx.replace_slices([_slice(1, "10.1.0.1")])
    assert idx.snapshot(3).orphan_endpoints == 0


def test_a_slice_moving_to_another_service():
    idx = KubeIndex()
    idx.replace_services([_svc(1), _svc(2)])
    idx.put_slice(_slice(1, "10.1.0.1"))
    moved = _slice(1, "10.1.0.1")
    moved["metadata"]["labels"]["kubernetes.io/service-name"] = "s2"
    idx.put_slice(moved)
    by = {s.name: [str(e.address) for e in s.endpoints] for s in idx.snapshot(1).services}
    assert by == {"s1": [], "s2": ["10.1.0.1"]}


def test_slice_trigger_times_after_the_start_reach_the_snapshot_once():
    import time as _time
    from meshd.sources.kubernetes_index import KubeIndex, TRIGGER_ANNOTATION
    idx = KubeIndex()

    def sl(name, when, n):
        return {"metadata": {"namespace": "d", "name": name, "resourceVersion": str(n),
                             "labels": {"kubernetes.io/service-name": "web"},
                             "annotations": {TRIGGER_ANNOTATION: when}},
                "addressType": "IPv4", "endpoints": [], "ports": []}
    old = "2020-01-01T00:00:00Z"  # before this index existed: not ours to measure
    now = _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime(_time.time() + 1))
    idx.put_slice(sl("a", old, 1))
    idx.put_slice(sl("b", now, 2))
    snap = idx.snapshot(5)
    assert len(snap.triggers) == 1 and abs(snap.triggers[0] - (_time.time() + 1)) < 2
    assert idx.snapshot(6).triggers == ()  # taken once
