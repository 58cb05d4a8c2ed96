"""The etcd source: services, endpoints and policies kept in etcd, followed with a watch.

The key schema, per-record checks and RegistryState (the parsed records, changed one at a time,
with cheap snapshots) live in meshd.sources.etcd_records and are re-exported here. Owns:
  * connecting (TLS, auth, gRPC channel options) — shared with meshd.registry;
  * EtcdSource: list the prefix at revision R, emit, watch from R+1 and emit after each change;
    after a lost connection resume from the last revision seen + 1; when that revision was
    compacted, list again and converge. It never gives up: only cancellation stops it.

Every record is validated on its own: a bad one becomes a RecordError(where=<etcd key>) in the
snapshot and is skipped; nothing read from etcd raises out of this module. Keys under the prefix
outside the three subtrees (services/, endpoints/, policies/) are ignored (debug log). Cross-record checks (service_cidrs, frontend
collisions) are the daemon's, as for the static file.

aetcd 1.0 notes (see docs/etcd.md): its Client opens plaintext channels only, so _Client adds
TLS; the watch uses the WatchStub of aetcd's generated gRPC bindings directly, because aetcd's
Watcher flattens responses into single events (no response boundaries to coalesce on, no
progress notifications, no fragment or revision header) — the list uses RangeRequest pages at
one revision for the same reason (aetcd's get_prefix cannot set `revision` or `limit`).
"""

from __future__ import annotations

import os

# grpc's fork handlers can crash children forked from a process with live gRPC threads (the
# daemon runs `ip`, `tc`, etcd). Must be set before grpc is first imported (by aetcd).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import asyncio  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable, Iterable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import aetcd  # noqa: E402
import aetcd.exceptions  # noqa: E402
import aetcd.watcher  # noqa: E402
import grpc  # noqa: E402
from aetcd import rpc  # noqa: E402
from aetcd.utils import prefix_range_end  # noqa: E402

from meshd.config import EtcdConfig  # noqa: E402
from meshd.errors import RegistryError  # noqa: E402
from meshd.sources.etcd_records import (  # noqa: E402,F401  (the record API, re-exported)
    MAX_VALUE_BYTES, ENDPOINT_ID, KeyInfo, RegistrySnapshot, RegistryState, check_record,
    classify_key, decode_value, endpoint_id_problem, endpoint_key, endpoints_in_service_reason,
    endpoints_prefix, key_text, label_problem, parse_endpoint_value, parse_policy_value, parse_service_value,
    policy_key, service_key)


log = logging.getLogger("meshd.etcd")

# Keys per Range request of a (re)list; all pages are read at one revision. Large: etcd 3.4
# counts every key left in the range for each page (the response's `count`), so a list costs
# O(keys^2 / page) in etcd -- 110,000 keys took it 2.4 s in pages of 1,000, 0.3 s in pages of
# 20,000 (a page of 10,000 endpoint records is ~1.5 MB on the wire).
LIST_PAGE = 10_000
LIST_YIELD = 500  # records parsed between two yields to the event loop while listing
EMIT_INTERVAL = 0.010  # at most one snapshot per 10 ms; a lone change is emitted at once
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0

# ---- connecting ------------------------------------------------------------------------------

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", -1),  # a large list page or watch response must not wedge us
    ("grpc.keepalive_time_ms", 10_000),  # notice a dead peer on an idle watch (etcd allows >= 5 s)
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle watch (default: stop after 2)
    ("grpc.enable_http_proxy", 0),  # never send etcd traffic through $http_proxy
)


class _Client(aetcd.Client):
    """aetcd.Client that can speak TLS (aetcd 1.0's connect() opens plaintext channels only) and
    take IPv6 hosts. Otherwise the same: optional username/password -> auth token metadata."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None, **kw: Any):
        super().__init__(host="", port=0, **kw)
        self._target = target
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._credentials is not None:
            channel = rpc.secure_channel(self._target, self._credentials, options=self._options.items())
        else:
            channel = rpc.insecure_channel(self._target, options=self._options.items())
        self.channel = channel
        try:
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(channel)
                resp = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout)
                self.metadata = (("token", resp.token),)
        except rpc.AioRpcError as e:
            await channel.close()
            self._init_channel_attrs()
            aetcd.exceptions._handle_exception(e)
        self.kvstub = rpc.KVStub(channel)
        self.clusterstub = rpc.ClusterStub(channel)
        self.leasestub = rpc.LeaseStub(channel)
        self.maintenancestub = rpc.MaintenanceStub(channel)
        self._watcher = aetcd.watcher.Watcher(rpc.WatchStub(channel), timeout=self._timeout,
                                              metadata=self.metadata)
        self._connected.set()


def _read_file(what: str, path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise RegistryError(f"etcd.{what} {path}: cannot read: {e.strerror or e}") from None


def uses_tls(url: str) -> bool:
    return urlsplit(url).scheme == "https"


_warned_plain: set[str] = set()  # endpoints already warned about (once per process)


def _unix_target(url: str) -> str:
    """The grpc target of a unix:///path endpoint (the URL itself). RegistryError, naming the fix,
    when this user may not reach the socket: the embedded etcd's is for root only."""
    path = urlsplit(url).path
    try:
        os.stat(path)
    except PermissionError:
        raise RegistryError(f"etcd at {url}: permission denied; the embedded etcd can only be reached by "
                            "root (its socket directory is mode 0700): run this command as root") from None
    except OSError:
        pass  # not there (yet): the connect fails and says so, and the caller retries or reports
    return url


