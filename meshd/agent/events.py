"""The connection event stream of a running daemon: read from the kernel's ring buffer
(meshd_events_v1), named, kept, and served to `meshd observe` on a unix socket.

    ring buffer --(reader thread: EventReader.poll)--> loop: name() --> history (deque)
                                                                    --> each client's queue

The reader thread only polls and decodes; naming (group id -> service, identity -> its
selectors, cgroup id -> path) runs on the event loop, which owns those tables. A client
that reads slowly loses events (counted and told), never the daemon's memory or time.
The socket is root only: its directory is 0700 and the socket 0600 (the stream shows who
calls what on this node).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

from meshd.observe import matches

log = logging.getLogger("meshd.daemon")

CLIENT_QUEUE = 4096  # events queued per client before it starts losing them
PENDING_BATCHES = 4  # batches read but not yet named by the loop, at most
def _hostport(addr: str | None, port: int) -> str | None:
    if not addr:
        return None
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


class Namer:
    """What the event's numbers mean now: set by the daemon after every sync."""

    def __init__(self) -> None:
        self.group_key = lambda gid: None  # gid -> "ns/name:port/ipv4[/...]"
        self.identity_label = lambda ident: None  # identity -> "unit:web.service,..."
        self.identity_selectors = lambda ident: ()
        self.policy_key = lambda pid: None  # policy id -> "ns/name"
        self.cgroup_path = lambda cgid: None  # cgroup id -> "/system.slice/web.service"
        # cgroup id -> its identity now (the kernel puts an identity in an event only where
        # a policy check looked it up: on the connect path it is not worth its cost)
        self.identity_of_cgroup = lambda cgid: 0

    def event(self, ev) -> dict:
        """The JSON form of one kernel event (the `meshd observe --json` contract)."""
        now_mono, now = time.monotonic_ns(), time.time()
        kind, proto = ev.type, ev.proto  # names (meshd.dataplane.events.Event)
        key = self.group_key(ev.group) if ev.group else None
        # a denial's identity is the one the policy check used (0: none), never filled in
        identity = ev.identity or (0 if kind == "denied" else self.identity_of_cgroup(ev.cgroup))
        service = None
        if key:
            svc, _, rest = key.partition(":")
            service = f"{svc}:{rest.split('/', 1)[0]}"  # "ns/name:port-name"
        out = {
            "time": round(now - (now_mono - ev.ts_ns) / 1e9, 6),
            "type": kind,
            "verdict": "denied" if kind == "denied" else "allowed",
            "service": service,
            "group": key,
            "frontend": f"{_hostport(ev.vip, ev.vip_port)}/{proto}" if ev.vip else None,
            "backend": _hostport(ev.backend_addr, ev.backend_port) if ev.backend else None,
            "pid": ev.pid,
            "uid": ev.uid,
            "comm": ev.comm,
            "cgroup": self.cgroup_path(ev.cgroup),
            "cgroup_id": ev.cgroup,
            "identity_id": identity,
            "identity": self.identity_label(identity),
            "selectors": list(self.identity_selectors(identity)),
            "cookie": ev.cookie,
            "sendmsg": bool(ev.sendmsg),
        }
        if kind == "denied":
            out["policy"] = self.policy_key(ev.policy) if ev.policy else None
        if kind in ("failed", "closed"):
            out["error"] = ev.err_name or None
            if ev.duration_ns:
                out["duration_ms"] = round(ev.duration_ns / 1e6, 3)
        if kind == "closed":
            out["tx_bytes"], out["rx_bytes"] = ev.tx_bytes, ev.rx_bytes
        return out


class _Client:
    def __init__(self, flt: dict) -> None:
        self.flt = flt
        self.queue: asyncio.Queue = asyncio.Queue(CLIENT_QUEUE)
        self.lost = 0


