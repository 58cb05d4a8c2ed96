"""A test Kubernetes API server: a thin HTTP layer over a real etcd, as kube-apiserver is.

Serves Services and Nodes (core v1) and EndpointSlices (discovery.k8s.io/v1):
  * GET list  -> {kind: <Kind>List, metadata: {resourceVersion: <etcd revision>}, items: [...]};
    items carry no `kind`/`apiVersion` (as the real one); `limit` + `continue` pages at one
    revision; `labelSelector`, `fieldSelector` (metadata.name, metadata.namespace);
    `resourceVersionMatch=Exact` lists at that revision (410 if compacted).
  * GET ?watch=1&resourceVersion=RV -> a 200 stream of JSON lines {type, object}: ADDED,
    MODIFIED, DELETED from RV+1 (an etcd watch with prev_kv), BOOKMARK (with
    allowWatchBookmarks=true: etcd progress requests every `bookmark_interval`); without RV (or
    "0") the current objects first as ADDED. A compacted RV: one ERROR event carrying a
    Status with code 410 (reason Expired) inside the 200 stream, then the stream ends — what
    kube-apiserver sends. Selectors apply to watches: an object leaving the selection is
    DELETED, one entering it ADDED. `timeoutSeconds` ends the stream cleanly.
  * GET/POST/PUT/DELETE of one object; PUT with metadata.resourceVersion is a compare-and-swap
    (409 Conflict); POST of an existing name is 409 AlreadyExists; errors are Status objects.
  * resourceVersion of an object = its etcd mod revision (not stored in the value).
Test controls: POST /_test/compact (compact etcd at its current revision), POST /_test/cut[?hold=S]
(abort every open watch stream: a broken connection; refuse new watches for S seconds),
POST /_test/bulk (many puts), GET /_test/revision.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import aetcd
from aetcd import rpc
from aetcd.utils import prefix_range_end
from aiohttp import web

from kubeapi.selectors import SelectorError, field_selector, label_selector

log = logging.getLogger("kubeapi")


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES = {r.plural: r for r in (
    Resource("", "v1", "services", "Service", True),
    Resource("", "v1", "nodes", "Node", False),
    Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
)}


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Success" if code < 400 else "Failure", "message": message, "reason": reason,
            "code": code}


def _reply(code: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=code, text=json.dumps(body), content_type="application/json")


def _error(code: int, reason: str, message: str) -> web.Response:
    return _reply(code, status(code, reason, message))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _stored(obj: dict[str, Any]) -> bytes:
    """What goes to etcd: no kind/apiVersion (so list items carry none), no resourceVersion."""
    return _dumps({k: v for k, v in obj.items() if k not in ("kind", "apiVersion")})


class _Gone(Exception):
    pass


class KubeApi:
    def __init__(self, etcd_host: str, etcd_port: int, bookmark_interval: float = 60.0):
        self.etcd_host, self.etcd_port = etcd_host, etcd_port
        self.bookmark_interval = bookmark_interval
        self.client: aetcd.Client | None = None
        self.hold_until = 0.0  # watches refused (503) until then: an outage of the watch path
        self.streams: dict[int, web.BaseRequest] = {}  # id -> an open watch request

    # -- etcd --
    async def connect(self) -> None:
        self.client = aetcd.Client(self.etcd_host, self.etcd_port, timeout=10)
        await self.client.connect()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    @property
    def kv(self) -> Any:
        assert self.client is not None
        return self.client.kvstub

    async def revision(self) -> int:
        resp = await self.kv.Range(rpc.RangeRequest(key=b"/registry-revision-probe"))
        return int(resp.header.revision)

    @staticmethod
    def prefix(res: Resource, ns: str | None) -> bytes:
        return f"/registry/{res.plural}/{ns}/".encode() if ns else f"/registry/{res.plural}/".encode()

    @staticmethod
    def key(res: Resource, ns: str | None, name: str) -> bytes:
        return f"/registry/{res.plural}/{ns}/{name}".encode() if res.namespaced else \
            f"/registry/{res.plural}/{name}".encode()

    @staticmethod
    def decode(value: bytes, rev: int) -> dict[str, Any]:
        obj = json.loads(value)
        obj.setdefault("metadata", {})["resourceVersion"] = str(rev)
        return obj

    # -- HTTP --
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/_test/compact", self.h_compact)
        app.router.add_post("/_test/cut", self.h_cut)
        app.router.add_get("/_test/revision", self.h_revision)
        app.router.add_post("/_test/bulk", self.h_bulk)
        app.router.add_get("/version", self.h_version)
        app.router.add_route("*", "/{tail:.*}", self.h_api)
        return app

    async def h_version(self, request: web.Request) -> web.Response:
        return _reply(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0-meshd-test"})

    async def h_revision(self, request: web.Request) -> web.Response:
        return _reply(200, {"revision": await self.revision()})

    async def h_compact(self, request: web.Request) -> web.Response:
        rev = await self.revision()
        await self.kv.Compact(rpc.CompactionRequest(revision=rev, physical=True))
        return _reply(200, {"revision": rev})

    async def h_bulk(self, request: web.Request) -> web.Response:
        """{plural, items}: put every item (create or overwrite, 100 per etcd txn) — for benchmarks
        that need 10^4 objects in seconds; each put is still its own watch event."""
        body = await request.json()
        res = RESOURCES[body["plural"]]
        ops = []
        for obj in body["items"]:
            meta = obj.setdefault("metadata", {})
            meta.pop("resourceVersion", None)
            meta.setdefault("uid", str(uuid.uuid4()))
            key = self.key(res, meta.get("namespace"), meta["name"])
            ops.append(rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=_stored(obj))))
        rev = 0
        for i in range(0, len(ops), 100):
            rev = (await self.kv.Txn(rpc.TxnRequest(success=ops[i:i + 100]))).header.revision
        return _reply(200, {"revision": rev})

    async def h_cut(self, request: web.Request) -> web.Response:
        """Abort every open watch; with ?hold=S, refuse new watches (503) for S seconds."""
        hold = float(request.query.get("hold") or 0)
        self.hold_until = asyncio.get_running_loop().time() + hold
        n = 0
        for req in list(self.streams.values()):
            if req.transport is not None:
                req.transport.abort()
                n += 1
        return _reply(200, {"cut": n})

    def _route(self, path: str) -> tuple[Resource, str | None, str | None] | None:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, rest = "", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, rest = parts[1], parts[3:]
            if parts[2] != "v1":
                return None
        else:
            return None
        ns = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        if not 1 <= len(rest) <= 2:
            return None
        res = RESOURCES.get(rest[0])
        if res is None or res.group != group or (ns is not None and not res.namespaced):
            return None
        return res, ns, rest[1] if len(rest) == 2 else None

    async def h_api(self, request: web.Request) -> web.StreamResponse:
        route = self._route(request.path)
        if route is None:
            return _error(404, "NotFound", f"the server could not find the requested resource ({request.path})")
        res, ns, name = route
        q = request.query
        try:
            if request.method == "GET" and name is None:
                labels, fields = label_selector(q.get("labelSelector")), field_selector(q.get("fieldSelector"))
                if q.get("watch") in ("1", "true", "True"):
                    return await self.watch(request, res, ns, labels, fields)
                return await self.list(request, res, ns, labels, fields)
            if request.method == "GET":
                return await self.get(res, ns, name)
            if request.method == "POST" and name is None:
                return await self.create(res, ns, await request.json())
            if request.method == "PUT" and name is not None:
                return await self.replace(res, ns, name, await request.json())
            if request.method == "DELETE" and name is not None:
                return await self.delete(res, ns, name)
        except SelectorError as e:
            return _error(400, "BadRequest", str(e))
        except json.JSONDecodeError as e:
            return _error(400, "BadRequest", f"the body is not JSON: {e}")
        except _Gone as e:
            return _error(410, "Expired", str(e))
        return _error(405, "MethodNotAllowed", f"{request.method} is not supported on {request.path}")

    # -- reads --
    async def list(self, request: web.Request, res: Resource, ns: str | None, labels: Any,
                   fields: Any) -> web.Response:
        q = request.query
        prefix = self.prefix(res, ns)
        end = prefix_range_end(prefix)
        limit = int(q.get("limit") or 0)
        rev, start = 0, prefix
        if q.get("continue"):
            try:
                tok = json.loads(base64.urlsafe_b64decode(q["continue"]))
                rev, start = int(tok["rv"]), base64.b64decode(tok["start"])
            except (ValueError, KeyError, TypeError):
                return _error(400, "BadRequest", "invalid continue token")
        elif q.get("resourceVersionMatch") == "Exact" and q.get("resourceVersion"):
            rev = int(q["resourceVersion"])
        items: list[dict[str, Any]] = []
        more = False
        last = b""
        while True:
            r = await self._range(start, end, rev, limit or 0)
            if rev == 0:
                rev = int(r.header.revision)
            for kv in r.kvs:
                obj = self.decode(kv.value, kv.mod_revision)
                if labels(obj) and fields(obj):
                    items.append(obj)
                last = kv.key
            more = bool(r.more)
            if not more or (limit and len(items) >= limit) or not r.kvs:
                break
            start = last + b"\0"
        meta: dict[str, Any] = {"resourceVersion": str(rev)}
        if more and limit:
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(
                {"rv": rev, "start": base64.b64encode(last + b"\0").decode()}).encode()).decode()
        return _reply(200, {"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": meta,
                            "items": items})

    async def _range(self, start: bytes, end: bytes, rev: int, limit: int) -> Any:
        try:
            return await self.kv.Range(rpc.RangeRequest(key=start, range_end=end, revision=rev, limit=limit))
        except rpc.AioRpcError as e:
            if "compacted" in (e.details() or ""):
                raise _Gone(f"too old resource version: {rev}") from None
            raise

    async def get(self, res: Resource, ns: str | None, name: str) -> web.Response:
        resp = await self.kv.Range(rpc.RangeRequest(key=self.key(res, ns, name)))
        if not resp.kvs:
            return _error(404, "NotFound", f'{res.plural} "{name}" not found')
        obj = self.decode(resp.kvs[0].value, resp.kvs[0].mod_revision)
        return _reply(200, {"kind": res.kind, "apiVersion": res.api_version, **obj})

    # -- writes --
    def _body(self, res: Resource, ns: str | None, body: Any, name: str | None) -> dict[str, Any] | web.Response:
        if not isinstance(body, dict):
            return _error(400, "BadRequest", "the body must be a JSON object")
        if body.get("kind", res.kind) != res.kind:
            return _error(400, "BadRequest", f"kind {body.get('kind')!r} sent to {res.plural}")
        meta = body.setdefault("metadata", {})
        if name is not None and meta.get("name", name) != name:
            return _error(400, "BadRequest", "the name of the object does not match the name on the URL")
        if name is None and not meta.get("name"):
            return _error(422, "Invalid", "metadata.name: Required value")
        if res.namespaced:
            if ns is None or meta.get("namespace", ns) != ns:
                return _error(400, "BadRequest", "the namespace of the object does not match the namespace "
                              "on the URL")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        body["kind"], body["apiVersion"] = res.kind, res.api_version
        return body

    async def create(self, res: Resource, ns: str | None, body: Any) -> web.Response:
        obj = self._body(res, ns, body, None)
        if isinstance(obj, web.Response):
            return obj
        meta = obj["metadata"]
        rv = meta.pop("resourceVersion", None)
        if rv:
            return _error(400, "BadRequest", "resourceVersion should not be set on objects to be created")
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        key = self.key(res, ns, meta["name"])
        txn = await self.kv.Txn(rpc.TxnRequest(
            compare=[rpc.Compare(key=key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=_stored(obj)))]))
        if not txn.succeeded:
            return _error(409, "AlreadyExists", f'{res.plural} "{meta["name"]}" already exists')
        meta["resourceVersion"] = str(txn.header.revision)
        return _reply(201, obj)

    async def replace(self, res: Resource, ns: str | None, name: str, body: Any) -> web.Response:
        obj = self._body(res, ns, body, name)
        if isinstance(obj, web.Response):
            return obj
        key = self.key(res, ns, name)
        cur = await self.kv.Range(rpc.RangeRequest(key=key))
        if not cur.kvs:
            return _error(404, "NotFound", f'{res.plural} "{name}" not found')
        old = json.loads(cur.kvs[0].value)["metadata"]
        meta = obj["metadata"]
        rv = meta.pop("resourceVersion", None)
        meta["uid"], meta["creationTimestamp"] = old.get("uid"), old.get("creationTimestamp")
        expect = int(rv) if rv else cur.kvs[0].mod_revision
        txn = await self.kv.Txn(rpc.TxnRequest(
            compare=[rpc.Compare(key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=expect)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=_stored(obj)))]))
        if not txn.succeeded:
            return _error(409, "Conflict", f'Operation cannot be fulfilled on {res.plural} "{name}": the object '
                          "has been modified; please apply your changes to the latest version and try again")
        meta["resourceVersion"] = str(txn.header.revision)
        return _reply(200, obj)

    async def delete(self, res: Resource, ns: str | None, name: str) -> web.Response:
        resp = await self.kv.DeleteRange(rpc.DeleteRangeRequest(key=self.key(res, ns, name), prev_kv=True))
        if not resp.deleted:
            return _error(404, "NotFound", f'{res.plural} "{name}" not found')
        obj = self.decode(resp.prev_kvs[0].value, resp.header.revision)
        return _reply(200, {"kind": res.kind, "apiVersion": res.api_version, **obj})

    # -- watch --
    async def watch(self, request: web.Request, res: Resource, ns: str | None, labels: Any,
                    fields: Any) -> web.StreamResponse:
        q = request.query
        if asyncio.get_running_loop().time() < self.hold_until:
            return _error(503, "ServiceUnavailable", "the test holds watches off")
        rv = q.get("resourceVersion", "")
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1", "True")
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else random.uniform(1800, 3600)
        prefix = self.prefix(res, ns)
        sel = (lambda o: labels(o) and fields(o))
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        self.streams[id(request)] = request
        assert self.client is not None
        call = rpc.WatchStub(self.client.channel).Watch()
        try:
            if rv in ("", "0"):
                start = await self._initial_events(resp, res, prefix, sel)
            else:
                start = int(rv) + 1
            await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                key=prefix, range_end=prefix_range_end(prefix), start_revision=start, prev_kv=True)))
            first = await call.read()
            if first.compact_revision or first.canceled:
                await self._gone(resp, rv, first.compact_revision)
                return resp
            ticker = asyncio.create_task(self._progress(call)) if bookmarks else None
            try:
                await asyncio.wait_for(self._pump(call, resp, res, sel, bookmarks, start), timeout)
            except asyncio.TimeoutError:
                pass
            finally:
                if ticker is not None:
                    ticker.cancel()
            return resp
        except (ConnectionResetError, ConnectionError):
            return resp
        finally:
            call.cancel()
            self.streams.pop(id(request), None)

    async def _initial_events(self, resp: web.StreamResponse, res: Resource, prefix: bytes, sel: Any) -> int:
        r = await self._range(prefix, prefix_range_end(prefix), 0, 0)
        for kv in r.kvs:
            obj = self.decode(kv.value, kv.mod_revision)
            if sel(obj):
                await resp.write(_dumps({"type": "ADDED", "object": {"kind": res.kind,
                                                                     "apiVersion": res.api_version, **obj}}) + b"\n")
        return int(r.header.revision) + 1

    async def _progress(self, call: Any) -> None:
        while True:
            await asyncio.sleep(self.bookmark_interval)
            await call.write(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))

    @staticmethod
    async def _gone(resp: web.StreamResponse, rv: str, compacted: int) -> None:
        """kube-apiserver's answer to a compacted RV: an ERROR event in the 200 stream."""
        await resp.write(_dumps({"type": "ERROR", "object": status(
            410, "Expired", f"too old resource version: {rv} ({compacted})")}) + b"\n")

    async def _pump(self, call: Any, resp: web.StreamResponse, res: Resource, sel: Any, bookmarks: bool,
                    start: int) -> None:
        import grpc
        typed = {"kind": res.kind, "apiVersion": res.api_version}
        while True:
            wr = await call.read()
            if wr is grpc.aio.EOF:
                return
            if wr.compact_revision:  # etcd: created, then cancelled for compaction
                await self._gone(resp, str(start - 1), wr.compact_revision)
                return
            if wr.canceled:
                return
            if not wr.events:
                if bookmarks and wr.header.revision:
                    await resp.write(_dumps({"type": "BOOKMARK", "object": {
                        **typed, "metadata": {"resourceVersion": str(wr.header.revision)}}}) + b"\n")
                continue
            out = []
            for ev in wr.events:
                prev = self.decode(ev.prev_kv.value, ev.kv.mod_revision) if ev.HasField("prev_kv") else None
                if ev.type == rpc.Event.DELETE:
                    if prev is not None and sel(prev):
                        out.append(("DELETED", prev))
                    continue
                obj = self.decode(ev.kv.value, ev.kv.mod_revision)
                now, before = sel(obj), prev is not None and sel(prev)
                if now and before:
                    out.append(("MODIFIED", obj))
                elif now:
                    out.append(("ADDED", obj))
                elif before:
                    out.append(("DELETED", obj))
            for kind, obj in out:
                await resp.write(_dumps({"type": kind, "object": {**typed, **obj}}) + b"\n")
