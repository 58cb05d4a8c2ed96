"""kube-proxy's HTTP contract: the node healthz and the per-service health check node ports.

- `healthz.listen` (default 0.0.0.0:10256): `/healthz` answers 200 while the data plane is
  in step with the registry (no change has waited longer than sync.stuck_after_seconds, no
  sync is stuck, the socket LB is attached), else 503; `/livez` answers 200 unless syncs are
  stuck (then systemd's watchdog and a liveness probe agree). Both with kube-proxy's JSON
  body ({"lastUpdated", "currentTime", ...}).
- `health_check_node_port` of an external_traffic_policy Local service: `GET /` answers 200
  with {"service":{"namespace","name"},"localEndpoints":N,"serviceProxyHealthy":true} when
  N > 0 ready endpoints run on this node, else 503, so cloud load balancers skip nodes
  without local endpoints. One listener per port on every address, kept in step with the
  services after each sync.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime, timezone

log = logging.getLogger("meshd.daemon")


def _rfc3339(t: float | None) -> str:
    return datetime.fromtimestamp(t or 0, timezone.utc).isoformat(timespec="microseconds") \
        .replace("+00:00", "Z")


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     answer) -> None:
    """Reads one HTTP request head; `answer(method, path)` -> (status, dict)."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
        line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        method, path = (line[0], line[1]) if len(line) >= 2 else ("", "")
        status, body = answer(method, path.split("?", 1)[0])
        data = json.dumps(body).encode()
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
                  503: "Service Unavailable"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                     f"X-Content-Type-Options: nosniff\r\nContent-Length: {len(data)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + data)
        await writer.drain()
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            ConnectionError):
        pass
    finally:
        writer.close()


class HealthServers:
    def __init__(self, ctx):
        self.ctx = ctx  # the daemon: progress, sources, dataplane_error
        self.listen: str | None = None
        self.address: str | None = None
        self._node: asyncio.AbstractServer | None = None
        self._checks: dict[int, asyncio.AbstractServer] = {}
        self._state: dict[int, tuple[str, str, int]] = {}
        self._failed: set[int] = set()  # ports that could not be bound (logged once)

    # ---- node healthz -------------------------------------------------------------------
    def problem(self) -> str | None:
        """Why /healthz is 503, or None."""
        ctx = self.ctx
        stuck = ctx.progress.stuck()
        if stuck:
            return stuck
        if ctx.dataplane_error:
            return ctx.dataplane_error
        dirty = ctx.sources.dirty_since
        if dirty is not None and time.monotonic() - dirty > ctx.progress.stuck_after:
            return f"a registry change has waited {time.monotonic() - dirty:.0f}s for a sync"
        if not ctx.progress.ready.is_set():
            return "the first sync is not done"
        return None

    def _node_answer(self, method: str, path: str) -> tuple[int, dict]:
        if method != "GET":
            return 405, {"error": "GET only"}
        now = time.time()
        body = {"lastUpdated": _rfc3339(self.ctx.progress.last_ok),
                "currentTime": _rfc3339(now)}
        if path == "/healthz":
            why = self.problem()
            body["nodeEligible"] = True
            if why:
                body["error"] = why
            return (503 if why else 200), body
        if path == "/livez":
            why = self.ctx.progress.stuck()
            if why:
                body["error"] = why
            return (503 if why else 200), body
        return 404, {"error": "not found; /healthz and /livez are served"}

    async def start(self, listen: str | None) -> None:
        from meshd.config import split_host_port
        self.listen = listen
        if listen is None:
            return
        host, port = split_host_port(listen, allow_zero=True)
        try:
            self._node = await asyncio.start_server(
                lambda r, w: _serve_one(r, w, self._node_answer), host, port)
        except OSError as e:
            log.error("healthz: cannot listen on %s: %s (set healthz.listen to a free "
                      "address, or null); running without it", listen, e.strerror or e)
            return
        h, p = self._node.sockets[0].getsockname()[:2]
        self.address = f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
        log.info("healthz on http://%s/healthz", self.address)

    async def relisten(self, listen: str | None) -> None:
        if listen == self.listen:
            return
        await self._close_node()
        await self.start(listen)

    async def _close_node(self) -> None:
        if self._node is not None:
            self._node.close()
            await self._node.wait_closed()
            self._node = None
        self.address = None

    # ---- health check node ports --------------------------------------------------------
    def _check_answer(self, port: int):
        def answer(method: str, path: str) -> tuple[int, dict]:
            ns, name, n = self._state.get(port, ("", "", 0))
            healthy = self.problem() is None
            body = {"service": {"namespace": ns, "name": name}, "localEndpoints": n,
                    "serviceProxyHealthy": healthy}
            # as kube-proxy: 200 only with local endpoints AND a healthy proxy, so a node
            # whose syncs are stuck gets no load-balancer traffic either
            return (200 if n > 0 and healthy else 503), body
        return answer

    async def sync_checks(self, checks: dict[int, tuple[str, str, int]]) -> None:
        """Listeners for exactly the ports in `checks` (port -> (ns, name, local count))."""
        self._state = dict(checks)
        for port in [p for p in self._checks if p not in checks]:
            srv = self._checks.pop(port)
            srv.close()
            await srv.wait_closed()
        for port, (ns, name, _n) in checks.items():
            if port in self._checks:
                continue
            try:
                self._checks[port] = await asyncio.start_server(
                    lambda r, w, p=port: _serve_one(r, w, self._check_answer(p)), None, port)
                self._failed.discard(port)
                log.info("health check node port %d for %s/%s", port, ns, name)
            except OSError as e:
                if port not in self._failed:  # tried again after every sync, logged once
                    self._failed.add(port)
                    self.ctx.control.count_sync_error("healthcheck")
                    log.error("health_check_node_port %d of %s/%s: cannot listen: %s; load "
                              "balancers will see this node as down for it", port, ns, name,
                              e.strerror or e)
        self._failed &= set(checks)

    async def close(self) -> None:
        await self._close_node()
        await self.sync_checks({})
