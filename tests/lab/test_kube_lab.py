"""Kubernetes API -> kernel: the test API server (real etcd), the Kubernetes source, the daemon's
reconciler on the lab's socket LB, real TCP from a client in the lab cgroup to lab backends.
A watch cut and a compaction (410) happen in the middle; deletions made during them converge.

(`meshd run` starts the Kubernetes source once the daemon wires it; until then this drives the
same reconciler the daemon uses, as tests/lab/test_socket_lb.py does.)"""

from __future__ import annotations

import asyncio
import contextlib
import time

from kubeapi.harness import KubeApiServer
from kubeapi.objects import endpoint, endpoint_slice, service
from meshd.config import KubernetesConfig
from meshd.desired import desired_groups
from meshd.sources.kubernetes import KubernetesSource

VIP, VIP2 = "10.96.0.10", "10.96.0.11"
PORTS = [{"name": "http", "port": 80, "targetPort": "http"}]
SLICE_PORTS = [{"name": "http", "port": 8080}]


def tcp(lab, addr: str, count: int = 30) -> dict:
    return lab.agent("tcp", cgroup=True, addr=addr, port=80, count=count, timeout=2)


async def until_backends(lab, addr: str, want: set[str], timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        res = await asyncio.to_thread(tcp, lab, addr)
        if set(res["by_backend"]) == want and (want or res["errors"]):
            return res
        if time.monotonic() > deadline:
            raise AssertionError(f"{addr}: wanted backends {sorted(want)}, got {res}")
        await asyncio.sleep(0.2)


def test_services_and_slices_through_the_api_reach_real_backends(lab, socklb, tmp_path):
    b = {i: lab.backend_addr(i, 4) for i in (1, 2, 3)}
    with KubeApiServer(tmp_path / "api", bookmark_interval=0.2) as api:
        api.create("services", service("default", "web", [VIP], PORTS))
        api.create("endpointslices", endpoint_slice("default", "web-1", "web",
                                                    [endpoint(b[1]), endpoint(b[2])], SLICE_PORTS))
        applied: list[int] = []

        async def emit(snap) -> None:
            report = socklb.rec.apply(desired_groups(list(snap.services)))
            assert not report.errors, report.errors
            applied.append(snap.revision)

        async def body() -> None:
            src = KubernetesSource(KubernetesConfig(kubeconfig=api.kubeconfig(tmp_path / "kubeconfig")))
            task = asyncio.create_task(src.run(emit))
            try:
                await until_backends(lab, VIP, {"b1", "b2"})
                # a watch outage: changes made meanwhile, then their history compacted away
                await asyncio.to_thread(api.cut_watches, 1.5)
                sl = api.get("endpointslices", "default", "web-1")
                sl["endpoints"] = [endpoint(b[3])]
                api.replace("endpointslices", sl)
                api.create("services", service("default", "api", [VIP2], PORTS))
                api.create("endpointslices", endpoint_slice("default", "api-1", "api", [endpoint(b[1])],
                                                            SLICE_PORTS))
                api.compact()
                await until_backends(lab, VIP, {"b3"})
                await until_backends(lab, VIP2, {"b1"})
                assert src.counters["relists"] >= 2
                # a deleted service is gone from the kernel though its slice lingers
                api.delete("services", "default", "api")
                res = await until_backends(lab, VIP2, set())
                assert sum(res["errors"].values()) == 30
                await until_backends(lab, VIP, {"b3"})
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(task, 5)

        asyncio.run(asyncio.wait_for(body(), 90))
        assert applied


def test_meshd_run_in_kubernetes_mode_is_the_nodes_only_proxy(lab, make_meshd, tmp_path):
    """`meshd run` with only the `kubernetes` section (no embedded etcd is started): services
    created through the API serve, `meshd services` names their objects and the skipped
    ones, a watch cut + compaction converges, and a `kill -9` + restart under a connecting
    client loses no connection."""
    from meshdlib import ConnectLoop, backends, be
    b = {i: lab.backend_addr(i, 4) for i in (1, 2, 3)}
    with KubeApiServer(tmp_path / "api", bookmark_interval=0.2) as api:
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        m = make_meshd(None, extra={"kubernetes": {"kubeconfig": str(kubeconfig)},
                                    "node": {"name": "node-a"}})
        doc = m.config.read_text().replace("etcd: null\n", "")  # absent: Kubernetes mode
        m.config.write_text(doc)
        api.create("services", service("default", "web", [VIP], PORTS))
        api.create("endpointslices", endpoint_slice("default", "web-1", "web",
                                                    [endpoint(b[1]), endpoint(b[2])], SLICE_PORTS))
        api.create("services", service("default", "hl", ["None"], PORTS))  # headless
        m.start()
        m.wait(lambda r: backends(r, "default/web:http/ipv4") == {be(lab, 1), be(lab, 2)},
               "the API's service in the kernel", timeout=30)
        assert m.embedded_etcd_pid() is None, "Kubernetes mode started an embedded etcd"
        text = m.cli("services")
        assert "(kubernetes service default/web resourceVersion " in text, text
        assert "skipped: kubernetes service default/hl: headless" in text, text
        # a watch outage with changes and a compaction in it
        api.cut_watches(1.0)
        sl = api.get("endpointslices", "default", "web-1")
        sl["endpoints"] = [endpoint(b[3])]
        api.replace("endpointslices", sl)
        api.compact()
        m.wait(lambda r: backends(r, "default/web:http/ipv4") == {be(lab, 3)},
               "convergence after the cut and the compaction", timeout=30)
        # kill -9 and a restart under a connecting client
        load = ConnectLoop(lab, VIP, duration=8)
        try:
            time.sleep(1.0)
            m.proc.kill()
            m.proc.wait(10)
            m.proc = None
            m.start()
            m.wait(lambda r: (r.get("daemon") or {}).get("pid") == m.proc.pid,
                   "the restarted daemon", timeout=30)
            res = load.result()
        finally:
            load.close()
        assert res["errors"] == {} and res["by_backend"] == {"b3": res["count"]}, res
        assert m.stop() == 0
