"""The Kubernetes source (meshd.sources.kubernetes) against the test API server: lightkube's
config and transport, real HTTP, real etcd under it."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from ipaddress import ip_address

import pytest

from kubeapi.harness import KubeApiServer
from kubeapi.objects import endpoint, endpoint_slice, node, service
from meshd.config import KubernetesConfig
from meshd.sources.etcd_records import RegistrySnapshot
from meshd.sources.kubernetes import KubernetesSource

HTTP = [{"name": "http", "port": 80, "targetPort": "http"}]


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    with KubeApiServer(tmp_path_factory.mktemp("kubeapi"), bookmark_interval=0.2) as api:
        yield api


@pytest.fixture
def ns() -> str:
    return "t-" + uuid.uuid4().hex[:8]


@pytest.fixture
def kcfg(kube, tmp_path) -> KubernetesConfig:
    return KubernetesConfig(kubeconfig=kube.kubeconfig(tmp_path / "kubeconfig"))


class Snaps:
    def __init__(self) -> None:
        self.items: list[RegistrySnapshot] = []

    async def __call__(self, snap: RegistrySnapshot) -> None:
        self.items.append(snap)

    async def wait(self, pred, timeout: float = 10.0, what: str = "a matching snapshot") -> RegistrySnapshot:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.items and pred(self.items[-1]):
                return self.items[-1]
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {what} within {timeout}s; last: {self.items[-1] if self.items else None!r}")


@contextlib.asynccontextmanager
async def following(src: KubernetesSource):
    snaps = Snaps()
    task = asyncio.create_task(src.run(snaps))
    try:
        yield snaps
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)


def ours(snap: RegistrySnapshot, ns: str) -> dict:
    return {s.name: s for s in snap.services if s.namespace == ns}


def addrs(svc) -> list[str]:
    return sorted(str(e.address) for e in svc.endpoints)


def test_list_then_watch_merges_slices_and_a_deleted_service_is_gone(kube, kcfg, ns):
    kube.create("services", service(ns, "web", ["10.96.50.1"], HTTP))
    kube.create("endpointslices", endpoint_slice(ns, "web-a", "web", [endpoint("10.1.0.1")],
                                                 [{"name": "http", "port": 8080}]))
    kube.create("services", service(ns, "db", ["None"], [{"name": "pg", "port": 5432, "targetPort": 5432}]))

    async def body() -> None:
        src = KubernetesSource(kcfg)
        async with following(src) as snaps:
            snap = await snaps.wait(lambda s: "web" in ours(s, ns), what="web listed")
            assert addrs(ours(snap, ns)["web"]) == ["10.1.0.1"]
            assert "db" not in ours(snap, ns) and src.index.skipped()[f"{ns}/db"] == "headless (clusterIP None)"
            # a second slice, with one address already in the first: merged, deduplicated
            kube.create("endpointslices", endpoint_slice(ns, "web-b", "web", [endpoint("10.1.0.1"), endpoint("10.1.0.2")],
                                                         [{"name": "http", "port": 8080}]))
            snap = await snaps.wait(lambda s: addrs(ours(s, ns).get("web", ())) == ["10.1.0.1", "10.1.0.2"]
                                    if "web" in ours(s, ns) else False, what="web-b merged")
            assert dict(ours(snap, ns)["web"].endpoints[1].ports) == {"http": 8080}
            # empty slice (endpoints: null) replaces web-a's content
            kube.apply("endpointslices", endpoint_slice(ns, "web-a", "web", None, None))
            await snaps.wait(lambda s: addrs(ours(s, ns)["web"]) == ["10.1.0.1", "10.1.0.2"])
            kube.delete("endpointslices", ns, "web-b")
            await snaps.wait(lambda s: ours(s, ns)["web"].endpoints == (), what="endpoints gone")
            kube.apply("endpointslices", endpoint_slice(ns, "web-b", "web", [endpoint("10.1.0.3")],
                                                        [{"name": "http", "port": 8080}]))
            await snaps.wait(lambda s: addrs(ours(s, ns)["web"]) == ["10.1.0.3"])
            kube.delete("services", ns, "web")  # its slices linger
            snap = await snaps.wait(lambda s: "web" not in ours(s, ns), what="web gone")
            assert snap.orphan_endpoints >= 1
            assert src.connected and src.counters["relists"] == 0
    asyncio.run(asyncio.wait_for(body(), 60))


def test_sctp_is_rejected_with_the_reason_others_served(kube, kcfg, ns):
    kube.create("services", service(ns, "sig", ["10.96.51.1"], [{"name": "s", "port": 38412, "targetPort": 38412,
                                                                  "protocol": "SCTP"}]))
    kube.create("services", service(ns, "ok", ["10.96.51.2"], HTTP))

    async def body() -> None:
        async with following(KubernetesSource(kcfg)) as snaps:
            snap = await snaps.wait(lambda s: "ok" in ours(s, ns))
            errs = [e for e in snap.errors if e.where == f"kubernetes service {ns}/sig"]
            assert len(errs) == 1 and "protocol 'SCTP' is not supported" in errs[0].reason
            assert "sig" not in ours(snap, ns)
    asyncio.run(asyncio.wait_for(body(), 30))


def test_a_cut_watch_resumes_from_the_last_version_without_a_relist(kube, kcfg, ns):
    kube.create("services", service(ns, "a", ["10.96.52.1"], HTTP))

    async def body() -> None:
        src = KubernetesSource(kcfg)
        async with following(src) as snaps:
            await snaps.wait(lambda s: "a" in ours(s, ns))
            await _until(lambda: src.connected)
            assert await asyncio.to_thread(kube.cut_watches, 1.0) >= 2
            # made while no watch is open: the resumed watch delivers them from the old version
            kube.create("services", service(ns, "b", ["10.96.52.2"], HTTP))
            kube.delete("services", ns, "a")
            snap = await snaps.wait(lambda s: set(ours(s, ns)) == {"b"}, what="b in, a out")
            assert src.counters["watch_restarts"] >= 2 and src.counters["relists"] == 0
            assert src.counters["lists"] == 2  # services and slices once each
            assert snap.revision >= kube.revision() - 1
    asyncio.run(asyncio.wait_for(body(), 60))


def test_410_after_compaction_relists_at_once_and_converges_with_deletions(kube, kcfg, ns):
    for name, ip in (("keep", "10.96.53.1"), ("doomed", "10.96.53.2")):
        kube.create("services", service(ns, name, [ip], HTTP))
        kube.create("endpointslices", endpoint_slice(ns, f"{name}-1", name, [endpoint("10.2.0.1")],
                                                     [{"name": "http", "port": 8080}]))

    async def body() -> None:
        src = KubernetesSource(kcfg)
        async with following(src) as snaps:
            await snaps.wait(lambda s: {"keep", "doomed"} <= set(ours(s, ns)))
            await _until(lambda: src.connected)
            await asyncio.to_thread(kube.cut_watches, 1.5)
            kube.delete("services", ns, "doomed")  # its events are compacted away below
            kube.create("services", service(ns, "new", ["10.96.53.3"], HTTP))
            kept = kube.get("endpointslices", ns, "keep-1")
            kept["endpoints"] = [endpoint("10.2.0.9")]
            kube.replace("endpointslices", kept)
            kube.compact()
            snap = await snaps.wait(lambda s: set(ours(s, ns)) == {"keep", "new"} and
                                    addrs(ours(s, ns)["keep"]) == ["10.2.0.9"], timeout=20, what="converged")
            assert src.counters["relists"] >= 2  # both kinds got 410 and listed again
            assert ours(snap, ns)["new"].vips == (ip_address("10.96.53.3"),)
            await _until(lambda: src.connected)
    asyncio.run(asyncio.wait_for(body(), 60))


def test_node_zone_from_this_nodes_object(kube, kcfg, ns):
    me = f"{ns}-node"
    kube.create("nodes", node(me, zone="zone-x"))
    kube.create("nodes", node(f"{ns}-other", zone="zone-y"))
    zones: list[str | None] = []

    async def body() -> None:
        src = KubernetesSource(kcfg, node_name=me, on_node=zones.append)
        async with following(src):
            await _until(lambda: src.node_zone == "zone-x", what="zone-x")
            n = kube.get("nodes", None, me)
            n["metadata"]["labels"]["topology.kubernetes.io/zone"] = "zone-z"
            kube.replace("nodes", n)
            await _until(lambda: src.node_zone == "zone-z", what="zone-z")
            assert src.node["metadata"]["name"] == me
    asyncio.run(asyncio.wait_for(body(), 30))
    assert zones == ["zone-x", "zone-z"]


def test_bookmarks_keep_a_quiet_kind_fresh(kube, kcfg, ns):
    async def body() -> None:
        src = KubernetesSource(kcfg, node_name=f"{ns}-absent")
        async with following(src):
            await _until(lambda: src.connected)
            before = src.kinds[2].rv
            kube.create("services", service(ns, "x", ["10.96.54.1"], HTTP))  # not a Node event
            await _until(lambda: src.counters["bookmarks"] >= 3 and int(src.kinds[2].rv) > int(before),
                         what="the node watch's version moved by bookmarks")
    asyncio.run(asyncio.wait_for(body(), 30))


def test_unreachable_api_server_is_retried_with_the_reason(tmp_path):
    from testlib import free_port
    kc = tmp_path / "kubeconfig"
    kc.write_text("apiVersion: v1\nkind: Config\ncurrent-context: t\nclusters: [{name: t, cluster: "
                  f"{{server: 'http://127.0.0.1:{free_port()}'}}}}]\nusers: [{{name: t, user: {{}}}}]\n"
                  "contexts: [{name: t, context: {cluster: t, user: t}}]\n")

    async def body() -> None:
        src = KubernetesSource(KubernetesConfig(kubeconfig=kc))
        async with following(src) as snaps:
            await _until(lambda: src.counters["watch_restarts"] >= 3, what="retries")
            assert snaps.items == [] and "cannot connect" in (src.last_error or "")
    asyncio.run(asyncio.wait_for(body(), 30))


async def _until(pred, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.02)
