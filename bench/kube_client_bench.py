#!/usr/bin/env python3
"""Which Kubernetes client library for the API source: lightkube vs kubernetes_asyncio.

  .venv/bin/python bench/kube_client_bench.py [--services 10000] [--changes 500]

The test API server (tests/kubeapi: real etcd, a thin HTTP layer) is loaded with N Services
and N EndpointSlices (10 endpoints each, kubectl-shaped). For each library, in a fresh child
process (so neither pays for the other's imports): list both kinds in pages of 500 at one
resourceVersion with the library's typed models, keep every object (an informer's cache), then
watch both kinds from that version (bookmarks requested) while the parent changes --changes
Services and --changes slices; the child stops after receiving all 2 x changes events.
Reported per library: list seconds, watch seconds, CPU seconds (user+sys of the child), peak
RSS, RSS after import (the baseline). Ratios against lightkube. Bounded: 300 s per child.
Writes bench/results/kube_client.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

CHILD_TIMEOUT = 300


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _usage() -> dict[str, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024}


# ---- child: one library ------------------------------------------------------------------------

async def child_lightkube(kubeconfig: str, expect: int) -> dict[str, float]:
    from lightkube import AsyncClient, KubeConfig
    from lightkube.resources.core_v1 import Service
    from lightkube.resources.discovery_v1 import EndpointSlice
    base = _rss_mb()
    client = AsyncClient(KubeConfig.from_file(kubeconfig))
    t0 = time.monotonic()
    cache, rvs = {}, {}
    for res in (Service, EndpointSlice):
        it = client.list(res, namespace="*", chunk_size=500)
        async for obj in it:
            cache[(res.__name__, obj.metadata.namespace, obj.metadata.name)] = obj
        rvs[res] = it.resourceVersion
    t_list = time.monotonic() - t0
    print("listed", flush=True)
    t1 = time.monotonic()
    seen = 0

    async def follow(res):  # type: ignore[no-untyped-def]
        nonlocal seen
        async for typ, obj in client.watch(res, namespace="*", resource_version=rvs[res]):
            if typ in ("ADDED", "MODIFIED"):
                cache[(res.__name__, obj.metadata.namespace, obj.metadata.name)] = obj
                seen += 1
            if seen >= expect:
                return
    tasks = [asyncio.create_task(follow(r)) for r in (Service, EndpointSlice)]
    while seen < expect:
        await asyncio.sleep(0.01)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    t_watch = time.monotonic() - t1
    await client.close()
    return {"objects": len(cache), "list_s": t_list, "watch_s": t_watch, "rss_after_import_mb": base,
            "rss_after_list_mb": _rss_mb()}


async def child_kubernetes_asyncio(kubeconfig: str, expect: int) -> dict[str, float]:
    from kubernetes_asyncio import client as kc, config, watch
    base = _rss_mb()
    await config.load_kube_config(config_file=kubeconfig)
    api = kc.ApiClient()
    core, disc = kc.CoreV1Api(api), kc.DiscoveryV1Api(api)
    t0 = time.monotonic()
    cache, rvs = {}, {}
    for kind, fn in (("Service", core.list_service_for_all_namespaces),
                     ("EndpointSlice", disc.list_endpoint_slice_for_all_namespaces)):
        cont = None
        while True:
            resp = await fn(limit=500, _continue=cont)
            for obj in resp.items:
                cache[(kind, obj.metadata.namespace, obj.metadata.name)] = obj
            cont = resp.metadata._continue
            if not cont:
                break
        rvs[kind] = (fn, resp.metadata.resource_version)
    t_list = time.monotonic() - t0
    print("listed", flush=True)
    t1 = time.monotonic()
    seen = 0

    async def follow(kind: str) -> None:
        nonlocal seen
        fn, rv = rvs[kind]
        w = watch.Watch()
        async for ev in w.stream(fn, resource_version=rv, allow_watch_bookmarks=True):
            if ev["type"] in ("ADDED", "MODIFIED"):
                obj = ev["object"]
                cache[(kind, obj.metadata.namespace, obj.metadata.name)] = obj
                seen += 1
            if seen >= expect:
                return
    tasks = [asyncio.create_task(follow(k)) for k in ("Service", "EndpointSlice")]
    while seen < expect:
        await asyncio.sleep(0.01)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    t_watch = time.monotonic() - t1
    await api.close()
    return {"objects": len(cache), "list_s": t_list, "watch_s": t_watch, "rss_after_import_mb": base,
            "rss_after_list_mb": _rss_mb()}


def child_main(lib: str, kubeconfig: str, expect: int) -> None:
    fn = {"lightkube": child_lightkube, "kubernetes_asyncio": child_kubernetes_asyncio}[lib]
    out = asyncio.run(fn(kubeconfig, expect))
    out.update(_usage())
    print(json.dumps(out), flush=True)


# ---- parent --------------------------------------------------------------------------------------

def objects(n: int, eps: int) -> tuple[list[dict], list[dict]]:
    from kubeapi.objects import endpoint, endpoint_slice, service
    svcs, slices = [], []
    for i in range(n):
        ns, name = f"ns{i % 50}", f"svc-{i}"
        ip = f"10.{96 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"
        svcs.append(service(ns, name, [ip], [{"name": "http", "port": 80, "targetPort": "http"}]))
        slices.append(endpoint_slice(ns, f"{name}-abcde", name,
                                     [endpoint(f"10.{(i >> 8) & 255}.{i & 255}.{k + 1}", node=f"node-{k}",
                                               zone=f"zone-{k % 3}") for k in range(eps)],
                                     [{"name": "http", "port": 8080}]))
    return svcs, slices


def run_child(lib: str, api, kubeconfig: Path, svcs: list[dict], slices: list[dict], changes: int) -> dict:
    env = dict(os.environ, NO_PROXY="*", no_proxy="*")
    proc = subprocess.Popen([sys.executable, __file__, "--child", lib, "--kubeconfig", str(kubeconfig),
                             "--expect", str(2 * changes)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "listed":
            raise RuntimeError(f"{lib}: child failed before listing: {line!r}")
        time.sleep(0.5)  # let both watches open
        stamp = str(time.time())
        for obj in svcs[:changes]:
            obj["metadata"].setdefault("labels", {})["bench"] = stamp
        for obj in slices[:changes]:
            obj["metadata"]["labels"]["bench"] = stamp
        api.bulk("services", svcs[:changes])
        api.bulk("endpointslices", slices[:changes])
        out, _ = proc.communicate(timeout=CHILD_TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"{lib}: child exited {proc.returncode}")
        return json.loads(out.strip().splitlines()[-1])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--changes", type=int, default=500)
    ap.add_argument("--child")
    ap.add_argument("--kubeconfig")
    ap.add_argument("--expect", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kube_client.json"))
    args = ap.parse_args()
    if args.child:
        child_main(args.child, args.kubeconfig, args.expect)
        return
    from kubeapi.harness import KubeApiServer
    import importlib.metadata as md
    results = {}
    with tempfile.TemporaryDirectory(prefix="kube-bench-") as tmp, KubeApiServer(Path(tmp) / "api") as api:
        svcs, slices = objects(args.services, args.endpoints)
        t0 = time.monotonic()
        for i in range(0, len(svcs), 2000):
            api.bulk("services", svcs[i:i + 2000])
            api.bulk("endpointslices", slices[i:i + 2000])
        print(f"loaded {len(svcs)} services + {len(slices)} slices in {time.monotonic() - t0:.1f}s", flush=True)
        kubeconfig = api.kubeconfig(Path(tmp) / "kubeconfig")
        for lib in ("lightkube", "kubernetes_asyncio"):
            r = run_child(lib, api, kubeconfig, svcs, slices, args.changes)
            r["version"] = md.version(lib.replace("_", "-"))
            results[lib] = {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}
            print(lib, json.dumps(results[lib]), flush=True)
    base = results["lightkube"]
    ratios = {k: round(results["kubernetes_asyncio"][k] / base[k], 2)
              for k in ("list_s", "watch_s", "cpu_s", "peak_rss_mb") if base.get(k)}
    doc = {"services": args.services, "endpoint_slices": args.services, "endpoints_per_slice": args.endpoints,
           "changes_per_kind": args.changes, "results": results, "kubernetes_asyncio_over_lightkube": ratios}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print("kubernetes_asyncio / lightkube:", json.dumps(ratios))


if __name__ == "__main__":
    main()