class EventHub:
    """Reads the ring buffer in a thread, keeps the last `history` events, serves clients."""

    def __init__(self, open_reader, namer: Namer, history: int) -> None:
        self._open_reader = open_reader  # () -> EventReader
        self.namer = namer
        self.history: deque = deque(maxlen=max(history, 0) or None)
        self._keep = history > 0
        self.clients: set[_Client] = set()
        self.received = 0
        self.by_type: dict[str, int] = {}
        self.on_event = lambda ev: None  # metrics hook (daemon)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reader_error: str | None = None  # the ring cannot be read now
        self.reader_failures = 0
        self._server: asyncio.AbstractServer | None = None
        self.path: Path | None = None

    def set_history(self, n: int) -> None:
        self._keep = n > 0
        self.history = deque(self.history, maxlen=max(n, 0) or None)

    # ---- reading -----------------------------------------------------------------------
    def start_reader(self, loop: asyncio.AbstractEventLoop) -> None:
        """The reader thread: polls the ring and hands batches to the loop, at most
        PENDING_BATCHES unprocessed at a time (a loop busy elsewhere makes the thread wait,
        and the ring, not the daemon's memory, absorbs the burst: what it cannot hold is
        counted in meshd_events_lost_total{reason="ring_full"}). If the ring cannot be read
        the thread logs it, shows it in the status file and tries again with backoff."""
        from meshd.agent.supervise import Backoff
        pending = threading.Semaphore(PENDING_BATCHES)
        self._pending = pending

        def run() -> None:
            backoff = Backoff(1.0, 60.0)
            while not self._stop.is_set():
                try:
                    reader = self._open_reader()
                except Exception as e:  # noqa: BLE001 - shown, retried
                    self._failed(e, backoff)
                    continue
                try:
                    while not self._stop.is_set():
                        batch = reader.poll(100)  # the kernel does not wake us per event
                        if batch:
                            while not pending.acquire(timeout=0.2):
                                if self._stop.is_set():  # the loop is gone: drop it
                                    return
                            loop.call_soon_threadsafe(self._deliver, batch, pending)
                        if self.reader_error is not None:
                            self.reader_error = None
                            log.info("connection events: reading again")
                            backoff.reset()
                except Exception as e:  # noqa: BLE001 - shown, retried
                    self._failed(e, backoff)
                finally:
                    reader.close()

        self._thread = threading.Thread(target=run, name="meshd-events", daemon=True)
        self._thread.start()

    def _failed(self, e: BaseException, backoff) -> None:
        delay = backoff.next()
        msg = f"{type(e).__name__}: {e}"
        if msg != self.reader_error:
            log.error("connection events cannot be read (%s); retrying in %.0f s "
                      "(the kernel counts what it cannot hand over)", msg, delay)
        self.reader_error = msg
        self.reader_failures += 1
        self._stop.wait(delay)

    def status(self) -> dict:
        return {"socket": str(self.path) if self.path else None, "received": self.received,
                "reader_up": self.reader_error is None and self._thread is not None
                and self._thread.is_alive(),
                "reader_error": self.reader_error, "clients": len(self.clients)}

    def _deliver(self, batch, pending=None) -> None:
        try:
            self._name_all(batch)
        finally:
            if pending is not None:
                pending.release()

    def _name_all(self, batch) -> None:
        for raw in batch:
            try:
                ev = self.namer.event(raw)
            except Exception:  # noqa: BLE001 - one undecodable event must not stop the rest
                log.exception("cannot name a connection event")
                continue
            self.received += 1
            self.by_type[ev["type"]] = self.by_type.get(ev["type"], 0) + 1
            self.on_event(ev)
            if self._keep:
                self.history.append(ev)
            for c in list(self.clients):
                if not matches(ev, c.flt):
                    continue
                try:
                    c.queue.put_nowait(ev)
                except asyncio.QueueFull:
                    c.lost += 1

    # ---- serving -----------------------------------------------------------------------
    async def serve(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)  # its own directory (`events/`): root only
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.path = path
        log.info("connection events on %s (meshd observe)", path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = None
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            try:
                req = json.loads(line or b"{}")
                flt = dict(req.get("filter") or {})
                since = req.get("since")
                follow = bool(req.get("follow", True))
            except (ValueError, AttributeError, TypeError):
                writer.write(b'{"error": "bad request: expected one JSON object line"}\n')
                await writer.drain()
                return
            try:
                cutoff = time.time() - float(since) if since is not None else None
            except (TypeError, ValueError):
                writer.write(b'{"error": "bad request: since must be a number of seconds"}\n')
                await writer.drain()
                return
            client = _Client(flt)
            if follow:
                self.clients.add(client)  # before the history: nothing falls in between
            if cutoff is not None:
                for ev in list(self.history):
                    if ev["time"] >= cutoff and matches(ev, flt):
                        writer.write(json.dumps(ev).encode() + b"\n")
                await writer.drain()
            if not follow:
                return
            while True:
                ev = await client.queue.get()
                if ev is None:  # the daemon stops
                    return
                if client.lost:
                    writer.write(json.dumps({"lost": client.lost}).encode() + b"\n")
                    client.lost = 0
                writer.write(json.dumps(ev).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            if client is not None:
                self.clients.discard(client)
            writer.close()

    async def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()
            for c in list(self.clients):
                self.clients.discard(c)
                try:
                    c.queue.put_nowait(None)
                except asyncio.QueueFull:
                    c.queue.get_nowait()
                    c.queue.put_nowait(None)
            self._server = None
        if self.path is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 2)
