"""Tests against a real etcd (Debian's /usr/bin/etcd, no root needed).

Fixtures:
  etcd_server  one embedded etcd per test module (unix sockets in a tmp dir, as `meshd run` runs
               it); stopped (by PID) and its dir removed at the end, also on failure. Helpers on
               it: stop(), start(), restart() (same data dir: history survives), compact(),
               revision(), etcdctl(...).
  cfg          an EtcdConfig for that server with a prefix of its own, so tests do not see each
               other's keys.
Async helpers: run() (one event loop for the session, bounded), Snapshots (collects what a source emits and waits
for a predicate, bounded), running() (a source task, always cancelled), TcpProxy (a loopback
proxy that can drop connections and refuse new ones: a "network outage" while etcd stays up).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from meshd.config import EtcdConfig
from meshd.sources.etcd import EtcdSource, RegistrySnapshot
from meshd.sources.etcd_server import EmbeddedEtcd

from testlib import free_ports  # noqa: E402,F401  (re-exported to the etcd tests)

ETCDCTL = "/usr/bin/etcdctl"
T = TypeVar("T")


_LOOP: asyncio.AbstractEventLoop | None = None


def run(coro: Awaitable[T], timeout: float = 30) -> T:
    """Run a test's async body, bounded. One event loop for the whole session: grpc.aio binds
    its poller to every loop it has seen and logs 'Event loop is closed' once one of them is
    closed (a fresh asyncio.run() per test would do that)."""
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    return _LOOP.run_until_complete(asyncio.wait_for(coro, timeout))


class EtcdServer:
    def __init__(self, root: Path):
        self.root = root
        self.etcd = EmbeddedEtcd(root / "etcd", name="meshd-test")

    @property
    def url(self) -> str:
        return self.etcd.url

    @property
    def running(self) -> bool:
        return self.etcd.pid is not None

    def start(self) -> None:
        run(self.etcd.start(timeout=20))

    def stop(self) -> None:
        run(self.etcd.stop())

    def restart(self) -> None:
        self.stop()
        self.start()

    def etcdctl(self, *args: str, input: bytes | None = None) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "ETCDCTL_"))}
        env["ETCDCTL_API"] = "3"
        res = subprocess.run([ETCDCTL, f"--endpoints={self.url}", "--dial-timeout=3s",
                              "--command-timeout=10s", *args], input=input, capture_output=True,
                             env=env, timeout=20)
        if res.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {res.stderr.decode(errors='replace')}")
        return res.stdout.decode(errors="replace")

    def revision(self) -> int:
        import json
        out = json.loads(self.etcdctl("get", "--write-out=json", "/meshd-revision-probe"))
        return int(out["header"]["revision"])

    def compact(self) -> int:
        """Compact the history up to the current revision; returns it."""
        rev = self.revision()
        self.etcdctl("compaction", str(rev))
        return rev


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("etcd")
    server = EtcdServer(root)
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cfg(etcd_server: EtcdServer) -> EtcdConfig:
    if not etcd_server.running:  # a failed restart test left it down: later tests still run
        etcd_server.start()
    return EtcdConfig(endpoints=[etcd_server.url], prefix=f"/t-{uuid.uuid4().hex[:8]}/", dial_timeout=3)


class Snapshots:
    """The `emit` of an EtcdSource: keeps every snapshot; wait() for one matching a predicate."""

    def __init__(self) -> None:
        self.items: list[RegistrySnapshot] = []
        self._new: asyncio.Event | None = None

    async def __call__(self, snap: RegistrySnapshot) -> None:
        self.items.append(snap)
        if self._new is not None:
            self._new.set()

    @property
    def last(self) -> RegistrySnapshot | None:
        return self.items[-1] if self.items else None

    async def wait(self, pred: Callable[[RegistrySnapshot], bool], timeout: float = 5.0,
                   what: str = "a matching snapshot") -> RegistrySnapshot:
        self._new = self._new or asyncio.Event()
        deadline = time.monotonic() + timeout
        while True:
            if self.items and pred(self.items[-1]):
                return self.items[-1]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout}s; last: {self.last!r}")
            self._new.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new.wait(), left)


@contextlib.asynccontextmanager
async def running(source: EtcdSource) -> AsyncIterator[Snapshots]:
    snaps = Snapshots()
    task = asyncio.create_task(source.run(snaps))
    try:
        yield snaps
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)


async def until(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.02)


class TcpProxy:
    """127.0.0.1:<port> -> target (a TCP port, or an etcd URL: unix:///path or http://host:port).
    pause(): drop every connection and refuse new ones (accept and close at once), like a network
    outage; resume(): forward again."""

    def __init__(self, target: int | str):
        self.target = target
        self.paused = False
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.paused:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await self._connect_upstream()
        except OSError:
            writer.transport.abort()
            return
        self._conns.update((writer, up_w))
        pipes = [asyncio.create_task(self._pipe(reader, up_w)), asyncio.create_task(self._pipe(up_r, writer))]
        self._tasks.update(pipes)
        for t in pipes:
            t.add_done_callback(self._tasks.discard)

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if isinstance(self.target, int):
            return await asyncio.open_connection("127.0.0.1", self.target)
        from urllib.parse import urlsplit
        u = urlsplit(self.target)
        if u.scheme == "unix":
            return await asyncio.open_unix_connection(u.path)
        return await asyncio.open_connection(u.hostname, u.port)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            w.transport.abort()
            self._conns.discard(w)

    def pause(self) -> None:
        self.paused = True
        for w in list(self._conns):
            w.transport.abort()
        self._conns.clear()

    def resume(self) -> None:
        self.paused = False

    async def close(self) -> None:
        self.pause()
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def etcdlib() -> types.SimpleNamespace:
    """This file's helpers for the test modules (a conftest cannot be imported by name reliably:
    tests/conftest.py is also `conftest`)."""
    return types.SimpleNamespace(run=run, Snapshots=Snapshots, running=running, until=until, TcpProxy=TcpProxy,
                                 free_ports=free_ports, EtcdServer=EtcdServer, kill_quietly=kill_quietly)
