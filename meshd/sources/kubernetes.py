"""The Kubernetes source: Services, EndpointSlices and this node's Node, listed and watched.

KubernetesSource.run(emit) is the EtcdSource contract: it never returns (only cancellation
stops it) and hands `emit` a RegistrySnapshot after the first full read and after changes
(coalesced to at most one per 10 ms). For each of the three kinds, on its own:
  * list in pages of 500 at one resourceVersion (the first page's), converge the index to it;
  * watch from that version with bookmarks (allowWatchBookmarks, so a quiet kind's version
    stays fresh) and timeoutSeconds 5-10 min (the server closes, we resume: no re-list);
  * a broken stream (a cut connection, an error) resumes from the last version seen, after a
    backoff with jitter (0.1 s doubling to 10 s);
  * `410 Gone` — an ERROR event with a Status code 410 inside the 200 stream, or a 410 reply —
    re-lists at once and converges: objects deleted while we were away go too.
Each event changes one object in the index (kubernetes_index.KubeIndex): work per event is
proportional to the change; only the services it touched are composed again.

Client library: lightkube (chosen by bench/kube_client_bench.py, docs/kubernetes.md) for what
it does well — kubeconfig / in-cluster service account / exec and token-file auth, and the
configured HTTP client. The list and watch requests are made here, not with lightkube's
list()/watch(): its watch cannot ask for bookmarks and, after a 410, re-watches without a
version and so misses deletions (issue 10's traps). Objects are decoded as plain JSON.

Node: `node_zone` and `node` hold this node's Node object's zone label and the object (None
until seen); `on_node(zone)` (optional) is called when the zone changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from meshd.config import KubernetesConfig
from meshd.errors import RegistryError
from meshd.sources.etcd_records import RegistrySnapshot
from meshd.sources.kubernetes_index import KubeIndex
from meshd.sources.kubernetes_translate import node_zone

log = logging.getLogger("meshd.kubernetes")

SERVICES = "/api/v1/services"
SLICES = "/apis/discovery.k8s.io/v1/endpointslices"
NODES = "/api/v1/nodes"
LIST_PAGE = 500
EMIT_INTERVAL = 0.010
WATCH_SILENCE = 150.0  # seconds without a byte on a watch stream: reconnect
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 10.0
WATCH_TIMEOUT = (300, 600)  # seconds the server keeps a watch open (client-go: 5-10 min)
RBAC_HINT = ("; grant get/list/watch on services, endpointslices.discovery.k8s.io and nodes "
             "(deploy/kubernetes/rbac.yaml)")


class _Relist(Exception):
    """The watch cannot resume from our version (410 Gone): list again."""


class ApiStatusError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(f"HTTP {code}: {message}" + (RBAC_HINT if code in (401, 403) else ""))
        self.code = code


@dataclass
class _Kind:
    name: str
    path: str
    put: Callable[[dict[str, Any]], bool]
    delete: Callable[[dict[str, Any]], bool]
    replace: Callable[[list[dict[str, Any]]], int]
    params: dict[str, str] = field(default_factory=dict)
    rv: str | None = None  # every event up to here is applied (None: list first)
    listed: bool = False  # read in full at least once
    connected: bool = False  # a watch is open
    lost_at: float | None = None


def load_kubeconfig(cfg: KubernetesConfig | None) -> Any:
    """lightkube's SingleConfig: cfg.kubeconfig, else in-cluster, else $KUBECONFIG, else
    ~/.kube/config. RegistryError naming what was tried."""
    from lightkube import KubeConfig
    from lightkube.core.exceptions import ConfigError as LkConfigError
    try:
        if cfg is not None and cfg.kubeconfig is not None:
            return KubeConfig.from_file(cfg.kubeconfig).get()
        return KubeConfig.from_env().get()
    except (LkConfigError, OSError, ValueError, KeyError, TypeError) as e:
        where = f"kubernetes.kubeconfig {cfg.kubeconfig}" if cfg is not None and cfg.kubeconfig else \
            "no in-cluster service account, $KUBECONFIG or ~/.kube/config"
        raise RegistryError(f"kubernetes: cannot load the API configuration ({where}): {e}; set "
                            "kubernetes.kubeconfig, or run meshd in a pod with a service account") from None


def check_api_server_reachable(cfg: KubernetesConfig | None, service_cidrs) -> None:
    """meshd never translates its own connections (a VIP must not cut it off from its
    registry), so an API server reached through a Service ClusterIP -- the in-cluster
    default, 10.96.0.1 -- is unreachable once kube-proxy is gone. RegistryError naming the fix."""
    from ipaddress import ip_address
    from urllib.parse import urlsplit
    server = str(load_kubeconfig(cfg).cluster.server)
    host = urlsplit(server).hostname or ""
    try:
        addr = ip_address(host)
    except ValueError:
        return  # a host name: resolved by the node's resolver, not a ClusterIP we know
    if any(addr.version == n.version and addr in n for n in service_cidrs):
        raise RegistryError(
            f"kubernetes: the API server {server} is a Service ClusterIP (inside service_cidrs); "
            "meshd does not translate its own connections, so without kube-proxy it could not "
            "reach it. Give the API server's real address: KUBERNETES_SERVICE_HOST and "
            "KUBERNETES_SERVICE_PORT in the DaemonSet (deploy/kubernetes: the ConfigMap's "
            "api-server-host/port), or kubernetes.kubeconfig")


def http_client(cfg: KubernetesConfig | None) -> Any:
    """An httpx AsyncClient for the API server (base URL, TLS, auth from the kubeconfig); no
    proxy from the environment (a node agent talks to its API server directly)."""
    from lightkube.config import client_adapter
    conf = load_kubeconfig(cfg)
    return client_adapter.AsyncClient(conf, client_adapter.ConnectionParams(trust_env=False))


class KubernetesSource:
    def __init__(self, cfg: KubernetesConfig | None = None, node_name: str | None = None,
                 on_node: Callable[[str | None], None] | None = None):
        self.cfg = cfg
        self.node_name = node_name
        self.on_node = on_node
        self.index = KubeIndex()
        self.node: dict[str, Any] | None = None
        self.node_zone: str | None = None
        self.last_error: str | None = None
        self.counters: dict[str, int] = {"lists": 0, "relists": 0, "watch_restarts": 0, "events": 0,
                                         "bookmarks": 0, "emits": 0}
        self.kinds = [
            _Kind("services", SERVICES, self.index.put_service, self.index.delete_service,
                  self.index.replace_services),
            _Kind("endpointslices", SLICES, self.index.put_slice, self.index.delete_slice,
                  self.index.replace_slices),
        ]
        if node_name:
            self.kinds.append(_Kind("node", NODES, self._put_node, self._delete_node, self._replace_node,
                                    params={"fieldSelector": f"metadata.name={node_name}"}))
        self._changed: asyncio.Event | None = None
        self._client: Any = None

    @property
    def connected(self) -> bool:
        """Every watch is open (the snapshots are live)."""
        return all(k.connected for k in self.kinds)

    @property
    def revision(self) -> int:
        return max((int(k.rv) for k in self.kinds[:2] if k.rv and k.rv.isdigit()), default=0)

    # -- the node --
    def _put_node(self, obj: dict[str, Any]) -> bool:
        self.node = obj
        zone = node_zone(obj)
        if zone != self.node_zone:
            log.info("kubernetes: node %s is in zone %s", self.node_name, zone or "(none)")
            self.node_zone = zone
            if self.on_node is not None:
                self.on_node(zone)
        return False  # the services do not change

    def _delete_node(self, obj: dict[str, Any]) -> bool:
        self.node = None
        return False

    def _replace_node(self, items: list[dict[str, Any]]) -> int:
        if items:
            self._put_node(items[0])
        else:
            log.warning("kubernetes: no Node object named %s (node.name); no zone for topology hints",
                        self.node_name)
            self.node = None
        return 0

    # -- running --
    async def run(self, emit: Callable[[RegistrySnapshot], Awaitable[None]]) -> None:
        self._changed = asyncio.Event()
        if any(k.listed for k in self.kinds[:2]):
            self._changed.set()  # a resumed run(): its consumer has no snapshot yet
        while self._client is None:
            try:
                self._client = await asyncio.to_thread(http_client, self.cfg)
            except RegistryError as e:
                self.last_error = str(e)
                log.error("%s", e)
                await asyncio.sleep(BACKOFF_MAX)
        emitter = asyncio.create_task(self._emitter(emit), name="kubernetes-emit")
        followers = [asyncio.create_task(self._follow(k), name=f"kubernetes-{k.name}") for k in self.kinds]
        try:
            await asyncio.gather(*followers)
        finally:
            for t in (*followers, emitter):
                t.cancel()
            await asyncio.gather(*followers, emitter, return_exceptions=True)
            for k in self.kinds:
                k.connected = False
            client, self._client = self._client, None
            try:
                await asyncio.wait_for(client.aclose(), 2)
            except (Exception, asyncio.TimeoutError):
                log.debug("kubernetes: error closing the client", exc_info=True)

    def _mark_changed(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _emitter(self, emit: Callable[[RegistrySnapshot], Awaitable[None]]) -> None:
        assert self._changed is not None
        last = float("-inf")
        while True:
            await self._changed.wait()
            if not all(k.listed for k in self.kinds[:2]):
                self._changed.clear()  # a partial view would drop services: wait for both lists
                continue
            delay = last + EMIT_INTERVAL - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self._changed.clear()
            try:
                snap = self.index.snapshot(self.revision)
            except Exception:
                log.exception("kubernetes: building a snapshot failed")
                continue
            last = time.monotonic()
            try:
                await emit(snap)
                self.counters["emits"] += 1
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("kubernetes: the snapshot consumer failed (snapshot dropped)")

    async def _follow(self, kind: _Kind) -> None:
        backoff, failures = BACKOFF_FIRST, 0
        while True:
            try:
                if kind.rv is None:
                    await self._list(kind)
                await self._watch(kind)
                backoff, failures = BACKOFF_FIRST, 0  # the server ended the watch: resume at once
            except asyncio.CancelledError:
                raise
            except _Relist as e:
                kind.connected, kind.rv = False, None
                self.counters["relists"] += 1
                log.warning("kubernetes: %s: %s; listing again", kind.name, e)
            except Exception as e:
                text = _describe(e)
                if kind.connected:
                    kind.lost_at = time.monotonic()
                    log.warning("kubernetes: lost the %s watch: %s; resuming at resourceVersion %s", kind.name,
                                text, kind.rv)
                    backoff, failures = BACKOFF_FIRST, 0
                elif failures == 0:
                    log.warning("kubernetes: cannot read %s: %s; retrying (backoff %.1fs to %.0fs)", kind.name,
                                text, backoff, BACKOFF_MAX)
                else:
                    log.debug("kubernetes: %s still failing: %s", kind.name, text)
                self.last_error = f"{kind.name}: {text}"
                kind.connected = False
                self.counters["watch_restarts"] += 1
                failures += 1
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _get_json(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        resp = await self._client.get(path, params=params)
        if resp.status_code == 410:
            raise _Relist(_status_message(resp.content) or "410 Gone")
        if resp.status_code != 200:
            raise ApiStatusError(resp.status_code, _status_message(resp.content) or resp.reason_phrase)
        return json.loads(resp.content)

    async def _list(self, kind: _Kind) -> None:
        t0 = time.monotonic()
        items: list[dict[str, Any]] = []
        params = {**kind.params, "limit": str(LIST_PAGE)}
        rv = None
        while True:
            page = await self._get_json(kind.path, params)
            self.last_error = None  # the API answers: listing is progress, not an outage
            meta = page.get("metadata") or {}
            rv = rv or meta.get("resourceVersion")
            items.extend(page.get("items") or [])
            if not meta.get("continue"):
                break
            params["continue"] = meta["continue"]
            await asyncio.sleep(0)
        changed = kind.replace(items)
        kind.rv, kind.listed = str(rv or "0"), True
        self.counters["lists"] += 1
        if changed or kind.name != "node":
            self._mark_changed()
        log.info("kubernetes: listed %d %s at resourceVersion %s in %.0f ms", len(items), kind.name, kind.rv,
                 (time.monotonic() - t0) * 1000)

    async def _watch(self, kind: _Kind) -> None:
        import httpx2 as httpx
        server_timeout = random.randint(*WATCH_TIMEOUT)
        params = {**kind.params, "watch": "1", "resourceVersion": kind.rv or "0", "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(server_timeout)}
        # a silent dead peer is noticed within WATCH_SILENCE: the API server sends a bookmark
        # about every minute to a watch that asks for them, so that long without a byte is dead
        timeout = httpx.Timeout(10.0, read=min(server_timeout + 60.0, WATCH_SILENCE))
        async with self._client.stream("GET", kind.path, params=params, timeout=timeout) as resp:
            if resp.status_code == 410:
                raise _Relist(_status_message(await resp.aread()) or "410 Gone")
            if resp.status_code != 200:
                raise ApiStatusError(resp.status_code, _status_message(await resp.aread()) or resp.reason_phrase)
            kind.connected = True
            self.last_error = None if self.connected else self.last_error
            if kind.lost_at is not None:
                log.info("kubernetes: %s watch resumed at resourceVersion %s after %.1fs", kind.name, kind.rv,
                         time.monotonic() - kind.lost_at)
                kind.lost_at = None
            async for line in resp.aiter_lines():
                if line.strip():
                    self._event(kind, json.loads(line))

    def _event(self, kind: _Kind, ev: dict[str, Any]) -> None:
        typ, obj = ev.get("type"), ev.get("object") or {}
        if typ == "ERROR":
            code, msg = obj.get("code"), obj.get("message") or obj.get("reason") or "no message"
            if code == 410:
                raise _Relist(f"resourceVersion {kind.rv} is too old ({msg})")
            raise ApiStatusError(int(code or 500), msg)
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if typ == "BOOKMARK":
            self.counters["bookmarks"] += 1
        elif typ in ("ADDED", "MODIFIED"):
            self.counters["events"] += 1
            if kind.put(obj):
                self._mark_changed()
        elif typ == "DELETED":
            self.counters["events"] += 1
            if kind.delete(obj):
                self._mark_changed()
        else:
            log.debug("kubernetes: %s watch: ignoring an event of type %r", kind.name, typ)
            return
        if rv:
            kind.rv = str(rv)


def _status_message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace").strip()
    return str(data.get("message") or data.get("reason") or "") if isinstance(data, dict) else ""


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    if isinstance(exc, ApiStatusError):
        return text
    if "ConnectError" in name:
        return f"cannot connect ({text or name})"
    return f"{name}: {text}" if text else name