async def open_client(cfg: EtcdConfig, url: str) -> aetcd.Client:
    """A connected (and, with username/password, authenticated) aetcd client for one endpoint
    URL: http(s)://host:port or unix:///path. https:// uses TLS with cfg.ca_file (else the
    system roots) and, if set, the client certificate cfg.cert_file/key_file. Raises
    RegistryError for unreadable TLS files or an unreachable socket path and aetcd's ClientError
    subclasses for etcd errors (see describe())."""
    u = urlsplit(url)
    if u.scheme == "unix":
        target = _unix_target(url)
    else:
        host = u.hostname or ""
        target = f"[{host}]:{u.port}" if ":" in host else f"{host}:{u.port}"
    creds = None
    if uses_tls(url):
        creds = grpc.ssl_channel_credentials(root_certificates=_read_file("ca_file", cfg.ca_file),
                                             private_key=_read_file("key_file", cfg.key_file),
                                             certificate_chain=_read_file("cert_file", cfg.cert_file))
    elif u.scheme == "http" and cfg.password is not None and url not in _warned_plain:
        _warned_plain.add(url)
        log.warning("etcd: the password for user %s goes to %s over plain http: anyone on the path can "
                    "read it and then write the registry; serve etcd over TLS and use an https:// endpoint",
                    cfg.username, url)
    client = _Client(target, creds, username=cfg.username, password=cfg.password,
                     timeout=cfg.dial_timeout, options=dict(CHANNEL_OPTIONS))
    await client.connect()
    return client


async def close_client(client: aetcd.Client | None) -> None:
    if client is None:
        return
    try:
        await asyncio.wait_for(client.close(), 2.0)
    except (Exception, asyncio.TimeoutError):
        log.debug("etcd: error closing a client", exc_info=True)


def describe(exc: BaseException) -> str:
    """One line for an etcd/gRPC failure."""
    cause = exc.__cause__ if isinstance(exc, aetcd.ClientError) and exc.__cause__ is not None else exc
    if isinstance(cause, rpc.AioRpcError):
        code, details = cause.code(), (cause.details() or "").strip()
        if code == grpc.StatusCode.UNAVAILABLE and "connection refused" in details.lower():
            return "connection refused"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "timed out"
        return f"{code.name.lower()}: {details}" if details else code.name.lower()
    if isinstance(exc, aetcd.RevisionCompactedError):
        return str(exc)
    if isinstance(exc, (asyncio.TimeoutError, aetcd.ConnectionTimeoutError)):
        return "timed out"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def hint(exc: BaseException, url: str = "") -> str:
    """The fix for a failure (talking to endpoint `url`), as '; <advice>' or ''."""
    text = describe(exc).lower()
    if url.startswith("https:") and any(w in text for w in ("tsi_", "ssl", "handshake", "certificate", "unwrap")):
        return ("; TLS failed: check etcd.ca_file (the CA that signed etcd's certificate) and, if etcd requires "
                "client certificates, etcd.cert_file/key_file")
    if url.startswith("http:") and "failed to connect" in text and "socket closed" in text:
        return "; etcd closed the connection: if it serves TLS, use an https:// endpoint"
    if "authentication failed" in text or "invalid auth token" in text or "unauthenticated" in text \
            or "user name is empty" in text:
        return "; check etcd.username and etcd.password"
    if "authentication is not enabled" in text:
        return "; this etcd has auth disabled: remove etcd.username and etcd.password"
    if "permission denied" in text:
        return "; grant the etcd user read/write on the meshd prefix"
    return ""


# ---- the watching source ---------------------------------------------------------------------

class _Relist(Exception):
    """The watch cannot resume from our revision: list again."""


