"""The Kubernetes source's index: Services and EndpointSlices by key, changed one object at a
time, with snapshots that compose again only the services whose objects changed (pure).

A Service object is parsed once per resourceVersion (kubernetes_translate.service_base), a slice
once per change (slice_info); a slice belongs to the service named by its
kubernetes.io/service-name label and may move. A service with no Service object (deleted while
its slices linger) is not in the snapshot: its slices count as orphan endpoints. Snapshots are
meshd.sources.etcd_records.RegistrySnapshot, so the daemon consumes both sources alike.
"""

from __future__ import annotations

import time

import logging
from collections.abc import Iterable
from typing import Any

from meshd.errors import RecordError
from meshd.model import Service
from meshd.sources.etcd_records import RegistrySnapshot
from meshd.sources.kubernetes_translate import (ServiceBase, SliceInfo, Skip, compose, service_base,
                                                service_key, slice_info, where)

log = logging.getLogger("meshd.kubernetes")


TRIGGER_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"


def trigger_time(obj: dict[str, Any]) -> float | None:
    """The EndpointSlice's last-change-trigger-time (RFC 3339) as unix time, if any."""
    from datetime import datetime
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(TRIGGER_ANNOTATION)
    if not isinstance(raw, str):
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _rv(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))


class KubeIndex:
    def __init__(self) -> None:
        self._bases: dict[str, ServiceBase | Skip | RecordError] = {}  # "ns/name" -> parsed Service
        self._svc_rv: dict[str, str] = {}
        self._slices: dict[str, SliceInfo] = {}  # "ns/slice-name" -> what it contributes
        self._by_service: dict[str, set[str]] = {}  # "ns/name" -> its slice keys
        self._composed: dict[str, Service] = {}
        self._problems: dict[str, tuple[RecordError, ...]] = {}
        self._dirty: set[str] = set()
        # output kept between snapshots: a changed service is patched into its slot; only a
        # service coming or going sorts again
        self._index: dict[str, int] = {}
        self._slots: list[Service] = []
        self._order_stale = False
        self._patched: set[str] = set()
        self._services_out: tuple[Service, ...] = ()
        self._errors_out: tuple[RecordError, ...] | None = ()
        # last-change-trigger-time of slices changed since the last snapshot (only changes
        # made after this index was created: older ones are not ours to have programmed)
        self._started = time.time()
        self._triggers: list[float] = []

    # -- Services --
    def put_service(self, obj: dict[str, Any]) -> bool:
        key, rv = service_key(obj), _rv(obj)
        if rv and self._svc_rv.get(key) == rv:
            return False
        try:
            base: ServiceBase | Skip | RecordError = service_base(obj)
        except RecordError as e:
            base = e
        except Exception as e:  # a bug or a pathological object: this service only
            log.debug("kubernetes: unexpected error reading service %s", key, exc_info=True)
            base = RecordError(where(*key.split("/", 1)), f"could not be read ({type(e).__name__}: {e})")
        if isinstance(base, Skip):
            log.debug("kubernetes: service %s skipped: %s", key, base.reason)
        self._bases[key], self._svc_rv[key] = base, rv
        self._dirty.add(key)
        return True

    def delete_service(self, obj: dict[str, Any]) -> bool:
        key = service_key(obj)
        if self._bases.pop(key, None) is None:
            return False
        self._svc_rv.pop(key, None)
        self._dirty.add(key)
        return True

    def replace_services(self, items: Iterable[dict[str, Any]]) -> int:
        """Converge to exactly this list (deletions made while we were not watching included)."""
        seen: set[str] = set()
        n = 0
        for obj in items:
            seen.add(service_key(obj))
            n += self.put_service(obj)
        for key in [k for k in self._bases if k not in seen]:
            ns, name = key.split("/", 1)
            n += self.delete_service({"metadata": {"namespace": ns, "name": name}})
        return n

    # -- EndpointSlices --
    @staticmethod
    def _slice_key(obj: dict[str, Any]) -> str:
        m = obj.get("metadata") or {}
        return f"{m.get('namespace', '')}/{m.get('name', '')}"

    def put_slice(self, obj: dict[str, Any]) -> bool:
        key = self._slice_key(obj)
        info = slice_info(obj)
        old = self._slices.get(key)
        if old == info:
            return False
        if old is not None and old.service != info.service:
            self._unlink(key, old)
        self._slices[key] = info
        t = trigger_time(obj)
        if t is not None and t >= self._started:
            self._triggers.append(t)
        if info.service:
            self._by_service.setdefault(info.service, set()).add(key)
            self._dirty.add(info.service)
        return True

    def delete_slice(self, obj: dict[str, Any]) -> bool:
        key = self._slice_key(obj)
        old = self._slices.pop(key, None)
        if old is None:
            return False
        self._unlink(key, old)
        return True

    def _unlink(self, key: str, info: SliceInfo) -> None:
        if not info.service:
            return
        keys = self._by_service.get(info.service)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_service[info.service]
        self._dirty.add(info.service)

    def replace_slices(self, items: Iterable[dict[str, Any]]) -> int:
        seen: set[str] = set()
        n = 0
        for obj in items:
            seen.add(self._slice_key(obj))
            n += self.put_slice(obj)
        for key in [k for k in self._slices if k not in seen]:
            ns, name = key.split("/", 1)
            n += self.delete_slice({"metadata": {"namespace": ns, "name": name}})
        return n

    # -- output --
    def origin(self, key: str) -> tuple[str, str] | None:
        """(resourceVersion, skip reason or "") of service "ns/name" as last seen."""
        if key not in self._bases:
            return None
        base = self._bases[key]
        return self._svc_rv.get(key, ""), base.reason if isinstance(base, Skip) else ""

    def skipped(self) -> dict[str, str]:
        return {k: b.reason for k, b in self._bases.items() if isinstance(b, Skip)}

    def _compose(self, key: str) -> None:
        base = self._bases.get(key)
        old_problems = self._problems.pop(key, None)
        if old_problems is not None:
            self._errors_out = None
        if isinstance(base, ServiceBase):
            slices = [self._slices[s] for s in self._by_service.get(key, ())]
            rec, problems = compose(base, slices)
            if problems:
                self._problems[key] = problems
                self._errors_out = None
            old = self._composed.get(key)
            if old != rec:
                self._composed[key] = rec
                if old is None:
                    self._order_stale = True
                else:
                    self._patched.add(key)
            return
        if isinstance(base, RecordError):
            self._problems[key] = (base,)
            self._errors_out = None
        if self._composed.pop(key, None) is not None:
            self._order_stale = True

    def snapshot(self, revision: int) -> RegistrySnapshot:
        for key in self._dirty:
            self._compose(key)
        self._dirty.clear()
        if self._order_stale:
            order = sorted(self._composed)
            self._index = {k: i for i, k in enumerate(order)}
            self._slots = [self._composed[k] for k in order]
            self._services_out = tuple(self._slots)
            self._order_stale = False
        elif self._patched:
            for key in self._patched:
                self._slots[self._index[key]] = self._composed[key]
            self._services_out = tuple(self._slots)
        self._patched.clear()
        if self._errors_out is None:
            errs = [e for group in self._problems.values() for e in group]
            errs.sort(key=lambda e: e.where)
            self._errors_out = tuple(errs)
        orphans = sum(len(self._slices[s].endpoints) for k, keys in self._by_service.items()
                      if k not in self._bases for s in keys)
        triggers, self._triggers = tuple(self._triggers), []
        return RegistrySnapshot(services=self._services_out, errors=self._errors_out, revision=revision,
                                orphan_endpoints=orphans, triggers=triggers)
