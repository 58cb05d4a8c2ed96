"""The Prometheus exporter's HTTP server: off with `metrics.listen: null`; port 0 picks a free
port (logged, and written to the status file); a reload that changes the address re-listens."""

from __future__ import annotations

import logging

log = logging.getLogger("meshd.daemon")


class Exporter:
    def __init__(self, collector):
        self.collector = collector
        self.listen: str | None = None
        self.address: str | None = None  # host:port actually bound
        self._server = None

    def start(self, listen: str | None) -> None:
        from meshd.metrics import start_metrics_server
        self.listen = listen
        if listen is None:
            log.info("metrics exporter off (metrics.listen is null)")
            return
        try:
            self._server = start_metrics_server(listen, self.collector)
        except OSError as e:
            log.error("metrics: cannot listen on %s: %s (set metrics.listen to a free "
                      "address, or null to turn the exporter off); running without it",
                      listen, e.strerror or e)
            return
        host, port = self._server.server_address[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("metrics on http://%s/metrics", self.address)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.address = None

    def relisten(self, listen: str | None) -> None:
        if listen == self.listen:
            return
        self.stop()
        self.start(listen)
