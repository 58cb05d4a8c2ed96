"""python -m kubeapi --etcd http://127.0.0.1:PORT [--listen 127.0.0.1:0] [--bookmark-interval S]

Serves the test API (kubeapi.server) over the given etcd until SIGTERM/SIGINT. Prints one line
`listening on http://HOST:PORT` on stdout once it accepts connections (the harness waits for it).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from urllib.parse import urlsplit

from aiohttp import web

from kubeapi.server import KubeApi


async def main() -> None:
    ap = argparse.ArgumentParser(prog="kubeapi")
    ap.add_argument("--etcd", required=True)
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--bookmark-interval", type=float, default=60.0)
    args = ap.parse_args()
    if args.etcd.startswith("unix://"):  # meshd's EmbeddedEtcd: unix:///dir/client.sock:1
        path, _, port = args.etcd.rpartition(":")  # aetcd's target is f"{host}:{port}"
        api = KubeApi(path, int(port), args.bookmark_interval)
    else:
        u = urlsplit(args.etcd)
        api = KubeApi(u.hostname or "127.0.0.1", u.port or 2379, args.bookmark_interval)
    await api.connect()
    runner = web.AppRunner(api.app(), access_log=None, shutdown_timeout=1)
    await runner.setup()
    host, _, port = args.listen.rpartition(":")
    site = web.TCPSite(runner, host, int(port))
    await site.start()
    sock = site._server.sockets[0]  # type: ignore[union-attr]
    print(f"listening on http://{host}:{sock.getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for req in list(api.streams.values()):
        if req.transport is not None:
            req.transport.abort()
    await runner.cleanup()
    await api.close()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
