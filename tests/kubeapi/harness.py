"""Runs the test API server with its own etcd, both by PID, on free loopback ports.

    with KubeApiServer(tmp_path) as api:      # etcd + `python -m kubeapi`, stopped on exit
        api.create("services", svc)            # blocking REST helpers (urllib, no proxy)
        api.kubeconfig(tmp_path / "kubeconfig")
        api.compact(); api.cut_watches()

Everything it starts is stopped by PID (SIGTERM, then SIGKILL) and its directory removed, also
when start() fails half way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from meshd.sources.etcd_server import EmbeddedEtcd

HERE = Path(__file__).resolve().parent
PATHS = {"services": "/api/v1/namespaces/{ns}/services", "nodes": "/api/v1/nodes",
         "endpointslices": "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"}
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ApiError(Exception):
    def __init__(self, code: int, body: Any):
        super().__init__(f"HTTP {code}: {body}")
        self.code, self.body = code, body


class KubeApiServer:
    def __init__(self, root: Path, bookmark_interval: float = 1.0):
        self.root = Path(root)
        self.bookmark_interval = bookmark_interval
        # meshd's embedded etcd: root-only unix sockets under root/ (no TCP port)
        self.etcd = EmbeddedEtcd(self.root / "etcd", name="kubeapi-test")
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> KubeApiServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        asyncio.run(self.etcd.start(timeout=20))
        env = dict(os.environ, PYTHONPATH=f"{HERE.parent}:{os.environ.get('PYTHONPATH', '')}".rstrip(":"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubeapi", "--etcd", self.etcd.url, "--listen", "127.0.0.1:0",
             "--bookmark-interval", str(self.bookmark_interval)],
            stdout=subprocess.PIPE, stderr=open(self.root / "kubeapi.log", "wb"), env=env,
            start_new_session=True)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 20
        line = b""
        while time.monotonic() < deadline and self.proc.poll() is None:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                break
        if not line.startswith(b"listening on "):
            log = (self.root / "kubeapi.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the test API server did not start: {line!r}\n{log}")
        self.url = line.split()[-1].decode()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        asyncio.run(self.etcd.stop())
        shutil.rmtree(self.root / "etcd", ignore_errors=True)

    # -- REST --
    def request(self, method: str, path: str, body: Any = None, timeout: float = 10) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with _OPENER.open(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, json.loads(e.read() or b"{}")) from None

    def _path(self, plural: str, ns: str | None, name: str | None = None) -> str:
        base = PATHS[plural].format(ns=ns)
        return f"{base}/{name}" if name else base

    def create(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", self._path(plural, obj["metadata"].get("namespace")), obj)

    def replace(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        m = obj["metadata"]
        return self.request("PUT", self._path(plural, m.get("namespace"), m["name"]), obj)

    def apply(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create, or replace whatever is there (no resourceVersion check)."""
        body = json.loads(json.dumps(obj))
        body["metadata"].pop("resourceVersion", None)
        try:
            return self.create(plural, body)
        except ApiError as e:
            if e.code != 409:
                raise
            return self.replace(plural, body)

    def delete(self, plural: str, ns: str | None, name: str) -> dict[str, Any]:
        return self.request("DELETE", self._path(plural, ns, name))

    def get(self, plural: str, ns: str | None, name: str) -> dict[str, Any]:
        return self.request("GET", self._path(plural, ns, name))

    def bulk(self, plural: str, items: list[dict[str, Any]]) -> int:
        """Put many objects at once (100 per etcd transaction); returns the last revision."""
        return int(self.request("POST", "/_test/bulk", {"plural": plural, "items": items}, timeout=120)["revision"])

    def revision(self) -> int:
        return int(self.request("GET", "/_test/revision")["revision"])

    def compact(self) -> int:
        return int(self.request("POST", "/_test/compact")["revision"])

    def cut_watches(self, hold: float = 0) -> int:
        """Abort every open watch stream; refuse new watches (503) for `hold` seconds."""
        return int(self.request("POST", f"/_test/cut?hold={hold}")["cut"])

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig pointing at this server (plain http, no credentials)."""
        text = json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": namespace}}],
        }, indent=1)
        Path(path).write_text(text)
        return Path(path)


@contextlib.contextmanager
def running(root: Path, bookmark_interval: float = 1.0):  # type: ignore[no-untyped-def]
    with KubeApiServer(root, bookmark_interval) as api:
        yield api
