"""The write side of the etcd registry, used by the CLI (`meshd service put|delete|list`,
`meshd endpoint add|remove|list`, `meshd policy put|delete|list`).

Every record is validated exactly as the etcd source will read it (meshd.sources.etcd) before
anything is written, so a record the daemon would reject is refused here with the same reason
(RecordError) and nothing is written. Services are stored as canonical JSON (defaults filled
in, no `endpoints`); each endpoint is its own key, optionally attached to a lease so that it
disappears `ttl` seconds after its owner stops refreshing it (`meshd endpoint add --ttl N`).

Connection problems raise RegistryError naming the endpoints tried and the fix.
"""

from __future__ import annotations

import os

# Before grpc is imported (by aetcd): see meshd.sources.etcd.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import aetcd  # noqa: E402
from aetcd import rpc  # noqa: E402
from aetcd.utils import prefix_range_end  # noqa: E402

from meshd.config import EtcdConfig  # noqa: E402
from meshd.errors import RecordError, RegistryError  # noqa: E402
from meshd.model import (Service, local_endpoint_problem, local_endpoint_reason, parse_endpoint,  # noqa: E402
                         parse_service)
from meshd.policy_model import parse_policy  # noqa: E402
from meshd.records import Policy  # noqa: E402
from meshd.sources.etcd import (LIST_PAGE, MAX_VALUE_BYTES, check_record, close_client, describe,  # noqa: E402
                                endpoint_id_problem, endpoint_key, endpoints_in_service_reason,
                                endpoints_prefix, hint, key_text, label_problem, open_client,
                                policy_key, service_key)

log = logging.getLogger("meshd.registry")


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def _raw_value(value: bytes) -> Any:
    """A stored value for display: its JSON if it parses, else the text (or bytes as \\xNN)."""
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return value.decode("utf-8", "backslashreplace")


