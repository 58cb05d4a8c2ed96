"""The test API server speaks the API as kube-apiserver does (raw HTTP, no client library)."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp
import pytest

from kubeapi.harness import ApiError, KubeApiServer
from kubeapi.objects import endpoint, endpoint_slice, node, service

SVC = "/api/v1/services"
SLICES = "/apis/discovery.k8s.io/v1/endpointslices"


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    with KubeApiServer(tmp_path_factory.mktemp("kubeapi"), bookmark_interval=0.3) as api:
        yield api


@pytest.fixture
def ns() -> str:
    return "t-" + uuid.uuid4().hex[:8]


async def _watch(url: str, n: int, timeout: float = 10, stop=None) -> list[dict]:
    """The first n events of a watch stream (or all until it ends)."""
    out: list[dict] = []
    async with aiohttp.ClientSession(trust_env=False) as s:
        async with s.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            assert resp.status == 200
            async for line in resp.content:
                out.append(json.loads(line))
                if len(out) >= n or (stop and stop(out[-1])):
                    break
    return out


def test_list_at_revision_items_without_kind_and_selectors(kube, ns):
    a = kube.create("services", service(ns, "a", ["10.96.0.1"], [{"name": "http", "port": 80, "targetPort": 8080}],
                                        labels={"tier": "web"}))
    b = kube.create("services", service(ns, "b", ["10.96.0.2"], [{"name": "http", "port": 80, "targetPort": 80}]))
    assert int(b["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])
    lst = kube.request("GET", f"/api/v1/namespaces/{ns}/services")
    assert lst["kind"] == "ServiceList"
    assert int(lst["metadata"]["resourceVersion"]) == kube.revision()
    assert [i["metadata"]["name"] for i in lst["items"]] == ["a", "b"]
    assert all("kind" not in i for i in lst["items"])
    assert lst["items"][0]["metadata"]["resourceVersion"] == a["metadata"]["resourceVersion"]
    sel = kube.request("GET", f"/api/v1/namespaces/{ns}/services?labelSelector=tier%3Dweb")
    assert [i["metadata"]["name"] for i in sel["items"]] == ["a"]
    sel = kube.request("GET", f"/api/v1/namespaces/{ns}/services?labelSelector=%21tier")
    assert [i["metadata"]["name"] for i in sel["items"]] == ["b"]
    sel = kube.request("GET", f"{SVC}?fieldSelector=metadata.name%3Db,metadata.namespace%3D{ns}")
    assert [i["metadata"]["name"] for i in sel["items"]] == ["b"]
    got = kube.get("services", ns, "a")
    assert got["kind"] == "Service" and got["spec"]["clusterIPs"] == ["10.96.0.1"]


def test_writes_conflict_and_not_found(kube, ns):
    a = kube.create("services", service(ns, "a", ["10.96.0.3"], [{"name": "http", "port": 80, "targetPort": 80}]))
    with pytest.raises(ApiError) as e:
        kube.create("services", a)
    assert e.value.code == 400  # as kube-apiserver: no resourceVersion on create
    fresh = json.loads(json.dumps(a))
    del fresh["metadata"]["resourceVersion"]
    with pytest.raises(ApiError) as e:
        kube.create("services", fresh)
    assert e.value.code == 409 and e.value.body["reason"] == "AlreadyExists"
    a2 = kube.replace("services", a)
    with pytest.raises(ApiError) as e:
        kube.replace("services", a)  # stale resourceVersion
    assert e.value.code == 409 and e.value.body["reason"] == "Conflict"
    gone = kube.delete("services", ns, "a")
    assert int(gone["metadata"]["resourceVersion"]) > int(a2["metadata"]["resourceVersion"])
    with pytest.raises(ApiError) as e:
        kube.get("services", ns, "a")
    assert e.value.code == 404 and e.value.body["kind"] == "Status"


def test_paged_list_is_one_revision(kube, ns):
    for i in range(5):
        kube.create("services", service(ns, f"s{i}", [f"10.96.1.{i + 1}"],
                                        [{"name": "http", "port": 80, "targetPort": 80}]))
    first = kube.request("GET", f"/api/v1/namespaces/{ns}/services?limit=2")
    rv = first["metadata"]["resourceVersion"]
    kube.create("services", service(ns, "s9", ["10.96.1.99"], [{"name": "http", "port": 80, "targetPort": 80}]))
    names = [i["metadata"]["name"] for i in first["items"]]
    token = first["metadata"]["continue"]
    while token:
        page = kube.request("GET", f"/api/v1/namespaces/{ns}/services?limit=2&continue={token}")
        assert page["metadata"]["resourceVersion"] == rv
        names += [i["metadata"]["name"] for i in page["items"]]
        token = page["metadata"].get("continue")
    assert names == ["s0", "s1", "s2", "s3", "s4"]  # s9 came after the list's revision


def test_watch_streams_changes_after_rv_with_bookmarks(kube, ns):
    base = kube.request("GET", SLICES)["metadata"]["resourceVersion"]
    sl = endpoint_slice(ns, "web-abc", "web", [endpoint("10.0.0.1")], [{"name": "http", "port": 8080}])
    created = kube.create("endpointslices", sl)
    created["endpoints"].append(endpoint("10.0.0.2"))
    changed = kube.replace("endpointslices", created)
    gone = kube.delete("endpointslices", ns, "web-abc")
    url = f"{kube.url}{SLICES}?watch=1&resourceVersion={base}&allowWatchBookmarks=true"
    events = asyncio.run(_watch(url, 10, stop=lambda e: e["type"] == "BOOKMARK"))
    ours = [e for e in events if e["type"] != "BOOKMARK" and e["object"]["metadata"].get("namespace") == ns]
    assert [e["type"] for e in ours] == ["ADDED", "MODIFIED", "DELETED"]
    assert [e["object"]["metadata"]["resourceVersion"] for e in ours] == [
        created["metadata"]["resourceVersion"], changed["metadata"]["resourceVersion"],
        gone["metadata"]["resourceVersion"]]
    assert ours[0]["object"]["kind"] == "EndpointSlice"
    assert events[-1]["type"] == "BOOKMARK"
    assert int(events[-1]["object"]["metadata"]["resourceVersion"]) >= int(gone["metadata"]["resourceVersion"])


def test_watch_with_selector_sees_objects_leave_and_enter(kube, ns):
    base = kube.revision()
    n = kube.create("nodes", node(f"{ns}-n1", zone="z1"))
    n["metadata"]["labels"]["topology.kubernetes.io/zone"] = "z2"
    kube.replace("nodes", n)
    kube.create("nodes", node(f"{ns}-n2", zone="z1"))
    url = (f"{kube.url}/api/v1/nodes?watch=true&resourceVersion={base}"
           f"&labelSelector=topology.kubernetes.io/zone%3Dz1")
    events = asyncio.run(_watch(url, 3))
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", f"{ns}-n1"), ("DELETED", f"{ns}-n1"), ("ADDED", f"{ns}-n2")]
    url = f"{kube.url}/api/v1/nodes?watch=true&fieldSelector=metadata.name%3D{ns}-n2"  # no RV: current first
    events = asyncio.run(_watch(url, 1))
    assert events[0]["type"] == "ADDED" and events[0]["object"]["metadata"]["name"] == f"{ns}-n2"
    for name in (f"{ns}-n1", f"{ns}-n2"):
        kube.delete("nodes", None, name)


def test_compacted_rv_is_410_inside_a_200_stream(kube, ns):
    old = kube.revision()
    kube.create("services", service(ns, "c", ["10.96.2.1"], [{"name": "http", "port": 80, "targetPort": 80}]))
    kube.create("services", service(ns, "d", ["10.96.2.2"], [{"name": "http", "port": 80, "targetPort": 80}]))
    kube.compact()
    events = asyncio.run(_watch(f"{kube.url}{SVC}?watch=1&resourceVersion={old}", 5))
    assert len(events) == 1 and events[0]["type"] == "ERROR"
    assert events[0]["object"]["kind"] == "Status" and events[0]["object"]["code"] == 410
    with pytest.raises(ApiError) as e:
        kube.request("GET", f"{SVC}?resourceVersion={old}&resourceVersionMatch=Exact")
    assert e.value.code == 410


def test_cut_breaks_open_watches(kube, ns):
    async def body() -> None:
        rv = kube.revision()
        task = asyncio.create_task(_watch(f"{kube.url}{SVC}?watch=1&resourceVersion={rv}", 100, timeout=10))
        for _ in range(100):
            await asyncio.sleep(0.05)
            if await asyncio.to_thread(kube.cut_watches):
                break
        else:
            raise AssertionError("the watch never opened")
        with pytest.raises(aiohttp.ClientError):
            await task
    asyncio.run(body())