class EtcdSource:
    """Follow the prefix: list at R, emit, watch from R+1, emit after each change (coalesced to at
    most one snapshot per 10 ms). A new run() on the same object resumes from the last revision
    it saw (no re-list unless that revision was compacted)."""

    def __init__(self, cfg: EtcdConfig, endpoints: list[str] | None = None):
        self.cfg = cfg
        self.endpoints: list[str] = list(endpoints or cfg.endpoints)
        if not self.endpoints:
            raise RegistryError("etcd source: no endpoint (the embedded etcd's is "
                                "meshd.sources.etcd_server.client_url(data dir))")
        self.state = RegistryState(cfg.prefix)
        self.revision: int | None = None  # every event up to here is applied (None: never listed)
        self.last_error: str | None = None
        self.counters: dict[str, int] = {"connects": 0, "watch_restarts": 0, "relists": 0, "events": 0,
                                         "emits": 0}
        self._connected = False
        self._need_list = True
        self._changed: asyncio.Event | None = None
        self._listing: asyncio.Lock | None = None
        self._owe_snapshot = False  # a resumed run() has not emitted yet
        self._partial = False  # a list was cut off: the state mixes revisions (no snapshots)
        self._lost_at: float | None = None  # when the live watch was lost (for the "resumed" log)
        if (cfg.ca_file or cfg.cert_file) and not any(uses_tls(u) for u in self.endpoints):
            log.warning("etcd: ca_file/cert_file are set but no endpoint is https://; they are used for "
                        "https:// endpoints only")

    @property
    def connected(self) -> bool:
        """A watch is established (the snapshots are live)."""
        return self._connected

    def _mark_changed(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def run(self, emit: Callable[[RegistrySnapshot], Awaitable[None]]) -> None:
        """Follow etcd until cancelled; `emit` gets every new snapshot (awaited; an exception from
        it is logged, not raised)."""
        self._changed = asyncio.Event()
        self._listing = asyncio.Lock()
        self._owe_snapshot = self.revision is not None
        emitter = asyncio.create_task(self._emitter(emit), name="etcd-emit")
        try:
            await self._follow()
        finally:
            self._connected = False
            emitter.cancel()
            try:
                await emitter
            except asyncio.CancelledError:
                pass

    async def _emitter(self, emit: Callable[[RegistrySnapshot], Awaitable[None]]) -> None:
        assert self._changed is not None and self._listing is not None
        last = float("-inf")
        while True:
            await self._changed.wait()
            delay = last + EMIT_INTERVAL - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # a burst: let it finish into one snapshot
            async with self._listing:
                self._changed.clear()
                if self._partial:
                    continue  # a list failed half way: the next one completes the state
                try:
                    snap = self.state.snapshot(self.revision or 0)
                except Exception:  # a bug: keep following, the next change tries again
                    log.exception("etcd: building a snapshot failed")
                    continue
            last = time.monotonic()
            try:
                await emit(snap)
                self.counters["emits"] += 1
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("etcd: the snapshot consumer failed (snapshot at revision %d dropped)",
                              snap.revision)

    async def _follow(self) -> None:
        backoff = BACKOFF_FIRST
        attempt = 0
        failures = 0
        while True:
            url = self.endpoints[attempt % len(self.endpoints)]
            client = None
            try:
                client = await open_client(self.cfg, url)
                self.counters["connects"] += 1
                if self._need_list or self.revision is None:
                    await self._list(client, url)
                await self._watch(client, url)
                raise ConnectionError("watch ended")  # _watch only returns by raising
            except asyncio.CancelledError:
                raise
            except _Relist as e:
                self._connected = False
                self._need_list = True
                self.counters["relists"] += 1
                log.warning("etcd: %s; listing %s again", e, self.cfg.prefix)
                backoff, failures = BACKOFF_FIRST, 0
            except Exception as e:
                if self._connected:
                    backoff, failures = BACKOFF_FIRST, 0
                    self._lost_at = time.monotonic()
                    log.warning("etcd: lost the watch on %s: %s%s; reconnecting (backoff from %.1fs to "
                                "%.0fs), will resume at revision %d", url, describe(e), hint(e, url), backoff,
                                BACKOFF_MAX, (self.revision or 0) + 1)
                elif failures == 0:
                    log.warning("etcd: cannot reach %s: %s%s; retrying (backoff from %.1fs to %.0fs)", url,
                                describe(e), hint(e, url), backoff, BACKOFF_MAX)
                else:
                    log.debug("etcd: %s still unreachable: %s", url, describe(e))
                self.last_error = f"{url}: {describe(e)}{hint(e, url)}"
                self._connected = False
                self.counters["watch_restarts"] += 1
                failures += 1
                attempt += 1
                await asyncio.sleep(backoff * random.uniform(0.8, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX)
            finally:
                await close_client(client)

    async def _list(self, client: aetcd.Client, url: str) -> None:
        """Read the whole prefix at one revision, page by page, and converge the state to it.

        Each page is validated while etcd prepares the next one (the request for it is out
        before the page is parsed), and dropped after: at 10^5 keys the list no longer waits
        for the parse or holds every key and value at once. No snapshot is taken while a list
        is under way or after one that failed half way (`_partial`): the state may then mix
        two revisions; the next list converges it."""
        assert self._listing is not None
        prefix = self.cfg.prefix.encode()
        end = prefix_range_end(prefix)
        state = self.state
        start, rev, n = prefix, 0, 0
        # the keys listed, to delete the others at the end: not needed for a first list (and
        # 10^5 key copies kept to the end would leave holes among the records in the heap)
        seen: set[bytes] | None = set() if len(state) else None
        t0 = time.monotonic()

        def page(key: bytes):
            return asyncio.ensure_future(client.kvstub.Range(
                rpc.RangeRequest(key=key, range_end=end, limit=LIST_PAGE, revision=rev),
                timeout=self.cfg.dial_timeout, metadata=client.metadata))

        async with self._listing:
            self._partial = True
            resp = await page(start)
            rev = resp.header.revision
            # etcd answers: listing is progress, not an outage (READY waits for it instead of
            # giving up on an unreachable source)
            self.last_error = None
            while True:
                nxt = page(resp.kvs[-1].key + b"\0") if resp.more and resp.kvs else None
                try:
                    for i, kv in enumerate(resp.kvs):
                        if seen is not None:
                            seen.add(kv.key)
                        state.put(kv.key, kv.value)
                        if i % LIST_YIELD == LIST_YIELD - 1:
                            await asyncio.sleep(0)  # the loop's other tasks (watchdog, healthz)
                except BaseException:
                    if nxt is not None:
                        nxt.cancel()
                    raise
                n += len(resp.kvs)
                if nxt is None:
                    break
                resp = await nxt
            if seen is not None:
                state.retain(seen)
            self.revision = rev
            self._need_list = False
            self._partial = False
        self._owe_snapshot = False
        self._mark_changed()
        log.info("etcd: listed %d keys under %s at revision %d from %s in %.0f ms", n,
                 self.cfg.prefix, rev, url, (time.monotonic() - t0) * 1000)

    async def _watch(self, client: aetcd.Client, url: str) -> None:
        assert self.revision is not None
        prefix = self.cfg.prefix.encode()
        start = self.revision + 1
        call = rpc.WatchStub(client.channel).Watch(metadata=client.metadata)
        try:
            await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                key=prefix, range_end=prefix_range_end(prefix), start_revision=start, progress_notify=True)))
            first = await asyncio.wait_for(call.read(), self.cfg.dial_timeout)
            if first is grpc.aio.EOF or not first.created:
                raise ConnectionError("etcd did not create the watch")
            if first.canceled:
                if first.compact_revision:
                    raise _Relist(f"revision {start} is compacted (etcd keeps history from "
                                  f"{first.compact_revision})")
                raise ConnectionError(f"etcd refused the watch: {first.cancel_reason or 'no reason given'}")
            if first.header.revision < self.revision:
                raise _Relist(f"etcd is at revision {first.header.revision}, behind the {self.revision} "
                              "already seen (restored from a backup?)")
            self._connected = True
            self.last_error = None
            if self._lost_at is not None:
                log.info("etcd: reconnected to %s after %.1fs; resumed watching %s at revision %d", url,
                         time.monotonic() - self._lost_at, self.cfg.prefix, start)
            else:
                log.info("etcd: connected to %s; watching %s from revision %d", url, self.cfg.prefix, start)
            self._lost_at = None
            if self._owe_snapshot:  # a resumed run(): its consumer has no snapshot yet
                self._owe_snapshot = False
                self._mark_changed()
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise ConnectionError("etcd closed the watch stream")
                if resp.compact_revision:
                    raise _Relist(f"revision {self.revision + 1} is compacted (etcd keeps history from "
                                  f"{resp.compact_revision})")
                if resp.canceled:
                    raise ConnectionError(f"etcd cancelled the watch: {resp.cancel_reason or 'no reason'}")
                if resp.events:
                    self._apply(resp.events)
                elif resp.header.revision > self.revision:
                    self.revision = resp.header.revision  # progress notification: nothing of ours changed
        finally:
            call.cancel()

    def _apply(self, events: Iterable[Any]) -> None:
        assert self.revision is not None
        rev, changed, n = self.revision, False, 0
        state = self.state
        for ev in events:
            kv = ev.kv
            if ev.type == rpc.Event.DELETE:
                changed |= state.delete(kv.key)
            else:
                changed |= state.put(kv.key, kv.value)
            if kv.mod_revision > rev:
                rev = kv.mod_revision
            n += 1
        self.revision = rev
        self.counters["events"] += n
        if changed:
            self._mark_changed()