class Registry:
    """async with Registry(cfg) as reg: await reg.put_service({...})"""

    def __init__(self, cfg: EtcdConfig, endpoints: list[str] | None = None):
        self.cfg = cfg
        self.prefix = cfg.prefix
        self.endpoints: list[str] = list(endpoints or cfg.endpoints)
        if not self.endpoints:
            raise RegistryError("registry: no etcd endpoint (meshd.cli_registry.registry_urls() gives the "
                                "embedded etcd's)")
        self.url: str | None = None  # the endpoint in use
        self._client: aetcd.Client | None = None

    async def __aenter__(self) -> Registry:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- connection ---------------------------------------------------------------------
    async def connect(self) -> None:
        """Connect to the first endpoint that answers a read of the prefix."""
        if self._client is not None:
            return
        failures = []
        for url in self.endpoints:
            client = None
            try:
                client = await open_client(self.cfg, url)
                prefix = self.prefix.encode()
                await client.kvstub.Range(rpc.RangeRequest(key=prefix, range_end=prefix_range_end(prefix),
                                                           limit=1, keys_only=True),
                                          timeout=self.cfg.dial_timeout, metadata=client.metadata)
            except RegistryError:
                await close_client(client)
                raise
            except Exception as e:
                await close_client(client)
                failures.append((url, e))
                continue
            self._client, self.url = client, url
            return
        reasons = "; ".join(f"{u}: {describe(e)}" for u, e in failures)
        fixes = {hint(e, u) for u, e in failures} - {""}
        fix = "".join(sorted(fixes)) if fixes else \
            "; is `meshd run` (embedded etcd) started? or set etcd.endpoints (MESHD_ETCD__ENDPOINTS)"
        verb = "use" if fixes else "reach"
        raise RegistryError(f"cannot {verb} etcd at {', '.join(self.endpoints)} ({reasons}){fix}")

    async def close(self) -> None:
        client, self._client = self._client, None
        await close_client(client)

    def _need(self) -> aetcd.Client:
        if self._client is None:
            raise RegistryError("registry is not connected; use `async with Registry(cfg) as reg:`")
        return self._client

    def _failed(self, what: str, e: BaseException) -> RegistryError:
        return RegistryError(f"etcd at {self.url}: {what} failed: {describe(e)}{hint(e, self.url or '')}")

    # ---- services -----------------------------------------------------------------------
    async def put_service(self, data: dict[str, Any]) -> Service:
        """Validate a service record (same shape as in the static file, without `endpoints`) and
        store it at <prefix>services/<namespace>/<name>. RecordError if invalid (nothing written)."""
        ns, name = (data.get("namespace"), data.get("name")) if isinstance(data, dict) else (None, None)
        where = service_key(self.prefix, ns if isinstance(ns, str) else "?", name if isinstance(name, str) else "?")
        if not isinstance(data, dict):
            raise RecordError(where, f"a service record must be a mapping (got {type(data).__name__})")
        if "endpoints" in data:
            raise RecordError(where, endpoints_in_service_reason(self.prefix, str(ns), str(name)))
        svc = parse_service(data, where)
        key = service_key(self.prefix, svc.namespace, svc.name)
        record = svc.model_dump(mode="json", exclude={"endpoints"})
        for port in record["ports"]:  # older nodes reject keys they do not know: write
            if port.get("node_port") is None:  # node_port only where it is set
                port.pop("node_port", None)
        if not record.get("allow_local_endpoints"):  # likewise: only when it is true
            record.pop("allow_local_endpoints", None)
        value = _json(record)
        if len(value) > MAX_VALUE_BYTES:
            raise RecordError(key, f"record is {len(value)} bytes; at most {MAX_VALUE_BYTES} are allowed")
        check_record(self.prefix, key.encode(), value)  # exactly what the source will do
        try:
            await self._need().put(key.encode(), value)
        except aetcd.ClientError as e:
            raise self._failed(f"writing {key}", e) from None
        return svc

    async def delete_service(self, namespace: str, name: str) -> int:
        """Delete the service key and its whole endpoints/<namespace>/<name>/ subtree in one
        transaction. Returns the number of keys deleted (0: there was nothing)."""
        self._check_names(namespace, name)
        key = service_key(self.prefix, namespace, name).encode()
        eps = endpoints_prefix(self.prefix, namespace, name).encode()
        client = self._need()
        try:
            _, responses = await client.transaction(compare=[], success=[
                client.transactions.delete(key), client.transactions.delete(eps, range_end=prefix_range_end(eps))],
                failure=[])  # aetcd 1.0: failure=None raises TypeError
        except aetcd.ClientError as e:
            raise self._failed(f"deleting service {namespace}/{name}", e) from None
        return sum(r.response_delete_range.deleted for r in responses)

    async def list_services(self) -> list[dict[str, Any]]:
        """Every key under <prefix>services/: {key, namespace, name, value (the stored JSON, or text
        if it is not JSON), error (why the daemon rejects it, or None)}. Sorted by key."""
        out = []
        for kv in await self._range(f"{self.prefix}services/"):
            rec: dict[str, Any] = {"key": key_text(kv.key), "namespace": None, "name": None,
                                   "value": _raw_value(kv.value), "error": None}
            try:
                checked = check_record(self.prefix, kv.key, kv.value)
                if checked is not None:
                    rec["namespace"], rec["name"] = checked[0].namespace, checked[0].name
            except RecordError as e:
                rec["error"] = e.reason
                parts = rec["key"][len(self.prefix):].split("/")
                if len(parts) == 3:
                    rec["namespace"], rec["name"] = parts[1], parts[2]
            out.append(rec)
        return out

    # ---- endpoints ----------------------------------------------------------------------
    async def add_endpoint(self, namespace: str, name: str, endpoint_id: str, data: dict[str, Any],
                           ttl: int | None = None) -> int | None:
        """Validate an endpoint record and store it at <prefix>endpoints/<ns>/<name>/<id>. If the
        service exists, the endpoint's port names must be among its ports. With `ttl` (seconds),
        the key is attached to a new lease (etcd rounds TTLs below its minimum, about 2 s, up);
        returns the lease id for keep_alive(). RecordError if invalid (nothing written)."""
        self._check_names(namespace, name)
        key = endpoint_key(self.prefix, namespace, name, endpoint_id)
        problem = endpoint_id_problem(endpoint_id) if isinstance(endpoint_id, str) else "endpoint id must be a string"
        if problem:
            raise RecordError(key, problem)
        if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 1):
            raise RecordError(key, f"ttl must be a whole number of seconds >= 1 (got {ttl!r})")
        ep = parse_endpoint(data, key)
        value = _json(ep.model_dump(mode="json"))
        check_record(self.prefix, key.encode(), value)
        client = self._need()
        svc_key = service_key(self.prefix, namespace, name)
        try:
            got = await client.get(svc_key.encode())
        except aetcd.ClientError as e:
            raise self._failed(f"reading {svc_key}", e) from None
        if got is not None:
            try:
                checked = check_record(self.prefix, svc_key.encode(), got.value)
            except RecordError:
                checked = None  # the service record is broken: its own error says so
            if checked is not None and isinstance(checked[1], Service):
                known = {p.name for p in checked[1].ports}
                unknown = sorted(p for p in ep.ports if p not in known)
                if unknown:
                    raise RecordError(key, f"ports: unknown port name {unknown[0]!r} (service {namespace}/{name} "
                                      f"has ports: {', '.join(sorted(known))})")
                if not checked[1].allow_local_endpoints and local_endpoint_problem(ep.address):
                    raise RecordError(key, local_endpoint_reason(ep.address, f"{namespace}/{name}"))
        lease_id = None
        try:
            if ttl is not None:
                lease = await client.lease(ttl)
                lease_id = lease.id
            await client.put(key.encode(), value, lease=lease_id)
        except aetcd.ClientError as e:
            if lease_id is not None:
                await self._revoke_quietly(lease_id)
            raise self._failed(f"writing {key}", e) from None
        return lease_id

    async def keep_alive(self, lease_id: int, ttl: int) -> None:
        """Refresh the lease every ttl/3 s until cancelled. Connection problems are retried (on the
        next endpoint, with a fresh client) while the lease can still be alive; RegistryError once
        etcd says the lease is gone (its keys were deleted) or it certainly expired meanwhile."""
        interval = max(ttl / 3, 0.2)
        alive_until = time.monotonic() + ttl
        delay = interval
        while True:
            await asyncio.sleep(delay)
            delay = interval
            try:
                reply = await self._need().refresh_lease(lease_id)
            except (aetcd.ClientError, RegistryError) as e:
                if time.monotonic() > alive_until:
                    raise RegistryError(f"lease {lease_id:x} expired while etcd was unreachable "
                                        f"({describe(e)}); its endpoint keys are gone") from None
                log.warning("etcd: refreshing lease %x failed (%s); reconnecting", lease_id, describe(e))
                await self._reconnect_quietly()
                delay = min(interval, 0.5)
                continue
            if reply is None or reply.TTL <= 0:
                raise RegistryError(f"lease {lease_id:x} does not exist any more (expired or revoked); its "
                                    "endpoint keys are gone: add the endpoint again")
            alive_until = time.monotonic() + reply.TTL
            interval = max(min(ttl, reply.TTL) / 3, 0.2)

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke a lease now: its keys disappear at once (for a clean `endpoint add --ttl` exit)."""
        try:
            await self._need().revoke_lease(lease_id)
        except aetcd.ClientError as e:
            raise self._failed(f"revoking lease {lease_id:x}", e) from None

    async def remove_endpoint(self, namespace: str, name: str, endpoint_id: str) -> bool:
        """Delete one endpoint key; False if it did not exist."""
        self._check_names(namespace, name)
        key = endpoint_key(self.prefix, namespace, name, endpoint_id)
        if not isinstance(endpoint_id, str) or not endpoint_id or "/" in endpoint_id:
            raise RecordError(key, "endpoint id must be a non-empty string without '/'")
        try:
            deleted = await self._need().delete(key.encode())
        except aetcd.ClientError as e:
            raise self._failed(f"deleting {key}", e) from None
        return deleted is not None

    async def list_endpoints(self, namespace: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        """Endpoint keys (all, of a namespace, or of one service): {key, namespace, name,
        endpoint_id, value, error, lease (id or None)}. Sorted by key."""
        if name is not None and namespace is None:
            raise RecordError(f"{self.prefix}endpoints/", "a service name needs its namespace")
        if name is not None:
            self._check_names(namespace, name)
            prefix = endpoints_prefix(self.prefix, namespace or "", name)
        elif namespace is not None:
            self._check_names(namespace)
            prefix = f"{self.prefix}endpoints/{namespace}/"
        else:
            prefix = f"{self.prefix}endpoints/"
        return await self._listed(prefix, ("namespace", "name", "endpoint_id"), lease=True)

    # ---- policies -----------------------------------------------------------------------
    def _policy_value(self, data: object, where: str | None = None) -> tuple[str, bytes, Policy]:
        """(key, canonical JSON, policy) of a raw policy record, checked exactly as the etcd
        source will read it; RecordError(where, reason) if it is not valid."""
        ns, name = (data.get("namespace"), data.get("name")) if isinstance(data, dict) else (None, None)
        where = where or policy_key(self.prefix, ns if isinstance(ns, str) else "?",
                                    name if isinstance(name, str) else "?")
        pol = parse_policy(data, where)
        record = pol.model_dump(mode="json")
        for item in record["from"]:  # only what is set: shorter, and what a person would write
            for k in [k for k, v in item.items() if v is None]:
                del item[k]
        for item in record["to"]:
            if item["ports"] is None:
                del item["ports"]
        key = policy_key(self.prefix, pol.namespace, pol.name)
        value = _json(record)
        if len(value) > MAX_VALUE_BYTES:
            raise RecordError(where, f"record is {len(value)} bytes; at most {MAX_VALUE_BYTES} are allowed")
        check_record(self.prefix, key.encode(), value)  # exactly what the source will do
        return key, value, pol

    async def put_policies(self, records: list[object], where: list[str] | None = None) -> list[Policy]:
        """Validate every policy record first (RecordError for the first bad one, naming it by
        `where[i]` or its key: then nothing is written), then store them all in one transaction
        at <prefix>policies/<namespace>/<name> (replacing what was there)."""
        checked = [self._policy_value(r, where[i] if where else None) for i, r in enumerate(records)]
        seen: dict[str, int] = {}
        for i, (key, _, pol) in enumerate(checked):
            if key in seen:
                raise RecordError(where[i] if where else key, f"policy {pol.key} is given twice "
                                  f"(also record {seen[key] + 1} of {len(records)})")
            seen[key] = i
        if not checked:
            return []
        client = self._need()
        try:
            await client.transaction(compare=[], success=[client.transactions.put(k.encode(), v)
                                                          for k, v, _ in checked], failure=[])
        except aetcd.ClientError as e:
            raise self._failed(f"writing {len(checked)} polic{'y' if len(checked) == 1 else 'ies'}", e) from None
        return [pol for _, _, pol in checked]

    async def put_policy(self, data: object) -> Policy:
        """Validate one policy record and store it; RecordError if invalid (nothing written)."""
        return (await self.put_policies([data]))[0]

    async def delete_policy(self, namespace: str, name: str) -> bool:
        """Delete <prefix>policies/<namespace>/<name>; False if it did not exist."""
        self._check_names(namespace, name, what="policies")
        key = policy_key(self.prefix, namespace, name)
        try:
            deleted = await self._need().delete(key.encode())
        except aetcd.ClientError as e:
            raise self._failed(f"deleting {key}", e) from None
        return deleted is not None

    async def list_policies(self) -> list[dict[str, Any]]:
        """Every key under <prefix>policies/: {key, namespace, name, value (the stored JSON, or
        text if it is not JSON), error (why the daemon rejects it, or None)}. Sorted by key."""
        return await self._listed(f"{self.prefix}policies/", ("namespace", "name"))

    # ---- helpers ------------------------------------------------------------------------
    async def _listed(self, prefix: str, fields: tuple[str, ...], lease: bool = False
                      ) -> list[dict[str, Any]]:
        """The records under `prefix` as `list` shows them: key, the key's parts after the
        kind (`fields`), the stored value, and why the daemon rejects it (None: valid)."""
        out = []
        for kv in await self._range(prefix):
            text = key_text(kv.key)
            parts = text[len(self.prefix):].split("/")
            rec: dict[str, Any] = {"key": text, **dict.fromkeys(fields),
                                   "value": _raw_value(kv.value), "error": None}
            if lease:
                rec["lease"] = kv.lease or None
            if len(parts) == len(fields) + 1:
                rec.update(zip(fields, parts[1:]))
            try:
                check_record(self.prefix, kv.key, kv.value)
            except RecordError as e:
                rec["error"] = e.reason
            out.append(rec)
        return out

    def _check_names(self, namespace: object, name: object = "x", what: str = "services") -> None:
        for part, v in (("namespace", namespace), ("name", name)):
            if not isinstance(v, str):
                raise RecordError(f"{self.prefix}{what}/", f"{part} must be a string (got {type(v).__name__})")
            problem = label_problem(part, v)
            if problem:
                raise RecordError(f"{self.prefix}{what}/{namespace}/{name}", problem.replace(" in the key", ""))

    async def _range(self, prefix: str) -> list[Any]:
        """Every key/value under `prefix`, sorted by key, read at one revision (paged)."""
        client = self._need()
        start = prefix.encode()
        end = prefix_range_end(start)
        out: list[Any] = []
        rev = 0
        try:
            while True:
                resp = await client.kvstub.Range(rpc.RangeRequest(key=start, range_end=end, limit=LIST_PAGE, revision=rev),
                                                 timeout=self.cfg.dial_timeout, metadata=client.metadata)
                rev = rev or resp.header.revision
                out.extend(resp.kvs)
                if not resp.more or not resp.kvs:
                    return out
                start = resp.kvs[-1].key + b"\0"
        except Exception as e:
            raise self._failed(f"listing {prefix}", e) from None

    async def _revoke_quietly(self, lease_id: int) -> None:
        try:
            await self._need().revoke_lease(lease_id)
        except Exception:
            log.debug("etcd: revoking lease %x failed", lease_id, exc_info=True)

    async def _reconnect_quietly(self) -> None:
        await self.close()
        try:
            await self.connect()
        except RegistryError as e:
            log.debug("etcd: reconnect failed: %s", e)
            await asyncio.sleep(0.2)

